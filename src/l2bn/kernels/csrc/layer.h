// The single-call layer: l2bn::layer, what an L2BN module's forward calls on the CPU.
//
// One operator call does what the Python layer does around the kernel: it checks its arguments,
// takes the running-statistics update factor from num_batches_tracked (the factor of
// src/l2bn/running.py:running_factor), runs the training or evaluation kernel of kernels.h,
// updates the running statistics and the step count in place (declared mutations in the
// schema), and returns y; when a gradient is needed, y comes from a C++ autograd Function whose
// backward is the kernel's backward. A training step therefore pays no Python per layer beyond
// the module's forward and this call.
//
// The operator *declines* (returns an undefined tensor, None in Python) whenever the Python
// layer has something to add, before it changes any state: any input it does not handle (not a
// dense CPU tensor, a dtype other than float16/bfloat16/float32/float64, an empty batch), any
// input the Python layer rejects with its own error (wrong dims or channels, eps, one value per
// channel), the first tracked step (the layer's eps check, src/l2bn/running.py), a batch whose
// sample norms are outside the range where the fast statistics are exact (the Python path
// rescales it exactly, kernels/scaling.py), an L2BN_BACKEND other than native, and
// L2BN_SINGLE_CALL=0. The module then runs its Python path, which gives the same result or the
// same error.
//
// A backward with create_graph=True differentiates the reference composite (F.normalize then
// batch_norm, here in ATen ops, as kernels/reference.py), so higher derivatives are exact.

#pragma once

#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/variable.h>

#include <cfloat>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <numeric>

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// What one forward computed, for backward.
struct LayerState {
  Tensor y, r, k, mk, vk, mu, var, invstd;
  double eps = 0, l2_eps = 0, s = 1;
  bool batch_stats = true, unit_rms = false;
};

// kernels/scaling.py:needs_rescale — whether a sample norm is outside the range in which the
// statistics pass is exact in the accumulation dtype (NaN counts as outside).
bool norms_out_of_range(const Tensor& r, int64_t d, double l2_eps) {
  const bool dbl = r.scalar_type() == at::kDouble;
  const double tiny = dbl ? DBL_MIN : FLT_MIN, ulp = dbl ? DBL_EPSILON : FLT_EPSILON;
  const double lo = std::sqrt(double(std::max<int64_t>(d, 1)) * tiny / ulp);
  const double hi = std::sqrt(dbl ? DBL_MAX : double(FLT_MAX)) / 4;
  const bool check_lo = l2_eps < lo;
  bool out = false;
  AT_DISPATCH_FLOATING_TYPES(r.scalar_type(), "l2bn_norm_range", [&] {
    const scalar_t* p = r.const_data_ptr<scalar_t>();
    for (int64_t i = 0; i < r.numel() && !out; ++i) {
      const double v = double(p[i]);
      out = check_lo ? !(v <= hi && v >= lo) : !(v <= hi);
    }
  });
  return out;
}

// BN's update, in place: run = (1 - f) run + alpha val.
void ema_update(const Tensor& run, const Tensor& val, double f, double alpha) {
  if (run.is_contiguous() && run.scalar_type() == val.scalar_type()) {
    torch::autograd::impl::bump_version(run);  // first: it throws for a tensor it may not change
    AT_DISPATCH_FLOATING_TYPES(run.scalar_type(), "l2bn_running_update", [&] {
      scalar_t* p = run.data_ptr<scalar_t>();
      const scalar_t* v = val.const_data_ptr<scalar_t>();
      const scalar_t keep = scalar_t(1 - f), a = scalar_t(alpha);
      for (int64_t j = 0; j < run.numel(); ++j) p[j] = p[j] * keep + a * v[j];
    });
    return;
  }
  at::NoGradGuard no_grad;
  run.mul_(1 - f).add_(val, alpha);
}

