// Fused CPU kernels of the stochdepth:: ops: one pass over memory, threads via at::parallel_for,
// row-uniform branches so a dropped row never reads x, contiguous restrict-qualified inner loops
// the compiler vectorises. Math from stochdepth_math.h, shared with the CUDA kernel.
//
// setup.py builds this file twice, as the Python modules _cpu_default (baseline x86-64) and
// _cpu_avx2 (-mavx2 -mf16c; no FMA, so results stay bit-identical to the reference), and
// stochdepth_kernels/ops.py imports the one the CPU runs:
// importing a module runs its CPU registration. 16-bit floats gain most (hardware fp16 conversion,
// wider vectors): measured here, bf16 forward 1.4 -> 0.7 ms, fp16 20 -> 2 ms on (8, 512, 28, 28).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "../op_common.h"
#include "../stochdepth_math.h"

namespace stochdepth {
namespace {

using at::Tensor;

// Elements handed to one thread at a time: large enough to amortise the scheduling (~1 us),
// small enough to balance a (64, 256, 28, 28) tensor over many cores.
constexpr int64_t kGrainSize = 1 << 15;

struct CallConfig {
  RowFactorParams params;
  uint64_t seed;
};

CallConfig make_config(const std::optional<Tensor>& seed, const Tensor& p, bool training,
                       c10::string_view mode, bool scale_by_keep) {
  check_p(p);
  const double p_value = p.item<double>();
  TORCH_CHECK_VALUE(p_value >= 0.0 && p_value <= 1.0, "p must be in [0, 1], got ", std::to_string(p_value));
  CallConfig config{make_row_factor_params(p_value, training, is_batch_mode(mode), scale_by_keep), 0};
  if (config.params.sample) {
    TORCH_CHECK_VALUE(seed.has_value(), "seed must be a 1-element int64 tensor when training with p > 0, got None");
    check_seed(seed);
    config.seed = static_cast<uint64_t>(seed->item<int64_t>());
  }
  return config;
}

// One factor per row: B Philox draws, negligible next to the element pass.
template <typename acc_t>
std::vector<acc_t> row_factors(const CallConfig& config, int64_t batch) {
  std::vector<acc_t> factors(static_cast<size_t>(batch));
  for (int64_t row = 0; row < batch; ++row) {
    factors[row] = row_factor<acc_t>(config.params, config.seed, row);
  }
  return factors;
}

// Walks a dense tensor in memory order as runs of elements that share a batch row, in parallel.
// In a dense layout the batch index of memory offset o is (o / stride(0)) % B, so consecutive
// runs of stride(0) elements share a row; with the batch outermost a run is one whole sample.
template <typename RunFn>
void for_each_row_run(const Tensor& dense, RunFn run_fn) {
  const int64_t numel = dense.numel();
  if (numel == 0) return;
  const int64_t batch = dense.size(0);
  const int64_t run = batch > 1 ? dense.stride(0) : numel;
  at::parallel_for(0, numel, kGrainSize, [&](int64_t begin, int64_t end) {
    for (int64_t start = begin; start < end;) {
      const int64_t run_index = start / run;
      const int64_t stop = std::min(end, (run_index + 1) * run);
      run_fn(run_index % batch, start, stop - start);
      start = stop;
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

Tensor drop_path_add_cpu(const Tensor& x, const Tensor& residual, const std::optional<Tensor>& seed,
                         const Tensor& p, bool training, c10::string_view mode, bool scale_by_keep,
                         bool relu) {
  check_same_batched_shape(x, "x", residual, "residual");
  const CallConfig config = make_config(seed, p, training, mode, scale_by_keep);
  const auto out_dtype = c10::promoteTypes(x.scalar_type(), residual.scalar_type());
  Tensor out = at::empty_like(residual, residual.options().dtype(out_dtype));
  const Tensor x_dense = in_layout_of(x, out);
  const Tensor r_dense = in_layout_of(residual, out);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "drop_path_add_cpu_x", [&] {
    using x_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, residual.scalar_type(), "drop_path_add_cpu_r", [&] {
      using r_t = scalar_t;
      using out_t = promoted_t<x_t, r_t>;
      using acc_t = at::opmath_type<out_t>;
      TORCH_INTERNAL_ASSERT(c10::CppTypeToScalarType<out_t>::value == out_dtype);
      const auto factors = row_factors<acc_t>(config, x.size(0));
      const x_t* x_ptr = x_dense.const_data_ptr<x_t>();
      const r_t* r_ptr = r_dense.const_data_ptr<r_t>();
      out_t* out_ptr = out.mutable_data_ptr<out_t>();
      for_each_row_run(out, [&](int64_t row, int64_t start, int64_t n) {
        if (relu) {
          add_run<true>(x_ptr + start, r_ptr + start, out_ptr + start, n, factors[row]);
        } else {
          add_run<false>(x_ptr + start, r_ptr + start, out_ptr + start, n, factors[row]);
        }
      });
    });
  });
  return out;
}

template <typename x_t, typename out_t, typename acc_t>
void scale_run(const x_t* __restrict__ x, out_t* __restrict__ out, int64_t n, acc_t factor) {
  if (factor == acc_t(0)) {
    for (int64_t i = 0; i < n; ++i) out[i] = out_t(0);
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<out_t>(factor * static_cast<acc_t>(x[i]));
  }
}

Tensor drop_path_cpu(const Tensor& x, const std::optional<Tensor>& seed, const Tensor& p,
                     bool training, c10::string_view mode, bool scale_by_keep,
                     std::optional<at::ScalarType> out_dtype) {
  check_batched(x, "x");
  const CallConfig config = make_config(seed, p, training, mode, scale_by_keep);
  Tensor out = at::empty_like(x, x.options().dtype(out_dtype.value_or(x.scalar_type())));
  const Tensor x_dense = in_layout_of(x, out);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "drop_path_cpu_x", [&] {
    using x_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "drop_path_cpu_out", [&] {
      using out_t = scalar_t;
      using acc_t = at::opmath_type<promoted_t<x_t, out_t>>;
      const auto factors = row_factors<acc_t>(config, x.size(0));
      const x_t* x_ptr = x_dense.const_data_ptr<x_t>();
      out_t* out_ptr = out.mutable_data_ptr<out_t>();
      for_each_row_run(out, [&](int64_t row, int64_t start, int64_t n) {
        scale_run(x_ptr + start, out_ptr + start, n, factors[row]);
      });
    });
  });
  return out;
}

template <typename g_t, typename gx_t, typename gr_t, typename acc_t>
void relu_backward_run(const g_t* __restrict__ grad, const g_t* __restrict__ out,
                       gx_t* __restrict__ grad_x, gr_t* __restrict__ grad_residual, int64_t n,
                       acc_t factor) {
  // A dropped row's grad_x is exactly 0, even where g is infinite (0 * inf would be NaN).
  const bool dropped = factor == acc_t(0);
  for (int64_t i = 0; i < n; ++i) {
    const acc_t g = relu_backward_element<acc_t>(static_cast<acc_t>(grad[i]), static_cast<acc_t>(out[i]));
    grad_residual[i] = static_cast<gr_t>(g);
    grad_x[i] = static_cast<gx_t>(dropped ? acc_t(0) : factor * g);
  }
}

std::tuple<Tensor, Tensor> drop_path_add_relu_backward_cpu(
    const Tensor& grad, const Tensor& out, const std::optional<Tensor>& seed, const Tensor& p,
    bool training, c10::string_view mode, bool scale_by_keep, at::ScalarType x_dtype,
    at::ScalarType residual_dtype) {
  check_same_batched_shape(out, "out", grad, "grad");
  check_relu_backward_out(out, x_dtype, residual_dtype);
  const CallConfig config = make_config(seed, p, training, mode, scale_by_keep);
  Tensor grad_x = at::empty_like(out, out.options().dtype(x_dtype));
  Tensor grad_residual = at::empty_like(out, out.options().dtype(residual_dtype));
  const Tensor out_dense = in_layout_of(out, grad_x);
  const Tensor grad_dense = in_layout_of(grad.to(out.scalar_type()), grad_x);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_dtype, "relu_backward_cpu_x", [&] {
    using gx_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, residual_dtype, "relu_backward_cpu_r", [&] {
      using gr_t = scalar_t;
      using g_t = promoted_t<gx_t, gr_t>;
      using acc_t = at::opmath_type<g_t>;
      const auto factors = row_factors<acc_t>(config, out.size(0));
      const g_t* g_ptr = grad_dense.const_data_ptr<g_t>();
      const g_t* out_ptr = out_dense.const_data_ptr<g_t>();
      gx_t* gx_ptr = grad_x.mutable_data_ptr<gx_t>();
      gr_t* gr_ptr = grad_residual.mutable_data_ptr<gr_t>();
      for_each_row_run(grad_x, [&](int64_t row, int64_t start, int64_t n) {
        relu_backward_run(g_ptr + start, out_ptr + start, gx_ptr + start, gr_ptr + start, n, factors[row]);
      });
    });
  });
  return {grad_x, grad_residual};
}

}  // namespace

TORCH_LIBRARY_IMPL(stochdepth, CPU, m) {
  m.impl("drop_path_add", &drop_path_add_cpu);
  m.impl("drop_path", &drop_path_cpu);
  m.impl("drop_path_add_relu_backward", &drop_path_add_relu_backward_cpu);
}

}  // namespace stochdepth

// The Python module this build is (STOCHDEPTH_CPU_MODULE, from setup.py): empty, its import runs the
// registration above. TORCH_EXTENSION_NAME is the module's name, set by torch's BuildExtension.
#if defined(STOCHDEPTH_CPU_MODULE)
#include <Python.h>
#define STOCHDEPTH_CONCAT_(a, b) a##b
#define STOCHDEPTH_CONCAT(a, b) STOCHDEPTH_CONCAT_(a, b)
#define STOCHDEPTH_STRING_(a) #a
#define STOCHDEPTH_STRING(a) STOCHDEPTH_STRING_(a)
extern "C" PyObject* STOCHDEPTH_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, STOCHDEPTH_STRING(TORCH_EXTENSION_NAME), nullptr, -1,
                                          nullptr};
  return PyModule_Create(&module_def);
}
#endif
