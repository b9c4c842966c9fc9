// Block diffusion (Arriola et al. 2025, BD3-LM; docs/DESIGN.md, "Block diffusion"): the sequence is
// L / L' blocks of L' tokens, generated left to right, each by masked diffusion conditioned on the
// clean blocks before it:
//   -log p(x) <= sum_b E_t [ (1/t) sum_{masked l in block b} -log p(x0_l | x_t^b, x0^{<b}) ],
// t uniform on [beta, omega] per block (masking probability t, weight 1/t: the authors' log-linear
// schedule as their bd3 code reads it). The network reads x_t beside x_0 (2L positions) through the
// block-diffusion mask (model/block_attention.h) and gives logits of the clean token (SUBS). L' = 1
// with beta = omega = 1 is next-token cross entropy, L' = L masked diffusion at twice the compute.
// Position 0 stays clean and unscored, as the authors' ignore_bos. Sampling: block by block from
// all-mask, by first hitting (one position per network call) or ddpm steps, the clean blocks' keys
// and values cached (objectives/score.h), any length (a sliding window of whole blocks).
#include "objectives/bd3.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>

#include "io/error.h"
#include "objectives/rows.h"

namespace sedd {

namespace {

std::pair<double, double> parse_clip(const std::string& text) {
  const auto comma = text.find(',');
  SEDD_CHECK(comma != std::string::npos, "diffusion.clip must be 'beta,omega' (two numbers), got '{}'", text);
  auto number = [&](const std::string& part) {
    char* end = nullptr;
    const double v = std::strtod(part.c_str(), &end);
    SEDD_CHECK(!part.empty() && end && *end == '\0' && std::isfinite(v),
               "diffusion.clip must be 'beta,omega' (two numbers), got '{}'", text);
    return v;
  };
  return {number(text.substr(0, comma)), number(text.substr(comma + 1))};
}

}  // namespace

std::pair<double, double> bd3_clip(const ModelConfig& m) {
  if (!m.clip.empty()) return parse_clip(m.clip);
  return m.block_size == 1 ? std::pair{1.0, 1.0} : std::pair{1e-3, 1.0};
}

std::string bd3_clip_text(double beta, double omega) { return fmt::format("{},{}", beta, omega); }

torch::Tensor bd3_times(const torch::Tensor& eps, const torch::Tensor& rows, int64_t G, bool stratified, double beta,
                        double omega) {
  auto t = eps.to(torch::kDouble);
  if (beta >= 1 && omega >= 1) return torch::ones_like(t);
  if (stratified) {
    const int64_t N = t.size(1);
    auto block = torch::arange(N, t.options()).unsqueeze(0);
    auto offset = (rows.to(t.options()).unsqueeze(1) * static_cast<double>(N) + block) / static_cast<double>(G * N);
    t = torch::remainder(t / static_cast<double>(G * N) + offset, 1.0);
  }
  return t * (omega - beta) + beta;
}

torch::Tensor bd3_corrupt(const torch::Tensor& x0, const torch::Tensor& t, const torch::Tensor& u, int64_t mask) {
  auto xt = torch::where(u <= t, torch::full_like(x0, mask), x0);
  xt.select(1, 0).copy_(x0.select(1, 0));
  return xt;
}

torch::Tensor bd3_sequence_loss(DDiT& model, const torch::Tensor& xt, const torch::Tensor& x0, const torch::Tensor& t,
                                const DropoutKey* dropout, const LossOptions& o) {
  const auto dtype = model->vocab_embed->embedding.scalar_type();
  const int64_t B = xt.size(0), L = xt.size(1), N = model->cfg.tokens;
  PendingMaskedRows masked(xt, N);
  DDiTHidden hid = model->forward_hidden(torch::cat({xt, x0}, 1), torch::zeros({B}, xt.options().dtype(dtype)), dropout);
  auto rows = masked.rows();
  auto net_rows = block_diffusion_xt_rows(rows, L);
  auto weight = 1.0 / t.to(torch::kDouble).reshape({-1}).index_select(0, rows);
  return weighted_cross_entropy(model, hid, net_rows, x0.reshape({-1}).index_select(0, rows), weight, B, o).to(dtype);
}

torch::Tensor bd3_block_losses(DDiT& model, const torch::Tensor& xt, const torch::Tensor& x0, const torch::Tensor& t,
                               int64_t block) {
  torch::NoGradGuard ng;
  const int64_t B = xt.size(0), L = xt.size(1), N = model->cfg.tokens;
  DDiTHidden hid = model->forward_hidden(torch::cat({xt, x0}, 1), torch::zeros({B}, torch::kDouble).to(xt.device()));
  auto rows = (xt.reshape({-1}) == N).nonzero().squeeze(1);
  auto net_rows = block_diffusion_xt_rows(rows, L);
  auto logp = torch::log_softmax(model->output_logits(model->output_features(hid, net_rows)).narrow(1, 0, N).to(torch::kDouble), 1);
  auto nll = -logp.gather(1, x0.reshape({-1}).index_select(0, rows).unsqueeze(1)).squeeze(1) /
             t.to(torch::kDouble).reshape({-1}).index_select(0, rows);
  auto per_position = torch::zeros({B * L}, nll.options()).index_copy_(0, rows, nll);
  return per_position.view({B, L / block, block}).mean(2);
}

torch::Tensor bd3_nucleus(const torch::Tensor& p, double top_p) {
  if (top_p >= 1) return p;
  auto sorted = p.sort(-1, /*descending=*/true);
  auto probs = std::get<0>(sorted), order = std::get<1>(sorted);
  auto keep = probs.cumsum(-1) <= top_p;
  keep.narrow(-1, 0, 1).fill_(true);
  auto kept = torch::zeros_like(p).scatter(-1, order, probs * keep.to(probs.scalar_type()));
  return kept / kept.sum(-1, true);
}

torch::Tensor bd3_first_hitting_position(const torch::Tensor& masked, const torch::Tensor& u) {
  auto counts = masked.sum(1);
  auto pick = (u.to(torch::kDouble) * counts.to(torch::kDouble)).floor().to(torch::kLong).clamp_max(counts - 1);
  auto rank = masked.to(torch::kLong).cumsum(1) - 1;
  return (masked & (rank == pick.unsqueeze(1))).to(torch::kLong).argmax(1);
}

torch::Tensor bd3_ddpm_weights(const torch::Tensor& p0, double t, double s) {
  const double stay = s / t;  // the authors' move_chance_s / move_chance_t (move chance t)
  return torch::cat({p0 * (1 - stay), torch::full({p0.size(0), 1}, stay, p0.options())}, 1);
}

std::vector<std::pair<double, double>> bd3_clip_windows() {
  const double eps = 1e-3, delta = 0.05;
  std::vector<std::pair<double, double>> windows = {{eps, 1.0}};
  for (double width : {0.5, 0.6, 0.7, 0.8, 0.9}) {
    // Their torch.arange(0, 1 - width + delta, delta) in float32, clamped below at eps.
    auto start = torch::arange(0.0, 1 - width + delta, delta, torch::kFloat);
    auto lo = start.clamp_min(eps), hi = (start + width).clamp_min(eps);
    for (int64_t i = 0; i < start.size(0); ++i) windows.emplace_back(lo[i].item<double>(), hi[i].item<double>());
  }
  return windows;
}

size_t bd3_pick_window(const std::vector<double>& variance) {
  return static_cast<size_t>(std::min_element(variance.begin(), variance.end()) - variance.begin());
}

namespace {

// Entropy (nats) of the token counts of each row of x [B, n].
std::vector<double> token_entropy(const torch::Tensor& x) {
  std::vector<double> out;
  auto rows = x.cpu();
  for (int64_t b = 0; b < rows.size(0); ++b) {
    auto counts = std::get<2>(torch::_unique2(rows[b], false, false, true)).to(torch::kDouble);
    auto p = counts / counts.sum();
    out.push_back(-(p * p.log()).sum().item<double>());
  }
  return out;
}

class Bd3 final : public Objective {
 public:
  std::string name() const override { return "bd3"; }
  NetworkShape network(const ModelConfig& m) const override {
    NetworkShape s{false, true, false};
    s.block_size = std::max<int64_t>(m.block_size, 1);
    return s;
  }
  void check(const ModelConfig& m) const override {
    SEDD_CHECK(m.graph == "absorb", "diffusion.objective = bd3 is block masked diffusion: it needs diffusion.graph = absorb");
    refuse_score_scaling(m, name());
    SEDD_CHECK(!m.time_conditioning,
               "diffusion.objective = bd3 draws one time per block, so the network takes none: set "
               "model.time_conditioning = false");
    SEDD_CHECK(m.block_size >= 1, "diffusion.block_size must be at least 1 for bd3, got {}", m.block_size);
    SEDD_CHECK(m.length % m.block_size == 0,
               "diffusion.block_size = {} does not divide the sequence length {} (data.seq_len)", m.block_size,
               m.length);
    const auto [beta, omega] = bd3_clip(m);
    const bool exact = m.block_size == 1 && beta == 1 && omega == 1;
    SEDD_CHECK(beta > 0 && beta <= 1 && omega > 0 && omega <= 1,
               "diffusion.clip = {},{}: both ends of the window must lie in (0, 1]", beta, omega);
    SEDD_CHECK(exact || beta < omega,
               "diffusion.clip = {},{}: beta must be below omega (beta = omega = 1 only with diffusion.block_size = 1, "
               "the exact next-token loss)",
               beta, omega);
  }
  void refuse_own_settings(const ModelConfig& m) const override {
    SEDD_CHECK(m.block_size == 0, "diffusion.block_size belongs to block diffusion; it is ignored by '{}': remove it",
               m.objective);
    SEDD_CHECK(m.clip.empty(), "diffusion.clip belongs to block diffusion; it is ignored by '{}': remove it",
               m.objective);
  }
  // The authors' bd3lm recipe (configs/algo/bd3lm.yaml, config.yaml): MDLM's.
  std::vector<std::pair<std::string, std::string>> defaults(const ModelConfig&) const override {
    return masked_diffusion_defaults();
  }
  void fingerprint(const ModelConfig& m, double, nlohmann::json& f) const override {
    f["diffusion.block_size"] = m.block_size;
    f["diffusion.clip"] = m.clip;
  }
  std::string describe(const ModelConfig& m) const override { return fmt::format("bd3-{}", m.block_size); }

