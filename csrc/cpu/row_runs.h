// The per-run loops of the CPU kernels (drop_path_cpu.cpp, subset_cpu.cpp): a dense tensor walked in
// memory order as runs of elements that share a batch row, threads via at::parallel_for, row-uniform
// branches so a dropped row never reads x, contiguous restrict-qualified inner loops the compiler
// vectorises. Math from stochdepth_math.h, shared with the CUDA kernel.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstring>
#include <type_traits>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "../op_common.h"
#include "../stochdepth_math.h"

namespace stochdepth::cpu {

using at::Tensor;

// Elements handed to one thread at a time: large enough to amortise the scheduling (~1 us),
// small enough to balance a (64, 256, 28, 28) tensor over many cores.
constexpr int64_t kGrainSize = 1 << 15;

// Walks a dense tensor in memory order as runs of elements that share a batch row, in parallel.
// In a dense layout the batch index of memory offset o is (o / stride(0)) % B, so consecutive
// runs of stride(0) elements share a row; with the batch outermost a run is one whole sample.
// Threads split the runs at groups of kMaskGroup elements, so each owns whole bytes of the ReLU
// sign mask; run_fn(row, start, n, mask_byte) gets the mask byte of the span's first element.
template <typename RunFn>
void for_each_row_run(const Tensor& dense, RunFn run_fn) {
  const int64_t numel = dense.numel();
  if (numel == 0) return;
  const int64_t batch = dense.size(0);
  const int64_t run = run_length_of(dense);
  const int64_t groups_per_run = mask_bytes_per_run(run);
  at::parallel_for(0, numel / run * groups_per_run, kGrainSize / kMaskGroup, [&](int64_t begin, int64_t end) {
    for (int64_t group = begin; group < end;) {
      const int64_t run_index = group / groups_per_run;
      const int64_t run_first_group = run_index * groups_per_run;
      const int64_t stop = std::min(end, run_first_group + groups_per_run);
      const int64_t first = (group - run_first_group) * kMaskGroup;
      const int64_t last = std::min((stop - run_first_group) * kMaskGroup, run);
      run_fn(run_index % batch, run_index * run + first, last - first, group);
      group = stop;
    }
  });
}

template <bool kRelu, typename x_t, typename r_t, typename out_t, typename acc_t>
void add_run(const x_t* __restrict__ x, const r_t* __restrict__ r, out_t* __restrict__ out,
             int64_t n, acc_t factor) {
  if (factor == acc_t(0)) {
    for (int64_t i = 0; i < n; ++i) {
      out[i] = static_cast<out_t>(dropped_element<acc_t>(static_cast<acc_t>(r[i]), kRelu));
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      out[i] = static_cast<out_t>(drop_path_add_element<acc_t>(
          static_cast<acc_t>(r[i]), static_cast<acc_t>(x[i]), factor, kRelu));
    }
  }
}

// One mask byte: bit k = relu_passes(v[k]) for 8 values. SSE2 (every x86-64) compares and
// gathers the sign bits 4 floats / 2 doubles at a time; the compiler does not find that itself
// (scalar bit assembly made the forward ~2x slower here).
template <typename acc_t>
inline uint8_t relu_mask_byte_portable(const acc_t* v) {
  uint8_t bits = 0;
  for (int k = 0; k < kMaskGroup; ++k) bits |= static_cast<uint8_t>(relu_passes(v[k])) << k;
  return bits;
}

inline uint8_t relu_mask_byte(const float* v) {
#if defined(__SSE2__)
  const __m128 zero = _mm_setzero_ps();  // cmpnle is !(v <= 0): NaN passes, as relu_passes
  const int low = _mm_movemask_ps(_mm_cmpnle_ps(_mm_loadu_ps(v), zero));
  const int high = _mm_movemask_ps(_mm_cmpnle_ps(_mm_loadu_ps(v + 4), zero));
  return static_cast<uint8_t>(low | high << 4);
#else
  return relu_mask_byte_portable(v);
#endif
}

inline uint8_t relu_mask_byte(const double* v) {
#if defined(__SSE2__)
  const __m128d zero = _mm_setzero_pd();
  int bits = 0;
  for (int k = 0; k < kMaskGroup; k += 2) bits |= _mm_movemask_pd(_mm_cmpnle_pd(_mm_loadu_pd(v + k), zero)) << k;
  return static_cast<uint8_t>(bits);
#else
  return relu_mask_byte_portable(v);
#endif
}

// The mask bytes of n output elements just written (still in cache), read back in the stored
// dtype as eager's relu backward reads its output; a second, short pass keeps add_run vectorised.
template <typename out_t>
void pack_relu_mask(const out_t* __restrict__ out, int64_t n, uint8_t* __restrict__ mask) {
  using acc_t = at::opmath_type<out_t>;
  const int64_t whole = n - n % kMaskGroup;
  for (int64_t first = 0; first < whole; first += kMaskGroup) {
    if constexpr (std::is_same_v<out_t, acc_t>) {
      mask[first / kMaskGroup] = relu_mask_byte(out + first);
    } else {
      acc_t values[kMaskGroup];
      for (int64_t k = 0; k < kMaskGroup; ++k) values[k] = static_cast<acc_t>(out[first + k]);
      mask[first / kMaskGroup] = relu_mask_byte(values);
    }
  }
  if (whole < n) {
    acc_t values[kMaskGroup] = {};  // past the run's end: 0, whose bit is 0
    for (int64_t k = 0; whole + k < n; ++k) values[k] = static_cast<acc_t>(out[whole + k]);
    mask[whole / kMaskGroup] = relu_mask_byte(values);
  }
}

template <typename x_t, typename out_t, typename acc_t>
void scale_run(const x_t* __restrict__ x, out_t* __restrict__ out, int64_t n, acc_t factor) {
  if (factor == acc_t(0)) {
    for (int64_t i = 0; i < n; ++i) out[i] = out_t(0);
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<out_t>(factor * static_cast<acc_t>(x[i]));
  }
}

// For each mask byte, the lanes of its 8 elements: all ones where the bit is set, else zeros. ANDing
// a gradient's bits with its lane gives relu'(out) * grad (the gradient itself or +0.0); indexing
// this table per byte vectorises, where deriving the lanes from the bits did not (3-5x slower here).
template <typename bits_t>
struct LaneMasks {
  bits_t lanes[256][kMaskGroup];
  constexpr LaneMasks() : lanes{} {
    for (int byte = 0; byte < 256; ++byte) {
      for (int k = 0; k < kMaskGroup; ++k) lanes[byte][k] = (byte >> k) & 1 ? static_cast<bits_t>(~bits_t(0)) : bits_t(0);
    }
  }
};

template <typename T>
using bits_of_t = std::conditional_t<sizeof(T) == 8, uint64_t, std::conditional_t<sizeof(T) == 4, uint32_t, uint16_t>>;

template <typename T>
inline constexpr LaneMasks<bits_of_t<T>> kLaneMasks{};

// relu'(out) * grad for n gradients, in grad's dtype: each gradient's bits ANDed with its lane, the
// gradient itself or +0.0. Whole mask bytes with a fixed trip count (vectorised), then the run's
// partial byte.
template <typename g_t>
void mask_gradient_run(const g_t* __restrict__ grad, const uint8_t* __restrict__ mask, g_t* __restrict__ out,
                       int64_t n) {
  using bits_t = bits_of_t<g_t>;
  static_assert(sizeof(bits_t) == sizeof(g_t), "a floating type of 2, 4 or 8 bytes");
  const auto mask_group = [&](int64_t first, int64_t k) {
    bits_t bits;
    std::memcpy(&bits, grad + first + k, sizeof(bits));
    bits &= kLaneMasks<g_t>.lanes[mask[first / kMaskGroup]][k];
    std::memcpy(out + first + k, &bits, sizeof(bits));
  };
  const int64_t whole = n - n % kMaskGroup;
  for (int64_t first = 0; first < whole; first += kMaskGroup) {
    for (int64_t k = 0; k < kMaskGroup; ++k) mask_group(first, k);
  }
  for (int64_t k = 0; whole + k < n; ++k) mask_group(whole, k);
}

template <typename to_t, typename from_t>
to_t cast_through_opmath(from_t value) {
  return static_cast<to_t>(static_cast<at::opmath_type<from_t>>(value));
}

// Two passes over the span, the second reading what the first wrote (in cache): the masking, then
// the scaling; each vectorises, where one pass computing both gradients did not (bf16: ~5x slower
// here). A dropped row's grad_x is exactly 0 (GradX::kZero), even where g is infinite (0 * inf =
// NaN); a subset's dropped row has no grad_x row (GradX::kNone).
enum class GradX { kScaled, kZero, kNone };

template <GradX kGradX, typename g_t, typename gx_t, typename gr_t, typename acc_t>
void relu_backward_run(const g_t* __restrict__ grad, const uint8_t* __restrict__ mask,
                       gx_t* __restrict__ grad_x, gr_t* __restrict__ grad_residual, int64_t n,
                       acc_t factor) {
  if constexpr (std::is_same_v<gr_t, g_t>) {  // the common case: the residual's dtype is the wider
    mask_gradient_run(grad, mask, grad_residual, n);
    if constexpr (kGradX != GradX::kNone) {
      for (int64_t i = 0; i < n; ++i) {
        grad_x[i] = kGradX == GradX::kZero ? gx_t(0) : static_cast<gx_t>(factor * static_cast<acc_t>(grad_residual[i]));
      }
    }
  } else {  // a narrower residual: the masked gradient a group at a time, then both outputs
    for (int64_t first = 0; first < n; first += kMaskGroup) {
      const int64_t count = std::min(kMaskGroup, n - first);
      g_t g[kMaskGroup];
      mask_gradient_run(grad + first, mask + first / kMaskGroup, g, count);
      for (int64_t k = 0; k < count; ++k) {
        grad_residual[first + k] = cast_through_opmath<gr_t>(g[k]);
        if constexpr (kGradX != GradX::kNone) {
          grad_x[first + k] = kGradX == GradX::kZero ? gx_t(0) : static_cast<gx_t>(factor * static_cast<acc_t>(g[k]));
        }
      }
    }
  }
}

}  // namespace stochdepth::cpu
