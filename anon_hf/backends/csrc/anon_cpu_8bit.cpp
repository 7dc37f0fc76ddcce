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
// Three implementations of the step, the same operations in the same order (the loops spell their multiply-adds as
// std::fma, so the compiler does not pick others): plain C++ loops written for the compiler's vectorizer (-O3
// -fopenmp-simd; every tail block, and whole blocks in builds for neither ISA below), AVX-512 intrinsics for whole
// blocks where the build targets AVX-512, and AVX2 + FMA intrinsics for whole blocks where it targets AVX2 but not
// AVX-512. The intrinsics run 2x (AVX-512) and 2.4x (AVX2) faster than what GCC 12 makes of the loops (masked
// polynomials, spilled constants) and prefetch p, g and the codes 4 blocks ahead: without that the step waits on
// memory for a third of its time, the hardware prefetcher not keeping up with eight streams. Elementwise per block:
// results do not depend on how blocks are split between threads.

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

namespace {

using namespace anon_hf;

constexpr int64_t kBlock = 256;
constexpr int32_t kMShift = 20, kMBase = 889, kMTop = 127;
constexpr int32_t kSShift = 20, kSBase = 761, kSTop = 255;
constexpr float kVLevels = 254.0f;
// Blocks per thread's part at least (2**15 elements, as anon_cpu.cpp's grain).
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
// loop vectorizable for AVX2: GCC 12 leaves it scalar (10x slower) when a float select hangs on a byte code's test.
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
    const float mj = std::fma(gj - m_old, weight1, m_old);
    const float sj = std::fma(s_old, beta2, gj * gj * weight2);
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

#if defined(__AVX512F__) || defined(__AVX2__)
// How far ahead of the current vector the intrinsics versions prefetch: 4 blocks, longer ahead than a DRAM access
// takes at this kernel's speed (measured: 2 blocks left stalls, 8 gained nothing).
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

// A whole block's step (run_block_avx512 or run_block_avx2), picked per tensor for its limit, L2 decay and bounds.
using WholeBlock = void (*)(float*, const float*, int8_t*, float*, uint8_t*, float*, const uint8_t*, const float*,
                            const float*, float, const Settings&);
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__)
#define ANON_HF_AVX512 1

inline __m512i load_codes(const int8_t* codes) {
  return _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes)));
}

inline __m512i load_codes(const uint8_t* codes) {
  return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes)));
}

inline void store_codes(__m512i codes, void* out) {
  _mm_storeu_si128(static_cast<__m128i*>(out), _mm512_cvtepi32_epi8(codes));
}

inline __m512 fma16(__m512 a, float b, float c) { return _mm512_fmadd_ps(a, _mm512_set1_ps(b), _mm512_set1_ps(c)); }

// exp2_poly, log2_poly and power_limit on 16 lanes: the same operations.
inline __m512 exp2_poly16(__m512 x) {
  const __m512 round = _mm512_set1_ps(12582912.0f);
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-126.0f)), _mm512_set1_ps(126.0f));
  const __m512 shifted = _mm512_add_ps(x, round);
  const __m512i n = _mm512_sub_epi32(_mm512_castps_si512(shifted), _mm512_castps_si512(round));
  const __m512 f = _mm512_sub_ps(x, _mm512_sub_ps(shifted, round));
  __m512 p = fma16(f, 1.535336188319500e-4f, 1.339887440266574e-3f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618437357674640e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550332471162809e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402264791363012e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931472028550421e-1f));
  const __m512 r = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(r), _mm512_slli_epi32(n, 23)));
}

inline __m512 log2_poly16(__m512 x) {
  const __m512i tiny = _mm512_set1_epi32(as_int(std::numeric_limits<float>::min()));
  const __m512i bits = _mm512_max_epi32(_mm512_castps_si512(x), tiny);  // at_least_tiny
  const __m512i exponent = _mm512_srai_epi32(_mm512_sub_epi32(bits, _mm512_set1_epi32(0x3f3504f3)), 23);
  const __m512 f = _mm512_sub_ps(_mm512_castsi512_ps(_mm512_sub_epi32(bits, _mm512_slli_epi32(exponent, 23))),
                                 _mm512_set1_ps(1.0f));
  const __m512 z = _mm512_mul_ps(f, f);
  __m512 y = fma16(f, 7.0376836292e-2f, -1.1514610310e-1f);
  for (const float c : {1.1676998740e-1f, -1.2420140846e-1f, 1.4249322787e-1f, -1.6668057665e-1f, 2.0000714765e-1f,
                        -2.4999993993e-1f, 3.3333331174e-1f}) {
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(c));
  }
  const __m512 tail = _mm512_fmadd_ps(_mm512_mul_ps(y, f), z, _mm512_mul_ps(_mm512_set1_ps(-0.5f), z));
  const __m512 ln = _mm512_add_ps(f, tail);
  return _mm512_fmadd_ps(ln, _mm512_set1_ps(1.44269504088896341f), _mm512_cvtepi32_ps(exponent));
}

