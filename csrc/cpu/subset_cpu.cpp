// CPU kernels of the subset ops (op_schemas.h): the kept rows of a batch from the one random stream,
// and the fused add of the branch's k rows into the B rows of the output, with its backward. One
// pass over the output; the per-run loops are the row-mode kernels' (row_runs.h).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <numeric>
#include <vector>

#include "row_runs.h"

namespace stochdepth {
namespace {

using at::Tensor;
using namespace cpu;

Tensor subset_rows_cpu(const Tensor& seed, int64_t batch, int64_t kept) {
  check_seed(seed);
  TORCH_CHECK_VALUE(batch >= 0 && kept >= 0 && kept <= batch, "kept must be in [0, batch], got kept=",
                    std::to_string(kept), " and batch=", std::to_string(batch));
  const uint64_t seed_value = static_cast<uint64_t>(seed.item<int64_t>());
  std::vector<float> uniforms(static_cast<size_t>(batch));
  for (int64_t row = 0; row < batch; ++row) uniforms[row] = philox_uniform(seed_value, static_cast<uint64_t>(row));
  std::vector<int64_t> order(static_cast<size_t>(batch));
  std::iota(order.begin(), order.end(), int64_t{0});
  // Stable on rows in ascending order: equal uniforms keep the smaller row first.
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return uniforms[a] < uniforms[b]; });
  std::sort(order.begin(), order.begin() + kept);
  Tensor rows = at::empty({kept}, seed.options());
  std::copy(order.begin(), order.begin() + kept, rows.mutable_data_ptr<int64_t>());
  return rows;
}

// For each of `batch` rows its position in `rows`, -1 where it is not kept; rows must be strictly
// increasing indices below batch (what subset_rows returns).
std::vector<int64_t> slot_of_rows(const Tensor& rows, int64_t batch) {
  std::vector<int64_t> slot(static_cast<size_t>(batch), -1);
  const Tensor rows_cpu = rows.contiguous();
  const int64_t* row = rows_cpu.const_data_ptr<int64_t>();
  for (int64_t j = 0; j < rows.numel(); ++j) {
    TORCH_CHECK_VALUE(row[j] >= 0 && row[j] < batch && (j == 0 || row[j] > row[j - 1]),
                      "rows must be strictly increasing row indices in [0, ", std::to_string(batch), "), got ",
                      std::to_string(row[j]), " at position ", std::to_string(j));
    slot[row[j]] = j;
  }
  return slot;
}

std::tuple<Tensor, Tensor> subset_add_cpu(const Tensor& y, const Tensor& residual, const Tensor& rows, double scale,
                                          bool relu, bool save_relu_mask) {
  check_subset_shapes(y, residual, rows);
  check_scale(scale);
  Tensor out = batch_outermost_empty(residual, c10::promoteTypes(y.scalar_type(), residual.scalar_type()));
  Tensor relu_mask = make_relu_mask(out, relu, save_relu_mask);
  const std::vector<int64_t> slot = slot_of_rows(rows, residual.size(0));
  const Tensor y_dense = in_rows_layout_of(y, out);
  const Tensor r_dense = in_layout_of(residual, out);
  const int64_t row_numel = out.numel() / std::max<int64_t>(out.size(0), 1);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "subset_add_cpu_y", [&] {
    using y_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, residual.scalar_type(), "subset_add_cpu_r", [&] {
      using r_t = scalar_t;
      using out_t = promoted_t<y_t, r_t>;
      using acc_t = at::opmath_type<out_t>;
      const y_t* y_ptr = y_dense.const_data_ptr<y_t>();
      const r_t* r_ptr = r_dense.const_data_ptr<r_t>();
      out_t* out_ptr = out.mutable_data_ptr<out_t>();
      uint8_t* mask_ptr = save_relu_mask ? relu_mask.mutable_data_ptr<uint8_t>() : nullptr;
      const acc_t kept_factor = static_cast<acc_t>(scale);
      for_each_row_run(out, [&](int64_t row, int64_t start, int64_t n, int64_t mask_byte) {
        const int64_t j = slot[row];
        const acc_t factor = j < 0 ? acc_t(0) : kept_factor;  // a dropped row never reads y
        const y_t* y_run = j < 0 ? nullptr : y_ptr + j * row_numel + (start - row * row_numel);
        if (relu) {
          add_run<true>(y_run, r_ptr + start, out_ptr + start, n, factor);
          if (mask_ptr != nullptr) pack_relu_mask(out_ptr + start, n, mask_ptr + mask_byte);
        } else {
          add_run<false>(y_run, r_ptr + start, out_ptr + start, n, factor);
        }
      });
    });
  });
  return {out, relu_mask};
}

