// Block diffusion golden reference: our mask, network, SUBS log-probabilities, time draws, corruption,
// training loss, nucleus filter, sampler steps and clipped-schedule search against vectors from the
// BD3-LM authors' code, tests/data/bd3_reference.h5 (tests/data/make_bd3_reference.py; docs/DESIGN.md,
// "Block diffusion").
#include <gtest/gtest.h>

#include <fmt/format.h>

#include <cstdlib>

#include "golden.h"
#include "io/hdf5.h"
#include "model/weights.h"
#include "objectives/bd3.h"
#include "objectives/score.h"
#include "test_util.h"

using namespace sedd;
using namespace sedd::test;

namespace {

std::string bd3_golden_path() {
  if (const char* p = std::getenv("SEDD_BD3_GOLDEN")) return p;
  return SEDD_SOURCE_DIR "/tests/data/bd3_reference.h5";
}

constexpr double kTol = 1e-12;  // float64 throughout: relative

ModelConfig golden_config(const h5::File& f, int64_t block) {
  ModelConfig m = objective_config("bd3", 1000, 0);
  m.tokens = f.attr_int("/model", "tokens");
  m.length = f.attr_int("/model", "length");
  m.hidden_size = f.attr_int("/model", "hidden_size");
  m.n_heads = f.attr_int("/model", "n_heads");
  m.n_blocks = f.attr_int("/model", "n_blocks");
  m.cond_dim = f.attr_int("/model", "cond_dim");
  m.block_size = block;
  m.time_conditioning = false;
  m.scale_by_sigma = false;
  m.noise = NoiseConfig{"loglinear"};
  return m;
}

DDiT golden_model(const h5::File& f, int64_t block) {
  DDiT model(golden_config(f, block));
  model->to(torch::kDouble);
  model->eval();
  StateDict sd;
  const std::string prefix = "/model/params/";
  for (const auto& ds : list_datasets(f.path()))
    if (ds.rfind(prefix, 0) == 0) sd[ds.substr(prefix.size())] = f.read(ds, torch::kDouble);
  load_state_dict(*model, sd, f.path());
  return model;
}

double rel(const torch::Tensor& a, const torch::Tensor& b) {
  return max_rel_error(a.to(torch::kDouble).reshape({-1}), b.to(torch::kDouble).reshape({-1}));
}

TEST(Bd3Golden, MaskIsTheirsBitForBit) {
  h5::File f(bd3_golden_path(), h5::Mode::Read);
  const int64_t L = f.attr_int("/", "length");
  for (int64_t block : {1, 2, 4, 16}) {
    auto theirs = f.read(fmt::format("/mask/block{}", block), torch::kLong).to(torch::kBool);
    EXPECT_TRUE(block_diffusion_mask(L, block).equal(theirs)) << "block " << block;
  }
}

TEST(Bd3Golden, NetworkAndSubsLogProbabilities) {
  h5::File f(bd3_golden_path(), h5::Mode::Read);
  auto x0 = f.read("/model/input/x0", torch::kLong), xt = f.read("/model/input/xt", torch::kLong);
  const int64_t B = x0.size(0), L = x0.size(1);
  for (int64_t block : {1, 4, 16}) {
    const std::string g = fmt::format("/model/block{}", block);
    for (auto form : {BlockAttention::Split, BlockAttention::Mask}) {
      DDiT model = golden_model(f, block);
      model->set_block_attention(form);
      torch::NoGradGuard ng;
      auto raw = model->forward_raw(torch::cat({xt, x0}, 1), torch::zeros({B}, torch::kDouble)).narrow(1, 0, L);
      auto logits = f.read(g + "/logits", torch::kDouble);
      const double e = rel(raw, logits);
      std::cout << "block " << block << (form == BlockAttention::Split ? " split" : " mask") << ": logits rel err "
                << e << "\n";
      EXPECT_LT(e, kTol) << g;
      // SUBS: their masked rows over the 49 tokens (the mask column holds -1e6 - logsumexp).
      DDiTScore score(model, false);
      score.evaluate_with_clean(xt, torch::zeros({B}, torch::kDouble), x0);
      auto rows = (xt.reshape({-1}) == model->cfg.tokens).nonzero().squeeze(1);
      auto theirs = f.read(g + "/log_probs", torch::kDouble).reshape({B * L, -1}).index_select(0, rows);
      EXPECT_LT(rel(score.rows(rows), theirs.narrow(1, 0, model->cfg.tokens)), kTol) << g;
    }
  }
}

TEST(Bd3Golden, TimeDrawsCorruptionAndLoss) {
  h5::File f(bd3_golden_path(), h5::Mode::Read);
  for (const char* name : {"block4", "block4_clip", "block1", "block16"}) {
    const std::string g = fmt::format("/sample_t/{}", name);
    auto eps = f.read(g + "/eps", torch::kDouble);
    const int64_t block = f.attr_int(g, "block_size");
    const double lo = f.attr_double(g, "eps_min"), hi = f.attr_double(g, "eps_max");
    auto t = bd3_times(eps, torch::arange(eps.size(0)), eps.size(0), true, lo, hi);
    auto theirs = f.read(g + "/t", torch::kDouble);
    if (theirs.size(1) != t.size(1)) t = t.repeat_interleave(block, 1);
    EXPECT_LT(rel(t, theirs), kTol) << g;
  }
  for (int64_t block : {1, 4, 16}) {
    const std::string g = fmt::format("/loss/block{}", block);
    DDiT model = golden_model(f, block);
    if (block == 1) model->cfg.clip = "1,1";
    auto x0 = f.read(g + "/x0", torch::kLong), u = f.read(g + "/u", torch::kDouble);
    auto eps = f.read(g + "/eps", torch::kDouble);
    const auto [lo, hi] = bd3_clip(model->cfg);
    const int64_t B = x0.size(0), L = x0.size(1);
    auto t = bd3_times(eps, torch::arange(B), B, true, lo, hi).repeat_interleave(L / eps.size(1), 1);
    EXPECT_LT(rel(t, f.read(g + "/t", torch::kDouble)), kTol) << g;
    auto xt = bd3_corrupt(x0, t, u, model->cfg.tokens);
    EXPECT_TRUE(xt.equal(f.read(g + "/xt", torch::kLong))) << g;
    for (bool fused : {true, false}) {
      LossOptions o;
      o.fused = fused;
      auto per_seq = bd3_sequence_loss(model, xt, x0, t, nullptr, o).detach();
      auto nlls = f.read(g + "/nlls", torch::kDouble);
      EXPECT_LT(rel(per_seq, nlls.sum(1)), kTol) << g;
      EXPECT_LT(rel(per_seq.sum() / (B * L), f.read(g + "/loss", torch::kDouble)), kTol) << g << ": their token mean";
      EXPECT_LT(rel(per_seq.sum() / (B * (L - 1)), f.read(g + "/eval_loss", torch::kDouble)), kTol)
          << g << ": their evaluation, position 0 unscored";
    }
    auto blocks = bd3_block_losses(model, xt, x0, t, block);
    EXPECT_LT(rel(blocks, f.read(g + "/nlls", torch::kDouble).view({B, L / block, block}).mean(2)), kTol) << g;
  }
}

TEST(Bd3Golden, NucleusAndSamplerSteps) {
  h5::File f(bd3_golden_path(), h5::Mode::Read);
  const double top_p = f.attr_double("/nucleus", "nucleus_p");
  auto p = f.read("/nucleus/p_x0", torch::kDouble);
  const int64_t V = p.size(-1);
  EXPECT_LT(rel(bd3_nucleus(p.reshape({-1, V}), top_p), f.read("/nucleus/out", torch::kDouble)), kTol);
  // ddpm: the categorical weights of one step.
  {
    auto x = f.read("/ddpm/x", torch::kLong), p0 = f.read("/ddpm/p_x0", torch::kDouble);
    auto t = f.read("/ddpm/t", torch::kDouble);
    const double dt = f.attr_double("/ddpm", "dt");
    auto theirs = f.read("/ddpm/q_xs", torch::kDouble);
    for (int64_t b = 0; b < x.size(0); ++b) {
      const double tb = t[b][0].item<double>();
      auto q = bd3_ddpm_weights(p0[b].narrow(1, 0, V - 1), tb, tb - dt);
      EXPECT_LT(rel(q, theirs[b]), kTol) << "row " << b;
    }
  }
  // First hitting: their uniform position draw k of n masked is our u = (k + 1/2) / n; the committed
  // token is the one their Gumbel draw took, with positive probability under the filtered p(x0).
  {
    auto x = f.read("/first_hitting/x", torch::kLong), x_new = f.read("/first_hitting/x_new", torch::kLong);
    auto p0 = f.read("/first_hitting/p_x0", torch::kDouble), k = f.read("/first_hitting/index_draw", torch::kLong);
    const int64_t T = p0.size(1), C = x.size(1) - T, mask = V - 1;
    auto block = x.narrow(1, C, T), masked = block == mask;
    auto n = masked.sum(1).to(torch::kDouble);
    auto pos = bd3_first_hitting_position(masked, (k.to(torch::kDouble) + 0.5) / n);
    auto changed = (x_new != x).to(torch::kLong).argmax(1) - C;
    EXPECT_TRUE(pos.equal(changed)) << pos << changed;
    EXPECT_TRUE((x_new != x).sum(1).eq(1).all().item<bool>()) << "one position per call";
    for (int64_t b = 0; b < x.size(0); ++b) {
      const int64_t token = x_new[b][C + pos[b].item<int64_t>()].item<int64_t>();
      EXPECT_GT(p0[b][pos[b].item<int64_t>()][token].item<double>(), 0.0);
    }
  }
}

TEST(Bd3Golden, ClipSearchGridAndChoice) {
  h5::File f(bd3_golden_path(), h5::Mode::Read);
  auto grid = f.read("/clip_search/grid", torch::kDouble);
  const auto windows = bd3_clip_windows();
  ASSERT_EQ(static_cast<int64_t>(windows.size()), grid.size(0));
  for (size_t i = 0; i < windows.size(); ++i) {
    EXPECT_EQ(windows[i].first, grid[i][0].item<double>()) << "window " << i;
    EXPECT_EQ(windows[i].second, grid[i][1].item<double>()) << "window " << i;
  }
  // Their statistic: per window, the sum over validation batches of the unbiased variance of every
  // per-block loss of the batch (all ranks gathered); the least wins.
  auto losses = f.read("/clip_search/losses", torch::kDouble);  // [K, batches, B, N]
  auto variance = losses.flatten(2).var(2).sum(1);
  EXPECT_LT(rel(variance, f.read("/clip_search/variance", torch::kDouble)), kTol);
  std::vector<double> v(variance.data_ptr<double>(), variance.data_ptr<double>() + variance.numel());
  const size_t best = bd3_pick_window(v);
  EXPECT_EQ(static_cast<int64_t>(best), f.attr_int("/clip_search", "chosen_index"));
  auto chosen = f.read("/clip_search/chosen", torch::kDouble);
  EXPECT_EQ(windows[best].first, chosen[0].item<double>());
  EXPECT_EQ(windows[best].second, chosen[1].item<double>());
}

}  // namespace
