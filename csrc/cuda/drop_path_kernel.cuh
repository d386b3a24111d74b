// The CUDA kernels of the stochdepth:: ops and everything a call does around them but the launch
// itself, which the caller's `launcher` does: drop_path_cuda.cu launches on the GPU; the tests
// (tests/cuda_kernel_on_cpu.cpp) run the same kernels on the CPU one (block, thread) at a time, so
// CI checks their indexing without a GPU. Math from stochdepth_math.h.
//
// A dense tensor is walked in memory order as runs of elements that share a batch row (one whole
// sample when the batch dimension is outermost). Runs are cut into chunks of kThreads * kUnroll
// packs; each block takes a contiguous range of chunks, so its row factor changes only between
// runs and is uniform over a chunk: a dropped row skips its x loads without divergence. A pack is
// N elements moved as one 16-byte access (N = 16 / the widest dtype of the call) when every pointer
// is aligned and runs are whole packs; otherwise element by element. Runs shorter than a block's
// packs (batch-innermost layouts) are walked element by element, each with its own row's factor.
// An op that writes or reads the ReLU sign mask (op_common.h) hands each thread units of 8
// consecutive elements (8 / N packs back to back), so a thread owns whole mask bytes: no atomics,
// no shuffles. Other ops' units are single packs, thread t taking packs t, t + kThreads, ...
//
// The seed and p are read in the kernel from device memory: no host synchronisation, one compiled
// kernel for every p, and a CUDA graph replay reads whatever seed its captured randint just drew.
// The kernels use no shared memory and no barriers.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/full.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>

#include "../op_common.h"
#include "../stochdepth_math.h"

namespace stochdepth::kernel {

using at::Tensor;

constexpr int kThreads = 256;
constexpr int kUnroll = 2;       // packs per thread per chunk
// 768 resident threads per SM, up to 85 registers each (ptxas -v, sm_90: at most 80, no spills).
// Measured on an H100 against 512 threads unrolled 4 deep: bf16 forward 80 % of the copy rate
// instead of 68 %, fp32 unchanged at ~93 % (bench/results/nvidia-h100-80gb-hbm3/gpu_check-*.md).
constexpr int kBlocksPerSm = 3;
constexpr int kPackBytes = 16;

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <int N, typename T>
__device__ __forceinline__ Pack<T, N> load_pack(const T* p, int64_t valid, bool vectorized) {
  if (vectorized && valid >= N) return *reinterpret_cast<const Pack<T, N>*>(p);
  Pack<T, N> pack;
#pragma unroll
  for (int k = 0; k < N; ++k) pack.v[k] = k < valid ? p[k] : T(0.0f);
  return pack;
}

template <int N, typename T>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, N>& pack, int64_t valid, bool vectorized) {
  if (vectorized && valid >= N) {
    *reinterpret_cast<Pack<T, N>*>(p) = pack;
    return;
  }
#pragma unroll
  for (int k = 0; k < N; ++k) {
    if (k < valid) p[k] = pack.v[k];
  }
}

template <int N, typename T>
bool is_pack_aligned(const T* p) {
  return reinterpret_cast<uintptr_t>(p) % (sizeof(T) * N) == 0;
}

template <typename... Ts>
constexpr int pack_width() {
  return kPackBytes / static_cast<int>(std::max({sizeof(Ts)...}));
}

// The coin inputs of a call, in device memory.
struct Coin {
  const int64_t* seed;  // nullptr: no coin is drawn (eval, or p known to be 0)
  const double* p;      // a subset call: the kept rows' scale
  bool training;
  bool batch_mode;
  bool scale_by_keep;
  bool subset;
  const int64_t* rows;  // a subset call's kept rows (ascending)
  int64_t kept;
  bool search_rows;     // x's row of walked row b: its position in rows (-1: dropped), else rows[b]
};