  TrainingDraw draw(const Process& p, const torch::Tensor& x0, const LossDraws& d) const override {
    const int64_t L = x0.size(1), b = p.model.block_size, N = L / b;
    const auto [beta, omega] = bd3_clip(p.model);
    auto eps = keyed_uniform(RandomStream{d.seed, purpose::kTrainTime, d.step}, d.rows, N, torch::kDouble);
    auto t = bd3_times(eps, d.rows, std::max<int64_t>(d.batch, x0.size(0)), d.sampling == "stratified", beta, omega)
                 .repeat_interleave(b, 1);
    auto u = keyed_uniform(training_corruption(d).move, d.rows, L, torch::kDouble);
    return {t, torch::zeros({x0.size(0)}, t.options()), bd3_corrupt(x0, t, u, p.graph.tokens())};
  }
  torch::Tensor loss(DDiT& model, const Process&, const torch::Tensor& x0, const TrainingDraw& d,
                     const DropoutKey* dropout, const LossOptions& o) const override {
    return bd3_sequence_loss(model, d.xt, x0, d.t, dropout, o);
  }
  bool loss_on_masked_rows(const ModelConfig&) const override { return true; }
  std::vector<ModelConfig> schedule_candidates(const ModelConfig& m) const override {
    std::vector<ModelConfig> out;
    if (m.block_size == 1) return out;  // the exact loss has nothing to clip
    for (const auto& [beta, omega] : bd3_clip_windows()) {
      out.push_back(m);
      out.back().clip = bd3_clip_text(beta, omega);
    }
    return out;
  }
  torch::Tensor group_losses(DDiT& model, const Process& p, const torch::Tensor& x0,
                             const TrainingDraw& d) const override {
    return bd3_block_losses(model, d.xt, x0, d.t, p.model.block_size);
  }