// log2(x) from the bits, exponent + mantissa - 1: below log2(x) by at most 0.0861 (0 for x == 0: -127).
inline __m512 log2_from_bits16(__m512 x) {
  return fma16(_mm512_cvtepi32_ps(_mm512_castps_si512(x)), 1.0f / (1 << 23), -127.0f);
}

// run_block<true, kEstimate> for a whole block, 16 lanes at a time: the same operations in the same order, with l2 decay
// and bounds compiled in only where they are set.
template <Estimate kEstimate, bool kL2, bool kBounds>
void run_block_avx512(float* __restrict__ p, const float* __restrict__ g, int8_t* __restrict__ mc,
                      float* __restrict__ m_absmax, uint8_t* __restrict__ sc, float* __restrict__ s_max,
                      const uint8_t* __restrict__ vc, const float* __restrict__ v_lo, const float* __restrict__ v_hi,
                      float neg_step_size, const Settings& st) {
  alignas(64) float m[kBlock];
  alignas(64) float s[kBlock];
  PrecondTables tables;
  precond_tables(*v_lo, (*v_hi - *v_lo) * (1.0f / kVLevels), tables);
  const __m512 v_high = _mm512_load_ps(tables.high), v_low = _mm512_load_ps(tables.low);
  const __m512i one = _mm512_set1_epi32(1), m_base = _mm512_set1_epi32(kMBase), s_base = _mm512_set1_epi32(kSBase);
  const __m512i sign_bit = _mm512_set1_epi32(std::numeric_limits<int32_t>::min());
  const __m512 decay = _mm512_set1_ps(st.s[kDecay]), weight1 = _mm512_set1_ps(st.s[kWeight1]);
  // Slot::kL2: the template parameter kL2 (a bool, 1) hides the slot's name here.
  const __m512 sign = _mm512_set1_ps(st.s[kSign]), l2 = _mm512_set1_ps(st.s[Slot::kL2]);
  const __m512 lo = _mm512_set1_ps(st.s[kLo]), hi = _mm512_set1_ps(st.s[kHi]);
  const __m512 beta2 = _mm512_set1_ps(st.s[kBeta2]), weight2 = _mm512_set1_ps(st.s[kWeight2]);
  const __m512 inv_bias2 = _mm512_set1_ps(st.inv_bias2), eps = _mm512_set1_ps(st.s[kEps]);
  const __m512 max_ratio = _mm512_set1_ps(st.s[kMaxRatio]), nss = _mm512_set1_ps(neg_step_size);
  const __m512 max_ratio_sq = _mm512_mul_ps(max_ratio, max_ratio);
  const __m512 gamma = _mm512_set1_ps(st.s[kGamma]), neg_half_gamma = _mm512_set1_ps(-0.5f * st.s[kGamma]);
  const __m512 power_cutoff = _mm512_set1_ps(st.power_cutoff);
  const __m512 m_scale = _mm512_set1_ps(*m_absmax), s_scale = _mm512_set1_ps(*s_max);
  __m512 m_top = _mm512_setzero_ps(), s_top = _mm512_setzero_ps();
  for (int64_t j = 0; j < kBlock; j += 16) {
    prefetch_ahead(p, g, mc, sc, vc, j);
    // Decode: a code's magnitude bits, zero where the code is 0, then (for m) the code's sign bit.
    const __m512i cm = load_codes(mc + j);
    const __m512i m_bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_abs_epi32(cm), m_base), kMShift);
    const __m512 m_magnitude =
        _mm512_maskz_mul_ps(_mm512_test_epi32_mask(cm, cm), _mm512_castsi512_ps(m_bits), m_scale);
    const __m512 m_old = _mm512_castsi512_ps(  // 0xF8: magnitude | (code & sign bit)
        _mm512_ternarylogic_epi32(_mm512_castps_si512(m_magnitude), cm, sign_bit, 0xF8));
    const __m512i cs = load_codes(sc + j);
    const __m512i s_bits = _mm512_slli_epi32(_mm512_add_epi32(cs, s_base), kSShift);
    const __m512 s_old = _mm512_maskz_mul_ps(_mm512_test_epi32_mask(cs, cs), _mm512_castsi512_ps(s_bits), s_scale);
    const __m512i cv = load_codes(vc + j);
    const __m512i index = _mm512_sub_epi32(cv, one);  // permutexvar reads the low 4 bits: (c - 1) & 15
    const __mmask16 seen = _mm512_test_epi32_mask(cv, cv);
    __m512 v = _mm512_maskz_mul_ps(seen, _mm512_permutexvar_ps(_mm512_srli_epi32(index, 4), v_high),
                                   _mm512_permutexvar_ps(index, v_low));
    // Update.
    const __m512 pj = _mm512_loadu_ps(p + j);
    const __m512 gj = kL2 ? _mm512_fmadd_ps(_mm512_loadu_ps(g + j), sign, _mm512_mul_ps(pj, l2))
                          : _mm512_mul_ps(_mm512_loadu_ps(g + j), sign);
    const __m512 mj = _mm512_fmadd_ps(_mm512_sub_ps(gj, m_old), weight1, m_old);
    const __m512 sj = _mm512_fmadd_ps(s_old, beta2, _mm512_mul_ps(_mm512_mul_ps(gj, gj), weight2));
    // The late-seen rule is computed only in the vectors with a code 0, the limit only in those where a lane may
    // bind, rare where gradients are stationary.
    const __mmask16 unseen = st.late_seen ? static_cast<__mmask16>(~seen) : 0;
    if (kEstimate != kNoEstimate && unseen) {
      const __m512 sigma = _mm512_fmadd_ps(sj, inv_bias2, eps);
      const __m512 root = _mm512_sqrt_ps(sigma);
      const __m512 est = kEstimate == kEstimateOne ? _mm512_div_ps(_mm512_set1_ps(1.0f), root)
                                                   : exp2_poly16(_mm512_mul_ps(neg_half_gamma, log2_poly16(sigma)));
      const __m512 limit = kEstimate == kEstimateOne ? _mm512_div_ps(max_ratio, root) : _mm512_mul_ps(max_ratio, est);
      if (st.limit) v = _mm512_min_ps(v, limit);
      const __m512 fresh = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(sj, _mm512_setzero_ps(), _CMP_GT_OQ), est);
      v = _mm512_mask_mov_ps(v, unseen, fresh);
    } else if (kEstimate == kEstimateOne && st.limit) {  // v > r / sqrt(sigma) <=> v * v * sigma > r * r: exact
      const __m512 sigma = _mm512_fmadd_ps(sj, inv_bias2, eps);
      const __mmask16 binds = _mm512_cmp_ps_mask(_mm512_mul_ps(_mm512_mul_ps(v, v), sigma), max_ratio_sq, _CMP_GT_OQ);
      if (binds) v = _mm512_min_ps(v, _mm512_div_ps(max_ratio, _mm512_sqrt_ps(sigma)));
    } else if (kEstimate == kEstimatePower && st.limit) {
      // 2 log2(v) + gamma log2(sigma) > 2 log2(r), log2 read from the bits: each term errs low by at most 0.0861,
      // which power_cutoff allows for, so a vector skipped has no binding lane.
      const __m512 sigma = _mm512_fmadd_ps(sj, inv_bias2, eps);
      const __m512 guess =
          _mm512_fmadd_ps(log2_from_bits16(sigma), gamma, _mm512_add_ps(log2_from_bits16(v), log2_from_bits16(v)));
      if (_mm512_cmp_ps_mask(guess, power_cutoff, _CMP_GT_OQ)) {
        const __m512 power = exp2_poly16(_mm512_mul_ps(neg_half_gamma, log2_poly16(sigma)));
        v = _mm512_min_ps(v, _mm512_mul_ps(max_ratio, power));
      }
    }
    const __m512 updated = _mm512_fmadd_ps(pj, decay, _mm512_mul_ps(_mm512_mul_ps(mj, v), nss));
    // max/min return their second operand where one is NaN: NaN stays NaN, as in run_block.
    _mm512_storeu_ps(p + j, kBounds ? _mm512_min_ps(hi, _mm512_max_ps(lo, updated)) : updated);
    _mm512_store_ps(m + j, mj);
    _mm512_store_ps(s + j, sj);
    m_top = _mm512_max_ps(m_top, _mm512_abs_ps(mj));
    s_top = _mm512_max_ps(s_top, sj);
  }
  const float m_top_value = _mm512_reduce_max_ps(m_top), s_top_value = _mm512_reduce_max_ps(s_top);
  // Encode, as encode_exp_avg and encode_exp_avg_sq.
  const __m512 m_inverse = _mm512_set1_ps(m_top_value > 0.0f ? 1.0f / m_top_value : 0.0f);
  const __m512 s_inverse = _mm512_set1_ps(s_top_value > 0.0f ? 1.0f / s_top_value : 0.0f);
  const __m512 half_smallest = _mm512_set1_ps(as_float((1 + kMBase) << kMShift) * 0.5f);
  const __m512i half_unit = _mm512_set1_epi32(1 << (kMShift - 1));
  const __m512i m_top_code = _mm512_set1_epi32(kMTop), s_top_code = _mm512_set1_epi32(kSTop);
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t j = 0; j < kBlock; j += 16) {
    const __m512 mj = _mm512_load_ps(m + j);
    const __m512 x = _mm512_mul_ps(_mm512_abs_ps(mj), m_inverse);
    const __m512i rounded =
        _mm512_sub_epi32(_mm512_srai_epi32(_mm512_add_epi32(_mm512_castps_si512(x), half_unit), kMShift), m_base);
    const __m512i small = _mm512_maskz_mov_epi32(_mm512_cmp_ps_mask(x, half_smallest, _CMP_GE_OQ), one);
    const __m512i magnitude = _mm512_max_epi32(_mm512_min_epi32(rounded, m_top_code), small);
    const __mmask16 negative = _mm512_cmp_ps_mask(mj, zero, _CMP_LT_OQ);
    store_codes(_mm512_mask_sub_epi32(magnitude, negative, _mm512_setzero_si512(), magnitude), mc + j);
    const __m512 sj = _mm512_load_ps(s + j);
    const __m512 y = _mm512_mul_ps(sj, s_inverse);
    const __m512i s_rounded =
        _mm512_sub_epi32(_mm512_srai_epi32(_mm512_add_epi32(_mm512_castps_si512(y), half_unit), kSShift), s_base);
    const __m512i s_code = _mm512_min_epi32(_mm512_max_epi32(s_rounded, one), s_top_code);
    store_codes(_mm512_maskz_mov_epi32(_mm512_cmp_ps_mask(sj, zero, _CMP_GT_OQ), s_code), sc + j);
  }
  *m_absmax = m_top_value;
  *s_max = s_top_value;
}

