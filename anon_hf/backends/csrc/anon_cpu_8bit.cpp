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
// and the update of anon_hf/backends/cpu_kernel's kernel (anon_cpu.cpp), computed in fp32:
//
//   g = sign * g (+ l2 * p);  m = m + (g - m) * weight1;  s = s * beta2 + g * g * weight2
//   v as the step's StepRule says (anon_kernel.h), with sigma = s * inv_bias2 + eps and
//       est = 1 / sqrt(sigma)                                          gamma == 1
//       est = 2**(-gamma / 2 * log2(sigma))                            other gammas (exp2 and log2 as polynomials)
//     late_seen and v == 0: est where s > 0, else 0;  with max_precond_ratio's limit: min(v, max_ratio * est)
//   p = clamp(p * decay + m * v * neg_step_size, lo, hi)
//
// v is decoded as the product of two 16-entry tables built per block, c - 1 = 16 a + b:
//   v = 2**(lo + 16 a step) * 2**(b step)
// 32 exp2 per block instead of 256 (exp2 a degree-6 polynomial, Cephes' exp2f); decoded preconditioners are within
// 2e-6 relative of torch.exp2(lo + (c - 1) * step).
//
// Two implementations of the step, the same operations in the same order (the loops spell their multiply-adds as
// std::fma, so the compiler does not pick others): plain C++ loops written for the compiler's vectorizer (-O3
// -fopenmp-simd; every tail block, and whole blocks in builds for neither AVX-512 nor AVX2), and simd_block for whole
// blocks, written once over a small traits struct per instruction set (Avx512, Avx2: the intrinsics each operation
// takes there). simd_block exists because GCC makes slow code of the loops (masked polynomials, spilled
// constants; docs/performance.md has the timings), and it prefetches p, g and the codes 4 blocks ahead: without that
// the step waits on memory for a third of its time, the hardware prefetcher not keeping up with eight streams.
// Elementwise per block: results do not depend on how blocks are split between threads.

#include "anon_kernel.h"

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

