// Anon's fused CPU step: one pass over each tensor, vectorized with ATen's at::vec (AVX2 or AVX-512 when
// anon_hf/backends/cpu_kernel.py builds for them, as ATen picks for this CPU; scalar lanes otherwise).
//
// Between refreshes a step reads p, g, m, s, v and writes p, m, s (8 memory passes; fused AdamW makes 7). A refresh
// step also writes v and resets s. Every element is computed in fp32 whatever the storage dtypes (float, bfloat16,
// float16), in the same order of operations as anon_hf/backends/fused/graphs.py:
//
//   g  = sign * g  (+ l2 * p)
//   m  = m + (g - m) * weight1                        weight1 = 1 - beta1
//   s  = s * beta2 + g * g * weight2                  weight2 = 1 - beta2
//   sigma = s * inv_bias2 + eps                     inv_bias2 = 1 / (1 - beta2**n), per tensor
//   refresh:  u = w_new * sigma**gamma + w_prev * v**-2   where a previous v is averaged in, else sigma**gamma
//             v = u**-0.5 (keep_unseen: the old v where s == 0),   s = 0
//   else, per anon_hf.refresh.StepRule, with est = sigma**(-gamma / 2) (v itself is not written):
//             late_seen and v == 0:  v = est where s > 0, else 0
//             otherwise, with a limit:  v = min(v, max_ratio * est)
//   p  = clamp(p * decay + m * v * neg_step_size, lo, hi)
//
// The refresh rule and how sigma**gamma is computed (directly or in log space) are anon_hf/refresh.py's: the mode
// arrives as an argument and the kernel never picks one. The scalars, modes, moment updates and step rule are
// anon_kernel.h's, shared with the 8-bit kernel.
//
// Elementwise only: results do not depend on the number of threads. An ordinary step of a preconditioned tensor runs
// ordinary_range, a loop without calls that hands the rare blocks where the step rule computes est to the general
// block; refreshes, their checks and the tails run block.

#include "anon_kernel.h"

#include <atomic>
#include <cmath>
#include <cstring>
#include <mutex>
#include <set>
#include <thread>
#include <limits>
#include <type_traits>

