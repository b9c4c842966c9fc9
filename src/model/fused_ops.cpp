// Fused DDiT-block ops; see fused_ops.h. The plain compositions repeat, op for op, what ddit.cpp
// computes without them (tests hold them to it); the CUDA path wraps the kernels of
// fused_ops_kernels.cu in autograd Functions, and a per-device self-check decides whether the
// dispatchers use them.
#include "model/fused_ops.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/autocast_mode.h>
#include <c10/core/InferenceMode.h>

#include <array>
#include <atomic>
#include <cstdio>
#include <functional>
#include <map>
#include <mutex>
#include <set>

#include "io/error.h"

#ifdef SEDD_HAVE_CUDA_KERNELS
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "model/fused_ops_kernels.h"
#endif

namespace sedd {

namespace F = torch::nn::functional;
using torch::Tensor;

namespace {

constexpr double kLayerNormEps = 1e-5;  // torch's LayerNorm default, as BiasFreeLayerNorm uses

// A kernel that did not launch (the launcher refused the shape, or CUDA refused the launch, e.g.
// too few registers for the block size on this GPU). The dispatchers and the backward passes catch
// it and take the plain path; the *_fused entries let it through.
struct FusedLaunchFailure : Error {
  using Error::Error;
};

// Launches to fail on purpose (tests of the fallback); see fused_ops_inject_launch_failures.
std::atomic<int> g_injected_launch_failures{0};

// Prints `what` once per distinct message: the first time an op falls back for a reason.
void report_launch_fallback(const std::string& what);

// Reduced-precision tensors go up to float32; float32/float64 stay (as in ddit.cpp).
Tensor upcast_reduced(const Tensor& x) {
  return (x.scalar_type() == torch::kBFloat16 || x.scalar_type() == torch::kHalf) ? x.to(torch::kFloat) : x;
}

// The output dtype the caller asked for, else the CUDA autocast dtype under autocast.
std::optional<torch::ScalarType> requested_dtype(const Tensor& x, std::optional<torch::ScalarType> out_dtype) {
  if (out_dtype) return out_dtype;
  if (x.is_cuda() && at::autocast::is_autocast_enabled(at::kCUDA)) return at::autocast::get_autocast_dtype(at::kCUDA);
  return std::nullopt;
}

bool kernel_dtype(torch::ScalarType t) { return t == torch::kFloat || t == torch::kBFloat16; }

std::string shape_str(const Tensor& t) { return t.defined() ? c10::str(t.sizes()) : "undefined"; }

// Why the kernels cannot take these tensors, or "" when they can. Shared by the dispatchers
// (which then take the plain path) and the *_fused entries (which then fail with the reason).
std::string common_unfusable(const std::vector<Tensor>& tensors) {
  if (!fused_ops_built()) return "this build has no CUDA kernels (nvcc was not found at configure time)";
  const Tensor& x = tensors.front();
  if (!x.is_cuda()) return "the tensors are on " + x.device().str() + ", not on a CUDA device";
  for (const auto& t : tensors) {
    if (!t.defined()) continue;
    if (t.device() != x.device()) return "tensors on " + x.device().str() + " and " + t.device().str();
    if (!kernel_dtype(t.scalar_type()))
      return std::string("dtype ") + c10::toString(t.scalar_type()) + " (the kernels take float32 and bf16)";
  }
  if (x.numel() == 0) return "an empty tensor";
  return "";
}

std::string row_unfusable(int64_t D) {
#ifdef SEDD_HAVE_CUDA_KERNELS
  const int64_t widest = cuda::fused_max_row_elems(D % 4 == 0);
  if (D > widest) return fmt::format("rows of {} elements (the kernels take up to {})", D, widest);
#endif
  (void)D;
  return "";
}

std::string ln_unfusable(const Tensor& x, const Tensor& weight, const Tensor& shift, const Tensor& scale,
                         torch::ScalarType out) {
  if (x.dim() != 3) return "x must be [B, L, D], got " + shape_str(x);
  const int64_t B = x.size(0), D = x.size(2);
  if (weight.dim() != 1 || weight.size(0) != D) return "weight must be [" + std::to_string(D) + "], got " + shape_str(weight);
  for (const Tensor* t : {&shift, &scale})
    if (t->dim() != 3 || t->size(0) != B || t->size(1) != 1 || t->size(2) != D)
      return fmt::format("shift and scale must be [{}, 1, {}], got {}", B, D, shape_str(*t));
  if (!kernel_dtype(out)) return std::string("output dtype ") + c10::toString(out);
  if (auto why = common_unfusable({x, weight, shift, scale}); !why.empty()) return why;
  return row_unfusable(D);
}

std::string gated_unfusable(const Tensor& x, const Tensor& branch, const Tensor& bias, const Tensor& gate, bool dropout,
                            const DropoutKey* key) {
  if (x.dim() != 3 || branch.sizes() != x.sizes())
    return "x and branch must both be [B, L, D], got " + shape_str(x) + " and " + shape_str(branch);
  const int64_t B = x.size(0), D = x.size(2);
  if (bias.defined() && (bias.dim() != 1 || bias.size(0) != D))
    return "bias must be [" + std::to_string(D) + "], got " + shape_str(bias);
  if (gate.dim() != 3 || gate.size(0) != B || gate.size(1) != 1 || gate.size(2) != D)
    return fmt::format("gate must be [{}, 1, {}], got {}", B, D, shape_str(gate));
  if (dropout && !key) return "dropout without a key (torch's unkeyed dropout has no kernel here)";
  if (dropout && (!key->rows.defined() || key->rows.dim() != 1 || key->rows.size(0) != B ||
                  key->rows.scalar_type() != torch::kLong))
    return fmt::format("the dropout key needs int64 rows [{}], got {}", B, shape_str(key->rows));
  if (auto why = common_unfusable({x, branch, bias, gate}); !why.empty()) return why;
  return row_unfusable(D);
}

std::string rotary_unfusable(const Tensor& x, const Tensor& inv_freq) {
  if (x.dim() != 4 || x.size(3) % 2 != 0) return "x must be [B, L, H, Dh] with Dh even, got " + shape_str(x);
  if (inv_freq.dim() != 1 || inv_freq.size(0) != x.size(3) / 2)
    return "inv_freq must be [" + std::to_string(x.size(3) / 2) + "], got " + shape_str(inv_freq);
  return common_unfusable({x, inv_freq});
}

#ifdef SEDD_HAVE_CUDA_KERNELS

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

cuda::DType kernel_type(const Tensor& t) {
  return t.scalar_type() == torch::kBFloat16 ? cuda::DType::kBFloat16 : cuda::DType::kFloat32;
}

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// Contiguous, with a 16-byte aligned start (a view into the middle of a storage may not be),
// so the kernels can take their vectorised path.
Tensor aligned_contiguous(const Tensor& t) {
  Tensor c = t.contiguous();
  if (reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 != 0) c = c.clone();
  return c;
}

void check_launch(bool taken, const char* op) {
  const char* err = cuda::fused_launch_error();  // read (and clear) whatever happened
  if (!taken) throw FusedLaunchFailure(fmt::format("{}: the CUDA kernel does not take this shape", op));
  if (err) throw FusedLaunchFailure(fmt::format("{}: CUDA kernel launch failed: {}", op, err));
  if (g_injected_launch_failures.load() > 0 && g_injected_launch_failures.fetch_sub(1) > 0)
    throw FusedLaunchFailure(fmt::format("{}: CUDA kernel launch failed: injected by a test", op));
}

cuda::KeyedDropout dropout_args(bool active, double p, int64_t seed, int64_t step, int64_t site, const Tensor& rows) {
  cuda::KeyedDropout d;
  if (!active) return d;
  d.stream = RandomStream{static_cast<uint64_t>(seed), purpose::kDropoutBase + static_cast<uint64_t>(site),
                          static_cast<uint64_t>(step)}
                 .philox();
  d.rows = rows.data_ptr<int64_t>();
  d.p = static_cast<float>(p);                      // keyed_dropout compares u >= float(p)
  d.scale = static_cast<float>(1.0 / (1.0 - p));    // and multiplies by the float of 1 / (1 - p)
  d.active = true;
  return d;
}

// The plain op's gradients of sum(op(inputs) * grad) by name ("grad x", ...), for a backward whose
// kernel did not launch. Backward runs with grad mode off: it is switched on for the recomputation.
std::map<std::string, Tensor> plain_grads(const TensorOp& op, const std::vector<Tensor>& inputs,
                                          const std::vector<std::string>& names, const Tensor& grad) {
  torch::AutoGradMode grad_on(true);
  auto r = value_and_grads(op, inputs, names, grad);
  return std::map<std::string, Tensor>(r.begin() + 1, r.end());
}

class LayerNormModulateFn : public torch::autograd::Function<LayerNormModulateFn> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight, const Tensor& shift,
                        const Tensor& scale, int64_t out_dtype) {
    const c10::cuda::CUDAGuard guard(x.device());
    const int64_t B = x.size(0), L = x.size(1), D = x.size(2);
    Tensor xc = aligned_contiguous(x), w = aligned_contiguous(weight.to(torch::kFloat));
    Tensor sh = aligned_contiguous(shift.to(torch::kFloat)), sc = aligned_contiguous(scale.to(torch::kFloat));
    Tensor y = torch::empty({B, L, D}, x.options().dtype(static_cast<torch::ScalarType>(out_dtype)));
    Tensor mean = torch::empty({B * L}, x.options().dtype(torch::kFloat)), rstd = torch::empty_like(mean);
    check_launch(cuda::layer_norm_modulate_forward(xc.data_ptr(), kernel_type(xc), w.data_ptr<float>(),
                                                   sh.data_ptr<float>(), sc.data_ptr<float>(), B, L, D,
                                                   static_cast<float>(kLayerNormEps), y.data_ptr(), kernel_type(y),
                                                   mean.data_ptr<float>(), rstd.data_ptr<float>(), current_stream()),
                 "layer_norm_modulate");
    ctx->save_for_backward({xc, w, sc, mean, rstd});
    ctx->saved_data["out_dtype"] = out_dtype;
    ctx->saved_data["weight_dtype"] = static_cast<int64_t>(weight.scalar_type());
    ctx->saved_data["shift_dtype"] = static_cast<int64_t>(shift.scalar_type());
    ctx->saved_data["scale_dtype"] = static_cast<int64_t>(scale.scalar_type());
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_out) {
    auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &w = saved[1], &sc = saved[2], &mean = saved[3], &rstd = saved[4];
    if (!grad_out[0].defined()) return {Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
    const c10::cuda::CUDAGuard guard(x.device());
    auto dtype = [&](const char* k) { return static_cast<torch::ScalarType>(ctx->saved_data[k].toInt()); };
    const int64_t B = x.size(0), L = x.size(1), D = x.size(2);
    Tensor g = aligned_contiguous(grad_out[0].to(dtype("out_dtype")));
    Tensor gx = torch::empty_like(x);
    const int64_t splits = cuda::fused_column_splits(B, L);
    Tensor part_g = torch::empty({splits, B, D}, x.options().dtype(torch::kFloat)), part_gx = torch::empty_like(part_g);
    try {
      check_launch(cuda::layer_norm_modulate_backward(g.data_ptr(), kernel_type(g), x.data_ptr(), kernel_type(x),
                                                      w.data_ptr<float>(), sc.data_ptr<float>(), mean.data_ptr<float>(),
                                                      rstd.data_ptr<float>(), B, L, D, splits, gx.data_ptr(),
                                                      part_g.data_ptr<float>(), part_gx.data_ptr<float>(),
                                                      current_stream()),
                   "layer_norm_modulate backward");
    } catch (const FusedLaunchFailure& e) {
      report_launch_fallback(e.what());
      // The plain path's gradients; shift's value does not enter them.
      const auto out = dtype("out_dtype");
      auto r = plain_grads(
          [out](const std::vector<Tensor>& a) { return layer_norm_modulate_plain(a[0], a[1], a[2], a[3], out); },
          {x, w, torch::zeros_like(sc), sc}, {"x", "weight", "shift", "scale"}, g);
      return {r.at("grad x"), r.at("grad weight").to(dtype("weight_dtype")),
              r.at("grad shift").to(dtype("shift_dtype")), r.at("grad scale").to(dtype("scale_dtype")), Tensor()};
    }
    // Second pass of the reductions over L (and over B for the weight), on [splits, B, D].
    Tensor g_shift = part_g.sum(0);
    Tensor g_xhat = part_gx.sum(0);  // sum_l g * xhat, [B, D]
    Tensor g_scale = g_xhat * w;
    Tensor g_weight = (g_xhat * (1 + sc.view({B, D}))).sum(0);
    return {gx, g_weight.to(dtype("weight_dtype")), g_shift.view({B, 1, D}).to(dtype("shift_dtype")),
            g_scale.view({B, 1, D}).to(dtype("scale_dtype")), Tensor()};
  }
};

class GatedResidualFn : public torch::autograd::Function<GatedResidualFn> {
 public:
  // bias and rows are empty tensors when absent (apply() takes no undefined tensors).
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& branch, const Tensor& bias,
                        const Tensor& gate, const Tensor& rows, double p, bool dropout, int64_t seed, int64_t step,
                        int64_t site) {
    const c10::cuda::CUDAGuard guard(x.device());
    const int64_t B = x.size(0), L = x.size(1), D = x.size(2);
    const bool has_bias = bias.numel() > 0;
    Tensor xc = aligned_contiguous(x), bc = aligned_contiguous(branch);
    Tensor bias32 = has_bias ? aligned_contiguous(bias.to(torch::kFloat)) : Tensor();
    Tensor gate32 = aligned_contiguous(gate.to(torch::kFloat));
    Tensor keys = dropout ? rows.contiguous() : Tensor();
    Tensor out = torch::empty_like(xc);
    cuda::gated_residual_forward(xc.data_ptr(), kernel_type(xc), bc.data_ptr(), kernel_type(bc),
                                 bias32.defined() ? bias32.data_ptr<float>() : nullptr, gate32.data_ptr<float>(),
                                 dropout_args(dropout, p, seed, step, site, keys), B, L, D, out.data_ptr(),
                                 current_stream());
    check_launch(true, "gated_residual");
    ctx->save_for_backward({bc, bias32, gate32, keys});
    ctx->saved_data["p"] = p;
    ctx->saved_data["dropout"] = dropout;
    ctx->saved_data["seed"] = seed;
    ctx->saved_data["step"] = step;
    ctx->saved_data["site"] = site;
    ctx->saved_data["out_dtype"] = static_cast<int64_t>(out.scalar_type());
    ctx->saved_data["bias_dtype"] = static_cast<int64_t>(bias.scalar_type());
    ctx->saved_data["gate_dtype"] = static_cast<int64_t>(gate.scalar_type());
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_out) {
    auto saved = ctx->get_saved_variables();
    const Tensor &bc = saved[0], &bias32 = saved[1], &gate32 = saved[2], &keys = saved[3];
    variable_list grads(10);
    if (!grad_out[0].defined()) return grads;
    const c10::cuda::CUDAGuard guard(bc.device());
    auto dtype = [&](const char* k) { return static_cast<torch::ScalarType>(ctx->saved_data[k].toInt()); };
    const int64_t B = bc.size(0), L = bc.size(1), D = bc.size(2);
    Tensor g = aligned_contiguous(grad_out[0].to(dtype("out_dtype")));
    Tensor g_branch = torch::empty_like(bc);
    const int64_t splits = cuda::fused_column_splits(B, L);
    Tensor part_b = torch::empty({splits, B, D}, bc.options().dtype(torch::kFloat)), part_g = torch::empty_like(part_b);
    const auto dp = dropout_args(ctx->saved_data["dropout"].toBool(), ctx->saved_data["p"].toDouble(),
                                 ctx->saved_data["seed"].toInt(), ctx->saved_data["step"].toInt(),
                                 ctx->saved_data["site"].toInt(), keys);
    try {
      check_launch(cuda::gated_residual_backward(g.data_ptr(), kernel_type(g), bc.data_ptr(), kernel_type(bc),
                                                 bias32.defined() ? bias32.data_ptr<float>() : nullptr,
                                                 gate32.data_ptr<float>(), dp, B, L, D, splits, g_branch.data_ptr(),
                                                 part_b.data_ptr<float>(), part_g.data_ptr<float>(), current_stream()),
                   "gated_residual backward");
    } catch (const FusedLaunchFailure& e) {
      report_launch_fallback(e.what());
      const bool dropout = ctx->saved_data["dropout"].toBool();
      const double p = ctx->saved_data["p"].toDouble();
      const int64_t site = ctx->saved_data["site"].toInt();
      const DropoutKey key{static_cast<uint64_t>(ctx->saved_data["seed"].toInt()),
                           static_cast<uint64_t>(ctx->saved_data["step"].toInt()), keys};
      // x enters with gradient g whatever its value: zeros stand in for it.
      auto r = plain_grads(
          [&](const std::vector<Tensor>& a) {
            return gated_residual_plain(a[0], a[1], a[2], a[3], p, dropout, dropout ? &key : nullptr, site);
          },
          {torch::zeros(bc.sizes(), g.options()), bc, bias32, gate32}, {"", "branch", "bias", "gate"}, g);
      grads[0] = g;
      grads[1] = r.at("grad branch");
      if (bias32.defined()) grads[2] = r.at("grad bias").to(dtype("bias_dtype"));
      grads[3] = r.at("grad gate").to(dtype("gate_dtype"));
      return grads;
    }
    grads[0] = g;  // d out / d x = 1
    grads[1] = g_branch;
    if (bias32.defined()) grads[2] = part_b.sum(torch::IntArrayRef{0, 1}).to(dtype("bias_dtype"));
    grads[3] = part_g.sum(0).view({B, 1, D}).to(dtype("gate_dtype"));
    return grads;
  }
};