namespace {

using namespace anon_hf;

constexpr int64_t kBlock = 256;
constexpr int32_t kMShift = 20, kMBase = 889, kMTop = 127;
constexpr int32_t kSShift = 20, kSBase = 761, kSTop = 255;
constexpr float kVLevels = 254.0f;
// Blocks per chunk that a thread takes (2**15 elements, as anon_cpu.cpp's grain).
constexpr int64_t kGrainBlocks = 128;
// How a step computes est = sigma**(-gamma / 2) for its StepRule (anon_hf.refresh): not at all (no limit, no
// late-seen rule), gamma == 1 (a square root), or any other gamma (exp2 and log2).
enum Estimate : int64_t { kNoEstimate, kEstimateOne, kEstimatePower };

struct Settings {
  float s[kSlotCount];
  float inv_bias2;  // this tensor's 1 / (1 - beta2**n), n the gradients since its last refresh, this one included
  float power_cutoff;  // kEstimatePower: 2 log2(max_ratio) less the margin of the intrinsics versions' shortcut
  bool limit;          // v is limited to max_ratio * est
  bool late_seen;      // v == 0 means "not seen yet": such an element uses est where s > 0, else 0
};

inline float as_float(int32_t bits) { return __builtin_bit_cast(float, bits); }
inline int32_t as_int(float value) { return __builtin_bit_cast(int32_t, value); }

// 2**x for |x| <= 126 (clamped), Cephes' exp2f: x = n + f with n = round(x) (by the 1.5 * 2**23 trick, which keeps
// the loop free of calls the vectorizer rejects) and |f| <= 1/2, 2**f by a polynomial, n added to the exponent.
inline float exp2_poly(float x) {
  constexpr float kRound = 12582912.0f;  // 1.5 * 2**23: x + kRound rounds x to an integer, held in the low bits
  x = x < -126.0f ? -126.0f : (x > 126.0f ? 126.0f : x);
  const float shifted = x + kRound;
  const int32_t n = as_int(shifted) - as_int(kRound);
  const float f = x - (shifted - kRound);
  float p = 1.535336188319500e-4f;
  p = std::fma(p, f, 1.339887440266574e-3f);
  p = std::fma(p, f, 9.618437357674640e-3f);
  p = std::fma(p, f, 5.550332471162809e-2f);
  p = std::fma(p, f, 2.402264791363012e-1f);
  p = std::fma(p, f, 6.931472028550421e-1f);
  const float r = std::fma(p, f, 1.0f);
  return as_float(as_int(r) + n * (1 << 23));
}

// log2(x) for a positive normal float, within 2e-7 of log2's (Cephes' logf: x = 2**e * (1 + f) with 1 + f in
// [sqrt(1/2), sqrt(2)), ln(1 + f) by a polynomial). Branch-free, so loops calling it vectorize; std::log2 left the
// precond encoder scalar at 2.9 ns per element, half of an 8-bit refresh.
inline float log2_poly(float x) {
  constexpr int32_t kSqrtHalf = 0x3f3504f3;  // bits of sqrt(1/2)
  const int32_t exponent = (as_int(x) - kSqrtHalf) >> 23;
  const float f = as_float(as_int(x) - exponent * (1 << 23)) - 1.0f;
  const float z = f * f;
  float y = 7.0376836292e-2f;
  y = std::fma(y, f, -1.1514610310e-1f);
  y = std::fma(y, f, 1.1676998740e-1f);
  y = std::fma(y, f, -1.2420140846e-1f);
  y = std::fma(y, f, 1.4249322787e-1f);
  y = std::fma(y, f, -1.6668057665e-1f);
  y = std::fma(y, f, 2.0000714765e-1f);
  y = std::fma(y, f, -2.4999993993e-1f);
  y = std::fma(y, f, 3.3333331174e-1f);
  const float ln = f + std::fma(y * f, z, -0.5f * z);
  return std::fma(ln, 1.44269504088896341f, static_cast<float>(exponent));
}

// max(x, the smallest normal float) on the bits (ordered as the floats for x >= 0; a negative x's are below), for
// log2_poly: a float select here is control flow GCC does not vectorize.
inline float at_least_tiny(float x) {
  const int32_t tiny = as_int(std::numeric_limits<float>::min());
  return as_float(as_int(x) > tiny ? as_int(x) : tiny);
}

// max_precond_ratio's limit on v for gamma != 1: max_ratio * sigma**(-gamma / 2), computed as
// 2**(-gamma / 2 * log2(sigma)) (the exponent clamped to +-126, far beyond where the limit can bind).
inline float power_limit(float sigma, float neg_half_gamma, float max_ratio) {
  return max_ratio * exp2_poly(neg_half_gamma * log2_poly(at_least_tiny(sigma)));
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

// 1.0f for a nonzero code, else 0.0f. Zeroing by this factor rather than by `code != 0 ? x : 0.0f` keeps run_block's
// loop vectorizable for AVX2: GCC 12 leaves it scalar when a float select hangs on a byte code's test.
inline float nonzero(int32_t code) { return static_cast<float>(code < 1 ? code : 1); }

// m for its int8 code and the block's absmax: the magnitude's bits with the code's sign bit, 0 for code 0.
inline float decode_exp_avg(int32_t code, float scale) {
  const int32_t magnitude = code < 0 ? -code : code;
  const int32_t sign = code & std::numeric_limits<int32_t>::min();
  return as_float(((magnitude + kMBase) << kMShift) | sign) * nonzero(magnitude) * scale;
}

// s for its uint8 code and the block's max, 0 for code 0.
inline float decode_exp_avg_sq(int32_t code, float scale) {
  return as_float((code + kSBase) << kSShift) * nonzero(code) * scale;
}

// v for code c: 0 for code 0, else high[(c - 1) >> 4] * low[(c - 1) & 15].
inline float decode_precond(int32_t code, const PrecondTables& tables) {
  const int32_t index = (code - 1) & 255;
  return tables.high[index >> 4] * tables.low[index & 15] * nonzero(code);
}

// The int8 codes of m for n values relative to their absmax `top` (see the file header): the nearest code, ties away
// from zero; below code 1, 1 if the value is nearer the smallest magnitude than 0, else 0. The int32 codes are
// narrowed in a pass of their own (faster than in the encoding).
inline void encode_exp_avg(const float* __restrict__ values, float top, int8_t* __restrict__ codes, int64_t n) {
  alignas(64) int32_t code[kBlock];
  const float inverse = top > 0.0f ? 1.0f / top : 0.0f;
  const float half_smallest = as_float((1 + kMBase) << kMShift) * 0.5f;
  for (int64_t j = 0; j < n; ++j) {
    const float x = std::fabs(values[j]) * inverse;
    const int32_t rounded = ((as_int(x) + (1 << (kMShift - 1))) >> kMShift) - kMBase;
    const int32_t raw = rounded < kMTop ? rounded : kMTop;
    const int32_t small = x >= half_smallest ? 1 : 0;
    const int32_t magnitude = raw > small ? raw : small;
    const int32_t negative = -static_cast<int32_t>(values[j] < 0.0f);
    code[j] = (magnitude ^ negative) - negative;
  }
  for (int64_t j = 0; j < n; ++j) codes[j] = static_cast<int8_t>(code[j]);
}

// The uint8 codes of s for n values relative to their max `top`: the nearest code in [1, 255], 0 only for 0.
inline void encode_exp_avg_sq(const float* __restrict__ values, float top, uint8_t* __restrict__ codes, int64_t n) {
  alignas(64) int32_t code[kBlock];
  const float inverse = top > 0.0f ? 1.0f / top : 0.0f;
  for (int64_t j = 0; j < n; ++j) {
    const float x = values[j] * inverse;
    const int32_t rounded = ((as_int(x) + (1 << (kSShift - 1))) >> kSShift) - kSBase;
    const int32_t raw = rounded < 1 ? 1 : (rounded > kSTop ? kSTop : rounded);
    code[j] = as_int(values[j]) > 0 ? raw : 0;  // s > 0 as an integer test on its bits: vectorizes for AVX2 too
  }
  for (int64_t j = 0; j < n; ++j) codes[j] = static_cast<uint8_t>(code[j]);
}

// One block of n <= kBlock elements in three passes the compiler vectorizes: decode and update (tracking the new absmax
// of m and max of s), encode m, encode s. kPrecond = false: gamma == 0, no s and v (v = 1). kEstimate: max_precond_ratio's
// limit on v (gamma == 1).
template <bool kPrecond, Estimate kEstimate>
void run_block(float* __restrict__ p, const float* __restrict__ g, int8_t* __restrict__ mc, float* __restrict__ m_absmax,
               uint8_t* __restrict__ sc, float* __restrict__ s_max, const uint8_t* __restrict__ vc,
               const float* __restrict__ v_lo, const float* __restrict__ v_hi, int64_t n, float neg_step_size,
               const Settings& st) {
  alignas(64) float m[kBlock];
  alignas(64) float s[kBlock];
  const float decay = st.s[kDecay], weight1 = st.s[kWeight1], sign = st.s[kSign], l2 = st.s[kL2];
  const float lo = st.s[kLo], hi = st.s[kHi];
  const float m_scale = *m_absmax;
  const float s_scale = kPrecond ? *s_max : 0.0f;
  PrecondTables tables;
  if (kPrecond) precond_tables(*v_lo, (*v_hi - *v_lo) * (1.0f / kVLevels), tables);
  const float beta2 = st.s[kBeta2], weight2 = st.s[kWeight2];
  const float inv_bias2 = st.inv_bias2, eps = st.s[kEps], max_ratio = st.s[kMaxRatio];
  const float neg_half_gamma = -0.5f * st.s[kGamma];
  float m_top = 0.0f, s_top = 0.0f;
#pragma omp simd reduction(max : m_top, s_top)
  for (int64_t j = 0; j < n; ++j) {
    const float m_old = decode_exp_avg(mc[j], m_scale);
    const float s_old = kPrecond ? decode_exp_avg_sq(sc[j], s_scale) : 0.0f;
    const float v_stored = kPrecond ? decode_precond(vc[j], tables) : 1.0f;
    const float pj = p[j];
    const float gj = std::fma(g[j], sign, pj * l2);  // l2 == 0 without L2 decay
    const float mj = first_moment(m_old, gj, weight1);
    const float sj = accumulator(s_old, gj, beta2, weight2);
    float v = v_stored;
    if constexpr (kEstimate != kNoEstimate) {
      const float sigma = std::fma(sj, inv_bias2, eps);
      const float root = kEstimate == kEstimateOne ? std::sqrt(sigma) : 1.0f;
      const float est = kEstimate == kEstimateOne ? 1.0f / root : power_limit(sigma, neg_half_gamma, 1.0f);
      const float limit = kEstimate == kEstimateOne ? max_ratio / root : max_ratio * est;
      if (st.limit) v = v < limit ? v : limit;
      if (st.late_seen && vc[j] == 0) v = sj > 0.0f ? est : 0.0f;
    }
    const float updated = std::fma(pj, decay, mj * v * neg_step_size);
    p[j] = updated < lo ? lo : (updated > hi ? hi : updated);  // (-inf, inf) without bounds
    m[j] = mj;
    s[j] = sj;
    const float am = std::fabs(mj);
    m_top = m_top > am ? m_top : am;
    s_top = s_top > sj ? s_top : sj;
  }
  encode_exp_avg(m, m_top, mc, n);
  *m_absmax = m_top;
  if (!kPrecond) return;
  encode_exp_avg_sq(s, s_top, sc, n);
  *s_max = s_top;
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__)
#define ANON_HF_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__)
#define ANON_HF_AVX2 1
#endif

#if defined(ANON_HF_AVX512) || defined(ANON_HF_AVX2)
// How far ahead of the current vector the whole-block step prefetches: 4 blocks, longer ahead than a DRAM access
// takes at this kernel's speed (2 blocks left the step waiting on memory; 8 gained nothing).
constexpr int64_t kPrefetchAhead = 4 * kBlock;

// As an instruction of its own: GCC 12 silently dropped __builtin_prefetch (and _mm_prefetch, which expands to it)
// from a loop of this kind with ATen's vector headers included.
inline void prefetch(const void* address) { asm volatile("prefetcht0 %0" : : "m"(*static_cast<const char*>(address))); }

// At element j (a multiple of 16) of a whole block: the cache line of p and of g kPrefetchAhead elements on, and at
// every 64th element that of each code array.
inline void prefetch_ahead(const float* p, const float* g, const int8_t* mc, const uint8_t* sc, const uint8_t* vc,
                           int64_t j) {
  prefetch(p + j + kPrefetchAhead);
  prefetch(g + j + kPrefetchAhead);
  if (j % 64 == 0) {
    prefetch(mc + j + kPrefetchAhead);
    prefetch(sc + j + kPrefetchAhead);
    prefetch(vc + j + kPrefetchAhead);
  }
}
#endif

// The instruction sets of the whole-block step: each traits struct supplies the operations the step is written in
// (simd_block below), one or a few instructions each. Where AVX-512 has mask registers and two-table permutes, AVX2
// spells the same result otherwise: a code of 0 zeroes its value by vpsignd (a compare and an andnot in one
// instruction), v's 16-entry tables are read by vpshufb on their byte planes (cross-lane vpermps saturate one pipe
// on Zen 3), and codes are narrowed to int16 for their clamps and signs, then to bytes by saturating packs (for s the
// pack's saturation is the clamp to 255). Both give the same bits.
#ifdef ANON_HF_AVX512
#define ANON_HF_INLINE static inline __attribute__((always_inline))
struct Avx512 {
  using F = __m512;
  using I = __m512i;
  using M = __mmask16;  // one bit per lane
  static constexpr int kWidth = 16;
  struct Precond {  // v's decode tables (PrecondTables)
    F high, low;
  };

  ANON_HF_INLINE F set(float x) { return _mm512_set1_ps(x); }
  ANON_HF_INLINE I set_i(int32_t x) { return _mm512_set1_epi32(x); }
  ANON_HF_INLINE F zero() { return _mm512_setzero_ps(); }
  ANON_HF_INLINE F load(const float* x) { return _mm512_load_ps(x); }
  ANON_HF_INLINE F loadu(const float* x) { return _mm512_loadu_ps(x); }
  ANON_HF_INLINE void store(float* x, F a) { _mm512_store_ps(x, a); }
  ANON_HF_INLINE void storeu(float* x, F a) { _mm512_storeu_ps(x, a); }
  ANON_HF_INLINE F add(F a, F b) { return _mm512_add_ps(a, b); }
  ANON_HF_INLINE F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  ANON_HF_INLINE F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  ANON_HF_INLINE F div(F a, F b) { return _mm512_div_ps(a, b); }
  ANON_HF_INLINE F fma(F a, F b, F c) { return fused_multiply_add(a, b, c); }  // anon_kernel.h
  // max/min return their second operand where one is NaN, as x > y ? x : y does.
  ANON_HF_INLINE F min(F a, F b) { return _mm512_min_ps(a, b); }
  ANON_HF_INLINE F max(F a, F b) { return _mm512_max_ps(a, b); }
  ANON_HF_INLINE F sqrt(F a) { return _mm512_sqrt_ps(a); }
  ANON_HF_INLINE F abs(F a) { return _mm512_abs_ps(a); }
  ANON_HF_INLINE I add_i(I a, I b) { return _mm512_add_epi32(a, b); }
  ANON_HF_INLINE I sub_i(I a, I b) { return _mm512_sub_epi32(a, b); }
  ANON_HF_INLINE I min_i(I a, I b) { return _mm512_min_epi32(a, b); }
  ANON_HF_INLINE I max_i(I a, I b) { return _mm512_max_epi32(a, b); }
  ANON_HF_INLINE I abs_i(I a) { return _mm512_abs_epi32(a); }
  template <int kBits> ANON_HF_INLINE I shl(I a) { return _mm512_slli_epi32(a, kBits); }
  template <int kBits> ANON_HF_INLINE I shr(I a) { return _mm512_srai_epi32(a, kBits); }  // arithmetic
  ANON_HF_INLINE I bits(F a) { return _mm512_castps_si512(a); }
  ANON_HF_INLINE F from_bits(I a) { return _mm512_castsi512_ps(a); }
  ANON_HF_INLINE F to_float(I a) { return _mm512_cvtepi32_ps(a); }
  ANON_HF_INLINE M gt(F a, F b) { return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ); }
  ANON_HF_INLINE M ge(F a, F b) { return _mm512_cmp_ps_mask(a, b, _CMP_GE_OQ); }
  ANON_HF_INLINE M lt(F a, F b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }
  ANON_HF_INLINE M is_zero(I a) { return _mm512_testn_epi32_mask(a, a); }
  ANON_HF_INLINE bool any(M m) { return m != 0; }
  ANON_HF_INLINE F select(M m, F a, F b) { return _mm512_mask_mov_ps(a, m, b); }  // b where m, else a
  ANON_HF_INLINE F keep(M m, F a) { return _mm512_maskz_mov_ps(m, a); }           // a where m, else +0
  ANON_HF_INLINE I keep_i(M m, I a) { return _mm512_maskz_mov_epi32(m, a); }
  ANON_HF_INLINE I negate_where(M m, I a) { return _mm512_mask_sub_epi32(a, m, _mm512_setzero_si512(), a); }
  // a * b where the code (>= 0) is nonzero, else +0.
  ANON_HF_INLINE F mul_nonzero(I code, F a, F b) { return _mm512_maskz_mul_ps(_mm512_test_epi32_mask(code, code), a, b); }
  // magnitude | (code's sign bit): 0xF8 is a | (b & c).
  ANON_HF_INLINE F with_sign_of(F magnitude, I code, I sign_bit) {
    return from_bits(_mm512_ternarylogic_epi32(bits(magnitude), code, sign_bit, 0xF8));
  }
  ANON_HF_INLINE I load_codes(const int8_t* codes) {
    return _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes)));
  }
  ANON_HF_INLINE I load_codes(const uint8_t* codes) {
    return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes)));
  }
  // encode_exp_avg's codes from rounded = (bits(x) + half a code) >> kMShift, where x >= half the smallest code
  // (`small`) and m < 0 (`negative`), per vector: clamped, signed, narrowed and stored.
  template <int kParts> ANON_HF_INLINE void store_m_codes(const I (&rounded)[kParts], const M (&small)[kParts],
                                                           const M (&negative)[kParts], int8_t* out) {
    for (int part = 0; part < kParts; ++part) {
      const I code = _mm512_min_epi32(_mm512_sub_epi32(rounded[part], set_i(kMBase)), set_i(kMTop));
      const I magnitude = _mm512_max_epi32(code, _mm512_maskz_mov_epi32(small[part], set_i(1)));
      const I signed_code = _mm512_mask_sub_epi32(magnitude, negative[part], _mm512_setzero_si512(), magnitude);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 16 * part), _mm512_cvtepi32_epi8(signed_code));
    }
  }
  // encode_exp_avg_sq's codes from rounded (as above) where s > 0 (`positive`).
  template <int kParts>
  ANON_HF_INLINE void store_s_codes(const I (&rounded)[kParts], const M (&positive)[kParts], uint8_t* out) {
    for (int part = 0; part < kParts; ++part) {
      const I code = _mm512_max_epi32(_mm512_sub_epi32(rounded[part], set_i(kSBase)), set_i(1));
      const I clamped = _mm512_maskz_mov_epi32(positive[part], _mm512_min_epi32(code, set_i(kSTop)));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 16 * part), _mm512_cvtepi32_epi8(clamped));
    }
  }
  ANON_HF_INLINE void precond(const PrecondTables& tables, Precond& out) {
    out = {_mm512_load_ps(tables.high), _mm512_load_ps(tables.low)};
  }
  // decode_precond for the 32 codes from `codes`: high[(c - 1) >> 4] * low[(c - 1) & 15], 0 for code 0; vpermps reads
  // the low 4 bits of its index.
  // Also returns whether a code is 0.
  ANON_HF_INLINE bool decode_precond32(const Precond& t, const uint8_t* codes, F (&v)[2]) {
    M seen = 0xFFFF;
    for (int part = 0; part < 2; ++part) {
      const I code = load_codes(codes + 16 * part);
      const I index = _mm512_sub_epi32(code, _mm512_set1_epi32(1));
      const M nonzero = _mm512_test_epi32_mask(code, code);
      v[part] = _mm512_maskz_mul_ps(nonzero, _mm512_permutexvar_ps(_mm512_srli_epi32(index, 4), t.high),
                                    _mm512_permutexvar_ps(index, t.low));
      seen &= nonzero;
    }
    return seen != 0xFFFF;
  }
  ANON_HF_INLINE float reduce_max(F a) { return _mm512_reduce_max_ps(a); }
};
using Isa = Avx512;
#endif

