// Weight-only linear layers on AVX2 + FMA (x86 CPUs without AVX-512: Zen 1-3, Intel before Ice Lake).
//
// y[m, n] = sum_g scale[n, g] * sum_{k in g} x[m, k] * (code[n, k] - zero[n, g])
//         = sum_g scale[n, g] * (sum_{k in g} x[m, k] * code[n, k] - zero[n, g] * xsum[m, g])
// Codes are decoded in registers: the float weight is never materialised for few tokens (decode). Layouts:
//   bits 8: [N, Kp] bytes holding code - 128 as int8, row-major (Kp = K rounded up to 32, zero
//           padded); the zero points come shifted by 128 as well, so value = scale * (byte - zero);
//   bits 4: [N, Kp / 2] uint8 in blocks of 32 inputs: byte j of a block holds input j in its low
//           nibble and input j + 16 in its high nibble (two shifts give 16 codes in order).
// Each group's products are summed in fp32 vectors, scaled by the group's scale into a running
// vector; the zero-point term is one scalar per (token, group). Many tokens (prefill) dequantize
// the weight to fp32 (a large one a slab of rows at a time) and call at::mm. With int16_act, one token
// with 1-4 bit codes (decode) takes the integer path below (int16 activations x codes on vpmaddubsw),
// about 2x the fp32 decoding, and few tokens with 8-bit codes int16 activations x codes on vpmaddwd
// (int8_gemv.h), about 2-3x.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include "int8_gemv.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <cstdint>
#include <vector>

namespace lowbit_avx2 {
namespace {

constexpr int64_t kBlock = 32;  // inputs per code block
constexpr int64_t kTokens = 4;  // tokens sharing one decoded block
// Many tokens: weights up to this many values are dequantized whole (16 MB of fp32) for one at::mm;
// larger ones in slabs of rows, each product copied into its columns of y.
constexpr int64_t kWholeWeight = int64_t(1) << 22;

inline float hsum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}

inline float hsum_max(__m256 v) {
  const __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(t, _mm_shuffle_ps(t, t, 1)));
}

inline __m256 to_float(__m128i bytes8) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes8)); }
inline __m256 to_float_signed(__m128i bytes8) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes8)); }

// Nibble codes that index a table of 16 levels (NF, Log2, binary, ternary): the "bits" of the templates.
constexpr int kTable = 16;

// Levels table[code] of eight codes < 16: two in-register permutes and a blend.
inline __m256 to_level(__m128i bytes8, const float* table) {
  const __m256i idx = _mm256_cvtepu8_epi32(bytes8);
  const __m256 low = _mm256_permutevar8x32_ps(_mm256_loadu_ps(table), idx);
  const __m256 high = _mm256_permutevar8x32_ps(_mm256_loadu_ps(table + 8), idx);
  return _mm256_blendv_ps(low, high, _mm256_castsi256_ps(_mm256_cmpgt_epi32(idx, _mm256_set1_epi32(7))));
}

