// Anon8bit's fused CPU step between refreshes: dequantize, update and requantize each block of 256 elements in one
// pass. Refresh steps never come here (anon_hf/optimizer8bit.py runs them through the readable reference path, so
// the refresh rule lives in one place); between refreshes the preconditioner is read-only. Per element the step reads
// p (4 B), g (4 B), m, s, v (1 B each) and writes p, m, s: 17 bytes, against fused AdamW's 28.
//
// The 8-bit formats are those of anon_hf/storage/quant8.py (see its docstring), with the same float operations:
//
//   m: int8, sign + 4 exponent + 3 mantissa bits relative to the block's absmax
//        code = ((bits(|m| * (1 / absmax)) + 2**19) >> 20) - 889, clamped to 127; below 1: nearer of 0 and 1
//   s: uint8, 5 exponent + 3 mantissa bits relative to the block's max
//        code = ((bits(s * (1 / max)) + 2**19) >> 20) - 761, clamped to [1, 255]; 0 only for s == 0
//   v: uint8, code 0 is 0, else v = exp2(lo + (code - 1) * ((hi - lo) * (1 / 254)))
//
// and the update of anon_cpu.cpp (the moments and the step rule are anon_kernel.h's), computed in fp32:
//
//   g = sign * g (+ l2 * p);  m = m + (g - m) * weight1;  s = s * beta2 + g * g * weight2
//   v = the step rule's (anon_hf.refresh.StepRule), est = sigma**(-gamma / 2), sigma = s * inv_bias2 + eps:
//       1 / sqrt(sigma) for gamma == 1, else 2**(-gamma / 2 * log2(sigma)) (exp2 and log2 as polynomials)
//   p = clamp(p * decay + m * v * neg_step_size, lo, hi)
//
// v is decoded as the product of two 16-entry tables built per block, c - 1 = 16 a + b:
//   v = 2**(lo + 16 a step) * 2**(b step)
// 32 exp2 per block instead of 256 (exp2 a degree-6 polynomial, Cephes' exp2f); decoded preconditioners are within
// 2e-6 relative of torch.exp2(lo + (c - 1) * step).
//
// The step is written once, over at::vec (Vectorized<float> and <int32_t>: AVX-512, AVX2 or ATen's portable lanes,
// as the build's CPU_CAPABILITY selects) and a small per-ISA struct, Isa, for what at::vec lacks: the 16-entry table
// lookup, zeroing the lanes of code 0, narrowing int32 codes to bytes, a horizontal max. Every block prefetches p, g
// and the codes 4 blocks ahead: without that the step waits on memory for a third of its time, the hardware
// prefetcher not keeping up with eight streams. A tensor's last partial block runs the same code on zero-padded
// copies. Large tensors are split over torch's threads in whole blocks, so results do not depend on the thread count.
// The refresh steps' codecs (decode, encode) are plain loops for the compiler's vectorizer (-fopenmp-simd).

#include "anon_kernel.h"

#include <cstring>
#include <limits>
#include <type_traits>

namespace {

using namespace anon_hf;

constexpr int64_t kBlock = 256;
constexpr int32_t kMShift = 20, kMBase = 889, kMTop = 127;
constexpr int32_t kSShift = 20, kSBase = 761, kSTop = 255;
constexpr float kVLevels = 254.0f;
// Blocks per thread's part at least (2**15 elements, as anon_cpu.cpp's grain).
constexpr int64_t kGrainBlocks = 128;
constexpr int64_t kLanes = FloatVec::size();
static_assert(IntVec::size() == kLanes && 16 % kLanes == 0 && kBlock % (2 * kLanes) == 0);

struct Settings {
  float s[kSlotCount];
  float inv_bias2;  // this tensor's 1 / (1 - beta2**n), n the gradients since its last refresh, this one included
  StepRule rule;
};

inline float as_float(int32_t bits) { return __builtin_bit_cast(float, bits); }
inline int32_t as_int(float value) { return __builtin_bit_cast(int32_t, value); }

#if defined(CPU_CAPABILITY_AVX512)
constexpr const char* kIsa = "AVX512";
inline FloatVec as_float(const IntVec& bits) { return _mm512_castsi512_ps(bits); }
inline IntVec as_int(const FloatVec& value) { return _mm512_castps_si512(value); }

// AVX-512: one vpermps reads a 16-entry table, a mask register zeroes the lanes of code 0, vpmovdb narrows.
struct Isa {
  using Table = __m512;
  static Table table(const float* entries) { return _mm512_loadu_ps(entries); }
  // table[index & 15]
  static FloatVec lookup(const Table& table, const IntVec& index) { return _mm512_permutexvar_ps(index, table); }
  // a * b where the code (>= 0) is nonzero, else +0
  static FloatVec mul_where_nonzero(const IntVec& code, const FloatVec& a, const FloatVec& b) {
    return _mm512_maskz_mul_ps(_mm512_test_epi32_mask(code, code), a, b);
  }
  static IntVec load_codes(const int8_t* codes) { return at::vec::convert_to_int32<int8_t>(codes); }
  static IntVec load_codes(const uint8_t* codes) { return at::vec::convert_to_int32<uint8_t>(codes); }
  // The codes of a, then b, as bytes (each in the byte type's range).
  template <typename T>
  static void narrow(const IntVec& a, const IntVec& b, T* out) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm512_cvtepi32_epi8(a));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + kLanes), _mm512_cvtepi32_epi8(b));
  }
  static float reduce_max(const FloatVec& x) { return _mm512_reduce_max_ps(x); }
};
#elif defined(CPU_CAPABILITY_AVX2)
constexpr const char* kIsa = "AVX2";
inline FloatVec as_float(const IntVec& bits) { return _mm256_castsi256_ps(bits); }
inline IntVec as_int(const FloatVec& value) { return _mm256_castps_si256(value); }

