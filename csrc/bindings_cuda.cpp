// torch.library bindings of the cuda backend. The launch tables are built on
// the Python side (fusedopt/backends/_tables.py) and arrive as device tensors;
// this file only checks them, wraps them in the torch-free TensorTable and
// calls the launcher in cuda/. The stream comes from Python as a handle, so
// no CUDA header is needed here.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <optional>

#include "bindings_checks.h"
#include "fusedopt/adafactor.h"
#include "fusedopt/adamw.h"
#include "fusedopt/dispatch.h"
#include "fusedopt/fp8.h"
#include "fusedopt/fp8_states.h"
#include "fusedopt/lamb.h"
#include "fusedopt/norms.h"
#include "fusedopt/sophia.h"

// tests/cuda_emu/build.py builds this file with FUSEDOPT_CUDA_EMULATION and
// the kernels translated to C++ (tests/cuda_emu): the ops then register as
// fusedopt_cuda_emu and take CPU tensors, so the kernels run without a GPU.
#if defined(FUSEDOPT_CUDA_EMULATION)
#define FUSEDOPT_CUDA_LIBRARY fusedopt_cuda_emu
#define FUSEDOPT_DEVICE "CPU (emulated CUDA)"
#else
#define FUSEDOPT_CUDA_LIBRARY fusedopt_cuda
#define FUSEDOPT_DEVICE "CUDA"
#endif

