// Shared helpers for lowbit's CPU kernels (AVX-512 F/BW/VL/DQ, VNNI, BF16).
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <cstdint>

namespace lowbit {

// Horizontal sum of 16 int32 lanes.
inline int32_t hsum_epi32(__m512i v) { return _mm512_reduce_add_epi32(v); }

// Horizontal sum of 16 float lanes.
inline float hsum_ps(__m512 v) { return _mm512_reduce_add_ps(v); }

#define LOWBIT_CHECK(cond, ...) TORCH_CHECK(cond, "lowbit: ", __VA_ARGS__)

}  // namespace lowbit