// The 32 codes of one block as four vectors of 8 floats, in input order (levels for kTable).
template <int Bits>
inline void decode_block(const uint8_t* p, __m256 out[4], const float* table) {
  if constexpr (Bits == 8) {
    const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16));
    out[0] = to_float_signed(a);
    out[1] = to_float_signed(_mm_srli_si128(a, 8));
    out[2] = to_float_signed(b);
    out[3] = to_float_signed(_mm_srli_si128(b, 8));
  } else {
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    const __m128i mask = _mm_set1_epi8(0x0F);
    const __m128i lo = _mm_and_si128(raw, mask);
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
    if constexpr (Bits == kTable) {
      out[0] = to_level(lo, table);
      out[1] = to_level(_mm_srli_si128(lo, 8), table);
      out[2] = to_level(hi, table);
      out[3] = to_level(_mm_srli_si128(hi, 8), table);
    } else {
      out[0] = to_float(lo);
      out[1] = to_float(_mm_srli_si128(lo, 8));
      out[2] = to_float(hi);
      out[3] = to_float(_mm_srli_si128(hi, 8));
    }
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
  const float* table;  // 16 levels (kTable), else unused
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
        decode_block<Bits>(row + b * block_bytes, w, p.table);
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
void gemv(const Params& p) {  // Bits: 8, 4 or kTable
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

// ---- One token, codes of 1-4 bits: int16 activations x nibble codes on vpmaddubsw ----
// The float path decodes every code to fp32 (about 14 instructions per 32 weights); here one 32-byte
// load holds 64 codes (blocks b and b + 1), two masks give them as unsigned bytes and vpmaddubsw
// multiplies them with the activation's bytes: the token is quantized to int16 per segment
// (|q| <= kXMax, so q = 256 hi + lo with signed bytes hi and lo) and the two byte planes are summed
// in int16 lanes (at most 4 steps: 4 x 2 x 2 x 15 x 128 = 30720 < 32767), widened once per segment
// by vpmaddwd (x1 for lo, x256 for hi) and scaled in fp32 by weight scale x activation scale.
// Each 128-bit lane holds one block, so segments of 32 (group 32) are one lane each.
constexpr int kXMax = 32639;
constexpr int64_t kStep = 64;  // inputs per step: two blocks
constexpr int64_t kStepBytes = 128;  // activation bytes per step: lo plane (2 x 32), hi plane (2 x 32)
constexpr int64_t kPrefetch = 4096;  // bytes of codes prefetched ahead (1.2-1.4x from DRAM on a Zen 3)

// The int16 segment for a group size: 0 where the path does not apply (group an odd multiple of 32 above 32).
int64_t int_segment(int64_t group, int64_t G) {
  if (G == 1) return 256;
  if (group == 32) return 32;
  if (group % kStep) return 0;
  for (int64_t s : {256, 192, 128, 64})
    if (group % s == 0) return s;
  return 0;
}

struct IntAct {
  std::vector<int8_t> bytes;  // [steps, 128]
  std::vector<float> scale;  // [S]
  std::vector<int32_t> group_of;  // [S]: the group each segment lies in
  std::vector<float> gsum;  // [G]: per group, the sum of the quantized token (scale x code): the zero-point
                            // term then cancels exactly in the quantized domain (about 4 dB closer to fp32)
};

// Token x [K] as int16 values q [Kp] (zero padded), one scale per segment of `seg` inputs
// (|q| <= kXMax, round half to even), and per group the sum of the quantized values (scale x q).
// A segment holding NaN or Inf gets a NaN scale: its token's outputs are NaN, as in an fp32 matmul.
void quantize_segments(const float* x, int64_t K, int64_t Kp, int64_t seg, int64_t group, int16_t* q, float* ascale,
                       float* gsum) {
  const __m256 sign = _mm256_set1_ps(-0.f), zero = _mm256_setzero_ps();
  for (int64_t si = 0, k0 = 0; k0 < Kp; ++si, k0 += seg) {
    const int64_t k1 = std::min(K, k0 + seg), kend = std::min(Kp, k0 + seg);
    __m256 vmax = zero, bad = zero;
    int64_t k = k0;
    for (; k + 8 <= k1; k += 8) {
      const __m256 v = _mm256_loadu_ps(x + k);
      vmax = _mm256_max_ps(vmax, _mm256_andnot_ps(sign, v));
      bad = _mm256_or_ps(bad, _mm256_cmp_ps(_mm256_mul_ps(v, zero), zero, _CMP_NEQ_UQ));  // NaN or +-Inf
    }
    float amax = 0.f;
    bool finite = !_mm256_movemask_ps(bad);
    for (; k < k1; ++k) {
      finite = finite && std::isfinite(x[k]);
      amax = std::max(amax, std::fabs(x[k]));
    }
    amax = std::max(amax, hsum_max(vmax));
    ascale[si] = finite ? amax / kXMax : std::numeric_limits<float>::quiet_NaN();
    const float inv = finite && amax > 0 ? kXMax / amax : 0.f;
    const __m256 vinv = _mm256_set1_ps(inv);
    __m256i total = _mm256_setzero_si256();
    int32_t tail = 0;
    for (k = k0; k + 16 <= k1; k += 16) {  // cvtps rounds half to even (the default MXCSR mode), as nearbyint
      const __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k), vinv));
      const __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k + 8), vinv));
      total = _mm256_add_epi32(total, _mm256_add_epi32(a, b));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + k), _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xD8));
    }
    for (; k < k1; ++k) tail += q[k] = static_cast<int16_t>(std::nearbyint(x[k] * inv));
    std::fill(q + std::max(k, k1), q + kend, int16_t(0));
    const __m128i t4 = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
    const __m128i t2 = _mm_add_epi32(t4, _mm_unpackhi_epi64(t4, t4));
    tail += _mm_cvtsi128_si32(_mm_add_epi32(t2, _mm_shuffle_epi32(t2, 1)));
    gsum[k0 / group] += ascale[si] * static_cast<float>(tail);
  }
}

