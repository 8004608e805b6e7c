// torch.library bindings of the CPU backend: turn tensor lists into the
// torch-free TensorTable of include/fusedopt/multi_tensor.h, check what the
// kernels assume, and call the OpenMP loops in cpu/. Only light ATen headers
// are used so the first-use JIT build stays short.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "bindings_checks.h"
#include "fusedopt/adafactor.h"
#include "fusedopt/adamw.h"
#include "fusedopt/dispatch.h"
#include "fusedopt/fp8.h"
#include "fusedopt/fp8_states.h"
#include "fusedopt/host_table.h"
#include "fusedopt/lamb.h"
#include "fusedopt/norms.h"
#include "fusedopt/sophia.h"

namespace {

using at::Tensor;
using at::TensorList;

// An input's data pointer, checked to be a plain tensor's (bindings_checks.h).
template <typename T>
T* ptr(const Tensor& t, const char* what) {
  return fusedopt::checked_ptr<T>(t, "cpu", what);
}

fusedopt::DType dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return fusedopt::DType::kFloat32;
    case at::kDouble: return fusedopt::DType::kFloat64;
    case at::kBFloat16: return fusedopt::DType::kBFloat16;
    case at::kHalf: return fusedopt::DType::kFloat16;
    case at::kFloat8_e4m3fn: return fusedopt::DType::kFp8Blocked;  // block-scaled states only
    default: TORCH_CHECK(false, "fusedopt cpu: unsupported dtype ", t, " (fp32, fp64, bf16, fp16 only)");
  }
}

// A 1-element CPU tensor of T, or null. lr and found_inf are float32; grad_mult
// and the clip factor travel in fp64 (a clip coefficient of fp64 grads keeps
// its bits), which the kernels round once to the math type.
template <typename T = float>
const T* scalar_ptr(const std::optional<Tensor>& t, const char* what) {
  if (!t.has_value()) return nullptr;
  constexpr at::ScalarType kType = c10::CppTypeToScalarType<T>::value;
  TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == kType && t->numel() == 1, "fusedopt cpu: ", what,
              " must be a 1-element ", kType == at::kDouble ? "float64" : "float32", " CPU tensor");
  return ptr<T>(*t, what);
}

// Host-side table + chunk list for one launch, from tensor lists.
struct HostTable : fusedopt::HostTableArrays {
  // rows[r] is the r-th tensor list, aligned with rows[0]; an empty list means
  // "row absent". Rows in `free_rows` (steps, Adafactor's row/col factors)
  // hold contiguous CPU tensors of any shape; every other row's tensors have
  // the shape and strides of rows[0]'s.
  // allow_empty: zero-size tensors may take a slot (they get no chunk): Adafactor's sharded phases
  HostTable(const std::vector<TensorList>& rows, int64_t chunk_size, std::vector<int64_t> free_rows = {},
            bool allow_empty = false) {
    TORCH_CHECK(chunk_size > 0, "fusedopt cpu: chunk_size must be positive");
    const TensorList first = rows[0];
    const int64_t n = int64_t(first.size());
    const int64_t n_rows = int64_t(rows.size());
    table.assign(size_t(n_rows * n), 0);
    numel.resize(size_t(n));
    for (int64_t r = 0; r < n_rows; ++r) {
      TORCH_CHECK(rows[size_t(r)].empty() || int64_t(rows[size_t(r)].size()) == n, "fusedopt cpu: tensor list ",
                  r, " has ", rows[size_t(r)].size(), " tensors, expected ", n);
    }
    for (int64_t t = 0; t < n; ++t) {
      const Tensor& p = first[size_t(t)];
      fusedopt::check_plain(p, "cpu", "a tensor of a launch");
      TORCH_CHECK(p.device().is_cpu(), "fusedopt cpu: tensors must be on the CPU");
      TORCH_CHECK(allow_empty || p.numel() > 0, "fusedopt cpu: zero-size tensors must be filtered out before launch");
      TORCH_CHECK(p.is_non_overlapping_and_dense(), "fusedopt cpu: tensors must be dense (stage them first)");
      numel[size_t(t)] = p.numel();
      for (int64_t r = 0; r < n_rows; ++r) {
        if (rows[size_t(r)].empty()) continue;
        const Tensor& x = rows[size_t(r)][size_t(t)];
        if (std::find(free_rows.begin(), free_rows.end(), r) != free_rows.end()) {
          TORCH_CHECK(x.device().is_cpu() && x.is_contiguous(), "fusedopt cpu: tensor ", t, " of list ", r,
                      " must be a contiguous CPU tensor");
        } else {
          // the same flat walk: identical strides, or both contiguous (the strides of size-1 dims may differ:
          // a DTensor's local shard gets them from view_as)
          TORCH_CHECK(x.device().is_cpu() && x.numel() == p.numel() &&
                          (x.strides() == p.strides() || (x.is_contiguous() && p.is_contiguous())),
                      "fusedopt cpu: tensor ", t, " of list ", r, " must be a CPU tensor with the shape and ",
                      "strides of list 0's");
        }
        table[size_t(r * n + t)] = reinterpret_cast<int64_t>(ptr<void>(x, "a tensor of a launch"));
      }
    }
    cut_into_chunks(chunk_size);
  }
};

void check_dtype(TensorList xs, at::ScalarType want, const char* what) {
  for (const Tensor& x : xs) {
    TORCH_CHECK(x.scalar_type() == want, "fusedopt cpu: ", what, " must be ", want, ", got ", x.scalar_type());
  }
}

// The states' storage dtype (of the first state tensor; the default rule when
// there is none), checked to be one the kernels are built for.
at::ScalarType state_dtype_of(at::ScalarType pdt, std::initializer_list<TensorList> states, bool has_master,
                              bool fp8_states = false) {
  at::ScalarType sdt = has_master ? at::kFloat : pdt;
  for (TensorList list : states) {
    if (!list.empty()) {
      sdt = list[0].scalar_type();
      break;
    }
  }
  TORCH_CHECK(fusedopt::supported_storage(dtype_code(pdt), dtype_code(sdt), has_master, fp8_states), "fusedopt cpu: ", pdt,
              " params", has_master ? " with master weights" : "", " cannot keep ", sdt, " states");
  return sdt;
}

// The launch's stochastic rounding: off without a seed; only bf16 params
// without master weights have it (the kernels are built for those).
fusedopt::StochasticRounding stochastic_rounding(const std::optional<int64_t>& seed, at::ScalarType pdt,
                                                 bool has_master) {
  if (!seed.has_value()) return {};
  TORCH_CHECK(pdt == at::kBFloat16 && !has_master,
              "fusedopt cpu: stochastic rounding is for bf16 params without master weights, got ", pdt,
              has_master ? " params with master weights" : " params");
  return {true, uint32_t(uint64_t(*seed) & 0xFFFFFFFFu)};
}

