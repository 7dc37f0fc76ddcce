// What anon_hf's two CPU kernels (anon_cpu.cpp: fp32/bf16/fp16 state; anon_cpu_8bit.cpp: Anon8bit's 8-bit state)
// share, defined once: the scalar slots and modes they export (anon_hf/backends/cpu_kernel.py checks them by name
// against anon_hf/backends/fused/scalars.py and anon_hf/refresh.py when a kernel loads), the update of the first
// moment and the accumulator, the step rule between refreshes (anon_hf.refresh.StepRule: its arguments, their checks
// and the limit's shortcut), and how a large tensor is split over torch's OpenMP threads.

#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/extension.h>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <vector>

namespace anon_hf {

using at::vec::Vectorized;
using FloatVec = Vectorized<float>;
using IntVec = Vectorized<int32_t>;
// zero_mask() of a vector whose lanes are all 0: no lane compared true.
constexpr int kNoLane = (1 << FloatVec::size()) - 1;

// The layout of the step's scalars (anon_hf/backends/fused/scalars.py SCALAR_SLOTS, where each is explained).
enum Slot : int64_t { kDecay, kWeight1, kBeta2, kWeight2, kSign, kL2, kLo, kHi, kEps, kGamma, kWeightPrev, kWeightNew,
                      kMaxRatio, kSlotCount };
inline constexpr const char* kSlotNames[kSlotCount] = {"decay", "weight1", "beta2",       "weight2",    "sign",
                                                       "l2",    "lo",      "hi",          "eps",        "gamma",
                                                       "weight_prev", "weight_new", "max_ratio"};

// How sigma**gamma (a refresh) or est = sigma**(-gamma / 2) (the step rule) is computed, as anon_hf.refresh's
// refresh_mode says: no power (gamma == 1), directly, or in log space; kNone: not at all.
enum class Mode : int64_t { kNone = 0, kOne = 1, kPower = 2, kLog = 3 };

// An ordinary step's anon_hf.refresh.StepRule: est's mode, whether v is limited to max_ratio * est, and whether
// v == 0 means "not seen yet" (such an element uses est where s > 0, else 0).
struct StepRule {
  Mode estimate = Mode::kNone;
  bool limit = false;
  bool late_seen = false;
  // 2 log2(max_ratio) less the margin of log2_from_bits: the limit's shortcut for gamma != 1 (see limit_lanes).
  float cutoff = 0.0f;
};

// The StepRule from the kernels' arguments, checked (`preconditioned`: the tensors have s and v; `ordinary`: not a
// refresh step).
inline StepRule step_rule(int64_t estimate, bool limit, bool late_seen, const std::vector<double>& scalars,
                          bool preconditioned, bool ordinary) {
  TORCH_CHECK(estimate >= 0 && estimate <= 3, "anon_hf CPU kernel: estimate mode must be 0 (none) or one of ",
              "REFRESH_MODES");
  TORCH_CHECK(estimate == 0 || (ordinary && preconditioned),
              "anon_hf CPU kernel: a step rule applies to ordinary steps with a preconditioner");
  TORCH_CHECK((!limit && !late_seen) || estimate != 0,
              "anon_hf CPU kernel: the limit and the late-seen rule need an estimate mode");
  TORCH_CHECK(!limit || scalars[kGamma] > 0.0, "anon_hf CPU kernel: a limit applies with gamma > 0");
  // log2_from_bits lies at most 0.0861 (+1e-5) below log2 for v and sigma: 2 + gamma of them in the sum.
  const double cutoff = 2.0 * std::log2(scalars[kMaxRatio]) - 0.0862 * (2.0 + scalars[kGamma]) - 1e-3;
  return {static_cast<Mode>(estimate), limit, late_seen, static_cast<float>(cutoff)};
}

// a * b + c rounded once, for each type the kernels compute in: float (the 8-bit kernel's plain loops), at::vec's
// FloatVec (the fp32 kernel) and the intrinsics vectors of the 8-bit kernel's per-ISA step.
inline float fused_multiply_add(float a, float b, float c) { return std::fma(a, b, c); }
inline FloatVec fused_multiply_add(const FloatVec& a, const FloatVec& b, const FloatVec& c) {
  return at::vec::fmadd(a, b, c);
}
#if defined(__AVX2__) && defined(__FMA__)
inline __m256 fused_multiply_add(__m256 a, __m256 b, __m256 c) { return _mm256_fmadd_ps(a, b, c); }
#endif
#ifdef __AVX512F__
inline __m512 fused_multiply_add(__m512 a, __m512 b, __m512 c) { return _mm512_fmadd_ps(a, b, c); }
#endif

// The first moment and the accumulator after the gradient g: m + (g - m) * weight1 and s * beta2 + g * g * weight2,
// written once for every type above (GCC's vector extensions give the intrinsics vectors their operators).
template <class V>
inline V first_moment(const V& m, const V& g, const V& weight1) {
  return fused_multiply_add(g - m, weight1, m);
}

template <class V>
inline V accumulator(const V& s, const V& g, const V& beta2, const V& weight2) {
  return fused_multiply_add(s, beta2, g * g * weight2);
}

// log2(x) from x's bits, as a float: exponent + mantissa fraction (Mitchell's approximation). For a normal x it is
// within 0.0861 below log2(x); for 0 and subnormals it lies above; 1e-5 more for the int-to-float rounding.
inline FloatVec log2_from_bits(const FloatVec& x) {
  const FloatVec bits = at::vec::convert_to_fp_of_same_size<float>(at::vec::cast<int32_t>(x));
  return at::vec::fmadd(bits, FloatVec(1.0f / (1 << 23)), FloatVec(-127.0f));
}

// The threshold limit_lanes compares with: max_ratio**2 for gamma == 1, else the rule's cutoff.
inline float limit_threshold(const StepRule& rule, const float* slots) {
  return rule.estimate == Mode::kOne ? slots[kMaxRatio] * slots[kMaxRatio] : rule.cutoff;
}

// The lanes where max_precond_ratio's limit may bind (v > ratio * sigma**(-gamma / 2)), so that the vectors where it
// cannot skip computing it: for gamma == 1, v * v * sigma > ratio**2 (exact, two multiplies); otherwise the same
// inequality in log2 read from the bits, which errs only by the margin folded into the cutoff. `threshold`:
// limit_threshold's. All bits set in such a lane, none elsewhere.
inline FloatVec limit_lanes(const FloatVec& sigma, const FloatVec& v, Mode estimate, const FloatVec& gamma,
                            const FloatVec& threshold) {
  if (estimate == Mode::kOne) return (v * v * sigma) > threshold;
  return at::vec::fmadd(log2_from_bits(sigma), gamma, log2_from_bits(v) * FloatVec(2.0f)) > threshold;
}

// Whether the step rule computes est in a block of two vectors: a lane of v is 0 under the late-seen rule, or the
// limit may bind on one (limit_lanes). The lanes' masks are or-ed and tested once.
inline bool rule_needs_estimate(const FloatVec& sigma0, const FloatVec& sigma1, const FloatVec& v0, const FloatVec& v1,
                                const StepRule& rule, const FloatVec& gamma, const FloatVec& threshold) {
  const FloatVec zero(0.0f);
  FloatVec lanes = zero;
  if (rule.late_seen) lanes = (v0 == zero) | (v1 == zero);
  if (rule.limit) {
    lanes = lanes | limit_lanes(sigma0, v0, rule.estimate, gamma, threshold) |
            limit_lanes(sigma1, v1, rule.estimate, gamma, threshold);
  }
  return lanes.zero_mask() != kNoLane;
}

// The rule's preconditioner for one vector, given est = sigma**(-gamma / 2) for its lanes: est where late_seen and
// v == 0 and s > 0, 0 where s == 0, min(v, max_ratio * est) elsewhere with the limit, else v.
inline FloatVec rule_precond(const FloatVec& s, const FloatVec& v, const FloatVec& est, const StepRule& rule,
                             const float* slots) {
  const FloatVec zero(0.0f);
  const FloatVec seen = rule.limit ? at::vec::minimum(v, est * FloatVec(slots[kMaxRatio])) : v;
  if (!rule.late_seen) return seen;
  return FloatVec::blendv(seen, FloatVec::blendv(zero, est, s > zero), v == zero);
}

#ifdef ANON_HF_OPENMP_ABI
// The entry point GCC emits for `#pragma omp parallel` (libgomp's ABI, also offered by LLVM's and Intel's OpenMP
// runtimes), called directly: the extensions are compiled without -fopenmp (see for_each_part) yet run on the
// OpenMP thread team that torch's intra-op parallelism uses, so their threads never compete with ATen's.
extern "C" {
void GOMP_parallel(void (*fn)(void*), void* data, unsigned num_threads, unsigned flags);
int omp_get_thread_num();
}

// Runs body(begin, end) over [0, n) in `parts` contiguous parts, one per thread of an OpenMP team of `parts` threads.
template <typename F>
void run_in_parts(int64_t n, int64_t parts, const F& body) {
  struct Task {
    const F* body;
    int64_t n;
    int64_t part;
  };
  Task task{&body, n, (n + parts - 1) / parts};
  const auto run_part = [](void* data) {
    const Task* t = static_cast<const Task*>(data);
    const int64_t begin = omp_get_thread_num() * t->part;
    if (begin < t->n) (*t->body)(begin, std::min(t->n, begin + t->part));
  };
  GOMP_parallel(run_part, &task, static_cast<unsigned>(parts), 0);
}

// body(begin, end) over [0, n) in chunks of `grain` units that the threads of an OpenMP team of `threads` take in turn
// from a shared counter: a thread that runs faster (its core not shared with another job) takes more chunks, where
// run_in_parts' equal parts wait for the slowest thread.
template <typename F>
void run_in_chunks(int64_t n, int64_t grain, int64_t threads, const F& body) {
  struct Task {
    const F* body;
    int64_t n;
    int64_t grain;
    std::atomic<int64_t> next;
  };
  Task task{&body, n, grain, {0}};
  const auto run_chunks = [](void* data) {
    Task* t = static_cast<Task*>(data);
    for (int64_t begin = t->next.fetch_add(t->grain, std::memory_order_relaxed); begin < t->n;
         begin = t->next.fetch_add(t->grain, std::memory_order_relaxed)) {
      (*t->body)(begin, std::min(t->n, begin + t->grain));
    }
  };
  GOMP_parallel(run_chunks, &task, static_cast<unsigned>(threads), 0);
}
#endif

// body(begin, end) over [0, n) units (elements or blocks): in one part per torch thread when n is at least two grains
// and the OpenMP ABI is there, else in one call. The extensions are built without -fopenmp (the fp32 kernel's loop
// compiled slower with it), so at::parallel_for would run serially here.
template <typename F>
void for_each_part(int64_t n, int64_t grain, const F& body) {
#ifdef ANON_HF_OPENMP_ABI
  const int64_t threads = at::get_num_threads();
  if (threads > 1 && n >= 2 * grain && !at::in_parallel_region()) {
    run_in_parts(n, std::min(threads, n / grain), body);
    return;
  }
#endif
  if (n > 0) body(0, n);
}

// for_each_part's split, but in chunks of `grain` units taken in turn by torch's threads (run_in_chunks), for a body
// whose results do not depend on which thread runs a chunk.
template <typename F>
void for_each_chunk(int64_t n, int64_t grain, const F& body) {
#ifdef ANON_HF_OPENMP_ABI
  const int64_t threads = at::get_num_threads();
  if (threads > 1 && n >= 2 * grain && !at::in_parallel_region()) {
    run_in_chunks(n, grain, std::min(threads, n / grain), body);
    return;
  }
#endif
  if (n > 0) body(0, n);
}

// Adds 1 to each 0-d step counter (float32, float64 or int64 on CPU) without going through the dispatcher.
inline void increment_steps(const std::vector<at::Tensor>& steps) {
  for (const at::Tensor& step : steps) {
    TORCH_CHECK(step.device().is_cpu() && step.numel() == 1,
                "anon_hf CPU kernel: step counters must be 1-element CPU tensors");
  }
  for (const at::Tensor& step : steps) {
    switch (step.scalar_type()) {
      case at::kFloat: *step.data_ptr<float>() += 1.0f; break;
      case at::kDouble: *step.data_ptr<double>() += 1.0; break;
      case at::kLong: *step.data_ptr<int64_t>() += 1; break;
      default: TORCH_CHECK(false, "anon_hf CPU kernel: unsupported step counter dtype ", step.scalar_type());
    }
  }
}

// The names both kernels export: SCALAR_SLOTS (in Slot order) and REFRESH_MODES (name -> Mode code).
inline void export_interface(pybind11::module_& module) {
  pybind11::list slots;
  for (const char* name : kSlotNames) slots.append(name);
  module.attr("SCALAR_SLOTS") = slots;
  pybind11::dict modes;
  modes["one"] = static_cast<int64_t>(Mode::kOne);
  modes["pow"] = static_cast<int64_t>(Mode::kPower);
  modes["log"] = static_cast<int64_t>(Mode::kLog);
  module.attr("REFRESH_MODES") = modes;
}

}  // namespace anon_hf
