// Anon8bit's fused CPU step between refreshes: dequantize, update and requantize each block of 256 elements in one
// pass. Refresh steps never come here (anon_hf/optimizer8bit.py runs them through the readable reference path, so
// the refresh rule lives in one place); between refreshes the preconditioner is read-only. Per element the step reads
// p (4 B), g (4 B), m, s, v (1 B each) and writes p, m, s: 17 bytes, against fused AdamW's 28.
//
// The 8-bit formats are those of anon_hf/_quant8.py (see its docstring), with the same float operations:
//
//   m: int8, sign + 4 exponent + 3 mantissa bits relative to the block's absmax
//        code = ((bits(|m| * (1 / absmax)) + 2**19) >> 20) - 889, clamped to 127; below 1: nearer of 0 and 1
//   s: uint8, 5 exponent + 3 mantissa bits relative to the block's max
//        code = ((bits(s * (1 / max)) + 2**19) >> 20) - 761, clamped to [1, 255]; 0 only for s == 0
//   v: uint8, code 0 is 0, else v = exp2(lo + (code - 1) * ((hi - lo) * (1 / 254)))
//
// and the update of anon_hf/_cpu_kernel's kernel (anon_cpu.cpp), computed in fp32:
//
//   g = sign * g (+ l2 * p);  m = m + (g - m) * weight1;  s = s * beta2 + g * g * weight2
//   with max_precond_ratio (gamma == 1 only: other gammas take the codec path):
//       v = min(v, max_ratio / sqrt(s * inv_bias2 + eps))
//   p = clamp(p * decay + m * v * neg_step_size, lo, hi)
//
// The loops are plain C++ written for the compiler's vectorizer (-O3 -fopenmp-simd, AVX2/AVX-512 as ATen uses): each
// pass over a block's 256 elements is simple enough to vectorize (GCC 12 left a single fused loop scalar, 10x slower:
// std::min/max on floats, ternaries around calls, floorf). exp2 is a degree-6 polynomial (Cephes' exp2f); decoded
// preconditioners are within 1.5e-6 relative of torch.exp2's (the argument lo + (c - 1) * step is rounded differently). Elementwise per block: results do not depend on how blocks are split between threads.

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace {

constexpr int64_t kBlock = 256;
constexpr int32_t kMShift = 20, kMBase = 889, kMTop = 127;
constexpr int32_t kSShift = 20, kSBase = 761, kSTop = 255;
constexpr float kVLevels = 254.0f;
// Blocks per task of at::parallel_for (2**15 elements, as anon_cpu.cpp).
constexpr int64_t kGrainBlocks = 128;

enum Slot : int64_t { kDecay, kWeight1, kBeta2, kWeight2, kSign, kL2, kLo, kHi, kEps, kMaxRatio, kSlotCount };

struct Settings {
  float s[kSlotCount];
  float inv_bias2;  // this tensor's 1 / (1 - beta2**n), n the gradients since its last refresh, this one included
  bool l2;
  bool bounds;
  bool preconditioned;
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
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  const float r = 1.0f + p * f;
  return as_float(as_int(r) + n * (1 << 23));
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
    code[j] = values[j] > 0.0f ? raw : 0;
  }
  for (int64_t j = 0; j < n; ++j) codes[j] = static_cast<uint8_t>(code[j]);
}

// One block of n <= kBlock elements in three passes the compiler vectorizes: decode and update (tracking the new absmax
// of m and max of s), encode m, encode s. kPrecond = false: gamma == 0, no s and v (v = 1). kLimit: max_precond_ratio's
// limit on v (gamma == 1).
template <bool kPrecond, bool kLimit>
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
  const float v_base = kPrecond ? *v_lo : 0.0f;
  const float v_step = kPrecond ? (*v_hi - *v_lo) * (1.0f / kVLevels) : 0.0f;
  const float beta2 = st.s[kBeta2], weight2 = st.s[kWeight2];
  const float inv_bias2 = st.inv_bias2, eps = st.s[kEps], max_ratio = st.s[kMaxRatio];
  float m_top = 0.0f, s_top = 0.0f;