// Masters: fp32, or (master_weights="remainder") the int16 remainders of bf16
// params (numeric.h: join_remainder). Returns whether they are remainders.
bool check_masters(TensorList masters, at::ScalarType pdt) {
  const bool remainder = !masters.empty() && masters[0].scalar_type() == at::kShort;
  TORCH_CHECK(!remainder || pdt == at::kBFloat16, "fusedopt cpu: int16 remainders complete bf16 params, got ", pdt,
              " params");
  check_dtype(masters, remainder ? at::kShort : at::kFloat, remainder ? "master_remainder" : "master_param");
  return remainder;
}

// A list the op cannot do without: one tensor per param (an empty list would be taken as an absent row,
// whose null pointers the kernels would then follow).
void require(TensorList xs, size_t n, const char* what) {
  TORCH_CHECK(xs.size() == n, "fusedopt cpu: ", what, " needs one tensor per param (", n, "), got ", xs.size());
}

void check_steps(TensorList steps) {
  for (const Tensor& s : steps) {
    TORCH_CHECK(s.device().is_cpu() && s.scalar_type() == at::kFloat && s.numel() == 1,
                "fusedopt cpu: step must be a float32 CPU scalar tensor");
  }
}

void check_one_dtype(TensorList xs) {
  TORCH_CHECK(!xs.empty(), "fusedopt cpu: empty tensor list");
  check_dtype(xs, xs[0].scalar_type(), "every tensor of a launch");
}

// Which fp8 format a dtype is (the dtype of the outputs of a cast).
fusedopt::Fp8Format fp8_format(at::ScalarType t, const char* backend) {
  if (t == at::kFloat8_e4m3fn) return fusedopt::Fp8Format::kE4M3FN;
  TORCH_CHECK(t == at::kFloat8_e5m2, "fusedopt ", backend, ": fp8 outputs must be float8_e4m3fn or float8_e5m2, got ",
              t);
  return fusedopt::Fp8Format::kE5M2;
}

// Block-scaled FP8 states: each state's list of scales, fp32 contiguous, one per kQBlock elements.
void check_block_scales(TensorList scales, TensorList states, const char* what) {
  TORCH_CHECK(scales.size() == states.size(), "fusedopt cpu: ", what, " needs one scale tensor per state tensor");
  for (size_t i = 0; i < scales.size(); ++i) {
    const int64_t blocks = (states[i].numel() + fusedopt::kQBlock - 1) / fusedopt::kQBlock;
    TORCH_CHECK(states[i].is_contiguous() && scales[i].scalar_type() == at::kFloat && scales[i].is_contiguous() &&
                    scales[i].numel() == blocks,
                "fusedopt cpu: ", what, " ", i, " must be contiguous fp32 of ", blocks,
                " elements (one per block of the contiguous FP8 state)");
  }
}

void adamw(TensorList params, TensorList grads, TensorList exp_avgs, TensorList exp_avg_sqs,
           TensorList max_exp_avg_sqs, TensorList exp_avg_scales, TensorList exp_avg_sq_scales,
           TensorList max_exp_avg_sq_scales, TensorList masters, TensorList steps, TensorList fp8_weights,
           TensorList fp8_scales, const std::optional<Tensor>& fp8_amax, double lr,
           const std::optional<Tensor>& lr_tensor, double beta1, double beta2, double eps,
           double weight_decay, bool amsgrad, bool maximize, const std::optional<Tensor>& grad_mult,
           const std::optional<Tensor>& found_inf, std::optional<int64_t> sr_seed, int64_t chunk_size) {
  if (params.empty()) return;
  const at::ScalarType pdt = params[0].scalar_type();
  const bool has_master = !masters.empty();
  for (auto [list, what] : {std::pair{grads, "grads"}, {exp_avgs, "exp_avg"}, {exp_avg_sqs, "exp_avg_sq"},
                            {steps, "steps"}})
    require(list, params.size(), what);
  if (amsgrad) require(max_exp_avg_sqs, params.size(), "amsgrad's max_exp_avg_sq");
  const at::ScalarType sdt = state_dtype_of(pdt, {exp_avgs, exp_avg_sqs}, has_master, true);
  if (sdt == at::kFloat8_e4m3fn) {
    check_block_scales(exp_avg_scales, exp_avgs, "exp_avg_scale");
    check_block_scales(exp_avg_sq_scales, exp_avg_sqs, "exp_avg_sq_scale");
    check_block_scales(max_exp_avg_sq_scales, max_exp_avg_sqs, "max_exp_avg_sq_scale");
    TORCH_CHECK(chunk_size % fusedopt::kQBlock == 0, "fusedopt cpu: chunk_size must be a multiple of ",
                fusedopt::kQBlock, " with FP8 states");
  }
  check_dtype(params, pdt, "params");
  check_dtype(grads, pdt, "grads");
  check_dtype(exp_avgs, sdt, "exp_avg");
  check_dtype(exp_avg_sqs, sdt, "exp_avg_sq");
  check_dtype(max_exp_avg_sqs, sdt, "max_exp_avg_sq");
  const bool remainder = check_masters(masters, pdt);

  check_steps(steps);
  const bool fp8 = !fp8_weights.empty();
  if (fp8) {
    TORCH_CHECK(pdt == at::kFloat || has_master, "fusedopt cpu: FP8 copies need fp32 working copies (fp32 params "
                "or master weights), got ", pdt, " params");
    check_one_dtype(fp8_weights);
    TORCH_CHECK(fp8_scales.size() == fp8_weights.size() && fp8_amax.has_value() &&
                    fp8_amax->scalar_type() == at::kDouble && fp8_amax->is_contiguous() &&
                    fp8_amax->numel() == int64_t(params.size()),
                "fusedopt cpu: FP8 copies need one scale per param and a float64 amax output of n elements");
    check_steps(fp8_scales);  // 1-element float32 CPU tensors, like steps
  }
  HostTable host({params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters, steps, fp8_weights, fp8_scales,
                  exp_avg_scales, exp_avg_sq_scales, max_exp_avg_sq_scales},
                 chunk_size, {fusedopt::kRowStep, fusedopt::kRowFp8Scale, fusedopt::kRowExpAvgScale,
                              fusedopt::kRowExpAvgSqScale, fusedopt::kRowMaxExpAvgSqScale});
  fusedopt::AdamWHyper h(lr, scalar_ptr(lr_tensor, "lr"), beta1, beta2, eps, weight_decay, amsgrad, maximize,
                         scalar_ptr<double>(grad_mult, "grad_mult"), scalar_ptr(found_inf, "found_inf"));
  h.sr = stochastic_rounding(sr_seed, pdt, has_master);
  h.remainder = remainder;
  if (fp8) {
    h.fp8.on = true;
    h.fp8.format = fp8_format(fp8_weights[0].scalar_type(), "cpu");
    h.fp8.amax = ptr<double>(*fp8_amax, "fp8_amax");
  }
  fusedopt::adamw_cpu(host.tt, h, dtype_code(pdt), dtype_code(sdt), has_master, at::get_num_threads());
}

