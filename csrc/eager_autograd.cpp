// C++ autograd for the eager calls of the stochdepth:: ops (eager_autograd.h). The rules are those
// stochdepth_kernels/ops.py registers for torch.compile: backward regenerates the mask from the
// saved seed; with ReLU it reads the forward's sign mask; where every factor is 1 no kernel runs.
#include "eager_autograd.h"

#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/randint.h>
#include <ATen/ops/threshold_backward.h>
#include <ATen/ops/zeros.h>
#include <torch/csrc/autograd/custom_function.h>

#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "op_common.h"

namespace stochdepth::eager {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using TensorPair = std::tuple<Tensor, Tensor>;

// The registered ops, called below autograd: their device kernel runs, not the Python autograd
// kernel that register_autograd adds for torch.compile.
template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

template <typename Signature, typename... Args>
auto call_below_autograd(const c10::TypedOperatorHandle<Signature>& op, Args&&... args) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(std::forward<Args>(args)...);
}

#define STOCHDEPTH_OP(name, signature)                            \
  const c10::TypedOperatorHandle<signature>& name##_op() {        \
    static const auto op = find_op<signature>("stochdepth::" #name); \
    return op;                                                    \
  }

using OptionalTensor = std::optional<Tensor>;
STOCHDEPTH_OP(drop_path_add, TensorPair(const Tensor&, const Tensor&, const OptionalTensor&, const Tensor&, bool,
                                        c10::string_view, bool, bool, bool))
STOCHDEPTH_OP(drop_path, Tensor(const Tensor&, const OptionalTensor&, const Tensor&, bool, c10::string_view, bool,
                                std::optional<at::ScalarType>))
STOCHDEPTH_OP(drop_path_add_relu_backward, TensorPair(const Tensor&, const Tensor&, const OptionalTensor&, const Tensor&,
                                                      bool, c10::string_view, bool, at::ScalarType, at::ScalarType))
STOCHDEPTH_OP(subset_add, TensorPair(const Tensor&, const Tensor&, const Tensor&, double, bool, bool))
STOCHDEPTH_OP(subset_gather, Tensor(const Tensor&, const Tensor&, double, at::ScalarType))
STOCHDEPTH_OP(subset_scatter, Tensor(const Tensor&, const Tensor&, int64_t, double, at::ScalarType))
STOCHDEPTH_OP(subset_add_relu_backward, TensorPair(const Tensor&, const Tensor&, const Tensor&, double, at::ScalarType,
                                                   at::ScalarType))
#undef STOCHDEPTH_OP

bool records_graph(const Tensor& a) { return at::GradMode::is_enabled() && a.requires_grad(); }
bool records_graph(const Tensor& a, const Tensor& b) {
  return at::GradMode::is_enabled() && (a.requires_grad() || b.requires_grad());
}

// Every row's factor is 1: no coin was drawn and either p is 0 (training) or eval keeps x unscaled.
bool factor_is_one(const OptionalTensor& seed, bool training, bool scale_by_keep) {
  return !seed.has_value() && (training || scale_by_keep);
}

// `t` with `strides` (a dense layout of its shape): itself, or a copy in that layout.
Tensor in_strides(const Tensor& t, const std::vector<int64_t>& strides) {
  if (t.strides() == at::IntArrayRef(strides)) return t;
  return at::empty_strided(t.sizes(), strides, t.options()).copy_(t);
}

// Double backward (a backward under create_graph=True) needs the backward's results as functions of
// its grad: the helpers below compute them from ATen ops that autograd records, the same values as
// the kernels' backward passes.

