// Weight-only linear layers on AVX-512 VNNI: float activations x packed low-bit weights.
//
// Activations are quantized once per call to int16 per token (scale = absmax / 32767) and
// multiplied against weights widened to int16 pairs with vpdpwssd. Weights are prepacked
// (python: kernels/weightonly_pack.py) in blocks of 16 output rows: a block holds, in 32-bit
// lane r of each 64-byte vector, the codes of row r for `span` consecutive inputs, arranged so
// that "pair" s of the block is a vector of (code[k0+2s], code[k0+2s+1]) int16 pairs per row:
//   bits B in {1, 2, 4}: 16-bit word h (0 = lo, 1 = hi) of lane r keeps code[k0+2s+h] at
//                        bits [B*s, B*s+B)  (span = 32/B inputs per 64-byte block);
//   bits 3: 192 bytes for 32 inputs: the low two bits as two 2-bit vectors, the high bit as
//           one 1-bit vector (bit planes: 3 bits read per weight);
//   bits 8: lane bytes are (k0, k0+2, k0+1, k0+3), signed (span 4).
// Level-table formats map a code to an int16 level with vpermw; integer formats keep the
// code and subtract the zero point per group: sum x*(q-z) = sum x*q - z * sum x, where the
// per-group sums of the int16 activations are computed once per call.
// 4-bit integer codes have their own layout and loop (gemv_nibble_block): bytes holding two codes
// each, multiplied four inputs at a time by vpdpbusd against int16 activations (|q| <= 32639)
// split into two signed bytes (q = 256 hi + lo): per 128 weights 3 decode ops and 4 vpdpbusd
// instead of 7 and 8 vpdpwssd. 4096 x 4096 w4-g128 GEMV, 2 threads, Xeon with AMX under KVM, old
// and new builds alternating: L3-resident 0.24-0.26 -> 0.22-0.23 ms, from DRAM 0.44-0.46 -> 0.39-0.42 ms.
// Activations get one int16 scale per token and segment of `seg` inputs (a divisor of the
// weight group, short enough that the int32 partial sums cannot overflow); partial sums are
// scaled into fp32 per segment. Large M dequantizes to bf16 and calls at::matmul.
#include <limits>
#include <type_traits>
#include <utility>

#include "common.h"