// Where kept row `row` sits in the ascending `rows`, -1 if it is not kept.
__device__ __forceinline__ int64_t position_in(const int64_t* rows, int64_t kept, int64_t row) {
  int64_t low = 0, high = kept;
  while (low < high) {
    const int64_t middle = (low + high) / 2;
    if (rows[middle] < row) {
      low = middle + 1;
    } else {
      high = middle;
    }
  }
  return low < kept && rows[low] == row ? low : -1;
}

// The factor on x of run `run` and the run of x it reads (or writes): the walked tensor's own run in
// row and batch mode; in a subset call (batch outermost: a run is a row) the row of the branch's k
// rows, a dropped row (-1) getting factor 0.
template <typename acc_t>
struct RowPlan {
  acc_t factor;
  int64_t x_run;
};

template <typename acc_t>
__device__ __forceinline__ RowPlan<acc_t> row_plan(const Coin& coin, const RowFactorParams& params, uint64_t seed,
                                                   int64_t run, int64_t batch) {
  if (coin.subset) {
    const int64_t x_row = coin.search_rows ? position_in(coin.rows, coin.kept, run) : coin.rows[run];
    return {x_row >= 0 ? static_cast<acc_t>(*coin.p) : acc_t(0), x_row};
  }
  return {row_factor<acc_t>(params, seed, run % batch), run};
}

// Packs a thread handles back to back: one mask byte's worth for an op that uses the mask, else 1.
template <int N, typename Op>
constexpr int unit_packs() {
  static_assert(!Op::kUsesMask || kMaskGroup % N == 0, "a mask op's unit is one mask byte");
  return Op::kUsesMask ? static_cast<int>(kMaskGroup) / N : 1;
}

// Units a thread handles per chunk (kUnroll packs' worth, at least one unit), and the elements of a
// chunk of one block.
template <int N, typename Op>
constexpr int chunk_units() {
  return kUnroll / unit_packs<N, Op>() > 0 ? kUnroll / unit_packs<N, Op>() : 1;
}

template <int N, typename Op>
constexpr int64_t chunk_elements() {
  return static_cast<int64_t>(kThreads) * chunk_units<N, Op>() * unit_packs<N, Op>() * N;
}

// How the output's memory splits into runs and chunks (host-computed, one per launch).
struct Geometry {
  int64_t numel;
  int64_t batch;
  int64_t run_length;        // elements per run of one row in memory order
  int64_t mask_bytes_per_run;
  int64_t chunks_per_run;
  int64_t chunks;
  int64_t chunks_per_block;
  bool element_mode;         // runs too short for chunks: a unit per thread, element by element
  int64_t units_per_run;     // element mode
  int64_t units;             // element mode
};

// One thread's unit: the packs it loaded and the mask bits it read (bit k: element k of the unit).
template <int N, int kUnit, typename Op>
struct Unit {
  typename Op::template Loaded<N> packs[kUnit];
  uint32_t mask_bits;
};

// Loads the unit starting `first` elements into the run that starts at `run_base`.
// Loads the unit starting `first` elements into the run `run` (x's: plan.x_run).
template <int N, int kUnit, typename Op, typename acc_t>
__device__ __forceinline__ void load_unit(const Op& op, Unit<N, kUnit, Op>& unit, const RowPlan<acc_t>& plan,
                                          const Geometry& g, int64_t run, int64_t first, bool vectorized) {
  if constexpr (Op::kReadsMask) unit.mask_bits = op.relu_mask[run * g.mask_bytes_per_run + first / kMaskGroup];
#pragma unroll
  for (int q = 0; q < kUnit; ++q) {
    const int64_t i = first + q * N;
    if (i < g.run_length) {
      unit.packs[q] = op.template load<N>(plan.factor, run * g.run_length + i, plan.x_run * g.run_length + i,
                                          g.run_length - i, vectorized);
    }
  }
}

