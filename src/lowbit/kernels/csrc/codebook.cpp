// Codebook (vector-quantized) linear layers: y[n] = sum_j T[j][code[n, j]] with
// T[j][c] = dot(x[j*D : (j+1)*D], codebook[book(j)][c]) computed once per call and token.
// Codes are prepacked as [n_sub/16 chunks, ceil(N/16) row blocks, 16 sub-vectors, 16 rows]
// bytes: the 16 rows' codes of one sub-vector are one 16-byte load, widened to gather
// indices, and a pass over one chunk of 16 sub-vectors for all rows keeps that chunk's
// dot tables (16 KB per token for 256 entries) in L1. Large M dequantizes to bf16 and uses
// at::matmul.
#include "common.h"

namespace lowbit {
namespace {

constexpr int kRows = 16;
constexpr int kTile = 4;  // tokens per pass over the codes
constexpr int kChunk = 16;  // sub-vectors per pass

// T [M, NS, E] for x [M, NS*D] (zero padded) and codebook [books, E, D].
at::Tensor dot_table(const at::Tensor& xp, const at::Tensor& book, int64_t per_book, int64_t NS) {
  const int64_t M = xp.size(0), E = book.size(1), D = book.size(2);
  const at::Tensor bt = book.transpose(1, 2).contiguous();  // [books, D, E]
  at::Tensor t = at::empty({M, NS, E}, at::kFloat);
  const float* x = xp.data_ptr<float>();
  const float* b = bt.data_ptr<float>();
  float* out = t.data_ptr<float>();
  at::parallel_for(0, M * NS, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t m = i / NS, j = i % NS;
      const float* xj = x + m * NS * D + j * D;
      // padded sub-vectors (x is zero there) read the last codebook instead of past the end
      const float* bj = b + std::min<int64_t>(j / per_book, book.size(0) - 1) * D * E;
      for (int64_t c = 0; c < E; c += 16) {
        const __mmask16 mk = E - c >= 16 ? 0xFFFF : (__mmask16)((1u << (E - c)) - 1);
        __m512 acc = _mm512_setzero_ps();
        for (int64_t d = 0; d < D; ++d) acc = _mm512_fmadd_ps(_mm512_set1_ps(xj[d]), _mm512_maskz_loadu_ps(mk, bj + d * E + c), acc);
        _mm512_mask_storeu_ps(out + i * E + c, mk, acc);
      }
    }
  });
  return t;
}

// y[m, rows of blocks nb0..nb1) for MT tokens; t points at the first token's tables [NSp, E].
template <int MT>
void gather_rows(const uint8_t* codes, int64_t NJ, int64_t NB, int64_t nb0, int64_t nb1, const float* t, int64_t NSp,
                 int64_t E, const float* bias, float* y, int64_t N) {
  for (int64_t jc = 0; jc < NJ; ++jc) {
    const float* tc = t + jc * kChunk * E;
    for (int64_t nb = nb0; nb < nb1; ++nb) {
      const int64_t n0 = nb * kRows;
      const __mmask16 mask = N - n0 >= kRows ? 0xFFFF : (__mmask16)((1u << (N - n0)) - 1);
      const uint8_t* c = codes + (jc * NB + nb) * kChunk * kRows;
      __m512 acc[MT][2];
      for (int m = 0; m < MT; ++m) {
        acc[m][0] = jc ? _mm512_maskz_loadu_ps(mask, y + m * N + n0) : _mm512_setzero_ps();
        acc[m][1] = _mm512_setzero_ps();
      }
      for (int jj = 0; jj < kChunk; ++jj) {
        const __m512i idx = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(c + jj * kRows)));
        for (int m = 0; m < MT; ++m)
          acc[m][jj & 1] = _mm512_add_ps(acc[m][jj & 1], _mm512_i32gather_ps(idx, tc + m * NSp * E + jj * E, 4));
      }
      for (int m = 0; m < MT; ++m) {
        __m512 r = _mm512_add_ps(acc[m][0], acc[m][1]);
        if (jc == NJ - 1 && bias) r = _mm512_add_ps(r, _mm512_maskz_loadu_ps(mask, bias + n0));
        _mm512_mask_storeu_ps(y + m * N + n0, mask, r);
      }
    }
  }
}

