// Host-side code every device implementation of the stochdepth:: ops shares: argument checks (each
// message names the argument and the value), torch.result_type of two floating dtypes, the layout of
// the ReLU sign mask, and copying an input into the output's layout so that kernels walk dense
// tensors in one memory order.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/empty_strided.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

namespace stochdepth {

// torch.result_type for two floating types, at compile time.
template <typename a_t, typename b_t>
using promoted_t = std::conditional_t<
    std::is_same_v<a_t, b_t>, a_t,
    std::conditional_t<std::is_same_v<a_t, double> || std::is_same_v<b_t, double>, double, float>>;

// Messages format numbers with std::to_string, not through c10::str's ostream: streaming a double
// there segfaulted with the torch 2.11 build of the GPU machine.
inline std::string format_sizes(at::IntArrayRef sizes) {
  std::string text = "[";
  for (size_t i = 0; i < sizes.size(); ++i) {
    text += (i ? ", " : "") + std::to_string(sizes[i]);
  }
  return text + "]";
}

inline void check_batched(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.dim() > 0, name, " must have a batch dimension, got a 0-d tensor");
}

inline void check_same_batched_shape(const at::Tensor& a, const char* a_name, const at::Tensor& b,
                                     const char* b_name) {
  TORCH_CHECK_VALUE(a.sizes() == b.sizes(), a_name, " and ", b_name, " must have the same shape, got ",
                    format_sizes(a.sizes()), " and ", format_sizes(b.sizes()));
  check_batched(a, a_name);
}

inline void check_same_device(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name) {
  TORCH_CHECK_VALUE(a.device() == b.device(), a_name, " and ", b_name, " must be on the same device, got ",
                    a.device().str(), " and ", b.device().str());
}

inline bool is_batch_mode(c10::string_view mode) {
  TORCH_CHECK_VALUE(mode == "row" || mode == "batch", "mode must be 'row' or 'batch', got '", mode, "'");
  return mode == "batch";
}

inline void check_p(const at::Tensor& p) {
  TORCH_CHECK_VALUE(p.numel() == 1, "p must hold one value, got ", std::to_string(p.numel()));
}

inline void check_seed(const std::optional<at::Tensor>& seed) {
  TORCH_CHECK_VALUE(!seed.has_value() || (seed->numel() == 1 && seed->scalar_type() == at::kLong),
                    "seed must be a 1-element int64 tensor, got ",
                    seed.has_value() ? std::string(c10::toString(seed->scalar_type())) + " tensor of shape " +
                                           format_sizes(seed->sizes())
                                     : std::string("None"));
}

// The ReLU sign mask. A dense tensor's memory splits into runs of run_length elements that share a
// batch row (one whole sample when the batch dimension is outermost), as every kernel walks it. Each
// run takes ceil(run_length / 8) bytes of the mask; bit k of a run's byte j is set where element
// 8j + k of the run (memory order) of the forward output is positive or NaN: where relu passes its
// gradient, as threshold_backward decides. Runs start on byte boundaries, so a kernel thread that
// handles whole groups of 8 elements of a run owns its bytes.
constexpr int64_t kMaskGroup = 8;

inline int64_t run_length_of(const at::Tensor& dense) {
  return dense.size(0) > 1 ? dense.stride(0) : dense.numel();
}

inline int64_t mask_bytes_per_run(int64_t run_length) {
  return (run_length + kMaskGroup - 1) / kMaskGroup;
}

inline int64_t relu_mask_bytes(const at::Tensor& dense) {
  if (dense.numel() == 0) return 0;
  const int64_t run_length = run_length_of(dense);
  return dense.numel() / run_length * mask_bytes_per_run(run_length);
}

// The forward's second output: the mask for `out` when asked for (relu only), else empty.
inline at::Tensor make_relu_mask(const at::Tensor& out, bool relu, bool save_relu_mask) {
  TORCH_CHECK_VALUE(relu || !save_relu_mask, "save_relu_mask=True needs relu=True, got relu=False");
  return at::empty({save_relu_mask ? relu_mask_bytes(out) : 0}, out.options().dtype(at::kByte));
}

// The relu backward's grad gives the forward output's layout and so the mask's.
inline void check_relu_mask(const at::Tensor& relu_mask, const at::Tensor& grad) {
  check_batched(grad, "grad");
  TORCH_CHECK_VALUE(grad.is_non_overlapping_and_dense(),
                    "grad must be dense, in the forward output's layout, got strides ", format_sizes(grad.strides()));
  const int64_t bytes = relu_mask_bytes(grad);
  TORCH_CHECK_VALUE(relu_mask.scalar_type() == at::kByte && relu_mask.dim() == 1 && relu_mask.numel() == bytes,
                    "relu_mask must be the forward's uint8 mask of ", std::to_string(bytes),
                    " bytes for grad of shape ", format_sizes(grad.sizes()), ", got ",
                    c10::toString(relu_mask.scalar_type()), " tensor of shape ", format_sizes(relu_mask.sizes()));
}