namespace lowbit {
namespace {

constexpr int kRows = 16;  // output rows per block: one per 32-bit lane
constexpr int kTile = 8;  // tokens sharing one decoded weight block
constexpr int kXMax = 32767;  // int16 activation range
constexpr int kXMaxBytes = 32639;  // nibble kernel: q = 256 hi + lo with hi and lo signed bytes
constexpr int64_t kTaskBytes = 96 << 10;  // least code bytes per thread
// GEMV prefetch distance into L2. Streaming 4096 x 4096 weights from DRAM (rotated through 3x the
// L3; Xeon with AMX, 2 threads): w4-g128 0.49 -> 0.37 ms, w8 0.69 -> 0.60 ms; into L1 instead,
// w8 got slower (0.84 ms).
constexpr int64_t kPrefetchBytes = 8192;

struct QuantAct {
  at::Tensor q;  // int16 [M, Kp], zero padded
  at::Tensor scale;  // float [M, S]: x ~= q * scale within each segment of `seg` inputs
  at::Tensor gsum;  // int32 [M, S]: per-segment sums of q (for zero points)
  at::Tensor lo, hi;  // int8 [M, Kp], nibble kernel only: q = 256 * hi + lo
};

inline __mmask16 tail_mask(int64_t left) { return left >= 16 ? 0xFFFF : (__mmask16)((1u << left) - 1); }

inline __m512 load_x(const float* row, const float* smooth, int64_t k, __mmask16 mk) {
  const __m512 v = _mm512_maskz_loadu_ps(mk, row + k);
  return smooth ? _mm512_div_ps(v, _mm512_mask_loadu_ps(_mm512_set1_ps(1.f), mk, smooth + k)) : v;
}

// x (float [M, K]) / smooth -> int16 with one scale per token and segment of `seg` inputs
// (absmax / xmax): a local scale keeps outlier channels from costing the rest their precision.
// `split` (nibble kernel): xmax 32639, and the codes also as two signed bytes each (lo: the low
// byte read as signed, hi: (q - lo) / 256, which stays within [-127, 127]).
QuantAct quantize_act(const at::Tensor& x, const float* smooth, int64_t Kp, int64_t seg, bool split = false) {
  const int xmax = split ? kXMaxBytes : kXMax;
  const int64_t M = x.size(0), K = x.size(1), S = (Kp + seg - 1) / seg;
  QuantAct a{at::empty({M, Kp}, at::kShort), at::empty({M, S}, at::kFloat), at::empty({M, S}, at::kInt)};
  const float* xp = x.data_ptr<float>();
  int16_t* qp = a.q.data_ptr<int16_t>();
  float* sp = a.scale.data_ptr<float>();
  int32_t* gp = a.gsum.data_ptr<int32_t>();
  for (int64_t m = 0; m < M; ++m) {
    const float* row = xp + m * K;
    std::fill(qp + m * Kp + K, qp + (m + 1) * Kp, int16_t(0));  // padding: contributes nothing
    for (int64_t si = K / seg; si < S; ++si) sp[m * S + si] = 0.f, gp[m * S + si] = 0;  // segments past K
    for (int64_t si = 0; si < S && si * seg < K; ++si) {
      const int64_t k0 = si * seg, k1 = std::min(K, k0 + seg);
      __m512 vmax = _mm512_setzero_ps();
      __mmask16 nan = 0;
      for (int64_t k = k0; k < k1; k += 16) {
        const __m512 v = load_x(row, smooth, k, tail_mask(k1 - k));
        vmax = _mm512_max_ps(vmax, _mm512_abs_ps(v));
        nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
      }
      const float amax = _mm512_reduce_max_ps(vmax);
      const bool finite = !nan && std::isfinite(amax);  // NaN/Inf give NaN rows, as a float matmul would
      sp[m * S + si] = finite ? amax / xmax : std::numeric_limits<float>::quiet_NaN();
      const __m512 inv = _mm512_set1_ps(finite && amax > 0 ? xmax / amax : 0.f);
      __m512i sum = _mm512_setzero_si512();
      for (int64_t k = k0; k < k1; k += 16) {
        const __mmask16 mk = tail_mask(k1 - k);
        const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(load_x(row, smooth, k, mk), inv));
        _mm256_mask_storeu_epi16(qp + m * Kp + k, mk, _mm512_cvtsepi32_epi16(q));
        sum = _mm512_mask_add_epi32(sum, mk, sum, q);
      }
      gp[m * S + si] = _mm512_reduce_add_epi32(sum);
    }
  }
  if (split) {
    a.lo = at::empty({M, Kp}, at::kChar);
    a.hi = at::empty({M, Kp}, at::kChar);
    int8_t* lp = a.lo.data_ptr<int8_t>();
    int8_t* hp = a.hi.data_ptr<int8_t>();
    const int64_t total = M * Kp;
    for (int64_t i = 0; i < total; i += 32) {
      const __mmask32 mk = total - i >= 32 ? 0xFFFFFFFFu : (__mmask32)((1u << (total - i)) - 1);
      const __m512i q = _mm512_maskz_loadu_epi16(mk, qp + i);
      const __m512i low = _mm512_srai_epi16(_mm512_slli_epi16(q, 8), 8);
      _mm256_mask_storeu_epi8(lp + i, mk, _mm512_cvtepi16_epi8(low));
      _mm256_mask_storeu_epi8(hp + i, mk, _mm512_cvtepi16_epi8(_mm512_srai_epi16(_mm512_sub_epi16(q, low), 8)));
    }
  }
  return a;
}

// ---- weight decoding: one 64-byte block -> int16 pair vectors ------------------------------
template <int B>
struct Bits {
  static constexpr int kVecs = B == 3 ? 3 : 1;  // 64-byte vectors per block
  static constexpr int kBytes = 64 * kVecs;
  static constexpr int kPairs = B == 8 ? 2 : (B == 3 ? 16 : 16 / B);
  static constexpr int kSpan = 2 * kPairs;  // inputs per block
  template <int S>
  static inline __m512i pair(const __m512i* v) {
    if constexpr (B == 8) {
      return S == 0 ? _mm512_srai_epi16(_mm512_slli_epi16(v[0], 8), 8) : _mm512_srai_epi16(v[0], 8);
    } else if constexpr (B == 3) {  // low two bits | high bit (plane 2, bit S of each word) << 2
      const __m512i lo = Bits<2>::template pair<S % 8>(v + S / 8);
      const __m512i hi = S >= 2 ? _mm512_srli_epi16(v[2], S - 2) : _mm512_slli_epi16(v[2], 2 - S);
      return _mm512_ternarylogic_epi32(lo, hi, _mm512_set1_epi16(4), 0xF8);  // lo | (hi & 4)
    } else if constexpr (B * (S + 1) == 16) {
      return _mm512_srli_epi16(v[0], B * S);
    } else {
      const __m512i mask = _mm512_set1_epi16((1 << B) - 1);
      return S == 0 ? _mm512_and_si512(v[0], mask) : _mm512_and_si512(_mm512_srli_epi16(v[0], B * S), mask);
    }
  }
  static inline void load(const uint8_t* p, __m512i* v) {
    for (int i = 0; i < kVecs; ++i) v[i] = _mm512_loadu_si512(p + 64 * i);
  }
};

// 4-bit integer codes in nibble bytes (weightonly_pack.pack_nibbles): byte j of a row's lane holds
// input j (low nibble) and input 4 + j (high nibble). `pair` widens them to int16 pairs, for the
// dequantizing path; the GEMV reads the bytes directly.
struct Nib {
  static constexpr int kVecs = 1, kBytes = 64, kPairs = 4, kSpan = 8;
  static inline __m512i spread(int first) {  // bytes (first, first + 1) of each lane -> two int16 words
    alignas(64) int8_t idx[64];
    for (int p = 0; p < 64; ++p) {
      const int lane = (p % 16) / 4 * 4, b = p % 4;
      idx[p] = b % 2 ? int8_t(-128) : int8_t(lane + first + b / 2);
    }
    return _mm512_load_si512(idx);
  }
  template <int S>
  static inline __m512i pair(const __m512i* v) {
    static const __m512i shuffle = spread(2 * (S % 2));
    const __m512i m4 = _mm512_set1_epi8(15);
    const __m512i bytes = S < 2 ? _mm512_and_si512(v[0], m4) : _mm512_and_si512(_mm512_srli_epi16(v[0], 4), m4);
    return _mm512_shuffle_epi8(bytes, shuffle);
  }
  static inline void load(const uint8_t* p, __m512i* v) { v[0] = _mm512_loadu_si512(p); }
};

struct Packed {
  const uint8_t* codes;  // [NB, KB, block bytes]
  int64_t KB;  // blocks per 16 rows
  const void* scales;  // [NB, G, 16] fp16 or fp32
  bool half_scales;
  const void* zeros;  // [NB, G, 16] uint8 (bits < 8) or int8 (bits 8); null: zconst
  bool signed_zeros;
  int32_t zconst;  // zero point when zeros is null (0: none)
  __m512i table;  // int16 levels, when lut
  int64_t G, gk, seg;  // groups, inputs per group, inputs per activation scale (divides gk)
};

inline __m512 load_scale(const Packed& w, int64_t idx) {
  if (w.half_scales)
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)((const uint16_t*)w.scales + idx)));
  return _mm512_loadu_ps((const float*)w.scales + idx);
}