// Per-tensor sum of |x|^p (max |x| for p = inf), as float64 [n].
Tensor power_sums(TensorList tensors, double p, int64_t chunk_size) {
  check_one_dtype(tensors);
  HostTable host({tensors}, chunk_size);
  Tensor out = at::empty({int64_t(tensors.size())}, at::TensorOptions().dtype(at::kDouble));
  fusedopt::power_sums_cpu(host.tt, dtype_code(tensors[0].scalar_type()), p, out.data_ptr<double>(),
                           at::get_num_threads());
  return out;
}

void scale_(TensorList tensors, const Tensor& factor, int64_t chunk_size) {
  check_one_dtype(tensors);
  HostTable host({tensors}, chunk_size);
  fusedopt::scale_cpu(host.tt, dtype_code(tensors[0].scalar_type()), scalar_ptr<double>(factor, "factor"),
                      at::get_num_threads());
}

// max_grad_norm's norm and grad multiplier from the root of the grads' sum of squares (norms.h:
// clip_scalars), as 0-d tensors: the norm in float32 (float64 with fp64), the multiplier in float64.
std::tuple<Tensor, Tensor> clip_scalars(const Tensor& root, const std::optional<Tensor>& grad_scale, double max_norm,
                                        bool fp64) {
  const double* total = scalar_ptr<double>(root, "root");
  TORCH_CHECK(total != nullptr, "fusedopt cpu: clip_scalars needs the root of the power sum");
  double scale = 0.0;
  if (grad_scale.has_value()) {
    const at::ScalarType st = grad_scale->scalar_type();
    TORCH_CHECK(st == at::kFloat || st == at::kDouble, "fusedopt cpu: grad_scale must be float32 or float64, got ",
                st);
    scale = st == at::kFloat ? double(*scalar_ptr<float>(grad_scale, "grad_scale"))
                             : *scalar_ptr<double>(grad_scale, "grad_scale");
  }
  const double* scale_ptr = grad_scale.has_value() ? &scale : nullptr;
  Tensor norm = at::empty({}, at::TensorOptions().dtype(fp64 ? at::kDouble : at::kFloat));
  Tensor mult = at::empty({}, at::TensorOptions().dtype(at::kDouble));
  if (fp64) {
    const auto s = fusedopt::clip_scalars<double>(*total, max_norm, scale_ptr);
    *norm.data_ptr<double>() = s.norm;
    *mult.data_ptr<double>() = s.grad_mult;
  } else {
    const auto s = fusedopt::clip_scalars<float>(*total, max_norm, scale_ptr);
    *norm.data_ptr<float>() = s.norm;
    *mult.data_ptr<double>() = s.grad_mult;
  }
  return {norm, mult};
}

// outputs[t] = saturate(inputs[t] * scales[t]) in fp8; returns each input's absmax (float64 [n]).
Tensor cast_fp8(TensorList inputs, TensorList outputs, const Tensor& scales, int64_t chunk_size) {
  check_one_dtype(inputs);
  const at::ScalarType idt = inputs[0].scalar_type();
  TORCH_CHECK(idt == at::kFloat || idt == at::kBFloat16 || idt == at::kHalf,
              "fusedopt cpu: fp8 casts take float32, bfloat16 or float16 inputs, got ", idt);
  check_one_dtype(outputs);
  const fusedopt::Fp8Format format = fp8_format(outputs[0].scalar_type(), "cpu");
  const int64_t n = int64_t(inputs.size());
  TORCH_CHECK(scales.device().is_cpu() && scales.scalar_type() == at::kFloat && scales.is_contiguous() &&
                  scales.numel() == n,
              "fusedopt cpu: scales must be a contiguous float32 CPU tensor with one value per tensor");
  HostTable host({inputs, outputs}, chunk_size);
  Tensor amax = at::empty({n}, at::TensorOptions().dtype(at::kDouble));
  fusedopt::cast_fp8_cpu(host.tt, dtype_code(idt), format, ptr<float>(scales, "scales"), amax.data_ptr<double>(),
                         at::get_num_threads());
  return amax;
}

// Float8Recipe.update_ for CPU buffers in one call (fp8.h: fp8_delayed_scaling_cpu):
// nothing when found_inf holds a nonzero value.
void fp8_update_(const Tensor& amax, const Tensor& history, const Tensor& scales, const Tensor& scale_inv,
                 const std::optional<Tensor>& found_inf, double fp8_max, int64_t margin) {
  const int64_t n = scales.numel();
  TORCH_CHECK(amax.device().is_cpu() && amax.scalar_type() == at::kDouble && amax.is_contiguous() &&
                  amax.numel() == n,
              "fusedopt cpu: fp8_update_ takes one float64 amax per copy");
  for (const Tensor* t : {&history, &scales, &scale_inv}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && (t == &scale_inv || t->is_contiguous()),
                "fusedopt cpu: fp8_update_ buffers must be contiguous float32 CPU tensors (scale_inv: strided)");
  }
  TORCH_CHECK(scale_inv.dim() == 1 && scale_inv.numel() == n && history.dim() == 2 && history.size(0) == n &&
                  history.size(1) >= 1,
              "fusedopt cpu: fp8_update_ needs scale_inv [n] and history [n, len] for n = ", n, " copies");
  TORCH_CHECK(margin >= 0, "fusedopt cpu: fp8_update_ margin must be >= 0, got ", margin);
  const float* skip = scalar_ptr(found_inf, "found_inf");
  if (skip && *skip != 0.0f) return;
  fusedopt::fp8_delayed_scaling_cpu(ptr<double>(amax, "amax"), ptr<float>(history, "history"),
                                    ptr<float>(scales, "scales"), ptr<float>(scale_inv, "scale_inv"), scale_inv.stride(0), n, history.size(1),
                                    float(fp8_max), int(margin));
}

// The lists of a two-moment op (LAMB's exp_avg and exp_avg_sq, Sophia's exp_avg
// and hessian: `second` names it), checked and tabled in MomentRow layout: the
// second moment in the second-moment row, its block scales in that row's.
HostTable moment_table(TensorList params, TensorList grads, TensorList firsts, TensorList seconds,
                       TensorList first_scales, TensorList second_scales, TensorList masters, TensorList steps,
                       bool has_master, int64_t chunk_size, const std::string& second) {
  require(grads, params.size(), "grads");
  require(seconds, params.size(), second.c_str());
  const at::ScalarType pdt = params[0].scalar_type();
  const at::ScalarType sdt = state_dtype_of(pdt, {seconds, firsts}, has_master, true);
  if (sdt == at::kFloat8_e4m3fn) {
    check_block_scales(first_scales, firsts, "exp_avg_scale");
    check_block_scales(second_scales, seconds, (second + "_scale").c_str());
    TORCH_CHECK(chunk_size % fusedopt::kQBlock == 0, "fusedopt cpu: chunk_size must be a multiple of ",
                fusedopt::kQBlock, " with FP8 states");
  }
  check_dtype(params, pdt, "params");
  check_dtype(grads, pdt, "grads");
  check_dtype(firsts, sdt, "exp_avg");
  check_dtype(seconds, sdt, second.c_str());
  check_masters(masters, pdt);
  check_steps(steps);
  return HostTable({params, grads, firsts, seconds, TensorList(), masters, steps, TensorList(), TensorList(),
                    first_scales, second_scales},
                   chunk_size, {fusedopt::kRowStep, fusedopt::kRowExpAvgScale, fusedopt::kRowExpAvgSqScale});
}