template <int N, int kUnit, typename Op, typename acc_t>
__device__ __forceinline__ void store_unit(const Op& op, const Unit<N, kUnit, Op>& unit, const RowPlan<acc_t>& plan,
                                           const Geometry& g, int64_t run, int64_t first, bool vectorized) {
  uint32_t bits = 0;
#pragma unroll
  for (int q = 0; q < kUnit; ++q) {
    const int64_t i = first + q * N;
    if (i < g.run_length) {
      const uint32_t in_bits = Op::kReadsMask ? unit.mask_bits >> (q * N) : 0u;
      bits |= op.template store<N>(plan.factor, unit.packs[q], run * g.run_length + i, plan.x_run * g.run_length + i,
                                   g.run_length - i, vectorized, in_bits) << (q * N);
    }
  }
  if constexpr (Op::kWritesMask) {
    op.relu_mask[run * g.mask_bytes_per_run + first / kMaskGroup] = static_cast<uint8_t>(bits);
  }
}

// Runs `op` over this block's share of the tensor, a pack at a time: op.load<N>(factor, offset,
// x_offset, valid, vectorized) reads the pack at `offset` (x's at `x_offset`; `valid` elements of
// its run left from there) and op.store<N>(factor, loaded, ..., mask_bits) writes its results and
// returns its mask bits. A thread
// loads all its units of a chunk (kUnroll packs) before storing any, so its loads are in flight
// together.
template <int N, typename Op>
__device__ __forceinline__ void for_each_pack(const Op& op, const Coin& coin, const Geometry& g, bool vectorized) {
  using acc_t = typename Op::acc_t;
  const RowFactorParams params = make_row_factor_params(
      *coin.p, coin.training && coin.seed != nullptr, coin.batch_mode, coin.scale_by_keep);
  const uint64_t seed = params.sample ? static_cast<uint64_t>(*coin.seed) : 0u;
  if (g.element_mode) {
    constexpr int kUnit = unit_packs<1, Op>();
    const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
    for (int64_t u = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; u < g.units; u += stride) {
      const int64_t run = u / g.units_per_run;
      const int64_t first = (u - run * g.units_per_run) * kUnit;
      const RowPlan<acc_t> plan = row_plan<acc_t>(coin, params, seed, run, g.batch);
      Unit<1, kUnit, Op> unit{};
      load_unit(op, unit, plan, g, run, first, false);
      store_unit(op, unit, plan, g, run, first, false);
    }
    return;
  }
  constexpr int kUnit = unit_packs<N, Op>();
  constexpr int kUnits = chunk_units<N, Op>();
  constexpr int64_t kChunk = chunk_elements<N, Op>();
  const int64_t first_chunk = static_cast<int64_t>(blockIdx.x) * g.chunks_per_block;
  const int64_t last = first_chunk + g.chunks_per_block < g.chunks ? first_chunk + g.chunks_per_block : g.chunks;
  if (first_chunk >= last) return;
  int64_t run = first_chunk / g.chunks_per_run;
  int64_t chunk_in_run = first_chunk - run * g.chunks_per_run;
  RowPlan<acc_t> plan = row_plan<acc_t>(coin, params, seed, run, g.batch);
  for (int64_t chunk = first_chunk; chunk < last; ++chunk) {
    Unit<N, kUnit, Op> units[kUnits];
#pragma unroll
    for (int u = 0; u < kUnits; ++u) {
      const int64_t first = chunk_in_run * kChunk + (static_cast<int64_t>(u) * kThreads + threadIdx.x) * kUnit * N;
      if (first < g.run_length) load_unit(op, units[u], plan, g, run, first, vectorized);
    }
#pragma unroll
    for (int u = 0; u < kUnits; ++u) {
      const int64_t first = chunk_in_run * kChunk + (static_cast<int64_t>(u) * kThreads + threadIdx.x) * kUnit * N;
      if (first < g.run_length) store_unit(op, units[u], plan, g, run, first, vectorized);
    }
    if (++chunk_in_run == g.chunks_per_run && chunk + 1 < last) {
      chunk_in_run = 0;
      ++run;
      plan = row_plan<acc_t>(coin, params, seed, run, g.batch);
    }
  }
}

template <int N, typename Op>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm)
    drop_path_kernel(Op op, Coin coin, Geometry geometry, bool vectorized) {
  for_each_pack<N>(op, coin, geometry, vectorized);
}