Tensor rotary_launch(const Tensor& x_in, const Tensor& inv_freq, bool inverse) {
  Tensor x = x_in.stride(3) == 1 ? x_in : x_in.contiguous();  // the kernel takes any strides but Dh's
  const int64_t B = x.size(0), L = x.size(1), H = x.size(2), Dh = x.size(3);
  Tensor out = torch::empty({B, L, H, Dh}, x.options());
  cuda::rotary(x.data_ptr(), kernel_type(x), B, L, H, Dh, x.stride(0), x.stride(1), x.stride(2),
               inv_freq.data_ptr<float>(), inverse, out.data_ptr(), current_stream());
  check_launch(true, inverse ? "rotary backward" : "rotary");
  return out;
}

class RotaryFn : public torch::autograd::Function<RotaryFn> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& inv_freq) {
    const c10::cuda::CUDAGuard guard(x.device());
    Tensor f = aligned_contiguous(inv_freq.to(torch::kFloat));
    ctx->save_for_backward({f});
    return rotary_launch(x, f, false);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_out) {
    if (!grad_out[0].defined()) return {Tensor(), Tensor()};
    Tensor f = ctx->get_saved_variables()[0];
    const c10::cuda::CUDAGuard guard(f.device());
    // The rotation's transpose is the rotation by minus the angle.
    try {
      return {rotary_launch(grad_out[0], f, true), Tensor()};
    } catch (const FusedLaunchFailure& e) {
      report_launch_fallback(e.what());
      // Linear in x: the gradient does not depend on x's value.
      auto r = plain_grads([](const std::vector<Tensor>& a) { return rotary_plain(a[0], a[1]); },
                           {torch::zeros_like(grad_out[0]), f}, {"x", ""}, grad_out[0]);
      return {r.at("grad x"), Tensor()};
    }
  }
};

