// The CUDA kernels of csrc/cuda/drop_path_kernel.cuh, run on the CPU one (block, thread) at a time.
// The kernels use no shared memory and no barriers, so running the threads of a grid one after
// another computes what the GPU computes. tests/test_cuda_kernel.py builds this file and checks the
// ops it registers (stochdepth_cuda_on_cpu::*, the stochdepth:: schemas) against the reference:
// the kernels' geometry, pack paths and per-run row factors are tested in CI, which has no GPU.
#define __device__
#define __global__
#define __forceinline__ inline
#define __launch_bounds__(...)

struct SimulatedIndex {
  unsigned x;
};
thread_local SimulatedIndex blockIdx, threadIdx, gridDim;

#include <torch/library.h>

#include "cuda/drop_path_kernel.cuh"
#include "op_schemas.h"

namespace {

using at::Tensor;
using namespace stochdepth::kernel;

struct SequentialLauncher {
  // Few blocks: each covers several chunks and crosses runs, the paths a GPU grid takes on large tensors.
  int64_t max_blocks(const Tensor&) const { return 3; }

  template <typename Op>
  void operator()(const Op& op, const Coin& coin, const LaunchPlan& plan) const {
    gridDim.x = static_cast<unsigned>(plan.blocks);
    for (unsigned block = 0; block < gridDim.x; ++block) {
      for (unsigned thread = 0; thread < static_cast<unsigned>(kThreads); ++thread) {
        blockIdx.x = block;
        threadIdx.x = thread;
        drop_path_kernel<Op::kPack>(op, coin, plan.geometry, plan.vectorized);
      }
    }
  }
};

std::tuple<Tensor, Tensor> drop_path_add(const Tensor& x, const Tensor& residual, const std::optional<Tensor>& seed,
                                         const Tensor& p, bool training, c10::string_view mode, bool scale_by_keep,
                                         bool relu, bool save_relu_mask) {
  return drop_path_add_with(SequentialLauncher{}, x, residual, seed, p, training, mode, scale_by_keep, relu,
                            save_relu_mask);
}

Tensor drop_path(const Tensor& x, const std::optional<Tensor>& seed, const Tensor& p, bool training,
                 c10::string_view mode, bool scale_by_keep, std::optional<at::ScalarType> out_dtype) {
  return drop_path_with(SequentialLauncher{}, x, seed, p, training, mode, scale_by_keep, out_dtype);
}

std::tuple<Tensor, Tensor> drop_path_add_relu_backward(const Tensor& grad, const Tensor& relu_mask,
                                                       const std::optional<Tensor>& seed, const Tensor& p,
                                                       bool training, c10::string_view mode, bool scale_by_keep,
                                                       at::ScalarType x_dtype, at::ScalarType residual_dtype) {
  return drop_path_add_relu_backward_with(SequentialLauncher{}, grad, relu_mask, seed, p, training, mode,
                                          scale_by_keep, x_dtype, residual_dtype);
}

std::tuple<Tensor, Tensor> subset_add(const Tensor& y, const Tensor& residual, const Tensor& rows, double scale,
                                      bool relu, bool save_relu_mask) {
  return subset_add_with(SequentialLauncher{}, y, residual, rows, scale, relu, save_relu_mask);
}

Tensor subset_gather(const Tensor& grad, const Tensor& rows, double scale, at::ScalarType out_dtype) {
  return subset_gather_with(SequentialLauncher{}, grad, rows, scale, out_dtype);
}

Tensor subset_scatter(const Tensor& y, const Tensor& rows, int64_t batch, double scale, at::ScalarType out_dtype) {
  return subset_scatter_with(SequentialLauncher{}, y, rows, batch, scale, out_dtype);
}

std::tuple<Tensor, Tensor> subset_add_relu_backward(const Tensor& grad, const Tensor& relu_mask, const Tensor& rows,
                                                    double scale, at::ScalarType y_dtype,
                                                    at::ScalarType residual_dtype) {
  return subset_add_relu_backward_with(SequentialLauncher{}, grad, relu_mask, rows, scale, y_dtype, residual_dtype);
}

}  // namespace

// The stochdepth:: schemas under another namespace, implemented by the simulated kernels.
TORCH_LIBRARY(stochdepth_cuda_on_cpu, m) {
  m.def(stochdepth::kDropPathAddSchema);
  m.def(stochdepth::kDropPathSchema);
  m.def(stochdepth::kReluBackwardSchema);
  m.def(stochdepth::kSubsetAddSchema);
  m.def(stochdepth::kSubsetGatherSchema);
  m.def(stochdepth::kSubsetScatterSchema);
  m.def(stochdepth::kSubsetReluBackwardSchema);
}

TORCH_LIBRARY_IMPL(stochdepth_cuda_on_cpu, CPU, m) {
  m.impl("drop_path_add", &drop_path_add);
  m.impl("drop_path", &drop_path);
  m.impl("drop_path_add_relu_backward", &drop_path_add_relu_backward);
  m.impl("subset_add", &subset_add);
  m.impl("subset_gather", &subset_gather);
  m.impl("subset_scatter", &subset_scatter);
  m.impl("subset_add_relu_backward", &subset_add_relu_backward);
}