// LAMB's lists (no max_exp_avg_sq).
HostTable lamb_table(TensorList params, TensorList grads, TensorList exp_avgs, TensorList exp_avg_sqs,
                     TensorList exp_avg_scales, TensorList exp_avg_sq_scales, TensorList masters, TensorList steps,
                     int64_t chunk_size) {
  require(exp_avgs, params.size(), "exp_avg");
  require(steps, params.size(), "steps");
  return moment_table(params, grads, exp_avgs, exp_avg_sqs, exp_avg_scales, exp_avg_sq_scales, masters, steps,
                      !masters.empty(), chunk_size, "exp_avg_sq");
}

std::tuple<Tensor, Tensor> lamb_moments(TensorList params, TensorList grads, TensorList exp_avgs,
                                        TensorList exp_avg_sqs, TensorList exp_avg_scales,
                                        TensorList exp_avg_sq_scales, TensorList masters, TensorList steps, double beta1,
                                        double beta2, double eps, double weight_decay, bool bias_correction,
                                        bool adam_w_mode, bool grad_averaging, bool maximize,
                                        const std::optional<Tensor>& grad_mult,
                                        const std::optional<Tensor>& found_inf, int64_t chunk_size) {
  const auto options = at::TensorOptions().dtype(at::kDouble);
  Tensor p_sums = at::empty({int64_t(params.size())}, options), u_sums = at::empty({int64_t(params.size())}, options);
  if (params.empty()) return {p_sums, u_sums};
  HostTable host = lamb_table(params, grads, exp_avgs, exp_avg_sqs, exp_avg_scales, exp_avg_sq_scales, masters, steps,
                              chunk_size);
  fusedopt::LambHyper h{beta1, beta2, eps, weight_decay, bias_correction, adam_w_mode, grad_averaging, maximize,
                        scalar_ptr<double>(grad_mult, "grad_mult"), scalar_ptr(found_inf, "found_inf")};
  h.remainder = check_masters(masters, params[0].scalar_type());
  fusedopt::lamb_moments_cpu(host.tt, h, dtype_code(params[0].scalar_type()), dtype_code(exp_avgs[0].scalar_type()),
                             !masters.empty(),
                             p_sums.data_ptr<double>(), u_sums.data_ptr<double>(), at::get_num_threads());
  return {p_sums, u_sums};
}

void lamb_apply(TensorList params, TensorList grads, TensorList exp_avgs, TensorList exp_avg_sqs,
                TensorList exp_avg_scales, TensorList exp_avg_sq_scales, TensorList masters, TensorList steps,
                const Tensor& ratio, double beta1, double beta2, double eps, double weight_decay,
                bool bias_correction, bool adam_w_mode, bool grad_averaging, bool maximize,
                const std::optional<Tensor>& found_inf, std::optional<int64_t> sr_seed, int64_t chunk_size) {
  if (params.empty()) return;
  HostTable host = lamb_table(params, grads, exp_avgs, exp_avg_sqs, exp_avg_scales, exp_avg_sq_scales, masters, steps,
                              chunk_size);
  TORCH_CHECK(ratio.device().is_cpu() && ratio.scalar_type() == at::kFloat && ratio.is_contiguous() &&
                  ratio.numel() == int64_t(params.size()),
              "fusedopt cpu: ratio must be a contiguous float32 CPU tensor with one value per param");
  fusedopt::LambHyper h{beta1, beta2, eps, weight_decay, bias_correction, adam_w_mode, grad_averaging, maximize,
                        nullptr, scalar_ptr(found_inf, "found_inf")};
  h.sr = stochastic_rounding(sr_seed, params[0].scalar_type(), !masters.empty());
  h.remainder = check_masters(masters, params[0].scalar_type());
  fusedopt::lamb_apply_cpu(host.tt, h, dtype_code(params[0].scalar_type()), dtype_code(exp_avgs[0].scalar_type()),
                           !masters.empty(), ptr<float>(ratio, "ratio"), at::get_num_threads());
}

