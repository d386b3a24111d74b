// The schemas of the stochdepth:: ops: csrc/ops.cpp defines them for every backend, and the CUDA
// kernels' CPU simulation (tests/cuda_kernel_on_cpu.cpp) under its own namespace.
#pragma once

namespace stochdepth {

// (out, relu_mask): out = act(residual + factor_b * x), factor_b from (seed, p) as in docs/design.md.
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

// The subset method (README, "The subset method"): the `kept` rows of a batch of `batch` with the
// smallest philox_uniform(seed, b), ties by index, in ascending order (int64, on seed's device).
constexpr const char* kSubsetRowsSchema = "subset_rows(Tensor seed, int batch, int kept) -> Tensor";

// (out, relu_mask): out[b] = act(residual[b] + scale * y[j]) where b = rows[j] (rows: subset_rows'),
// act(residual[b]) in every other row, which never reads y. y holds the k = rows.numel() kept rows.
// out has residual's layout when the batch dimension is outermost in it, else the contiguous one;
// relu_mask as drop_path_add's.
constexpr const char* kSubsetAddSchema =
    "subset_add(Tensor y, Tensor residual, Tensor rows, float scale, bool relu, bool save_relu_mask=False) "
    "-> (Tensor, Tensor)";

// y's gradient without an activation: out[j] = scale * grad[rows[j]], in out_dtype.
constexpr const char* kSubsetGatherSchema =
    "subset_gather(Tensor grad, Tensor rows, float scale, ScalarType out_dtype) -> Tensor";

// The transpose of subset_gather (the gradient of gathering the kept rows of a block's input):
// out[b] = scale * y[j] where b = rows[j], 0 in every other of the `batch` rows (not reading y there).
constexpr const char* kSubsetScatterSchema =
    "subset_scatter(Tensor y, Tensor rows, int batch, float scale, ScalarType out_dtype) -> Tensor";

// Backward of subset_add with relu: (grad_y, grad_residual), grad_residual = grad where the forward's
// relu_mask bit is set, else 0; grad_y[j] = scale * grad_residual[rows[j]]. grad as for
// drop_path_add_relu_backward.
constexpr const char* kSubsetReluBackwardSchema =
    "subset_add_relu_backward(Tensor grad, Tensor relu_mask, Tensor rows, float scale, ScalarType y_dtype, "
    "ScalarType residual_dtype) -> (Tensor, Tensor)";

}  // namespace stochdepth