inline __m512i load_zero(const Packed& w, int64_t idx) {
  if (!w.zeros) return _mm512_set1_epi32(w.zconst);
  const __m128i z = _mm_loadu_si128((const __m128i*)((const uint8_t*)w.zeros + idx));
  return w.signed_zeros ? _mm512_cvtepi8_epi32(z) : _mm512_cvtepu8_epi32(z);
}

// One segment of MT tokens into the fp32 sums: int32 dot products minus zero point * the
// segment's activation sum, times the weight scales and the segment's activation scale.
template <int MT>
inline void add_segment(__m512* facc, const __m512i* acc, __m512 sv, __m512i zv, bool has_zero, const int32_t* gsum,
                        const float* xs, int64_t S, int64_t si) {
  for (int m = 0; m < MT; ++m) {
    __m512i a = acc[m];
    if (has_zero) a = _mm512_sub_epi32(a, _mm512_mullo_epi32(zv, _mm512_set1_epi32(gsum[m * S + si])));
    facc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a), _mm512_mul_ps(sv, _mm512_set1_ps(xs[m * S + si])), facc[m]);
  }
}

// y[m, n0:n0+16] = facc[m] * out_mul + bias for row block nb (rows past N masked off).
template <int MT>
inline void store_rows(const __m512* facc, int64_t nb, float out_mul, const float* bias, float* y, int64_t N) {
  const int64_t n0 = nb * kRows;
  const __mmask16 mask = tail_mask(N - n0);
  const __m512 bv = bias ? _mm512_maskz_loadu_ps(mask, bias + n0) : _mm512_setzero_ps();
  for (int m = 0; m < MT; ++m)
    _mm512_mask_storeu_ps(y + m * N + n0, mask, _mm512_fmadd_ps(facc[m], _mm512_set1_ps(out_mul), bv));
}