// With a residual: out = act(residual + factor * x), a dropped row reading only the residual; with
// kSaveMask (relu only) it also writes the ReLU sign mask.
// Without (kResidual false, r_t unused): out = factor * x, a dropped row writing zeros unread.
template <typename x_t, typename r_t, typename out_t, bool kResidual, bool kSaveMask = false>
struct DropPathOp {
  using acc_t = at::opmath_type<promoted_t<x_t, out_t>>;
  static constexpr int kPack = kResidual ? pack_width<x_t, r_t, out_t>() : pack_width<x_t, out_t>();
  static constexpr bool kReadsMask = false;
  static constexpr bool kWritesMask = kSaveMask;
  static constexpr bool kUsesMask = kSaveMask;
  template <int N>
  struct Loaded {
    Pack<x_t, N> x;
    Pack<r_t, N> residual;
  };
  const x_t* x;
  const r_t* residual;
  out_t* out;
  bool relu;
  uint8_t* relu_mask;  // kSaveMask only

  template <int N>
  __device__ __forceinline__ Loaded<N> load(acc_t factor, int64_t offset, int64_t x_offset, int64_t valid,
                                            bool vectorized) const {
    Loaded<N> loaded{};
    if constexpr (kResidual) loaded.residual = load_pack<N>(residual + offset, valid, vectorized);
    if (factor != acc_t(0)) loaded.x = load_pack<N>(x + x_offset, valid, vectorized);
    return loaded;
  }

  // Returns the pack's mask bits (kSaveMask), read back from the stored dtype as the eager relu
  // backward reads its output; elements past `valid` are zeros, so their bits are 0.
  template <int N>
  __device__ __forceinline__ uint32_t store(acc_t factor, const Loaded<N>& in, int64_t offset, int64_t, int64_t valid,
                                            bool vectorized, uint32_t) const {
    Pack<out_t, N> result;
    uint32_t bits = 0;
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const acc_t x_k = static_cast<acc_t>(in.x.v[k]);
      if constexpr (kResidual) {
        const acc_t r_k = static_cast<acc_t>(in.residual.v[k]);
        result.v[k] = static_cast<out_t>(factor == acc_t(0) ? dropped_element(r_k, relu)
                                                            : drop_path_add_element(r_k, x_k, factor, relu));
      } else {
        result.v[k] = static_cast<out_t>(factor == acc_t(0) ? acc_t(0) : factor * x_k);
      }
      if constexpr (kSaveMask) bits |= static_cast<uint32_t>(relu_passes(static_cast<acc_t>(result.v[k]))) << k;
    }
    store_pack<N>(out + offset, result, valid, vectorized);
    return bits;
  }

  bool aligned() const {
    return is_pack_aligned<kPack>(x) && (!kResidual || is_pack_aligned<kPack>(residual)) &&
           is_pack_aligned<kPack>(out);
  }
};

// grad_residual = grad where the mask bit is set (relu passed), else 0; grad_x = factor *
// grad_residual (exactly 0 in a dropped row; kSubset: grad_x holds the kept rows only, written at
// x_offset, and a dropped row writes none).
template <typename g_t, typename gx_t, typename gr_t, bool kSubset = false>
struct ReluBackwardOp {
  using acc_t = at::opmath_type<g_t>;
  static constexpr int kPack = pack_width<g_t, gx_t, gr_t>();
  static constexpr bool kReadsMask = true;
  static constexpr bool kWritesMask = false;
  static constexpr bool kUsesMask = true;
  template <int N>
  struct Loaded {
    Pack<g_t, N> grad;
  };
  const g_t* grad;
  const uint8_t* relu_mask;
  gx_t* grad_x;
  gr_t* grad_residual;

  template <int N>
  __device__ __forceinline__ Loaded<N> load(acc_t, int64_t offset, int64_t, int64_t valid, bool vectorized) const {
    return Loaded<N>{load_pack<N>(grad + offset, valid, vectorized)};
  }