#ifdef ANON_HF_AVX2
#define ANON_HF_INLINE static inline __attribute__((always_inline))
struct Avx2 {
  using F = __m256;
  using I = __m256i;
  using M = __m256;  // all bits of a lane set or clear
  static constexpr int kWidth = 8;
  struct Precond {  // v's decode tables (PrecondTables) as byte planes (byte_planes)
    I high[4], low[4];
  };

  ANON_HF_INLINE F set(float x) { return _mm256_set1_ps(x); }
  ANON_HF_INLINE I set_i(int32_t x) { return _mm256_set1_epi32(x); }
  ANON_HF_INLINE F zero() { return _mm256_setzero_ps(); }
  ANON_HF_INLINE F load(const float* x) { return _mm256_load_ps(x); }
  ANON_HF_INLINE F loadu(const float* x) { return _mm256_loadu_ps(x); }
  ANON_HF_INLINE void store(float* x, F a) { _mm256_store_ps(x, a); }
  ANON_HF_INLINE void storeu(float* x, F a) { _mm256_storeu_ps(x, a); }
  ANON_HF_INLINE F add(F a, F b) { return _mm256_add_ps(a, b); }
  ANON_HF_INLINE F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  ANON_HF_INLINE F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  ANON_HF_INLINE F div(F a, F b) { return _mm256_div_ps(a, b); }
  ANON_HF_INLINE F fma(F a, F b, F c) { return fused_multiply_add(a, b, c); }  // anon_kernel.h
  ANON_HF_INLINE F min(F a, F b) { return _mm256_min_ps(a, b); }
  ANON_HF_INLINE F max(F a, F b) { return _mm256_max_ps(a, b); }
  ANON_HF_INLINE F sqrt(F a) { return _mm256_sqrt_ps(a); }
  ANON_HF_INLINE F abs(F a) { return _mm256_and_ps(a, _mm256_castsi256_ps(_mm256_set1_epi32(INT32_MAX))); }
  ANON_HF_INLINE I add_i(I a, I b) { return _mm256_add_epi32(a, b); }
  ANON_HF_INLINE I sub_i(I a, I b) { return _mm256_sub_epi32(a, b); }
  ANON_HF_INLINE I min_i(I a, I b) { return _mm256_min_epi32(a, b); }
  ANON_HF_INLINE I max_i(I a, I b) { return _mm256_max_epi32(a, b); }
  ANON_HF_INLINE I abs_i(I a) { return _mm256_abs_epi32(a); }
  template <int kBits> ANON_HF_INLINE I shl(I a) { return _mm256_slli_epi32(a, kBits); }
  template <int kBits> ANON_HF_INLINE I shr(I a) { return _mm256_srai_epi32(a, kBits); }
  ANON_HF_INLINE I bits(F a) { return _mm256_castps_si256(a); }
  ANON_HF_INLINE F from_bits(I a) { return _mm256_castsi256_ps(a); }
  ANON_HF_INLINE F to_float(I a) { return _mm256_cvtepi32_ps(a); }
  ANON_HF_INLINE M gt(F a, F b) { return _mm256_cmp_ps(a, b, _CMP_GT_OQ); }
  ANON_HF_INLINE M ge(F a, F b) { return _mm256_cmp_ps(a, b, _CMP_GE_OQ); }
  ANON_HF_INLINE M lt(F a, F b) { return _mm256_cmp_ps(a, b, _CMP_LT_OQ); }
  ANON_HF_INLINE M is_zero(I a) { return from_bits(_mm256_cmpeq_epi32(a, _mm256_setzero_si256())); }
  ANON_HF_INLINE bool any(M m) { return _mm256_movemask_ps(m) != 0; }
  ANON_HF_INLINE F select(M m, F a, F b) { return _mm256_blendv_ps(a, b, m); }
  ANON_HF_INLINE F keep(M m, F a) { return _mm256_and_ps(m, a); }
  ANON_HF_INLINE I keep_i(M m, I a) { return _mm256_and_si256(bits(m), a); }
  ANON_HF_INLINE I negate_where(M m, I a) { return _mm256_sub_epi32(_mm256_xor_si256(a, bits(m)), bits(m)); }
  ANON_HF_INLINE F mul_nonzero(I code, F a, F b) { return from_bits(_mm256_sign_epi32(bits(mul(a, b)), code)); }
  ANON_HF_INLINE F with_sign_of(F magnitude, I code, I sign_bit) {
    return _mm256_or_ps(magnitude, from_bits(_mm256_and_si256(code, sign_bit)));
  }
  ANON_HF_INLINE I load_codes(const int8_t* codes) {
    return _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes)));
  }
  ANON_HF_INLINE I load_codes(const uint8_t* codes) {
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes)));
  }
  // store_m_codes and store_s_codes of Avx512 for 32 elements, narrowed first: rounded (in [-2048, 2047]) and the
  // masks fit int16, so the clamps and signs run on 16 lanes; saturating packs to bytes (their saturation decides
  // nothing for m, and clamps s's codes to 255) and one vpermd put the packs' lane-wise order right.
  ANON_HF_INLINE void store_m_codes(const I (&rounded)[4], const M (&small)[4], const M (&negative)[4], int8_t* out) {
    I half[2];
    for (int h = 0; h < 2; ++h) {
      const I code = _mm256_sub_epi16(_mm256_packs_epi32(rounded[2 * h], rounded[2 * h + 1]), _mm256_set1_epi16(kMBase));
      const I small_code = _mm256_abs_epi16(_mm256_packs_epi32(bits(small[2 * h]), bits(small[2 * h + 1])));  // 1 or 0
      const I magnitude = _mm256_max_epi16(_mm256_min_epi16(code, _mm256_set1_epi16(kMTop)), small_code);
      const I sign = _mm256_packs_epi32(bits(negative[2 * h]), bits(negative[2 * h + 1]));  // -1 or 0
      half[h] = _mm256_sub_epi16(_mm256_xor_si256(magnitude, sign), sign);
    }
    store_bytes32(_mm256_packs_epi16(half[0], half[1]), out);
  }
  ANON_HF_INLINE void store_s_codes(const I (&rounded)[4], const M (&positive)[4], uint8_t* out) {
    I half[2];
    for (int h = 0; h < 2; ++h) {
      const I code = _mm256_sub_epi16(_mm256_packs_epi32(rounded[2 * h], rounded[2 * h + 1]), _mm256_set1_epi16(kSBase));
      const I keep = _mm256_packs_epi32(bits(positive[2 * h]), bits(positive[2 * h + 1]));
      half[h] = _mm256_and_si256(keep, _mm256_max_epi16(code, _mm256_set1_epi16(1)));
    }
    store_bytes32(_mm256_packus_epi16(half[0], half[1]), out);
  }
  // Two packs of 4 vectors a, b, c, d leave dword k of lane h holding elements 8k + 4h .. 8k + 4h + 3.
  template <typename Code> ANON_HF_INLINE void store_bytes32(I packed, Code* out) {
    const I order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm256_permutevar8x32_epi32(packed, order));
  }
  ANON_HF_INLINE void precond(const PrecondTables& tables, Precond& out) {
    byte_planes(tables.high, out.high);
    byte_planes(tables.low, out.low);
  }
  // planes[k]: byte k of each of the 16 floats of `entries`, in both 128-bit lanes (vpshufb's tables).
  ANON_HF_INLINE void byte_planes(const float* entries, I (&planes)[4]) {
    const I by_plane = _mm256_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15, 0, 4, 8, 12, 1, 5, 9, 13, 2,
                                        6, 10, 14, 3, 7, 11, 15);
    const I order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    const I first = _mm256_permutevar8x32_epi32(_mm256_shuffle_epi8(bits(load(entries)), by_plane), order);
    const I second = _mm256_permutevar8x32_epi32(_mm256_shuffle_epi8(bits(load(entries + 8)), by_plane), order);
    const I even = _mm256_unpacklo_epi64(first, second), odd = _mm256_unpackhi_epi64(first, second);  // planes 0 2, 1 3
    planes[0] = _mm256_permute2x128_si256(even, even, 0x00);
    planes[1] = _mm256_permute2x128_si256(odd, odd, 0x00);
    planes[2] = _mm256_permute2x128_si256(even, even, 0x11);
    planes[3] = _mm256_permute2x128_si256(odd, odd, 0x11);
  }
  // Avx512's decode_precond32 by byte: vpshufb looks up each byte of a 16-entry table by the low 4 bits of an index
  // byte (0 where its bit 7 is set), and two rounds of unpacks rebuild the floats, in the order that
  // a vpermd of the codes sets up (dword k of lane h of vector j is read from codes 8j + 4h + k..).
  ANON_HF_INLINE bool decode_precond32(const Precond& t, const uint8_t* codes, F (&v)[4]) {
    const I raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes));
    const I code = _mm256_permutevar8x32_epi32(raw, _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7));
    const I unseen = _mm256_cmpeq_epi8(code, _mm256_setzero_si256());
    const I index = _mm256_sub_epi8(code, _mm256_set1_epi8(1)), nibble = _mm256_set1_epi8(0x0F);
    // Bits 4-7 and 0-3 of c - 1, with bit 7 set for code 0 (unseen is 0xFF there).
    const I high_index = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(index, 4), nibble), unseen);
    const I low_index = _mm256_or_si256(_mm256_and_si256(index, nibble), unseen);
    F high[4], low[4];
    lookup_planes(t.high, high_index, high);
    lookup_planes(t.low, low_index, low);
    for (int part = 0; part < 4; ++part) v[part] = mul(high[part], low[part]);
    return _mm256_movemask_epi8(unseen) != 0;
  }
  ANON_HF_INLINE void lookup_planes(const I (&planes)[4], I index, F (&out)[4]) {
    I b[4];
    for (int k = 0; k < 4; ++k) b[k] = _mm256_shuffle_epi8(planes[k], index);
    const I low01 = _mm256_unpacklo_epi8(b[0], b[1]), high01 = _mm256_unpackhi_epi8(b[0], b[1]);
    const I low23 = _mm256_unpacklo_epi8(b[2], b[3]), high23 = _mm256_unpackhi_epi8(b[2], b[3]);
    out[0] = from_bits(_mm256_unpacklo_epi16(low01, low23));
    out[1] = from_bits(_mm256_unpackhi_epi16(low01, low23));
    out[2] = from_bits(_mm256_unpacklo_epi16(high01, high23));
    out[3] = from_bits(_mm256_unpackhi_epi16(high01, high23));
  }
  ANON_HF_INLINE float reduce_max(F a) {
    __m128 y = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    y = _mm_max_ps(y, _mm_movehl_ps(y, y));
    y = _mm_max_ss(y, _mm_movehdup_ps(y));
    return _mm_cvtss_f32(y);
  }
};
using Isa = Avx2;
#endif