// Token x [K] as step-ordered int16 byte planes (see int_step) with one scale per segment.
IntAct quantize_token(const float* x, int64_t K, int64_t Kp, int64_t seg, int64_t group, int64_t G) {
  const int64_t S = (Kp + seg - 1) / seg, steps = (Kp + kStep - 1) / kStep;
  IntAct a{std::vector<int8_t>(steps * kStepBytes, 0), std::vector<float>(S), std::vector<int32_t>(S),
           std::vector<float>(G, 0.f)};
  std::vector<int16_t> q(steps * kStep, 0);
  quantize_segments(x, K, Kp, seg, group, q.data(), a.scale.data(), a.gsum.data());
  for (int64_t si = 0; si < S; ++si) a.group_of[si] = static_cast<int32_t>(si * seg / group);  // within one group
  const __m128i k128 = _mm_set1_epi16(128);
  for (int64_t st = 0; st < steps; ++st) {
    int8_t* out = a.bytes.data() + st * kStepBytes;
    for (int half = 0; half < 2; ++half)  // codes j (low nibbles), then j + 16 (high nibbles)
      for (int lane = 0; lane < 2; ++lane) {  // block 2 st + lane: q = 256 hi + lo, hi = floor((q + 128) / 256)
        const int16_t* v = q.data() + st * kStep + lane * kBlock + half * 16;
        const __m128i v0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(v));
        const __m128i v1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(v + 8));
        const __m128i h0 = _mm_srai_epi16(_mm_add_epi16(v0, k128), 8), h1 = _mm_srai_epi16(_mm_add_epi16(v1, k128), 8);
        const __m128i l0 = _mm_sub_epi16(v0, _mm_slli_epi16(h0, 8)), l1 = _mm_sub_epi16(v1, _mm_slli_epi16(h1, 8));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + half * 32 + lane * 16), _mm_packs_epi16(l0, l1));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 64 + half * 32 + lane * 16), _mm_packs_epi16(h0, h1));
      }
  }
  return a;
}

struct IntParams {
  const int8_t* act;
  const float* ascale;  // [S]
  const int32_t* seg_group;  // [S]: the group each segment lies in
  const float* xsum;  // [G]: sums of the quantized token per group, for the zero points
  const uint8_t* codes;
  const float* scale;
  const float* zero;
  float* y;
  int64_t N, Kp, G, group, seg, row_bytes;
};

// 64 codes of one row (blocks 2 st and 2 st + 1) times the token's step bytes, into the int16 sums.
template <bool Half>
inline void int_step(const uint8_t* c, const int8_t* a, __m256i& lo, __m256i& hi) {
  const __m256i mask = _mm256_set1_epi8(0x0F);
  const __m256i raw = Half ? _mm256_set_m128i(_mm_setzero_si128(), _mm_loadu_si128(reinterpret_cast<const __m128i*>(c)))
                           : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c));
  const __m256i wl = _mm256_and_si256(raw, mask);
  const __m256i wh = _mm256_and_si256(_mm256_srli_epi16(raw, 4), mask);
  const auto act = [a](int i) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + 32 * i)); };
  lo = _mm256_add_epi16(lo, _mm256_add_epi16(_mm256_maddubs_epi16(wl, act(0)), _mm256_maddubs_epi16(wh, act(1))));
  hi = _mm256_add_epi16(hi, _mm256_add_epi16(_mm256_maddubs_epi16(wl, act(2)), _mm256_maddubs_epi16(wh, act(3))));
}