template <Estimate kEstimate, bool kL2, bool kBounds>
constexpr WholeBlock kWholeBlock = run_block_avx512<kEstimate, kL2, kBounds>;
#endif  // AVX-512

#if !defined(ANON_HF_AVX512) && defined(__AVX2__) && defined(__FMA__)
#define ANON_HF_AVX2 1

// Whole blocks in AVX2 builds (CPUs without AVX-512, or ATEN_CPU_CAPABILITY=avx2): run_block_avx512's operations on
// 8 lanes, 32 vectors a block. AVX2 has no mask registers: codes of 0 zero their value by vpsignd (one instruction for
// a compare and an andnot), v's 16-entry tables are read by two vpermps on their halves and a blend on bit 3 of the
// index, and the int32 codes are narrowed by saturating packs (the clamps before them keep the saturation from
// deciding anything). As for AVX-512, p, g and the codes are prefetched 4 blocks ahead. What GCC 12 makes of
// run_block's loops for AVX2 took 4.3x fused AdamW's step time (Llama-style 20M shapes, one thread); this, 1.8x.

// 8 codes widened to int32.
inline __m256i load_codes8(const int8_t* codes) {
  return _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes)));
}

inline __m256i load_codes8(const uint8_t* codes) {
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes)));
}

// The int16 lanes of two 8-lane int32 vectors a, b in order a0..a7 b0..b7 (packs works within 128-bit halves).
inline __m128i pack_pair(__m256i a, __m256i b, __m128i* high) {
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xD8);  // 0, 2, 1, 3
  *high = _mm256_extracti128_si256(packed, 1);
  return _mm256_castsi256_si128(packed);
}

