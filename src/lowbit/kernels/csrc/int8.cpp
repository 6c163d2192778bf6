// W8A8 CPU kernels: int8 activations x int8 per-channel weights (AVX-512 VNNI).
//
// Activations are quantized here, fused with SmoothQuant's per-channel divisor: per token
// (dynamic, symmetric int8, scale = absmax / 127) or per tensor (static, calibrated scale and
// zero point). Codes are emitted as uint8 for vpdpbusd (u8 x s8): a symmetric code q becomes
// q + 128, an asymmetric uint8 code stays as it is; `zero` is the code that stands for 0.0 and
// is compensated with the weight row sums precomputed at packing time:
//   y[m, n] = (sum_k u[m, k] w[n, k] - zero * rowsum[n]) * x_scale[m] * w_scale[n] + bias[n].
// The codes equal lowbit.primitives' bit for bit: x / smooth, absmax / 127 and x / scale are
// rounded as IEEE divisions like the reference's (div_by), rounding is half to even like torch.round.
//
// Small M (decode) runs a GEMV/GEMM over a weight prepacked in panels of 32 output rows,
// [N/32][K/4][32][4] bytes on 2 MB pages, streamed once; large M calls oneDNN's int8 matmul
// (onednn::qlinear_pointwise) through the dispatcher with the per-token scale and bias applied
// in one pass afterwards. On CPUs with AMX int8, from `amx_min_rows` rows on, AMX tiles run the
// same packed weight instead of both (same integer sums and epilogue, so the same outputs bit
// for bit); LOWBIT_NO_AMX=1 turns that off.
#include <ATen/core/dispatch/Dispatcher.h>
#include <cpuid.h>
#include <omp.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "common.h"

namespace lowbit::int8 {

constexpr int64_t kPanel = 32;       // output rows per weight panel (two zmm of int32 sums)
constexpr int64_t kRowTile = 8;      // activation rows per micro-kernel call
constexpr int64_t kPrefetch = 2048;  // bytes ahead that the GEMV prefetches its weight stream
constexpr size_t kHugePage = size_t(2) << 20;
constexpr int64_t kAmxK = 64;  // K bytes per AMX tile row
constexpr int64_t kAmxSlack = 16 * 4 * kPanel;

inline int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }
inline __mmask16 tail_mask(int64_t left) { return left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1); }

// ---------------------------------------------------------------------------------------------
// Activation quantization