// Row n of the one-token product; PerSeg steps per segment (0: segments of 32, two per step).
template <int PerSeg>
void int_row(const IntParams& p, int64_t n) {
  const __m256i ones = _mm256_set1_epi16(1), k256 = _mm256_set1_epi16(256);
  const int64_t blocks = p.Kp / kBlock, full = blocks / 2, steps = (blocks + 1) / 2, per = PerSeg ? PerSeg : 1;
  const uint8_t* row = p.codes + n * p.row_bytes;
  const float* sc = p.scale + n * p.G;
  __m256 total = _mm256_setzero_ps();
  for (int64_t s0 = 0, si = 0; s0 < steps; s0 += per, ++si) {
    const int64_t s1 = std::min(steps, s0 + per), e = std::min(s1, full);
    __m256i lo = _mm256_setzero_si256(), hi = _mm256_setzero_si256();
    if (e - s0 == per) {
#pragma GCC unroll 4
      for (int64_t i = 0; i < per; ++i) {
        _mm_prefetch(reinterpret_cast<const char*>(row + (s0 + i) * 32 + kPrefetch), _MM_HINT_T0);
        int_step<false>(row + (s0 + i) * 32, p.act + (s0 + i) * kStepBytes, lo, hi);
      }
    } else {
      for (int64_t st = s0; st < e; ++st) int_step<false>(row + st * 32, p.act + st * kStepBytes, lo, hi);
    }
    if (e < s1) int_step<true>(row + e * 32, p.act + e * kStepBytes, lo, hi);  // the last, odd block
    const __m256i sum = _mm256_add_epi32(_mm256_madd_epi16(lo, ones), _mm256_madd_epi16(hi, k256));
    __m256 coef;
    if constexpr (PerSeg == 0) {  // segment = group = one lane; the second lane may lie past the row (0 there)
      const int64_t g0 = 2 * s0, g1 = g0 + 1;
      const float c1 = g1 < p.G ? sc[g1] * p.ascale[g1] : 0.f;
      coef = _mm256_set_m128(_mm_set1_ps(c1), _mm_set1_ps(sc[g0] * p.ascale[g0]));
    } else {
      coef = _mm256_set1_ps(sc[p.seg_group[si]] * p.ascale[si]);
    }
    total = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), coef, total);
  }
  // zero points: minus sum_g scale * zero * (sum of the quantized token over g), eight groups at a time
  const float* zr = p.zero + n * p.G;
  int64_t g = 0;
  for (; g + 8 <= p.G; g += 8)
    total = _mm256_fnmadd_ps(_mm256_mul_ps(_mm256_loadu_ps(sc + g), _mm256_loadu_ps(zr + g)),
                             _mm256_loadu_ps(p.xsum + g), total);
  float corr = 0.f;
  for (; g < p.G; ++g) corr += sc[g] * zr[g] * p.xsum[g];
  p.y[n] = hsum(total) - corr;
}

template <int PerSeg>
void int_rows(const IntParams& p, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) int_row<PerSeg>(p, n);
}

void int_gemv(const IntParams& p) {
  const int64_t grain = std::max<int64_t>(2, (int64_t(1) << 16) / std::max<int64_t>(p.Kp, 1));
  at::parallel_for(0, p.N, grain, [&](int64_t n0, int64_t n1) {
    switch (p.seg) {
      case kBlock: int_rows<0>(p, n0, n1); break;
      case 64: int_rows<1>(p, n0, n1); break;
      case 128: int_rows<2>(p, n0, n1); break;
      case 192: int_rows<3>(p, n0, n1); break;
      default: int_rows<4>(p, n0, n1); break;
    }
  });
}

// ---- Few tokens, 8-bit codes: int16 tokens x codes widened to int16 on vpmaddwd (int8_gemv.h) ----
// Two sign-extending loads and two vpmaddwd per 32 codes and token, against about 14 instructions
// for the fp32 decoding: the row streams at memory speed.
constexpr int64_t kPrefetch8 = 2048;  // bytes of codes prefetched ahead