// Signed int8 codes (m, in [-127, 127]) of a0..a7 b0..b7.
inline void store_codes16(__m256i a, __m256i b, int8_t* out) {
  __m128i high;
  const __m128i low = pack_pair(a, b, &high);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm_packs_epi16(low, high));
}

// Unsigned uint8 codes (s, in [0, 255]) of a0..a7 b0..b7.
inline void store_codes16(__m256i a, __m256i b, uint8_t* out) {
  __m128i high;
  const __m128i low = pack_pair(a, b, &high);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm_packus_epi16(low, high));
}

// table[index & 7 | (select < 0 ? 8 : 0)] for a 16-entry table held as its halves (entries 0-7, 8-15): vpermps
// reads bits 0-2 of the index, blendv the sign bit of `select`, where the caller shifts the index's bit 3.
inline __m256 lookup16(__m256 first, __m256 second, __m256i index, __m256i select) {
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(first, index), _mm256_permutevar8x32_ps(second, index),
                          _mm256_castsi256_ps(select));
}

// x where the int32 code (>= 0) is nonzero, else +0: vpsignd, one instruction for a compare and an andnot.
inline __m256 where_nonzero(__m256i code, __m256 x) {
  return _mm256_castsi256_ps(_mm256_sign_epi32(_mm256_castps_si256(x), code));
}

