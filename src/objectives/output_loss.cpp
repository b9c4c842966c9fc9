// Fused, chunked output layer + loss; see output_loss.h.
#include "objectives/output_loss.h"

#include <ATen/autocast_mode.h>
#include <torch/version.h>

#include <cmath>
#include <limits>

#include "io/error.h"

namespace sedd {

namespace {

using torch::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Loss per row [C] of logits s [C, P] whose first N columns are the tokens' and, when asked,
// d loss / d s [C, P]. Columns past N only pad the rows to an aligned width and hold -inf: exp
// gives 0 there, so they add nothing to a sum or logsumexp and their gradient is 0.
std::pair<Tensor, Tensor> row_loss_and_grad(RowLoss kind, const Tensor& s, const OutputLossRows& r, int64_t N,
                                            bool want_grad) {
  const auto dtype = s.scalar_type();
  const int64_t P = s.size(1);
  auto target = r.target.unsqueeze(1);
  Tensor loss, grad;
  switch (kind) {
    case RowLoss::SeddAbsorb: {
      auto a = r.a.to(dtype), b = r.b.to(dtype);
      auto e = torch::exp(s + a.unsqueeze(1));
      loss = e.sum(1) - b * (s.gather(1, target).squeeze(1) + a) + b * (b.log() - 1);
      if (want_grad) grad = e.scatter_add_(1, target, -b.unsqueeze(1));
      break;
    }
    case RowLoss::SeddUniform: {
      auto a = r.a.to(dtype), rho = r.b.to(dtype);
      const double n = static_cast<double>(N);
      auto current = r.current.unsqueeze(1);
      auto stay = r.target == r.current;
      auto e = torch::exp(s).scatter_(1, current, 0.0);      // the current token's score is 0: not summed
      auto s_other = s.narrow(1, 0, N).scatter(1, current, 0.0);
      auto M = e.sum(1) / n, m = s_other.sum(1) / n;
      auto s_x0 = torch::where(stay, torch::zeros_like(a), s.gather(1, target).squeeze(1));
      auto cst = torch::where(stay, (n - 1) / n * rho * (rho.log() - 1), ((-rho.log() - 1) / rho - (n - 2)) / n);
      loss = torch::where(stay, M - rho * m, M - (a * s_x0 + m)) + cst;
      if (want_grad) {
        auto coef_m = torch::where(stay, rho, torch::ones_like(rho));
        grad = (e - coef_m.unsqueeze(1)) / n;
        if (P > N) grad.narrow(1, N, P - N).zero_();
        grad.scatter_add_(1, target, -(a * (~stay).to(dtype)).unsqueeze(1));
        grad.scatter_(1, current, 0.0);
      }
      break;
    }
    case RowLoss::CrossEntropy: {
      auto lse = torch::logsumexp(s, 1);
      loss = lse - s.gather(1, target).squeeze(1);
      if (want_grad) grad = torch::exp(s - lse.unsqueeze(1)).scatter_add_(1, target, -torch::ones_like(target, dtype));
      break;
    }
  }
  return {loss, grad};
}

OutputLossRows slice(const OutputLossRows& r, int64_t begin, int64_t n) {
  OutputLossRows out;
  out.target = r.target.narrow(0, begin, n);
  if (r.current.defined()) out.current = r.current.narrow(0, begin, n);
  if (r.a.defined()) out.a = r.a.narrow(0, begin, n);
  if (r.b.defined()) out.b = r.b.narrow(0, begin, n);
  return out;
}

// a @ b for bf16 a and b with float32 accumulation and a float32 result: logits rounded to bf16
// before exp/log would be off by up to 2^-9 |s| (3-6% per term at |s| = 8..16).
Tensor mm_bf16_to_float(const Tensor& a, const Tensor& b) {
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 8)
  return at::mm(a, b, torch::kFloat);
#else
  return at::mm(a.to(torch::kFloat), b.to(torch::kFloat));
#endif
}

// a [C, D] x b^T [P, D] + bias -> [C, P] in float32 (float64 stays float64). bf16 operands
// accumulate into a float32 result and the (float32) bias is added in float32.
Tensor matmul_nt(const Tensor& a, const Tensor& b, const Tensor& bias) {
  if (a.scalar_type() == torch::kBFloat16) {
    Tensor out = mm_bf16_to_float(a, b.t());
    return bias.defined() ? out.add_(bias) : out;
  }
  Tensor out = bias.defined() ? at::addmm(bias, a, b.t()) : at::mm(a, b.t());
  return out.scalar_type() == torch::kDouble ? out : out.to(torch::kFloat);
}

// a [P, C] x b [C, D] accumulated into acc (float32/float64).
void add_mm(Tensor& acc, const Tensor& a, const Tensor& b) {
  if (a.scalar_type() == torch::kBFloat16) {
    acc.add_(mm_bf16_to_float(a, b));
    return;
  }
  acc.add_(at::mm(a, b).to(acc.scalar_type()));
}

// Token columns padded to a multiple of 8, so that every row of the logits and of their gradient
// starts 16-byte aligned (bf16 and fp32): cuBLASLt's fastest kernels need aligned leading dimensions.
int64_t padded_columns(int64_t columns) { return (columns + 7) / 8 * 8; }

// Rows [0, columns) of m ([V, D] or [V]) in dtype, then zero rows up to `padded`: a copy, cheap
// next to the matmuls it feeds (V x D elements against R x V x D products), or a view when neither
// padding nor a cast is needed.
Tensor padded_rows(const Tensor& m, int64_t columns, int64_t padded, torch::ScalarType dtype) {
  Tensor real = m.narrow(0, 0, columns);
  if (padded == columns) return real.to(dtype);
  auto sizes = m.sizes().vec();
  sizes[0] = padded;
  Tensor out = torch::empty(sizes, m.options().dtype(dtype));
  out.narrow(0, 0, columns).copy_(real);
  out.narrow(0, columns, padded - columns).zero_();
  return out;
}

// The padded operands of the matmuls: weight [P, D] and bias [P].
struct PaddedLayer {
  Tensor weight, bias;
};

PaddedLayer padded_layer(const Tensor& weight, const Tensor& bias, int64_t columns, torch::ScalarType mm_dtype,
                         bool bf16) {
  // The bias joins the float32 logits of bf16 products in float32, else the operands' dtype.
  const auto bias_dtype = bf16 ? torch::kFloat : mm_dtype;
  const int64_t P = padded_columns(columns);
  return {padded_rows(weight, columns, P, mm_dtype),
          bias.defined() ? padded_rows(bias, columns, P, bias_dtype) : Tensor()};  // a layer without a bias
}

// Logits [C, P] of features f [C, D]: the N token columns, then padding columns at -inf (see
// row_loss_and_grad).
Tensor chunk_logits(const Tensor& f, const PaddedLayer& layer, int64_t columns) {
  Tensor logits = matmul_nt(f, layer.weight, layer.bias);
  const int64_t P = logits.size(1);
  if (P > columns) logits.narrow(1, columns, P - columns).fill_(-std::numeric_limits<double>::infinity());
  return logits;
}

class FusedOutputLoss : public torch::autograd::Function<FusedOutputLoss> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& features, const Tensor& weight, const Tensor& bias,
                        const Tensor& target, const Tensor& current, const Tensor& a, const Tensor& b, int64_t kind,
                        int64_t columns, bool low_precision, int64_t chunk) {
    // Autocast must not re-cast inside: the casts below are the ones we want.
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    const bool bf16 = low_precision && features.is_cuda();
    const auto mm_dtype = bf16 ? torch::kBFloat16 : features.scalar_type();
    const PaddedLayer layer = padded_layer(weight, bias, columns, mm_dtype, bf16);
    Tensor f = features.to(mm_dtype);
    OutputLossRows rows{target, current, a, b};
    const int64_t R = f.size(0);
    Tensor loss = torch::empty({R}, features.options().dtype(features.scalar_type() == torch::kDouble ? torch::kDouble
                                                                                                   : torch::kFloat));
    for (int64_t i = 0; i < R; i += chunk) {
      const int64_t n = std::min(chunk, R - i);
      auto logits = chunk_logits(f.narrow(0, i, n), layer, columns);
      loss.narrow(0, i, n).copy_(
          row_loss_and_grad(static_cast<RowLoss>(kind), logits, slice(rows, i, n), columns, false).first);
    }
    // The layer's own tensors are kept, not the padded copies: backward pads again.
    ctx->save_for_backward({f, weight, bias, target, current, a, b});
    ctx->saved_data["kind"] = kind;
    ctx->saved_data["columns"] = columns;
    ctx->saved_data["chunk"] = chunk;
    ctx->saved_data["bf16"] = bf16;
    ctx->saved_data["weight_dtype"] = static_cast<int64_t>(weight.scalar_type());
    ctx->saved_data["feature_dtype"] = static_cast<int64_t>(features.scalar_type());
    return loss;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_out) {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    auto saved = ctx->get_saved_variables();
    Tensor f = saved[0], weight = saved[1], bias = saved[2];
    OutputLossRows rows{saved[3], saved[4], saved[5], saved[6]};
    const auto kind = static_cast<RowLoss>(ctx->saved_data["kind"].toInt());
    const int64_t columns = ctx->saved_data["columns"].toInt(), chunk = ctx->saved_data["chunk"].toInt();
    const auto weight_dtype = static_cast<torch::ScalarType>(ctx->saved_data["weight_dtype"].toInt());
    const auto feature_dtype = static_cast<torch::ScalarType>(ctx->saved_data["feature_dtype"].toInt());
    const auto acc_dtype = weight_dtype == torch::kDouble ? torch::kDouble : torch::kFloat;
    Tensor g_loss = grad_out[0];
    const PaddedLayer layer = padded_layer(weight, bias, columns, f.scalar_type(), ctx->saved_data["bf16"].toBool());
    const Tensor& w = layer.weight;
    const int64_t R = f.size(0), D = f.size(1), P = w.size(0);
    Tensor g_f = torch::empty({R, D}, f.options().dtype(feature_dtype));
    // Over the padded columns too (their gradient is 0), so that g_mm's rows stay aligned.
    Tensor g_w = torch::zeros({P, D}, f.options().dtype(acc_dtype));
    Tensor g_b = torch::zeros({P}, f.options().dtype(acc_dtype));
    for (int64_t i = 0; i < R; i += chunk) {
      const int64_t n = std::min(chunk, R - i);
      auto fc = f.narrow(0, i, n);
      auto logits = chunk_logits(fc, layer, columns);
      auto g = row_loss_and_grad(kind, logits, slice(rows, i, n), columns, true).second;  // [n, P]
      g.mul_(g_loss.narrow(0, i, n).to(g.scalar_type()).unsqueeze(1));
      g_b.add_(g.sum(0).to(acc_dtype));
      auto g_mm = g.to(f.scalar_type());
      g_f.narrow(0, i, n).copy_(g_mm.scalar_type() == torch::kBFloat16 ? mm_bf16_to_float(g_mm, w) : at::mm(g_mm, w));
      add_mm(g_w, g_mm.t(), fc);
    }
    // The real columns only: the padding never reaches the layer's weight.
    const int64_t V = weight.size(0);
    Tensor grad_weight = torch::zeros({V, D}, f.options().dtype(weight_dtype));
    grad_weight.narrow(0, 0, columns).copy_(g_w.narrow(0, 0, columns));
    Tensor grad_bias;
    if (bias.defined()) {
      grad_bias = torch::zeros({V}, f.options().dtype(bias.scalar_type()));
      grad_bias.narrow(0, 0, columns).copy_(g_b.narrow(0, 0, columns));
    }
    return {g_f, grad_weight, grad_bias, Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

}  // namespace

torch::Tensor fused_output_loss(RowLoss kind, const torch::Tensor& features, const torch::Tensor& weight,
                                const torch::Tensor& bias, const OutputLossRows& rows, int64_t columns,
                                bool low_precision, int64_t chunk_elems) {
  SEDD_CHECK(features.dim() == 2 && weight.dim() == 2 && features.size(1) == weight.size(1),
             "fused_output_loss: features [R, D] and weight [V, D] expected, got {} and {}",
             c10::str(features.sizes()), c10::str(weight.sizes()));
  SEDD_CHECK(columns >= 1 && columns <= weight.size(0), "fused_output_loss: {} columns of a {}-row weight", columns,
             weight.size(0));
  SEDD_CHECK(rows.target.size(0) == features.size(0), "fused_output_loss: {} targets for {} rows", rows.target.size(0),
             features.size(0));
  SEDD_CHECK(kind != RowLoss::SeddUniform || rows.current.defined(), "fused_output_loss: the uniform loss needs current tokens");
  auto constant = [&](const torch::Tensor& t) { return t.defined() ? t : torch::zeros_like(rows.target, features.options()); };
  const int64_t chunk = std::max<int64_t>(1, chunk_elems / columns);
  torch::Tensor current = rows.current.defined() ? rows.current : rows.target;
  // Custom autograd functions take defined tensors only: a missing bias is a zero one.
  torch::Tensor b = bias.defined() ? bias : torch::zeros({weight.size(0)}, weight.options());
  return FusedOutputLoss::apply(features, weight, b, rows.target, current, constant(rows.a), constant(rows.b),
                                static_cast<int64_t>(kind), columns, low_precision, chunk);
}

torch::Tensor row_loss_from_logits(RowLoss kind, const torch::Tensor& logits, const OutputLossRows& rows,
                                   int64_t columns) {
  OutputLossRows r = rows;
  if (!r.current.defined()) r.current = r.target;
  if (!r.a.defined()) r.a = torch::zeros_like(r.target, logits.options());
  if (!r.b.defined()) r.b = torch::zeros_like(r.target, logits.options());
  return row_loss_and_grad(kind, logits.narrow(1, 0, columns), r, columns, false).first;
}

}  // namespace sedd