// Row blocks in parallel, tokens in tiles of up to kTile: tile.operator()<T>(nb, m0) for a tile of T
// tokens from m0. Tasks hold at least kTaskBytes of codes, so waking a second thread pays for itself.
template <typename Tile>
void for_tiles(int64_t NB, int64_t M, int64_t block_bytes, const Tile& tile) {
  const int64_t grain = std::max<int64_t>(1, kTaskBytes / std::max<int64_t>(1, block_bytes));
  at::parallel_for(0, NB, grain, [&](int64_t begin, int64_t end) {
    for (int64_t nb = begin; nb < end; ++nb) {
      for (int64_t m0 = 0; m0 < M; m0 += kTile) {
        switch (std::min<int64_t>(kTile, M - m0)) {
#define LOWBIT_TILE(T)                     \
  case T:                                  \
    tile.template operator()<T>(nb, m0); \
    break;
          LOWBIT_TILE(1) LOWBIT_TILE(2) LOWBIT_TILE(3) LOWBIT_TILE(4)
          LOWBIT_TILE(5) LOWBIT_TILE(6) LOWBIT_TILE(7) LOWBIT_TILE(8)
#undef LOWBIT_TILE
        }
      }
    }
  });
}

// y[m, n0:n0+16] for MT tokens and row block nb. Per segment of w.seg inputs (within one
// weight group): int32 dot products, minus zero point * activation sum, times the weight
// scales and the segment's activation scale, into fp32.
template <int B, bool LUT, int MT>
void gemv_block(const Packed& w, int64_t nb, const int16_t* xq, int64_t Kp, const int32_t* gsum, const float* xs,
                int64_t S, float out_mul, const float* bias, float* y, int64_t N) {
  using D = Bits<B>;
  constexpr int span = D::kSpan;
  // Independent int32 accumulators per token hide vpdpwssd latency when few tokens share a
  // block; blocks with fewer pairs than accumulators are unrolled U at a time.
  constexpr int NA = MT >= 4 ? 1 : (MT >= 2 ? 2 : 4);
  constexpr int U = D::kPairs >= NA ? 1 : NA / D::kPairs;
  __m512i iacc[MT][NA];
  __m512 facc[MT];
  for (int m = 0; m < MT; ++m) facc[m] = _mm512_setzero_ps();
  const uint8_t* cp = w.codes + nb * w.KB * D::kBytes;
  const bool has_zero = w.zeros || w.zconst;
  const int64_t seg_kb = w.seg / span, group_kb = w.gk / span;
  // Multiply-accumulate block kb into the accumulators starting at pair index `first`.
  auto block = [&]<int First>(int64_t kb) {
    __m512i v[D::kVecs];
    if constexpr (MT <= 4) {
      for (int i = 0; i < D::kVecs; ++i)
        _mm_prefetch(reinterpret_cast<const char*>(cp + kb * D::kBytes) + 64 * i + kPrefetchBytes, _MM_HINT_T1);
    }
    D::load(cp + kb * D::kBytes, v);
    const int16_t* xk = xq + kb * span;
    [&]<int... P>(std::integer_sequence<int, P...>) {
      (
          [&] {
            __m512i p = D::template pair<P>(v);
            if constexpr (LUT) p = _mm512_permutexvar_epi16(p, w.table);
            constexpr int a = (First + P) % NA;
            for (int m = 0; m < MT; ++m)
              iacc[m][a] = _mm512_dpwssd_epi32(iacc[m][a], p, _mm512_set1_epi32(*(const int32_t*)(xk + m * Kp + 2 * P)));
          }(),
          ...);
    }(std::make_integer_sequence<int, D::kPairs>{});
  };
  for (int64_t g = 0; g < w.G; ++g) {
    const int64_t kb0 = g * group_kb, kb1 = std::min(w.KB, kb0 + group_kb);
    const int64_t pidx = (nb * w.G + g) * kRows;
    const __m512 sv = load_scale(w, pidx);
    const __m512i zv = load_zero(w, pidx);
    for (int64_t c0 = kb0; c0 < kb1; c0 += seg_kb) {
      const int64_t c1 = std::min(kb1, c0 + seg_kb), si = c0 / seg_kb;
      for (int m = 0; m < MT; ++m)
        for (int a = 0; a < NA; ++a) iacc[m][a] = _mm512_setzero_si512();
      int64_t kb = c0;
      for (; kb + U <= c1; kb += U)
        [&]<int... I>(std::integer_sequence<int, I...>) {
          (block.template operator()<I * D::kPairs>(kb + I), ...);
        }(std::make_integer_sequence<int, U>{});
      for (; kb < c1; ++kb) block.template operator()<0>(kb);
      __m512i acc[MT];
      for (int m = 0; m < MT; ++m) {
        acc[m] = iacc[m][0];
        for (int a = 1; a < NA; ++a) acc[m] = _mm512_add_epi32(acc[m], iacc[m][a]);
      }
      add_segment<MT>(facc, acc, sv, zv, has_zero, gsum, xs, S, si);
    }
  }
  store_rows<MT>(facc, nb, out_mul, bias, y, N);
}

