// Weight-only linear layers on AVX2 + FMA (x86 CPUs without AVX-512: Zen 1-3, Intel before Ice Lake).
//
// y[m, n] = sum_g scale[n, g] * sum_{k in g} x[m, k] * (code[n, k] - zero[n, g])
//         = sum_g scale[n, g] * (sum_{k in g} x[m, k] * code[n, k] - zero[n, g] * xsum[m, g])
// Codes are unsigned (the stored uint8 codes of lowbit's Int formats) and decoded to fp32 in
// registers: the float weight is never materialised for few tokens (decode). Layouts:
//   bits 8: [N, Kp] uint8, row-major (Kp = K rounded up to 32, zero padded);
//   bits 4: [N, Kp / 2] uint8 in blocks of 32 inputs: byte j of a block holds input j in its low
//           nibble and input j + 16 in its high nibble (two shifts give 16 codes in order).
// Each group's products are summed in fp32 vectors, scaled by the group's scale into a running
// vector; the zero-point term is one scalar per (token, group). Many tokens (prefill) dequantize
// a slab of rows to fp32 at a time and call at::mm.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace lowbit_avx2 {
namespace {

constexpr int64_t kBlock = 32;  // inputs per code block
constexpr int64_t kTokens = 4;  // tokens sharing one decoded block

inline float hsum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}

inline __m256 to_float(__m128i bytes8) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes8)); }

// The 32 codes of one block as four vectors of 8 floats, in input order.
template <int Bits>
inline void decode_block(const uint8_t* p, __m256 out[4]) {
  if constexpr (Bits == 8) {
    const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16));
    out[0] = to_float(a);
    out[1] = to_float(_mm_srli_si128(a, 8));
    out[2] = to_float(b);
    out[3] = to_float(_mm_srli_si128(b, 8));
  } else {
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    const __m128i mask = _mm_set1_epi8(0x0F);
    const __m128i lo = _mm_and_si128(raw, mask);
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
    out[0] = to_float(lo);
    out[1] = to_float(_mm_srli_si128(lo, 8));
    out[2] = to_float(hi);
    out[3] = to_float(_mm_srli_si128(hi, 8));
  }
}

struct Params {
  const float* x;  // [M, Kp] zero padded
  const float* xsum;  // [M, G]
  const uint8_t* codes;
  const float* scale;  // [N, G]
  const float* zero;  // [N, G]
  float* y;  // [M, N]
  int64_t M, N, Kp, G, group, row_bytes;
};

// Accumulators per token: 4 for one token (the FMA latency), fewer as tokens add chains.
template <int T>
constexpr int kChains = T == 1 ? 4 : (T == 2 ? 2 : 1);

// Rows [n0, n1) for tokens [m0, m0 + T).
template <int Bits, int T>
void rows_kernel(const Params& p, int64_t n0, int64_t n1, int64_t m0) {
  const int64_t blocks_per_group = p.group / kBlock;
  const int64_t block_bytes = Bits == 8 ? kBlock : kBlock / 2;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = p.codes + n * p.row_bytes;
    const float* sc = p.scale + n * p.G;
    const float* zr = p.zero + n * p.G;
    __m256 total[T];
    float corr[T];
    for (int t = 0; t < T; ++t) total[t] = _mm256_setzero_ps(), corr[t] = 0.f;
    for (int64_t g = 0; g < p.G; ++g) {
      const int64_t b0 = g * blocks_per_group;
      const int64_t b1 = std::min(b0 + blocks_per_group, p.Kp / kBlock);
      __m256 acc[T][kChains<T>];  // independent FMA chains hide the FMA latency
      for (int t = 0; t < T; ++t)
        for (int c = 0; c < kChains<T>; ++c) acc[t][c] = _mm256_setzero_ps();
      for (int64_t b = b0; b < b1; ++b) {
        __m256 w[4];
        decode_block<Bits>(row + b * block_bytes, w);
        for (int t = 0; t < T; ++t) {
          const float* xr = p.x + (m0 + t) * p.Kp + b * kBlock;
          for (int q = 0; q < 4; ++q) {
            __m256& a = acc[t][q % kChains<T>];
            a = _mm256_fmadd_ps(w[q], _mm256_loadu_ps(xr + 8 * q), a);
          }
        }
      }
      for (int t = 0; t < T; ++t)
        for (int c = 1; c < kChains<T>; ++c) acc[t][0] = _mm256_add_ps(acc[t][0], acc[t][c]);
      const __m256 s = _mm256_set1_ps(sc[g]);
      for (int t = 0; t < T; ++t) {
        total[t] = _mm256_fmadd_ps(acc[t][0], s, total[t]);
        corr[t] += sc[g] * zr[g] * p.xsum[(m0 + t) * p.G + g];
      }
    }
    for (int t = 0; t < T; ++t) p.y[(m0 + t) * p.N + n] = hsum(total[t]) - corr[t];
  }
}