Tensor subset_gather_cpu(const Tensor& grad, const Tensor& rows, double scale, at::ScalarType out_dtype) {
  check_batched(grad, "grad");
  check_rows(rows, grad.size(0), grad.device());
  check_scale(scale);
  slot_of_rows(rows, grad.size(0));  // checks rows
  const Tensor g_dense = in_batch_outermost(grad);
  Tensor out = empty_rows_like(g_dense, rows.numel(), out_dtype);
  const Tensor rows_cpu = rows.contiguous();
  const int64_t* row = rows_cpu.const_data_ptr<int64_t>();
  const int64_t row_numel = g_dense.numel() / std::max<int64_t>(g_dense.size(0), 1);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "subset_gather_cpu_g", [&] {
    using g_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out_dtype, "subset_gather_cpu_out", [&] {
      using out_t = scalar_t;
      using acc_t = at::opmath_type<promoted_t<g_t, out_t>>;
      const g_t* g_ptr = g_dense.const_data_ptr<g_t>();
      out_t* out_ptr = out.mutable_data_ptr<out_t>();
      for_each_row_run(out, [&](int64_t j, int64_t start, int64_t n, int64_t) {
        scale_run(g_ptr + row[j] * row_numel + (start - j * row_numel), out_ptr + start, n, static_cast<acc_t>(scale));
      });
    });
  });
  return out;
}

Tensor subset_scatter_cpu(const Tensor& y, const Tensor& rows, int64_t batch, double scale, at::ScalarType out_dtype) {
  check_scatter_shapes(y, rows, batch);
  check_scale(scale);
  const std::vector<int64_t> slot = slot_of_rows(rows, batch);
  const Tensor y_dense = in_batch_outermost(y);
  Tensor out = empty_rows_like(y_dense, batch, out_dtype);
  const int64_t row_numel = out.numel() / std::max<int64_t>(batch, 1);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "subset_scatter_cpu_y", [&] {
    using y_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out_dtype, "subset_scatter_cpu_out", [&] {
      using out_t = scalar_t;
      using acc_t = at::opmath_type<promoted_t<y_t, out_t>>;
      const y_t* y_ptr = y_dense.const_data_ptr<y_t>();
      out_t* out_ptr = out.mutable_data_ptr<out_t>();
      for_each_row_run(out, [&](int64_t row, int64_t start, int64_t n, int64_t) {
        const int64_t j = slot[row];  // a dropped row is written 0 without reading y
        scale_run(j < 0 ? y_ptr : y_ptr + j * row_numel + (start - row * row_numel), out_ptr + start, n,
                  j < 0 ? acc_t(0) : static_cast<acc_t>(scale));
      });
    });
  });
  return out;
}

std::tuple<Tensor, Tensor> subset_add_relu_backward_cpu(const Tensor& grad, const Tensor& relu_mask,
                                                        const Tensor& rows, double scale, at::ScalarType y_dtype,
                                                        at::ScalarType residual_dtype) {
  check_relu_mask(relu_mask, grad);
  check_rows(rows, grad.size(0), grad.device());
  check_scale(scale);
  TORCH_CHECK_VALUE(is_batch_outermost(grad), "grad must be in the subset forward's layout (batch outermost), got "
                    "strides ", format_sizes(grad.strides()));
  const std::vector<int64_t> slot = slot_of_rows(rows, grad.size(0));
  Tensor grad_y = empty_rows_like(grad, rows.numel(), y_dtype);
  Tensor grad_residual = at::empty_like(grad, grad.options().dtype(residual_dtype));
  const Tensor grad_promoted = grad.to(c10::promoteTypes(y_dtype, residual_dtype));
  const int64_t row_numel = grad.numel() / std::max<int64_t>(grad.size(0), 1);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y_dtype, "subset_relu_backward_cpu_y", [&] {
    using gy_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, residual_dtype, "subset_relu_backward_cpu_r", [&] {
      using gr_t = scalar_t;
      using g_t = promoted_t<gy_t, gr_t>;
      using acc_t = at::opmath_type<g_t>;
      const g_t* g_ptr = grad_promoted.const_data_ptr<g_t>();
      const uint8_t* mask_ptr = relu_mask.const_data_ptr<uint8_t>();
      gy_t* gy_ptr = grad_y.mutable_data_ptr<gy_t>();
      gr_t* gr_ptr = grad_residual.mutable_data_ptr<gr_t>();
      for_each_row_run(grad, [&](int64_t row, int64_t start, int64_t n, int64_t mask_byte) {
        const int64_t j = slot[row];
        if (j < 0) {
          relu_backward_run<GradX::kNone>(g_ptr + start, mask_ptr + mask_byte, gy_ptr, gr_ptr + start, n, acc_t(0));
        } else {
          relu_backward_run<GradX::kScaled>(g_ptr + start, mask_ptr + mask_byte,
                                            gy_ptr + j * row_numel + (start - row * row_numel), gr_ptr + start, n,
                                            static_cast<acc_t>(scale));
        }
      });
    });
  });
  return {grad_y, grad_residual};
}

}  // namespace

TORCH_LIBRARY_IMPL(stochdepth, CPU, m) {
  m.impl("subset_rows", &subset_rows_cpu);
  m.impl("subset_add", &subset_add_cpu);
  m.impl("subset_gather", &subset_gather_cpu);
  m.impl("subset_scatter", &subset_scatter_cpu);
  m.impl("subset_add_relu_backward", &subset_add_relu_backward_cpu);
}

}  // namespace stochdepth