// One launch per kind: `factored` (row_vars/col_vars given; rows/cols hold each
// tensor's last two dims) or 0-d/1-d (variances given).
void adafactor(TensorList params, TensorList grads, TensorList exp_avgs, TensorList variances, TensorList row_vars,
               TensorList col_vars, TensorList exp_avg_scales, TensorList masters, TensorList steps,
               const Tensor& rows, const Tensor& cols,
               double lr, const std::optional<Tensor>& lr_tensor, double beta2_decay, double eps1, double eps2,
               double d, double weight_decay, bool maximize, std::optional<double> beta1,
               const std::optional<Tensor>& grad_mult, const std::optional<Tensor>& found_inf,
               std::optional<int64_t> sr_seed, int64_t chunk_size) {
  if (params.empty()) return;
  const at::ScalarType pdt = params[0].scalar_type();
  const bool has_master = !masters.empty(), factored = !row_vars.empty();
  TORCH_CHECK(factored ? (col_vars.size() == row_vars.size() && variances.empty()) : !variances.empty(),
              "fusedopt cpu: adafactor takes row_vars and col_vars, or variances");
  TORCH_CHECK(!beta1.has_value() || !exp_avgs.empty(), "fusedopt cpu: beta1 needs exp_avgs");
  require(grads, params.size(), "grads");
  require(steps, params.size(), "steps");
  // the second-moment statistics' storage; exp_avg has it too, or is block-scaled FP8
  const at::ScalarType sdt = state_dtype_of(pdt, {variances, row_vars}, has_master);
  const bool fp8_exp_avg = !exp_avgs.empty() && exp_avgs[0].scalar_type() == at::kFloat8_e4m3fn;
  if (fp8_exp_avg) {
    TORCH_CHECK(beta1.has_value(), "fusedopt cpu: an FP8 exp_avg needs beta1");
    check_dtype(exp_avgs, at::kFloat8_e4m3fn, "exp_avg");
    check_block_scales(exp_avg_scales, exp_avgs, "exp_avg_scale");
    TORCH_CHECK(chunk_size % fusedopt::kQBlock == 0, "fusedopt cpu: chunk_size must be a multiple of ",
                fusedopt::kQBlock, " with FP8 states");
  } else {
    check_dtype(exp_avgs, sdt, "adafactor state");
  }
  check_dtype(params, pdt, "params");
  check_dtype(grads, pdt, "grads");
  for (TensorList states : {variances, row_vars, col_vars}) check_dtype(states, sdt, "adafactor state");
  const bool remainder = check_masters(masters, pdt);
  check_steps(steps);
  HostTable host({params, grads, exp_avgs, variances, row_vars, col_vars, masters, steps,
                  fp8_exp_avg ? exp_avg_scales : TensorList()},
                 chunk_size, {fusedopt::kAfRowVar, fusedopt::kAfColVar, fusedopt::kAfStep, fusedopt::kAfExpAvgScale});
  fusedopt::AdafactorHyper h{lr, scalar_ptr(lr_tensor, "lr"), beta2_decay, eps1, eps2, d, weight_decay, maximize,
                             beta1.has_value(), beta1.value_or(0.0), scalar_ptr<double>(grad_mult, "grad_mult"),
                             scalar_ptr(found_inf, "found_inf")};
  h.sr = stochastic_rounding(sr_seed, pdt, has_master);
  h.remainder = remainder;
  if (factored) {
    const int64_t n = int64_t(params.size());
    TORCH_CHECK(rows.scalar_type() == at::kLong && cols.scalar_type() == at::kLong && rows.numel() == n &&
                    cols.numel() == n && rows.is_contiguous() && cols.is_contiguous(),
                "fusedopt cpu: rows and cols must hold one int64 per param");
    const int64_t* r = ptr<int64_t>(rows, "rows");
    const int64_t* c = ptr<int64_t>(cols, "cols");
    for (int64_t t = 0; t < n; ++t) {
      const Tensor& p = params[size_t(t)];
      TORCH_CHECK(p.dim() >= 2 && p.is_contiguous() && p.size(-2) == r[t] && p.size(-1) == c[t],
                  "fusedopt cpu: factored params must be contiguous with rows x cols as their last two dims");
      TORCH_CHECK(row_vars[size_t(t)].numel() == p.numel() / c[t] && col_vars[size_t(t)].numel() == p.numel() / r[t],
                  "fusedopt cpu: row_var / col_var of the wrong size");
    }
    fusedopt::adafactor_factored_cpu(host.tt, r, c, h, dtype_code(pdt), dtype_code(sdt), has_master, fp8_exp_avg,
                                     at::get_num_threads());
  } else {
    fusedopt::adafactor_vector_cpu(host.tt, h, dtype_code(pdt), dtype_code(sdt), has_master, fp8_exp_avg,
                                   at::get_num_threads());
  }
}

// Adafactor on the local shards of DTensor params, one phase per call (include/fusedopt/adafactor.h):
// factored (row_vars and col_vars given) 0 sums -> [row_sums, col_sums, p_sq], 1 factors(row_sums, col_sums)
// -> [rv_sums], 2 unorm(rv_sums) -> [u_sq], 3 update(rv_sums, p_sq, u_sq) -> []; 0-d / 1-d (variances given)
// 0 stats -> [p_sq, u_sq], 3 update(p_sq, u_sq) -> []. dims: int64 [n, 5] (B, local R and C, whole R and C)
// for factored tensors; numel: int64 [n], the whole tensors' sizes. Local shards may be empty.
std::tuple<Tensor, Tensor, Tensor> adafactor_sharded(int64_t phase, TensorList params, TensorList grads, TensorList exp_avgs,
                                      TensorList variances, TensorList row_vars, TensorList col_vars,
                                      TensorList masters, TensorList steps, const Tensor& dims, const Tensor& numel,
                                      TensorList inputs, double lr, const std::optional<Tensor>& lr_tensor,
                                      double beta2_decay, double eps1, double eps2, double d, double weight_decay,
                                      bool maximize, std::optional<double> beta1,
                                      const std::optional<Tensor>& grad_mult, const std::optional<Tensor>& found_inf,
                                      std::optional<int64_t> sr_seed, int64_t chunk_size) {
  TORCH_CHECK(!params.empty(), "fusedopt cpu: adafactor_sharded needs tensors");
  const int64_t n = int64_t(params.size());
  const at::ScalarType pdt = params[0].scalar_type();
  const bool has_master = !masters.empty(), factored = !row_vars.empty();
  TORCH_CHECK(factored ? (col_vars.size() == row_vars.size() && variances.empty()) : !variances.empty(),
              "fusedopt cpu: adafactor_sharded takes row_vars and col_vars, or variances");
  TORCH_CHECK(!beta1.has_value() || !exp_avgs.empty(), "fusedopt cpu: beta1 needs exp_avgs");
  require(grads, params.size(), "grads");
  require(steps, params.size(), "steps");
  const at::ScalarType sdt = state_dtype_of(pdt, {variances, row_vars}, has_master);
  check_dtype(params, pdt, "params");
  check_dtype(grads, pdt, "grads");
  for (TensorList states : {exp_avgs, variances, row_vars, col_vars}) check_dtype(states, sdt, "adafactor state");
  const bool remainder = check_masters(masters, pdt);
  check_steps(steps);
  TORCH_CHECK(numel.device().is_cpu() && numel.scalar_type() == at::kLong && numel.is_contiguous() &&
                  numel.numel() == n,
              "fusedopt cpu: numel must be a CPU tensor of one int64 per tensor");
  const int64_t* whole = ptr<int64_t>(numel, "numel");
  HostTable host({params, grads, exp_avgs, variances, row_vars, col_vars, masters, steps}, chunk_size,
                 {fusedopt::kAfRowVar, fusedopt::kAfColVar, fusedopt::kAfStep}, /*allow_empty=*/true);
  for (int64_t t = 0; t < n; ++t) TORCH_CHECK(whole[t] >= params[size_t(t)].numel(), "fusedopt cpu: bad numel");
  fusedopt::AdafactorHyper h{lr, scalar_ptr(lr_tensor, "lr"), beta2_decay, eps1, eps2, d, weight_decay, maximize,
                             beta1.has_value(), beta1.value_or(0.0), scalar_ptr<double>(grad_mult, "grad_mult"),
                             scalar_ptr(found_inf, "found_inf")};
  h.sr = stochastic_rounding(sr_seed, pdt, has_master);
  h.remainder = remainder;
  const auto doubles = [](int64_t size) { return at::empty({size}, at::TensorOptions().dtype(at::kDouble)); };
  // a fixed (Tensor, Tensor, Tensor) return (a Tensor[] one cannot be functionalized): phases fill what they make
  const auto none = [&] { return doubles(0); };
  const auto input = [&](size_t i, int64_t size, const char* what) {
    TORCH_CHECK(inputs.size() > i && inputs[i].device().is_cpu() && inputs[i].scalar_type() == at::kDouble &&
                    inputs[i].is_contiguous() && inputs[i].numel() == size,
                "fusedopt cpu: adafactor_sharded phase ", phase, " takes ", what, ": float64 [", size, "]");
    return static_cast<const double*>(ptr<double>(inputs[i], what));
  };
  const auto P = dtype_code(pdt), S = dtype_code(sdt);
  const int threads = at::get_num_threads();
  if (!factored) {
    TORCH_CHECK(phase == 0 || phase == 3, "fusedopt cpu: adafactor_sharded of 0-d / 1-d tensors has phases 0 and 3");
    if (phase == 0) {
      Tensor p_sq = doubles(n), u_sq = doubles(n);
      fusedopt::adafactor_vector_stats_cpu(host.tt, h, P, S, has_master, threads, p_sq.data_ptr<double>(),
                                           u_sq.data_ptr<double>());
      return {p_sq, u_sq, none()};
    }
    fusedopt::adafactor_vector_update_cpu(host.tt, h, P, S, has_master, false, threads, input(0, n, "p_sq"),
                                          input(1, n, "u_sq"), whole);
    return {none(), none(), none()};
  }
  TORCH_CHECK(dims.device().is_cpu() && dims.scalar_type() == at::kLong && dims.is_contiguous() &&
                  dims.numel() == 5 * n,
              "fusedopt cpu: dims must be a CPU tensor of B, R, C, whole R and whole C (int64) per tensor");
  const int64_t* dm = ptr<int64_t>(dims, "dims");
  int64_t n_rows = 0, n_cols = 0, n_slices = 0;
  for (int64_t t = 0; t < n; ++t) {
    const int64_t B = dm[5 * t], R = dm[5 * t + 1], C = dm[5 * t + 2], RF = dm[5 * t + 3], CF = dm[5 * t + 4];
    const Tensor& p = params[size_t(t)];
    int64_t batch = 1;  // the product of the leading dims (no overflow: they are a tensor's)
    for (int64_t i = 0; i + 2 < p.dim(); ++i) batch *= p.size(i);
    TORCH_CHECK(p.dim() >= 2 && B == batch && R == p.size(-2) && C == p.size(-1) && p.is_contiguous() &&
                    RF >= std::max<int64_t>(R, 1) && CF >= std::max<int64_t>(C, 1) &&
                    row_vars[size_t(t)].numel() == B * R && col_vars[size_t(t)].numel() == B * C,
                "fusedopt cpu: adafactor_sharded: tensor ", t, " does not match its dims (contiguous, B x R x C, "
                "row_var B x R, col_var B x C, whole dims at least the local ones)");
    n_rows += B * R;
    n_cols += B * C;
    n_slices += B;
  }
  switch (phase) {
    case 0: {
      Tensor rows = doubles(n_rows), cols = doubles(n_cols), p_sq = doubles(n);
      fusedopt::adafactor_sharded_sums_cpu(host.tt, dm, h, P, S, has_master, threads, rows.data_ptr<double>(),
                                           cols.data_ptr<double>(), p_sq.data_ptr<double>());
      return {rows, cols, p_sq};
    }
    case 1: {
      Tensor rv_sums = doubles(n_slices);
      fusedopt::adafactor_sharded_factors_cpu(host.tt, dm, h, P, S, has_master, threads, input(0, n_rows, "row_sums"),
                                              input(1, n_cols, "col_sums"), rv_sums.data_ptr<double>());
      return {rv_sums, none(), none()};
    }
    case 2: {
      Tensor u_sq = doubles(n);
      fusedopt::adafactor_sharded_unorm_cpu(host.tt, dm, h, P, S, has_master, threads, input(0, n_slices, "rv_sums"),
                                            u_sq.data_ptr<double>());
      return {u_sq, none(), none()};
    }
    case 3:
      fusedopt::adafactor_sharded_update_cpu(host.tt, dm, h, P, S, has_master, threads, input(0, n_slices, "rv_sums"),
                                             input(1, n, "p_sq"), input(2, n, "u_sq"), whole);
      return {none(), none(), none()};
    default:
      TORCH_CHECK(false, "fusedopt cpu: adafactor_sharded phase must be 0, 1, 2 or 3, got ", phase);
  }
}