inline __m256 fma8(__m256 a, float b, float c) { return _mm256_fmadd_ps(a, _mm256_set1_ps(b), _mm256_set1_ps(c)); }

inline float reduce_max8(__m256 x) {
  __m128 y = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  y = _mm_max_ps(y, _mm_movehl_ps(y, y));
  y = _mm_max_ss(y, _mm_movehdup_ps(y));
  return _mm_cvtss_f32(y);
}

// exp2_poly, log2_poly and power_limit on 8 lanes: the same operations.
inline __m256 exp2_poly8(__m256 x) {
  const __m256 round = _mm256_set1_ps(12582912.0f);
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-126.0f)), _mm256_set1_ps(126.0f));
  const __m256 shifted = _mm256_add_ps(x, round);
  const __m256i n = _mm256_sub_epi32(_mm256_castps_si256(shifted), _mm256_castps_si256(round));
  const __m256 f = _mm256_sub_ps(x, _mm256_sub_ps(shifted, round));
  __m256 p = fma8(f, 1.535336188319500e-4f, 1.339887440266574e-3f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.618437357674640e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.550332471162809e-2f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.402264791363012e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.931472028550421e-1f));
  const __m256 r = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
  return _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(r), _mm256_slli_epi32(n, 23)));
}

inline __m256 log2_poly8(__m256 x) {
  const __m256i bits =
      _mm256_max_epi32(_mm256_castps_si256(x), _mm256_set1_epi32(as_int(std::numeric_limits<float>::min())));
  const __m256i exponent = _mm256_srai_epi32(_mm256_sub_epi32(bits, _mm256_set1_epi32(0x3f3504f3)), 23);
  const __m256 f = _mm256_sub_ps(_mm256_castsi256_ps(_mm256_sub_epi32(bits, _mm256_slli_epi32(exponent, 23))),
                                 _mm256_set1_ps(1.0f));
  const __m256 z = _mm256_mul_ps(f, f);
  __m256 y = fma8(f, 7.0376836292e-2f, -1.1514610310e-1f);
  for (const float c : {1.1676998740e-1f, -1.2420140846e-1f, 1.4249322787e-1f, -1.6668057665e-1f, 2.0000714765e-1f,
                        -2.4999993993e-1f, 3.3333331174e-1f}) {
    y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(c));
  }
  const __m256 tail = _mm256_fmadd_ps(_mm256_mul_ps(y, f), z, _mm256_mul_ps(_mm256_set1_ps(-0.5f), z));
  const __m256 ln = _mm256_add_ps(f, tail);
  return _mm256_fmadd_ps(ln, _mm256_set1_ps(1.44269504088896341f), _mm256_cvtepi32_ps(exponent));
}