#endif  // SEDD_HAVE_CUDA_KERNELS

}  // namespace

// ---- plain compositions (ddit.cpp's math) ----------------------------------------------------

Tensor layer_norm_modulate_plain(const Tensor& x, const Tensor& weight, const Tensor& shift, const Tensor& scale,
                                 std::optional<torch::ScalarType> out_dtype) {
  // BiasFreeLayerNorm, then modulate(y, shift, scale) = y * (1 + scale) + shift.
  Tensor y = F::layer_norm(upcast_reduced(x), F::LayerNormFuncOptions({x.size(-1)}).eps(kLayerNormEps)) * weight;
  y = y * (1 + scale) + shift;
  const auto dtype = requested_dtype(x, out_dtype);
  return dtype && *dtype != y.scalar_type() ? y.to(*dtype) : y;
}

Tensor gated_residual_plain(const Tensor& x, const Tensor& branch, const Tensor& bias, const Tensor& gate, double p,
                            bool training, const DropoutKey* key, int64_t site) {
  const Tensor biased = bias.defined() ? branch + bias : branch;
  return x + gate * keyed_dropout(biased, p, training, key, site);
}

Tensor rotary_plain(const Tensor& x, const Tensor& inv_freq) {
  // RotaryImpl::apply with the rotate_half convention.
  const int64_t L = x.size(1);
  auto t = torch::arange(L, inv_freq.options());
  auto freqs = torch::outer(t, inv_freq);                         // [L, Dh/2]
  auto emb = torch::cat({freqs, freqs}, -1).view({1, L, 1, -1});  // [1, L, 1, Dh]
  auto cos = emb.cos().to(x.scalar_type()), sin = emb.sin().to(x.scalar_type());
  auto halves = x.chunk(2, -1);
  return x * cos + torch::cat({-halves[1], halves[0]}, -1) * sin;
}