// grad where the forward's ReLU passed (its sign mask `bits`, op_common.h), 0 elsewhere.
Tensor relu_masked(const Tensor& grad, const Tensor& bits) {
  if (grad.numel() == 0) return grad.clone();
  const int64_t length = run_length_of(grad);
  const Tensor shifts = at::arange(kMaskGroup, bits.options().dtype(at::kInt));
  const Tensor unpacked = bits.to(at::kInt).reshape({-1, 1}).bitwise_right_shift(shifts).bitwise_and(1)
                              .reshape({grad.numel() / length, -1}).narrow(1, 0, length).reshape({-1}).ne(0);
  Tensor passes = at::empty_like(grad, grad.options().dtype(at::kBool));
  passes.as_strided({passes.numel()}, {1}, passes.storage_offset()).copy_(unpacked);
  return grad.masked_fill(passes.logical_not(), 0);
}

// s * grad[rows] in `dtype` (computed in the wider of the two dtypes, rounded once, as the kernels).
Tensor gathered_rows(const Tensor& grad, const Tensor& rows, double scale, at::ScalarType dtype) {
  return grad.index_select(0, rows).to(at::promote_types(grad.scalar_type(), dtype)).mul(scale).to(dtype);
}

// The batch rows of `grad`'s kept rows scaled by s, zeros in the others, in `dtype`.
Tensor scattered_rows(const Tensor& grad, const Tensor& rows, int64_t batch, double scale, at::ScalarType dtype) {
  std::vector<int64_t> sizes = grad.sizes().vec();
  sizes[0] = batch;
  const Tensor scaled = grad.to(at::promote_types(grad.scalar_type(), dtype)).mul(scale).to(dtype);
  return at::zeros(sizes, grad.options().dtype(dtype)).index_copy(0, rows, scaled);
}

// What both row-mode Functions save: the coin's arguments; backward regenerates the factors.
struct Coin {
  OptionalTensor seed;
  Tensor p;
  bool training;
  std::string mode;
  bool scale_by_keep;

  static void save(AutogradContext* ctx, const OptionalTensor& seed, const Tensor& p, bool training,
                   c10::string_view mode, bool scale_by_keep, const Tensor& extra) {
    ctx->save_for_backward({seed.value_or(Tensor()), p, extra});
    ctx->saved_data["training"] = training;
    ctx->saved_data["mode"] = std::string(mode);
    ctx->saved_data["scale_by_keep"] = scale_by_keep;
  }

  // The coin and the extra tensor saved with it.
  static std::pair<Coin, Tensor> load(AutogradContext* ctx) {
    variable_list saved = ctx->get_saved_variables();
    OptionalTensor seed = saved[0].defined() ? OptionalTensor(saved[0]) : std::nullopt;
    Coin coin{seed, saved[1], ctx->saved_data["training"].toBool(), ctx->saved_data["mode"].toStringRef(),
              ctx->saved_data["scale_by_keep"].toBool()};
    return {std::move(coin), saved[2]};
  }

  bool factor_is_one() const { return eager::factor_is_one(seed, training, scale_by_keep); }
};

Tensor scaled_by_factors(const Tensor& grad, const Coin& coin, at::ScalarType x_dtype);