template <int B, bool LUT>
void gemv(const Packed& w, const QuantAct& a, float out_mul, const float* bias, float* y, int64_t N) {
  const int64_t M = a.q.size(0), Kp = a.q.size(1), S = a.scale.size(1), NB = (N + kRows - 1) / kRows;
  const int16_t* xq = a.q.data_ptr<int16_t>();
  const int32_t* gs = a.gsum.data_ptr<int32_t>();
  const float* xs = a.scale.data_ptr<float>();
  for_tiles(NB, M, w.KB * Bits<B>::kBytes, [&]<int T>(int64_t nb, int64_t m0) {
    gemv_block<B, LUT, T>(w, nb, xq + m0 * Kp, Kp, gs + m0 * S, xs + m0 * S, S, out_mul, bias, y + m0 * N, N);
  });
}

// One token's dot products over the nibble blocks [c0, c1) of a row block: 256 (hi . codes) +
// (lo . codes) per row, from four independent vpdpbusd chains. A function of its own, not inlined:
// inside the tile loop GCC copied the accumulators between registers on every block.
__attribute__((noinline)) __m512i nibble_segment(const uint8_t* cp, const int32_t* l, const int32_t* h, int64_t c0,
                                                 int64_t c1) {
  const __m512i m4 = _mm512_set1_epi8(15);
  __m512i l0 = _mm512_setzero_si512(), l1 = l0, h0 = l0, h1 = l0;
  for (int64_t kb = c0; kb < c1; ++kb) {
    const uint8_t* bp = cp + kb * 64;
    _mm_prefetch(reinterpret_cast<const char*>(bp) + kPrefetchBytes, _MM_HINT_T1);
    const __m512i v = _mm512_loadu_si512(bp);
    const __m512i w0 = _mm512_and_si512(v, m4), w1 = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
    l0 = _mm512_dpbusd_epi32(l0, w0, _mm512_set1_epi32(l[2 * kb]));
    h0 = _mm512_dpbusd_epi32(h0, w0, _mm512_set1_epi32(h[2 * kb]));
    l1 = _mm512_dpbusd_epi32(l1, w1, _mm512_set1_epi32(l[2 * kb + 1]));
    h1 = _mm512_dpbusd_epi32(h1, w1, _mm512_set1_epi32(h[2 * kb + 1]));
  }
  return _mm512_add_epi32(_mm512_slli_epi32(_mm512_add_epi32(h0, h1), 8), _mm512_add_epi32(l0, l1));
}