template <int T>
void int8_rows(const IntTokens& a, const ByteWeight& w, float* y, int64_t t0, int64_t n0, int64_t n1) {
  constexpr int C = T == 1 ? 2 : 1;  // accumulators per token
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* row = w.codes + n * w.Kp;
    const float* sc = w.scale + n * w.G;
    __m256 total[T];
    for (int t = 0; t < T; ++t) total[t] = _mm256_setzero_ps();
    for (int64_t si = 0, k0 = 0; k0 < w.Kp; ++si, k0 += a.seg) {
      const int64_t k1 = std::min(w.Kp, k0 + a.seg);
      __m256i acc[T][C];
      for (int t = 0; t < T; ++t)
        for (int c = 0; c < C; ++c) acc[t][c] = _mm256_setzero_si256();
      for (int64_t k = k0; k < k1; k += kBlock) {
        _mm_prefetch(reinterpret_cast<const char*>(row + k + kPrefetch8), _MM_HINT_T0);
        const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k)));
        const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k + 16)));
        for (int t = 0; t < T; ++t) {
          const int16_t* at = a.act + (t0 + t) * w.Kp + k;
          const __m256i p0 = _mm256_madd_epi16(w0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(at)));
          const __m256i p1 = _mm256_madd_epi16(w1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(at + 16)));
          if constexpr (C == 2) {
            acc[t][0] = _mm256_add_epi32(acc[t][0], p0);
            acc[t][1] = _mm256_add_epi32(acc[t][1], p1);
          } else {
            acc[t][0] = _mm256_add_epi32(acc[t][0], _mm256_add_epi32(p0, p1));
          }
        }
      }
      const float s = sc[k0 / w.group];
      for (int t = 0; t < T; ++t) {
        const __m256i sum = C == 2 ? _mm256_add_epi32(acc[t][0], acc[t][C - 1]) : acc[t][0];
        total[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_set1_ps(s * a.ascale[(t0 + t) * a.S + si]), total[t]);
      }
    }
    const float* zr = w.zero + n * w.G;
    for (int t = 0; t < T; ++t) {  // zero points: minus sum_g scale * zero * gsum, eight groups at a time
      const float* gs = a.gsum + (t0 + t) * w.G;
      int64_t g = 0;
      for (; g + 8 <= w.G; g += 8)
        total[t] = _mm256_fnmadd_ps(_mm256_mul_ps(_mm256_loadu_ps(sc + g), _mm256_loadu_ps(zr + g)),
                                    _mm256_loadu_ps(gs + g), total[t]);
      float corr = 0.f;
      for (; g < w.G; ++g) corr += sc[g] * zr[g] * gs[g];
      y[(t0 + t) * w.N + n] = hsum(total[t]) - corr;
    }
  }
}

}  // namespace

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

int64_t segment_length(int64_t group, int64_t G, int64_t Kp, int64_t limit) {
  if (G == 1) return std::min(Kp, limit / kBlock * kBlock);
  for (int64_t s = std::min(group, limit) / kBlock * kBlock; s > kBlock; s -= kBlock)
    if (group % s == 0) return s;
  return kBlock;
}

void int8_codes_gemm(const IntTokens& a, const ByteWeight& w, float* y) {
  const int64_t grain = std::max<int64_t>(2, (int64_t(1) << 15) / std::max<int64_t>(w.Kp * std::min<int64_t>(a.T, 4), 1));
  at::parallel_for(0, w.N, grain, [&](int64_t n0, int64_t n1) {
    int64_t t = 0;
    for (; t + 4 <= a.T; t += 4) int8_rows<4>(a, w, y, t, n0, n1);
    switch (a.T - t) {
      case 3: int8_rows<3>(a, w, y, t, n0, n1); break;
      case 2: int8_rows<2>(a, w, y, t, n0, n1); break;
      case 1: int8_rows<1>(a, w, y, t, n0, n1); break;
      default: break;
    }
  });
}