template <int Bits>
void gemv(const Params& p) {
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(p.Kp, 1));
  at::parallel_for(0, p.N, grain, [&](int64_t n0, int64_t n1) {
    int64_t m = 0;
    for (; m + 4 <= p.M; m += 4) rows_kernel<Bits, 4>(p, n0, n1, m);
    switch (p.M - m) {
      case 3: rows_kernel<Bits, 3>(p, n0, n1, m); break;
      case 2: rows_kernel<Bits, 2>(p, n0, n1, m); break;
      case 1: rows_kernel<Bits, 1>(p, n0, n1, m); break;
      default: break;
    }
  });
}

// fp32 weight rows [n0, n1) of the first K inputs into out ([n1 - n0, K]).
template <int Bits>
void dequantize_rows(const Params& p, int64_t K, int64_t n0, int64_t n1, float* out) {
  const int64_t block_bytes = Bits == 8 ? kBlock : kBlock / 2;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = p.codes + n * p.row_bytes;
    float* dst = out + (n - n0) * K;
    for (int64_t b = 0; b * kBlock < K; ++b) {
      const int64_t g = b * kBlock / p.group;
      const __m256 s = _mm256_set1_ps(p.scale[n * p.G + g]);
      const __m256 z = _mm256_set1_ps(p.zero[n * p.G + g]);
      __m256 w[4];
      decode_block<Bits>(row + b * block_bytes, w);
      alignas(32) float tmp[kBlock];
      for (int q = 0; q < 4; ++q) _mm256_store_ps(tmp + 8 * q, _mm256_mul_ps(_mm256_sub_ps(w[q], z), s));
      std::copy(tmp, tmp + std::min(kBlock, K - b * kBlock), dst + b * kBlock);
    }
  }
}

template <int Bits>
at::Tensor dequantize_t(const Params& p, int64_t K, int64_t n0, int64_t n1) {
  at::Tensor w = at::empty({n1 - n0, K}, at::kFloat);
  float* out = w.data_ptr<float>();
  at::parallel_for(n0, n1, 16, [&](int64_t a, int64_t b) { dequantize_rows<Bits>(p, K, a, b, out + (a - n0) * K); });
  return w;
}

void check_inputs(const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& zero, int64_t bits, int64_t group,
                  int64_t n, int64_t k) {
  TORCH_CHECK(bits == 4 || bits == 8, "lowbit_avx2: bits must be 4 or 8, got ", bits);
  TORCH_CHECK(group > 0 && group % kBlock == 0, "lowbit_avx2: group ", group, " must be a positive multiple of 32");
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.is_contiguous(), "lowbit_avx2: codes must be contiguous uint8");
  const int64_t kp = (k + kBlock - 1) / kBlock * kBlock, groups = (kp + group - 1) / group;
  TORCH_CHECK(codes.numel() == n * (bits == 8 ? kp : kp / 2), "lowbit_avx2: codes hold ", codes.numel(),
              " bytes, expected ", n * (bits == 8 ? kp : kp / 2));
  for (const at::Tensor* t : {&scale, &zero}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == n * groups,
                "lowbit_avx2: scale/zero must be contiguous float32 [N, groups]");
  }
}

