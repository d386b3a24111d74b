// The arithmetic every native backend shares: Philox4x32-10, Triton's uint32 -> float mapping,
// the per-row factor and the per-element update of docs/design.md. Usable from host and device code,
// so the CPU tests exercise exactly the math the CUDA kernel runs.
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define STOCHDEPTH_HOST_DEVICE __host__ __device__ __forceinline__
#define STOCHDEPTH_UNROLL _Pragma("unroll")
#else
#define STOCHDEPTH_HOST_DEVICE inline
#define STOCHDEPTH_UNROLL _Pragma("GCC unroll 10")
#endif

namespace stochdepth {

struct Philox4x32 {
  uint32_t c[4];
};

STOCHDEPTH_HOST_DEVICE uint32_t mulhi32(uint32_t a, uint32_t b) {
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
}

// Ten rounds of Philox4x32 (Salmon et al., SC'11) on counter c and key (k0, k1); constants and
// round order as in Random123 and triton.language.random.philox_impl.
STOCHDEPTH_HOST_DEVICE Philox4x32 philox4x32_10(Philox4x32 ctr, uint32_t k0, uint32_t k1) {
  constexpr uint32_t kRoundA = 0xD2511F53u, kRoundB = 0xCD9E8D57u;
  constexpr uint32_t kKeyA = 0x9E3779B9u, kKeyB = 0xBB67AE85u;
  uint32_t c0 = ctr.c[0], c1 = ctr.c[1], c2 = ctr.c[2], c3 = ctr.c[3];
STOCHDEPTH_UNROLL
  for (int round = 0; round < 10; ++round) {
    const uint32_t old_c0 = c0, old_c2 = c2;
    c0 = mulhi32(kRoundB, old_c2) ^ c1 ^ k0;
    c2 = mulhi32(kRoundA, old_c0) ^ c3 ^ k1;
    c1 = kRoundB * old_c2;
    c3 = kRoundA * old_c0;
    k0 += kKeyA;
    k1 += kKeyB;
  }
  return Philox4x32{{c0, c1, c2, c3}};
}

// Triton's uint_to_uniform_float for 32 bits: fold the signed value onto [0, 2^31) and scale so the
// largest value stays below 1.0 in float32.
STOCHDEPTH_HOST_DEVICE float uint32_to_uniform_float(uint32_t bits) {
  int32_t v = static_cast<int32_t>(bits);
  v = v < 0 ? ~v : v;
  return static_cast<float>(v) * 4.6566127342e-10f;
}

// Exactly tl.rand(seed, counter): Philox counter (lo, hi, 0, 0), key (seed lo, seed hi), first word.
STOCHDEPTH_HOST_DEVICE float philox_uniform(uint64_t seed, uint64_t counter) {
  const Philox4x32 ctr{{static_cast<uint32_t>(counter), static_cast<uint32_t>(counter >> 32), 0u, 0u}};
  const Philox4x32 out =
      philox4x32_10(ctr, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  return uint32_to_uniform_float(out.c[0]);
}

// Everything a kernel needs to turn (seed, row) into the row's factor on x, fixed per call.
struct RowFactorParams {
  bool sample;        // training with 0 < p: draw coins; otherwise every row gets `kept`
  bool batch_mode;    // one coin (counter 0) for the whole batch
  float keep;         // float32(1 - p), compared with the uniform
  double kept;        // factor of a kept row: 1/keep, 1, or (eval, no scaling) keep
};

// keep = 1 - p in float64; a kept row is scaled by 1/keep when scale_by_keep, and in eval the
// branch is multiplied by keep when not (the paper's test-time rule).
STOCHDEPTH_HOST_DEVICE RowFactorParams make_row_factor_params(double p, bool training, bool batch_mode,
                                                              bool scale_by_keep) {
  const double keep = 1.0 - p;
  RowFactorParams params;
  params.sample = training && p > 0.0;
  params.batch_mode = batch_mode;
  params.keep = static_cast<float>(keep);
  if (params.sample) {
    params.kept = (scale_by_keep && keep > 0.0) ? 1.0 / keep : 1.0;
  } else {
    params.kept = scale_by_keep ? 1.0 : keep;
  }
  return params;
}

// The factor multiplying x in row `row`; 0 means the row is dropped and x must not be read.
template <typename acc_t>
STOCHDEPTH_HOST_DEVICE acc_t row_factor(const RowFactorParams& params, uint64_t seed, int64_t row) {
  if (!params.sample) return static_cast<acc_t>(params.kept);
  const uint64_t counter = params.batch_mode ? 0u : static_cast<uint64_t>(row);
  return philox_uniform(seed, counter) < params.keep ? static_cast<acc_t>(params.kept) : acc_t(0);
}

// relu that keeps NaN (as torch.relu does) and -0.0.
template <typename acc_t>
STOCHDEPTH_HOST_DEVICE acc_t relu(acc_t v) {
  return v < acc_t(0) ? acc_t(0) : v;
}

// out = act(residual + factor * x) for a kept row.
template <typename acc_t>
STOCHDEPTH_HOST_DEVICE acc_t drop_path_add_element(acc_t residual, acc_t x, acc_t factor, bool apply_relu) {
  const acc_t v = residual + factor * x;
  return apply_relu ? relu(v) : v;
}

// out = act(residual) for a dropped row.
template <typename acc_t>
STOCHDEPTH_HOST_DEVICE acc_t dropped_element(acc_t residual, bool apply_relu) {
  return apply_relu ? relu(residual) : residual;
}

// Whether relu passes the gradient at output value `out`: like torch's threshold_backward, a NaN
// output passes it. The ReLU sign mask stores this bit per element.
template <typename acc_t>
STOCHDEPTH_HOST_DEVICE bool relu_passes(acc_t out) {
  return !(out <= acc_t(0));
}

// act'(out) * grad for ReLU, the gradient reaching the residual, given relu_passes(out).
template <typename acc_t>
STOCHDEPTH_HOST_DEVICE acc_t relu_backward_element(acc_t grad, bool passes) {
  return passes ? grad : acc_t(0);
}

}  // namespace stochdepth