namespace {

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
      decode_block<Bits>(row + b * block_bytes, w, p.table);
      alignas(32) float tmp[kBlock];
      for (int q = 0; q < 4; ++q) _mm256_store_ps(tmp + 8 * q, _mm256_mul_ps(_mm256_sub_ps(w[q], z), s));
      std::copy(tmp, tmp + std::min(kBlock, K - b * kBlock), dst + b * kBlock);
    }
  }
}

template <int Bits>
at::Tensor dequantize_t(const Params& p, int64_t K, int64_t n0, int64_t n1, at::Tensor w) {
  if (!w.defined()) w = at::empty({n1 - n0, K}, at::kFloat);
  float* out = w.data_ptr<float>();
  at::parallel_for(n0, n1, 16, [&](int64_t a, int64_t b) { dequantize_rows<Bits>(p, K, a, b, out + (a - n0) * K); });
  return w;
}


Params make_params(const at::Tensor& xp, const at::Tensor& xsum, const at::Tensor& codes, const at::Tensor& scale,
                   const at::Tensor& zero, at::Tensor& y, int64_t bits, int64_t group, int64_t n, int64_t kp) {
  return Params{xp.data_ptr<float>(),  xsum.data_ptr<float>(), codes.data_ptr<uint8_t>(),
                scale.data_ptr<float>(), zero.data_ptr<float>(), y.data_ptr<float>(),
                xp.size(0),              n,                      kp,
                scale.numel() / n,       group,                  bits == 8 ? kp : kp / 2,
                nullptr};
}

const float* table_of(const c10::optional<at::Tensor>& table, int64_t bits) {
  if (!table.has_value()) return nullptr;
  TORCH_CHECK(bits == 4 && table->scalar_type() == at::kFloat && table->is_contiguous() && table->numel() == 16,
              "lowbit_avx2: a level table must be 16 contiguous float32 values with 4-bit codes");
  return table->data_ptr<float>();
}

// The fp32 weight rows [n0, n1) into `out` ([n1 - n0, K]; a new tensor when undefined).
at::Tensor dequantize_any(const Params& p, int64_t bits, int64_t K, int64_t n0, int64_t n1, at::Tensor out = {}) {
  if (bits == 8) return dequantize_t<8>(p, K, n0, n1, out);
  return p.table ? dequantize_t<kTable>(p, K, n0, n1, out) : dequantize_t<4>(p, K, n0, n1, out);
}

// A float buffer of `rows` x `cols` reused by the calling thread: a fresh one per call cost page faults
// on every prefill (a dequantized SmolLM2 MLP weight is 3.5 MB). Grows to the largest request (at most
// kWholeWeight values, 16 MB, per thread that runs prefills).
at::Tensor scratch(int64_t rows, int64_t cols) {
  thread_local at::Tensor buffer;
  if (!buffer.defined() || buffer.numel() < rows * cols) buffer = at::empty({rows * cols}, at::kFloat);
  return buffer.narrow(0, 0, rows * cols).view({rows, cols});
}

}  // namespace