  // The bound: one time per block, stratified within the sequence (t_b = frac(u + b / N) on the
  // window (1e-3, 1), as the authors evaluate), position 0 clean and unscored.
  bool exact(const ModelConfig& m) const override { return m.block_size == 1; }
  torch::Tensor exact_nll(const Process& p, ScoreModel& model, const torch::Tensor& x0, const torch::Tensor& rows,
                          int64_t chunk) const override {
    const int64_t B = x0.size(0), L = x0.size(1);
    auto dopts = torch::TensorOptions().dtype(torch::kDouble).device(x0.device());
    auto xt = bd3_corrupt(x0, torch::ones({B, L}, dopts), torch::zeros({B, L}, dopts), p.graph.tokens());
    model.evaluate_with_clean(xt, torch::zeros({B}, dopts), x0);
    return clean_token_nll(model, x0, rows.index_select(0, (torch::remainder(rows, L) != 0).nonzero().squeeze(1)), chunk);
  }
  BoundPoint bound_point(const Process& p, const torch::Tensor& u, const torch::Tensor& x0,
                         const KeyedCorruption& k) const override {
    const int64_t B = x0.size(0), L = x0.size(1), b = p.model.block_size, N = L / b;
    auto dopts = torch::TensorOptions().dtype(torch::kDouble).device(x0.device());
    auto shift = torch::arange(N, dopts).unsqueeze(0) / static_cast<double>(N);
    auto t = (torch::remainder(u.to(dopts).unsqueeze(1) + shift, 1.0) * (1 - 1e-3) + 1e-3).repeat_interleave(b, 1);
    auto draws = keyed_uniform(k.move, k.rows, L, torch::kDouble, k.col_offset);
    BoundPoint pt;
    pt.u = u;
    pt.sigma = pt.conditioning = torch::zeros({B}, dopts);
    pt.xt = bd3_corrupt(x0, t, draws, p.graph.tokens());
    pt.clean = x0;
    pt.weight = torch::ones({B}, dopts);
    pt.position_weight = 1.0 / t;
    return pt;
  }
  bool bound_on_masked_rows(const Process&) const override { return true; }
  torch::Tensor bound_terms(const Process&, const BoundPoint&, const torch::Tensor& out, const torch::Tensor&,
                            const torch::Tensor&, const torch::Tensor& x0_rows) const override {
    return -out.gather(1, x0_rows.unsqueeze(1)).squeeze(1);
  }
  double prior_nats_per_token(const Process&) const override { return 0.0; }  // t = 1 masks every position
  int64_t unscored_positions(const ModelConfig&) const override { return 1; }

