// The Python module stochdepth_kernels._C (setup.py defines STOCHDEPTH_PYTHON_MODULE; the CMake
// library for torch.ops.load_library leaves it out). Importing it runs the TORCH_LIBRARY
// registrations of the library it is linked in. It holds WITH_CUDA (whether this build registered
// the CUDA kernels), the eager entry points of eager_autograd.h, and the fast path of the public
// functions: try_drop_path_add and try_drop_path take the public functions' arguments and do in C++
// what stochdepth_kernels/functional.py does in Python for a plain call, or return None.
//
// A plain call: backend "auto" choosing the native kernels (a CPU tensor, or a CUDA tensor below
// the size auto gives to Triton; STOCHDEPTH_BACKEND unset or "auto"), exact torch.Tensor (or
// Parameter) inputs, dense strided float32/float64/float16/bfloat16 with a batch dimension, of one
// shape and device, p a float in [0, 1] or a 1-element float tensor not requiring grad, bools that
// are bools, mode "row" or "batch", activation None or "relu", a generator of x's device type, a
// seed int in [0, 2**63) or a 1-element int64 tensor. Anything else returns None and Python's path
// runs, which raises the error that names the argument or serves the call (another backend, a
// tensor subclass). Python checks what it alone knows first: torch.compile, the seed tape.
#if defined(STOCHDEPTH_PYTHON_MODULE)
#include <ATen/ops/full.h>
#include <ATen/ops/scalar_tensor.h>
#include <pybind11/stl.h>
#include <torch/csrc/Generator.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>

#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>

#include "eager_autograd.h"

namespace {

namespace py = pybind11;
using at::Tensor;

// Under backend "auto", CUDA tensors of at least this many bytes go to Triton (stochdepth_kernels/
// backends.py sets it when Triton is there).
int64_t triton_from_bytes = std::numeric_limits<int64_t>::max();

bool auto_is_native() {
  const char* name = std::getenv("STOCHDEPTH_BACKEND");
  return name == nullptr || std::strcmp(name, "auto") == 0;
}

bool native_device(const Tensor& t) {
  if (t.is_cpu()) return true;
#if defined(STOCHDEPTH_WITH_CUDA)
  return t.is_cuda() && static_cast<int64_t>(t.nbytes()) < triton_from_bytes;
#else
  return false;
#endif
}

bool kernel_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16;
}

// The tensor argument as the kernels take it, or nullptr.
const Tensor* plain_input(PyObject* obj) {
  if (!THPVariable_CheckExact(obj)) return nullptr;
  const Tensor& t = THPVariable_Unpack(obj);
  const bool plain = t.layout() == at::kStrided && !t.is_nested() && kernel_dtype(t.scalar_type()) && t.dim() > 0;
  return plain && native_device(t) ? &t : nullptr;
}

std::optional<bool> plain_bool(PyObject* obj) {
  if (obj == Py_True) return true;
  if (obj == Py_False) return false;
  return std::nullopt;
}

bool is_text(PyObject* obj, const char* text) {
  return PyUnicode_Check(obj) && PyUnicode_CompareWithASCIIString(obj, text) == 0;
}

std::optional<c10::string_view> plain_mode(PyObject* obj) {
  if (is_text(obj, "row")) return "row";
  if (is_text(obj, "batch")) return "batch";
  return std::nullopt;
}

bool in_unit_interval(double value) { return value >= 0.0 && value <= 1.0; }  // false for NaN

struct Probability {
  Tensor tensor;    // the 0-d tensor the ops take
  bool known_zero;  // a Python 0.0: no coin is drawn
};

