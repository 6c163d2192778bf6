// W8A8 activations on AVX2 CPUs as the reference sees them (kernels.reference.quantize_input), in
// two passes over each row instead of about ten torch ops over the whole tensor:
//   x / smooth (SmoothQuant's divisor, when set), then per token (dynamic, symmetric int8, scale from
//   the row's min and max as primitives.qparams_from_range) or per tensor (static, calibrated scale
//   and integer zero point): q = clamp(round(x / scale) + zero, qmin, qmax), value = (q - zero) * scale.
// Every step is the reference's IEEE operation in the same order (divisions, round half to even), so
// the values equal the reference's bit for bit. Rows holding NaN or Inf are reported through `finite`
// (the caller then runs the reference, which names the problem); such a row is left smoothed, unquantized.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <tuple>

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
bool quantize_row(const float* x, const float* smooth, int64_t K, const ActQuant& aq, float* out) {
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
  const __m256 vs = _mm256_set1_ps(scale), vz = _mm256_set1_ps(aq.zero);
  const __m256 vmin = _mm256_set1_ps(aq.qmin), vmax = _mm256_set1_ps(aq.qmax);
  for (k = 0; k + 8 <= K; k += 8) {
    __m256 q = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(out + k), vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    q = _mm256_min_ps(_mm256_max_ps(_mm256_add_ps(q, vz), vmin), vmax);
    _mm256_storeu_ps(out + k, _mm256_mul_ps(_mm256_sub_ps(q, vz), vs));
  }
  for (; k < K; ++k) {
    const float q = std::min(std::max(std::nearbyint(out[k] / scale) + aq.zero, aq.qmin), aq.qmax);
    out[k] = (q - aq.zero) * scale;
  }
  return true;
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
  at::Tensor xc = x.contiguous();
  at::Tensor sm;
  if (smooth.has_value()) {
    sm = smooth->to(at::kFloat).contiguous();
    TORCH_CHECK(sm.numel() == K, "lowbit_avx2: smooth must hold one divisor per input (", K, "), got ", sm.numel());
  }
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

}  // namespace lowbit_avx2

TORCH_LIBRARY_FRAGMENT(lowbit_avx2, m) {
  m.def("w8a8_fake_quant(Tensor x, Tensor? smooth, Tensor? x_scale, Tensor? x_zero_point, float qmin, float qmax) -> (Tensor, Tensor)");
}
TORCH_LIBRARY_IMPL(lowbit_avx2, CPU, m) { m.impl("w8a8_fake_quant", &lowbit_avx2::w8a8_fake_quant); }