// AVX2 has no mask registers: vpsignd zeroes the lanes of code 0 (a compare and an andnot in one), a 16-entry table
// is read by two vpermps on its halves and a blend on bit 3 of the index, and saturating packs narrow (the clamps
// before them keep the saturation from deciding anything).
struct Isa {
  struct Table {
    __m256 first, second;
  };
  static Table table(const float* entries) { return {_mm256_loadu_ps(entries), _mm256_loadu_ps(entries + 8)}; }
  static FloatVec lookup(const Table& table, const IntVec& index) {
    const __m256 half = _mm256_castsi256_ps(_mm256_slli_epi32(index, 28));  // bit 3 of the index, as the sign
    return _mm256_blendv_ps(_mm256_permutevar8x32_ps(table.first, index),
                            _mm256_permutevar8x32_ps(table.second, index), half);
  }
  static FloatVec mul_where_nonzero(const IntVec& code, const FloatVec& a, const FloatVec& b) {
    return _mm256_castsi256_ps(_mm256_sign_epi32(_mm256_castps_si256(_mm256_mul_ps(a, b)), code));
  }
  static IntVec load_codes(const int8_t* codes) { return at::vec::convert_to_int32<int8_t>(codes); }
  static IntVec load_codes(const uint8_t* codes) { return at::vec::convert_to_int32<uint8_t>(codes); }
  template <typename T>
  static void narrow(const IntVec& a, const IntVec& b, T* out) {
    // packs works within 128-bit halves: the int16 lanes in order a0..a7 b0..b7 after a 64-bit permute.
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xD8);
    const __m128i low = _mm256_castsi256_si128(packed), high = _mm256_extracti128_si256(packed, 1);
    const __m128i bytes = std::is_signed_v<T> ? _mm_packs_epi16(low, high) : _mm_packus_epi16(low, high);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out), bytes);
  }
  static float reduce_max(const FloatVec& x) {
    __m128 y = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    y = _mm_max_ps(y, _mm_movehl_ps(y, y));
    return _mm_cvtss_f32(_mm_max_ss(y, _mm_movehdup_ps(y)));
  }
};
#else
constexpr const char* kIsa = "DEFAULT";
inline FloatVec as_float(const IntVec& bits) { return at::vec::cast<float>(bits); }
inline IntVec as_int(const FloatVec& value) { return at::vec::cast<int32_t>(value); }

// ATen's portable lanes: the same operations, lane by lane.
struct Isa {
  struct Table {
    float entries[16];
  };
  static Table table(const float* entries) {
    Table t;
    std::memcpy(t.entries, entries, sizeof(t.entries));
    return t;
  }
  static FloatVec lookup(const Table& table, const IntVec& index) {
    int32_t i[kLanes];
    float out[kLanes];
    index.store(i);
    for (int64_t k = 0; k < kLanes; ++k) out[k] = table.entries[i[k] & 15];
    return FloatVec::loadu(out);
  }
  static FloatVec mul_where_nonzero(const IntVec& code, const FloatVec& a, const FloatVec& b) {
    int32_t c[kLanes];
    float out[kLanes];
    code.store(c);
    (a * b).store(out);
    for (int64_t k = 0; k < kLanes; ++k) out[k] = c[k] != 0 ? out[k] : 0.0f;
    return FloatVec::loadu(out);
  }
  template <typename T>
  static IntVec load_codes(const T* codes) {
    int32_t wide[kLanes];
    for (int64_t k = 0; k < kLanes; ++k) wide[k] = codes[k];
    return IntVec::loadu(wide);
  }
  template <typename T>
  static void narrow(const IntVec& a, const IntVec& b, T* out) {
    int32_t wide[2 * kLanes];
    a.store(wide);
    b.store(wide + kLanes);
    for (int64_t k = 0; k < 2 * kLanes; ++k) out[k] = static_cast<T>(wide[k]);
  }
  static float reduce_max(const FloatVec& x) {
    float lanes[kLanes];
    x.store(lanes);
    return *std::max_element(lanes, lanes + kLanes);
  }
};
#endif

