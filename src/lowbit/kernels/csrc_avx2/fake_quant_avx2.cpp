// W8A8 activations on AVX2 CPUs as the reference sees them (kernels.reference.quantize_input), in
// two passes over each row instead of about ten torch ops over the whole tensor:
//   x / smooth (SmoothQuant's divisor, when set), then per token (dynamic, symmetric int8, scale from
//   the row's min and max as primitives.qparams_from_range) or per tensor (static, calibrated scale
//   and integer zero point): q = clamp(round(x / scale) + zero, qmin, qmax), value = (q - zero) * scale.
// Every step is the reference's IEEE operation in the same order (divisions, round half to even), so
// the values equal the reference's bit for bit. Rows holding NaN or Inf are reported through `finite`
// (the caller then runs the reference, which names the problem); such a row is left smoothed, unquantized.
// w8a8_linear_int runs few tokens end to end: the same integer codes (q - zero) as int16 times the
// layer's 8-bit weight codes on vpmaddwd (int8_gemv.h), summed exactly in int32 and scaled once.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include "int8_gemv.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

namespace lowbit_avx2 {
namespace {

struct ActQuant {
  bool dynamic = true;
  float scale = 1.f, zero = 0.f;     // static only
  float qmin = -127.f, qmax = 127.f;
};

inline float hmin(__m256 v) {
  __m128 m = _mm_min_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_min_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_min_ss(m, _mm_shuffle_ps(m, m, 1)));
}

inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)));
}

// The per-token scale of primitives.qparams_from_range for symmetric int8 (qmin = -qmax).
inline float token_scale(float lo, float hi, const ActQuant& aq) {
  float scale = lo == hi ? std::fabs(lo) : std::max(std::max(hi, 0.f) / aq.qmax, std::min(lo, 0.f) / aq.qmin);
  return scale > 0.f ? scale : 1.f;
}

// One row: out = the smoothed row, then its fake-quantized values in place. False if not finite.
// With `codes` (int16 [K]), the row's integer codes q - zero go there instead (out is then scratch)
// and its scale to `scale_out`.
bool quantize_row(const float* x, const float* smooth, int64_t K, const ActQuant& aq, float* out,
                  int16_t* codes = nullptr, float* scale_out = nullptr) {
  const __m256 zero = _mm256_setzero_ps();
  __m256 lo = _mm256_set1_ps(INFINITY), hi = _mm256_set1_ps(-INFINITY), bad = zero;
  float slo = INFINITY, shi = -INFINITY;
  bool sbad = false;
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 v = _mm256_loadu_ps(x + k);
    if (smooth) v = _mm256_div_ps(v, _mm256_loadu_ps(smooth + k));
    _mm256_storeu_ps(out + k, v);
    lo = _mm256_min_ps(lo, v);
    hi = _mm256_max_ps(hi, v);
    bad = _mm256_or_ps(bad, _mm256_cmp_ps(_mm256_mul_ps(v, zero), zero, _CMP_NEQ_UQ));  // NaN or +-Inf
  }
  for (; k < K; ++k) {
    const float v = smooth ? x[k] / smooth[k] : x[k];
    out[k] = v;
    slo = std::min(slo, v);
    shi = std::max(shi, v);
    sbad |= !std::isfinite(v);
  }
  if (sbad || _mm256_movemask_ps(bad)) return false;
  const float scale = aq.dynamic ? token_scale(std::min(hmin(lo), slo), std::max(hmax(hi), shi), aq) : aq.scale;
  if (scale_out) *scale_out = scale;
  const __m256 vs = _mm256_set1_ps(scale), vz = _mm256_set1_ps(aq.zero);
  const __m256 vmin = _mm256_set1_ps(aq.qmin), vmax = _mm256_set1_ps(aq.qmax);
  for (k = 0; k + 8 <= K; k += 8) {
    __m256 q = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(out + k), vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    q = _mm256_min_ps(_mm256_max_ps(_mm256_add_ps(q, vz), vmin), vmax);
    if (codes) {  // q - zero is an exact integer
      const __m256i c = _mm256_cvtps_epi32(_mm256_sub_ps(q, vz));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + k),
                       _mm_packs_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1)));
    } else {
      _mm256_storeu_ps(out + k, _mm256_mul_ps(_mm256_sub_ps(q, vz), vs));
    }
  }
  for (; k < K; ++k) {
    const float q = std::min(std::max(std::nearbyint(out[k] / scale) + aq.zero, aq.qmin), aq.qmax);
    if (codes) codes[k] = static_cast<int16_t>(q - aq.zero);
    else out[k] = (q - aq.zero) * scale;
  }
  return true;
}

}  // namespace

namespace {

at::Tensor smooth_of(const c10::optional<at::Tensor>& smooth, int64_t K) {
  if (!smooth.has_value()) return at::Tensor();
  at::Tensor sm = smooth->to(at::kFloat).contiguous();
  TORCH_CHECK(sm.numel() == K, "lowbit_avx2: smooth must hold one divisor per input (", K, "), got ", sm.numel());
  return sm;
}

ActQuant act_quant(const c10::optional<at::Tensor>& x_scale, const c10::optional<at::Tensor>& x_zero_point, double qmin,
                   double qmax) {
  ActQuant aq;
  aq.qmin = static_cast<float>(qmin);
  aq.qmax = static_cast<float>(qmax);
  if (x_scale.has_value()) {
    TORCH_CHECK(x_scale->numel() == 1, "lowbit_avx2: a static x_scale must be one value");
    aq.dynamic = false;
    aq.scale = x_scale->to(at::kFloat).item<float>();
    if (x_zero_point.has_value()) aq.zero = x_zero_point->to(at::kFloat).item<float>();
  } else {
    TORCH_CHECK(aq.qmin == -aq.qmax, "lowbit_avx2: dynamic activations must be symmetric (qmin = -qmax)");
  }
  return aq;
}

}  // namespace