// fp32 lanes of x[k..k+16) (masked lanes read as 0).
inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16(const at::BFloat16* p, __mmask16 m) {
  __m256i h = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
// Round fp32 lanes to bf16 (half to even, as torch's bf16 arithmetic does) and back.
inline __m512 round_bf16(__m512 v) {
  __m256i h = (__m256i)_mm512_cvtneps_pbh(v);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// a / b rounded exactly as the IEEE division, from inv = RN(1 / b): a * inv is within an ulp of
// the quotient and one FMA correction rounds it correctly (Markstein); a multiply and 2 FMAs
// instead of vdivps (2048 x 1536 rows with a SmoothQuant divisor: 1.09 -> 0.82 ms on a Xeon). Lanes
// whose result is not a normal number (zero aside: inf/NaN inputs, overflow, subnormal) take the
// division itself. Checked against division on 3.2e8 random lanes: equal up to the sign of zero.
inline __m512 div_by(__m512 a, __m512 b, __m512 inv) {
  const __m512 y = _mm512_mul_ps(a, inv);
  const __m512 q = _mm512_fmadd_ps(_mm512_fnmadd_ps(y, b, a), inv, y);
  const __mmask16 odd = _mm512_fpclass_ps_mask(q, 0xB9);  // NaN, +-inf, subnormal
  return odd ? _mm512_mask_div_ps(q, odd, a, b) : q;
}

// The smoothing divisor as the reference applies it (rounded to x's dtype) and its reciprocal.
struct Divisor {
  std::vector<float> div, inv;
  bool reciprocal_ok = true;  // every divisor a normal number whose reciprocal is normal too
};

// ``reciprocals``: worth K scalar divisions only when several rows will use them.
template <typename T>
Divisor divisor_for(const float* smooth, int64_t K, bool reciprocals) {
  Divisor d;
  if (smooth == nullptr) return d;
  d.div.resize(K);
  d.inv.resize(K, 1.f);
  d.reciprocal_ok = reciprocals;
  for (int64_t k = 0; k < K; ++k) {
    const float s = std::is_same_v<T, at::BFloat16> ? float(c10::BFloat16(smooth[k])) : smooth[k];
    d.div[k] = s;
    if (reciprocals) {
      d.inv[k] = 1.f / s;
      d.reciprocal_ok &= std::isnormal(s) && std::isnormal(d.inv[k]);
    }
  }
  return d;
}

inline __m512 divide(__m512 a, __m512 b, __m512 inv, bool reciprocal_ok) {
  return reciprocal_ok ? div_by(a, b, inv) : _mm512_div_ps(a, b);
}

// What the reference sees: x, divided by the smoothing divisor if any (in x's dtype).
template <typename T>
inline __m512 smoothed(const T* x, const Divisor& d, int64_t k, __mmask16 m) {
  __m512 v = load16(x + k, m);
  if (!d.div.empty()) {
    const __m512 s = _mm512_mask_loadu_ps(_mm512_set1_ps(1.f), m, d.div.data() + k);
    const __m512 inv = _mm512_mask_loadu_ps(_mm512_set1_ps(1.f), m, d.inv.data() + k);
    v = divide(v, s, inv, d.reciprocal_ok);
    if constexpr (std::is_same_v<T, at::BFloat16>) v = round_bf16(v);
  }
  return v;
}

// How rows become codes. Dynamic: scale per row from its range; static: one scale, zero point.
struct ActQuant {
  const float* smooth = nullptr;
  bool dynamic = true;
  float scale = 1.f;  // static only
  float zero = 0.f;   // static asymmetric zero point (added to round(x / scale))
  float qmin = -127.f, qmax = 127.f;
  int32_t shift = 128;  // added to q to make the uint8 code (128 for symmetric, 0 for uint8)
  int32_t code_zero() const { return dynamic ? 128 : shift + int32_t(zero); }
};

// The per-token scale the reference chooses (primitives.qparams_from_range, symmetric int8).
inline float token_scale(float lo, float hi) {
  float scale = lo == hi ? std::fabs(lo) : std::max(std::max(hi, 0.f) / 127.f, -std::min(lo, 0.f) / 127.f);
  return scale > 0.f ? scale : 1.f;
}

// Rows up to this many inputs keep their smoothed values between the two passes of quantize_row
// (on the stack, in L1) instead of dividing by the SmoothQuant divisor again.
constexpr int64_t kKeepSmoothed = 8192;

// Quantize one row of K values into `out` (padded with `pad` codes up to `kpad`); returns its scale.
// `keep`: the dynamic row's smoothed values are kept from the first pass for the second.
template <typename T, bool keep>
float quantize_row(const T* x, int64_t K, const ActQuant& aq, const Divisor& d, uint8_t* out, int64_t kpad) {
  float scale = aq.scale;
  bool finite_range = false;
  alignas(64) float kept[keep ? kKeepSmoothed : 16];
  if (aq.dynamic) {
    // Two independent min/max pairs: one pair's latency chain held this loop to 4 cycles a vector.
    __m512 lo0 = _mm512_set1_ps(INFINITY), hi0 = _mm512_set1_ps(-INFINITY), lo1 = lo0, hi1 = hi0;
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
      const __m512 v0 = smoothed(x, d, k, __mmask16(0xFFFF)), v1 = smoothed(x, d, k + 16, __mmask16(0xFFFF));
      if constexpr (keep) _mm512_store_ps(kept + k, v0), _mm512_store_ps(kept + k + 16, v1);
      lo0 = _mm512_min_ps(lo0, v0), hi0 = _mm512_max_ps(hi0, v0);
      lo1 = _mm512_min_ps(lo1, v1), hi1 = _mm512_max_ps(hi1, v1);
    }
    for (; k < K; k += 16) {
      const __mmask16 m = tail_mask(K - k);
      const __m512 v = smoothed(x, d, k, m);
      if constexpr (keep) _mm512_store_ps(kept + k, v);
      lo0 = _mm512_mask_min_ps(lo0, m, lo0, v);
      hi0 = _mm512_mask_max_ps(hi0, m, hi0, v);
    }
    const float lo = _mm512_reduce_min_ps(_mm512_min_ps(lo0, lo1)), hi = _mm512_reduce_max_ps(_mm512_max_ps(hi0, hi1));
    scale = token_scale(lo, hi);
    finite_range = std::isfinite(lo) && std::isfinite(hi);
  }
  // The values the first pass saw: kept, or smoothed again.
  auto value = [&](int64_t k, __mmask16 m) {
    if constexpr (keep) return _mm512_load_ps(kept + k);
    return smoothed(x, d, k, m);
  };
  const float inv = 1.f / scale;
  const bool reciprocal_ok = std::isnormal(scale) && std::isnormal(inv);
  const __m512 vs = _mm512_set1_ps(scale), vinv = _mm512_set1_ps(inv), vz = _mm512_set1_ps(aq.zero);
  const __m512 vmin = _mm512_set1_ps(aq.qmin), vmax = _mm512_set1_ps(aq.qmax);
  const __m512i vshift = _mm512_set1_epi32(aq.shift);
  if (finite_range && reciprocal_ok) {
    // Dynamic rows with a finite range: |x / scale| <= 127, so the reciprocal quotient (div_by)
    // never needs its NaN/inf fallback (a subnormal quotient rounds to 0 either way); with no zero
    // point, clamping before the round-to-nearest-even conversion equals rounding first. Hot,
    // 256 x 1536 fp32 rows on one Xeon thread: 108 -> 78 us with the two min/max pairs above.
    for (int64_t k = 0; k < K; k += 16) {
      const __mmask16 m = tail_mask(K - k);
      const __m512 v = value(k, m);
      const __m512 y = _mm512_mul_ps(v, vinv);
      __m512 q = _mm512_fmadd_ps(_mm512_fnmadd_ps(y, vs, v), vinv, y);
      q = _mm512_min_ps(_mm512_max_ps(q, vmin), vmax);
      const __m512i c = _mm512_add_epi32(_mm512_cvt_roundps_epi32(q, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), vshift);
      _mm_mask_storeu_epi8(out + k, m, _mm512_cvtepi32_epi8(c));
    }
    std::fill(out + K, out + kpad, uint8_t(0));
    return scale;
  }
  for (int64_t k = 0; k < K; k += 16) {
    __mmask16 m = tail_mask(K - k);
    __m512 q = _mm512_roundscale_ps(divide(value(k, m), vs, vinv, reciprocal_ok),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    q = _mm512_min_ps(_mm512_max_ps(_mm512_add_ps(q, vz), vmin), vmax);
    _mm512_mask_cvtepi32_storeu_epi8(out + k, m, _mm512_add_epi32(_mm512_cvtps_epi32(q), vshift));
  }
  std::fill(out + K, out + kpad, uint8_t(0));  // meets zero weights (or, on AMX, none at all)
  return scale;
}

template <typename T>
float quantize_row(const T* x, int64_t K, const ActQuant& aq, const Divisor& d, uint8_t* out, int64_t kpad) {
  return aq.dynamic && !d.div.empty() && K <= kKeepSmoothed ? quantize_row<T, true>(x, K, aq, d, out, kpad)
                                                             : quantize_row<T, false>(x, K, aq, d, out, kpad);
}

// The smoothing divisor for rows of x (reciprocals only when several rows share them).
Divisor divisor_for_rows(const at::Tensor& x, const ActQuant& aq) {
  const int64_t M = x.size(0), K = x.size(1);
  return x.scalar_type() == at::kBFloat16 ? divisor_for<at::BFloat16>(aq.smooth, K, M >= 4)
                                          : divisor_for<float>(aq.smooth, K, M >= 4);
}

// Quantize rows [begin, end) of x [M, K] into codes [M, ldc] and their scales.
void quantize_row_range(const at::Tensor& x, const ActQuant& aq, const Divisor& d, int64_t begin, int64_t end,
                        uint8_t* codes, int64_t ldc, float* scales) {
  const int64_t K = x.size(1);
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  for (int64_t i = begin; i < end; ++i) {
    scales[i] = bf16 ? quantize_row(x.const_data_ptr<at::BFloat16>() + i * K, K, aq, d, codes + i * ldc, ldc)
                     : quantize_row(x.const_data_ptr<float>() + i * K, K, aq, d, codes + i * ldc, ldc);
  }
}

// Quantize rows [M, K] of x into codes [M, ldc] and per-row scales (d: x's divisor, from divisor_for_rows);
// parallel over rows when large.
void quantize_rows(const at::Tensor& x, const ActQuant& aq, const Divisor& d, uint8_t* codes, int64_t ldc,
                   float* scales) {
  const int64_t M = x.size(0), K = x.size(1);
  auto body = [&](int64_t begin, int64_t end) { quantize_row_range(x, aq, d, begin, end, codes, ldc, scales); };
  if (M * K < (int64_t(1) << 16)) {
    body(0, M);
  } else {
    at::parallel_for(0, M, std::max<int64_t>(1, (int64_t(1) << 15) / K), body);
  }
}

void quantize_rows(const at::Tensor& x, const ActQuant& aq, uint8_t* codes, int64_t ldc, float* scales) {
  quantize_rows(x, aq, divisor_for_rows(x, aq), codes, ldc, scales);
}

// ---------------------------------------------------------------------------------------------
// Weight packing

// A zero-filled int8 buffer on 2 MB-aligned memory advised for transparent huge pages, so that a
// streamed weight costs no page walks and the prefetchers are not cut at every 4 KB page.
at::Tensor alloc_packed(int64_t bytes) {
  // kAmxSlack: the AMX GEMM's last K tile may read up to 15 rows of 128 bytes past a panel (times
  // zero codes); the storage keeps them (a copy of the tensor would not: see amx_tail_readable).
  size_t size = round_up(std::max<int64_t>(bytes, 1) + kAmxSlack, bytes >= int64_t(kHugePage) ? kHugePage : 64);
  void* p = std::aligned_alloc(bytes >= int64_t(kHugePage) ? kHugePage : 64, size);
  LOWBIT_CHECK(p != nullptr, "could not allocate ", size, " bytes for a packed weight");
  if (size >= kHugePage) madvise(p, size, MADV_HUGEPAGE);
  std::memset(p, 0, size);
  return at::from_blob(p, {int64_t(size)}, [](void* q) { std::free(q); }, at::TensorOptions().dtype(at::kChar))
      .narrow(0, 0, bytes);
}

// w int8 [N, K] -> (packed [N/32 * K/4 * 32 * 4] int8 (zero padded), row sums int32 [N padded to 32]).
std::tuple<at::Tensor, at::Tensor> pack(const at::Tensor& w) {
  LOWBIT_CHECK(w.dim() == 2 && w.scalar_type() == at::kChar, "w8a8_pack expects an int8 [N, K] weight, got ",
               w.scalar_type(), " of shape ", w.sizes());
  const auto wc = w.contiguous();
  const int64_t N = w.size(0), K = w.size(1), Np = round_up(N, kPanel), Kp = round_up(K, 4);
  at::Tensor packed = alloc_packed(Np * Kp);
  at::Tensor sums = at::zeros({Np}, at::kInt);
  const int8_t* src = wc.const_data_ptr<int8_t>();
  int8_t* dst = packed.data_ptr<int8_t>();
  int32_t* rs = sums.data_ptr<int32_t>();
  at::parallel_for(0, Np / kPanel, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      for (int64_t r = 0; r < kPanel && p * kPanel + r < N; ++r) {
        const int64_t n = p * kPanel + r;
        int32_t sum = 0;
        for (int64_t k = 0; k < K; ++k) {
          dst[p * kPanel * Kp + (k / 4) * kPanel * 4 + r * 4 + k % 4] = src[n * K + k];
          sum += src[n * K + k];
        }
        rs[n] = sum;
      }
    }
  });
  return {packed, sums};
}