#if defined(ANON_HF_AVX512) || defined(ANON_HF_AVX2)
// exp2_poly, log2_poly and log2_from_bits on T's lanes: the same operations as the scalar versions.
template <class T>
inline typename T::F exp2_simd(typename T::F x) {
  using F = typename T::F;
  using I = typename T::I;
  const F round = T::set(12582912.0f);
  x = T::min(T::max(x, T::set(-126.0f)), T::set(126.0f));
  const F shifted = T::add(x, round);
  const I n = T::sub_i(T::bits(shifted), T::bits(round));
  const F f = T::sub(x, T::sub(shifted, round));
  F p = T::fma(f, T::set(1.535336188319500e-4f), T::set(1.339887440266574e-3f));
  for (const float c : {9.618437357674640e-3f, 5.550332471162809e-2f, 2.402264791363012e-1f, 6.931472028550421e-1f,
                        1.0f}) {
    p = T::fma(p, f, T::set(c));
  }
  return T::from_bits(T::add_i(T::bits(p), T::template shl<23>(n)));
}

template <class T>
inline typename T::F log2_simd(typename T::F x) {
  using F = typename T::F;
  using I = typename T::I;
  const I bits = T::max_i(T::bits(x), T::set_i(as_int(std::numeric_limits<float>::min())));  // at_least_tiny
  const I exponent = T::template shr<23>(T::sub_i(bits, T::set_i(0x3f3504f3)));
  const F f = T::sub(T::from_bits(T::sub_i(bits, T::template shl<23>(exponent))), T::set(1.0f));
  const F z = T::mul(f, f);
  F y = T::fma(f, T::set(7.0376836292e-2f), T::set(-1.1514610310e-1f));
  for (const float c : {1.1676998740e-1f, -1.2420140846e-1f, 1.4249322787e-1f, -1.6668057665e-1f, 2.0000714765e-1f,
                        -2.4999993993e-1f, 3.3333331174e-1f}) {
    y = T::fma(y, f, T::set(c));
  }
  const F ln = T::add(f, T::fma(T::mul(y, f), z, T::mul(T::set(-0.5f), z)));
  return T::fma(ln, T::set(1.44269504088896341f), T::to_float(exponent));
}

