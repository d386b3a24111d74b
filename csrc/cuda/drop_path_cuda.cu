// The CUDA implementations of the stochdepth:: ops: the kernels and their host side live in
// drop_path_kernel.cuh; this file launches them on the current stream of the tensors' device, with a
// grid sized from the device's multiprocessor count, and registers them for the CUDA dispatch key.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <ATen/ops/sort.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <array>
#include <atomic>

#include "drop_path_kernel.cuh"

namespace stochdepth {
namespace {

using at::Tensor;
using namespace kernel;

int multiprocessor_count(c10::DeviceIndex device) {
  static std::array<std::atomic<int>, 64> cache{};
  if (device >= 0 && device < static_cast<c10::DeviceIndex>(cache.size()) && cache[device].load() > 0) {
    return cache[device].load();
  }
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  if (device >= 0 && device < static_cast<c10::DeviceIndex>(cache.size())) cache[device].store(count);
  return count;
}

struct GpuLauncher {
  int64_t max_blocks(const Tensor& layout) const {
    return static_cast<int64_t>(multiprocessor_count(layout.get_device())) * kBlocksPerSm;
  }

  template <typename Op>
  void operator()(const Op& op, const Coin& coin, const LaunchPlan& plan) const {
    drop_path_kernel<Op::kPack><<<static_cast<unsigned>(plan.blocks), kThreads, 0,
                                  c10::cuda::getCurrentCUDAStream()>>>(op, coin, plan.geometry, plan.vectorized);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

std::tuple<Tensor, Tensor> drop_path_add_cuda(const Tensor& x, const Tensor& residual, const std::optional<Tensor>& seed,
                                              const Tensor& p, bool training, c10::string_view mode,
                                              bool scale_by_keep, bool relu, bool save_relu_mask) {
  check_same_device(x, "x", residual, "residual");  // before the guard, which takes CUDA devices only
  const c10::cuda::CUDAGuard guard(residual.device());
  return drop_path_add_with(GpuLauncher{}, x, residual, seed, p, training, mode, scale_by_keep, relu,
                            save_relu_mask);
}

Tensor drop_path_cuda(const Tensor& x, const std::optional<Tensor>& seed, const Tensor& p, bool training,
                      c10::string_view mode, bool scale_by_keep, std::optional<at::ScalarType> out_dtype) {
  const c10::cuda::CUDAGuard guard(x.device());
  return drop_path_with(GpuLauncher{}, x, seed, p, training, mode, scale_by_keep, out_dtype);
}

std::tuple<Tensor, Tensor> drop_path_add_relu_backward_cuda(
    const Tensor& grad, const Tensor& relu_mask, const std::optional<Tensor>& seed, const Tensor& p, bool training,
    c10::string_view mode, bool scale_by_keep, at::ScalarType x_dtype, at::ScalarType residual_dtype) {
  check_same_device(relu_mask, "relu_mask", grad, "grad");
  const c10::cuda::CUDAGuard guard(grad.device());
  return drop_path_add_relu_backward_with(GpuLauncher{}, grad, relu_mask, seed, p, training, mode, scale_by_keep,
                                          x_dtype, residual_dtype);
}

__global__ void uniforms_kernel(const int64_t* seed, float* uniforms, int64_t batch) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (row < batch) uniforms[row] = philox_uniform(static_cast<uint64_t>(*seed), static_cast<uint64_t>(row));
}

// The kept rows: each row's coin (philox_uniform(seed, b)), a stable sort of the coins (ties keep
// the smaller row first), the first `kept` rows put back in ascending order. Three launches, no sync.
Tensor subset_rows_cuda(const Tensor& seed, int64_t batch, int64_t kept) {
  check_seed(seed);
  TORCH_CHECK_VALUE(batch >= 0 && kept >= 0 && kept <= batch, "kept must be in [0, batch], got kept=",
                    std::to_string(kept), " and batch=", std::to_string(batch));
  const c10::cuda::CUDAGuard guard(seed.device());
  Tensor uniforms = at::empty({batch}, seed.options().dtype(at::kFloat));
  if (batch > 0) {
    uniforms_kernel<<<static_cast<unsigned>((batch + kThreads - 1) / kThreads), kThreads, 0,
                      c10::cuda::getCurrentCUDAStream()>>>(seed.const_data_ptr<int64_t>(),
                                                           uniforms.mutable_data_ptr<float>(), batch);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const Tensor order = std::get<1>(at::sort(uniforms, /*stable=*/true, /*dim=*/0, /*descending=*/false));
  return std::get<0>(at::sort(order.narrow(0, 0, kept), /*stable=*/false, /*dim=*/0, /*descending=*/false));
}

std::tuple<Tensor, Tensor> subset_add_cuda(const Tensor& y, const Tensor& residual, const Tensor& rows, double scale,
                                           bool relu, bool save_relu_mask) {
  check_same_device(y, "y", residual, "residual");
  const c10::cuda::CUDAGuard guard(residual.device());
  return subset_add_with(GpuLauncher{}, y, residual, rows, scale, relu, save_relu_mask);
}

Tensor subset_gather_cuda(const Tensor& grad, const Tensor& rows, double scale, at::ScalarType out_dtype) {
  const c10::cuda::CUDAGuard guard(grad.device());
  return subset_gather_with(GpuLauncher{}, grad, rows, scale, out_dtype);
}

Tensor subset_scatter_cuda(const Tensor& y, const Tensor& rows, int64_t batch, double scale, at::ScalarType out_dtype) {
  const c10::cuda::CUDAGuard guard(y.device());
  return subset_scatter_with(GpuLauncher{}, y, rows, batch, scale, out_dtype);
}

std::tuple<Tensor, Tensor> subset_add_relu_backward_cuda(const Tensor& grad, const Tensor& relu_mask,
                                                         const Tensor& rows, double scale, at::ScalarType y_dtype,
                                                         at::ScalarType residual_dtype) {
  check_same_device(relu_mask, "relu_mask", grad, "grad");
  const c10::cuda::CUDAGuard guard(grad.device());
  return subset_add_relu_backward_with(GpuLauncher{}, grad, relu_mask, rows, scale, y_dtype, residual_dtype);
}

}  // namespace

TORCH_LIBRARY_IMPL(stochdepth, CUDA, m) {
  m.impl("drop_path_add", &drop_path_add_cuda);
  m.impl("drop_path", &drop_path_cuda);
  m.impl("drop_path_add_relu_backward", &drop_path_add_relu_backward_cuda);
  m.impl("subset_rows", &subset_rows_cuda);
  m.impl("subset_add", &subset_add_cuda);
  m.impl("subset_gather", &subset_gather_cuda);
  m.impl("subset_scatter", &subset_scatter_cuda);
  m.impl("subset_add_relu_backward", &subset_add_relu_backward_cuda);
}

}  // namespace stochdepth