void sophia(TensorList params, TensorList grads, TensorList exp_avgs, TensorList hessians,
            TensorList exp_avg_scales, TensorList hessian_scales, TensorList masters, TensorList steps, double lr, const std::optional<Tensor>& lr_tensor, double beta1, double rho_bs,
            double weight_decay, bool maximize, const std::optional<Tensor>& grad_mult,
            const std::optional<Tensor>& found_inf, std::optional<int64_t> sr_seed, int64_t chunk_size) {
  if (params.empty()) return;
  require(exp_avgs, params.size(), "exp_avg");
  require(steps, params.size(), "steps");
  HostTable host = moment_table(params, grads, exp_avgs, hessians, exp_avg_scales, hessian_scales, masters, steps,
                                !masters.empty(), chunk_size, "hessian");
  fusedopt::SophiaHyper h{lr, scalar_ptr(lr_tensor, "lr"), beta1, rho_bs, weight_decay, maximize,
                          scalar_ptr<double>(grad_mult, "grad_mult"), scalar_ptr(found_inf, "found_inf")};
  h.sr = stochastic_rounding(sr_seed, params[0].scalar_type(), !masters.empty());
  h.remainder = check_masters(masters, params[0].scalar_type());
  fusedopt::sophia_cpu(host.tt, h, dtype_code(params[0].scalar_type()), dtype_code(hessians[0].scalar_type()),
                       !masters.empty(), at::get_num_threads());
}

void sophia_hessian(TensorList params, TensorList grads, TensorList hessians, TensorList hessian_scales,
                    bool has_master, double beta2, int64_t chunk_size) {
  if (params.empty()) return;
  HostTable host = moment_table(params, grads, TensorList(), hessians, TensorList(), hessian_scales, TensorList(),
                                TensorList(), has_master, chunk_size, "hessian");
  fusedopt::sophia_hessian_cpu(host.tt, beta2, dtype_code(params[0].scalar_type()),
                               dtype_code(hessians[0].scalar_type()), has_master, at::get_num_threads());
}

// Held tables (fusedopt_held): a bucket's tensor lists kept here between
// steps, so that a steady-state step passes a handle and its scalars instead
// of thousands of tensors (passing a tensor list costs ~0.25 us a tensor), and
// the grads are read here from the params' .grad. Eager steps only: the ops
// behind a handle are not visible to tracing (fusedopt/backends/_held.py).
struct Held {
  std::vector<std::string> names;  // the held lists, as the ops' schemas name their arguments
  std::vector<c10::List<Tensor>> lists;
  std::vector<Tensor> params;  // whose .grad make the "grads" list, checked by held_ready
  std::vector<const void*> data;  // their data pointers and sizes when held: p.data = ... shows
  std::vector<int64_t> numel;
  std::vector<Tensor> gradless;  // params that had no grad when held: must still have none
};

std::mutex held_mutex;
std::unordered_map<int64_t, std::shared_ptr<const Held>> held_tables;
int64_t held_next = 1;