// log2(x) from the bits, exponent + mantissa - 1: below log2(x) by at most 0.0861 (0 for x == 0: -127).
template <class T>
inline typename T::F log2_from_bits_simd(typename T::F x) {
  return T::fma(T::to_float(T::bits(x)), T::set(1.0f / (1 << 23)), T::set(-127.0f));
}

// A whole block's constants on T's lanes.
template <class T>
struct BlockConstants {
  using F = typename T::F;
  using I = typename T::I;
  BlockConstants(const Settings& st, float neg_step_size, float m_absmax, float s_max)
      : decay(T::set(st.s[kDecay])), weight1(T::set(st.s[kWeight1])), sign(T::set(st.s[kSign])),
        l2(T::set(st.s[kL2])), lo(T::set(st.s[kLo])), hi(T::set(st.s[kHi])), beta2(T::set(st.s[kBeta2])),
        weight2(T::set(st.s[kWeight2])), inv_bias2(T::set(st.inv_bias2)), eps(T::set(st.s[kEps])),
        max_ratio(T::set(st.s[kMaxRatio])), nss(T::set(neg_step_size)), max_ratio_sq(T::mul(max_ratio, max_ratio)),
        gamma(T::set(st.s[kGamma])), neg_half_gamma(T::set(-0.5f * st.s[kGamma])), power_cutoff(T::set(st.power_cutoff)),
        m_scale(T::set(m_absmax)), s_scale(T::set(s_max)) {}
  F decay, weight1, sign, l2, lo, hi, beta2, weight2, inv_bias2, eps, max_ratio, nss, max_ratio_sq, gamma,
      neg_half_gamma, power_cutoff, m_scale, s_scale;
  I one = T::set_i(1), m_base = T::set_i(kMBase), s_base = T::set_i(kSBase);
  I sign_bit = T::set_i(std::numeric_limits<int32_t>::min());
};