// The scalar forms of what exp2_poly and log2_poly use, so that each is written once for a float and for a vector.
inline float fma(float a, float b, float c) { return std::fma(a, b, c); }
inline FloatVec fma(const FloatVec& a, const FloatVec& b, const FloatVec& c) { return at::vec::fmadd(a, b, c); }
inline float clamp(float x, float lo, float hi) { return x < lo ? lo : (x > hi ? hi : x); }
inline FloatVec clamp(const FloatVec& x, float lo, float hi) { return at::vec::clamp(x, FloatVec(lo), FloatVec(hi)); }
inline int32_t larger(int32_t a, int32_t b) { return a > b ? a : b; }
inline IntVec larger(const IntVec& a, const IntVec& b) { return at::vec::maximum(a, b); }
inline float to_float(int32_t x) { return static_cast<float>(x); }
inline FloatVec to_float(const IntVec& x) { return at::vec::convert_to_fp_of_same_size<float>(x); }

// 2**x for |x| <= 126 (clamped), Cephes' exp2f: x = n + f with n = round(x) (by the 1.5 * 2**23 trick, which keeps
// loops free of calls the vectorizer rejects) and |f| <= 1/2, 2**f by a polynomial, n added to the exponent. F is
// float or FloatVec.
template <typename F>
inline F exp2_poly(F x) {
  using I = decltype(as_int(x));
  constexpr float kRound = 12582912.0f;  // 1.5 * 2**23: x + kRound rounds x to an integer, held in the low bits
  x = clamp(x, -126.0f, 126.0f);
  const F shifted = x + F(kRound);
  const I n = as_int(shifted) - as_int(F(kRound));
  const F f = x - (shifted - F(kRound));
  F p = F(1.535336188319500e-4f);
#pragma GCC unroll 8
  for (const float c : {1.339887440266574e-3f, 9.618437357674640e-3f, 5.550332471162809e-2f, 2.402264791363012e-1f,
                        6.931472028550421e-1f, 1.0f}) {
    p = fma(p, f, F(c));
  }
  return as_float(as_int(p) + n * I(1 << 23));
}

// log2(max(x, the smallest normal float)) for x >= 0, within 2e-7 of log2's (Cephes' logf: x = 2**e * (1 + f) with
// 1 + f in [sqrt(1/2), sqrt(2)), ln(1 + f) by a polynomial). Branch-free (the max on the bits, ordered as the floats
// for x >= 0), so loops calling it vectorize; std::log2 left the precond encoder scalar. F is float or FloatVec.
template <typename F>
inline F log2_poly(F x) {
  using I = decltype(as_int(x));
  const I bits = larger(as_int(x), I(as_int(std::numeric_limits<float>::min())));
  const I exponent = (bits - I(0x3f3504f3)) >> I(23);  // 0x3f3504f3: the bits of sqrt(1/2)
  const F f = as_float(bits - exponent * I(1 << 23)) - F(1.0f);
  const F z = f * f;
  F y = F(7.0376836292e-2f);
#pragma GCC unroll 8
  for (const float c : {-1.1514610310e-1f, 1.1676998740e-1f, -1.2420140846e-1f, 1.4249322787e-1f, -1.6668057665e-1f,
                        2.0000714765e-1f, -2.4999993993e-1f, 3.3333331174e-1f}) {
    y = fma(y, f, F(c));
  }
  const F ln = f + fma(y * f, z, F(-0.5f) * z);
  return fma(ln, F(1.44269504088896341f), to_float(exponent));
}

// Per block: v's decode tables, high[a] = 2**(lo + 16 a step) and low[b] = 2**(b step) (see the file header).
struct PrecondTables {
  alignas(64) float high[16];
  alignas(64) float low[16];
};

inline void precond_tables(float lo, float step, PrecondTables& tables) {
#pragma omp simd
  for (int32_t k = 0; k < 16; ++k) {
    tables.high[k] = exp2_poly(std::fma(static_cast<float>(16 * k), step, lo));
    tables.low[k] = exp2_poly(static_cast<float>(k) * step);
  }
}

// The codecs of one vector (the formats in the file header), used by the step and by the refresh steps' codecs.
// m for its int8 codes and the block's absmax: the magnitude's bits times the absmax, 0 for code 0, the code's sign.
inline FloatVec decode_m(const IntVec& code, const FloatVec& absmax) {
  const IntVec magnitude = code.abs();
  const FloatVec value = Isa::mul_where_nonzero(magnitude, as_float((magnitude + IntVec(kMBase)) << IntVec(kMShift)), absmax);
  return value | as_float(code & IntVec(std::numeric_limits<int32_t>::min()));
}

// s for its uint8 codes and the block's max, 0 for code 0.
inline FloatVec decode_s(const IntVec& code, const FloatVec& top) {
  return Isa::mul_where_nonzero(code, as_float((code + IntVec(kSBase)) << IntVec(kSShift)), top);
}