// As log2_from_bits16.
inline __m256 log2_from_bits8(__m256 x) {
  return fma8(_mm256_cvtepi32_ps(_mm256_castps_si256(x)), 1.0f / (1 << 23), -127.0f);
}

// run_block_avx512 on 8 lanes: the same operations in the same order.
template <Estimate kEstimate, bool kL2, bool kBounds>
void run_block_avx2(float* __restrict__ p, const float* __restrict__ g, int8_t* __restrict__ mc,
                    float* __restrict__ m_absmax, uint8_t* __restrict__ sc, float* __restrict__ s_max,
                    const uint8_t* __restrict__ vc, const float* __restrict__ v_lo, const float* __restrict__ v_hi,
                    float neg_step_size, const Settings& st) {
  alignas(64) float m[kBlock];
  alignas(64) float s[kBlock];
  PrecondTables tables;
  precond_tables(*v_lo, (*v_hi - *v_lo) * (1.0f / kVLevels), tables);
  const __m256 v_high0 = _mm256_load_ps(tables.high), v_high1 = _mm256_load_ps(tables.high + 8);
  const __m256 v_low0 = _mm256_load_ps(tables.low), v_low1 = _mm256_load_ps(tables.low + 8);
  const __m256i one = _mm256_set1_epi32(1), m_base = _mm256_set1_epi32(kMBase), s_base = _mm256_set1_epi32(kSBase);
  const __m256i sign_bit = _mm256_set1_epi32(std::numeric_limits<int32_t>::min()), zero_codes = _mm256_setzero_si256();
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(std::numeric_limits<int32_t>::max()));
  const __m256 decay = _mm256_set1_ps(st.s[kDecay]), weight1 = _mm256_set1_ps(st.s[kWeight1]);
  // Slot::kL2: the template parameter kL2 (a bool, 1) hides the slot's name here.
  const __m256 sign = _mm256_set1_ps(st.s[kSign]), l2 = _mm256_set1_ps(st.s[Slot::kL2]);
  const __m256 lo = _mm256_set1_ps(st.s[kLo]), hi = _mm256_set1_ps(st.s[kHi]);
  const __m256 beta2 = _mm256_set1_ps(st.s[kBeta2]), weight2 = _mm256_set1_ps(st.s[kWeight2]);
  const __m256 inv_bias2 = _mm256_set1_ps(st.inv_bias2), eps = _mm256_set1_ps(st.s[kEps]);
  const __m256 max_ratio = _mm256_set1_ps(st.s[kMaxRatio]), nss = _mm256_set1_ps(neg_step_size);
  const __m256 max_ratio_sq = _mm256_mul_ps(max_ratio, max_ratio);
  const __m256 gamma = _mm256_set1_ps(st.s[kGamma]), neg_half_gamma = _mm256_set1_ps(-0.5f * st.s[kGamma]);
  const __m256 power_cutoff = _mm256_set1_ps(st.power_cutoff);
  const __m256 m_scale = _mm256_set1_ps(*m_absmax), s_scale = _mm256_set1_ps(*s_max);
  __m256 m_top = _mm256_setzero_ps(), s_top = _mm256_setzero_ps();
  // 8 lanes from element j: decode, update, limit (as run_block_avx512's, per 8 lanes), store p, m and s.
  const auto step8 = [&](int64_t j) __attribute__((always_inline)) {
    // Decode: a code's magnitude bits, zero where the code is 0, then (for m) the code's sign bit.
    const __m256i cm = load_codes8(mc + j);
    const __m256i cm_magnitude = _mm256_abs_epi32(cm);
    const __m256i m_bits = _mm256_slli_epi32(_mm256_add_epi32(cm_magnitude, m_base), kMShift);
    const __m256 m_magnitude = where_nonzero(cm_magnitude, _mm256_mul_ps(_mm256_castsi256_ps(m_bits), m_scale));
    const __m256 m_old =
        _mm256_or_ps(m_magnitude, _mm256_castsi256_ps(_mm256_and_si256(cm, sign_bit)));
    const __m256i cs = load_codes8(sc + j);
    const __m256i s_bits = _mm256_slli_epi32(_mm256_add_epi32(cs, s_base), kSShift);
    const __m256 s_old = where_nonzero(cs, _mm256_mul_ps(_mm256_castsi256_ps(s_bits), s_scale));
    const __m256i cv = load_codes8(vc + j);
    const __m256i index = _mm256_sub_epi32(cv, one);  // (c - 1) >> 4 and (c - 1) & 15 by lookup16
    const int unseen = st.late_seen ? _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(cv, zero_codes))) : 0;
    __m256 v = where_nonzero(
        cv, _mm256_mul_ps(lookup16(v_high0, v_high1, _mm256_srli_epi32(index, 4), _mm256_slli_epi32(index, 24)),
                          lookup16(v_low0, v_low1, index, _mm256_slli_epi32(index, 28))));
    // Update.
    const __m256 pj = _mm256_loadu_ps(p + j);
    const __m256 gj = kL2 ? _mm256_fmadd_ps(_mm256_loadu_ps(g + j), sign, _mm256_mul_ps(pj, l2))
                          : _mm256_mul_ps(_mm256_loadu_ps(g + j), sign);
    const __m256 mj = _mm256_fmadd_ps(_mm256_sub_ps(gj, m_old), weight1, m_old);
    const __m256 sj = _mm256_fmadd_ps(s_old, beta2, _mm256_mul_ps(_mm256_mul_ps(gj, gj), weight2));
    if (kEstimate != kNoEstimate && unseen) {  // as run_block_avx512
      const __m256 sigma = _mm256_fmadd_ps(sj, inv_bias2, eps);
      const __m256 root = _mm256_sqrt_ps(sigma);
      const __m256 est = kEstimate == kEstimateOne ? _mm256_div_ps(_mm256_set1_ps(1.0f), root)
                                                   : exp2_poly8(_mm256_mul_ps(neg_half_gamma, log2_poly8(sigma)));
      const __m256 limit = kEstimate == kEstimateOne ? _mm256_div_ps(max_ratio, root) : _mm256_mul_ps(max_ratio, est);
      if (st.limit) v = _mm256_min_ps(v, limit);
      const __m256 fresh = _mm256_and_ps(_mm256_cmp_ps(sj, _mm256_setzero_ps(), _CMP_GT_OQ), est);
      v = _mm256_blendv_ps(v, fresh, _mm256_castsi256_ps(_mm256_cmpeq_epi32(cv, zero_codes)));
    } else if (kEstimate == kEstimateOne && st.limit) {
      const __m256 sigma = _mm256_fmadd_ps(sj, inv_bias2, eps);
      const __m256 binds = _mm256_cmp_ps(_mm256_mul_ps(_mm256_mul_ps(v, v), sigma), max_ratio_sq, _CMP_GT_OQ);
      if (_mm256_movemask_ps(binds)) v = _mm256_min_ps(v, _mm256_div_ps(max_ratio, _mm256_sqrt_ps(sigma)));
    } else if (kEstimate == kEstimatePower && st.limit) {
      const __m256 sigma = _mm256_fmadd_ps(sj, inv_bias2, eps);
      const __m256 guess =
          _mm256_fmadd_ps(log2_from_bits8(sigma), gamma, _mm256_add_ps(log2_from_bits8(v), log2_from_bits8(v)));
      if (_mm256_movemask_ps(_mm256_cmp_ps(guess, power_cutoff, _CMP_GT_OQ))) {
        const __m256 power = exp2_poly8(_mm256_mul_ps(neg_half_gamma, log2_poly8(sigma)));
        v = _mm256_min_ps(v, _mm256_mul_ps(max_ratio, power));
      }
    }
    const __m256 updated = _mm256_fmadd_ps(pj, decay, _mm256_mul_ps(_mm256_mul_ps(mj, v), nss));
    _mm256_storeu_ps(p + j, kBounds ? _mm256_min_ps(hi, _mm256_max_ps(lo, updated)) : updated);
    _mm256_store_ps(m + j, mj);
    _mm256_store_ps(s + j, sj);
    m_top = _mm256_max_ps(m_top, _mm256_and_ps(mj, abs_mask));
    s_top = _mm256_max_ps(s_top, sj);
  };
  for (int64_t j = 0; j < kBlock; j += 16) {  // a cache line of p and g per iteration
    prefetch_ahead(p, g, mc, sc, vc, j);
    step8(j);
    step8(j + 8);
  }
  const float m_top_value = reduce_max8(m_top), s_top_value = reduce_max8(s_top);
  // Encode, as encode_exp_avg and encode_exp_avg_sq.
  const __m256 m_inverse = _mm256_set1_ps(m_top_value > 0.0f ? 1.0f / m_top_value : 0.0f);
  const __m256 s_inverse = _mm256_set1_ps(s_top_value > 0.0f ? 1.0f / s_top_value : 0.0f);
  const __m256 half_smallest = _mm256_set1_ps(as_float((1 + kMBase) << kMShift) * 0.5f);
  const __m256i half_unit = _mm256_set1_epi32(1 << (kMShift - 1));
  const __m256i m_top_code = _mm256_set1_epi32(kMTop), s_top_code = _mm256_set1_epi32(kSTop);
  const __m256 zero = _mm256_setzero_ps();
  const auto m_code8 = [&](int64_t j) __attribute__((always_inline)) {
    const __m256 mj = _mm256_load_ps(m + j);
    const __m256 x = _mm256_mul_ps(_mm256_and_ps(mj, abs_mask), m_inverse);
    const __m256i rounded =
        _mm256_sub_epi32(_mm256_srai_epi32(_mm256_add_epi32(_mm256_castps_si256(x), half_unit), kMShift), m_base);
    const __m256i small = _mm256_and_si256(_mm256_castps_si256(_mm256_cmp_ps(x, half_smallest, _CMP_GE_OQ)), one);
    const __m256i magnitude = _mm256_max_epi32(_mm256_min_epi32(rounded, m_top_code), small);
    const __m256i negative = _mm256_castps_si256(_mm256_cmp_ps(mj, zero, _CMP_LT_OQ));  // -1 or 0
    return _mm256_sub_epi32(_mm256_xor_si256(magnitude, negative), negative);
  };
  const auto s_code8 = [&](int64_t j) __attribute__((always_inline)) {
    const __m256 sj = _mm256_load_ps(s + j);
    const __m256 y = _mm256_mul_ps(sj, s_inverse);
    const __m256i s_rounded =
        _mm256_sub_epi32(_mm256_srai_epi32(_mm256_add_epi32(_mm256_castps_si256(y), half_unit), kSShift), s_base);
    const __m256i s_code = _mm256_min_epi32(_mm256_max_epi32(s_rounded, one), s_top_code);
    return _mm256_and_si256(_mm256_castps_si256(_mm256_cmp_ps(sj, zero, _CMP_GT_OQ)), s_code);
  };
  for (int64_t j = 0; j < kBlock; j += 16) {
    store_codes16(m_code8(j), m_code8(j + 8), mc + j);
    store_codes16(s_code8(j), s_code8(j + 8), sc + j);
  }
  *m_absmax = m_top_value;
  *s_max = s_top_value;
}