// The step rule's v for one vector (run_block's, anon_kernel.h's StepRule): the late-seen rule computed only in the
// vectors with a code 0, the limit only in those where a lane may bind, rare where gradients are stationary.
template <class T, Estimate kEstimate>
inline typename T::F rule_simd(typename T::F v, typename T::F sj, const uint8_t* codes, bool any_unseen,
                               const BlockConstants<T>& c, const Settings& st) {
  using F = typename T::F;
  const typename T::M unseen = T::is_zero(any_unseen ? T::load_codes(codes) : c.one);
  if (kEstimate != kNoEstimate && any_unseen && T::any(unseen)) {
    const F sigma = T::fma(sj, c.inv_bias2, c.eps);
    const F root = T::sqrt(sigma);
    const F est = kEstimate == kEstimateOne ? T::div(T::set(1.0f), root)
                                            : exp2_simd<T>(T::mul(c.neg_half_gamma, log2_simd<T>(sigma)));
    const F limit = kEstimate == kEstimateOne ? T::div(c.max_ratio, root) : T::mul(c.max_ratio, est);
    if (st.limit) v = T::min(v, limit);
    return T::select(unseen, v, T::keep(T::gt(sj, T::zero()), est));
  }
  if (kEstimate == kEstimateOne && st.limit) {  // v > r / sqrt(sigma) <=> v * v * sigma > r * r: exact
    const F sigma = T::fma(sj, c.inv_bias2, c.eps);
    if (T::any(T::gt(T::mul(T::mul(v, v), sigma), c.max_ratio_sq))) v = T::min(v, T::div(c.max_ratio, T::sqrt(sigma)));
  } else if (kEstimate == kEstimatePower && st.limit) {
    // 2 log2(v) + gamma log2(sigma) > 2 log2(r), log2 read from the bits: each term errs low by at most 0.0861,
    // which power_cutoff allows for, so a vector skipped has no binding lane.
    const F sigma = T::fma(sj, c.inv_bias2, c.eps);
    const F guess = T::fma(log2_from_bits_simd<T>(sigma), c.gamma,
                           T::add(log2_from_bits_simd<T>(v), log2_from_bits_simd<T>(v)));
    if (T::any(T::gt(guess, c.power_cutoff))) {
      v = T::min(v, T::mul(c.max_ratio, exp2_simd<T>(T::mul(c.neg_half_gamma, log2_simd<T>(sigma)))));
    }
  }
  return v;
}

// run_block's decode, update and step rule for the T::kWidth elements from j: writes p, and m and s to the block's
// buffers, and raises the running maxima of |m| and s.
template <class T, Estimate kEstimate, bool kL2, bool kBounds>
__attribute__((always_inline)) inline void step_simd(float* p, const float* g, const int8_t* mc, const uint8_t* sc,
                                                     const uint8_t* vc, typename T::F v, bool any_unseen,
                                                     const BlockConstants<T>& c, const Settings& st, float* m, float* s,
                                                     typename T::F& m_top, typename T::F& s_top, int64_t j) {
  using F = typename T::F;
  using I = typename T::I;
  // Decode: a code's magnitude bits, zero where the code is 0, then (for m) the code's sign bit.
  const I cm = T::load_codes(mc + j);
  const I cm_magnitude = T::abs_i(cm);
  const I m_bits = T::template shl<kMShift>(T::add_i(cm_magnitude, c.m_base));
  const F m_old = T::with_sign_of(T::mul_nonzero(cm_magnitude, T::from_bits(m_bits), c.m_scale), cm, c.sign_bit);
  const I cs = T::load_codes(sc + j);
  const I s_bits = T::template shl<kSShift>(T::add_i(cs, c.s_base));
  const F s_old = T::mul_nonzero(cs, T::from_bits(s_bits), c.s_scale);
  // Update.
  const F pj = T::loadu(p + j);
  const F gj = kL2 ? T::fma(T::loadu(g + j), c.sign, T::mul(pj, c.l2)) : T::mul(T::loadu(g + j), c.sign);
  const F mj = first_moment(m_old, gj, c.weight1);
  const F sj = accumulator(s_old, gj, c.beta2, c.weight2);
  v = rule_simd<T, kEstimate>(v, sj, vc + j, any_unseen, c, st);
  const F updated = T::fma(pj, c.decay, T::mul(T::mul(mj, v), c.nss));
  // min/max pass a NaN through here (their second operand), as in run_block.
  T::storeu(p + j, kBounds ? T::min(c.hi, T::max(c.lo, updated)) : updated);
  T::store(m + j, mj);
  T::store(s + j, sj);
  m_top = T::max(m_top, T::abs(mj));
  s_top = T::max(s_top, sj);
}