// A Python float p becomes a float64 fill on x's device, as validation.probability_tensor makes it.
std::optional<Probability> plain_probability(PyObject* obj, const Tensor& x) {
  if (PyFloat_CheckExact(obj)) {
    const double value = PyFloat_AS_DOUBLE(obj);
    if (!in_unit_interval(value)) return std::nullopt;
    const auto options = at::TensorOptions().dtype(at::kDouble).device(x.device());
    return Probability{x.is_cpu() ? at::scalar_tensor(value, options) : at::full({}, value, options), value == 0.0};
  }
  if (!THPVariable_CheckExact(obj)) return std::nullopt;
  const Tensor& p = THPVariable_Unpack(obj);
  if (p.numel() != 1 || !at::isFloatingType(p.scalar_type()) || p.requires_grad() ||
      !(p.is_cpu() || p.device() == x.device())) {
    return std::nullopt;
  }
  if (p.is_cpu() && !in_unit_interval(p.item<double>())) return std::nullopt;
  return Probability{p.reshape({}), false};
}

// A seed argument: an int in [0, 2**63) or a 1-element int64 tensor, neither when none is given. It
// becomes the ops' tensor on x's device only where the call draws a coin.
struct GivenSeed {
  std::optional<int64_t> value;
  std::optional<Tensor> tensor;

  std::optional<Tensor> on(const Tensor& x) const {
    if (tensor) return tensor->reshape({1}).to(x.device());
    if (value) return at::full({1}, *value, x.options().dtype(at::kLong));
    return std::nullopt;
  }
};

// nullopt: not plain.
std::optional<GivenSeed> plain_seed(PyObject* obj, const Tensor& x) {
  if (obj == Py_None) return GivenSeed{};
  if (PyLong_CheckExact(obj)) {
    int overflow = 0;
    const long long value = PyLong_AsLongLongAndOverflow(obj, &overflow);
    if (overflow != 0 || value < 0) return std::nullopt;
    return GivenSeed{static_cast<int64_t>(value), std::nullopt};
  }
  if (!THPVariable_CheckExact(obj)) return std::nullopt;
  const Tensor& seed = THPVariable_Unpack(obj);
  if (seed.numel() != 1 || seed.scalar_type() != at::kLong || !(seed.is_cpu() || seed.device() == x.device())) {
    return std::nullopt;
  }
  return GivenSeed{std::nullopt, seed};
}

// nullopt: not plain; a disengaged inner optional: the device's default generator.
std::optional<std::optional<at::Generator>> plain_generator(PyObject* obj, const Tensor& x) {
  if (obj == Py_None) return std::optional<at::Generator>();
  if (!THPGenerator_Check(obj)) return std::nullopt;
  const at::Generator& generator = reinterpret_cast<THPGenerator*>(obj)->cdata;
  if (generator.device().type() != x.device().type()) return std::nullopt;
  return std::optional<at::Generator>(generator);
}

struct Call {
  Tensor p;
  std::optional<Tensor> seed;  // none: no coin is drawn
  bool training, scale_by_keep;
  c10::string_view mode;
};

// What functional._prepare_call checks and draws, for x: p, the flags, the seed (a given one, else
// drawn from the generator and XORed with this rank's offset); nullopt where the call is not plain.
std::optional<Call> plain_call(const Tensor& x, PyObject* p, PyObject* training, PyObject* mode, PyObject* scale_by_keep,
                               PyObject* generator, PyObject* seed, int64_t rank_offset) {
  const auto training_flag = plain_bool(training);
  const auto scale_flag = plain_bool(scale_by_keep);
  const auto mode_name = plain_mode(mode);
  if (!training_flag || !scale_flag || !mode_name) return std::nullopt;
  auto probability = plain_probability(p, x);
  if (!probability) return std::nullopt;
  auto given_generator = plain_generator(generator, x);
  auto given_seed = plain_seed(seed, x);
  if (!given_generator || !given_seed) return std::nullopt;
  Call call{std::move(probability->tensor), std::nullopt, *training_flag, *scale_flag, *mode_name};
  if (call.training && !probability->known_zero) {
    call.seed = given_seed->on(x);
    if (!call.seed) {
      Tensor drawn = stochdepth::eager::draw_seed(x.device(), *given_generator);
      call.seed = rank_offset != 0 ? drawn.bitwise_xor_(rank_offset) : drawn;
    }
  }
  return call;
}