// out = factor_b * x, differentiable (its backward is itself: a double backward goes through it).
struct DropPathFunction : torch::autograd::Function<DropPathFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const OptionalTensor& seed, const Tensor& p,
                        bool training, c10::string_view mode, bool scale_by_keep, at::ScalarType out_dtype) {
    Coin::save(ctx, seed, p, training, mode, scale_by_keep, Tensor());
    ctx->saved_data["x_dtype"] = x.scalar_type();
    return call_below_autograd(drop_path_op(), x, seed, p, training, mode, scale_by_keep, out_dtype);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const Coin coin = Coin::load(ctx).first;
    const Tensor grad_x = scaled_by_factors(grads[0], coin, ctx->saved_data["x_dtype"].toScalarType());
    return {grad_x, Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

// factor_b * grad in x_dtype: grad itself (cast) where every factor is 1.
Tensor scaled_by_factors(const Tensor& grad, const Coin& coin, at::ScalarType x_dtype) {
  if (coin.factor_is_one()) return grad.to(x_dtype);
  if (records_graph(grad)) {
    return DropPathFunction::apply(grad, coin.seed, coin.p, coin.training, coin.mode, coin.scale_by_keep, x_dtype);
  }
  return call_below_autograd(drop_path_op(), grad, coin.seed, coin.p, coin.training, coin.mode, coin.scale_by_keep,
                             x_dtype);
}

std::vector<int64_t> strides_of(const Tensor& t) { return t.strides().vec(); }

struct DropPathAddFunction : torch::autograd::Function<DropPathAddFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& residual, const OptionalTensor& seed,
                        const Tensor& p, bool training, c10::string_view mode, bool scale_by_keep, bool relu) {
    // With ReLU the backward needs the sign mask, or where every factor is 1 the output itself.
    const bool save_mask = relu && !factor_is_one(seed, training, scale_by_keep);
    auto [out, relu_mask] = call_below_autograd(drop_path_add_op(), x, residual, seed, p, training, mode,
                                                scale_by_keep, relu, save_mask);
    Coin::save(ctx, seed, p, training, mode, scale_by_keep, relu ? (save_mask ? relu_mask : out) : Tensor());
    ctx->saved_data["relu"] = relu;
    ctx->saved_data["saved_mask"] = save_mask;
    ctx->saved_data["x_dtype"] = x.scalar_type();
    ctx->saved_data["residual_dtype"] = residual.scalar_type();
    ctx->saved_data["out_strides"] = strides_of(out);
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto [coin, saved] = Coin::load(ctx);
    const auto x_dtype = ctx->saved_data["x_dtype"].toScalarType();
    const auto residual_dtype = ctx->saved_data["residual_dtype"].toScalarType();
    const Tensor& grad = grads[0];
    Tensor grad_x, grad_residual;
    if (ctx->saved_data["saved_mask"].toBool()) {
      const Tensor dense_grad = in_strides(grad, ctx->saved_data["out_strides"].toIntVector());
      if (records_graph(grad)) {
        grad_residual = relu_masked(dense_grad, saved);
        grad_x = ctx->needs_input_grad(0) ? scaled_by_factors(grad_residual, coin, x_dtype) : Tensor();
      } else {
        std::tie(grad_x, grad_residual) =
            call_below_autograd(drop_path_add_relu_backward_op(), dense_grad, saved, coin.seed, coin.p, coin.training,
                                coin.mode, coin.scale_by_keep, x_dtype, residual_dtype);
      }
    } else if (ctx->saved_data["relu"].toBool()) {
      // Every factor is 1: x's gradient is the residual's, one threshold pass as eager's relu backward.
      grad_residual = at::threshold_backward(grad, saved, 0);
      grad_x = ctx->needs_input_grad(0) ? grad_residual.to(x_dtype) : Tensor();
    } else {
      grad_residual = grad;  // d out / d residual is the identity: no copy
      grad_x = ctx->needs_input_grad(0) ? scaled_by_factors(grad, coin, x_dtype) : Tensor();
    }
    return {grad_x, grad_residual.to(residual_dtype), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

struct SubsetAddFunction : torch::autograd::Function<SubsetAddFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& y, const Tensor& residual, const Tensor& rows, double scale,
                        bool relu) {
    auto [out, relu_mask] = call_below_autograd(subset_add_op(), y, residual, rows, scale, relu, relu);
    ctx->save_for_backward({rows, relu ? relu_mask : Tensor()});
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["relu"] = relu;
    ctx->saved_data["y_dtype"] = y.scalar_type();
    ctx->saved_data["residual_dtype"] = residual.scalar_type();
    ctx->saved_data["out_strides"] = strides_of(out);
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const Tensor& rows = saved[0];
    const double scale = ctx->saved_data["scale"].toDouble();
    const auto y_dtype = ctx->saved_data["y_dtype"].toScalarType();
    const auto residual_dtype = ctx->saved_data["residual_dtype"].toScalarType();
    const Tensor& grad = grads[0];
    Tensor grad_y, grad_residual;
    if (records_graph(grad)) {
      grad_residual = ctx->saved_data["relu"].toBool()
                          ? relu_masked(in_strides(grad, ctx->saved_data["out_strides"].toIntVector()), saved[1])
                          : grad;
      if (ctx->needs_input_grad(0)) grad_y = gathered_rows(grad_residual, rows, scale, y_dtype);
    } else if (ctx->saved_data["relu"].toBool()) {
      std::tie(grad_y, grad_residual) =
          call_below_autograd(subset_add_relu_backward_op(), in_strides(grad, ctx->saved_data["out_strides"].toIntVector()),
                              saved[1], rows, scale, y_dtype, residual_dtype);
    } else {
      grad_residual = grad;  // the identity: no copy
      if (ctx->needs_input_grad(0)) grad_y = call_below_autograd(subset_gather_op(), grad, rows, scale, y_dtype);
    }
    return {grad_y, grad_residual.to(residual_dtype), Tensor(), Tensor(), Tensor()};
  }
};

struct GatherRowsFunction : torch::autograd::Function<GatherRowsFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& t, const Tensor& rows) {
    ctx->save_for_backward({rows});
    ctx->saved_data["batch"] = t.size(0);
    ctx->saved_data["dtype"] = t.scalar_type();
    return call_below_autograd(subset_gather_op(), t, rows, 1.0, t.scalar_type());
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const Tensor rows = ctx->get_saved_variables()[0];
    const int64_t batch = ctx->saved_data["batch"].toInt();
    const auto dtype = ctx->saved_data["dtype"].toScalarType();
    const Tensor grad_t = records_graph(grads[0])
                              ? scattered_rows(grads[0], rows, batch, 1.0, dtype)
                              : call_below_autograd(subset_scatter_op(), grads[0], rows, batch, 1.0, dtype);
    return {grad_t, Tensor()};
  }
};

}  // namespace

