// The schemas of the stochdepth:: ops: csrc/ops.cpp defines them for every backend, and the CUDA
// kernels' CPU simulation (tests/cuda_kernel_on_cpu.cpp) under its own namespace.
#pragma once

namespace stochdepth {

// (out, relu_mask): out = act(residual + factor_b * x), factor_b from (seed, p) as in DESIGN.md.
// seed is a 1-element int64 tensor (None when no coin is drawn: eval or p == 0); p is a 0-d float
// tensor. relu_mask is empty unless save_relu_mask (which needs relu): then it holds the bits the
// ReLU backward needs, one per element of out (layout: op_common.h, relu_mask_bytes).
constexpr const char* kDropPathAddSchema =
    "drop_path_add(Tensor x, Tensor residual, Tensor? seed, Tensor p, bool training, str mode, "
    "bool scale_by_keep, bool relu, bool save_relu_mask=False) -> (Tensor, Tensor)";

// out = factor_b * x, in out_dtype (x's dtype when None). Also the gradient of x for both ops.
constexpr const char* kDropPathSchema =
    "drop_path(Tensor x, Tensor? seed, Tensor p, bool training, str mode, bool scale_by_keep, "
    "ScalarType? out_dtype=None) -> Tensor";

// Backward of drop_path_add with relu: (grad_x, grad_residual), grad_residual = grad where the
// forward's relu_mask bit is set, else 0; grad_x = factor_b * grad_residual. grad must be dense in
// the forward output's layout (which gives the mask's layout); the gradients come in that layout.
constexpr const char* kReluBackwardSchema =
    "drop_path_add_relu_backward(Tensor grad, Tensor relu_mask, Tensor? seed, Tensor p, bool training, "
    "str mode, bool scale_by_keep, ScalarType x_dtype, ScalarType residual_dtype) -> (Tensor, Tensor)";

}  // namespace stochdepth