// v for code c: 0 for code 0, else high[(c - 1) >> 4] * low[(c - 1) & 15].
inline FloatVec decode_v(const IntVec& code, const Isa::Table& high, const Isa::Table& low) {
  const IntVec index = code - IntVec(1);
  return Isa::mul_where_nonzero(code, Isa::lookup(high, index >> IntVec(4)), Isa::lookup(low, index));
}

// The int8 codes of m, `inverse` = 1 / the block's absmax (0 for a block of zeros): the nearest code, ties away from
// zero; below code 1, 1 if the value is nearer the smallest magnitude than 0, else 0.
inline IntVec encode_m(const FloatVec& m, const FloatVec& inverse) {
  const FloatVec x = m.abs() * inverse;
  const IntVec rounded = ((as_int(x) + IntVec(1 << (kMShift - 1))) >> IntVec(kMShift)) - IntVec(kMBase);
  const FloatVec half_smallest(as_float((1 + kMBase) << kMShift) * 0.5f);
  const IntVec small = as_int(x >= half_smallest) & IntVec(1);
  const IntVec magnitude = at::vec::maximum(at::vec::minimum(rounded, IntVec(kMTop)), small);
  const IntVec negative = as_int(m < FloatVec(0.0f));  // -1 or 0
  return (magnitude ^ negative) - negative;
}

// The uint8 codes of s, `inverse` = 1 / the block's max: the nearest code in [1, 255], 0 only for 0.
inline IntVec encode_s(const FloatVec& s, const FloatVec& inverse) {
  const IntVec rounded = ((as_int(s * inverse) + IntVec(1 << (kSShift - 1))) >> IntVec(kSShift)) - IntVec(kSBase);
  return at::vec::minimum(at::vec::maximum(rounded, IntVec(1)), IntVec(kSTop)) & as_int(s > FloatVec(0.0f));
}

// The codes of kBlock values relative to `top` (their absmax for m, max for s).
template <typename T, IntVec (*Encode)(const FloatVec&, const FloatVec&)>
inline void encode_values(const float* values, float top, T* codes) {
  const FloatVec inverse(top > 0.0f ? 1.0f / top : 0.0f);
  for (int64_t j = 0; j < kBlock; j += 2 * kLanes) {
    Isa::narrow(Encode(FloatVec::loadu(values + j), inverse), Encode(FloatVec::loadu(values + j + kLanes), inverse),
                codes + j);
  }
}

// One block's storage: kBlock elements (a whole block, or a zero-padded copy of a tensor's last one) and its side
// values. sc, s_max, vc, v_lo and v_hi are unused without a preconditioner (gamma == 0).
struct Block {
  float* p;
  const float* g;
  int8_t* mc;
  float* m_absmax;
  uint8_t* sc;
  float* s_max;
  const uint8_t* vc;
  const float* v_lo;
  const float* v_hi;
};

// What every vector of a block reads besides its own elements: the step's scalars broadcast, the scales and tables
// that decode the block's codes.
struct BlockConstants {
  FloatVec decay, sign, l2, lo, hi, weight1, beta2, weight2, neg_step_size, m_scale, s_scale;
  Isa::Table high, low;
};

// The m and s a block computes, encoded once its absmax and max are known.
struct Moments {
  alignas(64) float m[kBlock];
  alignas(64) float s[kBlock];
  FloatVec m_top = FloatVec(0.0f);
  FloatVec s_top = FloatVec(0.0f);
};

// est = sigma**(-gamma / 2): a square root's reciprocal for gamma == 1, else exp2 and log2 (kLog as kPower: the
// exponent is clamped to +-126, far beyond where the limit binds).
template <Mode kEstimate>
inline FloatVec estimate(const FloatVec& sigma, const Settings& st) {
  if constexpr (kEstimate == Mode::kOne) return FloatVec(1.0f) / sigma.sqrt();
  return exp2_poly(FloatVec(-0.5f * st.s[kGamma]) * log2_poly(sigma));
}

// The step rule's v (anon_kernel.h): computed only in vectors with a lane whose v is 0 or where the limit may bind.
template <Mode kEstimate>
inline FloatVec step_precond(const FloatVec& s, const FloatVec& v, const Settings& st) {
  const FloatVec sigma = at::vec::fmadd(s, FloatVec(st.inv_bias2), FloatVec(st.s[kEps]));
  if (!any_unseen(v, st.rule) && !(st.rule.limit && limit_binds(sigma, v, kEstimate, st.s, st.rule.cutoff))) return v;
  return rule_precond(s, v, estimate<kEstimate>(sigma, st), st.rule, st.s);
}