// ---- CUDA paths ------------------------------------------------------------------------------

Tensor layer_norm_modulate_fused(const Tensor& x, const Tensor& weight, const Tensor& shift, const Tensor& scale,
                                 std::optional<torch::ScalarType> out_dtype) {
  const auto out = requested_dtype(x, out_dtype).value_or(torch::kFloat);
  const std::string why = ln_unfusable(x, weight, shift, scale, out);
  SEDD_CHECK(why.empty(), "layer_norm_modulate_fused: {}", why);
#ifdef SEDD_HAVE_CUDA_KERNELS
  return LayerNormModulateFn::apply(x, weight, shift, scale, static_cast<int64_t>(out));
#else
  fail("layer_norm_modulate_fused: no CUDA kernels");
#endif
}

Tensor gated_residual_fused(const Tensor& x, const Tensor& branch, const Tensor& bias, const Tensor& gate, double p,
                            bool training, const DropoutKey* key, int64_t site) {
  const bool dropout = training && p > 0;
  const std::string why = gated_unfusable(x, branch, bias, gate, dropout, key);
  SEDD_CHECK(why.empty(), "gated_residual_fused: {}", why);
#ifdef SEDD_HAVE_CUDA_KERNELS
  // The output has the promoted dtype (float32 for the residual stream); the kernel writes x's.
  const auto out = torch::promote_types(torch::promote_types(x.scalar_type(), branch.scalar_type()), gate.scalar_type());
  const Tensor rows = dropout ? key->rows.to(x.device()) : torch::empty({0}, x.options().dtype(torch::kLong));
  const Tensor bias_or_empty = bias.defined() ? bias : torch::empty({0}, x.options().dtype(torch::kFloat));
  return GatedResidualFn::apply(x.to(out), branch, bias_or_empty, gate, rows, p, dropout,
                                dropout ? static_cast<int64_t>(key->seed) : 0, dropout ? static_cast<int64_t>(key->step) : 0,
                                site);
#else
  (void)site;
  fail("gated_residual_fused: no CUDA kernels");
#endif
}

