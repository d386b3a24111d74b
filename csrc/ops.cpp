// The stochdepth:: library, its schemas (op_schemas.h) defined once for every backend. Device kernels
// register implementations in their own files; fake (meta) and autograd registrations live in
// stochdepth_kernels/ops.py.
#include <torch/library.h>

#include "op_schemas.h"

TORCH_LIBRARY(stochdepth, m) {
  m.def(stochdepth::kDropPathAddSchema);
  m.def(stochdepth::kDropPathSchema);
  m.def(stochdepth::kReluBackwardSchema);
  m.def(stochdepth::kSubsetRowsSchema);
  m.def(stochdepth::kSubsetAddSchema);
  m.def(stochdepth::kSubsetGatherSchema);
  m.def(stochdepth::kSubsetScatterSchema);
  m.def(stochdepth::kSubsetReluBackwardSchema);
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