// W^T [K, N] bf16 from the codes.
void vq_dequant_t(const uint8_t* codes, int64_t NS, const at::Tensor& book, int64_t per_book, int64_t N, int64_t K,
                  uint16_t* wt) {
  // codes: [NJ, NB, kChunk, 16]
  const int64_t E = book.size(1), D = book.size(2), NB = (N + kRows - 1) / kRows;
  const float* b = book.data_ptr<float>();
  at::parallel_for(0, NB, 1, [&](int64_t begin, int64_t end) {
    for (int64_t nb = begin; nb < end; ++nb) {
      const int64_t n0 = nb * kRows;
      const __mmask16 mask = N - n0 >= kRows ? 0xFFFF : (__mmask16)((1u << (N - n0)) - 1);
      for (int64_t j = 0; j < NS; ++j) {
        const uint8_t* cp = codes + ((j / kChunk * NB + nb) * kChunk + j % kChunk) * kRows;
        const __m512i idx = _mm512_mullo_epi32(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)cp)),
                                               _mm512_set1_epi32((int)D));
        const float* bj = b + (j / per_book) * E * D;
        for (int64_t d = 0; d < D && j * D + d < K; ++d) {
          const __m512 v = _mm512_i32gather_ps(_mm512_add_epi32(idx, _mm512_set1_epi32((int)d)), bj, 4);
          _mm256_mask_storeu_epi16(wt + (j * D + d) * N + n0, mask, (__m256i)_mm512_cvtneps_pbh(v));
        }
      }
    }
  });
}

}  // namespace

// y = (x / smooth) W^T + bias with W given by codebook codes; y in x's dtype.
at::Tensor vq_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& codebook, int64_t per_book,
                     int64_t n, const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& smooth,
                     int64_t prefill_from) {
  LOWBIT_CHECK(x.dim() == 2, "vq_linear: x must be 2-D [M, K], got ", x.dim(), "-D");
  LOWBIT_CHECK(codebook.dim() == 3 && codebook.scalar_type() == at::kFloat && codebook.is_contiguous(),
               "vq_linear: codebook must be contiguous float32 [books, entries, dim]");
  const int64_t M = x.size(0), K = x.size(1), E = codebook.size(1), D = codebook.size(2);
  const int64_t NS = (K + D - 1) / D, NB = (n + kRows - 1) / kRows, NJ = (NS + kChunk - 1) / kChunk, NSp = NJ * kChunk;
  LOWBIT_CHECK(E <= 256 && per_book > 0 && (NS + per_book - 1) / per_book <= codebook.size(0),
               "vq_linear: at most 256 entries and one codebook per ", per_book, " sub-vectors");
  LOWBIT_CHECK(codes.is_contiguous() && codes.scalar_type() == at::kByte && codes.numel() == NJ * NB * kChunk * kRows,
               "vq_linear: codes must be contiguous uint8 [", NJ, ", ", NB, ", 16, 16]");
  if (bias) LOWBIT_CHECK(bias->scalar_type() == at::kFloat && bias->numel() == n && bias->is_contiguous(),
                         "vq_linear: bias must be contiguous float32 [", n, "]");
  at::Tensor xf = x.to(at::kFloat);
  if (smooth) xf = xf / *smooth;
  if (M >= prefill_from) {
    at::Tensor wt = at::empty({K, n}, at::kBFloat16);
    vq_dequant_t(codes.data_ptr<uint8_t>(), NS, codebook, per_book, n, K, (uint16_t*)wt.data_ptr<at::BFloat16>());
    at::Tensor y = at::matmul(xf.to(at::kBFloat16), wt);
    if (bias) return (y.to(at::kFloat) + *bias).to(x.scalar_type());
    return y.to(x.scalar_type());
  }
  at::Tensor xp = at::zeros({M, NSp * D}, at::kFloat);
  xp.narrow(1, 0, K).copy_(xf);
  const at::Tensor t = dot_table(xp, codebook, per_book, NSp);
  at::Tensor y = at::empty({M, n}, at::kFloat);
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const float* tp = t.data_ptr<float>();
  const float* bp = bias ? bias->data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(1, NSp * kRows));
  at::parallel_for(0, NB, grain, [&](int64_t begin, int64_t end) {
    for (int64_t m0 = 0; m0 < M; m0 += kTile) {
      const float* tm = tp + m0 * NSp * E;
      float* ym = yp + m0 * n;
      switch (std::min<int64_t>(kTile, M - m0)) {
        case 1: gather_rows<1>(cp, NJ, NB, begin, end, tm, NSp, E, bp, ym, n); break;
        case 2: gather_rows<2>(cp, NJ, NB, begin, end, tm, NSp, E, bp, ym, n); break;
        case 3: gather_rows<3>(cp, NJ, NB, begin, end, tm, NSp, E, bp, ym, n); break;
        default: gather_rows<4>(cp, NJ, NB, begin, end, tm, NSp, E, bp, ym, n); break;
      }
    }
  });
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

}  // namespace lowbit

TORCH_LIBRARY_FRAGMENT(lowbit, m) {
  m.def(
      "vq_linear(Tensor x, Tensor codes, Tensor codebook, int per_book, int n, Tensor? bias, Tensor? smooth, "
      "int prefill_from) -> Tensor");
}

TORCH_LIBRARY_IMPL(lowbit, CPU, m) { m.impl("vq_linear", &lowbit::vq_linear); }