// y = x W^T for x float32 [M, K]; rows from `dequant_from` tokens on go through fp32 slabs and at::mm.
at::Tensor wo_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& zero,
                     int64_t bits, int64_t group, int64_t n, int64_t dequant_from, bool int16_act,
                     const c10::optional<at::Tensor>& table) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "lowbit_avx2: x must be float32 [M, K]");
  const int64_t M = x.size(0), K = x.size(1), Kp = (K + kBlock - 1) / kBlock * kBlock;
  check_inputs(codes, scale, zero, bits, group, n, K);
  const float* levels = table_of(table, bits);
  at::Tensor y = at::empty({M, n}, at::kFloat);
  if (M == 0 || n == 0) return y.zero_();
  at::Tensor xc = x.contiguous();
  if (M >= dequant_from) {
    Params p = make_params(xc, xc, codes, scale, zero, y, bits, group, n, Kp);
    p.table = levels;
    if (n * K <= kWholeWeight) {  // one product straight into y: no copy of column slabs
      at::NoGradGuard no_grad;  // the op has no gradient; an input that requires one must not stop mm_out
      at::mm_out(y, xc, dequantize_any(p, bits, K, 0, n, scratch(n, K)).t());
      return y;
    }
    const int64_t slab = std::max<int64_t>(16, (int64_t(1) << 18) / std::max<int64_t>(K, 1)) / 16 * 16;
    for (int64_t n0 = 0; n0 < n; n0 += slab) {
      const int64_t n1 = std::min(n, n0 + slab);
      at::Tensor w = dequantize_any(p, bits, K, n0, n1, scratch(n1 - n0, K));
      y.narrow(1, n0, n1 - n0).copy_(at::mm(xc, w.t()));
    }
    return y;
  }
  const int64_t G = scale.numel() / n;
  const float* src = xc.data_ptr<float>();
  const int64_t seg = int_segment(group, G);
  if (M == 1 && bits == 4 && !levels && int16_act && seg > 0) {  // sums its own quantized token per group
    const IntAct a = quantize_token(src, K, Kp, seg, group, G);
    IntParams ip{a.bytes.data(), a.scale.data(), a.group_of.data(), a.gsum.data(), codes.data_ptr<uint8_t>(), scale.data_ptr<float>(),
                 zero.data_ptr<float>(), y.data_ptr<float>(), n, Kp, G, group, seg, Kp / 2};
    int_gemv(ip);
    return y;
  }
  if (bits == 8 && int16_act) {  // few tokens x 8-bit codes: int16 activations on vpmaddwd
    const int64_t seg8 = segment_length(group, G, Kp, 256), S = (Kp + seg8 - 1) / seg8;
    std::vector<int16_t> q(M * Kp);
    std::vector<float> ascale(M * S), gsum(M * G, 0.f);
    for (int64_t m = 0; m < M; ++m)
      quantize_segments(src + m * K, K, Kp, seg8, group, q.data() + m * Kp, ascale.data() + m * S, gsum.data() + m * G);
    const IntTokens a{q.data(), ascale.data(), gsum.data(), M, S, seg8};
    const ByteWeight w{reinterpret_cast<const int8_t*>(codes.data_ptr<uint8_t>()), scale.data_ptr<float>(),
                       zero.data_ptr<float>(), n, Kp, G, group};
    int8_codes_gemm(a, w, y.data_ptr<float>());
    return y;
  }
  at::Tensor xp = at::zeros({M, Kp}, at::kFloat);
  float* dst = xp.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m) std::copy(src + m * K, src + (m + 1) * K, dst + m * Kp);  // zero padded
  at::Tensor xsum = at::empty({M, G}, at::kFloat);
  float* sums = xsum.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m) {  // per-group sums of each token, for the zero points
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
  p.table = levels;
  if (bits == 8) gemv<8>(p);
  else if (levels) gemv<kTable>(p);
  else gemv<4>(p);
  return y;
}

// The fp32 weight [n, k] the codes stand for (tests, and any caller that wants the float weight).
at::Tensor wo_dequantize(const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& zero, int64_t bits,
                         int64_t group, int64_t n, int64_t k, const c10::optional<at::Tensor>& table) {
  check_inputs(codes, scale, zero, bits, group, n, k);
  const int64_t Kp = (k + kBlock - 1) / kBlock * kBlock;
  at::Tensor dummy = at::empty({1, 1}, at::kFloat), y = at::empty({1, 1}, at::kFloat);
  Params p = make_params(dummy, dummy, codes, scale, zero, y, bits, group, n, Kp);
  p.G = scale.numel() / n;
  p.table = table_of(table, bits);
  return dequantize_any(p, bits, k, 0, n);
}

}  // namespace lowbit_avx2

TORCH_LIBRARY(lowbit_avx2, m) {
  m.def("wo_linear(Tensor x, Tensor codes, Tensor scale, Tensor zero, int bits, int group, int n, int dequant_from, bool int16_act, Tensor? table) -> Tensor");
  m.def("wo_dequantize(Tensor codes, Tensor scale, Tensor zero, int bits, int group, int n, int k, Tensor? table) -> Tensor");
}
TORCH_LIBRARY_IMPL(lowbit_avx2, CPU, m) {
  m.impl("wo_linear", &lowbit_avx2::wo_linear);
  m.impl("wo_dequantize", &lowbit_avx2::wo_dequantize);
}