// kLanes elements from j: decode, update, store p, keep m and s for the encoding.
template <bool kPrecond, Mode kEstimate, bool kL2, bool kBounds>
inline void step_vector(const Block& b, int64_t j, const BlockConstants& c, const Settings& st, Moments& out) {
  const FloatVec p = FloatVec::loadu(b.p + j);
  const FloatVec g = kL2 ? at::vec::fmadd(FloatVec::loadu(b.g + j), c.sign, p * c.l2) : FloatVec::loadu(b.g + j) * c.sign;
  const FloatVec m = first_moment(decode_m(Isa::load_codes(b.mc + j), c.m_scale), g, c.weight1);
  FloatVec v(1.0f);
  if constexpr (kPrecond) {
    const FloatVec s = accumulator(decode_s(Isa::load_codes(b.sc + j), c.s_scale), g, c.beta2, c.weight2);
    v = decode_v(Isa::load_codes(b.vc + j), c.high, c.low);
    if constexpr (kEstimate != Mode::kNone) v = step_precond<kEstimate>(s, v, st);
    s.store(out.s + j);
    out.s_top = at::vec::clamp_min(s, out.s_top);  // max(s_top, s)
  }
  const FloatVec updated = at::vec::fmadd(p, c.decay, m * v * c.neg_step_size);
  // clamp: min(hi, max(lo, x)), which keep a NaN.
  (kBounds ? at::vec::clamp(updated, c.lo, c.hi) : updated).store(b.p + j);
  m.store(out.m + j);
  out.m_top = at::vec::clamp_min(m.abs(), out.m_top);
}

// How far ahead the step prefetches: 4 blocks, longer ahead than a DRAM access takes at this kernel's speed.
constexpr int64_t kPrefetchAhead = 4 * kBlock;

// At element j (a multiple of 16): the cache line of p and of g kPrefetchAhead elements on, and at every 64th
// element that of each code array.
inline void prefetch_ahead(const Block& b, int64_t j) {
  __builtin_prefetch(b.p + j + kPrefetchAhead);
  __builtin_prefetch(b.g + j + kPrefetchAhead);
  if (j % 64 == 0) {
    __builtin_prefetch(b.mc + j + kPrefetchAhead);
    __builtin_prefetch(b.sc + j + kPrefetchAhead);
    __builtin_prefetch(b.vc + j + kPrefetchAhead);
  }
}

inline BlockConstants block_constants(const Block& b, bool preconditioned, float neg_step_size, const Settings& st) {
  const float* s = st.s;
  BlockConstants c{FloatVec(s[kDecay]), FloatVec(s[kSign]),    FloatVec(s[kL2]),     FloatVec(s[kLo]),
                   FloatVec(s[kHi]),    FloatVec(s[kWeight1]), FloatVec(s[kBeta2]),  FloatVec(s[kWeight2]),
                   FloatVec(neg_step_size), FloatVec(*b.m_absmax), FloatVec(0.0f), {}, {}};
  if (preconditioned) {
    PrecondTables tables;
    precond_tables(*b.v_lo, (*b.v_hi - *b.v_lo) * (1.0f / kVLevels), tables);
    c.s_scale = FloatVec(*b.s_max);
    c.high = Isa::table(tables.high);
    c.low = Isa::table(tables.low);
  }
  return c;
}

// One block's step: decode and update every vector (prefetching ahead), then encode m and s with their new scales.
template <bool kPrecond, Mode kEstimate, bool kL2, bool kBounds>
void step_block(const Block& b, float neg_step_size, const Settings& st) {
  const BlockConstants c = block_constants(b, kPrecond, neg_step_size, st);
  Moments out;
  for (int64_t j = 0; j < kBlock; j += 16) {
    prefetch_ahead(b, j);
    for (int64_t k = j; k < j + 16; k += kLanes) step_vector<kPrecond, kEstimate, kL2, kBounds>(b, k, c, st, out);
  }
  *b.m_absmax = Isa::reduce_max(out.m_top);
  encode_values<int8_t, encode_m>(out.m, *b.m_absmax, b.mc);
  if (!kPrecond) return;
  *b.s_max = Isa::reduce_max(out.s_top);
  encode_values<uint8_t, encode_s>(out.s, *b.s_max, b.sc);
}

using BlockStep = void (*)(const Block&, float, const Settings&);

template <bool kPrecond, Mode kEstimate>
BlockStep block_step_for(bool l2, bool bounds) {
  if (l2) return bounds ? step_block<kPrecond, kEstimate, true, true> : step_block<kPrecond, kEstimate, true, false>;
  return bounds ? step_block<kPrecond, kEstimate, false, true> : step_block<kPrecond, kEstimate, false, false>;
}

// The block step compiled for this tensor's preconditioner, estimate mode, L2 decay and bounds.
BlockStep block_step_for(bool preconditioned, Mode estimate, bool l2, bool bounds) {
  if (!preconditioned) return block_step_for<false, Mode::kNone>(l2, bounds);
  if (estimate == Mode::kOne) return block_step_for<true, Mode::kOne>(l2, bounds);
  if (estimate == Mode::kNone) return block_step_for<true, Mode::kNone>(l2, bounds);
  return block_step_for<true, Mode::kPower>(l2, bounds);
}