#pragma omp simd reduction(max : m_top, s_top)
  for (int64_t j = 0; j < n; ++j) {
    const int32_t cm = mc[j];
    const int32_t magnitude = cm < 0 ? -cm : cm;
    const float m_value = as_float(((magnitude > 1 ? magnitude : 1) + kMBase) << kMShift) * m_scale;
    const float m_old = cm > 0 ? m_value : (cm < 0 ? -m_value : 0.0f);
    const int32_t cs = kPrecond ? sc[j] : 0;
    const float s_value = as_float(((cs > 1 ? cs : 1) + kSBase) << kSShift) * s_scale;
    const float s_old = cs != 0 ? s_value : 0.0f;
    const int32_t cv = kPrecond ? vc[j] : 1;
    const float v_value = kPrecond ? exp2_poly(v_base + static_cast<float>(cv - 1) * v_step) : 1.0f;
    const float v_stored = cv != 0 ? v_value : 0.0f;
    const float pj = p[j];
    const float gj = g[j] * sign + pj * l2;  // l2 == 0 without L2 decay
    const float mj = m_old + (gj - m_old) * weight1;
    const float sj = s_old * beta2 + gj * gj * weight2;
    float v = v_stored;
    if constexpr (kLimit) {
      const float limit = max_ratio / std::sqrt(sj * inv_bias2 + eps);
      v = v < limit ? v : limit;
    }
    const float updated = pj * decay + mj * v * neg_step_size;
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

bool is_cpu_contiguous(const at::Tensor& t, c10::ScalarType type) {
  return !t.key_set().has(c10::DispatchKey::Python) && t.layout() == at::kStrided && t.device().is_cpu() &&
         t.is_contiguous() && t.scalar_type() == type;
}

// Steps every tensor once (an ordinary step, never a refresh) and adds 1 to each step counter. Lists are parallel;
// v_codes, v_lo, v_hi, s_codes and s_max are empty when no tensor has a preconditioner (gamma == 0). Everything is
// checked before anything is written.
void anon8_step(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                const std::vector<at::Tensor>& m_codes, const std::vector<at::Tensor>& m_absmax,
                const std::vector<at::Tensor>& s_codes, const std::vector<at::Tensor>& s_max,
                const std::vector<at::Tensor>& v_codes, const std::vector<at::Tensor>& v_lo,
                const std::vector<at::Tensor>& v_hi, const std::vector<at::Tensor>& steps,
                const std::vector<double>& neg_step_sizes, const std::vector<double>& inv_bias2s,
                const std::vector<double>& scalars, bool l2, bool bounds, bool limit) {
  const size_t count = params.size();
  const bool preconditioned = !v_codes.empty();
  TORCH_CHECK(grads.size() == count && m_codes.size() == count && m_absmax.size() == count &&
                  steps.size() == count && neg_step_sizes.size() == count && inv_bias2s.size() == count,
              "anon_hf 8-bit CPU kernel: params, grads, m_codes, m_absmax, steps, neg_step_sizes and inv_bias2s must ",
              "have one entry per tensor");
  TORCH_CHECK(!limit || !v_codes.empty(), "anon_hf 8-bit CPU kernel: a limit needs a preconditioner");
  TORCH_CHECK(!preconditioned || (s_codes.size() == count && s_max.size() == count && v_codes.size() == count &&
                                  v_lo.size() == count && v_hi.size() == count),
              "anon_hf 8-bit CPU kernel: s_codes, s_max, v_codes, v_lo and v_hi must be empty or one per tensor");
  TORCH_CHECK(scalars.size() == kSlotCount, "anon_hf 8-bit CPU kernel: expected ", kSlotCount, " scalars");
  for (size_t i = 0; i < count; ++i) {
    const int64_t numel = params[i].numel();
    const int64_t blocks = (numel + kBlock - 1) / kBlock;
    bool ok = is_cpu_contiguous(params[i], at::kFloat) && is_cpu_contiguous(grads[i], at::kFloat) &&
              grads[i].numel() == numel && is_cpu_contiguous(m_codes[i], at::kChar) && m_codes[i].numel() == numel &&
              is_cpu_contiguous(m_absmax[i], at::kFloat) && m_absmax[i].numel() == blocks &&
              steps[i].device().is_cpu() && steps[i].numel() == 1 && steps[i].scalar_type() == at::kFloat;
    if (ok && preconditioned) {
      ok = is_cpu_contiguous(s_codes[i], at::kByte) && s_codes[i].numel() == numel &&
           is_cpu_contiguous(s_max[i], at::kFloat) && s_max[i].numel() == blocks &&
           is_cpu_contiguous(v_codes[i], at::kByte) && v_codes[i].numel() == numel &&
           is_cpu_contiguous(v_lo[i], at::kFloat) && v_lo[i].numel() == blocks &&
           is_cpu_contiguous(v_hi[i], at::kFloat) && v_hi[i].numel() == blocks;
    }
    TORCH_CHECK(ok, "anon_hf 8-bit CPU kernel: tensor ", i, " is not supported: params and grads must be contiguous ",
                "fp32 CPU tensors, codes int8/uint8 of the param's size, side values fp32 with one per block of ",
                kBlock, ", step counters 1-element fp32 CPU tensors");
  }
  Settings st;
  for (int64_t slot = 0; slot < kSlotCount; ++slot) st.s[slot] = static_cast<float>(scalars[slot]);
  st.l2 = l2;
  st.bounds = bounds;
  st.preconditioned = preconditioned;

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
    const auto block = !preconditioned ? run_block<false, false> : (limit ? run_block<true, true> : run_block<true, false>);
    const int64_t blocks = (numel + kBlock - 1) / kBlock;
    at::parallel_for(0, blocks, kGrainBlocks, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const int64_t start = b * kBlock;
        const int64_t n = std::min(kBlock, numel - start);
        block(p + start, g + start, mc + start, ma + b, preconditioned ? sc + start : nullptr,
              preconditioned ? sm + b : nullptr, preconditioned ? vc + start : nullptr, preconditioned ? vl + b : nullptr,
              preconditioned ? vh + b : nullptr, n, neg_step_size, tensor_st);
      }
    });
  }
  for (const at::Tensor& step : steps) *step.data_ptr<float>() += 1.0f;
}