  template <int N>
  __device__ __forceinline__ uint32_t store(acc_t factor, const Loaded<N>& in, int64_t offset, int64_t x_offset,
                                            int64_t valid, bool vectorized, uint32_t mask_bits) const {
    Pack<gx_t, N> gx;
    Pack<gr_t, N> gr;
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const acc_t value = relu_backward_element(static_cast<acc_t>(in.grad.v[k]), ((mask_bits >> k) & 1u) != 0u);
      gr.v[k] = static_cast<gr_t>(value);
      gx.v[k] = static_cast<gx_t>(factor == acc_t(0) ? acc_t(0) : factor * value);
    }
    store_pack<N>(grad_residual + offset, gr, valid, vectorized);
    if (!kSubset || factor != acc_t(0)) store_pack<N>(grad_x + x_offset, gx, valid, vectorized);
    return 0u;
  }

  bool aligned() const {
    return is_pack_aligned<kPack>(grad) && is_pack_aligned<kPack>(grad_x) && is_pack_aligned<kPack>(grad_residual);
  }
};

// Keeps the call's device-resident seed and p alive until the launch is enqueued.
struct CoinTensors {
  std::optional<Tensor> seed;
  Tensor p;

  Coin coin(bool training, bool batch_mode, bool scale_by_keep) const {
    return Coin{seed ? seed->const_data_ptr<int64_t>() : nullptr, p.const_data_ptr<double>(), training, batch_mode,
                scale_by_keep, false, nullptr, 0, false};
  }
};

inline CoinTensors coin_on_device(const std::optional<Tensor>& seed, const Tensor& p, const Tensor& out) {
  check_p(p);
  check_seed(seed);
  if (p.is_cpu()) {  // a value the host holds is checked; one on the device would cost a sync
    const double value = p.item<double>();
    TORCH_CHECK_VALUE(value >= 0.0 && value <= 1.0, "p must be in [0, 1], got ", std::to_string(value));
  }
  CoinTensors tensors{std::nullopt, p.to(out.device(), at::kDouble)};
  if (seed) tensors.seed = seed->to(out.device());
  return tensors;
}

// A subset call's coin: its kept rows and their scale (on the device, read as p is).
struct SubsetCoin {
  Tensor scale;
  Tensor rows;

  Coin coin(bool search_rows) const {
    return Coin{nullptr, scale.const_data_ptr<double>(), false, false, true, true, rows.const_data_ptr<int64_t>(),
                rows.numel(), search_rows};
  }
};

inline SubsetCoin subset_coin(const Tensor& rows, double scale, const Tensor& out) {
  check_scale(scale);
  return SubsetCoin{at::full({}, scale, out.options().dtype(at::kDouble)), rows.contiguous()};
}

// How one launch covers `layout` (the dense tensor every pointer of `op` shares) with at most
// `max_blocks` blocks.
struct LaunchPlan {
  Geometry geometry;
  int64_t blocks;
  bool vectorized;
};

template <typename Op>
LaunchPlan plan_launch(const Op& op, const Tensor& layout, int64_t max_blocks) {
  constexpr int N = Op::kPack;
  constexpr int64_t kChunk = chunk_elements<N, Op>();
  Geometry g{};
  g.numel = layout.numel();
  g.batch = layout.size(0);
  g.run_length = run_length_of(layout);
  g.mask_bytes_per_run = mask_bytes_per_run(g.run_length);
  const int64_t runs = g.numel / g.run_length;
  g.element_mode = g.run_length < static_cast<int64_t>(kThreads) * N;
  int64_t blocks;
  if (g.element_mode) {
    constexpr int64_t kElementUnit = unit_packs<1, Op>();
    g.units_per_run = (g.run_length + kElementUnit - 1) / kElementUnit;
    g.units = runs * g.units_per_run;
    blocks = std::min((g.units + kThreads - 1) / kThreads, max_blocks);
  } else {
    g.chunks_per_run = (g.run_length + kChunk - 1) / kChunk;
    g.chunks = runs * g.chunks_per_run;
    g.chunks_per_block = (g.chunks + max_blocks - 1) / max_blocks;
    blocks = (g.chunks + g.chunks_per_block - 1) / g.chunks_per_block;
  }
  return LaunchPlan{g, blocks, (runs == 1 || g.run_length % N == 0) && op.aligned()};
}

