// Few tokens x 8-bit weight codes on AVX2 integer units (shared by the weight-only and W8A8 ops).
//
// The tokens arrive as int16 values with one float scale per segment of inputs (a segment lies
// within one weight group); each weight row holds signed 8-bit codes (the stored code - 128) with
// a scale and a zero point (also shifted by 128) per group:
//   y[t, n] = sum_s scale[n, g(s)] * ascale[t, s] * sum_{k in s} act[t, k] * code[n, k]
//           - sum_g scale[n, g] * zero[n, g] * gsum[t, g]
// vpmaddwd sums pairs of int16 products exactly in int32 lanes; a segment's sums are converted to
// fp32 once. Bounds: |code| <= 128 and |act| <= 32767 give 8.4e6 per pair, so segments of at most
// 256 inputs (4 x 8.4e6 x 256 / 32 < 2^31) are exact for int16 activations; int8-range activations
// (|act| <= 255, W8A8) allow segments of up to 16384 inputs.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace lowbit_avx2 {

struct IntTokens {
  const int16_t* act;  // [T, Kp], zero padded
  const float* ascale;  // [T, S]: the scale of each segment
  const float* gsum;  // [T, G]: per weight group, the sum of the token's values (ascale x act)
  int64_t T, S, seg;
};

struct ByteWeight {
  const int8_t* codes;  // [N, Kp]: the stored codes - 128
  const float* scale;  // [N, G]
  const float* zero;  // [N, G]: the zero point - 128, in code units
  int64_t N, Kp, G, group;
};

// y [T, N] (row-major) = the tokens times the weight, rows split over threads.
void int8_codes_gemm(const IntTokens& a, const ByteWeight& w, float* y);

// Checks the AVX2 weight layout of an [n, k] layer: `bits` 4 (nibble blocks) or 8 (bytes), codes
// contiguous uint8, scale and zero contiguous float32 [n, groups of `group` inputs].
void check_inputs(const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& zero, int64_t bits, int64_t group,
                  int64_t n, int64_t k);

// The segment length for weights grouped by `group` inputs (G groups): a multiple of 32 that
// divides the group (or any, for one group), at most `limit`.
int64_t segment_length(int64_t group, int64_t G, int64_t Kp, int64_t limit);

}  // namespace lowbit_avx2