// encode_exp_avg and encode_exp_avg_sq on T's lanes, for a whole block of m and s (maxima m_top and s_top).
template <class T>
void encode_simd(const float* m, const float* s, float m_top, float s_top, int8_t* mc, uint8_t* sc) {
  using F = typename T::F;
  using I = typename T::I;
  using M = typename T::M;
  constexpr int kParts = 32 / T::kWidth;  // vectors per 32 codes
  const F m_inverse = T::set(m_top > 0.0f ? 1.0f / m_top : 0.0f), s_inverse = T::set(s_top > 0.0f ? 1.0f / s_top : 0.0f);
  const F half_smallest = T::set(as_float((1 + kMBase) << kMShift) * 0.5f), zero = T::zero();
  const I half_unit = T::set_i(1 << (kMShift - 1));
  static_assert(kMShift == kSShift, "one rounding constant for both");
  for (int64_t j = 0; j < kBlock; j += 32) {
    I m_rounded[kParts], s_rounded[kParts];
    M small[kParts], negative[kParts], positive[kParts];
    for (int part = 0; part < kParts; ++part) {
      const F mj = T::load(m + j + part * T::kWidth);
      const F x = T::mul(T::abs(mj), m_inverse);
      m_rounded[part] = T::template shr<kMShift>(T::add_i(T::bits(x), half_unit));
      small[part] = T::ge(x, half_smallest);
      negative[part] = T::lt(mj, zero);
      const F sj = T::load(s + j + part * T::kWidth);
      s_rounded[part] = T::template shr<kSShift>(T::add_i(T::bits(T::mul(sj, s_inverse)), half_unit));
      positive[part] = T::gt(sj, zero);
    }
    T::store_m_codes(m_rounded, small, negative, mc + j);
    T::store_s_codes(s_rounded, positive, sc + j);
  }
}

// run_block<true, kEstimate> for a whole block on the build's instruction set (Isa), the same operations in the same
// order, with L2 decay and bounds compiled in only where they are set; p, g and the codes are prefetched 4 blocks
// ahead (without that the step waits on memory for a third of its time, the hardware prefetcher not keeping up with
// eight streams).
template <Estimate kEstimate, bool kL2, bool kBounds>
void simd_block(float* __restrict__ p, const float* __restrict__ g, int8_t* __restrict__ mc,
                float* __restrict__ m_absmax, uint8_t* __restrict__ sc, float* __restrict__ s_max,
                const uint8_t* __restrict__ vc, const float* __restrict__ v_lo, const float* __restrict__ v_hi,
                float neg_step_size, const Settings& st) {
  using T = Isa;
  alignas(64) float m[kBlock];
  alignas(64) float s[kBlock];
  PrecondTables tables;
  precond_tables(*v_lo, (*v_hi - *v_lo) * (1.0f / kVLevels), tables);
  T::Precond precond;
  T::precond(tables, precond);
  const BlockConstants<T> c(st, neg_step_size, *m_absmax, *s_max);
  T::F m_top = T::zero(), s_top = T::zero();
  for (int64_t j = 0; j < kBlock; j += 32) {  // two cache lines of p and g per iteration
    prefetch_ahead(p, g, mc, sc, vc, j);
    prefetch_ahead(p, g, mc, sc, vc, j + 16);
    T::F v[32 / T::kWidth];
    const bool any_unseen = T::decode_precond32(precond, vc + j, v) && st.late_seen;
    for (int part = 0; part < 32 / T::kWidth; ++part) {
      step_simd<T, kEstimate, kL2, kBounds>(p, g, mc, sc, vc, v[part], any_unseen, c, st, m, s, m_top, s_top,
                                            j + part * T::kWidth);
    }
  }
  const float m_top_value = T::reduce_max(m_top), s_top_value = T::reduce_max(s_top);
  encode_simd<T>(m, s, m_top_value, s_top_value, mc, sc);
  *m_absmax = m_top_value;
  *s_max = s_top_value;
}

// A whole block's step, picked per tensor for its limit, L2 decay and bounds.
using WholeBlock = void (*)(float*, const float*, int8_t*, float*, uint8_t*, float*, const uint8_t*, const float*,
                            const float*, float, const Settings&);

template <Estimate kEstimate>
WholeBlock whole_block_for(bool l2, bool bounds) {
  if (l2) return bounds ? simd_block<kEstimate, true, true> : simd_block<kEstimate, true, false>;
  return bounds ? simd_block<kEstimate, false, true> : simd_block<kEstimate, false, false>;
}

WholeBlock whole_block_for(Estimate limit, bool l2, bool bounds) {
  if (limit == kEstimateOne) return whole_block_for<kEstimateOne>(l2, bounds);
  if (limit == kEstimatePower) return whole_block_for<kEstimatePower>(l2, bounds);
  return whole_block_for<kNoEstimate>(l2, bounds);
}
#endif

bool is_cpu_contiguous(const at::Tensor& t, c10::ScalarType type) {
  return !t.key_set().has(c10::DispatchKey::Python) && t.layout() == at::kStrided && t.device().is_cpu() &&
         t.is_contiguous() && t.scalar_type() == type;
}

// Tensor i of anon8_step's lists, checked: params and grads contiguous fp32, codes of the param's size, side values
// one per block. `precond`: s_codes, s_max, v_codes, v_lo and v_hi, null without a preconditioner.
void check_tensor(size_t i, const at::Tensor& param, const at::Tensor& grad, const at::Tensor& m_codes,
                  const at::Tensor& m_absmax, const at::Tensor& step, const std::array<const at::Tensor*, 5>& precond) {
  const int64_t numel = param.numel();
  const int64_t blocks = (numel + kBlock - 1) / kBlock;
  const auto codes_ok = [&](const at::Tensor& t, c10::ScalarType type) {
    return is_cpu_contiguous(t, type) && t.numel() == numel;
  };
  const auto side_ok = [&](const at::Tensor& t) { return is_cpu_contiguous(t, at::kFloat) && t.numel() == blocks; };
  bool ok = is_cpu_contiguous(param, at::kFloat) && codes_ok(grad, at::kFloat) && codes_ok(m_codes, at::kChar) &&
            side_ok(m_absmax) && step.device().is_cpu() && step.numel() == 1 && step.scalar_type() == at::kFloat;
  if (ok && precond[0] != nullptr) {
    ok = codes_ok(*precond[0], at::kByte) && side_ok(*precond[1]) && codes_ok(*precond[2], at::kByte) &&
         side_ok(*precond[3]) && side_ok(*precond[4]);
  }
  TORCH_CHECK(ok, "anon_hf 8-bit CPU kernel: tensor ", i, " is not supported: params and grads must be contiguous ",
              "fp32 CPU tensors, codes int8/uint8 of the param's size, side values fp32 with one per block of ",
              kBlock, ", step counters 1-element fp32 CPU tensors");
}