Tensor rotary_fused(const Tensor& x, const Tensor& inv_freq) {
  const std::string why = rotary_unfusable(x, inv_freq);
  SEDD_CHECK(why.empty(), "rotary_fused: {}", why);
#ifdef SEDD_HAVE_CUDA_KERNELS
  return RotaryFn::apply(x, inv_freq);
#else
  fail("rotary_fused: no CUDA kernels");
#endif
}

// ---- dispatchers -----------------------------------------------------------------------------

Tensor layer_norm_modulate(const Tensor& x, const Tensor& weight, const Tensor& shift, const Tensor& scale,
                           std::optional<torch::ScalarType> out_dtype) {
  const auto out = requested_dtype(x, out_dtype).value_or(torch::kFloat);
  if (ln_unfusable(x, weight, shift, scale, out).empty() && fused_ops_active(x.device())) {
    try {
      return layer_norm_modulate_fused(x, weight, shift, scale, out_dtype);
    } catch (const FusedLaunchFailure& e) {
      report_launch_fallback(e.what());
    }
  }
  return layer_norm_modulate_plain(x, weight, shift, scale, out_dtype);
}

Tensor gated_residual(const Tensor& x, const Tensor& branch, const Tensor& bias, const Tensor& gate, double p,
                      bool training, const DropoutKey* key, int64_t site) {
  if (gated_unfusable(x, branch, bias, gate, training && p > 0, key).empty() && fused_ops_active(x.device())) {
    try {
      return gated_residual_fused(x, branch, bias, gate, p, training, key, site);
    } catch (const FusedLaunchFailure& e) {
      report_launch_fallback(e.what());
    }
  }
  return gated_residual_plain(x, branch, bias, gate, p, training, key, site);
}