namespace {

using namespace anon_hf;

// Elements per iteration: two float vectors, i.e. one vector of a 16-bit dtype.
constexpr int64_t kBlock = 2 * FloatVec::size();
// Elements per task of at::parallel_for: large enough that a task's memory traffic dwarfs its scheduling.
constexpr int64_t kGrain = 1 << 15;


// Bounds of the refresh check's shortcut (see block): (1 / 1e18)**2 * 1e-6 = 1e-42 > 0 and 1e15 leave u > 0.
constexpr float kMinPrecond = 1.0f / 1e18f;
constexpr float kMaxPrecond = 1e15f;
constexpr float kMinWeightPrev = 1e-6f;


struct Settings {
  float s[kSlotCount];
  float inv_bias2;  // this tensor's 1 / (1 - beta2**n), n the gradients since its last refresh, this one included
  bool l2;
  bool bounds;
  bool preconditioned;
  Mode refresh;  // kNone: an ordinary step
  bool has_prev;     // a previous preconditioner is averaged in (beta3 > 0, not the first refresh)
  bool keep_unseen;  // elements with s == 0 keep v; those with v == 0 start the mean afresh
  StepRule rule;      // an ordinary step's
};


template <typename T>
inline void load2(const T* ptr, FloatVec& a, FloatVec& b) {
  if constexpr (std::is_same_v<T, float>) {
    a = FloatVec::loadu(ptr);
    b = FloatVec::loadu(ptr + FloatVec::size());
  } else {
    std::tie(a, b) = at::vec::convert_to_float<T>(Vectorized<T>::loadu(ptr));
  }
}

template <typename T>
inline void store2(T* ptr, const FloatVec& a, const FloatVec& b) {
  if constexpr (std::is_same_v<T, float>) {
    a.store(ptr);
    b.store(ptr + FloatVec::size());
  } else {
    at::vec::convert_from_float<T>(a, b).store(ptr);
  }
}

// The new preconditioner (anon_hf/refresh.py): u = sigma**gamma, averaged with the previous v**-2 where there is one,
// v = u**-0.5, and with keep_unseen the old v where s == 0. Mode::kPower computes sigma**gamma as
// exp(gamma * log(sigma)) with at::vec's 20-ulp exp: a quarter of the cost of its pow, within ~1e-6 +
// |gamma * log(sigma)| * 6e-8 relative (the eager paths' preconditioners are within ~2e-6). Mode::kLog keeps
// log(u) and combines the two terms by logaddexp, so v = exp(-log(u) / 2) stays in range where u itself would not.
inline FloatVec new_precond(const FloatVec& exp_avg_sq, const FloatVec& precond, const Settings& st) {
  const FloatVec sigma = at::vec::fmadd(exp_avg_sq, FloatVec(st.inv_bias2), FloatVec(st.s[kEps]));
  // Lanes whose mean starts here: with keep_unseen, those whose v is still 0 (u_prev would be inf).
  const FloatVec fresh = st.keep_unseen ? (precond <= FloatVec(0.0f)) : FloatVec(0.0f);
  FloatVec result;
  if (st.refresh == Mode::kLog) {
    const FloatVec log_power = sigma.log() * FloatVec(st.s[kGamma]);
    FloatVec log_u = log_power;
    if (st.has_prev) {
      const FloatVec log_new = log_power + FloatVec(std::log(st.s[kWeightNew]));
      const FloatVec log_prev = precond.log() * FloatVec(-2.0f) + FloatVec(std::log(st.s[kWeightPrev]));
      const FloatVec high = at::vec::maximum(log_new, log_prev);
      const FloatVec gap = (log_new - log_prev).abs();
      log_u = FloatVec::blendv(high + (FloatVec(0.0f) - gap).exp().log1p(), log_power, fresh);
    }
    result = (log_u * FloatVec(-0.5f)).exp();
  } else {
    const FloatVec power = st.refresh == Mode::kOne ? sigma : (sigma.log() * FloatVec(st.s[kGamma])).exp_u20();
    FloatVec u = power;
    if (st.has_prev) {
      const FloatVec inverse = precond.reciprocal();
      u = FloatVec::blendv(power * FloatVec(st.s[kWeightNew]) + inverse * inverse * FloatVec(st.s[kWeightPrev]),
                           power, fresh);
    }
    result = u.rsqrt();
  }
  return st.keep_unseen ? FloatVec::blendv(result, precond, exp_avg_sq == FloatVec(0.0f)) : result;
}

// est = sigma**(-gamma / 2) in the rule's mode: a reciprocal square root for gamma == 1, else exp and log (kLog as
// kPower: an est that overflows to inf is what anon_hf.refresh's eager rule computes too).
inline FloatVec estimate(const FloatVec& sigma, const Settings& st) {
  if (st.rule.estimate == Mode::kOne) return sigma.rsqrt();
  return (sigma.log() * FloatVec(-0.5f * st.s[kGamma])).exp_u20();
}

// The preconditioner an ordinary step multiplies m by (anon_hf.refresh.StepRule), for a block's two vectors. est is
// computed only in blocks with a lane whose v is 0 (the late-seen rule) or where the limit may bind (limit_lanes):
// elsewhere the rule gives v.
inline void step_precond(const FloatVec& s0, const FloatVec& s1, FloatVec& v0, FloatVec& v1, const Settings& st) {
  const FloatVec sigma0 = at::vec::fmadd(s0, FloatVec(st.inv_bias2), FloatVec(st.s[kEps]));
  const FloatVec sigma1 = at::vec::fmadd(s1, FloatVec(st.inv_bias2), FloatVec(st.s[kEps]));
  if (!rule_needs_estimate(sigma0, sigma1, v0, v1, st.rule, FloatVec(st.s[kGamma]),
                           FloatVec(limit_threshold(st.rule, st.s)))) {
    return;
  }
  v0 = rule_precond(s0, v0, estimate(sigma0, st), st.rule, st.s);
  v1 = rule_precond(s1, v1, estimate(sigma1, st), st.rule, st.s);
}

// The value as a V stores it, back in fp32: the refresh check judges what will be stored.
template <typename V>
inline void round_to(FloatVec& a, FloatVec& b) {
  if constexpr (!std::is_same_v<V, float>) {
    V tmp[kBlock];
    store2(tmp, a, b);
    load2(tmp, a, b);
  }
}

// kBlock elements starting at index i. `Check` computes only the finiteness verdict of a refresh (nothing is written):
// `bad` accumulates s * 0 + v * 0, which stays 0 while both are finite and turns nan otherwise.
template <typename P, typename M, typename V, bool Check>
inline void block(P* p, const P* g, M* m, M* s, V* v, int64_t i, float neg_step_size, bool keep, const Settings& st,
                  FloatVec* bad) {
  FloatVec p0, p1, g0, g1;
  load2(g + i, g0, g1);
  g0 = g0 * FloatVec(st.s[kSign]);
  g1 = g1 * FloatVec(st.s[kSign]);
  if (st.l2 || !Check) load2(p + i, p0, p1);
  if (st.l2) {
    g0 = g0 + p0 * FloatVec(st.s[kL2]);
    g1 = g1 + p1 * FloatVec(st.s[kL2]);
  }
  FloatVec m0, m1;
  if (!Check) {
    load2(m + i, m0, m1);
    m0 = first_moment(m0, g0, FloatVec(st.s[kWeight1]));
    m1 = first_moment(m1, g1, FloatVec(st.s[kWeight1]));
    store2(m + i, m0, m1);
  }
  if (!st.preconditioned) {
    if (!Check) {
      FloatVec n0 = p0 * FloatVec(st.s[kDecay]) + m0 * FloatVec(neg_step_size);
      FloatVec n1 = p1 * FloatVec(st.s[kDecay]) + m1 * FloatVec(neg_step_size);
      if (st.bounds) {
        n0 = at::vec::clamp(n0, FloatVec(st.s[kLo]), FloatVec(st.s[kHi]));
        n1 = at::vec::clamp(n1, FloatVec(st.s[kLo]), FloatVec(st.s[kHi]));
      }
      store2(p + i, n0, n1);
    }
    return;
  }
  FloatVec s0, s1, v0, v1;
  load2(s + i, s0, s1);
  s0 = accumulator(s0, g0, FloatVec(st.s[kBeta2]), FloatVec(st.s[kWeight2]));
  s1 = accumulator(s1, g1, FloatVec(st.s[kBeta2]), FloatVec(st.s[kWeight2]));
  load2(v + i, v0, v1);
  if (Check && st.has_prev && st.s[kWeightPrev] >= kMinWeightPrev && !std::is_same_v<V, at::Half>) {
    // Shortcut, exact for every mode: with 0 <= s <= FLT_MAX (so sigma >= 0, never nan) and v in
    // [kMinPrecond, kMaxPrecond] (so v > 0: the mean is averaged, never started afresh), the previous term
    // w_prev * v**-2 >= 1e-36 keeps u > 0 (a normal float) and sigma**gamma is in [0, inf], so u is in (0, inf] and
    // u**-0.5 in [0, 3e22), finite in every storage dtype the kernel writes except float16, whose blocks take the
    // full check; in log space, log(u) >= -83 likewise. A kept v is finite. Only blocks with another lane compute.
    const FloatVec zero(0.0f), largest(std::numeric_limits<float>::max());
    const FloatVec low(kMinPrecond), high(kMaxPrecond);
    const FloatVec fast = (s0 >= zero) & (s0 <= largest) & (v0 >= low) & (v0 <= high) & (s1 >= zero) &
                          (s1 <= largest) & (v1 >= low) & (v1 <= high);
    if (fast.zero_mask() == 0) return;
  }
  if (st.refresh != Mode::kNone) {
    FloatVec n0 = new_precond(s0, v0, st);
    FloatVec n1 = new_precond(s1, v1, st);
    if (Check) {
      round_to<V>(n0, n1);
      *bad = *bad + s0 * FloatVec(0.0f) + n0 * FloatVec(0.0f);
      *bad = *bad + s1 * FloatVec(0.0f) + n1 * FloatVec(0.0f);
      return;
    }
    if (keep) {
      store2(v + i, n0, n1);
      if constexpr (std::is_same_v<V, float>) {
        v0 = n0;
        v1 = n1;
      } else {
        load2(v + i, v0, v1);  // the update uses the preconditioner as stored (rounded to V)
      }
    }
    s0 = FloatVec(0.0f);
    s1 = FloatVec(0.0f);
  } else if (st.rule.estimate != Mode::kNone) {
    step_precond(s0, s1, v0, v1, st);
  }
  if (Check) return;
  store2(s + i, s0, s1);
  FloatVec n0 = p0 * FloatVec(st.s[kDecay]) + m0 * v0 * FloatVec(neg_step_size);
  FloatVec n1 = p1 * FloatVec(st.s[kDecay]) + m1 * v1 * FloatVec(neg_step_size);
  if (st.bounds) {
    n0 = at::vec::clamp(n0, FloatVec(st.s[kLo]), FloatVec(st.s[kHi]));
    n1 = at::vec::clamp(n1, FloatVec(st.s[kLo]), FloatVec(st.s[kHi]));
  }
  store2(p + i, n0, n1);
}

// One tensor's storage, as the blocks read it (s and v are null without a preconditioner).
template <typename P, typename M, typename V>
struct Storage {
  P* p;
  const P* g;
  M* m;
  M* s;
  V* v;
};

// An ordinary step's scalars as vectors and its flags, read once per range: read from Settings in the loop, they would
// be loaded again for every block, since the compiler cannot tell that a store to p, m or s leaves them unchanged.
struct OrdinaryScalars {
  FloatVec sign, l2, weight1, beta2, weight2, inv_bias2, eps, decay, step_size, lo, hi, gamma, threshold;
  StepRule rule;
  const float* slots;
  bool has_l2, bounds;
  OrdinaryScalars(const Settings& st, float neg_step_size)
      : sign(st.s[kSign]), l2(st.s[kL2]), weight1(st.s[kWeight1]), beta2(st.s[kBeta2]), weight2(st.s[kWeight2]),
        inv_bias2(st.inv_bias2), eps(st.s[kEps]), decay(st.s[kDecay]), step_size(neg_step_size), lo(st.s[kLo]),
        hi(st.s[kHi]), gamma(st.s[kGamma]), threshold(limit_threshold(st.rule, st.s)), rule(st.rule), slots(st.s),
        has_l2(st.l2), bounds(st.bounds) {}
};

// One block of an ordinary step of a preconditioned tensor (a step between refreshes: nearly every step), computed
// as block<..., false> computes it, in the same order of operations, but with every load before the first store.
// Where the step rule needs est on a lane of the block (see step_precond), est is computed here for gamma == 1 (a
// reciprocal square root); for the other modes (exp and log, library calls) it returns false, having written nothing,
// and the caller runs block on it, out of line. So the loop over the blocks has no call in it and keeps its vectors
// and scalars in registers (block's step_precond is a call, made for every block whenever the group has a step rule,
// as at the defaults, with the block's vectors spilled around it).
template <typename P, typename M, typename V>
inline bool ordinary_block(P* p, const P* g, M* m, M* s, const V* v, int64_t i, const OrdinaryScalars& c) {
  FloatVec p0, p1, g0, g1, m0, m1, s0, s1, v0, v1;
  load2(g + i, g0, g1);
  load2(p + i, p0, p1);
  load2(m + i, m0, m1);
  load2(s + i, s0, s1);
  load2(v + i, v0, v1);
  g0 = g0 * c.sign;
  g1 = g1 * c.sign;
  if (c.has_l2) {
    g0 = g0 + p0 * c.l2;
    g1 = g1 + p1 * c.l2;
  }
  m0 = first_moment(m0, g0, c.weight1);
  m1 = first_moment(m1, g1, c.weight1);
  s0 = accumulator(s0, g0, c.beta2, c.weight2);
  s1 = accumulator(s1, g1, c.beta2, c.weight2);
  const StepRule& rule = c.rule;
  if (rule.estimate != Mode::kNone) {
    const FloatVec sigma0 = at::vec::fmadd(s0, c.inv_bias2, c.eps);
    const FloatVec sigma1 = at::vec::fmadd(s1, c.inv_bias2, c.eps);
    if (rule_needs_estimate(sigma0, sigma1, v0, v1, rule, c.gamma, c.threshold)) {
      // est as estimate() computes it for gamma == 1.
      if (rule.estimate != Mode::kOne) return false;
      v0 = rule_precond(s0, v0, sigma0.rsqrt(), rule, c.slots);
      v1 = rule_precond(s1, v1, sigma1.rsqrt(), rule, c.slots);
    }
  }
  FloatVec n0 = p0 * c.decay + m0 * v0 * c.step_size;
  FloatVec n1 = p1 * c.decay + m1 * v1 * c.step_size;
  if (c.bounds) {
    n0 = at::vec::clamp(n0, c.lo, c.hi);
    n1 = at::vec::clamp(n1, c.lo, c.hi);
  }
  store2(m + i, m0, m1);
  store2(s + i, s0, s1);
  store2(p + i, n0, n1);
  return true;
}

// block, kept out of line: what an ordinary step runs on the blocks ordinary_block declines.
template <typename P, typename M, typename V>
__attribute__((noinline)) void ordinary_block_with_rule(P* p, const P* g, M* m, M* s, V* v, int64_t i,
                                                        float neg_step_size, const Settings& st) {
  FloatVec unused(0.0f);
  block<P, M, V, false>(p, g, m, s, v, i, neg_step_size, true, st, &unused);
}

// An ordinary step's full blocks from index i to end; returns where the tail starts. Flattened: the step rule's checks
// (anon_kernel.h) are inlined into the loop rather than called, and only ordinary_block_with_rule stays a call.
template <typename P, typename M, typename V>
__attribute__((flatten)) int64_t ordinary_range(P* p, const P* g, M* m, M* s, V* v, int64_t i, int64_t end,
                                                float neg_step_size, const Settings& st) {
  const OrdinaryScalars scalars(st, neg_step_size);
  for (; i + kBlock <= end; i += kBlock) {
    if (!ordinary_block<P, M, V>(p, g, m, s, v, i, scalars)) {
      ordinary_block_with_rule<P, M, V>(p, g, m, s, v, i, neg_step_size, st);
    }
  }
  return i;
}

// The tail of a range, count < kBlock elements from index i, through zero-padded copies (s and v padded with ones so
// that a refresh check sees finite values there).
template <typename P, typename M, typename V, bool Check>
void tail(const Storage<P, M, V>& t, int64_t i, int64_t count, float neg_step_size, bool keep, const Settings& st,
          FloatVec* bad) {
  P tp[kBlock] = {}, tg[kBlock] = {};
  M tm[kBlock] = {}, ts[kBlock];
  V tv[kBlock];
  std::fill(ts, ts + kBlock, M(1.0f));
  std::fill(tv, tv + kBlock, V(1.0f));
  std::memcpy(tp, t.p + i, count * sizeof(P));
  std::memcpy(tg, t.g + i, count * sizeof(P));
  std::memcpy(tm, t.m + i, count * sizeof(M));
  if (t.s != nullptr) {
    std::memcpy(ts, t.s + i, count * sizeof(M));
    std::memcpy(tv, t.v + i, count * sizeof(V));
  }
  block<P, M, V, Check>(tp, tg, tm, ts, tv, 0, neg_step_size, keep, st, bad);
  if (Check) return;
  std::memcpy(t.p + i, tp, count * sizeof(P));
  std::memcpy(t.m + i, tm, count * sizeof(M));
  if (t.s != nullptr) {
    std::memcpy(t.s + i, ts, count * sizeof(M));
    std::memcpy(t.v + i, tv, count * sizeof(V));
  }
}

// Elements [begin, end) of one tensor: full blocks in place, then the tail. Returns false if a refresh's accumulator
// or preconditioner is not finite there.
template <typename P, typename M, typename V, bool Check>
bool run_range(Storage<P, M, V> t, int64_t begin, int64_t end, float neg_step_size, bool keep, const Settings& st) {
  FloatVec bad(0.0f);
  int64_t i = begin;
  if constexpr (!Check) {
    if (st.preconditioned && st.refresh == Mode::kNone) {
      i = ordinary_range(t.p, t.g, t.m, t.s, t.v, i, end, neg_step_size, st);
    }
  }
  for (; i + kBlock <= end; i += kBlock) block<P, M, V, Check>(t.p, t.g, t.m, t.s, t.v, i, neg_step_size, keep, st, &bad);
  if (i < end) tail<P, M, V, Check>(t, i, end - i, neg_step_size, keep, st, &bad);
  if (!Check) return true;
  float lanes[FloatVec::size()];
  bad.store(lanes);
  return std::all_of(lanes, lanes + FloatVec::size(), [](float lane) { return lane == 0.0f; });  // nan != 0
}

// One tensor, over torch's threads where it is large (for_each_part). Returns whether a refresh's accumulator and
// preconditioner are finite.
template <typename P, typename M, typename V, bool Check>
bool run_tensor(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                const at::Tensor& precond, float neg_step_size, bool keep, const Settings& st) {
  const Storage<P, M, V> t{param.data_ptr<P>(), grad.const_data_ptr<P>(), exp_avg.data_ptr<M>(),
                           st.preconditioned ? exp_avg_sq.data_ptr<M>() : nullptr,
                           st.preconditioned ? precond.data_ptr<V>() : nullptr};
  std::atomic<bool> finite{true};
  for_each_part(param.numel(), kGrain, [&](int64_t begin, int64_t end) {
    if (!run_range<P, M, V, Check>(t, begin, end, neg_step_size, keep, st)) finite = false;
  });
  return finite;
}

template <typename P, typename M, typename V>
bool dispatch_check(bool check, const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
                    const at::Tensor& exp_avg_sq, const at::Tensor& precond, float neg_step_size, bool keep,
                    const Settings& st) {
  return check ? run_tensor<P, M, V, true>(param, grad, exp_avg, exp_avg_sq, precond, neg_step_size, keep, st)
               : run_tensor<P, M, V, false>(param, grad, exp_avg, exp_avg_sq, precond, neg_step_size, keep, st);
}

template <typename P, typename M>
bool dispatch_precond(c10::ScalarType precond_type, bool check, const at::Tensor& param, const at::Tensor& grad,
                      const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq, const at::Tensor& precond,
                      float neg_step_size, bool keep, const Settings& st) {
  switch (precond_type) {
    case at::kFloat:
      return dispatch_check<P, M, float>(check, param, grad, exp_avg, exp_avg_sq, precond, neg_step_size, keep, st);
    case at::kBFloat16:
      return dispatch_check<P, M, at::BFloat16>(check, param, grad, exp_avg, exp_avg_sq, precond, neg_step_size,
                                                keep, st);
    case at::kHalf:
      return dispatch_check<P, M, at::Half>(check, param, grad, exp_avg, exp_avg_sq, precond, neg_step_size, keep,
                                            st);
    default:
      TORCH_CHECK(false, "anon_hf CPU kernel: unsupported precond dtype ", precond_type);
  }
}

template <typename P>
bool dispatch_moments(c10::ScalarType moments_type, c10::ScalarType precond_type, bool check, const at::Tensor& param,
                      const at::Tensor& grad, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                      const at::Tensor& precond, float neg_step_size, bool keep, const Settings& st) {
  switch (moments_type) {
    case at::kFloat:
      return dispatch_precond<P, float>(precond_type, check, param, grad, exp_avg, exp_avg_sq, precond,
                                        neg_step_size, keep, st);
    case at::kBFloat16:
      return dispatch_precond<P, at::BFloat16>(precond_type, check, param, grad, exp_avg, exp_avg_sq, precond,
                                               neg_step_size, keep, st);
    case at::kHalf:
      return dispatch_precond<P, at::Half>(precond_type, check, param, grad, exp_avg, exp_avg_sq, precond,
                                           neg_step_size, keep, st);
    default:
      TORCH_CHECK(false, "anon_hf CPU kernel: unsupported moments dtype ", moments_type);
  }
}

bool supported_dtype(c10::ScalarType type) {
  return type == at::kFloat || type == at::kBFloat16 || type == at::kHalf;
}

bool supported_tensor(const at::Tensor& tensor) {
  // Not a tensor subclass that intercepts ops (DTensor), dense, on CPU, contiguous, fp32/bf16/fp16.
  return !tensor.key_set().has(c10::DispatchKey::Python) && tensor.layout() == at::kStrided &&
         tensor.device().is_cpu() && tensor.is_contiguous() && supported_dtype(tensor.scalar_type());
}

// Per tensor, whether anon_step handles it (see supported_tensor; grads of the param's dtype, state of its size,
// exp_avg and exp_avg_sq of one dtype). exp_avg_sqs and preconds are empty without a preconditioner.
std::vector<bool> anon_supported(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                                 const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
                                 const std::vector<at::Tensor>& preconds) {
  const size_t count = params.size();
  const bool preconditioned = !preconds.empty();
  TORCH_CHECK(grads.size() == count && exp_avgs.size() == count &&
                  (!preconditioned || (preconds.size() == count && exp_avg_sqs.size() == count)),
              "anon_hf CPU kernel: the tensor lists must have one entry per param");
  std::vector<bool> result(count, false);
  for (size_t i = 0; i < count; ++i) {
    const at::Tensor& param = params[i];
    bool ok = supported_tensor(param) && supported_tensor(grads[i]) && supported_tensor(exp_avgs[i]) &&
              grads[i].scalar_type() == param.scalar_type() && grads[i].numel() == param.numel() &&
              exp_avgs[i].numel() == param.numel();
    if (ok && preconditioned) {
      ok = supported_tensor(exp_avg_sqs[i]) && supported_tensor(preconds[i]) &&
           exp_avg_sqs[i].scalar_type() == exp_avgs[i].scalar_type() && exp_avg_sqs[i].numel() == param.numel() &&
           preconds[i].numel() == param.numel();
    }
    result[i] = ok;
  }
  return result;
}

// The lists' sizes and the modes, checked before anything is written.
void check_lists(size_t count, const std::vector<at::Tensor>& grads, const std::vector<at::Tensor>& exp_avgs,
                 const std::vector<at::Tensor>& exp_avg_sqs, const std::vector<at::Tensor>& preconds,
                 const std::vector<at::Tensor>& steps, const std::vector<double>& neg_step_sizes,
                 const std::vector<double>& inv_bias2s, const std::vector<double>& scalars, int64_t refresh,
                 bool check_only, const std::vector<bool>& keep) {
  const bool preconditioned = !preconds.empty();
  TORCH_CHECK(grads.size() == count && exp_avgs.size() == count && neg_step_sizes.size() == count &&
                  inv_bias2s.size() == count,
              "anon_hf CPU kernel: params, grads, exp_avgs, neg_step_sizes and inv_bias2s must have one entry per "
              "tensor");
  TORCH_CHECK(!preconditioned || (preconds.size() == count && exp_avg_sqs.size() == count),
              "anon_hf CPU kernel: exp_avg_sqs and preconds must be empty or have one tensor per param");
  TORCH_CHECK(scalars.size() == kSlotCount, "anon_hf CPU kernel: expected ", kSlotCount, " scalars");
  TORCH_CHECK(refresh >= 0 && refresh <= 3, "anon_hf CPU kernel: refresh mode must be 0 (none) or one of REFRESH_MODES");
  TORCH_CHECK(refresh == 0 || preconditioned, "anon_hf CPU kernel: a refresh needs exp_avg_sqs and preconds");
  TORCH_CHECK(keep.empty() || keep.size() == count, "anon_hf CPU kernel: keep must be empty or one flag per tensor");
  TORCH_CHECK(!check_only || refresh != 0, "anon_hf CPU kernel: check_only needs a refresh mode");
  TORCH_CHECK(steps.empty() || steps.size() == count, "anon_hf CPU kernel: steps must be empty or one per tensor");
}

// One tensor, dispatched on its dtypes; returns a refresh check's verdict (true otherwise).
bool step_tensor(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
                 const at::Tensor& exp_avg_sq, const at::Tensor& precond, float neg_step_size, bool keep,
                 bool check_only, const Settings& st) {
  const c10::ScalarType moments_type = exp_avg.scalar_type();
  const c10::ScalarType precond_type = st.preconditioned ? precond.scalar_type() : at::kFloat;
  switch (param.scalar_type()) {
    case at::kFloat:
      return dispatch_moments<float>(moments_type, precond_type, check_only, param, grad, exp_avg, exp_avg_sq,
                                     precond, neg_step_size, keep, st);
    case at::kBFloat16:
      return dispatch_moments<at::BFloat16>(moments_type, precond_type, check_only, param, grad, exp_avg,
                                            exp_avg_sq, precond, neg_step_size, keep, st);
    default:
      return dispatch_moments<at::Half>(moments_type, precond_type, check_only, param, grad, exp_avg, exp_avg_sq,
                                        precond, neg_step_size, keep, st);
  }
}

// Steps every tensor (check_only=false), then adds 1 to each of `steps`, or returns, per tensor, whether a refresh
// would produce a finite accumulator and preconditioner without writing anything (check_only=true).
// exp_avg_sqs and preconds are empty when the preconditioner is all ones (gamma == 0). keep[i] = false keeps tensor
// i's previous preconditioner at a refresh. estimate, limit and late_seen: an ordinary step's StepRule.
std::vector<bool> anon_step(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                            const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
                            const std::vector<at::Tensor>& preconds, const std::vector<at::Tensor>& steps,
                            const std::vector<double>& neg_step_sizes, const std::vector<double>& inv_bias2s,
                            const std::vector<double>& scalars, bool l2, bool bounds, int64_t refresh, bool has_prev,
                            bool keep_unseen, int64_t estimate, bool limit, bool late_seen, bool check_only,
                            const std::vector<bool>& keep) {
  const size_t count = params.size();
  const bool preconditioned = !preconds.empty();
  check_lists(count, grads, exp_avgs, exp_avg_sqs, preconds, steps, neg_step_sizes, inv_bias2s, scalars, refresh,
              check_only, keep);
  Settings st;
  for (int64_t slot = 0; slot < kSlotCount; ++slot) st.s[slot] = static_cast<float>(scalars[slot]);
  st.l2 = l2;
  st.bounds = bounds;
  st.preconditioned = preconditioned;
  st.refresh = static_cast<Mode>(refresh);
  st.has_prev = has_prev;
  st.keep_unseen = keep_unseen;
  st.rule = step_rule(estimate, limit, late_seen, scalars, preconditioned, refresh == 0);
  const std::vector<bool> ok = anon_supported(params, grads, exp_avgs, exp_avg_sqs, preconds);
  for (size_t i = 0; i < count; ++i) {
    TORCH_CHECK(ok[i], "anon_hf CPU kernel: tensor ", i, " is not supported (see anon_supported): grads and state ",
                "must be contiguous fp32/bf16/fp16 CPU tensors of the param's size");
  }

  std::vector<bool> finite(count, true);
  for (size_t i = 0; i < count; ++i) {
    if (params[i].numel() == 0) continue;
    Settings tensor_st = st;
    tensor_st.inv_bias2 = static_cast<float>(inv_bias2s[i]);
    finite[i] = step_tensor(params[i], grads[i], exp_avgs[i], preconditioned ? exp_avg_sqs[i] : exp_avgs[i],
                            preconditioned ? preconds[i] : exp_avgs[i], static_cast<float>(neg_step_sizes[i]),
                            keep.empty() || keep[i], check_only, tensor_st);
  }
  if (!check_only) increment_steps(steps);
  return finite;
}

// How many distinct threads ran the parts of run_in_parts for `parts` parts (1 without the OpenMP ABI): the kernel's
// parallelism, for tests.
int64_t threads_in_parts(int64_t parts) {
  std::mutex mutex;
  std::set<std::thread::id> seen;
  const auto record = [&](int64_t, int64_t) {
    std::lock_guard<std::mutex> lock(mutex);
    seen.insert(std::this_thread::get_id());
  };
#ifdef ANON_HF_OPENMP_ABI
  run_in_parts(parts, parts, record);
#else
  record(0, parts);
#endif
  return static_cast<int64_t>(seen.size());
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("anon_step", &anon_step, "Anon's fused step over lists of CPU tensors (see anon_cpu.cpp)",
             pybind11::call_guard<pybind11::gil_scoped_release>());
  module.def("anon_supported", &anon_supported, "Per tensor, whether anon_step handles it");
  module.def("threads_in_parts", &threads_in_parts, "Distinct threads that ran run_in_parts' parts (for tests)");
  export_interface(module);
}