std::shared_ptr<const Held> held_get(int64_t handle) {
  std::lock_guard<std::mutex> lock(held_mutex);
  auto it = held_tables.find(handle);
  TORCH_CHECK(it != held_tables.end(), "fusedopt held: no held table ", handle, " (released)");
  return it->second;
}

// create(str[] names, Tensor[] tensors, int[] counts, Tensor[] params, Tensor[] gradless) -> int
void held_create(const c10::OperatorHandle&, torch::jit::Stack* stack) {
  auto args = torch::jit::pop(*stack, 5);
  auto held = std::make_shared<Held>();
  const auto names = args[0].toListRef();
  const c10::List<Tensor> tensors = args[1].toTensorList();
  const c10::List<int64_t> counts = args[2].toIntList();
  TORCH_CHECK(names.size() == counts.size(), "fusedopt held: ", names.size(), " names for ", counts.size(),
              " counts");
  size_t at = 0;
  for (size_t i = 0; i < names.size(); ++i) {
    const int64_t n = counts.get(i);
    TORCH_CHECK(n >= 0 && at + size_t(n) <= tensors.size(), "fusedopt held: the counts exceed the tensors");
    c10::List<Tensor> list;
    list.reserve(size_t(n));
    for (int64_t k = 0; k < n; ++k) list.push_back(tensors.get(at + size_t(k)));
    at += size_t(n);
    held->names.push_back(names[i].toStringRef());
    held->lists.push_back(std::move(list));
  }
  TORCH_CHECK(at == tensors.size(), "fusedopt held: ", tensors.size() - at, " tensors beyond the counts");
  for (const Tensor p : args[3].toTensorList()) {
    fusedopt::check_plain(p, "held", "a param");
    held->params.push_back(p);
    held->data.push_back(p.const_data_ptr());
    held->numel.push_back(p.numel());
  }
  for (const Tensor p : args[4].toTensorList()) held->gradless.push_back(p);
  int64_t handle;
  {
    std::lock_guard<std::mutex> lock(held_mutex);
    handle = held_next++;
    held_tables.emplace(handle, std::move(held));
  }
  torch::jit::push(*stack, handle);
}

// release(int handle) -> ()
void held_release(const c10::OperatorHandle&, torch::jit::Stack* stack) {
  const int64_t handle = torch::jit::pop(*stack).toInt();
  std::lock_guard<std::mutex> lock(held_mutex);
  held_tables.erase(handle);
}

// Whether the held params and their grads are as the plan behind the table
// was built for: each param with its storage and size, contiguous, its grad a
// plain contiguous tensor of its dtype, device and shape; the gradless still
// without. (Anything else: the caller takes the full path, which checks and
// says what is wrong.)
bool grads_fit(const Held& h) {
  for (size_t i = 0; i < h.params.size(); ++i) {
    const Tensor& p = h.params[i];
    if (p.const_data_ptr() != h.data[i] || p.numel() != h.numel[i] || !p.is_contiguous()) return false;
    const Tensor& g = p.grad();
    if (!g.defined() || g.key_set().has(c10::DispatchKey::Python) || g.layout() != at::kStrided ||
        g.scalar_type() != p.scalar_type() || g.device() != p.device() || g.sizes() != p.sizes() ||
        !g.is_contiguous() || (g.numel() > 0 && g.const_data_ptr() == nullptr))
      return false;
  }
  for (const Tensor& p : h.gradless) {
    if (p.grad().defined()) return false;
  }
  return true;
}

// ready(int[] handles) -> bool
void held_ready(const c10::OperatorHandle&, torch::jit::Stack* stack) {
  const c10::List<int64_t> handles = torch::jit::pop(*stack).toIntList();
  bool ready = true;
  for (const int64_t handle : handles) ready = ready && grads_fit(*held_get(handle));
  torch::jit::push(*stack, ready);
}

// A scalar argument as the op's schema types it (float, int or bool, optional or not).
c10::IValue as_argument(const c10::IValue& value, const c10::Argument& arg) {
  if (value.isNone()) return value;
  c10::TypePtr type = arg.type();
  if (auto optional = type->cast<c10::OptionalType>()) type = optional->getElementType();
  const c10::Scalar scalar = value.toScalar();
  switch (type->kind()) {
    case c10::TypeKind::FloatType: return scalar.toDouble();
    case c10::TypeKind::IntType: return scalar.toLong();
    case c10::TypeKind::BoolType: return scalar.toBool();
    default: TORCH_CHECK(false, "fusedopt held: argument ", arg.name(), " of type ", type->str(), " is not a scalar");
  }
}

// The position of `name` in `names`, or names.size().
size_t find_name(c10::ArrayRef<c10::IValue> names, const std::string& name) {
  size_t i = 0;
  while (i < names.size() && names[i].toStringRef() != name) ++i;
  return i;
}

// call(int handle, str op, str[] scalar_names, Scalar?[] scalars, str[] tensor_names, Tensor?[] tensors)
//   -> Tensor[]:
// fusedopt_cpu::<op> on the held lists, the grads of the held params, and
// each other argument by name; its returned tensors, flattened.
void held_call(const c10::OperatorHandle&, torch::jit::Stack* stack) {
  auto args = torch::jit::pop(*stack, 6);
  const std::shared_ptr<const Held> held = held_get(args[0].toInt());
  const std::string op = "fusedopt_cpu::" + args[1].toStringRef();
  const auto scalar_names = args[2].toListRef();
  const auto scalars = args[3].toListRef();
  const auto tensor_names = args[4].toListRef();
  const auto tensors = args[5].toListRef();
  TORCH_CHECK(scalars.size() == scalar_names.size() && tensors.size() == tensor_names.size(),
              "fusedopt held: one name per scalar and per tensor");
  const c10::OperatorHandle target = c10::Dispatcher::singleton().findSchemaOrThrow(op.c_str(), "");
  torch::jit::Stack call;
  std::vector<bool> scalar_used(scalars.size(), false), tensor_used(tensors.size(), false);
  for (const c10::Argument& arg : target.schema().arguments()) {
    const std::string& name = arg.name();
    const auto list = std::find(held->names.begin(), held->names.end(), name);
    if (list != held->names.end()) {
      call.emplace_back(held->lists[size_t(list - held->names.begin())]);
      continue;
    }
    if (name == "grads") {
      c10::List<Tensor> grads;
      grads.reserve(held->params.size());
      for (const Tensor& p : held->params) {
        TORCH_CHECK(p.grad().defined(), "fusedopt held: a held param has no grad (held_ready first)");
        grads.push_back(p.grad());
      }
      call.emplace_back(std::move(grads));
      continue;
    }
    const size_t t = find_name(tensor_names, name);
    if (t < tensors.size()) {
      tensor_used[t] = true;
      call.push_back(tensors[t]);
      continue;
    }
    const size_t i = find_name(scalar_names, name);
    TORCH_CHECK(i < scalars.size(), "fusedopt held: ", op, " needs the argument ", name);
    scalar_used[i] = true;
    call.push_back(as_argument(scalars[i], arg));
  }
  for (size_t i = 0; i < scalars.size(); ++i) {
    TORCH_CHECK(scalar_used[i], "fusedopt held: ", op, " takes no argument ", scalar_names[i].toStringRef());
  }
  for (size_t t = 0; t < tensors.size(); ++t) {
    TORCH_CHECK(tensor_used[t], "fusedopt held: ", op, " takes no argument ", tensor_names[t].toStringRef());
  }
  target.callBoxed(&call);
  c10::List<Tensor> out;
  for (const c10::IValue& v : call) {
    if (v.isTensor()) {
      out.push_back(v.toTensor());
    } else if (v.isTuple()) {
      for (const c10::IValue& e : v.toTupleRef().elements()) out.push_back(e.toTensor());
    }
  }
  torch::jit::push(*stack, std::move(out));
}

}  // namespace