Params make_params(const at::Tensor& xp, const at::Tensor& xsum, const at::Tensor& codes, const at::Tensor& scale,
                   const at::Tensor& zero, at::Tensor& y, int64_t bits, int64_t group, int64_t n, int64_t kp) {
  return Params{xp.data_ptr<float>(),  xsum.data_ptr<float>(), codes.data_ptr<uint8_t>(),
                scale.data_ptr<float>(), zero.data_ptr<float>(), y.data_ptr<float>(),
                xp.size(0),              n,                      kp,
                scale.numel() / n,       group,                  bits == 8 ? kp : kp / 2};
}

}  // namespace

// y = x W^T for x float32 [M, K]; rows from `dequant_from` tokens on go through fp32 slabs and at::mm.
at::Tensor wo_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& zero,
                     int64_t bits, int64_t group, int64_t n, int64_t dequant_from) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "lowbit_avx2: x must be float32 [M, K]");
  const int64_t M = x.size(0), K = x.size(1), Kp = (K + kBlock - 1) / kBlock * kBlock;
  check_inputs(codes, scale, zero, bits, group, n, K);
  at::Tensor y = at::empty({M, n}, at::kFloat);
  if (M == 0 || n == 0) return y.zero_();
  at::Tensor xc = x.contiguous();
  if (M >= dequant_from) {
    Params p = make_params(xc, xc, codes, scale, zero, y, bits, group, n, Kp);
    const int64_t slab = std::max<int64_t>(16, (int64_t(1) << 18) / std::max<int64_t>(K, 1)) / 16 * 16;
    for (int64_t n0 = 0; n0 < n; n0 += slab) {
      const int64_t n1 = std::min(n, n0 + slab);
      at::Tensor w = bits == 8 ? dequantize_t<8>(p, K, n0, n1) : dequantize_t<4>(p, K, n0, n1);
      y.narrow(1, n0, n1 - n0).copy_(at::mm(xc, w.t()));
    }
    return y;
  }
  const int64_t G = scale.numel() / n;
  at::Tensor xp = at::zeros({M, Kp}, at::kFloat), xsum = at::empty({M, G}, at::kFloat);
  const float* src = xc.data_ptr<float>();
  float* dst = xp.data_ptr<float>();
  float* sums = xsum.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m) {  // zero padded copy and per-group sums of each token
    std::copy(src + m * K, src + (m + 1) * K, dst + m * Kp);
    for (int64_t g = 0; g < G; ++g) {
      const int64_t k0 = std::min(K, g * group), k1 = std::min(K, k0 + group);
      __m256 acc = _mm256_setzero_ps();
      int64_t k = k0;
      for (; k + 8 <= k1; k += 8) acc = _mm256_add_ps(acc, _mm256_loadu_ps(src + m * K + k));
      float total = hsum(acc);
      for (; k < k1; ++k) total += src[m * K + k];
      sums[m * G + g] = total;
    }
  }
  Params p = make_params(xp, xsum, codes, scale, zero, y, bits, group, n, Kp);
  if (bits == 8) gemv<8>(p); else gemv<4>(p);
  return y;
}

// The fp32 weight [n, k] the codes stand for (tests, and any caller that wants the float weight).
at::Tensor wo_dequantize(const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& zero, int64_t bits,
                         int64_t group, int64_t n, int64_t k) {
  check_inputs(codes, scale, zero, bits, group, n, k);
  const int64_t Kp = (k + kBlock - 1) / kBlock * kBlock;
  at::Tensor dummy = at::empty({1, 1}, at::kFloat), y = at::empty({1, 1}, at::kFloat);
  Params p = make_params(dummy, dummy, codes, scale, zero, y, bits, group, n, Kp);
  p.G = scale.numel() / n;
  return bits == 8 ? dequantize_t<8>(p, k, 0, n) : dequantize_t<4>(p, k, 0, n);
}

}  // namespace lowbit_avx2

TORCH_LIBRARY(lowbit_avx2, m) {
  m.def("wo_linear(Tensor x, Tensor codes, Tensor scale, Tensor zero, int bits, int group, int n, int dequant_from) -> Tensor");
  m.def("wo_dequantize(Tensor codes, Tensor scale, Tensor zero, int bits, int group, int n, int k) -> Tensor");
}
TORCH_LIBRARY_IMPL(lowbit_avx2, CPU, m) {
  m.impl("wo_linear", &lowbit_avx2::wo_linear);
  m.impl("wo_dequantize", &lowbit_avx2::wo_dequantize);
}