// ---------------------------------------------------------------------------------------------
// Small-M GEMM over the packed weight

// int32 sums for MT rows of codes x one panel of 32 outputs: acc[m][0..1] (16 outputs each).
template <int MT>
inline void panel_dot(const uint8_t* codes, int64_t ldc, const int8_t* w, int64_t K4, __m512i (&acc)[MT][2]) {
  for (int m = 0; m < MT; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_si512();
  const int32_t* x[MT];
  for (int m = 0; m < MT; ++m) x[m] = reinterpret_cast<const int32_t*>(codes + m * ldc);
#pragma GCC unroll 4
  for (int64_t k = 0; k < K4; ++k, w += 4 * kPanel) {
    _mm_prefetch(reinterpret_cast<const char*>(w) + kPrefetch, _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(w) + kPrefetch + 64, _MM_HINT_T0);
    const __m512i w0 = _mm512_load_si512(w), w1 = _mm512_load_si512(w + 64);
    for (int m = 0; m < MT; ++m) {
      const __m512i xb = _mm512_set1_epi32(x[m][k]);
      acc[m][0] = _mm512_dpbusd_epi32(acc[m][0], xb, w0);
      acc[m][1] = _mm512_dpbusd_epi32(acc[m][1], xb, w1);
    }
  }
}

inline void store16(float* y, __m512 v, __mmask16 m) { _mm512_mask_storeu_ps(y, m, v); }
inline void store16(at::BFloat16* y, __m512 v, __mmask16 m) {
  _mm256_mask_storeu_epi16(y, m, (__m256i)_mm512_cvtneps_pbh(v));
}

// Everything the epilogue needs besides the sums.
struct Epilogue {
  const int32_t* wsum;  // [Np]
  const float* wscale;  // [N]
  const float* bias;    // [N] or null
  const float* xscale;  // [M] (dynamic) or null (static: `scale`)
  float scale;
  int32_t zero;  // the code standing for 0.0
  int64_t N;
};

// y[m0 + m, n0 + j * 16 ..] for m < rows from the int32 sums `sums(m, j)` (16 outputs each):
// (sum - zero * rowsum) * x_scale * w_scale + bias. Shared by the VNNI and AMX GEMMs, which
// therefore give the same outputs bit for bit.
template <typename TO, typename Sums>
inline void finish_rows(Sums sums, int64_t rows, const Epilogue& e, int64_t m0, int64_t n0, TO* y) {
  for (int j = 0; j < 2; ++j) {
    const int64_t n = n0 + 16 * j;
    if (n >= e.N) break;
    const __mmask16 mask = tail_mask(e.N - n);
    const __m512 ws = _mm512_maskz_loadu_ps(mask, e.wscale + n);
    const __m512 b = e.bias ? _mm512_maskz_loadu_ps(mask, e.bias + n) : _mm512_setzero_ps();
    const __m512i comp = _mm512_mullo_epi32(_mm512_loadu_si512(e.wsum + n), _mm512_set1_epi32(e.zero));
    for (int64_t m = 0; m < rows; ++m) {
      const float xs = e.xscale ? e.xscale[m0 + m] : e.scale;
      const __m512 v = _mm512_cvtepi32_ps(_mm512_sub_epi32(sums(m, j), comp));
      store16(y + (m0 + m) * e.N + n, _mm512_fmadd_ps(v, _mm512_mul_ps(ws, _mm512_set1_ps(xs)), b), mask);
    }
  }
}

template <int MT, typename TO>
void rows_panel(const uint8_t* codes, int64_t ldc, const int8_t* w, int64_t K4, const Epilogue& e, int64_t m0,
                int64_t n0, TO* y) {
  __m512i acc[MT][2];
  panel_dot<MT>(codes + m0 * ldc, ldc, w, K4, acc);
  finish_rows([&](int64_t m, int j) { return acc[m][j]; }, MT, e, m0, n0, y);
}

template <typename TO>
void small_gemm(const uint8_t* codes, int64_t M, int64_t Kp, const int8_t* packed, int64_t Np, const Epilogue& e,
                TO* y) {
  using Fn = void (*)(const uint8_t*, int64_t, const int8_t*, int64_t, const Epilogue&, int64_t, int64_t, TO*);
  static constexpr Fn table[kRowTile] = {rows_panel<1, TO>, rows_panel<2, TO>, rows_panel<3, TO>,
                                         rows_panel<4, TO>, rows_panel<5, TO>, rows_panel<6, TO>,
                                         rows_panel<7, TO>, rows_panel<8, TO>};
  const int64_t panels = Np / kPanel, panel_bytes = kPanel * Kp;
  // Threads split the panels into contiguous ranges (one sequential weight stream each); tiny
  // layers stay on one thread, where waking the other costs more than it saves.
  const int64_t grain = std::max<int64_t>(1, (int64_t(96) << 10) / (panel_bytes * std::min<int64_t>(M, kRowTile)));
  at::parallel_for(0, panels, grain, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      for (int64_t m0 = 0; m0 < M; m0 += kRowTile) {
        table[std::min(kRowTile, M - m0) - 1](codes, Kp, packed + p * panel_bytes, Kp / 4, e, m0, p * kPanel, y);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// AMX (Sapphire Rapids and later): 16 x 16 int32 tiles, tdpbusd takes 16 rows x 64 codes against
// 16 groups of 4 K x 16 outputs per instruction, 16x the MACs of a zmm vpdpbusd. The packed
// weight needs no new layout: a panel's 16 outputs x 4 K are 64 contiguous bytes, rows of
// successive K groups 128 bytes apart, which is a B tile read with a stride of 128. Activation
// codes are padded to 16 rows and 64 columns with zeros; columns past the weight's K meet either
// its zero padding or, in the last tile, the next panel's bytes (times zero).

// Whether this CPU and kernel let the process use AMX int8 (asks Linux for the tile state once).
bool amx_ready() {
  static const bool ready = [] {
    if (std::getenv("LOWBIT_NO_AMX") != nullptr) return false;
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    const bool tile = d & (1u << 24), int8 = d & (1u << 25);
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return tile && int8 && syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ready;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Every tile 16 rows x 64 bytes: tmm0-3 int32 sums (2 x 2 blocks of 16 rows x 16 outputs),
// tmm4-5 activation codes (two 16-row blocks), tmm6-7 weights (a panel's two 16-output halves).
// ldtilecfg through asm with a memory operand: GCC 12 drops the stores to a config that only
// _tile_loadconfig reads, which leaves every tile unconfigured (tilezero then faults).
inline void amx_configure() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) cfg.colsb[t] = 64, cfg.rows[t] = 16;
  asm volatile("ldtilecfg %0" : : "m"(cfg));
}

__attribute__((target("amx-tile"))) inline void amx_release() { _tile_release(); }

// int32 sums of 16 (two_blocks: 32) rows of codes x a panel's 32 outputs into c[32][32].
template <bool two_blocks>
__attribute__((target("amx-tile,amx-int8"))) inline void amx_panel(const uint8_t* a, int64_t lda, const int8_t* w,
                                                                   int64_t K64, int32_t* c) {
  _tile_zero(0);
  _tile_zero(1);
  if constexpr (two_blocks) {
    _tile_zero(2);
    _tile_zero(3);
  }
  for (int64_t k = 0; k < K64; k += kAmxK) {
    const int8_t* wk = w + k * kPanel;  // K group k / 4, 128 bytes each
    _tile_loadd(6, wk, 4 * kPanel);
    _tile_loadd(7, wk + 64, 4 * kPanel);
    _tile_loadd(4, a + k, lda);
    _tile_dpbusd(0, 4, 6);
    _tile_dpbusd(1, 4, 7);
    if constexpr (two_blocks) {
      _tile_loadd(5, a + 16 * lda + k, lda);
      _tile_dpbusd(2, 5, 6);
      _tile_dpbusd(3, 5, 7);
    }
  }
  _tile_stored(0, c, 4 * kPanel);
  _tile_stored(1, c + 16, 4 * kPanel);
  if constexpr (two_blocks) {
    _tile_stored(2, c + 16 * kPanel, 4 * kPanel);
    _tile_stored(3, c + 16 * kPanel + 16, 4 * kPanel);
  }
}

// Whether the AMX GEMM may read its last K tile whole: K is a multiple of 64, or the packed
// weight's storage has alloc_packed's slack after it (a copied tensor has none: the VNNI GEMM then).
bool amx_tail_readable(const at::Tensor& w_packed, int64_t K) {
  const int64_t over = (round_up(K, kAmxK) - round_up(K, 4)) / 4 * 4 * kPanel;
  const int64_t after = int64_t(w_packed.storage().nbytes()) - (w_packed.storage_offset() + w_packed.numel());
  return over == 0 || after >= over;
}

// Rows [m0, m1) of codes (16-row blocks, padding rows zero) against panels [p0, p1).
template <typename TO>
void amx_rows_panels(const uint8_t* codes, int64_t K64, int64_t m0, int64_t m1, const int8_t* packed,
                     int64_t panel_bytes, int64_t p0, int64_t p1, const Epilogue& e, TO* y) {
  alignas(64) int32_t c[2 * 16 * kPanel];
  for (int64_t p = p0; p < p1; ++p) {
    const int8_t* w = packed + p * panel_bytes;
    for (int64_t m = m0; m < m1; m += 32) {
      if (m1 - m > 16) {
        amx_panel<true>(codes + m * K64, K64, w, K64, c);
      } else {
        amx_panel<false>(codes + m * K64, K64, w, K64, c);
      }
      finish_rows([&](int64_t r, int j) { return _mm512_loadu_si512(c + r * kPanel + 16 * j); },
                  std::min<int64_t>(32, m1 - m), e, m, p * kPanel, y);
    }
  }
}

// Activation codes for a group of layers: one per distinct quantization of x (its SmoothQuant
// divisor), shared by the layers that use it.
struct Quantization {
  ActQuant aq;
  Divisor d;
  uint8_t* codes;
  float* scales;
};

// One layer of a group that reads the same activations (e.g. attention's q, k, v): its packed
// weight, epilogue (whose x_scale are its quantization's scales), codes and output.
template <typename TO>
struct Target {
  const int8_t* packed;
  int64_t Np;
  Epilogue e;
  const uint8_t* codes;
  TO* y;
};

// y_i = quantized rows of x times packed weight i for every target, in one OpenMP team. Each
// thread first quantizes its own share of the rows (for every quantization): rows an elementwise
// producer split by rows (as Inductor's kernels are) left in that core's cache. Few rows (decode
// to MiniLM's 1 x 32): after a barrier, threads split the targets' panels (as one list), so each
// weight byte crosses from L3 once. Many rows: each thread goes on with its own rows, in chunks of
// kAmxChunk rows that stay in L2 against every panel. Codes are [round_up(M, 32), K64] with their
// padding rows zeroed.
template <typename TO>
void amx_linear(const at::Tensor& x, const std::vector<Quantization>& quants, int64_t K64, int64_t Kp,
                const std::vector<Target<TO>>& targets) {
  constexpr int64_t kAmxChunk = 256, kSplitPanelsUpTo = 64, kSerialMacs = int64_t(1) << 20;
  const int64_t M = x.size(0), panel_bytes = kPanel * Kp;
  int64_t panels = 0;
  for (const auto& t : targets) panels += t.Np / kPanel;
  const bool split_panels = M <= kSplitPanelsUpTo;
  const int64_t units = split_panels ? panels : (M + 15) / 16;  // what the threads divide
  int threads = at::in_parallel_region() || M * panels * kPanel * K64 < kSerialMacs ? 1 : at::get_num_threads();
  threads = int(std::min<int64_t>(threads, units));
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num(), n = omp_get_num_threads();
    // This thread's rows, in whole 16-row blocks.
    const int64_t blocks = (M + 15) / 16;
    const int64_t r0 = std::min(M, blocks * t / n * 16), r1 = std::min(M, blocks * (t + 1) / n * 16);
    for (const auto& q : quants) quantize_row_range(x, q.aq, q.d, r0, r1, q.codes, K64, q.scales);
    amx_configure();
    if (split_panels) {
      if (n > 1) {
#pragma omp barrier
      }
      // This thread's panels [g0, g1) of the targets' panels counted one after the other.
      const int64_t g0 = panels * t / n, g1 = panels * (t + 1) / n;
      int64_t first = 0;
      for (const auto& target : targets) {
        const int64_t count = target.Np / kPanel, p0 = std::max(g0 - first, int64_t(0));
        const int64_t p1 = std::min(g1 - first, count);
        if (p0 < p1) amx_rows_panels(target.codes, K64, 0, M, target.packed, panel_bytes, p0, p1, target.e, target.y);
        first += count;
      }
    } else {
      for (int64_t m = r0; m < r1; m += kAmxChunk) {
        for (const auto& target : targets) {
          amx_rows_panels(target.codes, K64, m, std::min(r1, m + kAmxChunk), target.packed, panel_bytes, 0,
                          target.Np / kPanel, target.e, target.y);
        }
      }
    }
    amx_release();
  }
}

// ---------------------------------------------------------------------------------------------
// Large M: oneDNN

at::Tensor onednn_linear(const at::Tensor& codes, double x_scale, int64_t x_zero, const at::Tensor& w_onednn,
                         const at::Tensor& w_scale, const std::optional<at::Tensor>& bias, at::ScalarType out) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("onednn::qlinear_pointwise", "")
                       .typed<at::Tensor(at::Tensor, double, int64_t, at::Tensor, at::Tensor, at::Tensor,
                                         std::optional<at::Tensor>, double, int64_t, std::optional<at::ScalarType>,
                                         c10::string_view, c10::List<std::optional<at::Scalar>>, c10::string_view)>();
  // The weight zero points are unused (symmetric weights) but part of the schema.
  return op.call(codes, x_scale, x_zero, w_onednn, w_scale, at::zeros({w_scale.size(0)}, at::kLong), bias, 1.0, 0,
                 out, "none", c10::List<std::optional<at::Scalar>>(), "");
}

// y[m, :] = y[m, :] * xscale[m] + bias into out (fp32 in place or bf16).
void scale_rows(const at::Tensor& y, const float* xscale, const float* bias, at::Tensor& out) {
  const int64_t M = y.size(0), N = y.size(1);
  const float* src = y.const_data_ptr<float>();
  at::parallel_for(0, M, std::max<int64_t>(1, (int64_t(1) << 14) / N), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const __m512 xs = _mm512_set1_ps(xscale[i]);
      for (int64_t n = 0; n < N; n += 16) {
        const __mmask16 m = tail_mask(N - n);
        const __m512 b = bias ? _mm512_maskz_loadu_ps(m, bias + n) : _mm512_setzero_ps();
        const __m512 v = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, src + i * N + n), xs, b);
        if (out.scalar_type() == at::kFloat) {
          store16(out.data_ptr<float>() + i * N + n, v, m);
        } else {
          store16(out.data_ptr<at::BFloat16>() + i * N + n, v, m);
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Ops

// A SmoothQuant divisor's data (null: none), checked.
const float* checked_smooth(const std::optional<at::Tensor>& smooth, int64_t K) {
  if (!smooth) return nullptr;
  LOWBIT_CHECK(smooth->scalar_type() == at::kFloat && smooth->is_contiguous() && smooth->numel() == K,
               "smooth must be a contiguous float32 [", K, "] tensor, got ", smooth->scalar_type(), " ",
               smooth->sizes());
  return smooth->const_data_ptr<float>();
}

ActQuant act_quant(const std::optional<at::Tensor>& smooth, const std::optional<at::Tensor>& x_scale,
                   const std::optional<at::Tensor>& x_zero_point, int64_t K) {
  ActQuant aq;
  aq.smooth = checked_smooth(smooth, K);
  if (x_scale) {
    aq.dynamic = false;
    aq.scale = x_scale->item<float>();
    if (x_zero_point) {  // asymmetric uint8: codes are already unsigned
      aq.zero = float(x_zero_point->item<int64_t>());
      aq.qmin = 0.f, aq.qmax = 255.f, aq.shift = 0;
    }
  }
  return aq;
}

at::Tensor as_2d(const at::Tensor& x) {
  LOWBIT_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
               "int8 kernels take float32 or bfloat16 activations, got ", x.scalar_type());
  LOWBIT_CHECK(x.dim() >= 1 && x.size(-1) > 0, "activations need a non-empty last dimension, got ", x.sizes());
  return x.reshape({-1, x.size(-1)}).contiguous();
}

// (codes uint8 [..., K], scales float32 [...]): per-token (x_scale None) or per-tensor codes.
std::tuple<at::Tensor, at::Tensor> quantize(const at::Tensor& x, const std::optional<at::Tensor>& smooth,
                                            const std::optional<at::Tensor>& x_scale,
                                            const std::optional<at::Tensor>& x_zero_point) {
  const at::Tensor x2 = as_2d(x);
  const int64_t M = x2.size(0), K = x2.size(1);
  const ActQuant aq = act_quant(smooth, x_scale, x_zero_point, K);
  at::Tensor codes = at::empty({M, K}, at::kByte), scales = at::empty({M}, at::kFloat);
  quantize_rows(x2, aq, codes.data_ptr<uint8_t>(), K, scales.data_ptr<float>());
  auto lead = x.sizes().vec();
  lead.pop_back();
  return {codes.view(x.sizes()), scales.view(lead)};
}

// A layer's packed weight as the native GEMMs read it, checked against the activations' K, and
// how it quantizes its input (its SmoothQuant divisor, static scale and zero point).
struct LayerWeight {
  at::Tensor packed, sum, scale;
  std::optional<at::Tensor> bias;
  ActQuant aq;
  int64_t N, Np;
};

LayerWeight checked_weight(const at::Tensor& w_packed, const at::Tensor& w_sum, const at::Tensor& w_scale,
                           const std::optional<at::Tensor>& bias, const ActQuant& aq, int64_t K) {
  const int64_t N = w_scale.size(0), Np = w_sum.size(0), Kp = round_up(K, 4);
  LOWBIT_CHECK(w_packed.numel() == Np * Kp && Np == round_up(N, kPanel) && w_sum.scalar_type() == at::kInt &&
                   w_packed.scalar_type() == at::kChar && w_packed.is_contiguous() && w_sum.is_contiguous(),
               "packed weight [", w_packed.numel(), "] / sums [", Np, "] do not fit K=", K, ", N=", N,
               "; repack the weight with w8a8_pack");
  LOWBIT_CHECK(w_scale.scalar_type() == at::kFloat && w_scale.is_contiguous(), "w_scale must be contiguous float32");
  LOWBIT_CHECK(!bias || (bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == N),
               "bias must be a contiguous float32 [", N, "] tensor");
  return {w_packed, w_sum, w_scale, bias, aq, N, Np};
}

// Whether two layers quantize their input to the same codes.
bool same_codes(const ActQuant& a, const ActQuant& b) {
  return a.smooth == b.smooth && a.dynamic == b.dynamic && a.scale == b.scale && a.zero == b.zero &&
         a.qmin == b.qmin && a.qmax == b.qmax && a.shift == b.shift;
}

// Outputs of the weights' layers for x [M, K], shaped like `x` with its last dimension N: AMX
// tiles from `amx_min_rows` rows where available, else the VNNI GEMM. x is quantized once per
// distinct quantization (divisor, static scale and zero point), not once per layer.
template <typename TO>
std::vector<at::Tensor> native_layers(const at::Tensor& x, const at::Tensor& x2, const std::vector<LayerWeight>& weights,
                                      int64_t amx_min_rows) {
  const int64_t M = x2.size(0), K = x2.size(1), Kp = round_up(K, 4);
  bool amx = M >= amx_min_rows && amx_ready();
  for (const auto& w : weights) amx = amx && amx_tail_readable(w.packed, K);
  const int64_t ldc = amx ? round_up(K, kAmxK) : Kp, rows = amx ? round_up(M, 32) : M;
  std::vector<ActQuant> distinct;
  std::vector<size_t> which;  // each layer's quantization
  for (const auto& w : weights) {
    const auto at = std::find_if(distinct.begin(), distinct.end(), [&](const ActQuant& a) { return same_codes(a, w.aq); });
    which.push_back(at - distinct.begin());
    if (at == distinct.end()) distinct.push_back(w.aq);
  }
  const int64_t count = int64_t(distinct.size());
  at::Tensor codes = at::empty({count, rows, ldc}, at::kByte), scales = at::empty({count, M}, at::kFloat);
  std::vector<Quantization> quants;
  for (int64_t i = 0; i < count; ++i) {
    uint8_t* c = codes.data_ptr<uint8_t>() + i * rows * ldc;
    if (rows > M) std::memset(c + M * ldc, 0, (rows - M) * ldc);
    quants.push_back({distinct[i], divisor_for_rows(x2, distinct[i]), c, scales.data_ptr<float>() + i * M});
  }
  std::vector<at::Tensor> outs;
  std::vector<Target<TO>> targets;
  for (size_t i = 0; i < weights.size(); ++i) {
    const auto& w = weights[i];
    const Quantization& q = quants[which[i]];
    outs.push_back(at::empty({M, w.N}, x.scalar_type()));
    const Epilogue e{w.sum.const_data_ptr<int32_t>(), w.scale.const_data_ptr<float>(),
                     w.bias ? w.bias->const_data_ptr<float>() : nullptr, q.aq.dynamic ? q.scales : nullptr,
                     q.aq.scale, q.aq.code_zero(), w.N};
    targets.push_back({w.packed.const_data_ptr<int8_t>(), w.Np, e, q.codes, outs.back().data_ptr<TO>()});
  }
  if (amx) {
    amx_linear(x2, quants, ldc, Kp, targets);
  } else {
    for (const auto& q : quants) quantize_rows(x2, q.aq, q.d, q.codes, ldc, q.scales);
    for (const auto& t : targets) small_gemm(t.codes, M, Kp, t.packed, t.Np, t.e, t.y);
  }
  for (size_t i = 0; i < outs.size(); ++i) {
    auto shape = x.sizes().vec();
    shape.back() = weights[i].N;
    outs[i] = outs[i].view(shape);
  }
  return outs;
}

std::vector<at::Tensor> native_layers(const at::Tensor& x, const at::Tensor& x2, const std::vector<LayerWeight>& weights,
                                      int64_t amx_min_rows) {
  return x.scalar_type() == at::kFloat ? native_layers<float>(x, x2, weights, amx_min_rows)
                                       : native_layers<at::BFloat16>(x, x2, weights, amx_min_rows);
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& w_packed, const at::Tensor& w_sum, const at::Tensor& w_scale,
                  const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& smooth,
                  const std::optional<at::Tensor>& x_scale, const std::optional<at::Tensor>& x_zero_point,
                  const std::optional<at::Tensor>& w_onednn, int64_t onednn_min_rows, int64_t amx_min_rows) {
  const at::Tensor x2 = as_2d(x);
  const int64_t M = x2.size(0), K = x2.size(1);
  const ActQuant aq = act_quant(smooth, x_scale, x_zero_point, K);
  const LayerWeight w = checked_weight(w_packed, w_sum, w_scale, bias, aq, K);
  if (!(w_onednn && M >= onednn_min_rows)) return native_layers(x, x2, {w}, amx_min_rows)[0];
  auto out_shape = x.sizes().vec();
  out_shape.back() = w.N;
  at::Tensor scales = at::empty({M}, at::kFloat);
  at::Tensor codes = at::empty({M, K}, at::kByte);
  quantize_rows(x2, aq, codes.data_ptr<uint8_t>(), K, scales.data_ptr<float>());
  at::Tensor y;
  if (aq.dynamic) {
    at::Tensor acc = onednn_linear(codes, 1.0, 128, *w_onednn, w_scale, std::nullopt, at::kFloat);
    y = x.scalar_type() == at::kFloat ? acc : at::empty({M, w.N}, x.scalar_type());
    scale_rows(acc, scales.const_data_ptr<float>(), bias ? bias->const_data_ptr<float>() : nullptr, y);
  } else {
    y = onednn_linear(codes, aq.scale, aq.code_zero(), *w_onednn, w_scale, bias, x.scalar_type());
  }
  return y.view(out_shape);
}

// Several layers reading the same x (attention's q, k, v; an MLP's gate and up) in one call and
// one OpenMP team, x quantized once per distinct quantization; each output equals w8a8_linear's
// bit for bit. `bias`, `smooth`, `x_scale` and `x_zero_point` are each empty (no layer has one:
// x_scale empty means dynamic activations) or one per layer.
std::vector<at::Tensor> linear_group(const at::Tensor& x, at::TensorList w_packed, at::TensorList w_sum,
                                     at::TensorList w_scale, at::TensorList bias, at::TensorList smooth,
                                     at::TensorList x_scale, at::TensorList x_zero_point, int64_t amx_min_rows) {
  const size_t count = w_packed.size();
  auto fits = [&](at::TensorList list) { return list.empty() || list.size() == count; };
  LOWBIT_CHECK(w_sum.size() == count && w_scale.size() == count && fits(bias) && fits(smooth) && fits(x_scale) &&
                   fits(x_zero_point) && (x_zero_point.empty() || !x_scale.empty()),
               "w8a8_linear_pair/triple need one packed weight, sums and scale per layer (", w_packed.size(), ", ",
               w_sum.size(), ", ", w_scale.size(), ") and no bias, smooth, x_scale, x_zero_point or one per layer (",
               bias.size(), ", ", smooth.size(), ", ", x_scale.size(), ", ", x_zero_point.size(),
               "; zero points need scales)");
  const at::Tensor x2 = as_2d(x);
  const int64_t K = x2.size(1);
  auto optional = [](at::TensorList list, size_t i) {
    return list.empty() ? std::optional<at::Tensor>() : std::optional<at::Tensor>(list[i]);
  };
  std::vector<LayerWeight> weights;
  for (size_t i = 0; i < count; ++i) {
    const ActQuant aq = act_quant(optional(smooth, i), optional(x_scale, i), optional(x_zero_point, i), K);
    weights.push_back(checked_weight(w_packed[i], w_sum[i], w_scale[i], optional(bias, i), aq, K));
  }
  return native_layers(x, x2, weights, amx_min_rows);
}

// linear_group for two and three layers: a fixed number of tensor outputs, which torch.compile's
// C++ wrapper calls through the dispatcher (a Tensor[] result would go through Python).
std::tuple<at::Tensor, at::Tensor> linear_pair(const at::Tensor& x, at::TensorList w_packed, at::TensorList w_sum,
                                               at::TensorList w_scale, at::TensorList bias, at::TensorList smooth,
                                               at::TensorList x_scale, at::TensorList x_zero_point,
                                               int64_t amx_min_rows) {
  LOWBIT_CHECK(w_packed.size() == 2, "w8a8_linear_pair takes two layers, got ", w_packed.size());
  auto y = linear_group(x, w_packed, w_sum, w_scale, bias, smooth, x_scale, x_zero_point, amx_min_rows);
  return {y[0], y[1]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_triple(const at::Tensor& x, at::TensorList w_packed,
                                                             at::TensorList w_sum, at::TensorList w_scale,
                                                             at::TensorList bias, at::TensorList smooth,
                                                             at::TensorList x_scale, at::TensorList x_zero_point,
                                                             int64_t amx_min_rows) {
  LOWBIT_CHECK(w_packed.size() == 3, "w8a8_linear_triple takes three layers, got ", w_packed.size());
  auto y = linear_group(x, w_packed, w_sum, w_scale, bias, smooth, x_scale, x_zero_point, amx_min_rows);
  return {y[0], y[1], y[2]};
}

// Static per-tensor activations through a k x k convolution: quantize channels-last, oneDNN's int8 conv.
at::Tensor conv2d(const at::Tensor& x, const std::optional<at::Tensor>& smooth, const at::Tensor& x_scale,
                  const std::optional<at::Tensor>& x_zero_point, const at::Tensor& w_onednn, const at::Tensor& w_scale,
                  const std::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                  at::IntArrayRef dilation, int64_t groups) {
  LOWBIT_CHECK(x.dim() == 4, "w8a8_conv2d expects an NCHW input, got ", x.sizes());
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("onednn::qconv_pointwise", "")
                       .typed<at::Tensor(at::Tensor, double, int64_t, at::Tensor, at::Tensor, at::Tensor,
                                         std::optional<at::Tensor>, c10::List<int64_t>, c10::List<int64_t>,
                                         c10::List<int64_t>, int64_t, double, int64_t, std::optional<at::ScalarType>, c10::string_view,
                                         c10::List<std::optional<at::Scalar>>, std::optional<c10::string_view>)>();
  const at::Tensor pixels = as_2d(x.permute({0, 2, 3, 1}));  // free when x is channels-last already
  const ActQuant aq = act_quant(smooth, x_scale, x_zero_point, pixels.size(1));
  at::Tensor codes = at::empty(pixels.sizes(), at::kByte), scales = at::empty({pixels.size(0)}, at::kFloat);
  quantize_rows(pixels, aq, codes.data_ptr<uint8_t>(), pixels.size(1), scales.data_ptr<float>());
  const at::Tensor qx = codes.view({x.size(0), x.size(2), x.size(3), x.size(1)}).permute({0, 3, 1, 2});
  return op.call(qx, aq.scale, aq.code_zero(), w_onednn, w_scale, at::zeros({w_scale.size(0)}, at::kLong), bias,
                 c10::List<int64_t>(stride), c10::List<int64_t>(padding), c10::List<int64_t>(dilation), groups, 1.0, 0, x.scalar_type(), "none", c10::List<std::optional<at::Scalar>>(),
                 std::nullopt);
}

}  // namespace lowbit::int8

TORCH_LIBRARY_FRAGMENT(lowbit, m) {
  m.def("w8a8_pack(Tensor w) -> (Tensor, Tensor)");
  m.def("w8a8_quantize(Tensor x, Tensor? smooth, Tensor? x_scale, Tensor? x_zero_point) -> (Tensor, Tensor)");
  m.def(
      "w8a8_linear(Tensor x, Tensor w_packed, Tensor w_sum, Tensor w_scale, Tensor? bias, Tensor? smooth, "
      "Tensor? x_scale, Tensor? x_zero_point, Tensor? w_onednn, int onednn_min_rows, int amx_min_rows) -> Tensor");
  m.def(
      "w8a8_linear_pair(Tensor x, Tensor[] w_packed, Tensor[] w_sum, Tensor[] w_scale, Tensor[] bias, "
      "Tensor[] smooth, Tensor[] x_scale, Tensor[] x_zero_point, int amx_min_rows) -> (Tensor, Tensor)");
  m.def(
      "w8a8_linear_triple(Tensor x, Tensor[] w_packed, Tensor[] w_sum, Tensor[] w_scale, Tensor[] bias, "
      "Tensor[] smooth, Tensor[] x_scale, Tensor[] x_zero_point, int amx_min_rows) -> (Tensor, Tensor, Tensor)");
  m.def("amx_available() -> bool", &lowbit::int8::amx_ready);
  m.def(
      "w8a8_conv2d(Tensor x, Tensor? smooth, Tensor x_scale, Tensor? x_zero_point, Tensor w_onednn, Tensor w_scale, "
      "Tensor? bias, int[] stride, int[] padding, int[] dilation, int groups) -> Tensor");
}

TORCH_LIBRARY_IMPL(lowbit, CPU, m) {
  m.impl("w8a8_pack", &lowbit::int8::pack);
  m.impl("w8a8_quantize", &lowbit::int8::quantize);
  m.impl("w8a8_linear", &lowbit::int8::linear);
  m.impl("w8a8_linear_pair", &lowbit::int8::linear_pair);
  m.impl("w8a8_linear_triple", &lowbit::int8::linear_triple);
  m.impl("w8a8_conv2d", &lowbit::int8::conv2d);
}

// A oneDNN-packed weight is an MkldnnCPU tensor, which routes the call to this key.
TORCH_LIBRARY_IMPL(lowbit, MkldnnCPU, m) {
  m.impl("w8a8_linear", &lowbit::int8::linear);
  m.impl("w8a8_conv2d", &lowbit::int8::conv2d);
}
