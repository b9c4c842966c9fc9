// Fused DDiT-block ops (model/fused_ops.h). On the CPU: the plain compositions are exactly the
// block's math (values and gradients), the gated residual's dropout is keyed_dropout's mask, and
// the model's fused_kernels switch leaves CPU results bit for bit alone. On a GPU (FusedOpsGpu,
// skipped without one): every kernel against the plain path in float32 and bf16, forward and
// every gradient, at shapes chosen to expose indexing errors (D not a power of two nor always a
// multiple of 4, B * L not a multiple of any block size, strided inputs), dropout masks equal to
// the CPU's bit for bit, a whole DDiT, the attention backend and the self-check.
#include <gtest/gtest.h>

#include <ATen/SDPBackend.h>

#include <array>
#include <functional>

#include "io/error.h"
#include "model/ddit.h"
#include "model/fused_ops.h"

// Everything in a namespace of its own: the test sources are compiled in unity batches.
namespace sedd::fused_ops_test {

using torch::Tensor;

namespace {

namespace F = torch::nn::functional;

using Op = TensorOp;

// |a - b| / |b| (Frobenius norms) over every entry of two value-and-gradient lists, in float64.
double relative_l2_error(const std::vector<std::pair<std::string, Tensor>>& a,
                         const std::vector<std::pair<std::string, Tensor>>& b, bool outputs) {
  double diff = 0, ref = 0;
  for (size_t i = outputs ? 0 : 1; i < (outputs ? 1 : a.size()); ++i) {
    auto ad = a[i].second.detach().to(torch::kCPU, torch::kDouble), bd = b[i].second.detach().to(torch::kCPU, torch::kDouble);
    diff += (ad - bd).pow(2).sum().item<double>();
    ref += bd.pow(2).sum().item<double>();
  }
  return std::sqrt(diff / std::max(ref, 1e-300));
}

// Entry 0 (the output) within `tol`, the gradients within `grad_tol` (default: tol).
void expect_close(const std::vector<std::pair<std::string, Tensor>>& got,
                  const std::vector<std::pair<std::string, Tensor>>& want, double tol, const std::string& what,
                  double grad_tol = -1) {
  ASSERT_EQ(got.size(), want.size()) << what;
  for (size_t i = 0; i < got.size(); ++i) {
    ASSERT_EQ(got[i].first, want[i].first) << what;
    ASSERT_TRUE(got[i].second.defined() && want[i].second.defined()) << what << " " << got[i].first;
    ASSERT_EQ(got[i].second.sizes(), want[i].second.sizes()) << what << " " << got[i].first;
    const double err = normalised_error(got[i].second, want[i].second);
    EXPECT_LE(err, i == 0 || grad_tol < 0 ? tol : grad_tol) << what << " " << got[i].first;
  }
}

void expect_equal(const std::vector<std::pair<std::string, Tensor>>& got,
                  const std::vector<std::pair<std::string, Tensor>>& want, const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  for (size_t i = 0; i < got.size(); ++i)
    EXPECT_TRUE(torch::equal(got[i].second, want[i].second)) << what << " " << got[i].first;
}

DropoutKey make_key(int64_t B, torch::Device device, uint64_t seed = 17) {
  return DropoutKey{seed, 42, torch::randint(1LL << 40, {B}, torch::kLong).to(device)};
}

ModelConfig small_config(int64_t hidden, int64_t heads, double dropout) {
  ModelConfig c;
  c.tokens = 37;
  c.graph = "absorb";
  c.hidden_size = hidden;
  c.n_heads = heads;
  c.n_blocks = 2;
  c.cond_dim = 24;
  c.length = 64;
  c.dropout = dropout;
  c.scale_by_sigma = true;
  return c;
}

// Random values everywhere (the zero-initialised adaLN and output layers would hide most paths).
void randomize(DDiT& m, uint64_t seed) {
  torch::manual_seed(seed);
  torch::NoGradGuard ng;
  for (auto& p : m->parameters()) p.normal_(0, 0.3);
}

// The model's output and every parameter's gradient of sum(output * probe).
std::vector<std::pair<std::string, Tensor>> model_value_and_grads(DDiT& m, const Tensor& x, const Tensor& sigma,
                                                                  const DropoutKey* key, const Tensor& probe) {
  m->zero_grad();
  Tensor out = m->forward(x, sigma, key);
  (out * probe.to(out.scalar_type())).sum().backward();
  std::vector<std::pair<std::string, Tensor>> result{{"output", out.detach()}};
  for (const auto& p : m->named_parameters())
    result.emplace_back("grad " + p.key(), p.value().grad().defined() ? p.value().grad().clone()
                                                                      : torch::zeros_like(p.value()));
  return result;
}

}  // namespace

// ---- CPU ---------------------------------------------------------------------------------------

// layer_norm_modulate_plain is FinalLayer::features (= modulate(norm_final(x), shift, scale), the
// block's composition) bit for bit, gradients included, and the dispatcher takes it on the CPU.
TEST(FusedOps, PlainLayerNormModulateIsTheBlockComposition) {
  torch::manual_seed(1);
  const int64_t B = 3, L = 7, D = 10;
  FinalLayer layer(D, 5, 4);
  layer->to(torch::kDouble);
  {
    torch::NoGradGuard ng;
    layer->norm_final->weight.normal_(1, 0.3);
  }
  std::vector<Tensor> in{torch::randn({B, L, D}, torch::kDouble), layer->norm_final->weight,
                         torch::randn({B, 1, D}, torch::kDouble), torch::randn({B, 1, D}, torch::kDouble)};
  const std::vector<std::string> names{"x", "weight", "shift", "scale"};
  auto probe = torch::randn({B, L, D}, torch::kDouble);
  auto original = value_and_grads(
      [&](const std::vector<Tensor>& a) {
        // The module's own weight, replaced by the leaf so that its gradient is seen.
        auto saved = layer->norm_final->weight;
        layer->norm_final->weight = a[1];
        auto y = layer->features(a[0], a[2], a[3]);
        layer->norm_final->weight = saved;
        return y;
      },
      in, names, probe);
  auto plain = value_and_grads([](const std::vector<Tensor>& a) { return layer_norm_modulate_plain(a[0], a[1], a[2], a[3]); },
                               in, names, probe);
  auto dispatched = value_and_grads([](const std::vector<Tensor>& a) { return layer_norm_modulate(a[0], a[1], a[2], a[3]); },
                                    in, names, probe);
  expect_equal(plain, original, "plain vs FinalLayer::features");
  expect_equal(dispatched, original, "dispatcher on the CPU");
  EXPECT_EQ(plain[0].second.scalar_type(), torch::kDouble);
  // A float32 input with bf16 modulation gives float32 unless asked, and the asked dtype when asked.
  auto x32 = torch::randn({B, L, D});
  EXPECT_EQ(layer_norm_modulate_plain(x32, torch::ones({D}), torch::zeros({B, 1, D}, torch::kBFloat16),
                                      torch::zeros({B, 1, D}, torch::kBFloat16))
                .scalar_type(),
            torch::kFloat);
  auto low = layer_norm_modulate_plain(x32, torch::ones({D}), torch::zeros({B, 1, D}), torch::zeros({B, 1, D}),
                                       torch::kBFloat16);
  EXPECT_EQ(low.scalar_type(), torch::kBFloat16);
  EXPECT_TRUE(torch::equal(low, F::layer_norm(x32, F::LayerNormFuncOptions({D})).to(torch::kBFloat16)));
}

// gated_residual_plain(x, linear(h, W), b, gate) is x + gate * keyed_dropout(linear(h, W, b)):
// bit for bit without a bias (the attention branch), to float64 rounding with one (the MLP branch,
// whose bias the fused path adds after the matmul), gradients included.
TEST(FusedOps, PlainGatedResidualIsTheBlockComposition) {
  torch::manual_seed(2);
  const int64_t B = 4, L = 9, D = 12, site = 3;
  const double p = 0.3;
  auto key = make_key(B, torch::kCPU);
  std::vector<Tensor> in{torch::randn({B, L, D}, torch::kDouble), torch::randn({B, L, 2 * D}, torch::kDouble),
                         torch::randn({D, 2 * D}, torch::kDouble), torch::randn({D}, torch::kDouble),
                         torch::randn({B, 1, D}, torch::kDouble)};
  const std::vector<std::string> names{"x", "h", "W", "bias", "gate"};
  auto probe = torch::randn({B, L, D}, torch::kDouble);
  for (bool training : {true, false}) {
    const std::string mode = training ? "training" : "eval";
    auto original = value_and_grads(
        [&](const std::vector<Tensor>& a) {
          return a[0] + a[4] * keyed_dropout(F::linear(a[1], a[2], a[3]), p, training, &key, site);
        },
        in, names, probe);
    auto plain = value_and_grads(
        [&](const std::vector<Tensor>& a) {
          return gated_residual_plain(a[0], F::linear(a[1], a[2]), a[3], a[4], p, training, &key, site);
        },
        in, names, probe);
    expect_close(plain, original, 1e-13, "with bias, " + mode);
    auto original_nb = value_and_grads(
        [&](const std::vector<Tensor>& a) {
          return a[0] + a[4] * keyed_dropout(F::linear(a[1], a[2]), p, training, &key, site);
        },
        in, {"x", "h", "W", "", "gate"}, probe);
    auto plain_nb = value_and_grads(
        [&](const std::vector<Tensor>& a) {
          return gated_residual_plain(a[0], F::linear(a[1], a[2]), {}, a[4], p, training, &key, site);
        },
        in, {"x", "h", "W", "", "gate"}, probe);
    expect_equal(plain_nb, original_nb, "without bias, " + mode);
    auto dispatched = value_and_grads(
        [&](const std::vector<Tensor>& a) {
          return gated_residual(a[0], F::linear(a[1], a[2]), a[3], a[4], p, training, &key, site);
        },
        in, names, probe);
    expect_equal(dispatched, plain, "dispatcher on the CPU, " + mode);
  }
}

// The dropped elements of gated_residual are exactly keyed_dropout's (dropout_keep_mask) at the
// same key and site, and they follow the rows' keys, not their places in the batch.
TEST(FusedOps, GatedResidualDropoutIsTheKeyedMask) {
  const int64_t B = 5, L = 11, D = 13, site = 7;
  const double p = 0.4;
  auto key = make_key(B, torch::kCPU, 99);
  auto ones = torch::ones({B, L, D});
  auto out = gated_residual(torch::zeros({B, L, D}), ones, {}, torch::ones({B, 1, D}), p, true, &key, site);
  auto mask = dropout_keep_mask(key, site, p, {B, L, D}, torch::kCPU);
  EXPECT_TRUE(torch::equal(out != 0, mask != 0));
  EXPECT_TRUE(torch::allclose(out.masked_select(mask != 0), torch::full({1}, 1.0 / (1.0 - p)).expand({mask.sum().item<int64_t>()})));
  const double kept = mask.mean().item<double>();
  EXPECT_NEAR(kept, 1 - p, 0.05);
  // Reversed batch order with reversed keys: the same rows, reversed.
  auto perm = torch::arange(B - 1, -1, -1, torch::kLong);
  DropoutKey reversed{key.seed, key.step, key.rows.index_select(0, perm)};
  auto out_rev = gated_residual(torch::zeros({B, L, D}), ones, {}, torch::ones({B, 1, D}), p, true, &reversed, site);
  EXPECT_TRUE(torch::equal(out_rev, out.index_select(0, perm)));
  // Another site draws another mask.
  auto other = gated_residual(torch::zeros({B, L, D}), ones, {}, torch::ones({B, 1, D}), p, true, &key, site + 1);
  EXPECT_FALSE(torch::equal(other != 0, out != 0));
}

// rotary_plain is RotaryImpl::apply bit for bit (float32, float64, bf16), gradients included, on
// the strided q view the block passes.
TEST(FusedOps, PlainRotaryIsRotaryImplApply) {
  torch::manual_seed(3);
  const int64_t B = 2, L = 13, H = 3, Dh = 10;
  Rotary rot(Dh);
  for (auto dtype : {torch::kFloat, torch::kDouble, torch::kBFloat16}) {
    auto qkv = torch::randn({B, L, 3, H, Dh}).to(dtype);
    auto probe = torch::randn({B, L, H, Dh}).to(dtype);
    auto original = value_and_grads([&](const std::vector<Tensor>& a) { return rot->apply(a[0].select(2, 0)); }, {qkv},
                                    {"x"}, probe);
    auto plain = value_and_grads(
        [&](const std::vector<Tensor>& a) { return rotary_plain(a[0].select(2, 0), rot->inv_freq); }, {qkv}, {"x"}, probe);
    auto dispatched = value_and_grads(
        [&](const std::vector<Tensor>& a) { return rotary(a[0].select(2, 0), rot->inv_freq); }, {qkv}, {"x"}, probe);
    expect_equal(plain, original, c10::toString(dtype));
    expect_equal(dispatched, original, c10::toString(dtype));
  }
}

// The fused_kernels switch changes nothing on the CPU: a training forward and backward with keyed
// dropout gives the same bits with it on and off.
TEST(FusedOps, ModelOnCpuIsIdenticalWithTheSwitchOnAndOff) {
  DDiT m(small_config(24, 2, 0.1));
  randomize(m, 4);
  m->train();
  auto x = torch::randint(m->cfg.vocab_dim(), {3, 16}, torch::kLong);
  auto sigma = torch::rand({3}) + 0.1;
  auto key = make_key(3, torch::kCPU);
  auto probe = torch::randn({3, 16, m->cfg.vocab_dim()});
  EXPECT_FALSE(m->uses_fused_kernels(torch::kCPU));
  m->fused_kernels = true;
  auto on = model_value_and_grads(m, x, sigma, &key, probe);
  m->fused_kernels = false;
  auto off = model_value_and_grads(m, x, sigma, &key, probe);
  expect_equal(on, off, "fused_kernels on vs off");
  EXPECT_GT(on.size(), 10u);
  EXPECT_GT(on[0].second.abs().max().item<double>(), 0.0);
}

// Without a CUDA device the fused entries refuse with the reason; the activity report says so.
TEST(FusedOps, FusedEntriesRefuseCpuTensorsWithTheReason) {
  EXPECT_FALSE(fused_ops_active(torch::kCPU));
  const int64_t B = 2, L = 3, D = 8;
  auto x = torch::randn({B, L, D});
  auto message = [](const std::function<void()>& fn) -> std::string {
    try {
      fn();
    } catch (const sedd::Error& e) {
      return e.what();
    }
    return "";
  };
  const std::string why = fused_ops_built() ? "not on a CUDA device" : "no CUDA kernels";
  auto ln = message([&] { layer_norm_modulate_fused(x, torch::ones({D}), torch::zeros({B, 1, D}), torch::zeros({B, 1, D})); });
  EXPECT_NE(ln.find("layer_norm_modulate_fused"), std::string::npos) << ln;
  EXPECT_NE(ln.find(why), std::string::npos) << ln;
  auto gr = message([&] { gated_residual_fused(x, x, {}, torch::ones({B, 1, D}), 0, false, nullptr, 0); });
  EXPECT_NE(gr.find("gated_residual_fused"), std::string::npos) << gr;
  auto rot = message([&] { rotary_fused(x.view({B, L, 2, 4}), torch::ones({2})); });
  EXPECT_NE(rot.find("rotary_fused"), std::string::npos) << rot;
  // Shape errors name the shapes.
  auto bad = message([&] { layer_norm_modulate_fused(x, torch::ones({D}), torch::zeros({B, D}), torch::zeros({B, 1, D})); });
  EXPECT_NE(bad.find("[2, 1, 8]"), std::string::npos) << bad;
  EXPECT_NE(fused_ops_status().find("fused kernels"), std::string::npos);
  if (!fused_ops_built()) EXPECT_NE(fused_ops_status().find("not built"), std::string::npos);
}

// ---- GPU ---------------------------------------------------------------------------------------
// Tolerances (normalised error max|fused - reference| / max|reference|):
//   float32 storage: 2e-5 (different summation orders over D and L; the gated residual and the
//     rotary round exactly like LibTorch, so only the reductions and sincosf differ);
//   bf16 storage against the plain path on the same values in float32: 1e-2 (one bf16 rounding,
//     2^-8 relative, of the result on either side);
//   bf16 against the plain path in bf16 (rotary: LibTorch rounds cos, sin and each product to
//     bf16): 3e-2.

namespace {

struct DtypeCase {
  torch::ScalarType x, mod, out;
};

bool gpu() { return torch::cuda::is_available(); }

// [B, L, D] that expose indexing errors: D from 3 to 4100, never a power of two past 4, with and
// without D % 4 == 0 (vectorised and scalar rows), rows needing one or two chunks per thread and
// more than 512 threads; B * L never a multiple of 32; L = 1 with many batch rows.
const std::vector<std::array<int64_t, 3>>& row_shapes() {
  static const std::vector<std::array<int64_t, 3>> shapes{{3, 37, 200}, {2, 111, 66}, {5, 13, 1028}, {1, 1, 4},
                                                          {7, 3, 3},    {4, 29, 770}, {2, 17, 4100}, {2, 5, 2046},
                                                          {33, 1, 96}};
  return shapes;
}

Tensor cuda_randn(torch::IntArrayRef size, torch::ScalarType dtype) {
  return torch::randn(size).to(torch::kCUDA, dtype);
}

std::vector<Tensor> upcast(const std::vector<Tensor>& in) {
  std::vector<Tensor> out;
  for (const auto& t : in) out.push_back(t.defined() && t.is_floating_point() ? t.to(torch::kFloat) : t);
  return out;
}

}  // namespace

TEST(FusedOpsGpu, LayerNormModulateMatchesPlain) {
  if (!gpu()) GTEST_SKIP() << "no CUDA device";
  torch::manual_seed(10);
  const std::vector<DtypeCase> cases{{torch::kFloat, torch::kFloat, torch::kFloat},
                                     {torch::kFloat, torch::kBFloat16, torch::kBFloat16},  // the model under autocast
                                     {torch::kBFloat16, torch::kBFloat16, torch::kBFloat16},
                                     {torch::kBFloat16, torch::kFloat, torch::kFloat}};
  for (const auto& [B, L, D] : row_shapes()) {
    for (const auto& c : cases) {
      const bool low = c.x == torch::kBFloat16 || c.mod == torch::kBFloat16 || c.out == torch::kBFloat16;
      std::vector<Tensor> in{cuda_randn({B, L, D}, c.x) * 3 + 1, (1 + 0.3 * cuda_randn({D}, torch::kFloat)),
                             cuda_randn({B, 1, D}, c.mod), 0.5 * cuda_randn({B, 1, D}, c.mod)};
      const std::vector<std::string> names{"x", "weight", "shift", "scale"};
      auto probe = cuda_randn({B, L, D}, c.out);
      const auto out = c.out;
      auto fused = value_and_grads(
          [out](const std::vector<Tensor>& a) { return layer_norm_modulate_fused(a[0], a[1], a[2], a[3], out); }, in,
          names, probe);
      auto plain = value_and_grads(
          [](const std::vector<Tensor>& a) { return layer_norm_modulate_plain(a[0], a[1], a[2], a[3], torch::kFloat); },
          upcast(in), names, probe.to(torch::kFloat));
      const std::string what = fmt::format("[{}, {}, {}] x {} mod {} out {}", B, L, D, c10::toString(c.x),
                                           c10::toString(c.mod), c10::toString(c.out));
      EXPECT_EQ(fused[0].second.scalar_type(), c.out) << what;
      EXPECT_EQ(fused[1].second.scalar_type(), c.x) << what;
      expect_close(fused, plain, low ? 1e-2 : 2e-5, what);
    }
  }
}

TEST(FusedOpsGpu, GatedResidualMatchesPlainAndItsDropoutIsTheCpuMask) {
  if (!gpu()) GTEST_SKIP() << "no CUDA device";
  torch::manual_seed(11);
  const std::vector<DtypeCase> cases{{torch::kFloat, torch::kFloat, torch::kFloat},
                                     {torch::kFloat, torch::kBFloat16, torch::kFloat},  // the model under autocast
                                     {torch::kBFloat16, torch::kBFloat16, torch::kBFloat16}};
  int site = 0;
  for (const auto& [B, L, D] : row_shapes()) {
    for (const auto& c : cases) {
      for (int variant = 0; variant < 3; ++variant) {  // 0: bias + dropout, 1: dropout, 2: bias, eval
        const bool training = variant < 2, with_bias = variant != 1;
        const double p = 0.2;
        ++site;
        auto key = make_key(B, torch::kCUDA, 1000 + site);
        std::vector<Tensor> in{cuda_randn({B, L, D}, c.x), cuda_randn({B, L, D}, c.mod),
                               with_bias ? cuda_randn({D}, torch::kFloat) : Tensor(), cuda_randn({B, 1, D}, c.mod)};
        const std::vector<std::string> names{"x", "branch", "bias", "gate"};
        auto probe = cuda_randn({B, L, D}, c.out);
        auto fused = value_and_grads(
            [&](const std::vector<Tensor>& a) {
              return gated_residual_fused(a[0], a[1], a[2], a[3], p, training, &key, site);
            },
            in, names, probe);
        auto plain = value_and_grads(
            [&](const std::vector<Tensor>& a) {
              return gated_residual_plain(a[0], a[1], a[2], a[3], p, training, &key, site);
            },
            upcast(in), names, probe.to(torch::kFloat));
        const std::string what = fmt::format("[{}, {}, {}] x {} branch {} variant {}", B, L, D, c10::toString(c.x),
                                             c10::toString(c.mod), variant);
        EXPECT_EQ(fused[0].second.scalar_type(), c.out) << what;
        expect_close(fused, plain, c.out == torch::kBFloat16 || c.mod == torch::kBFloat16 ? 1e-2 : 2e-5, what);
      }
    }
    // The mask: zeros + 1 * dropout(1) keeps exactly the elements the CPU's keyed mask keeps.
    ++site;
    auto key = make_key(B, torch::kCUDA, 7 + site);
    DropoutKey cpu_key{key.seed, key.step, key.rows.cpu()};
    auto kept = gated_residual_fused(torch::zeros({B, L, D}, torch::kCUDA), torch::ones({B, L, D}, torch::kCUDA), {},
                                     torch::ones({B, 1, D}, torch::kCUDA), 0.35, true, &key, site);
    auto cpu_mask = dropout_keep_mask(cpu_key, site, 0.35, {B, L, D}, torch::kCPU);
    EXPECT_TRUE(torch::equal(kept.cpu() != 0, cpu_mask != 0)) << fmt::format("mask [{}, {}, {}]", B, L, D);
    EXPECT_TRUE(torch::equal(kept.cpu(), cpu_mask * static_cast<float>(1.0 / (1.0 - 0.35))));
  }
}

TEST(FusedOpsGpu, RotaryMatchesPlain) {
  if (!gpu()) GTEST_SKIP() << "no CUDA device";
  torch::manual_seed(12);
  // [B, L, H, Dh]: Dh = 64 (the model's), 16, 6 and 2 (scalar pairs), long sequences for large angles.
  const std::vector<std::array<int64_t, 4>> shapes{{2, 300, 3, 64}, {3, 37, 5, 16}, {2, 9, 3, 6}, {1, 1030, 1, 2}};
  for (const auto& [B, L, H, Dh] : shapes) {
    Rotary rot(Dh);
    rot->to(torch::kCUDA);
    for (auto dtype : {torch::kFloat, torch::kBFloat16}) {
      const std::string what = fmt::format("[{}, {}, {}, {}] {}", B, L, H, Dh, c10::toString(dtype));
      auto qkv = cuda_randn({B, L, 3, H, Dh}, dtype);
      auto probe = cuda_randn({B, L, H, Dh}, dtype);
      for (int64_t part : {0, 1}) {  // the strided q and k views of qkv, as the block takes them
        auto fused = value_and_grads(
            [&](const std::vector<Tensor>& a) { return rotary_fused(a[0].select(2, part), rot->inv_freq); }, {qkv},
            {"x"}, probe);
        auto plain32 = value_and_grads(
            [&](const std::vector<Tensor>& a) { return rotary_plain(a[0].select(2, part), rot->inv_freq); },
            upcast({qkv}), {"x"}, probe.to(torch::kFloat));
        EXPECT_TRUE(fused[0].second.is_contiguous()) << what;
        EXPECT_EQ(fused[0].second.scalar_type(), dtype) << what;
        expect_close(fused, plain32, dtype == torch::kFloat ? 2e-5 : 1e-2, what + " vs float32 plain");
        if (dtype == torch::kBFloat16) {
          auto plain_low = value_and_grads(
              [&](const std::vector<Tensor>& a) { return rotary_plain(a[0].select(2, part), rot->inv_freq); }, {qkv},
              {"x"}, probe);
          expect_close(fused, plain_low, 3e-2, what + " vs bf16 plain");
        }
      }
      // A contiguous input takes the same path.
      auto q = qkv.select(2, 0).contiguous();
      EXPECT_TRUE(torch::equal(rotary_fused(q, rot->inv_freq), rotary_fused(qkv.select(2, 0), rot->inv_freq))) << what;
    }
  }
}

// A whole DDiT, training with keyed dropout: fused kernels against the plain ops, in float32
// (tight: same masks, same math) and under bf16 autocast (bf16 tolerance), forward and every
// parameter's gradient; also the output layer's chosen-rows path.
TEST(FusedOpsGpu, WholeModelMatchesThePlainPath) {
  if (!gpu()) GTEST_SKIP() << "no CUDA device";
  ASSERT_TRUE(fused_ops_active(torch::Device(torch::kCUDA, 0))) << fused_ops_status();
  for (int64_t hidden : {96, 66}) {  // 96: vectorised rows; 66: scalar rows (and head dim 22)
    DDiT m(small_config(hidden, 3, 0.1));
    randomize(m, 20);
    m->to(torch::kCUDA);
    m->train();
    const int64_t B = 3, L = 50;
    auto x = torch::randint(m->cfg.vocab_dim(), {B, L}, torch::kLong).to(torch::kCUDA);
    auto sigma = (torch::rand({B}) + 0.1).to(torch::kCUDA);
    auto key = make_key(B, torch::kCUDA);
    auto probe = torch::randn({B, L, m->cfg.vocab_dim()}).to(torch::kCUDA);
    // float32: the same masks and the same math, so the two paths agree to float32 rounding.
    m->bf16 = false;
    m->fused_kernels = true;
    EXPECT_TRUE(m->uses_fused_kernels(x.device()));
    auto fused32 = model_value_and_grads(m, x, sigma, &key, probe);
    m->fused_kernels = false;
    auto plain32 = model_value_and_grads(m, x, sigma, &key, probe);
    expect_close(fused32, plain32, 1e-4, fmt::format("hidden {} float32", hidden));
    // bf16 autocast: both paths round their matmul inputs to bf16, so they differ by bf16 noise
    // (two bf16 runs disagree by a few percent on single gradient entries); the fused path must
    // stay as close to the float32 result as the plain bf16 path is.
    m->bf16 = true;
    m->fused_kernels = true;
    auto fused16 = model_value_and_grads(m, x, sigma, &key, probe);
    m->fused_kernels = false;
    auto plain16 = model_value_and_grads(m, x, sigma, &key, probe);
    for (bool outputs : {true, false}) {
      const double between = relative_l2_error(fused16, plain16, outputs);
      const double fused_err = relative_l2_error(fused16, plain32, outputs);
      const double plain_err = relative_l2_error(plain16, plain32, outputs);
      const std::string what = fmt::format("hidden {} bf16 {}", hidden, outputs ? "output" : "gradients");
      std::cout << what << ": fused vs plain " << between << ", vs float32: fused " << fused_err << ", plain "
                << plain_err << "\n";
      EXPECT_LE(between, outputs ? 2e-2 : 6e-2) << what;
      EXPECT_LE(fused_err, 1.5 * plain_err + 2e-3) << what;
      EXPECT_GT(fused_err, 0.0) << what << ": bf16 did not engage";
    }
    // Output features of chosen rows ([R, D] with per-row modulation).
    m->bf16 = false;
    m->eval();
    torch::NoGradGuard ng;
    auto hid = m->forward_hidden(x, sigma);
    auto rows = torch::tensor({0, 7, 49, 50, 149}, torch::kLong).to(torch::kCUDA);
    m->fused_kernels = true;
    auto f = m->output_features(hid, rows);
    m->fused_kernels = false;
    auto pl = m->output_features(hid, rows);
    EXPECT_LE(normalised_error(f, pl), 2e-5) << "output_features, hidden " << hidden;
  }
}

// bf16 attention of the DDiT shape (B, H, L, Dh = 64), laid out as the block lays it out, runs on
// the flash or cuDNN kernels, not the math or memory-efficient fallback.
TEST(FusedOpsGpu, AttentionOfTheModelShapeUsesFlashOrCudnn) {
  if (!gpu()) GTEST_SKIP() << "no CUDA device";
  const int64_t B = 4, L = 1024, H = 12, Dh = 64;
  auto qkv = torch::randn({B, L, 3, H, Dh}, torch::dtype(torch::kBFloat16).device(torch::kCUDA));
  auto q = qkv.select(2, 0).contiguous().transpose(1, 2), k = qkv.select(2, 1).contiguous().transpose(1, 2);
  auto v = qkv.select(2, 2).transpose(1, 2);
  for (bool grad : {false, true}) {
    auto qq = q.detach().requires_grad_(grad), kk = k.detach().requires_grad_(grad), vv = v.detach().requires_grad_(grad);
    const int64_t choice = at::_fused_sdp_choice(qq, kk, vv);
    std::cout << "scaled_dot_product_attention backend (requires_grad " << grad << "): " << choice
              << " (flash " << static_cast<int64_t>(at::SDPBackend::flash_attention) << ", cuDNN "
              << static_cast<int64_t>(at::SDPBackend::cudnn_attention) << ")\n";
    EXPECT_TRUE(choice == static_cast<int64_t>(at::SDPBackend::flash_attention) ||
                choice == static_cast<int64_t>(at::SDPBackend::cudnn_attention))
        << "backend " << choice;
  }
}

TEST(FusedOpsGpu, SelfCheckPassesAndTheOpsAreActive) {
  if (!gpu()) GTEST_SKIP() << "no CUDA device";
  const torch::Device dev(torch::kCUDA, 0);
  ASSERT_TRUE(fused_ops_built()) << "a CUDA machine should build the kernels (nvcc)";
  // The self-check leaves the global generator alone.
  torch::manual_seed(5);
  auto before = torch::rand({4});
  torch::manual_seed(5);
  EXPECT_EQ(fused_ops_self_check(dev), "");
  EXPECT_TRUE(torch::equal(torch::rand({4}), before));
  EXPECT_TRUE(fused_ops_active(dev));
  EXPECT_NE(fused_ops_status().find("active on cuda:0"), std::string::npos) << fused_ops_status();
  // The dispatchers take the kernels on the device (a fused result carries the Function's node).
  auto x = torch::randn({2, 5, 8}, torch::kCUDA).requires_grad_(true);
  auto y = layer_norm_modulate(x, torch::ones({8}, torch::kCUDA), torch::zeros({2, 1, 8}, torch::kCUDA),
                               torch::zeros({2, 1, 8}, torch::kCUDA));
  ASSERT_TRUE(y.grad_fn());
  EXPECT_NE(y.grad_fn()->name().find("LayerNormModulate"), std::string::npos) << y.grad_fn()->name();
}


namespace {

// True when fused_ops_status() names a launch that fell back for a real reason (not injected).
bool real_launch_fell_back() {
  const std::string status = fused_ops_status(), mark = "; plain fallback after: ";
  for (size_t at = status.find(mark); at != std::string::npos; at = status.find(mark, at + 1)) {
    const size_t end = status.find(mark, at + 1);
    if (status.substr(at, end == std::string::npos ? std::string::npos : end - at).find("injected") == std::string::npos)
      return true;
  }
  return false;
}

}  // namespace

// The model's real shapes: [8, 1024, 768] (SEDD-small's rows: each backward block walks several
// rows and the forward grid-stride loops wrap) in float32 and bf16, and rows of 8192 float32 (1024
// threads per block: the launch bound of the backward kernels). Against the plain path (float32:
// 5e-5, sums over 8192 rows in another order; bf16: 1e-2), and two runs bit for bit equal (no
// atomics). No launch may have fallen back to the plain path.
TEST(FusedOpsGpu, RealShapesMatchPlainAndRepeatExactly) {
  if (!gpu()) GTEST_SKIP() << "no CUDA device";
  ASSERT_TRUE(fused_ops_active(torch::Device(torch::kCUDA, 0))) << fused_ops_status();
  torch::manual_seed(13);
  struct Case {
    int64_t B, L, D;
    torch::ScalarType mod;  // the modulation / branch dtype (bf16: the model under autocast)
  };
  for (const Case& c : {Case{8, 1024, 768, torch::kFloat}, Case{8, 1024, 768, torch::kBFloat16},
                        Case{4, 256, 8192, torch::kFloat}}) {
    const bool low = c.mod == torch::kBFloat16;
    const double tol = low ? 1e-2 : 5e-5;
    const std::string what = fmt::format("[{}, {}, {}] {}", c.B, c.L, c.D, c10::toString(c.mod));
    std::vector<Tensor> ln_in{cuda_randn({c.B, c.L, c.D}, torch::kFloat) * 3 + 1,
                              1 + 0.3 * cuda_randn({c.D}, torch::kFloat), cuda_randn({c.B, 1, c.D}, c.mod),
                              0.5 * cuda_randn({c.B, 1, c.D}, c.mod)};
    const std::vector<std::string> ln_names{"x", "weight", "shift", "scale"};
    auto ln_probe = cuda_randn({c.B, c.L, c.D}, c.mod);
    const auto out = c.mod;
    auto ln_fused = [out](const std::vector<Tensor>& a) { return layer_norm_modulate_fused(a[0], a[1], a[2], a[3], out); };
    auto a = value_and_grads(ln_fused, ln_in, ln_names, ln_probe);
    auto b = value_and_grads(ln_fused, ln_in, ln_names, ln_probe);
    expect_equal(a, b, "layer_norm_modulate twice " + what);
    auto plain = value_and_grads(
        [](const std::vector<Tensor>& v) { return layer_norm_modulate_plain(v[0], v[1], v[2], v[3], torch::kFloat); },
        upcast(ln_in), ln_names, ln_probe.to(torch::kFloat));
    expect_close(a, plain, tol, "layer_norm_modulate " + what);

    auto key = make_key(c.B, torch::kCUDA, 31);
    std::vector<Tensor> gr_in{cuda_randn({c.B, c.L, c.D}, torch::kFloat), cuda_randn({c.B, c.L, c.D}, c.mod),
                              cuda_randn({c.D}, torch::kFloat), cuda_randn({c.B, 1, c.D}, c.mod)};
    const std::vector<std::string> gr_names{"x", "branch", "bias", "gate"};
    auto gr_probe = cuda_randn({c.B, c.L, c.D}, torch::kFloat);
    auto gr = [&key](bool fused) -> Op {
      return [fused, &key](const std::vector<Tensor>& v) {
        return fused ? gated_residual_fused(v[0], v[1], v[2], v[3], 0.1, true, &key, 4)
                     : gated_residual_plain(v[0], v[1], v[2], v[3], 0.1, true, &key, 4);
      };
    };
    auto ga = value_and_grads(gr(true), gr_in, gr_names, gr_probe);
    auto gb = value_and_grads(gr(true), gr_in, gr_names, gr_probe);
    expect_equal(ga, gb, "gated_residual twice " + what);
    expect_close(ga, value_and_grads(gr(false), upcast(gr_in), gr_names, gr_probe), tol, "gated_residual " + what);
  }
  // Rotary at the model's q shape [8, 1024, 12, 64], a strided view of qkv.
  Rotary rot(64);
  rot->to(torch::kCUDA);
  for (auto dtype : {torch::kFloat, torch::kBFloat16}) {
    auto qkv = cuda_randn({8, 1024, 3, 12, 64}, dtype);
    auto probe = cuda_randn({8, 1024, 12, 64}, dtype);
    auto op = [&](bool fused) -> Op {
      return [fused, &rot](const std::vector<Tensor>& v) {
        return fused ? rotary_fused(v[0].select(2, 1), rot->inv_freq) : rotary_plain(v[0].select(2, 1), rot->inv_freq);
      };
    };
    auto a = value_and_grads(op(true), {qkv}, {"x"}, probe);
    expect_equal(a, value_and_grads(op(true), {qkv}, {"x"}, probe), std::string("rotary twice ") + c10::toString(dtype));
    expect_close(a, value_and_grads(op(false), upcast({qkv}), {"x"}, probe.to(torch::kFloat)),
                 dtype == torch::kFloat ? 2e-5 : 1e-2, std::string("rotary ") + c10::toString(dtype));
  }
  EXPECT_FALSE(real_launch_fell_back()) << fused_ops_status();
}

// A fused kernel that fails to launch (injected here: as CUDA refusing the block shape) makes the
// dispatcher compute that call with the plain ops, and the backward of a fused forward compute
// its gradients with them; the warning names the op and the error.
TEST(FusedOpsGpu, FailedLaunchFallsBackToThePlainPath) {
  if (!gpu()) GTEST_SKIP() << "no CUDA device";
  ASSERT_TRUE(fused_ops_active(torch::Device(torch::kCUDA, 0))) << fused_ops_status();
  torch::manual_seed(14);
  const int64_t B = 2, L = 7, D = 64;
  auto key = make_key(B, torch::kCUDA, 5);
  std::vector<Tensor> gr_in{cuda_randn({B, L, D}, torch::kFloat), cuda_randn({B, L, D}, torch::kFloat),
                            cuda_randn({D}, torch::kFloat), cuda_randn({B, 1, D}, torch::kFloat)};
  const std::vector<std::string> gr_names{"x", "branch", "bias", "gate"};
  auto probe = cuda_randn({B, L, D}, torch::kFloat);
  auto plain = value_and_grads(
      [&](const std::vector<Tensor>& v) { return gated_residual_plain(v[0], v[1], v[2], v[3], 0.2, true, &key, 3); },
      gr_in, gr_names, probe);

  // Forward: the dispatcher's launch fails, the result is the plain op's.
  testing::internal::CaptureStderr();
  fused_ops_inject_launch_failures(1);
  auto y = gated_residual(gr_in[0], gr_in[1], gr_in[2], gr_in[3], 0.2, true, &key, 3);
  std::string err = testing::internal::GetCapturedStderr();
  EXPECT_NE(err.find("gated_residual: CUDA kernel launch failed: injected by a test"), std::string::npos) << err;
  EXPECT_TRUE(torch::equal(y, plain[0].second));

  // Backward: the forward ran fused, its backward kernel fails, the gradients are the plain ones.
  testing::internal::CaptureStderr();
  auto fell_back = value_and_grads(
      [&](const std::vector<Tensor>& v) {
        auto out = gated_residual(v[0], v[1], v[2], v[3], 0.2, true, &key, 3);
        EXPECT_NE(out.grad_fn()->name().find("GatedResidual"), std::string::npos) << out.grad_fn()->name();
        fused_ops_inject_launch_failures(1);  // after the forward: the backward's launch fails
        return out;
      },
      gr_in, gr_names, probe);
  err = testing::internal::GetCapturedStderr();
  EXPECT_NE(err.find("gated_residual backward: CUDA kernel launch failed: injected by a test"), std::string::npos) << err;
  expect_close(fell_back, plain, 2e-5, "gated_residual with a failed backward launch");

  // The same for the LayerNorm and the rotary backward.
  std::vector<Tensor> ln_in{cuda_randn({B, L, D}, torch::kFloat), 1 + 0.3 * cuda_randn({D}, torch::kFloat),
                            cuda_randn({B, 1, D}, torch::kFloat), cuda_randn({B, 1, D}, torch::kFloat)};
  const std::vector<std::string> ln_names{"x", "weight", "shift", "scale"};
  auto ln_plain = value_and_grads(
      [](const std::vector<Tensor>& v) { return layer_norm_modulate_plain(v[0], v[1], v[2], v[3]); }, ln_in, ln_names,
      probe);
  auto ln_back = value_and_grads(
      [](const std::vector<Tensor>& v) {
        auto out = layer_norm_modulate(v[0], v[1], v[2], v[3]);
        fused_ops_inject_launch_failures(1);
        return out;
      },
      ln_in, ln_names, probe);
  expect_close(ln_back, ln_plain, 2e-5, "layer_norm_modulate with a failed backward launch");
  Rotary rot(16);
  rot->to(torch::kCUDA);
  auto q = cuda_randn({B, L, 4, 16}, torch::kFloat);
  auto rot_probe = cuda_randn({B, L, 4, 16}, torch::kFloat);
  auto rot_plain = value_and_grads([&](const std::vector<Tensor>& v) { return rotary_plain(v[0], rot->inv_freq); }, {q},
                                   {"x"}, rot_probe);
  auto rot_back = value_and_grads(
      [&](const std::vector<Tensor>& v) {
        auto out = rotary(v[0], rot->inv_freq);
        fused_ops_inject_launch_failures(1);
        return out;
      },
      {q}, {"x"}, rot_probe);
  expect_close(rot_back, rot_plain, 2e-5, "rotary with a failed backward launch");
  fused_ops_inject_launch_failures(0);
  EXPECT_NE(fused_ops_status().find("plain fallback after: gated_residual backward"), std::string::npos)
      << fused_ops_status();
  EXPECT_TRUE(fused_ops_active(torch::Device(torch::kCUDA, 0))) << "one failed launch turned the kernels off";
}

}  // namespace sedd::fused_ops_test