// A tensor's last block of n < kBlock elements, through zero-padded copies: the padding decodes to 0 and adds nothing
// to the block's absmax and max, so the n elements get what a whole block would give them.
void step_last_block(const Block& b, int64_t n, bool preconditioned, BlockStep step, float neg_step_size,
                     const Settings& st) {
  alignas(64) float p[kBlock] = {}, g[kBlock] = {};
  alignas(64) int8_t mc[kBlock] = {};
  alignas(64) uint8_t sc[kBlock] = {}, vc[kBlock] = {};
  std::memcpy(p, b.p, n * sizeof(float));
  std::memcpy(g, b.g, n * sizeof(float));
  std::memcpy(mc, b.mc, n);
  if (preconditioned) {
    std::memcpy(sc, b.sc, n);
    std::memcpy(vc, b.vc, n);
  }
  step({p, g, mc, b.m_absmax, sc, b.s_max, vc, b.v_lo, b.v_hi}, neg_step_size, st);
  std::memcpy(b.p, p, n * sizeof(float));
  std::memcpy(b.mc, mc, n);
  if (preconditioned) std::memcpy(b.sc, sc, n);
}

bool is_cpu_contiguous(const at::Tensor& t, c10::ScalarType type) {
  return !t.key_set().has(c10::DispatchKey::Python) && t.layout() == at::kStrided && t.device().is_cpu() &&
         t.is_contiguous() && t.scalar_type() == type;
}

// One tensor's lists entry i, checked (params and grads fp32, codes of the param's size, side values one per block).
void check_tensor(size_t i, bool preconditioned, const at::Tensor& param, const at::Tensor& grad,
                  const at::Tensor& m_codes, const at::Tensor& m_absmax, const at::Tensor* s_codes,
                  const at::Tensor* s_max, const at::Tensor* v_codes, const at::Tensor* v_lo, const at::Tensor* v_hi,
                  const at::Tensor& step) {
  const int64_t numel = param.numel();
  const int64_t blocks = (numel + kBlock - 1) / kBlock;
  const auto codes_ok = [&](const at::Tensor& t, c10::ScalarType type) {
    return is_cpu_contiguous(t, type) && t.numel() == numel;
  };
  const auto side_ok = [&](const at::Tensor& t) { return is_cpu_contiguous(t, at::kFloat) && t.numel() == blocks; };
  bool ok = is_cpu_contiguous(param, at::kFloat) && codes_ok(grad, at::kFloat) && codes_ok(m_codes, at::kChar) &&
            side_ok(m_absmax) && step.device().is_cpu() && step.numel() == 1 && step.scalar_type() == at::kFloat;
  if (ok && preconditioned) {
    ok = codes_ok(*s_codes, at::kByte) && side_ok(*s_max) && codes_ok(*v_codes, at::kByte) && side_ok(*v_lo) &&
         side_ok(*v_hi);
  }
  TORCH_CHECK(ok, "anon_hf 8-bit CPU kernel: tensor ", i, " is not supported: params and grads must be contiguous ",
              "fp32 CPU tensors, codes int8/uint8 of the param's size, side values fp32 with one per block of ",
              kBlock, ", step counters 1-element fp32 CPU tensors");
}

// One tensor's blocks, split over torch's threads in whole blocks when it is large.
void step_tensor(const Block& t, int64_t numel, bool preconditioned, BlockStep step, float neg_step_size,
                 const Settings& st) {
  const int64_t blocks = (numel + kBlock - 1) / kBlock;
  for_each_part(blocks, kGrainBlocks, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const int64_t start = k * kBlock;
      const Block b{t.p + start,  t.g + start,  t.mc + start, t.m_absmax + k, t.sc + start,
                    t.s_max + k,  t.vc + start, t.v_lo + k,   t.v_hi + k};
      if (numel - start >= kBlock) {
        step(b, neg_step_size, st);
      } else {
        step_last_block(b, numel - start, preconditioned, step, neg_step_size, st);
      }
    }
  });
}

