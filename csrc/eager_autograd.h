// The eager entry points of the stochdepth:: ops: each runs the op's kernel for the tensors' device
// below autograd and, when autograd records the call, attaches a C++ autograd node whose backward
// runs the ops' backward kernels. They are what the "cpu" and "cuda" backends call outside
// torch.compile, which traces the registered ops and their Python autograd rules instead
// (stochdepth_kernels/ops.py); both give the same gradients. No tensor of the input's size is saved
// but the ReLU sign mask.
#pragma once

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/util/string_view.h>

#include <optional>

namespace stochdepth::eager {

// A call's seed, drawn as stochdepth_kernels/seeding.py draws it outside torch.compile (the same
// value for one generator state): torch.randint(0, 2**63 - 1, (1,), dtype=torch.int64, device=device,
// generator=generator).
at::Tensor draw_seed(c10::Device device, const std::optional<at::Generator>& generator);

// drop_path_add's output (op_schemas.h); the ReLU sign mask is asked for when a backward needs it.
at::Tensor drop_path_add(const at::Tensor& x, const at::Tensor& residual, const std::optional<at::Tensor>& seed,
                         const at::Tensor& p, bool training, c10::string_view mode, bool scale_by_keep, bool relu);

// drop_path's output in out_dtype (x's dtype when none).
at::Tensor drop_path(const at::Tensor& x, const std::optional<at::Tensor>& seed, const at::Tensor& p, bool training,
                     c10::string_view mode, bool scale_by_keep, std::optional<at::ScalarType> out_dtype);

// subset_add's output; the ReLU sign mask is saved when autograd records the call.
at::Tensor subset_add(const at::Tensor& y, const at::Tensor& residual, const at::Tensor& rows, double scale, bool relu);

// The `rows` of t (subset_gather at scale 1 in t's dtype), whose gradient is one subset_scatter pass.
at::Tensor gather_rows(const at::Tensor& t, const at::Tensor& rows);

}  // namespace stochdepth::eager