// y[m, n0:n0+16] for MT tokens and row block nb of nibble-byte codes (see the header): per 64-byte
// block, the low and high nibbles are the unsigned bytes of inputs k0..k0+3 and k0+4..k0+7 of 16
// rows; vpdpbusd multiplies them by four signed activation bytes, the low (lo) and high (hi) bytes
// in separate accumulators, joined per segment as 256 hi + lo.
template <int MT>
void gemv_nibble_block(const Packed& w, int64_t nb, const int8_t* xlo, const int8_t* xhi, int64_t Kp,
                       const int32_t* gsum, const float* xs, int64_t S, float out_mul, const float* bias, float* y,
                       int64_t N) {
  __m512 facc[MT];
  for (int m = 0; m < MT; ++m) facc[m] = _mm512_setzero_ps();
  const uint8_t* cp = w.codes + nb * w.KB * 64;
  const bool has_zero = w.zeros || w.zconst;
  const int64_t seg_kb = w.seg / 8, group_kb = w.gk / 8;
  const __m512i m4 = _mm512_set1_epi8(15);
  for (int64_t g = 0; g < w.G; ++g) {
    const int64_t kb0 = g * group_kb, kb1 = std::min(w.KB, kb0 + group_kb);
    const int64_t pidx = (nb * w.G + g) * kRows;
    const __m512 sv = load_scale(w, pidx);
    const __m512i zv = load_zero(w, pidx);
    for (int64_t c0 = kb0; c0 < kb1; c0 += seg_kb) {
      const int64_t c1 = std::min(kb1, c0 + seg_kb), si = c0 / seg_kb;
      __m512i acc[MT];
      if constexpr (MT == 1) {
        acc[0] = nibble_segment(cp, reinterpret_cast<const int32_t*>(xlo), reinterpret_cast<const int32_t*>(xhi),
                                c0, c1);
      } else {  // several tokens share each decoded block: one lo and one hi chain per token
        __m512i lo[MT], hi[MT];
        for (int m = 0; m < MT; ++m) lo[m] = hi[m] = _mm512_setzero_si512();
        for (int64_t kb = c0; kb < c1; ++kb) {
          const uint8_t* bp = cp + kb * 64;
          if constexpr (MT <= 4) _mm_prefetch(reinterpret_cast<const char*>(bp) + kPrefetchBytes, _MM_HINT_T1);
          const __m512i v = _mm512_loadu_si512(bp);
          const __m512i w0 = _mm512_and_si512(v, m4), w1 = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
          for (int m = 0; m < MT; ++m) {
            const int32_t* l = reinterpret_cast<const int32_t*>(xlo + m * Kp + kb * 8);
            const int32_t* h = reinterpret_cast<const int32_t*>(xhi + m * Kp + kb * 8);
            lo[m] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(lo[m], w0, _mm512_set1_epi32(l[0])), w1,
                                        _mm512_set1_epi32(l[1]));
            hi[m] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(hi[m], w0, _mm512_set1_epi32(h[0])), w1,
                                        _mm512_set1_epi32(h[1]));
          }
        }
        for (int m = 0; m < MT; ++m) acc[m] = _mm512_add_epi32(_mm512_slli_epi32(hi[m], 8), lo[m]);
      }
      add_segment<MT>(facc, acc, sv, zv, has_zero, gsum, xs, S, si);
    }
  }
  store_rows<MT>(facc, nb, out_mul, bias, y, N);
}

void gemv_nibble(const Packed& w, const QuantAct& a, float out_mul, const float* bias, float* y, int64_t N) {
  const int64_t M = a.q.size(0), Kp = a.q.size(1), S = a.scale.size(1), NB = (N + kRows - 1) / kRows;
  const int8_t* lo = a.lo.data_ptr<int8_t>();
  const int8_t* hi = a.hi.data_ptr<int8_t>();
  const int32_t* gs = a.gsum.data_ptr<int32_t>();
  const float* xs = a.scale.data_ptr<float>();
  for_tiles(NB, M, w.KB * 64, [&]<int T>(int64_t nb, int64_t m0) {
    const int64_t o = m0 * Kp;
    gemv_nibble_block<T>(w, nb, lo + o, hi + o, Kp, gs + m0 * S, xs + m0 * S, S, out_mul, bias, y + m0 * N, N);
  });
}

// Dequantize to W^T [K, N] in bf16 (or fp32) for the large-M path.
template <typename D, bool LUT, typename Out>
void dequant_t(const Packed& w, float out_mul, int64_t N, int64_t K, Out* wt) {
  constexpr int span = D::kSpan;
  const int64_t NB = (N + kRows - 1) / kRows, group_kb = w.gk / span;
  at::parallel_for(0, NB, 1, [&](int64_t begin, int64_t end) {
    for (int64_t nb = begin; nb < end; ++nb) {
      const int64_t n0 = nb * kRows;
      const __mmask16 mask = N - n0 >= kRows ? 0xFFFF : (__mmask16)((1u << (N - n0)) - 1);
      const uint8_t* cp = w.codes + nb * w.KB * D::kBytes;
      for (int64_t g = 0; g < w.G; ++g) {
        const int64_t pidx = (nb * w.G + g) * kRows;
        const __m512 sv = _mm512_mul_ps(load_scale(w, pidx), _mm512_set1_ps(out_mul));
        const __m512 zv = _mm512_cvtepi32_ps(load_zero(w, pidx));
        for (int64_t kb = g * group_kb, kb1 = std::min(w.KB, (g + 1) * group_kb); kb < kb1; ++kb) {
          __m512i v[D::kVecs];
          D::load(cp + kb * D::kBytes, v);
          [&]<int... S>(std::integer_sequence<int, S...>) {
            (
                [&] {
                  __m512i p = D::template pair<S>(v);
                  if constexpr (LUT) p = _mm512_permutexvar_epi16(p, w.table);
                  const __m512i halves[2] = {_mm512_srai_epi32(_mm512_slli_epi32(p, 16), 16), _mm512_srai_epi32(p, 16)};
                  for (int h = 0; h < 2; ++h) {
                    const int64_t k = kb * span + 2 * S + h;
                    if (k >= K) continue;
                    const __m512 val = _mm512_mul_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(halves[h]), zv), sv);
                    if constexpr (std::is_same_v<Out, float>) {
                      _mm512_mask_storeu_ps(wt + k * N + n0, mask, val);
                    } else {
                      _mm256_mask_storeu_epi16(wt + k * N + n0, mask, (__m256i)_mm512_cvtneps_pbh(val));
                    }
                  }
                }(),
                ...);
          }(std::make_integer_sequence<int, D::kPairs>{});
        }
      }
    }
  });
}