template <Estimate kEstimate, bool kL2, bool kBounds>
constexpr WholeBlock kWholeBlock = run_block_avx2<kEstimate, kL2, kBounds>;
#endif  // AVX2

#if defined(ANON_HF_AVX512) || defined(ANON_HF_AVX2)
// The build's whole-block step (kWholeBlock, AVX-512 or AVX2) compiled for this limit, L2 decay and bounds.
template <Estimate kEstimate>
WholeBlock whole_block_for(bool l2, bool bounds) {
  if (l2) return bounds ? kWholeBlock<kEstimate, true, true> : kWholeBlock<kEstimate, true, false>;
  return bounds ? kWholeBlock<kEstimate, false, true> : kWholeBlock<kEstimate, false, false>;
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
    // Whole blocks per thread: results do not depend on the thread count.
    for_each_part(blocks, kGrainBlocks, [&](int64_t begin, int64_t end) {
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
// formats and float operations as anon_hf/storage/quant8.py, per block of 256, ~50x faster than its torch ops.
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
  module.attr("AVX512_STEP") = true;  // whole blocks take run_block_avx512
#else
  module.attr("AVX512_STEP") = false;
#endif
#ifdef ANON_HF_AVX2
  module.attr("AVX2_STEP") = true;  // whole blocks take run_block_avx2
#else
  module.attr("AVX2_STEP") = false;
#endif
  export_interface(module);
}