// Steps every tensor once (an ordinary step, never a refresh) and adds 1 to each step counter. Lists are parallel;
// s_codes, s_max, v_codes, v_lo and v_hi are empty when no tensor has a preconditioner (gamma == 0). scalars: the
// layout of SCALAR_SLOTS; estimate, limit and late_seen: the step's StepRule. Everything is checked before anything
// is written.
void anon8_step(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                const std::vector<at::Tensor>& m_codes, const std::vector<at::Tensor>& m_absmax,
                const std::vector<at::Tensor>& s_codes, const std::vector<at::Tensor>& s_max,
                const std::vector<at::Tensor>& v_codes, const std::vector<at::Tensor>& v_lo,
                const std::vector<at::Tensor>& v_hi, const std::vector<at::Tensor>& steps,
                const std::vector<double>& neg_step_sizes, const std::vector<double>& inv_bias2s,
                const std::vector<double>& scalars, bool l2, bool bounds, int64_t estimate, bool limit,
                bool late_seen) {
  const size_t count = params.size();
  const bool preconditioned = !v_codes.empty();
  TORCH_CHECK(grads.size() == count && m_codes.size() == count && m_absmax.size() == count &&
                  steps.size() == count && neg_step_sizes.size() == count && inv_bias2s.size() == count,
              "anon_hf 8-bit CPU kernel: params, grads, m_codes, m_absmax, steps, neg_step_sizes and inv_bias2s must ",
              "have one entry per tensor");
  TORCH_CHECK(scalars.size() == kSlotCount, "anon_hf 8-bit CPU kernel: expected ", kSlotCount, " scalars");
  TORCH_CHECK(!preconditioned || (s_codes.size() == count && s_max.size() == count && v_codes.size() == count &&
                                  v_lo.size() == count && v_hi.size() == count),
              "anon_hf 8-bit CPU kernel: s_codes, s_max, v_codes, v_lo and v_hi must be empty or one per tensor");
  Settings st;
  for (int64_t slot = 0; slot < kSlotCount; ++slot) st.s[slot] = static_cast<float>(scalars[slot]);
  st.rule = step_rule(estimate, limit, late_seen, scalars, preconditioned, true);
  const auto at_or_null = [&](const std::vector<at::Tensor>& list, size_t i) {
    return preconditioned ? &list[i] : nullptr;
  };
  for (size_t i = 0; i < count; ++i) {
    check_tensor(i, preconditioned, params[i], grads[i], m_codes[i], m_absmax[i], at_or_null(s_codes, i),
                 at_or_null(s_max, i), at_or_null(v_codes, i), at_or_null(v_lo, i), at_or_null(v_hi, i), steps[i]);
  }
  const BlockStep step = block_step_for(preconditioned, st.rule.estimate, l2, bounds);
  for (size_t i = 0; i < count; ++i) {
    if (params[i].numel() == 0) continue;
    const Block t{params[i].data_ptr<float>(),
                  grads[i].const_data_ptr<float>(),
                  m_codes[i].data_ptr<int8_t>(),
                  m_absmax[i].data_ptr<float>(),
                  preconditioned ? s_codes[i].data_ptr<uint8_t>() : nullptr,
                  preconditioned ? s_max[i].data_ptr<float>() : nullptr,
                  preconditioned ? v_codes[i].const_data_ptr<uint8_t>() : nullptr,
                  preconditioned ? v_lo[i].const_data_ptr<float>() : nullptr,
                  preconditioned ? v_hi[i].const_data_ptr<float>() : nullptr};
    Settings tensor_st = st;
    tensor_st.inv_bias2 = static_cast<float>(inv_bias2s[i]);
    step_tensor(t, params[i].numel(), preconditioned, step, static_cast<float>(neg_step_sizes[i]), tensor_st);
  }
  increment_steps(steps);
}

// The codecs alone, for the refresh steps that take anon_hf's reference path (decode, anon(), encode): the same
// formats and float operations as anon_hf/storage/quant8.py, per block of 256, ~50x faster than its torch ops.
// kind 0: exp_avg (int8 codes, side0 = absmax); 1: exp_avg_sq (uint8, side0 = max); 2: precond (uint8, side0 = min
// and side1 = max of log2 v). A block of n < kBlock elements goes through zero-padded copies.
void decode_block(int64_t kind, const void* codes, const float* side0, const float* side1, float* out, int64_t n) {
  alignas(64) uint8_t padded[kBlock] = {};
  alignas(64) float values[kBlock];
  std::memcpy(padded, codes, n);
  PrecondTables tables;
  if (kind == 2) precond_tables(*side0, (*side1 - *side0) * (1.0f / kVLevels), tables);
  const Isa::Table high = Isa::table(tables.high), low = Isa::table(tables.low);
  for (int64_t j = 0; j < kBlock; j += kLanes) {
    const FloatVec value = kind == 0   ? decode_m(Isa::load_codes(reinterpret_cast<const int8_t*>(padded) + j), FloatVec(*side0))
                           : kind == 1 ? decode_s(Isa::load_codes(padded + j), FloatVec(*side0))
                                       : decode_v(Isa::load_codes(padded + j), high, low);
    value.store(values + j);
  }
  std::memcpy(out, values, n * sizeof(float));
}

// v's codes: log2 v over the positive elements, their min and max, then 1 + round((log2 v - min) * 254 / span).
void encode_precond(const float* values, uint8_t* codes, float* low_out, float* high_out, int64_t n) {
  alignas(64) float logs[kBlock];
  constexpr float kInf = std::numeric_limits<float>::infinity();
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) logs[j] = log2_poly(values[j]);
  float low = kInf, high = -kInf;