template <template <int, bool> class Fn, typename... Args>
void dispatch_bits(int64_t bits, bool lut, Args&&... args) {
  switch (bits * 2 + lut) {
    case 2: Fn<1, false>::run(std::forward<Args>(args)...); break;
    case 3: Fn<1, true>::run(std::forward<Args>(args)...); break;
    case 4: Fn<2, false>::run(std::forward<Args>(args)...); break;
    case 5: Fn<2, true>::run(std::forward<Args>(args)...); break;
    case 6: Fn<3, false>::run(std::forward<Args>(args)...); break;
    case 7: Fn<3, true>::run(std::forward<Args>(args)...); break;
    case 8: Fn<4, false>::run(std::forward<Args>(args)...); break;
    case 9: Fn<4, true>::run(std::forward<Args>(args)...); break;
    case 16: Fn<8, false>::run(std::forward<Args>(args)...); break;
    default: LOWBIT_CHECK(false, "weight-only linear: no kernel for ", bits, "-bit blocks", lut ? " with a table" : "");
  }
}

template <int B, bool LUT>
struct GemvFn {
  static void run(const Packed& w, const QuantAct& a, float out_mul, const float* bias, float* y, int64_t N) {
    if constexpr (B == 4 && !LUT)
      gemv_nibble(w, a, out_mul, bias, y, N);
    else
      gemv<B, LUT>(w, a, out_mul, bias, y, N);
  }
};

template <int B, bool LUT>
struct DequantFn {
  using D = std::conditional_t<B == 4 && !LUT, Nib, Bits<B>>;
  static void run(const Packed& w, float out_mul, int64_t N, int64_t K, at::Tensor& wt) {
    if (wt.scalar_type() == at::kFloat)
      dequant_t<D, LUT>(w, out_mul, N, K, wt.data_ptr<float>());
    else
      dequant_t<D, LUT>(w, out_mul, N, K, (uint16_t*)wt.data_ptr<at::BFloat16>());
  }
};

int64_t span_of(int64_t bits) { return bits == 8 ? 4 : 32 / (bits == 3 ? 1 : bits); }
int64_t block_bytes(int64_t bits) { return bits == 3 ? 192 : 64; }

Packed make_packed(const at::Tensor& codes, const at::Tensor& scales, const std::optional<at::Tensor>& zeros,
                   const std::optional<at::Tensor>& table, int64_t bits, int64_t n, int64_t k, int64_t group,
                   int64_t zero_const, int64_t seg) {
  const int64_t span = span_of(bits), NB = (n + kRows - 1) / kRows, KB = (k + span - 1) / span;
  LOWBIT_CHECK(bits == 1 || bits == 2 || bits == 3 || bits == 4 || bits == 8,
               "weight-only linear: bits must be 1, 2, 3, 4 or 8, got ", bits);
  LOWBIT_CHECK(group > 0 && group % span == 0 && seg > 0 && seg % span == 0 && (group % seg == 0 || group >= k),
               "weight-only linear: group and seg must be multiples of ", span, " and seg must divide group");
  LOWBIT_CHECK(codes.is_contiguous() && codes.scalar_type() == at::kByte && codes.numel() == NB * KB * block_bytes(bits),
               "weight-only linear: codes must be contiguous uint8 [", NB, ", ", KB, ", ", block_bytes(bits), "]");
  const int64_t G = (k + group - 1) / group;
  LOWBIT_CHECK(scales.is_contiguous() && scales.numel() == NB * G * kRows &&
                   (scales.scalar_type() == at::kHalf || scales.scalar_type() == at::kFloat),
               "weight-only linear: scales must be contiguous fp16/fp32 [", NB, ", ", G, ", 16]");
  Packed w{codes.data_ptr<uint8_t>(), KB, scales.data_ptr(), scales.scalar_type() == at::kHalf, nullptr, false,
           (int32_t)zero_const, _mm512_setzero_si512(), G, group, seg};
  if (zeros) {
    LOWBIT_CHECK(zeros->is_contiguous() && zeros->numel() == NB * G * kRows &&
                     (zeros->scalar_type() == at::kByte || zeros->scalar_type() == at::kChar),
                 "weight-only linear: zeros must be contiguous uint8/int8 [", NB, ", ", G, ", 16]");
    w.zeros = zeros->data_ptr();
    w.signed_zeros = zeros->scalar_type() == at::kChar;
  }
  if (table) {
    LOWBIT_CHECK(table->is_contiguous() && table->scalar_type() == at::kShort && table->numel() == 32,
                 "weight-only linear: table must be 32 int16 levels");
    w.table = _mm512_loadu_si512(table->data_ptr<int16_t>());
  }
  return w;
}

}  // namespace