// The reference composite (kernels/reference.py:l2_batch_norm_reference), for exact higher
// derivatives; mean and var are the running statistics in evaluation, undefined with batch ones.
Tensor reference_forward(const Tensor& x, const Tensor& w, const Tensor& mean, const Tensor& var,
                         const LayerState& st) {
  const Tensor xa = x.to(is_reduced(x) ? at::kFloat : x.scalar_type());
  std::vector<int64_t> dims(x.dim() - 1);
  std::iota(dims.begin(), dims.end(), 1);
  const Tensor norm = at::linalg_vector_norm(xa, 2, dims, /*keepdim=*/true);
  Tensor u = xa / at::where(norm > st.l2_eps, norm, st.l2_eps);
  if (st.unit_rms) u = u * st.s;
  const Tensor wa = w.defined() ? w.to(xa.scalar_type()) : Tensor();
  return at::batch_norm(u, wa, {}, mean, var, st.batch_stats, 0.0, st.eps, false).to(x.scalar_type());
}

}  // namespace

namespace l2bn {

// Named for what autograd shows: y.grad_fn.name() is "torch::autograd::CppNode<l2bn::L2BatchNormFunction>".
struct L2BatchNormFunction : public torch::autograd::Function<L2BatchNormFunction> {
  // weight and bias are optional: an absent one is no input of the node (an undefined tensor
  // would be), so the edge of the bias is 1 or 2
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const std::optional<Tensor>& weight,
                        const std::optional<Tensor>& bias, const LayerState* st) {
    ctx->save_for_backward({x, weight.value_or(Tensor()), st->k, st->r, st->mk, st->vk, st->mu, st->invstd,
                            st->batch_stats ? Tensor() : st->var});
    ctx->saved_data["eps"] = st->eps;
    ctx->saved_data["l2_eps"] = st->l2_eps;
    ctx->saved_data["s"] = st->s;
    ctx->saved_data["flags"] = int64_t(st->batch_stats) | (int64_t(st->unit_rms) << 1);
    ctx->saved_data["bias_dtype"] = bias.has_value() ? int64_t(bias->scalar_type()) : int64_t(-1);
    return st->y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &weight = saved[1];
    LayerState st;
    st.eps = ctx->saved_data["eps"].toDouble();
    st.l2_eps = ctx->saved_data["l2_eps"].toDouble();
    st.s = ctx->saved_data["s"].toDouble();
    const int64_t flags = ctx->saved_data["flags"].toInt(), bias_dtype = ctx->saved_data["bias_dtype"].toInt();
    st.batch_stats = flags & 1;
    st.unit_rms = flags & 2;
    const bool need_dx = ctx->needs_input_grad(0), need_w = weight.defined() && ctx->needs_input_grad(1);
    const bool need_b = bias_dtype >= 0 && ctx->needs_input_grad(weight.defined() ? 2 : 1);
    const Tensor& gy = grads[0];
    const auto acc = is_reduced(x) ? at::kFloat : x.scalar_type();
    Tensor dx, dw, db;
    if (at::GradMode::is_enabled()) {  // create_graph=True: differentiate the reference composite
      std::vector<Tensor> targets;
      if (need_dx) targets.push_back(x);
      if (need_w) targets.push_back(weight);
      if (!targets.empty()) {
        const Tensor y = reference_forward(x, weight, st.batch_stats ? Tensor() : saved[6],
                                           st.batch_stats ? Tensor() : saved[8], st);
        variable_list g = torch::autograd::grad({y}, targets, {gy}, std::nullopt, /*create_graph=*/true);
        if (need_dx) dx = g[0];
        if (need_w) dw = g[need_dx ? 1 : 0].to(weight.scalar_type());
      }
      if (need_b) {
        std::vector<int64_t> dims{0};
        for (int64_t d = 2; d < x.dim(); ++d) dims.push_back(d);
        db = gy.sum(dims, false, acc).to(c10::ScalarType(bias_dtype));
      }
      return {dx, dw, db, Tensor()};
    }
    if (!need_dx && !need_w && !need_b) return {dx, dw, db, Tensor()};
    const Tensor &mk = saved[4], &vk = saved[5];
    const bool rows = mk.defined() && mk.numel() > 0;
    BackOut out = ::backward(gy, x, weight.defined() ? std::optional<Tensor>(weight) : std::nullopt, saved[2],
                             saved[3], rows ? std::optional<Tensor>(mk) : std::nullopt,
                           rows ? std::optional<Tensor>(vk) : std::nullopt, saved[6], saved[7], st.l2_eps, st.s,
                           st.batch_stats, need_dx);
    if (need_dx) dx = std::get<0>(out);
    if (need_w) dw = std::get<1>(out).to(weight.scalar_type());
    if (need_b) db = std::get<2>(out).to(c10::ScalarType(bias_dtype));
    return {dx, dw, db, Tensor()};
  }
};

}  // namespace l2bn

