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