namespace {

using at::Tensor;

// An input's data pointer, checked to be a plain tensor's (bindings_checks.h).
template <typename T>
T* ptr(const Tensor& t, const char* what) {
  return fusedopt::checked_ptr<T>(t, "cuda", what);
}

// Whether a tensor lives where the kernels run.
bool on_device(const Tensor& t) {
#if defined(FUSEDOPT_CUDA_EMULATION)
  return t.is_cpu();
#else
  return t.is_cuda();
#endif
}

// A 1-element device tensor of T, or null. lr and found_inf are float32;
// grad_mult and the clip factor travel in fp64 (a clip coefficient of fp64
// grads keeps its bits), which the kernels round once to the math type.
template <typename T = float>
const T* device_scalar(const std::optional<Tensor>& t, const char* what) {
  if (!t.has_value()) return nullptr;
  constexpr at::ScalarType kType = c10::CppTypeToScalarType<T>::value;
  TORCH_CHECK(on_device(*t) && t->scalar_type() == kType && t->numel() == 1, "fusedopt cuda: ", what,
              " must be a 1-element ", kType == at::kDouble ? "float64" : "float32", " " FUSEDOPT_DEVICE " tensor");
  return ptr<T>(*t, what);
}

// The (param, state, master) storage of a launch, checked.
// fp8_states: the op's kernels take block-scaled FP8 states (state code 4).
std::pair<fusedopt::DType, fusedopt::DType> storage(int64_t param_dtype, int64_t state_dtype, bool has_master,
                                                    bool fp8_states = false) {
  TORCH_CHECK(param_dtype >= 0 && param_dtype <= 3 && state_dtype >= 0 && state_dtype <= 4,
              "fusedopt cuda: bad dtype codes ", param_dtype, ", ", state_dtype);
  const auto p = static_cast<fusedopt::DType>(param_dtype), s = static_cast<fusedopt::DType>(state_dtype);
  TORCH_CHECK(fusedopt::supported_storage(p, s, has_master, fp8_states), "fusedopt cuda: unsupported param/state dtypes ",
              param_dtype, "/", state_dtype, has_master ? " with master weights" : "");
  return {p, s};
}

// A launch's master code: 0 none, 1 fp32 masters, 2 the int16 remainders of
// bf16 params (master_weights="remainder"). Returns whether they are remainders.
bool check_master(int64_t master, fusedopt::DType pdt) {
  TORCH_CHECK(master >= 0 && master <= 2, "fusedopt cuda: bad master code ", master);
  TORCH_CHECK(master != 2 || pdt == fusedopt::DType::kBFloat16, "fusedopt cuda: int16 remainders complete bf16 "
              "params");
  return master == 2;
}

// Block-scaled FP8 states: no block may straddle two chunks.
void check_fp8_chunks(fusedopt::DType state_dtype, int64_t chunk_size) {
  TORCH_CHECK(state_dtype != fusedopt::DType::kFp8Blocked || chunk_size % fusedopt::kQBlock == 0,
              "fusedopt cuda: chunk_size must be a multiple of ", fusedopt::kQBlock, " with FP8 states");
}

// The launch's stochastic rounding: off without a seed; only bf16 params
// without master weights have it (the kernels are built for those).
fusedopt::StochasticRounding stochastic_rounding(const std::optional<int64_t>& seed, fusedopt::DType pdt,
                                                 bool has_master) {
  if (!seed.has_value()) return {};
  TORCH_CHECK(pdt == fusedopt::DType::kBFloat16 && !has_master,
              "fusedopt cuda: stochastic rounding is for bf16 params without master weights");
  return {true, uint32_t(uint64_t(*seed) & 0xFFFFFFFFu)};
}

fusedopt::TensorTable make_table(const Tensor& table, const Tensor& numel, const Tensor& chunk_tensor,
                                 const Tensor& chunk_start, int64_t chunk_size, int64_t rows) {
  for (const Tensor* t : {&table, &numel, &chunk_tensor, &chunk_start}) {
    TORCH_CHECK(on_device(*t) && t->scalar_type() == at::kLong && t->is_contiguous(),
                "fusedopt cuda: launch tables must be contiguous int64 " FUSEDOPT_DEVICE " tensors");
  }
  TORCH_CHECK(table.numel() == rows * numel.numel(), "fusedopt cuda: table has ", table.numel(),
              " entries, expected ", rows, " rows of ", numel.numel());
  TORCH_CHECK(chunk_tensor.numel() == chunk_start.numel() && chunk_size > 0, "fusedopt cuda: bad chunk list");
  fusedopt::TensorTable tt;
  tt.n_tensors = numel.numel();
  tt.table = ptr<int64_t>(table, "table");
  tt.numel = ptr<int64_t>(numel, "numel");
  tt.chunk_size = chunk_size;
  tt.n_chunks = chunk_start.numel();
  tt.chunk_tensor = ptr<int64_t>(chunk_tensor, "chunk_tensor");
  tt.chunk_start = ptr<int64_t>(chunk_start, "chunk_start");
  return tt;
}

void check_cuda_tensor(const Tensor& t, at::ScalarType dtype, int64_t numel, const char* what) {
  fusedopt::check_plain(t, "cuda", what);
  TORCH_CHECK(on_device(t) && t.scalar_type() == dtype && t.is_contiguous() && t.numel() == numel,
              "fusedopt cuda: ", what, " must be a contiguous ", dtype, " " FUSEDOPT_DEVICE " tensor of ", numel,
              " elements");
}

void adamw(const Tensor& table, const Tensor& numel, const Tensor& chunk_tensor, const Tensor& chunk_start,
           int64_t chunk_size, int64_t param_dtype, int64_t state_dtype, int64_t master, double lr,
           const std::optional<Tensor>& lr_tensor, double beta1, double beta2, double eps, double weight_decay,
           bool amsgrad, bool maximize, const std::optional<Tensor>& grad_mult,
           const std::optional<Tensor>& found_inf, std::optional<int64_t> sr_seed, int64_t fp8_format,
           const std::optional<Tensor>& chunk_first, const std::optional<Tensor>& fp8_partials,
           const std::optional<Tensor>& fp8_amax, int64_t stream) {
  const bool has_master = master != 0;
  const auto [pdt, sdt] = storage(param_dtype, state_dtype, has_master, true);
  const bool remainder = check_master(master, pdt);
  check_fp8_chunks(sdt, chunk_size);
  const fusedopt::TensorTable tt =
      make_table(table, numel, chunk_tensor, chunk_start, chunk_size, fusedopt::kMomentRows);
  fusedopt::AdamWHyper h(lr, device_scalar(lr_tensor, "lr"), beta1, beta2, eps, weight_decay, amsgrad, maximize,
                         device_scalar<double>(grad_mult, "grad_mult"), device_scalar(found_inf, "found_inf"));
  h.sr = stochastic_rounding(sr_seed, pdt, has_master);
  h.remainder = remainder;
  if (fp8_format >= 0) {  // FP8 copies: table rows kRowFp8 / kRowFp8Scale hold the copies and their scales
    TORCH_CHECK(fp8_format <= 1, "fusedopt cuda: bad fp8 format code ", fp8_format);
    TORCH_CHECK(pdt == fusedopt::DType::kFloat32 || has_master,
                "fusedopt cuda: FP8 copies need fp32 working copies (fp32 params or master weights)");
    TORCH_CHECK(chunk_first && fp8_partials && fp8_amax, "fusedopt cuda: FP8 copies need chunk_first, partials, amax");
    check_cuda_tensor(*chunk_first, at::kLong, tt.n_tensors + 1, "chunk_first");
    check_cuda_tensor(*fp8_partials, at::kDouble, tt.n_chunks, "fp8 partials");
    check_cuda_tensor(*fp8_amax, at::kDouble, tt.n_tensors, "fp8 amax");
    h.fp8.on = true;
    h.fp8.format = static_cast<fusedopt::Fp8Format>(fp8_format);
    h.fp8.partials = fp8_partials->data_ptr<double>();
    h.fp8.amax = fp8_amax->data_ptr<double>();
    h.fp8.chunk_first = chunk_first->data_ptr<int64_t>();
  }
  const char* error = fusedopt::adamw_cuda(tt, h, pdt, sdt, has_master, reinterpret_cast<void*>(stream));
  TORCH_CHECK(error == nullptr, "fusedopt cuda: adamw launch failed: ", error);
}

// Per-tensor sum of |x|^p (max |x| for p = inf) of row 0 into `out` (float64).
void power_sums(const Tensor& table, const Tensor& numel, const Tensor& chunk_tensor, const Tensor& chunk_start,
                const Tensor& chunk_first, int64_t chunk_size, int64_t dtype, double p, Tensor& partials,
                Tensor& out, int64_t stream) {
  const fusedopt::TensorTable tt = make_table(table, numel, chunk_tensor, chunk_start, chunk_size, 1);
  check_cuda_tensor(chunk_first, at::kLong, tt.n_tensors + 1, "chunk_first");
  check_cuda_tensor(partials, at::kDouble, tt.n_chunks, "partials");
  check_cuda_tensor(out, at::kDouble, tt.n_tensors, "out");
  TORCH_CHECK(dtype >= 0 && dtype <= 3, "fusedopt cuda: bad dtype code ", dtype);
  const char* error = fusedopt::power_sums_cuda(tt, chunk_first.data_ptr<int64_t>(),
                                                static_cast<fusedopt::DType>(dtype), p, partials.data_ptr<double>(),
                                                out.data_ptr<double>(), reinterpret_cast<void*>(stream));
  TORCH_CHECK(error == nullptr, "fusedopt cuda: power_sums launch failed: ", error);
}

// Row 0 (dtype code `dtype`: fp32, bf16, fp16) cast to fp8 (`format`: 0 e4m3fn,
// 1 e5m2) into row 1 with scales[t]; each input's absmax into `amax` (float64).
void cast_fp8(const Tensor& table, const Tensor& numel, const Tensor& chunk_tensor, const Tensor& chunk_start,
              const Tensor& chunk_first, int64_t chunk_size, int64_t dtype, int64_t format, const Tensor& scales,
              Tensor& partials, Tensor& amax, int64_t stream) {
  const fusedopt::TensorTable tt = make_table(table, numel, chunk_tensor, chunk_start, chunk_size, fusedopt::kFp8Rows);
  check_cuda_tensor(chunk_first, at::kLong, tt.n_tensors + 1, "chunk_first");
  check_cuda_tensor(scales, at::kFloat, tt.n_tensors, "scales");
  check_cuda_tensor(partials, at::kDouble, tt.n_chunks, "partials");
  check_cuda_tensor(amax, at::kDouble, tt.n_tensors, "amax");
  TORCH_CHECK(dtype == 0 || dtype == 2 || dtype == 3, "fusedopt cuda: fp8 casts take fp32, bf16 or fp16 inputs");
  TORCH_CHECK(format == 0 || format == 1, "fusedopt cuda: bad fp8 format code ", format);
  const char* error = fusedopt::cast_fp8_cuda(tt, chunk_first.data_ptr<int64_t>(), static_cast<fusedopt::DType>(dtype),
                                              static_cast<fusedopt::Fp8Format>(format), scales.data_ptr<float>(),
                                              partials.data_ptr<double>(), amax.data_ptr<double>(),
                                              reinterpret_cast<void*>(stream));
  TORCH_CHECK(error == nullptr, "fusedopt cuda: cast_fp8 launch failed: ", error);
}

// Float8Recipe.update_ in one launch (fp8.h: fp8_delayed_scaling_cuda): amax
// [n] float64; history [n, len], scales [n] contiguous, scale_inv [n] strided
// (rows 16 bytes apart), float32; nothing when found_inf holds a nonzero value.
void fp8_update_(const Tensor& amax, Tensor& history, Tensor& scales, Tensor& scale_inv,
                 const std::optional<Tensor>& found_inf, double fp8_max, int64_t margin, int64_t stream) {
  const int64_t n = scales.numel();
  check_cuda_tensor(amax, at::kDouble, n, "fp8_update_ amax");
  check_cuda_tensor(scales, at::kFloat, n, "fp8_update_ scales");
  TORCH_CHECK(history.dim() == 2 && history.size(0) == n && history.size(1) >= 1,
              "fusedopt cuda: fp8_update_ needs history [n, len] for n = ", n, " copies");
  check_cuda_tensor(history, at::kFloat, history.numel(), "fp8_update_ history");
  TORCH_CHECK(on_device(scale_inv) && scale_inv.scalar_type() == at::kFloat && scale_inv.dim() == 1 &&
                  scale_inv.numel() == n,
              "fusedopt cuda: fp8_update_ scale_inv must be a float32 " FUSEDOPT_DEVICE " tensor of ", n,
              " elements");
  TORCH_CHECK(margin >= 0, "fusedopt cuda: fp8_update_ margin must be >= 0, got ", margin);
  const char* error = fusedopt::fp8_delayed_scaling_cuda(
      amax.data_ptr<double>(), history.data_ptr<float>(), scales.data_ptr<float>(), ptr<float>(scale_inv, "scale_inv"),
      scale_inv.stride(0), n, history.size(1), float(fp8_max), int(margin), device_scalar(found_inf, "found_inf"),
      reinterpret_cast<void*>(stream));
  TORCH_CHECK(error == nullptr, "fusedopt cuda: fp8_update_ launch failed: ", error);
}

void scale_(const Tensor& table, const Tensor& numel, const Tensor& chunk_tensor, const Tensor& chunk_start,
            int64_t chunk_size, int64_t dtype, const Tensor& factor, int64_t stream) {
  const fusedopt::TensorTable tt = make_table(table, numel, chunk_tensor, chunk_start, chunk_size, 1);
  TORCH_CHECK(dtype >= 0 && dtype <= 3, "fusedopt cuda: bad dtype code ", dtype);
  const char* error = fusedopt::scale_cuda(tt, static_cast<fusedopt::DType>(dtype),
                                           device_scalar<double>(factor, "factor"), reinterpret_cast<void*>(stream));
  TORCH_CHECK(error == nullptr, "fusedopt cuda: scale_ launch failed: ", error);
}

void lamb_moments(const Tensor& table, const Tensor& numel, const Tensor& chunk_tensor, const Tensor& chunk_start,
                  const Tensor& chunk_first, int64_t chunk_size, int64_t param_dtype, int64_t state_dtype,
                  int64_t master, double beta1, double beta2, double eps, double weight_decay, bool bias_correction,
                  bool adam_w_mode, bool grad_averaging, bool maximize, const std::optional<Tensor>& grad_mult,
                  const std::optional<Tensor>& found_inf, Tensor& partials, Tensor& p_sums, Tensor& u_sums,
                  int64_t stream) {
  const fusedopt::TensorTable tt =
      make_table(table, numel, chunk_tensor, chunk_start, chunk_size, fusedopt::kMomentRows);
  const bool has_master = master != 0;
  const auto [pdt, sdt] = storage(param_dtype, state_dtype, has_master, true);
  check_fp8_chunks(sdt, chunk_size);
  check_cuda_tensor(chunk_first, at::kLong, tt.n_tensors + 1, "chunk_first");
  check_cuda_tensor(partials, at::kDouble, 2 * tt.n_chunks, "partials");
  check_cuda_tensor(p_sums, at::kDouble, tt.n_tensors, "p_sums");
  check_cuda_tensor(u_sums, at::kDouble, tt.n_tensors, "u_sums");
  fusedopt::LambHyper h{beta1, beta2, eps, weight_decay, bias_correction, adam_w_mode, grad_averaging, maximize,
                        device_scalar<double>(grad_mult, "grad_mult"), device_scalar(found_inf, "found_inf")};
  h.remainder = check_master(master, pdt);
  const char* error = fusedopt::lamb_moments_cuda(
      tt, chunk_first.data_ptr<int64_t>(), h, pdt, sdt, has_master,
      partials.data_ptr<double>(), p_sums.data_ptr<double>(), u_sums.data_ptr<double>(),
      reinterpret_cast<void*>(stream));
  TORCH_CHECK(error == nullptr, "fusedopt cuda: lamb moments launch failed: ", error);
}

void lamb_apply(const Tensor& table, const Tensor& numel, const Tensor& chunk_tensor, const Tensor& chunk_start,
                int64_t chunk_size, int64_t param_dtype, int64_t state_dtype, int64_t master, const Tensor& ratio,
                double beta1, double beta2, double eps, double weight_decay, bool bias_correction, bool adam_w_mode,
                const std::optional<Tensor>& found_inf, std::optional<int64_t> sr_seed, int64_t stream) {
  const fusedopt::TensorTable tt =
      make_table(table, numel, chunk_tensor, chunk_start, chunk_size, fusedopt::kMomentRows);
  const bool has_master = master != 0;
  const auto [pdt, sdt] = storage(param_dtype, state_dtype, has_master, true);
  check_fp8_chunks(sdt, chunk_size);
  check_cuda_tensor(ratio, at::kFloat, tt.n_tensors, "ratio");
  fusedopt::LambHyper h{beta1, beta2, eps, weight_decay, bias_correction, adam_w_mode, false, false, nullptr,
                        device_scalar(found_inf, "found_inf")};
  h.sr = stochastic_rounding(sr_seed, pdt, has_master);
  h.remainder = check_master(master, pdt);
  const char* error = fusedopt::lamb_apply_cuda(tt, h, pdt, sdt, has_master,
                                                ratio.data_ptr<float>(), reinterpret_cast<void*>(stream));
  TORCH_CHECK(error == nullptr, "fusedopt cuda: lamb apply launch failed: ", error);
}

void sophia(const Tensor& table, const Tensor& numel, const Tensor& chunk_tensor, const Tensor& chunk_start,
            int64_t chunk_size, int64_t param_dtype, int64_t state_dtype, int64_t master, double lr,
            const std::optional<Tensor>& lr_tensor, double beta1, double rho_bs, double weight_decay, bool maximize,
            const std::optional<Tensor>& grad_mult, const std::optional<Tensor>& found_inf,
            std::optional<int64_t> sr_seed, int64_t stream) {
  const fusedopt::TensorTable tt =
      make_table(table, numel, chunk_tensor, chunk_start, chunk_size, fusedopt::kMomentRows);
  const bool has_master = master != 0;
  const auto [pdt, sdt] = storage(param_dtype, state_dtype, has_master, true);
  check_fp8_chunks(sdt, chunk_size);
  fusedopt::SophiaHyper h{lr, device_scalar(lr_tensor, "lr"), beta1, rho_bs, weight_decay, maximize,
                          device_scalar<double>(grad_mult, "grad_mult"), device_scalar(found_inf, "found_inf")};
  h.sr = stochastic_rounding(sr_seed, pdt, has_master);
  h.remainder = check_master(master, pdt);
  const char* error = fusedopt::sophia_cuda(tt, h, pdt, sdt, has_master, reinterpret_cast<void*>(stream));
  TORCH_CHECK(error == nullptr, "fusedopt cuda: sophia launch failed: ", error);
}

void sophia_hessian(const Tensor& table, const Tensor& numel, const Tensor& chunk_tensor, const Tensor& chunk_start,
                    int64_t chunk_size, int64_t param_dtype, int64_t state_dtype, bool has_master, double beta2,
                    int64_t stream) {
  const fusedopt::TensorTable tt =
      make_table(table, numel, chunk_tensor, chunk_start, chunk_size, fusedopt::kMomentRows);
  const auto [pdt, sdt] = storage(param_dtype, state_dtype, has_master, true);
  check_fp8_chunks(sdt, chunk_size);
  const char* error = fusedopt::sophia_hessian_cuda(tt, beta2, pdt, sdt, has_master,
                                                    reinterpret_cast<void*>(stream));
  TORCH_CHECK(error == nullptr, "fusedopt cuda: sophia hessian launch failed: ", error);
}

// AdafactorLayout from `packed`, its arrays one after another in field order
// (fusedopt/backends/_adafactor_tables.py: FACTORED_TASK_PARTS), sized by the counts.
fusedopt::AdafactorLayout unpack_layout(const Tensor& packed, int64_t n, int64_t n_tasks, int64_t n_slices,
                                        int64_t n_col_programs, int64_t col_total) {
  TORCH_CHECK(n_tasks > 0 && n_slices > 0 && n_col_programs > 0 && col_total > 0,
              "fusedopt cuda: a factored launch needs tasks, slices, column programs and column partials");
  const int64_t sizes[] = {n, n, n, n + 1, n_tasks, n_tasks, n_tasks, n_tasks, n_slices, n_slices, n_slices + 1,
                           n_col_programs, n_col_programs};
  int64_t total = 0;
  for (int64_t size : sizes) total += size;
  check_cuda_tensor(packed, at::kLong, total, "the factored layout");
  const int64_t* parts[13];
  const int64_t* p = packed.data_ptr<int64_t>();
  for (int i = 0; i < 13; ++i) {
    parts[i] = p;
    p += sizes[i];
  }
  return {parts[0], parts[1], parts[2], parts[3], parts[4], parts[5], parts[6], parts[7], parts[8], parts[9],
          parts[10], parts[11], parts[12], n_tasks, n_slices, n_col_programs, col_total};
}

// An Adafactor launch's table, layout, hyperparameters and scratch, checked (for adafactor and
// adafactor_sharded).
struct AdafactorLaunch {
  fusedopt::TensorTable tt;
  fusedopt::AdafactorLayout L{};
  bool factored;
  fusedopt::DType pdt, sdt;
  fusedopt::AdafactorHyper h;
  fusedopt::AdafactorScratch scratch;
};

AdafactorLaunch adafactor_launch(const Tensor& table, const Tensor& numel, const Tensor& chunk_tensor,
                                 const Tensor& chunk_start, const Tensor& chunk_first, int64_t chunk_size,
                                 int64_t param_dtype, int64_t state_dtype, int64_t master, bool fp8_exp_avg,
                                 const std::optional<Tensor>& layout, int64_t n_tasks, int64_t n_slices,
                                 int64_t n_col_programs, int64_t col_total, double lr,
                                 const std::optional<Tensor>& lr_tensor, double beta2_decay, double eps1, double eps2,
                                 double d, double weight_decay, bool maximize, std::optional<double> beta1,
                                 const std::optional<Tensor>& grad_mult, const std::optional<Tensor>& found_inf,
                                 std::optional<int64_t> sr_seed, Tensor& col_partial, Tensor& p_partial,
                                 Tensor& u_partial, Tensor& rmean, Tensor& sums) {
  const fusedopt::TensorTable tt =
      make_table(table, numel, chunk_tensor, chunk_start, chunk_size, fusedopt::kAdafactorRows);
  const bool has_master = master != 0;
  const auto [pdt, sdt] = storage(param_dtype, state_dtype, has_master);  // the statistics: never FP8
  check_cuda_tensor(chunk_first, at::kLong, tt.n_tensors + 1, "chunk_first");
  if (fp8_exp_avg) {
    TORCH_CHECK(beta1.has_value(), "fusedopt cuda: an FP8 exp_avg needs beta1");
    check_fp8_chunks(fusedopt::DType::kFp8Blocked, chunk_size);
  }
  fusedopt::AdafactorLayout L{};
  if (layout.has_value()) {
    L = unpack_layout(*layout, tt.n_tensors, n_tasks, n_slices, n_col_programs, col_total);
    check_cuda_tensor(col_partial, at::kDouble, col_total, "col_partial");
    check_cuda_tensor(p_partial, at::kDouble, n_tasks, "p_partial");
    check_cuda_tensor(rmean, at::kDouble, n_slices, "rmean");
  } else {
    check_cuda_tensor(p_partial, at::kDouble, tt.n_chunks, "p_partial");
  }
  check_cuda_tensor(u_partial, at::kDouble, tt.n_chunks, "u_partial");
  check_cuda_tensor(sums, at::kDouble, 3 * tt.n_tensors, "sums");
  fusedopt::AdafactorHyper h{lr, device_scalar(lr_tensor, "lr"), beta2_decay, eps1, eps2, d, weight_decay, maximize,
                             beta1.has_value(), beta1.value_or(0.0), device_scalar<double>(grad_mult, "grad_mult"),
                             device_scalar(found_inf, "found_inf")};
  h.sr = stochastic_rounding(sr_seed, pdt, has_master);
  h.remainder = check_master(master, pdt);
  const fusedopt::AdafactorScratch scratch{ptr<double>(col_partial, "col_partial"), p_partial.data_ptr<double>(),
                                           u_partial.data_ptr<double>(), ptr<double>(rmean, "rmean"),
                                           sums.data_ptr<double>()};
  return {tt, L, layout.has_value(), pdt, sdt, h, scratch};
}

// One Adafactor step of a bucket (table rows in AdafactorRow order; steps
// already advanced). `layout` (with its counts) for tensors of 2+ dims, None
// for 0-d / 1-d ones; the fp64 scratch arrays as AdafactorScratch describes.
void adafactor(const Tensor& table, const Tensor& numel, const Tensor& chunk_tensor, const Tensor& chunk_start,
               const Tensor& chunk_first, int64_t chunk_size, int64_t param_dtype, int64_t state_dtype,
               int64_t master, bool fp8_exp_avg, const std::optional<Tensor>& layout, int64_t n_tasks,
               int64_t n_slices, int64_t n_col_programs, int64_t col_total, double lr,
               const std::optional<Tensor>& lr_tensor, double beta2_decay, double eps1, double eps2, double d,
               double weight_decay, bool maximize, std::optional<double> beta1,
               const std::optional<Tensor>& grad_mult, const std::optional<Tensor>& found_inf,
               std::optional<int64_t> sr_seed, Tensor& col_partial, Tensor& p_partial, Tensor& u_partial,
               Tensor& rmean, Tensor& sums, int64_t stream) {
  const AdafactorLaunch a = adafactor_launch(
      table, numel, chunk_tensor, chunk_start, chunk_first, chunk_size, param_dtype, state_dtype, master,
      fp8_exp_avg, layout, n_tasks, n_slices, n_col_programs, col_total, lr, lr_tensor, beta2_decay, eps1, eps2, d,
      weight_decay, maximize, beta1, grad_mult, found_inf, sr_seed, col_partial, p_partial, u_partial, rmean, sums);
  const char* error = fusedopt::adafactor_cuda(a.tt, a.factored ? &a.L : nullptr, chunk_first.data_ptr<int64_t>(),
                                               a.h, a.pdt, a.sdt, master != 0, fp8_exp_avg, a.scratch,
                                               reinterpret_cast<void*>(stream));
  TORCH_CHECK(error == nullptr, "fusedopt cuda: adafactor launch failed: ", error);
}

// One phase of Adafactor on the local shards of DTensor params (include/fusedopt/adafactor.h:
// adafactor_sharded_cuda), the adafactor op's arguments and the phases' own: the flat row and column sums
// with each tensor's base in them, the whole tensors' R and C, the per-slice sums of row_var.
void adafactor_sharded(int64_t phase, const Tensor& table, const Tensor& numel, const Tensor& chunk_tensor,
                       const Tensor& chunk_start, const Tensor& chunk_first, int64_t chunk_size, int64_t param_dtype,
                       int64_t state_dtype, int64_t master, const std::optional<Tensor>& layout, int64_t n_tasks,
                       int64_t n_slices, int64_t n_col_programs, int64_t col_total, double lr,
                       const std::optional<Tensor>& lr_tensor, double beta2_decay, double eps1, double eps2, double d,
                       double weight_decay, bool maximize, std::optional<double> beta1,
                       const std::optional<Tensor>& grad_mult, const std::optional<Tensor>& found_inf,
                       std::optional<int64_t> sr_seed, Tensor& col_partial, Tensor& p_partial, Tensor& u_partial,
                       Tensor& rmean, Tensor& sums, Tensor& row_sums, const Tensor& row_base, Tensor& col_sums,
                       const Tensor& col_base, const Tensor& full_rows, const Tensor& full_cols, Tensor& rv_sums,
                       int64_t stream) {
  TORCH_CHECK(phase >= 0 && phase <= 3, "fusedopt cuda: adafactor_sharded phase must be 0, 1, 2 or 3, got ", phase);
  const AdafactorLaunch a = adafactor_launch(
      table, numel, chunk_tensor, chunk_start, chunk_first, chunk_size, param_dtype, state_dtype, master, false,
      layout, n_tasks, n_slices, n_col_programs, col_total, lr, lr_tensor, beta2_decay, eps1, eps2, d, weight_decay,
      maximize, beta1, grad_mult, found_inf, sr_seed, col_partial, p_partial, u_partial, rmean, sums);
  const int64_t n = a.tt.n_tensors;
  fusedopt::AdafactorShardedScratch sh{};
  if (a.factored) {
    for (const Tensor* t : {&row_base, &col_base, &full_rows, &full_cols}) {
      check_cuda_tensor(*t, at::kLong, n, "row_base, col_base, full_rows and full_cols");
    }
    // (the bases live on the device: that they fit row_sums and col_sums is the backend's to keep,
    // fusedopt/backends/_sharded.py)
    TORCH_CHECK(on_device(row_sums) && on_device(col_sums) && row_sums.scalar_type() == at::kDouble &&
                    col_sums.scalar_type() == at::kDouble && row_sums.is_contiguous() && col_sums.is_contiguous(),
                "fusedopt cuda: row_sums and col_sums must be contiguous float64 " FUSEDOPT_DEVICE " tensors");
    check_cuda_tensor(rv_sums, at::kDouble, n_slices, "rv_sums");
    sh = {ptr<double>(row_sums, "row_sums"), ptr<int64_t>(row_base, "row_base"),
          ptr<double>(col_sums, "col_sums"), ptr<int64_t>(col_base, "col_base"),
          ptr<int64_t>(full_rows, "full_rows"), ptr<int64_t>(full_cols, "full_cols"),
          ptr<double>(rv_sums, "rv_sums")};
  }
  const char* error = fusedopt::adafactor_sharded_cuda(int(phase), a.tt, a.factored ? &a.L : nullptr,
                                                       chunk_first.data_ptr<int64_t>(), a.h, a.pdt, a.sdt, master != 0,
                                                       a.scratch, sh, reinterpret_cast<void*>(stream));
  TORCH_CHECK(error == nullptr, "fusedopt cuda: adafactor_sharded launch failed: ", error);
}

}  // namespace