#define STOCHDEPTH_DISPATCH_FLOATING(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

template <typename Launcher>
std::tuple<Tensor, Tensor> drop_path_add_with(const Launcher& launcher, const Tensor& x, const Tensor& residual,
                                              const std::optional<Tensor>& seed, const Tensor& p, bool training,
                                              c10::string_view mode, bool scale_by_keep, bool relu,
                                              bool save_relu_mask) {
  check_same_batched_shape(x, "x", residual, "residual");
  check_same_device(x, "x", residual, "residual");
  const bool batch_mode = is_batch_mode(mode);
  Tensor out = at::empty_like(residual, residual.options().dtype(c10::promoteTypes(x.scalar_type(), residual.scalar_type())));
  Tensor relu_mask = make_relu_mask(out, relu, save_relu_mask);
  if (out.numel() == 0) return {out, relu_mask};
  const CoinTensors coin = coin_on_device(seed, p, out);
  const Tensor x_dense = in_layout_of(x, out);
  const Tensor r_dense = in_layout_of(residual, out);
  STOCHDEPTH_DISPATCH_FLOATING(x.scalar_type(), "drop_path_add_cuda_x", [&] {
    using x_t = scalar_t;
    STOCHDEPTH_DISPATCH_FLOATING(residual.scalar_type(), "drop_path_add_cuda_r", [&] {
      using r_t = scalar_t;
      using out_t = promoted_t<x_t, r_t>;
      const auto launch = [&](auto op) {
        launcher(op, coin.coin(training, batch_mode, scale_by_keep), plan_launch(op, out, launcher.max_blocks(out)));
      };
      const x_t* x_ptr = x_dense.const_data_ptr<x_t>();
      const r_t* r_ptr = r_dense.const_data_ptr<r_t>();
      out_t* out_ptr = out.mutable_data_ptr<out_t>();
      if (save_relu_mask) {
        launch(DropPathOp<x_t, r_t, out_t, true, true>{x_ptr, r_ptr, out_ptr, true, relu_mask.mutable_data_ptr<uint8_t>()});
      } else {
        launch(DropPathOp<x_t, r_t, out_t, true>{x_ptr, r_ptr, out_ptr, relu, nullptr});
      }
    });
  });
  return {out, relu_mask};
}

template <typename Launcher>
Tensor drop_path_with(const Launcher& launcher, const Tensor& x, const std::optional<Tensor>& seed, const Tensor& p, bool training,
                      c10::string_view mode, bool scale_by_keep, std::optional<at::ScalarType> out_dtype) {
  check_batched(x, "x");
  const bool batch_mode = is_batch_mode(mode);
  Tensor out = at::empty_like(x, x.options().dtype(out_dtype.value_or(x.scalar_type())));
  if (out.numel() == 0) return out;
  const CoinTensors coin = coin_on_device(seed, p, out);
  const Tensor x_dense = in_layout_of(x, out);
  STOCHDEPTH_DISPATCH_FLOATING(x.scalar_type(), "drop_path_cuda_x", [&] {
    using x_t = scalar_t;
    STOCHDEPTH_DISPATCH_FLOATING(out.scalar_type(), "drop_path_cuda_out", [&] {
      using out_t = scalar_t;
      const DropPathOp<x_t, x_t, out_t, false> op{x_dense.const_data_ptr<x_t>(), nullptr,
                                                  out.mutable_data_ptr<out_t>(), false, nullptr};
      launcher(op, coin.coin(training, batch_mode, scale_by_keep), plan_launch(op, out, launcher.max_blocks(out)));
    });
  });
  return out;
}

