// The schemas of the stochdepth:: ops, defined once for every backend. Device kernels register
// implementations in their own files; fake (meta) and autograd registrations live in
// stochdepth_kernels/ops.py.
#include <torch/library.h>

TORCH_LIBRARY(stochdepth, m) {
  // out = act(residual + factor_b * x), factor_b from (seed, p) as in DESIGN.md. seed is a
  // 1-element int64 tensor (None when no coin is drawn: eval or p == 0); p is a 0-d float tensor.
  m.def(
      "drop_path_add(Tensor x, Tensor residual, Tensor? seed, Tensor p, bool training, str mode, "
      "bool scale_by_keep, bool relu) -> Tensor");
  // out = factor_b * x, in out_dtype (x's dtype when None). Also the gradient of x for both ops.
  m.def(
      "drop_path(Tensor x, Tensor? seed, Tensor p, bool training, str mode, bool scale_by_keep, "
      "ScalarType? out_dtype=None) -> Tensor");
  // Backward of drop_path_add with relu: (grad_x, grad_residual), grad_residual = grad * (out > 0),
  // grad_x = factor_b * grad_residual.
  m.def(
      "drop_path_add_relu_backward(Tensor grad, Tensor out, Tensor? seed, Tensor p, bool training, "
      "str mode, bool scale_by_keep, ScalarType x_dtype, ScalarType residual_dtype) -> "
      "(Tensor, Tensor)");
}

// Importing stochdepth_kernels._C runs the static registrations above; the module holds one constant,
// WITH_CUDA: whether this build registered the CUDA kernels. The CMake build (a plain library for
// torch.ops.load_library) leaves the module out.
#if defined(STOCHDEPTH_PYTHON_MODULE)
#include <Python.h>
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
#if defined(STOCHDEPTH_WITH_CUDA)
  constexpr long kWithCuda = 1;
#else
  constexpr long kWithCuda = 0;
#endif
  if (module != nullptr && PyModule_AddIntConstant(module, "WITH_CUDA", kWithCuda) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
#endif