// The codecs alone, for the refresh steps that take anon_hf's reference path (decode, anon(), encode): the same
// formats and float operations as anon_hf/_quant8.py, per block of 256, ~50x faster than its torch ops.
// kind 0: exp_avg (int8 codes, side0 = absmax); 1: exp_avg_sq (uint8, side0 = max); 2: precond (uint8, side0 = min
// and side1 = max of log2 v).
void decode_block(int64_t kind, const void* codes, const float* side0, const float* side1, float* out, int64_t n) {
  if (kind == 0) {
    const int8_t* c = static_cast<const int8_t*>(codes);
    const float scale = *side0;
    for (int64_t j = 0; j < n; ++j) {
      const int32_t cm = c[j];
      const int32_t magnitude = cm < 0 ? -cm : cm;
      const float value = as_float(((magnitude > 1 ? magnitude : 1) + kMBase) << kMShift);
      const float signed_value = cm > 0 ? value : (cm < 0 ? -value : 0.0f);
      out[j] = signed_value * scale;
    }
  } else if (kind == 1) {
    const uint8_t* c = static_cast<const uint8_t*>(codes);
    const float scale = *side0;
    for (int64_t j = 0; j < n; ++j) {
      const int32_t cs = c[j];
      const float value = as_float(((cs > 1 ? cs : 1) + kSBase) << kSShift);
      out[j] = (cs != 0 ? value : 0.0f) * scale;
    }
  } else {
    const uint8_t* c = static_cast<const uint8_t*>(codes);
    const float base = *side0, step = (*side1 - *side0) * (1.0f / kVLevels);
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const int32_t cv = c[j];
      const float value = exp2_poly(base + static_cast<float>(cv - 1) * step);
      out[j] = cv != 0 ? value : 0.0f;
    }
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
  float low = std::numeric_limits<float>::infinity(), high = -low;
  for (int64_t j = 0; j < n; ++j) {
    const bool positive = values[j] > 0.0f;
    logs[j] = positive ? std::log2(std::max(values[j], std::numeric_limits<float>::min())) : 0.0f;
    if (positive) {
      low = std::min(low, logs[j]);
      high = std::max(high, logs[j]);
    }
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
  module.attr("SCALAR_SLOTS") = static_cast<int64_t>(kSlotCount);
}