  std::string title() const override { return "bd3 (block diffusion)"; }
  std::string sampling_manner() const override { return "block by block"; }
  std::vector<std::string> sampler_options() const override {
    return {"top-p", "block-sampler", "stop-at-eot", "stop-entropy"};
  }
  bool samples_any_length() const override { return true; }
  std::string sampler_name(const SamplerConfig& cfg) const override { return cfg.block_sampler; }
  int64_t sampler_steps(const SamplerConfig& cfg, int64_t length) const override {
    const int64_t blocks = (length + cfg.model.block_size - 1) / cfg.model.block_size;
    return cfg.block_sampler == "ddpm" ? blocks * cfg.steps : length - 1;
  }
  torch::Tensor sample(const Process& p, ScoreModel& model, int64_t length, const SamplerConfig& cfg,
                       const Constraint& constraint, const torch::Tensor& ids, torch::Device,
                       const std::function<void(int64_t, int64_t)>& progress) const override;
};

// Block by block (the authors' _semi_ar_sampler): block k starts all-mask after the clean blocks
// before it (at most the training window: a sliding window of whole blocks), and is denoised by
//   first hitting: each network call unmasks one masked position, uniformly chosen, with a token
//     drawn from the nucleus-filtered p(x0) (the draws keyed per sample and call);
//   ddpm: `steps` steps t -> s = t - 1/steps on t_i = 1 - i/steps: a masked position stays masked
//     with probability s/t, else takes a token from p(x0); the network is skipped while the block
//     is unchanged (no time conditioning: its output is the same).
torch::Tensor Bd3::sample(const Process& p, ScoreModel& model, int64_t length, const SamplerConfig& cfg,
                          const Constraint& constraint, const torch::Tensor& ids, torch::Device,
                          const std::function<void(int64_t, int64_t)>& progress) const {
  const ModelConfig& m = p.model;
  const int64_t B = ids.size(0), b = m.block_size, W = m.length, V = m.tokens, mask = V;
  SEDD_CHECK(m.bos >= 0, "bd3 sampling: the model has no end-of-text id (bos) for position 0");
  const auto dopts = torch::TensorOptions().dtype(torch::kDouble).device(ids.device());
  const auto lopts = ids.options();
  auto x = torch::full({B, length}, mask, lopts);
  x.select(1, 0).fill_(m.bos);
  constraint.apply(x);
  const int64_t blocks = (length + b - 1) / b;
  const auto zeros = torch::zeros({B}, dopts);
  std::vector<int64_t> stop_at(B, length);  // a stopped sample is end-of-text from here on
  uint64_t call = 0;
  for (int64_t k = 0; k < blocks; ++k) {
    const int64_t s = k * b, e = std::min(s + b, length), T = e - s;
    const int64_t start = std::max<int64_t>(0, e - W) / b * b;  // window of whole blocks ending at e
    model.set_context(x.narrow(1, start, s - start));
    if (cfg.block_sampler == "first-hitting") {
      auto block = x.narrow(1, s, T).clone();
      while (true) {
        auto masked = block == mask;  // [B, T]; the same count in every sample
        if (!masked.any().item<bool>()) break;
        model.evaluate_block(block, zeros);
        auto u = keyed_uniform(RandomStream{cfg.seed, purpose::kSample, 2 * call}, ids, 1, torch::kDouble).squeeze(1);
        auto chosen = bd3_first_hitting_position(masked, u);  // [B]
        auto rows = torch::arange(B, lopts) * T + chosen;
        auto p0 = bd3_nucleus(model.rows(rows).to(torch::kDouble).exp(), cfg.top_p);
        auto tokens = keyed_categorical(p0, RandomStream{cfg.seed, purpose::kSample, 2 * call + 1}, ids, (s + chosen) * V);
        block = block.reshape({-1}).index_copy(0, rows, tokens).view({B, T});
        ++call;
      }
      x.narrow(1, s, T).copy_(block);
    } else {
      torch::Tensor p0_all, seen;  // p(x0) of the block's positions at the last network call
      for (int64_t i = 0; i < cfg.steps; ++i) {
        auto cur = x.narrow(1, s, T).clone();
        auto rows = (cur.reshape({-1}) == mask).nonzero().squeeze(1);
        if (rows.numel() == 0) break;
        if (!seen.defined() || !seen.equal(cur)) {
          model.evaluate_block(cur, zeros);
          p0_all = bd3_nucleus(model.rows(torch::arange(B * T, lopts)).to(torch::kDouble).exp(), cfg.top_p);
          seen = cur;
        }
        const double t = 1.0 - static_cast<double>(i) / cfg.steps, s_t = std::max(0.0, t - 1.0 / cfg.steps);
        auto q = bd3_ddpm_weights(p0_all.index_select(0, rows), t, s_t);
        auto batch = torch::div(rows, T, "floor"), pos = rows - batch * T;
        auto drawn = keyed_categorical(q, RandomStream{cfg.seed, purpose::kSample, call}, ids.index_select(0, batch),
                                       (s + pos) * (V + 1));
        auto next = cur.reshape({-1}).index_copy(0, rows, drawn);
        x.narrow(1, s, T).copy_(next.view({B, T}));
        ++call;
      }
    }
    constraint.apply(x);
    // Stopping, per sample (the authors' _check_stop_conds): an end-of-text after position 0, or
    // a last 256 tokens of low entropy (dropped, as their variable-length sampling does).
    if (cfg.stop_at_eot) {
      auto hits = (x.narrow(1, 1, e - 1) == m.bos).cpu();
      for (int64_t i = 0; i < B; ++i) {
        if (stop_at[i] < length) continue;
        auto where = hits[i].nonzero();
        if (where.numel() > 0) stop_at[i] = where[0][0].item<int64_t>() + 2;
      }
    }
    if (cfg.stop_entropy > 0 && e > 256) {
      auto h = token_entropy(x.narrow(1, e - 256, 256));
      for (int64_t i = 0; i < B; ++i)
        if (stop_at[i] == length && h[i] < cfg.stop_entropy) stop_at[i] = e - 256;
    }
    if (progress) progress(k + 1, blocks);
    if (std::all_of(stop_at.begin(), stop_at.end(), [&](int64_t v) { return v < length; })) break;
  }
  for (int64_t i = 0; i < B; ++i)
    if (stop_at[i] < length) x[i].narrow(0, stop_at[i], length - stop_at[i]).fill_(m.bos);
  return x;
}

}  // namespace

const Objective& bd3_objective() {
  static const Bd3 o;
  return o;
}

}  // namespace sedd