Tensor draw_seed(c10::Device device, const std::optional<at::Generator>& generator) {
  return at::randint(0, std::numeric_limits<int64_t>::max(), {1}, generator,
                     at::TensorOptions().dtype(at::kLong).device(device));
}

Tensor drop_path_add(const Tensor& x, const Tensor& residual, const OptionalTensor& seed, const Tensor& p, bool training,
                     c10::string_view mode, bool scale_by_keep, bool relu) {
  if (records_graph(x, residual)) {
    return DropPathAddFunction::apply(x, residual, seed, p, training, mode, scale_by_keep, relu);
  }
  return std::get<0>(call_below_autograd(drop_path_add_op(), x, residual, seed, p, training, mode, scale_by_keep,
                                         relu, false));
}

Tensor drop_path(const Tensor& x, const OptionalTensor& seed, const Tensor& p, bool training, c10::string_view mode,
                 bool scale_by_keep, std::optional<at::ScalarType> out_dtype) {
  const at::ScalarType dtype = out_dtype.value_or(x.scalar_type());
  if (records_graph(x)) return DropPathFunction::apply(x, seed, p, training, mode, scale_by_keep, dtype);
  return call_below_autograd(drop_path_op(), x, seed, p, training, mode, scale_by_keep, dtype);
}

Tensor subset_add(const Tensor& y, const Tensor& residual, const Tensor& rows, double scale, bool relu) {
  if (records_graph(y, residual)) return SubsetAddFunction::apply(y, residual, rows, scale, relu);
  return std::get<0>(call_below_autograd(subset_add_op(), y, residual, rows, scale, relu, false));
}

Tensor gather_rows(const Tensor& t, const Tensor& rows) {
  if (records_graph(t)) return GatherRowsFunction::apply(t, rows);
  return call_below_autograd(subset_gather_op(), t, rows, 1.0, t.scalar_type());
}

}  // namespace stochdepth::eager