namespace {

// A tensor whose memory holds its values, read through data_ptr: not a lazily negated or zero
// view, not a Python subclass or a functional wrapper (the dispatcher resolves those, data_ptr
// would not), and writable here if it is an inference tensor only inside inference mode.
bool plain(const Tensor& t) {
  const auto keys = t.key_set();
  return !t.is_neg() && !t.is_conj() && !t._is_zerotensor() && !keys.has(c10::DispatchKey::Python) &&
         !keys.has(c10::DispatchKey::Functionalize) && (!t.is_inference() || c10::InferenceMode::is_enabled());
}

bool usable_vector(const std::optional<Tensor>& t, int64_t c) {
  return !t.has_value() || !t->defined() ||
         (t->device().is_cpu() && t->layout() == at::kStrided && t->numel() == c && t->is_floating_point() &&
          plain(*t));
}

// L2BN_BACKEND names a backend other than native (the Python layer selects it), or
// L2BN_SINGLE_CALL=0 asks for the Python layer (to compare, or to debug in Python).
bool other_backend_requested() {
  const char* b = std::getenv("L2BN_BACKEND");
  const char* single = std::getenv("L2BN_SINGLE_CALL");
  return (b != nullptr && *b != '\0' && std::strcmp(b, "auto") != 0 && std::strcmp(b, "native") != 0) ||
         (single != nullptr && std::strcmp(single, "0") == 0);
}

Tensor layer(const Tensor& x, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
             const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_var,
             const std::optional<Tensor>& num_batches_tracked, bool training, bool track_running_stats,
             std::optional<double> momentum, bool warmup, double eps, double l2_eps, bool unit_rms,
             at::IntArrayRef dims, int64_t num_features) {
  const Tensor decline;
  // ---- what the Python layer handles (see the top of this file); nothing is changed yet
  if (!x.defined() || !x.device().is_cpu() || x.layout() != at::kStrided || other_backend_requested()) return decline;
  if (x.is_neg() || x.is_conj() || x._is_zerotensor() || x.key_set().has(c10::DispatchKey::Python) ||
      x.key_set().has(c10::DispatchKey::Functionalize))
    return decline;
  const auto dtype = x.scalar_type();
  if (!(dtype == at::kFloat || dtype == at::kDouble || is_reduced(x))) return decline;
  // dims: the input ranks the module takes (empty: any from 2 on); num_features < 0: any C
  if (x.dim() < 2 || (!dims.empty() && std::find(dims.begin(), dims.end(), x.dim()) == dims.end())) return decline;
  if (num_features >= 0 && x.size(1) != num_features) return decline;
  const int64_t N = x.size(0), C = x.size(1);
  if (x.numel() == 0) return decline;
  const int64_t M = x.numel() / (N * C);
  for (const auto* t : {&weight, &bias, &running_mean, &running_var})
    if (!usable_vector(*t, C)) return decline;
  const Tensor rm = running_mean.value_or(Tensor()), rv = running_var.value_or(Tensor());
  if (rm.defined() != rv.defined()) return decline;
  const bool batch_stats = training || !rm.defined();
  if (!(eps >= 0) || !(l2_eps > 0) || (batch_stats && !(eps > 0)) || (batch_stats && N * M == 1)) return decline;
  const Tensor nbt = num_batches_tracked.value_or(Tensor());
  const bool count_step = training && track_running_stats && nbt.defined();
  double factor = momentum.value_or(0.0);
  if (count_step) {
    if (!nbt.device().is_cpu() || nbt.scalar_type() != at::kLong || nbt.numel() != 1 || !plain(nbt)) return decline;
    const int64_t step = nbt.const_data_ptr<int64_t>()[0] + 1;
    // the correction of running_factor while the layer's warm-up flag is set (the module clears
    // it once the factor is momentum exactly; a momentum changed after that is used as it is)
    const bool corrected = !momentum.has_value() || (warmup && *momentum > 0.0 && *momentum < 1.0);
    if (corrected && step <= 1) return decline;  // the first step: the layer's eps check runs in Python
    if (!momentum.has_value()) factor = 1.0 / double(step);
    else if (corrected) factor = *momentum / -std::expm1(double(step) * std::log1p(-*momentum));
  }
  // ---- the kernel
  const auto w0 = weight.has_value() && weight->defined() ? weight : std::nullopt;
  const auto b0 = bias.has_value() && bias->defined() ? bias : std::nullopt;
  const bool grad = at::GradMode::is_enabled() && (x.requires_grad() || (w0 && w0->requires_grad()) ||
                                                   (b0 && b0->requires_grad()));
  if (grad && x.is_inference()) return decline;  // autograd cannot save it: the Python layer says so
  std::optional<at::NoGradGuard> no_grad;  // the kernel's conversions need no graph
  no_grad.emplace();
  const Tensor xw = widen(x);
  const Tensor w = vec_param(weight, C, xw), b = vec_param(bias, C, xw);
  LayerState st;
  st.eps = eps;
  st.l2_eps = l2_eps;
  st.s = unit_rms ? std::sqrt(double(C * M)) : 1.0;
  st.batch_stats = batch_stats;
  st.unit_rms = unit_rms;
  if (batch_stats) {
    std::tie(st.y, st.r, st.k, st.mk, st.vk, st.mu, st.var, st.invstd) =
        AT_DISPATCH_FLOATING_TYPES(xw.scalar_type(), "l2bn_layer_train", [&] {
          return train_forward_impl<scalar_t>(xw, w, b, eps, l2_eps, st.s);
        });
  } else {
    std::tie(st.y, st.r, st.k, st.mu, st.var, st.invstd) =
        AT_DISPATCH_FLOATING_TYPES(xw.scalar_type(), "l2bn_layer_eval", [&] {
          return eval_forward_impl<scalar_t>(xw, w, b, rm, rv, eps, l2_eps, st.s, /*copy_stats=*/grad);
        });
  }
  if (norms_out_of_range(st.r, C * M, l2_eps)) return decline;
  // the row statistics of u cost 2 / M of x's size to keep: below M = 40 (more than 5 %) the
  // backward recomputes them instead (from each row it reads anyway), so the saved bytes stay
  // within 5 % of BN's
  if (M < 40) st.mk = st.vk = Tensor();
  if (is_reduced(x)) st.y = st.y.to(dtype);
  no_grad.reset();
  // the output (its autograd node) before the state, so that nothing is changed if it throws
  const Tensor y = grad ? l2bn::L2BatchNormFunction::apply(x, w0, b0, &st) : st.y;
  // ---- state: running statistics and the step count
  if (training && track_running_stats && rm.defined()) {
    const double count = double(N * M);
    ema_update(rm, st.mu, factor, factor);
    ema_update(rv, st.var, factor, factor * count / std::max(count - 1, 1.0));
  }
  if (count_step) {
    torch::autograd::impl::bump_version(nbt);
    nbt.data_ptr<int64_t>()[0] += 1;
  }
  return y;
}

}  // namespace