template <typename Launcher>
std::tuple<Tensor, Tensor> drop_path_add_relu_backward_with(
    const Launcher& launcher, const Tensor& grad, const Tensor& relu_mask, const std::optional<Tensor>& seed,
    const Tensor& p, bool training, c10::string_view mode, bool scale_by_keep, at::ScalarType x_dtype,
    at::ScalarType residual_dtype) {
  check_relu_mask(relu_mask, grad);
  check_same_device(relu_mask, "relu_mask", grad, "grad");
  const bool batch_mode = is_batch_mode(mode);
  Tensor grad_x = at::empty_like(grad, grad.options().dtype(x_dtype));
  Tensor grad_residual = at::empty_like(grad, grad.options().dtype(residual_dtype));
  if (grad.numel() == 0) return {grad_x, grad_residual};
  const CoinTensors coin = coin_on_device(seed, p, grad);
  const Tensor grad_promoted = grad.to(c10::promoteTypes(x_dtype, residual_dtype));
  STOCHDEPTH_DISPATCH_FLOATING(x_dtype, "relu_backward_cuda_x", [&] {
    using gx_t = scalar_t;
    STOCHDEPTH_DISPATCH_FLOATING(residual_dtype, "relu_backward_cuda_r", [&] {
      using gr_t = scalar_t;
      using g_t = promoted_t<gx_t, gr_t>;
      const ReluBackwardOp<g_t, gx_t, gr_t> op{grad_promoted.const_data_ptr<g_t>(), relu_mask.const_data_ptr<uint8_t>(),
                                               grad_x.mutable_data_ptr<gx_t>(),
                                               grad_residual.mutable_data_ptr<gr_t>()};
      launcher(op, coin.coin(training, batch_mode, scale_by_keep), plan_launch(op, grad_x, launcher.max_blocks(grad_x)));
    });
  });
  return {grad_x, grad_residual};
}

// The subset ops (op_schemas.h) on the same kernels: the walked tensor's row b reads (forward) or
// writes (ReLU backward) the branch's row at b's position in rows, found by a binary search once per
// run; the gather walks the k rows of its output, reading row rows[j] of grad.
template <typename Launcher>
std::tuple<Tensor, Tensor> subset_add_with(const Launcher& launcher, const Tensor& y, const Tensor& residual,
                                           const Tensor& rows, double scale, bool relu, bool save_relu_mask) {
  check_subset_shapes(y, residual, rows);
  Tensor out = batch_outermost_empty(residual, c10::promoteTypes(y.scalar_type(), residual.scalar_type()));
  Tensor relu_mask = make_relu_mask(out, relu, save_relu_mask);
  if (out.numel() == 0) return {out, relu_mask};
  const SubsetCoin coin = subset_coin(rows, scale, out);
  const Tensor y_dense = in_rows_layout_of(y, out);
  const Tensor r_dense = in_layout_of(residual, out);
  STOCHDEPTH_DISPATCH_FLOATING(y.scalar_type(), "subset_add_cuda_y", [&] {
    using y_t = scalar_t;
    STOCHDEPTH_DISPATCH_FLOATING(residual.scalar_type(), "subset_add_cuda_r", [&] {
      using r_t = scalar_t;
      using out_t = promoted_t<y_t, r_t>;
      const auto launch = [&](auto op) { launcher(op, coin.coin(true), plan_launch(op, out, launcher.max_blocks(out))); };
      const y_t* y_ptr = y_dense.const_data_ptr<y_t>();
      const r_t* r_ptr = r_dense.const_data_ptr<r_t>();
      out_t* out_ptr = out.mutable_data_ptr<out_t>();
      if (save_relu_mask) {
        launch(DropPathOp<y_t, r_t, out_t, true, true>{y_ptr, r_ptr, out_ptr, true, relu_mask.mutable_data_ptr<uint8_t>()});
      } else {
        launch(DropPathOp<y_t, r_t, out_t, true>{y_ptr, r_ptr, out_ptr, relu, nullptr});
      }
    });
  });
  return {out, relu_mask};
}