// Steps every tensor once (an ordinary step, never a refresh) and adds 1 to each step counter. Lists are parallel;
// v_codes, v_lo, v_hi, s_codes and s_max are empty when no tensor has a preconditioner (gamma == 0). scalars: the
// layout of SCALAR_SLOTS (anon_kernel.h); estimate, limit and late_seen: the step's StepRule. Everything is checked
// before anything is written.
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
  for (size_t i = 0; i < count; ++i) {
    check_tensor(i, params[i], grads[i], m_codes[i], m_absmax[i], steps[i],
                 preconditioned ? std::array{&s_codes[i], &s_max[i], &v_codes[i], &v_lo[i], &v_hi[i]}
                                : std::array<const at::Tensor*, 5>{});
  }
  Settings st;
  for (int64_t slot = 0; slot < kSlotCount; ++slot) st.s[slot] = static_cast<float>(scalars[slot]);
  const StepRule rule = step_rule(estimate, limit, late_seen, scalars, preconditioned, true);
  st.power_cutoff = rule.cutoff;
  st.limit = rule.limit;
  st.late_seen = rule.late_seen;
  // REFRESH_MODES' codes (anon_kernel.h's Mode) -> Estimate: "log" is computed as "pow" is (exp2 and log2).
  const Estimate kind = rule.estimate == Mode::kNone ? kNoEstimate
                        : rule.estimate == Mode::kOne ? kEstimateOne
                                                      : kEstimatePower;

  for (size_t i = 0; i < count; ++i) {
    const int64_t numel = params[i].numel();
    if (numel == 0) continue;
    float* p = params[i].data_ptr<float>();
    const float* g = grads[i].const_data_ptr<float>();
    int8_t* mc = m_codes[i].data_ptr<int8_t>();
    float* ma = m_absmax[i].data_ptr<float>();
    uint8_t* sc = preconditioned ? s_codes[i].data_ptr<uint8_t>() : nullptr;
    float* sm = preconditioned ? s_max[i].data_ptr<float>() : nullptr;
    const uint8_t* vc = preconditioned ? v_codes[i].const_data_ptr<uint8_t>() : nullptr;
    const float* vl = preconditioned ? v_lo[i].const_data_ptr<float>() : nullptr;
    const float* vh = preconditioned ? v_hi[i].const_data_ptr<float>() : nullptr;
    const float neg_step_size = static_cast<float>(neg_step_sizes[i]);
    Settings tensor_st = st;
    tensor_st.inv_bias2 = static_cast<float>(inv_bias2s[i]);
    const auto block = !preconditioned          ? run_block<false, kNoEstimate>
                       : kind == kEstimateOne    ? run_block<true, kEstimateOne>
                       : kind == kEstimatePower  ? run_block<true, kEstimatePower>
                                               : run_block<true, kNoEstimate>;
#if defined(ANON_HF_AVX512) || defined(ANON_HF_AVX2)
    const WholeBlock whole_block = preconditioned ? whole_block_for(kind, l2, bounds) : nullptr;
#endif
    const int64_t blocks = (numel + kBlock - 1) / kBlock;
    // Whole blocks per chunk: results do not depend on the thread count or on which thread takes a chunk.
    for_each_chunk(blocks, kGrainBlocks, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const int64_t start = b * kBlock;
        const int64_t n = std::min(kBlock, numel - start);
#if defined(ANON_HF_AVX512) || defined(ANON_HF_AVX2)
        if (whole_block != nullptr && n == kBlock) {
          whole_block(p + start, g + start, mc + start, ma + b, sc + start, sm + b, vc + start, vl + b, vh + b,
                      neg_step_size, tensor_st);
          continue;
        }
#endif
        block(p + start, g + start, mc + start, ma + b, preconditioned ? sc + start : nullptr,
              preconditioned ? sm + b : nullptr, preconditioned ? vc + start : nullptr, preconditioned ? vl + b : nullptr,
              preconditioned ? vh + b : nullptr, n, neg_step_size, tensor_st);
      }
    });
  }
  increment_steps(steps);
}


// The codecs alone, for the refresh steps that take anon_hf's reference path (decode, anon(), encode): the same
// formats and float operations as anon_hf/storage/quant8.py, per block of 256, without the torch ops' temporaries.
// kind 0: exp_avg (int8 codes, side0 = absmax); 1: exp_avg_sq (uint8, side0 = max); 2: precond (uint8, side0 = min
// and side1 = max of log2 v).
void decode_block(int64_t kind, const void* codes, const float* side0, const float* side1, float* out, int64_t n) {
  if (kind == 0) {
    const int8_t* c = static_cast<const int8_t*>(codes);
    for (int64_t j = 0; j < n; ++j) out[j] = decode_exp_avg(c[j], *side0);
  } else if (kind == 1) {
    const uint8_t* c = static_cast<const uint8_t*>(codes);
    for (int64_t j = 0; j < n; ++j) out[j] = decode_exp_avg_sq(c[j], *side0);
  } else {
    const uint8_t* c = static_cast<const uint8_t*>(codes);
    PrecondTables tables;
    precond_tables(*side0, (*side1 - *side0) * (1.0f / kVLevels), tables);
    for (int64_t j = 0; j < n; ++j) out[j] = decode_precond(c[j], tables);
  }
}

void encode_block(int64_t kind, const float* values, void* codes, float* side0, float* side1, int64_t n) {
  if (kind == 0 || kind == 1) {
    float top = 0.0f;
#pragma omp simd reduction(max : top)
    for (int64_t j = 0; j < n; ++j) {
      const float a = kind == 0 ? std::fabs(values[j]) : values[j];
      top = top > a ? top : a;
    }
    if (kind == 0) {
      encode_exp_avg(values, top, static_cast<int8_t*>(codes), n);
    } else {
      encode_exp_avg_sq(values, top, static_cast<uint8_t*>(codes), n);
    }
    *side0 = top;
    return;
  }
  // precond: log2 v over the positive elements, their min and max, then 1 + round((log2 v - min) * 254 / span).
  alignas(64) float logs[kBlock];
  constexpr float kInf = std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < n; ++j) logs[j] = log2_poly(at_least_tiny(values[j]));
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
  uint8_t* c = static_cast<uint8_t*>(codes);
  for (int64_t j = 0; j < n; ++j) {
    const float position = std::nearbyint((logs[j] - low) * scale);
    const float clamped = position < 0.0f ? 0.0f : (position > kVLevels ? kVLevels : position);
    c[j] = static_cast<uint8_t>(values[j] > 0.0f ? 1 + static_cast<int32_t>(clamped) : 0);
  }
  *side0 = low;
  *side1 = high;
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
#ifdef ANON_HF_AVX512
  module.attr("AVX512_STEP") = true;  // whole blocks take simd_block over Avx512
#else
  module.attr("AVX512_STEP") = false;
#endif
#ifdef ANON_HF_AVX2
  module.attr("AVX2_STEP") = true;  // whole blocks take simd_block over Avx2
#else
  module.attr("AVX2_STEP") = false;
#endif
  export_interface(module);
}