py::object wrap(Tensor&& t) { return py::reinterpret_steal<py::object>(THPVariable_Wrap(std::move(t))); }

py::object try_drop_path_add(py::handle x_obj, py::handle residual_obj, py::handle p, py::handle training,
                             py::handle mode, py::handle scale_by_keep, py::handle activation, py::handle generator,
                             py::handle seed, int64_t rank_offset) {
  const Tensor* x = plain_input(x_obj.ptr());
  const Tensor* residual = plain_input(residual_obj.ptr());
  const bool relu = is_text(activation.ptr(), "relu");
  if (x == nullptr || residual == nullptr || x->sizes() != residual->sizes() || x->device() != residual->device() ||
      !(relu || activation.is_none()) || !auto_is_native()) {
    return py::none();
  }
  auto call = plain_call(*residual, p.ptr(), training.ptr(), mode.ptr(), scale_by_keep.ptr(), generator.ptr(),
                         seed.ptr(), rank_offset);
  if (!call) return py::none();
  Tensor out;
  {
    py::gil_scoped_release no_gil;
    out = stochdepth::eager::drop_path_add(*x, *residual, call->seed, call->p, call->training, call->mode,
                                           call->scale_by_keep, relu);
  }
  return wrap(std::move(out));
}

py::object try_drop_path(py::handle x_obj, py::handle p, py::handle training, py::handle mode,
                         py::handle scale_by_keep, py::handle generator, py::handle seed, int64_t rank_offset) {
  const Tensor* x = plain_input(x_obj.ptr());
  if (x == nullptr || !auto_is_native()) return py::none();
  auto call = plain_call(*x, p.ptr(), training.ptr(), mode.ptr(), scale_by_keep.ptr(), generator.ptr(), seed.ptr(),
                         rank_offset);
  if (!call) return py::none();
  if (!call->seed && call->scale_by_keep) return py::reinterpret_borrow<py::object>(x_obj);  // as functional.drop_path
  Tensor out;
  {
    py::gil_scoped_release no_gil;
    out = stochdepth::eager::drop_path(*x, call->seed, call->p, call->training, call->mode, call->scale_by_keep,
                                       std::nullopt);
  }
  return wrap(std::move(out));
}

}  // namespace

PYBIND11_MODULE(_C, m) {
#if defined(STOCHDEPTH_WITH_CUDA)
  m.attr("WITH_CUDA") = true;
#else
  m.attr("WITH_CUDA") = false;
#endif
  namespace eager = stochdepth::eager;
  const auto no_gil = py::call_guard<py::gil_scoped_release>();
  m.def("draw_seed", &eager::draw_seed, "draw_seed(device, generator)", no_gil);
  m.def("drop_path_add", &eager::drop_path_add, "drop_path_add(x, residual, seed, p, training, mode, scale_by_keep, relu)",
        no_gil);
  m.def("drop_path", &eager::drop_path, "drop_path(x, seed, p, training, mode, scale_by_keep, out_dtype)", no_gil);
  m.def("subset_add", &eager::subset_add, "subset_add(y, residual, rows, scale, relu)", no_gil);
  m.def("gather_rows", &eager::gather_rows, "gather_rows(t, rows)", no_gil);
  m.def("try_drop_path_add", &try_drop_path_add,
        "try_drop_path_add(x, residual, p, training, mode, scale_by_keep, activation, generator, seed, rank_offset)");
  m.def("try_drop_path", &try_drop_path,
        "try_drop_path(x, p, training, mode, scale_by_keep, generator, seed, rank_offset)");
  m.def("set_triton_from_bytes", [](int64_t bytes) { triton_from_bytes = bytes; },
        "CUDA tensors of at least this many bytes go to Triton under backend 'auto'");
}
#endif