template <typename Launcher>
Tensor subset_gather_with(const Launcher& launcher, const Tensor& grad, const Tensor& rows, double scale,
                          at::ScalarType out_dtype) {
  check_batched(grad, "grad");
  check_rows(rows, grad.size(0), grad.device());
  const Tensor g_dense = in_batch_outermost(grad);
  Tensor out = empty_rows_like(g_dense, rows.numel(), out_dtype);
  if (out.numel() == 0) return out;
  const SubsetCoin coin = subset_coin(rows, scale, out);
  STOCHDEPTH_DISPATCH_FLOATING(grad.scalar_type(), "subset_gather_cuda_g", [&] {
    using g_t = scalar_t;
    STOCHDEPTH_DISPATCH_FLOATING(out_dtype, "subset_gather_cuda_out", [&] {
      using out_t = scalar_t;
      const DropPathOp<g_t, g_t, out_t, false> op{g_dense.const_data_ptr<g_t>(), nullptr, out.mutable_data_ptr<out_t>(),
                                                  false, nullptr};
      launcher(op, coin.coin(false), plan_launch(op, out, launcher.max_blocks(out)));
    });
  });
  return out;
}

template <typename Launcher>
Tensor subset_scatter_with(const Launcher& launcher, const Tensor& y, const Tensor& rows, int64_t batch, double scale,
                           at::ScalarType out_dtype) {
  check_scatter_shapes(y, rows, batch);
  const Tensor y_dense = in_batch_outermost(y);
  Tensor out = empty_rows_like(y_dense, batch, out_dtype);
  if (out.numel() == 0) return out;
  const SubsetCoin coin = subset_coin(rows, scale, out);
  STOCHDEPTH_DISPATCH_FLOATING(y.scalar_type(), "subset_scatter_cuda_y", [&] {
    using y_t = scalar_t;
    STOCHDEPTH_DISPATCH_FLOATING(out_dtype, "subset_scatter_cuda_out", [&] {
      using out_t = scalar_t;
      // The unary op walking the B output rows: a dropped row stores 0 without loading.
      const DropPathOp<y_t, y_t, out_t, false> op{y_dense.const_data_ptr<y_t>(), nullptr,
                                                  out.mutable_data_ptr<out_t>(), false, nullptr};
      launcher(op, coin.coin(true), plan_launch(op, out, launcher.max_blocks(out)));
    });
  });
  return out;
}

template <typename Launcher>
std::tuple<Tensor, Tensor> subset_add_relu_backward_with(const Launcher& launcher, const Tensor& grad,
                                                         const Tensor& relu_mask, const Tensor& rows, double scale,
                                                         at::ScalarType y_dtype, at::ScalarType residual_dtype) {
  check_relu_mask(relu_mask, grad);
  check_same_device(relu_mask, "relu_mask", grad, "grad");
  check_rows(rows, grad.size(0), grad.device());
  TORCH_CHECK_VALUE(is_batch_outermost(grad), "grad must be in the subset forward's layout (batch outermost), got "
                    "strides ", format_sizes(grad.strides()));
  Tensor grad_y = empty_rows_like(grad, rows.numel(), y_dtype);
  Tensor grad_residual = at::empty_like(grad, grad.options().dtype(residual_dtype));
  if (grad.numel() == 0) return {grad_y, grad_residual};
  const SubsetCoin coin = subset_coin(rows, scale, grad);
  const Tensor grad_promoted = grad.to(c10::promoteTypes(y_dtype, residual_dtype));
  STOCHDEPTH_DISPATCH_FLOATING(y_dtype, "subset_relu_backward_cuda_y", [&] {
    using gy_t = scalar_t;
    STOCHDEPTH_DISPATCH_FLOATING(residual_dtype, "subset_relu_backward_cuda_r", [&] {
      using gr_t = scalar_t;
      using g_t = promoted_t<gy_t, gr_t>;
      const ReluBackwardOp<g_t, gy_t, gr_t, true> op{grad_promoted.const_data_ptr<g_t>(),
                                                     relu_mask.const_data_ptr<uint8_t>(), grad_y.mutable_data_ptr<gy_t>(),
                                                     grad_residual.mutable_data_ptr<gr_t>()};
      launcher(op, coin.coin(true), plan_launch(op, grad_residual, launcher.max_blocks(grad_residual)));
    });
  });
  return {grad_y, grad_residual};
}

}  // namespace stochdepth::kernel