// W^T [k, n] (bf16 or fp32): the weight the packed codes stand for (large-M path, tests).
at::Tensor wo_dequantize(const at::Tensor& codes, const at::Tensor& scales, const std::optional<at::Tensor>& zeros,
                         const std::optional<at::Tensor>& table, int64_t bits, int64_t n, int64_t k, int64_t group,
                         int64_t zero_const, int64_t seg, double out_mul, at::ScalarType dtype) {
  const Packed w = make_packed(codes, scales, zeros, table, bits, n, k, group, zero_const, seg);
  LOWBIT_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "wo_dequantize: dtype must be float32 or bfloat16");
  at::Tensor wt = at::empty({k, n}, at::TensorOptions().dtype(dtype));
  dispatch_bits<DequantFn>(bits, table.has_value(), w, (float)out_mul, n, k, wt);
  return wt;
}

// y = (x / smooth) W^T + bias for x [M, K] (fp32/bf16/fp16), y in x's dtype.
// M < prefill_from: int16 GEMV tiles; otherwise dequantize to bf16 and at::matmul.
at::Tensor wo_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                     const std::optional<at::Tensor>& zeros, const std::optional<at::Tensor>& table,
                     const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& smooth, int64_t bits,
                     int64_t n, int64_t group, int64_t zero_const, int64_t seg, double out_mul,
                     int64_t prefill_from) {
  LOWBIT_CHECK(x.dim() == 2, "wo_linear: x must be 2-D [M, K], got ", x.dim(), "-D");
  const int64_t M = x.size(0), K = x.size(1);
  const Packed w = make_packed(codes, scales, zeros, table, bits, n, K, group, zero_const, seg);
  if (smooth) LOWBIT_CHECK(smooth->scalar_type() == at::kFloat && smooth->numel() == K && smooth->is_contiguous(),
                               "wo_linear: smooth must be contiguous float32 [", K, "]");
  if (bias) LOWBIT_CHECK(bias->scalar_type() == at::kFloat && bias->numel() == n && bias->is_contiguous(),
                         "wo_linear: bias must be contiguous float32 [", n, "]");
  const float* bp = bias ? bias->data_ptr<float>() : nullptr;
  if (M >= prefill_from) {
    at::Tensor wt = at::empty({K, n}, at::kBFloat16);
    dispatch_bits<DequantFn>(bits, table.has_value(), w, (float)out_mul, n, K, wt);
    at::Tensor xs = smooth ? x.to(at::kFloat) / *smooth : x;
    at::Tensor y = at::matmul(xs.to(at::kBFloat16), wt);
    if (bias) return (y.to(at::kFloat) + *bias).to(x.scalar_type());
    return y.to(x.scalar_type());
  }
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const int64_t Kp = w.KB * span_of(bits);
  const bool nibble = bits == 4 && !table;  // the vpdpbusd kernel takes split-byte activations
  const QuantAct a = quantize_act(xf, smooth ? smooth->data_ptr<float>() : nullptr, Kp, seg, nibble);
  at::Tensor y = at::empty({M, n}, at::kFloat);
  dispatch_bits<GemvFn>(bits, table.has_value(), w, a, (float)out_mul, bp, y.data_ptr<float>(), n);
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

}  // namespace lowbit

TORCH_LIBRARY_FRAGMENT(lowbit, m) {
  m.def(
      "wo_linear(Tensor x, Tensor codes, Tensor scales, Tensor? zeros, Tensor? table, Tensor? bias, "
      "Tensor? smooth, int bits, int n, int group, int zero_const, int seg, float out_mul, "
      "int prefill_from) -> Tensor");
  m.def(
      "wo_dequantize(Tensor codes, Tensor scales, Tensor? zeros, Tensor? table, int bits, int n, int k, int group, "
      "int zero_const, int seg, float out_mul, ScalarType dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(lowbit, CPU, m) {
  m.impl("wo_linear", &lowbit::wo_linear);
  m.impl("wo_dequantize", &lowbit::wo_dequantize);
}