Tensor rotary(const Tensor& x, const Tensor& inv_freq) {
  if (rotary_unfusable(x, inv_freq).empty() && fused_ops_active(x.device())) {
    try {
      return rotary_fused(x, inv_freq);
    } catch (const FusedLaunchFailure& e) {
      report_launch_fallback(e.what());
    }
  }
  return rotary_plain(x, inv_freq);
}

// ---- activity and the self-check -------------------------------------------------------------

bool fused_ops_built() {
#ifdef SEDD_HAVE_CUDA_KERNELS
  return true;
#else
  return false;
#endif
}

// op(inputs) and the gradients of sum(op(inputs) * probe) for the inputs with a name in `names`
// (an empty name: no gradient), on leaves of their own (so two paths never share a graph).
std::vector<std::pair<std::string, Tensor>> value_and_grads(const TensorOp& op, const std::vector<Tensor>& inputs,
                                                            const std::vector<std::string>& names, const Tensor& probe) {
  std::vector<Tensor> leaves, wrt;
  std::vector<std::string> wrt_names;
  for (size_t i = 0; i < inputs.size(); ++i) {
    const Tensor& t = inputs[i];
    if (!t.defined() || names.at(i).empty()) {
      leaves.push_back(t);
      continue;
    }
    leaves.push_back(t.detach().clone().requires_grad_(true));
    wrt.push_back(leaves.back());
    wrt_names.push_back("grad " + names[i]);
  }
  Tensor out = op(leaves);
  auto grads = torch::autograd::grad({out}, wrt, {probe.to(out.scalar_type())}, false, false, true);
  std::vector<std::pair<std::string, Tensor>> result{{"output", out.detach()}};
  for (size_t i = 0; i < grads.size(); ++i) result.emplace_back(wrt_names[i], grads[i]);
  return result;
}