// x float32 [M, K]; smooth float32 [K] or None; x_scale / x_zero_point: the static parameters (one
// value each; None for dynamic per-token scales, x_zero_point None for symmetric codes).
std::tuple<at::Tensor, at::Tensor> w8a8_fake_quant(const at::Tensor& x, const c10::optional<at::Tensor>& smooth,
                                                   const c10::optional<at::Tensor>& x_scale,
                                                   const c10::optional<at::Tensor>& x_zero_point, double qmin,
                                                   double qmax) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "lowbit_avx2: x must be float32 [M, K]");
  const int64_t M = x.size(0), K = x.size(1);
  at::Tensor xc = x.contiguous(), sm = smooth_of(smooth, K);
  const ActQuant aq = act_quant(x_scale, x_zero_point, qmin, qmax);
  at::Tensor out = at::empty({M, K}, at::kFloat);
  std::atomic<bool> finite{true};
  const float* xp = xc.data_ptr<float>();
  const float* sp = sm.defined() ? sm.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1)), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      if (!quantize_row(xp + m * K, sp, K, aq, op + m * K)) finite.store(false, std::memory_order_relaxed);
  });
  return {out, at::scalar_tensor(finite.load(), at::kBool)};
}

// Few tokens of a W8A8 layer: y float32 [M, n] = x's activation codes (as w8a8_fake_quant computes
// them) times the layer's 8-bit weight codes in the AVX2 weight-only layout (codes - 128 as int8,
// scale and zero - 128 per group of `group` inputs), summed exactly in int32. `finite` is false when
// a row held NaN or Inf (that row's outputs are NaN; the caller runs the reference to name the problem).
std::tuple<at::Tensor, at::Tensor> w8a8_linear_int(const at::Tensor& x, const c10::optional<at::Tensor>& smooth,
                                                   const c10::optional<at::Tensor>& x_scale,
                                                   const c10::optional<at::Tensor>& x_zero_point, double qmin,
                                                   double qmax, const at::Tensor& codes, const at::Tensor& scale,
                                                   const at::Tensor& zero, int64_t group, int64_t n) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "lowbit_avx2: x must be float32 [M, K]");
  TORCH_CHECK(qmax - qmin <= 255, "lowbit_avx2: w8a8_linear_int takes activations of at most 8 bits, got [", qmin,
              ", ", qmax, "]");
  const int64_t M = x.size(0), K = x.size(1), Kp = (K + 31) / 32 * 32;
  check_inputs(codes, scale, zero, 8, group, n, K);
  const int64_t G = (Kp + group - 1) / group;
  at::Tensor xc = x.contiguous(), sm = smooth_of(smooth, K);
  const ActQuant aq = act_quant(x_scale, x_zero_point, qmin, qmax);
  at::Tensor y = at::empty({M, n}, at::kFloat);
  if (M == 0 || n == 0) return {y.zero_(), at::scalar_tensor(true, at::kBool)};
  const int64_t seg = segment_length(group, G, Kp, 16384), S = (Kp + seg - 1) / seg;
  std::vector<int16_t> q(M * Kp);
  std::vector<float> work(K), ascale(M * S), gsum(M * G, 0.f);
  bool finite = true;
  const float* sp = sm.defined() ? sm.data_ptr<float>() : nullptr;
  for (int64_t m = 0; m < M; ++m) {
    int16_t* qm = q.data() + m * Kp;
    float s = std::numeric_limits<float>::quiet_NaN();
    if (!quantize_row(xc.data_ptr<float>() + m * K, sp, K, aq, work.data(), qm, &s)) {
      finite = false;
      s = std::numeric_limits<float>::quiet_NaN();
      std::fill(qm, qm + K, int16_t(0));
    }
    std::fill(qm + K, qm + Kp, int16_t(0));
    std::fill(ascale.begin() + m * S, ascale.begin() + (m + 1) * S, s);
    for (int64_t g = 0; g < G; ++g) {
      int32_t total = 0;  // |q| <= 255 over at most 2^23 inputs
      for (int64_t k = g * group; k < std::min(K, (g + 1) * group); ++k) total += qm[k];
      gsum[m * G + g] = s * static_cast<float>(total);
    }
  }
  const IntTokens a{q.data(), ascale.data(), gsum.data(), M, S, seg};
  const ByteWeight w{reinterpret_cast<const int8_t*>(codes.data_ptr<uint8_t>()), scale.data_ptr<float>(),
                     zero.data_ptr<float>(), n, Kp, G, group};
  int8_codes_gemm(a, w, y.data_ptr<float>());
  return {y, at::scalar_tensor(finite, at::kBool)};
}

}  // namespace lowbit_avx2

TORCH_LIBRARY_FRAGMENT(lowbit_avx2, m) {
  m.def("w8a8_fake_quant(Tensor x, Tensor? smooth, Tensor? x_scale, Tensor? x_zero_point, float qmin, float qmax) -> (Tensor, Tensor)");
  m.def("w8a8_linear_int(Tensor x, Tensor? smooth, Tensor? x_scale, Tensor? x_zero_point, float qmin, float qmax, Tensor codes, Tensor scale, Tensor zero, int group, int n) -> (Tensor, Tensor)");
}
TORCH_LIBRARY_IMPL(lowbit_avx2, CPU, m) {
  m.impl("w8a8_fake_quant", &lowbit_avx2::w8a8_fake_quant);
  m.impl("w8a8_linear_int", &lowbit_avx2::w8a8_linear_int);
}