TORCH_LIBRARY(fusedopt_held, m) {
  m.def("create(str[] names, Tensor[] tensors, int[] counts, Tensor[] params, Tensor[] gradless) -> int",
        torch::CppFunction::makeFromBoxedFunction<&held_create>());
  m.def("release(int handle) -> ()", torch::CppFunction::makeFromBoxedFunction<&held_release>());
  m.def("ready(int[] handles) -> bool", torch::CppFunction::makeFromBoxedFunction<&held_ready>());
  m.def("call(int handle, str op, str[] scalar_names, Scalar?[] scalars, str[] tensor_names, Tensor?[] tensors) "
        "-> Tensor[]",
        torch::CppFunction::makeFromBoxedFunction<&held_call>());
}

TORCH_LIBRARY(fusedopt_cpu, m) {
  m.def(
      "sophia(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor[] hessians, "
      "Tensor(e!)[] exp_avg_scales, Tensor[] hessian_scales, Tensor(c!)[] masters, "
      "Tensor(d!)[] steps, float lr, Tensor? lr_tensor, float beta1, float rho_bs, float weight_decay, "
      "bool maximize, Tensor? grad_mult, Tensor? found_inf, int? sr_seed, int chunk_size) -> ()");
  m.def(
      "sophia_hessian(Tensor[] params, Tensor[] grads, Tensor(a!)[] hessians, Tensor(b!)[] hessian_scales, "
      "bool has_master, float beta2, "
      "int chunk_size) -> ()");
  m.def(
      "adafactor(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] variances, "
      "Tensor(d!)[] row_vars, Tensor(e!)[] col_vars, Tensor(h!)[] exp_avg_scales, Tensor(f!)[] masters, "
      "Tensor(g!)[] steps, Tensor rows, "
      "Tensor cols, float lr, Tensor? lr_tensor, float beta2_decay, float eps1, float eps2, float d, "
      "float weight_decay, bool maximize, float? beta1, Tensor? grad_mult, Tensor? found_inf, int? sr_seed, "
      "int chunk_size) -> ()");
  m.def(
      "lamb_moments(Tensor[] params, Tensor[] grads, Tensor(a!)[] exp_avgs, Tensor(b!)[] exp_avg_sqs, "
      "Tensor(d!)[] exp_avg_scales, Tensor(e!)[] exp_avg_sq_scales, Tensor[] masters, Tensor(c!)[] steps, float beta1, float beta2, float eps, float weight_decay, "
      "bool bias_correction, bool adam_w_mode, bool grad_averaging, bool maximize, Tensor? grad_mult, "
      "Tensor? found_inf, int chunk_size) -> (Tensor, Tensor)");
  m.def(
      "lamb_apply(Tensor(a!)[] params, Tensor[] grads, Tensor[] exp_avgs, Tensor[] exp_avg_sqs, "
      "Tensor[] exp_avg_scales, Tensor[] exp_avg_sq_scales, Tensor(b!)[] masters, Tensor[] steps, Tensor ratio, float beta1, float beta2, float eps, "
      "float weight_decay, bool bias_correction, bool adam_w_mode, bool grad_averaging, bool maximize, "
      "Tensor? found_inf, int? sr_seed, int chunk_size) -> ()");
  m.def(
      "adafactor_sharded(int phase, Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] variances, Tensor(d!)[] row_vars, Tensor(e!)[] col_vars, Tensor(f!)[] masters, "
      "Tensor(g!)[] steps, Tensor dims, Tensor numel, Tensor[] inputs, float lr, Tensor? lr_tensor, "
      "float beta2_decay, float eps1, float eps2, float d, float weight_decay, bool maximize, float? beta1, "
      "Tensor? grad_mult, Tensor? found_inf, int? sr_seed, int chunk_size) -> (Tensor, Tensor, Tensor)");
  m.def("power_sums(Tensor[] tensors, float p, int chunk_size) -> Tensor");
  m.def("clip_scalars(Tensor root, Tensor? grad_scale, float max_norm, bool fp64) -> (Tensor, Tensor)");
  m.def("cast_fp8(Tensor[] inputs, Tensor(a!)[] outputs, Tensor scales, int chunk_size) -> Tensor");
  m.def("fp8_update_(Tensor amax, Tensor(a!) history, Tensor(b!) scales, Tensor(c!) scale_inv, Tensor? found_inf, "
        "float fp8_max, int margin) -> ()");
  m.def("scale_(Tensor(a!)[] tensors, Tensor factor, int chunk_size) -> ()");
  m.def(
      "adamw(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] max_exp_avg_sqs, Tensor(i!)[] exp_avg_scales, Tensor(j!)[] exp_avg_sq_scales, "
      "Tensor(k!)[] max_exp_avg_sq_scales, Tensor(e!)[] masters, Tensor(f!)[] steps, Tensor(g!)[] fp8_weights, "
      "Tensor[] fp8_scales, Tensor(h!)? fp8_amax, float lr, Tensor? lr_tensor, "
      "float beta1, float beta2, float eps, float weight_decay, bool amsgrad, bool maximize, "
      "Tensor? grad_mult, Tensor? found_inf, int? sr_seed, int chunk_size) -> ()");
}

// The kernels behind the schemas, for CPU tensors only: Meta/Fake tensors (torch.compile, opcheck) take
// the fake implementations registered in fusedopt/backends/cpu_ops.py instead of reading data pointers.
TORCH_LIBRARY_IMPL(fusedopt_cpu, CPU, m) {
  m.impl("sophia", &sophia);
  m.impl("sophia_hessian", &sophia_hessian);
  m.impl("adafactor", &adafactor);
  m.impl("lamb_moments", &lamb_moments);
  m.impl("lamb_apply", &lamb_apply);
  m.impl("adafactor_sharded", &adafactor_sharded);
  m.impl("power_sums", &power_sums);
  m.impl("clip_scalars", &clip_scalars);
  m.impl("cast_fp8", &cast_fp8);
  m.impl("fp8_update_", &fp8_update_);
  m.impl("scale_", &scale_);
  m.impl("adamw", &adamw);
}