// max |a - b| / max |b| over the elements, in float64 (a missing gradient counts as zeros).
double normalised_error(const Tensor& a, const Tensor& b) {
  if (!a.defined() && !b.defined()) return 0;
  const Tensor bd = b.defined() ? b.to(torch::kDouble).cpu() : torch::zeros_like(a, torch::kDouble).cpu();
  const Tensor ad = a.defined() ? a.to(torch::kDouble).cpu() : torch::zeros_like(bd);
  const double scale = std::max(bd.abs().max().item<double>(), 1e-30);
  return (ad - bd).abs().max().item<double>() / scale;
}

namespace {

constexpr int kMaxDevices = 64;
enum DeviceState : int { kUnchecked = 0, kActive = 1, kOff = 2 };
std::array<std::atomic<int>, kMaxDevices> g_state{};
std::array<std::string, kMaxDevices> g_reason;  // why a device is off; written under g_mutex
std::mutex g_mutex;
// Launches that fell back to the plain path. A mutex of its own: a backward pass may fall back on
// an autograd thread while the self-check holds g_mutex and waits for it.
std::set<std::string> g_fallbacks;
std::mutex g_fallback_mutex;

void report_launch_fallback(const std::string& what) {
  std::lock_guard<std::mutex> lock(g_fallback_mutex);
  if (!g_fallbacks.insert(what).second) return;
  std::fprintf(stderr, "sedd: warning: %s; such calls take the plain LibTorch ops (printed once)\n", what.c_str());
}

// Autocast off (the self-check chooses every dtype itself), restored on exit.
struct NoCudaAutocast {
  NoCudaAutocast() : prev(at::autocast::is_autocast_enabled(at::kCUDA)) {
    at::autocast::set_autocast_enabled(at::kCUDA, false);
  }
  ~NoCudaAutocast() { at::autocast::set_autocast_enabled(at::kCUDA, prev); }
  bool prev;
};

std::string first_line(const std::string& s) { return s.substr(0, s.find('\n')); }

// Compares `fused` on `inputs` with `plain` on the same values in float32 (bf16 inputs upcast:
// the reference is the exact plain math, so the differences are the kernels' own roundings).
std::string compare(const std::string& name, const TensorOp& fused, const TensorOp& plain, const std::vector<Tensor>& inputs,
                    const std::vector<std::string>& names, const Tensor& probe, double tol) {
  std::vector<Tensor> upcast;
  for (const auto& t : inputs) upcast.push_back(t.defined() && t.is_floating_point() ? t.to(torch::kFloat) : t);
  auto f = value_and_grads(fused, inputs, names, probe);
  auto p = value_and_grads(plain, upcast, names, probe.to(torch::kFloat));
  for (size_t i = 0; i < f.size(); ++i) {
    const double err = normalised_error(f[i].second, p[i].second);
    if (!(err <= tol)) return fmt::format("{} {}: error {:.3g} > {:.3g}", name, f[i].first, err, tol);
  }
  return "";
}

}  // namespace