// `t` itself when it already has `layout`'s strides, else a copy of it in that layout.
inline at::Tensor in_layout_of(const at::Tensor& t, const at::Tensor& layout) {
  if (t.strides() == layout.strides()) return t;
  return at::empty_like(layout, t.options()).copy_(t);
}

// The subset ops walk tensors whose batch dimension is outermost in memory, so that a row of y (k
// rows) and a row of the output (B rows) have one layout: row r starts at r * row_numel.
inline bool is_batch_outermost(const at::Tensor& t) {
  return t.dim() > 0 && t.is_non_overlapping_and_dense() && (t.size(0) <= 1 || t.stride(0) * t.size(0) == t.numel());
}

// An output like `like` in `dtype`: like's layout where the batch dimension is outermost, else contiguous.
inline at::Tensor batch_outermost_empty(const at::Tensor& like, at::ScalarType dtype) {
  at::Tensor out = at::empty_like(like, like.options().dtype(dtype));
  return is_batch_outermost(out) ? out : at::empty(like.sizes(), like.options().dtype(dtype));
}

// `t` in the layout of batch_outermost_empty(t): itself when it already is.
inline at::Tensor in_batch_outermost(const at::Tensor& t) {
  return is_batch_outermost(t) ? t : batch_outermost_empty(t, t.scalar_type()).copy_(t);
}

// An empty tensor of `rows` rows of `layout`'s row shape, each row in layout's row layout (layout's
// batch dimension outermost).
inline at::Tensor empty_rows_like(const at::Tensor& layout, int64_t rows, at::ScalarType dtype) {
  std::vector<int64_t> sizes(layout.sizes().begin(), layout.sizes().end());
  if (layout.size(0) == 0) {  // no row to take the layout from
    sizes[0] = rows;
    return at::empty(sizes, layout.options().dtype(dtype));
  }
  std::vector<int64_t> strides(layout.strides().begin(), layout.strides().end());
  sizes[0] = rows;
  strides[0] = layout.size(0) > 0 ? layout.numel() / layout.size(0) : 1;
  return at::empty_strided(sizes, strides, layout.options().dtype(dtype));
}

// `t` (rows of layout's row shape) in the row layout of `layout`: itself when it already has it.
inline at::Tensor in_rows_layout_of(const at::Tensor& t, const at::Tensor& layout) {
  at::Tensor like = empty_rows_like(layout, t.size(0), t.scalar_type());
  return t.strides() == like.strides() ? t : like.copy_(t);
}

// rows: 1-D int64 on `device` with at most `batch` entries (the kept rows of a subset call).
inline void check_rows(const at::Tensor& rows, int64_t batch, const at::Device& device) {
  TORCH_CHECK_VALUE(rows.dim() == 1 && rows.scalar_type() == at::kLong && rows.numel() <= batch,
                    "rows must be a 1-D int64 tensor of at most ", std::to_string(batch), " kept rows, got ",
                    c10::toString(rows.scalar_type()), " tensor of shape ", format_sizes(rows.sizes()));
  TORCH_CHECK_VALUE(rows.device() == device, "rows must be on ", device.str(), ", got a tensor on ",
                    rows.device().str());
}

// y holds rows.numel() rows of residual's row shape.
inline void check_subset_shapes(const at::Tensor& y, const at::Tensor& residual, const at::Tensor& rows) {
  check_batched(residual, "residual");
  check_same_device(y, "y", residual, "residual");
  TORCH_CHECK_VALUE(y.dim() == residual.dim() && y.sizes().slice(1) == residual.sizes().slice(1) &&
                        y.size(0) == rows.numel(),
                    "y must hold the ", std::to_string(rows.numel()), " kept rows of residual's shape ",
                    format_sizes(residual.sizes()), ", got shape ", format_sizes(y.sizes()));
  check_rows(rows, residual.size(0), residual.device());
}

// y holds the rows.numel() kept rows of a batch of `batch` (subset_scatter's input).
inline void check_scatter_shapes(const at::Tensor& y, const at::Tensor& rows, int64_t batch) {
  check_batched(y, "y");
  TORCH_CHECK_VALUE(batch >= y.size(0), "batch must hold y's ", std::to_string(y.size(0)), " rows, got ",
                    std::to_string(batch));
  check_rows(rows, batch, y.device());
  TORCH_CHECK_VALUE(rows.numel() == y.size(0), "rows must name y's ", std::to_string(y.size(0)), " rows, got ",
                    std::to_string(rows.numel()));
}

inline void check_scale(double scale) {
  TORCH_CHECK_VALUE(scale > 0.0 && scale < INFINITY, "scale must be positive and finite, got ", std::to_string(scale));
}

}  // namespace stochdepth