TORCH_LIBRARY(FUSEDOPT_CUDA_LIBRARY, m) {
  m.def(
      "adafactor(Tensor table, Tensor numel, Tensor chunk_tensor, Tensor chunk_start, Tensor chunk_first, "
      "int chunk_size, int param_dtype, int state_dtype, int master, bool fp8_exp_avg, Tensor? layout, "
      "int n_tasks, int n_slices, int n_col_programs, int col_total, float lr, Tensor? lr_tensor, "
      "float beta2_decay, float eps1, float eps2, float d, float weight_decay, bool maximize, float? beta1, "
      "Tensor? grad_mult, Tensor? found_inf, int? sr_seed, Tensor(a!) col_partial, Tensor(b!) p_partial, "
      "Tensor(c!) u_partial, Tensor(d!) rmean, Tensor(e!) sums, int stream) -> ()",
      &adafactor);
  m.def(
      "adafactor_sharded(int phase, Tensor table, Tensor numel, Tensor chunk_tensor, Tensor chunk_start, "
      "Tensor chunk_first, int chunk_size, int param_dtype, int state_dtype, int master, Tensor? layout, "
      "int n_tasks, int n_slices, int n_col_programs, int col_total, float lr, Tensor? lr_tensor, "
      "float beta2_decay, float eps1, float eps2, float d, float weight_decay, bool maximize, float? beta1, "
      "Tensor? grad_mult, Tensor? found_inf, int? sr_seed, Tensor(a!) col_partial, Tensor(b!) p_partial, "
      "Tensor(c!) u_partial, Tensor(d!) rmean, Tensor(e!) sums, Tensor(f!) row_sums, Tensor row_base, "
      "Tensor(g!) col_sums, Tensor col_base, Tensor full_rows, Tensor full_cols, Tensor(h!) rv_sums, "
      "int stream) -> ()",
      &adafactor_sharded);
  m.def(
      "sophia(Tensor table, Tensor numel, Tensor chunk_tensor, Tensor chunk_start, int chunk_size, "
      "int param_dtype, int state_dtype, int master, float lr, Tensor? lr_tensor, float beta1, float rho_bs, "
      "float weight_decay, bool maximize, Tensor? grad_mult, Tensor? found_inf, int? sr_seed, int stream) -> ()",
      &sophia);
  m.def(
      "sophia_hessian(Tensor table, Tensor numel, Tensor chunk_tensor, Tensor chunk_start, int chunk_size, "
      "int param_dtype, int state_dtype, bool has_master, float beta2, int stream) -> ()",
      &sophia_hessian);
  m.def(
      "lamb_moments(Tensor table, Tensor numel, Tensor chunk_tensor, Tensor chunk_start, Tensor chunk_first, "
      "int chunk_size, int param_dtype, int state_dtype, int master, float beta1, float beta2, float eps, "
      "float weight_decay, bool bias_correction, bool adam_w_mode, bool grad_averaging, bool maximize, "
      "Tensor? grad_mult, Tensor? found_inf, Tensor(a!) partials, Tensor(b!) p_sums, Tensor(c!) u_sums, "
      "int stream) -> ()",
      &lamb_moments);
  m.def(
      "lamb_apply(Tensor table, Tensor numel, Tensor chunk_tensor, Tensor chunk_start, int chunk_size, "
      "int param_dtype, int state_dtype, int master, Tensor ratio, float beta1, float beta2, float eps, "
      "float weight_decay, bool bias_correction, bool adam_w_mode, Tensor? found_inf, int? sr_seed, "
      "int stream) -> ()",
      &lamb_apply);
  m.def(
      "power_sums(Tensor table, Tensor numel, Tensor chunk_tensor, Tensor chunk_start, Tensor chunk_first, "
      "int chunk_size, int dtype, float p, Tensor(a!) partials, Tensor(b!) out, int stream) -> ()",
      &power_sums);
  m.def(
      "cast_fp8(Tensor table, Tensor numel, Tensor chunk_tensor, Tensor chunk_start, Tensor chunk_first, "
      "int chunk_size, int dtype, int format, Tensor scales, Tensor(a!) partials, Tensor(b!) amax, int stream) -> ()",
      &cast_fp8);
  m.def(
      "scale_(Tensor table, Tensor numel, Tensor chunk_tensor, Tensor chunk_start, int chunk_size, int dtype, "
      "Tensor factor, int stream) -> ()",
      &scale_);
  m.def(
      "fp8_update_(Tensor amax, Tensor(a!) history, Tensor(b!) scales, Tensor(c!) scale_inv, Tensor? found_inf, "
      "float fp8_max, int margin, int stream) -> ()",
      &fp8_update_);
  m.def(
      "adamw(Tensor table, Tensor numel, Tensor chunk_tensor, Tensor chunk_start, int chunk_size, "
      "int param_dtype, int state_dtype, int master, float lr, Tensor? lr_tensor, float beta1, "
      "float beta2, float eps, float weight_decay, bool amsgrad, bool maximize, Tensor? grad_mult, "
      "Tensor? found_inf, int? sr_seed, int fp8_format, Tensor? chunk_first, Tensor(a!)? fp8_partials, "
      "Tensor(b!)? fp8_amax, int stream) -> ()",
      &adamw);
}