std::string fused_ops_self_check(const torch::Device& device) {
  if (!fused_ops_built()) return "the CUDA kernels are not built";
  SEDD_CHECK(device.is_cuda(), "fused_ops_self_check: {} is not a CUDA device", device.str());
  c10::InferenceMode inference_off(false);
  torch::AutoGradMode grad_on(true);
  NoCudaAutocast no_autocast;
  auto gen = at::detail::createCPUGenerator(20240607);  // private: the global generators stay untouched
  auto randn = [&](torch::IntArrayRef size, torch::ScalarType dtype) {
    return at::randn(size, gen, torch::kFloat).to(device, dtype);
  };
  const auto f32 = torch::kFloat, bf16 = torch::kBFloat16;
  const int64_t B = 3, L = 37;  // B * L = 111 rows: not a multiple of any block or split
  DropoutKey key{7, 3, torch::tensor({4, 1000000007, 12}, torch::kLong).to(device)};

  for (auto low : {f32, bf16}) {
    const double tol = low == f32 ? kFusedCheckTolFloat : kFusedCheckTolBf16;
    const std::string tag = low == f32 ? " float32" : " bf16";
    // D = 200: vectorised rows; D = 66: scalar rows (D % 4 != 0).
    for (int64_t D : {200, 66}) {
      // The model's mix: float32 residual stream, modulation in the autocast dtype, output in it.
      std::vector<Tensor> ln_in{randn({B, L, D}, f32) * 2 + 0.5, 1 + 0.2 * randn({D}, f32), randn({B, 1, D}, low),
                                0.3 * randn({B, 1, D}, low)};
      auto ln = [low](bool fused) -> TensorOp {
        return [fused, low](const std::vector<Tensor>& a) {
          return fused ? layer_norm_modulate_fused(a[0], a[1], a[2], a[3], low)
                       : layer_norm_modulate_plain(a[0], a[1], a[2], a[3], torch::kFloat);
        };
      };
      if (auto e = compare("layer_norm_modulate" + tag, ln(true), ln(false), ln_in, {"x", "weight", "shift", "scale"},
                           randn({B, L, D}, low), tol);
          !e.empty())
        return e;

      const bool with_dropout = D == 200;  // and with bias; D = 66 without either
      std::vector<Tensor> gr_in{randn({B, L, D}, f32), randn({B, L, D}, low),
                                with_dropout ? randn({D}, f32) : Tensor(), randn({B, 1, D}, low)};
      auto gr = [&key, with_dropout](bool fused) -> TensorOp {
        return [fused, &key, with_dropout](const std::vector<Tensor>& a) {
          return fused ? gated_residual_fused(a[0], a[1], a[2], a[3], 0.25, with_dropout, &key, 5)
                       : gated_residual_plain(a[0], a[1], a[2], a[3], 0.25, with_dropout, &key, 5);
        };
      };
      if (auto e = compare("gated_residual" + tag, gr(true), gr(false), gr_in, {"x", "branch", "bias", "gate"},
                           randn({B, L, D}, f32), tol);
          !e.empty())
        return e;
    }
    // Dh = 16: vectorised pairs; Dh = 6: scalar. q as the model takes it: a strided view of qkv.
    for (int64_t Dh : {16, 6}) {
      const int64_t H = 5;
      Tensor qkv = randn({B, L, 3, H, Dh}, low);
      Tensor inv_freq = 1.0 / torch::pow(10000.0, torch::arange(0, Dh, 2, torch::kFloat) / static_cast<double>(Dh));
      auto rot = [](bool fused) -> TensorOp {
        return [fused](const std::vector<Tensor>& a) {
          return fused ? rotary_fused(a[0].select(2, 1), a[1]) : rotary_plain(a[0].select(2, 1), a[1]);
        };
      };
      if (auto e = compare("rotary" + tag, rot(true), rot(false), {qkv, inv_freq.to(device)}, {"x", ""},
                           randn({B, L, H, Dh}, low), tol);
          !e.empty())
        return e;
    }
  }
  return "";
}

bool fused_ops_active(const torch::Device& device) {
  if (!device.is_cuda() || !fused_ops_built()) return false;
#ifdef SEDD_HAVE_CUDA_KERNELS
  const int index = device.has_index() ? device.index() : static_cast<int>(c10::cuda::current_device());
  if (index < 0 || index >= kMaxDevices) return false;
  if (const int s = g_state[index].load(std::memory_order_acquire); s != kUnchecked) return s == kActive;
  std::lock_guard<std::mutex> lock(g_mutex);
  if (const int s = g_state[index].load(); s != kUnchecked) return s == kActive;
  std::string mismatch;
  try {
    mismatch = fused_ops_self_check(torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(index)));
  } catch (const std::exception& e) {
    mismatch = "the self-check failed to run: " + first_line(e.what());
  }
  if (!mismatch.empty()) {
    std::fprintf(stderr, "sedd: warning: fused CUDA kernels off on cuda:%d (%s); using the plain LibTorch ops\n", index,
                 mismatch.c_str());
    g_reason[index] = mismatch;
  }
  g_state[index].store(mismatch.empty() ? kActive : kOff, std::memory_order_release);
  return mismatch.empty();
#else
  return false;
#endif
}

void fused_ops_inject_launch_failures(int count) { g_injected_launch_failures.store(count); }

std::string fused_ops_status() {
  if (!fused_ops_built()) return "fused kernels: not built (no nvcc at configure time); plain LibTorch ops";
  std::lock_guard<std::mutex> lock(g_mutex);
  std::string active, off;
  for (int i = 0; i < kMaxDevices; ++i) {
    const int s = g_state[i].load();
    if (s == kActive) active += (active.empty() ? "" : ", ") + fmt::format("cuda:{}", i);
    if (s == kOff) off += (off.empty() ? "" : "; ") + fmt::format("cuda:{} ({})", i, g_reason[i]);
  }
  if (active.empty() && off.empty()) return "fused kernels: built, not used on any device yet";
  std::string line = "fused kernels:";
  if (!active.empty()) line += " active on " + active;
  if (!off.empty()) line += std::string(active.empty() ? "" : ";") + " off on " + off + " (plain LibTorch ops there)";
  std::lock_guard<std::mutex> fallback_lock(g_fallback_mutex);
  for (const auto& f : g_fallbacks) line += "; plain fallback after: " + f;
  return line;
}

}  // namespace sedd