#pragma omp simd reduction(min : low) reduction(max : high)
  for (int64_t j = 0; j < n; ++j) {
    const bool positive = values[j] > 0.0f;
    const float low_j = positive ? logs[j] : kInf, high_j = positive ? logs[j] : -kInf;
    low = low < low_j ? low : low_j;
    high = high > high_j ? high : high_j;
  }
  if (!(low <= high)) low = high = 0.0f;  // no positive element
  const float span = high - low;
  const float scale = span > 0.0f ? kVLevels / span : 0.0f;
  for (int64_t j = 0; j < n; ++j) {
    const float position = std::nearbyint((logs[j] - low) * scale);
    const float clamped = position < 0.0f ? 0.0f : (position > kVLevels ? kVLevels : position);
    codes[j] = static_cast<uint8_t>(values[j] > 0.0f ? 1 + static_cast<int32_t>(clamped) : 0);
  }
  *low_out = low;
  *high_out = high;
}

void encode_block(int64_t kind, const float* values, void* codes, float* side0, float* side1, int64_t n) {
  if (kind == 2) return encode_precond(values, static_cast<uint8_t*>(codes), side0, side1, n);
  alignas(64) float padded[kBlock] = {};
  alignas(64) uint8_t out[kBlock];
  std::memcpy(padded, values, n * sizeof(float));
  FloatVec top(0.0f);
  for (int64_t j = 0; j < kBlock; j += kLanes) {
    const FloatVec value = FloatVec::loadu(padded + j);
    top = at::vec::clamp_min(kind == 0 ? value.abs() : value, top);
  }
  *side0 = Isa::reduce_max(top);
  if (kind == 0) {
    encode_values<int8_t, encode_m>(padded, *side0, reinterpret_cast<int8_t*>(out));
  } else {
    encode_values<uint8_t, encode_s>(padded, *side0, out);
  }
  std::memcpy(codes, out, n);
}

void check_codec(int64_t kind, const at::Tensor& codes, const at::Tensor& values, const at::Tensor& side0,
                 const at::Tensor& side1) {
  TORCH_CHECK(kind >= 0 && kind <= 2, "anon_hf 8-bit codec: kind must be 0, 1 or 2");
  const int64_t numel = values.numel();
  const int64_t blocks = (numel + kBlock - 1) / kBlock;
  const bool ok = is_cpu_contiguous(codes, kind == 0 ? at::kChar : at::kByte) && codes.numel() == numel &&
                  is_cpu_contiguous(values, at::kFloat) && is_cpu_contiguous(side0, at::kFloat) &&
                  side0.numel() == blocks && (kind != 2 || (is_cpu_contiguous(side1, at::kFloat) && side1.numel() == blocks));
  TORCH_CHECK(ok, "anon_hf 8-bit codec: contiguous CPU tensors expected: codes (int8 for exp_avg, uint8 otherwise) ",
              "and fp32 values of one size, fp32 side values with one per block of ", kBlock);
}

// Decodes `codes` into the fp32 tensor `out` (same numel).
void decode(int64_t kind, const at::Tensor& codes, const at::Tensor& side0, const at::Tensor& side1, at::Tensor& out) {
  check_codec(kind, codes, out, side0, side1);
  const int64_t numel = out.numel(), blocks = (numel + kBlock - 1) / kBlock;
  const char* c = static_cast<const char*>(codes.const_data_ptr());
  const float* s0 = side0.const_data_ptr<float>();
  const float* s1 = kind == 2 ? side1.const_data_ptr<float>() : nullptr;
  float* o = out.data_ptr<float>();
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t start = b * kBlock;
    decode_block(kind, c + start, s0 + b, kind == 2 ? s1 + b : nullptr, o + start, std::min(kBlock, numel - start));
  }
}

// Encodes the fp32 tensor `values` into `codes` and the side values.
void encode(int64_t kind, const at::Tensor& values, at::Tensor& codes, at::Tensor& side0, at::Tensor& side1) {
  check_codec(kind, codes, values, side0, side1);
  const int64_t numel = values.numel(), blocks = (numel + kBlock - 1) / kBlock;
  const float* v = values.const_data_ptr<float>();
  char* c = static_cast<char*>(codes.data_ptr());
  float* s0 = side0.data_ptr<float>();
  float* s1 = kind == 2 ? side1.data_ptr<float>() : nullptr;
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t start = b * kBlock;
    encode_block(kind, v + start, c + start, s0 + b, kind == 2 ? s1 + b : nullptr, std::min(kBlock, numel - start));
  }
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("anon8_step", &anon8_step, "Anon8bit's fused step between refreshes (see anon_cpu_8bit.cpp)",
             pybind11::call_guard<pybind11::gil_scoped_release>());
  module.def("decode", &decode, "Decode 8-bit state into an fp32 tensor (see anon_cpu_8bit.cpp)",
             pybind11::call_guard<pybind11::gil_scoped_release>());
  module.def("encode", &encode, "Encode an fp32 tensor into 8-bit state (see anon_cpu_8bit.cpp)",
             pybind11::call_guard<pybind11::gil_scoped_release>());
  module.attr("BLOCK") = kBlock;
  module.attr("ISA") = kIsa;  // the instruction set the step's vectors use (Isa)
  module.attr("AVX512_STEP") = std::string(kIsa) == "AVX512";
  module.attr("AVX2_STEP") = std::string(kIsa) == "AVX2";
  export_interface(module);
}
