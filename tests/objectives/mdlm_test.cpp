// MDLM golden reference: our masked-diffusion path (noise, network, SUBS log-probabilities, training
// loss, ancestral step) against vectors from the MDLM authors' code, tests/data/mdlm_reference.h5
// (tests/data/make_mdlm_reference.py; docs/DESIGN.md, "MDLM golden reference").
#include <gtest/gtest.h>

#include <fmt/format.h>

#include <cstdlib>
#include <filesystem>
#include <functional>
#include <iostream>
#include <map>
#include <set>

#include "diffusion/graph.h"
#include "diffusion/times.h"
#include "diffusion/noise.h"
#include "golden.h"
#include "io/hdf5.h"
#include "objectives/mdlm.h"
#include "objectives/rows.h"
#include "objectives/sedd.h"
#include "objectives/score.h"
#include "model/weights.h"
#include "eval/elbo.h"
#include "objectives/oracles.h"
#include "objectives/sampling.h"
#include "test_util.h"

using namespace sedd;
using namespace sedd::test;

namespace {

std::string mdlm_golden_path() {
  if (const char* p = std::getenv("SEDD_MDLM_GOLDEN")) return p;
  return SEDD_SOURCE_DIR "/tests/data/mdlm_reference.h5";
}

constexpr double kMdlmMathTol = 1e-9;   // float64 math and the float64 network: relative
constexpr double kMdlmModelTol = 1e-4;  // float32 network outputs: model_rel_error
// The authors' SUBS writes this into the logits it excludes (Diffusion.neg_infinity).
constexpr double kMdlmNegInfinity = -1000000.0;

// What one pass over the file found. `probe`: for each compared output, the flat index (in the
// stored dataset) of its largest compared entry, where a perturbation must be caught.
struct MdlmReport {
  std::vector<std::string> mismatches;
  std::map<std::string, double> worst;  // per output: the error measure below
  std::map<std::string, int64_t> probe;
  std::set<std::string> used;           // every dataset read
};

// Flat indices of a dataset, shaped like it (selected with the same ops as its values).
torch::Tensor mdlm_flat_index(const torch::Tensor& t) { return torch::arange(t.numel()).view(t.sizes()); }

class MdlmChecker {
 public:
  explicit MdlmChecker(const std::string& path) : path_(path), f_(path, h5::Mode::Read) {}

  torch::Tensor read(const std::string& ds, c10::optional<torch::Dtype> as = c10::nullopt) {
    rep.used.insert(ds);
    return f_.read(ds, as);
  }
  const h5::File& file() const { return f_; }

  // ours vs ref (selected entries of dataset `ds`, their flat indices `index`): relative error
  // (|a - b| / (|b| + 1e-12)) for math, model_rel_error for float32 network outputs.
  void compare(const std::string& ds, const torch::Tensor& ours, const torch::Tensor& ref, const torch::Tensor& index,
               double tol, bool model_error = false) {
    if (ours.sizes() != ref.sizes()) {
      rep.mismatches.push_back(
          fmt::format("{}: shape {} != stored {}", ds, c10::str(ours.sizes()), c10::str(ref.sizes())));
      return;
    }
    auto a = ours.to(torch::kDouble).reshape({-1}), b = ref.to(torch::kDouble).reshape({-1});
    double err = model_error ? model_rel_error(a, b) : max_rel_error(a, b, 1e-12);
    rep.worst[ds] = std::max(rep.worst[ds], err);
    if (!rep.probe.count(ds)) rep.probe[ds] = index.reshape({-1})[b.abs().argmax()].item<int64_t>();
    if (!(err <= tol)) rep.mismatches.push_back(fmt::format("{}: max rel err {:.3g} > {:.1g}", ds, err, tol));
  }
  // Entries whose stored value is exact (structure of the authors' SUBS output).
  void expect_equal(const std::string& ds, const torch::Tensor& expected, const torch::Tensor& ref,
                    const torch::Tensor& index) {
    if (!torch::equal(expected.to(torch::kDouble), ref.to(torch::kDouble)))
      rep.mismatches.push_back(fmt::format("{}: stored values differ from the exact ones", ds));
    if (!rep.probe.count(ds) && index.numel() > 0) rep.probe[ds] = index.reshape({-1})[0].item<int64_t>();
  }

  DDiT model(bool time_conditioning, torch::Dtype dtype) {
    ModelConfig cfg = read_model_config(f_, "/model");
    cfg.time_conditioning = time_conditioning;
    DDiT m(cfg);
    load_state_dict(*m, read_state_dict(f_, "/model/params"), path_ + ":/model/params");
    for (const auto& p : f_.children("/model/params")) rep.used.insert("/model/params/" + p);
    m->to(dtype);
    m->eval();
    return m;
  }

  MdlmReport rep;

 private:
  std::string path_;
  h5::File f_;
};

MdlmReport check_mdlm_golden(const std::string& path) {
  MdlmChecker c(path);
  torch::NoGradGuard no_grad;
  const auto& f = c.file();
  ModelConfig cfg = read_model_config(f, "/model");
  const int64_t N = cfg.tokens;
  auto graph = make_graph("absorb", N);
  NoiseConfig nc;
  nc.kind = "loglinear";
  nc.eps = f.attr_double("/noise/loglinear", "eps");
  auto noise = make_noise(nc);

  // Noise schedule: total and rate, float64.
  {
    auto t = c.read("/noise/loglinear/t", torch::kDouble);
    auto total = c.read("/noise/loglinear/total"), rate = c.read("/noise/loglinear/rate");
    c.compare("/noise/loglinear/total", noise->total(t), total, mdlm_flat_index(total), kMdlmMathTol);
    c.compare("/noise/loglinear/rate", noise->rate(t), rate, mdlm_flat_index(rate), kMdlmMathTol);
  }

  // Their time sampling (float32) against ours: training_time of iid and of stratified uniforms
  // (k + u) / n, what they call antithetic. Their arithmetic is float32: 1e-6.
  {
    auto eps = c.read("/sample_t/eps", torch::kDouble);
    if (f.attr_double("/sample_t", "sampling_eps") != 1e-3)
      c.rep.mismatches.push_back("/sample_t: sampling_eps is not 1e-3, training_time's default");
    const int64_t n = eps.size(0);
    auto iid = c.read("/sample_t/t_iid"), anti = c.read("/sample_t/t_antithetic");
    c.compare("/sample_t/t_iid", training_time(eps), iid, mdlm_flat_index(iid), 1e-6);
    auto stratified = (torch::arange(n, torch::kDouble) + eps) / static_cast<double>(n);
    c.compare("/sample_t/t_antithetic", training_time(stratified), anti, mdlm_flat_index(anti), 1e-6);
  }

  // The network, float32: with sigma, and without time conditioning (the network sees sigma 0).
  {
    auto indices = c.read("/model/input/indices");
    auto sigma = c.read("/model/input/sigma", torch::kFloat);
    auto logits = c.read("/model/output/logits"), logits0 = c.read("/model/output/logits_sigma0");
    c.compare("/model/output/logits", c.model(true, torch::kFloat)->forward_raw(indices, sigma), logits,
              mdlm_flat_index(logits), kMdlmModelTol, true);
    c.compare("/model/output/logits_sigma0", c.model(false, torch::kFloat)->forward_raw(indices, sigma), logits0,
              mdlm_flat_index(logits0), kMdlmModelTol, true);
  }

  DDiT model64 = c.model(true, torch::kDouble);

  // SUBS on the float64 network: our log-probabilities of the clean token at masked positions
  // (DDiTScore::rows, what the sampler and the bound read) against theirs over the N tokens. Their
  // mask column holds neg_infinity - logsumexp (ours has none: probability exactly 0) and their
  // unmasked rows are neg_infinity except 0 at x_t (ours: the loss skips them, the sampler copies
  // them); both are checked as the exact values they must be.
  {
    auto xt = c.read("/subs/xt"), sigma = c.read("/subs/sigma", torch::kDouble);
    auto logits = c.read("/subs/logits"), log_probs = c.read("/subs/log_probs");
    auto raw = model64->forward_raw(xt, sigma);
    c.compare("/subs/logits", raw, logits, mdlm_flat_index(logits), kMdlmMathTol);
    DDiTScore score(model64, false);
    score.evaluate(xt, sigma);
    auto flat = xt.reshape({-1});
    auto masked = (flat == N).nonzero().squeeze(1), kept = (flat != N).nonzero().squeeze(1);
    auto lp = log_probs.reshape({flat.size(0), -1}), idx = mdlm_flat_index(log_probs).reshape({flat.size(0), -1});
    c.compare("/subs/log_probs", score.rows(masked), lp.index_select(0, masked).narrow(1, 0, N),
              idx.index_select(0, masked).narrow(1, 0, N), kMdlmMathTol);
    auto raw_m = raw.reshape({flat.size(0), -1}).index_select(0, masked);
    auto mask_col = raw_m.select(1, N) + kMdlmNegInfinity - torch::logsumexp(raw_m.narrow(1, 0, N), 1);
    c.compare("/subs/log_probs", mask_col, lp.index_select(0, masked).select(1, N),
              idx.index_select(0, masked).select(1, N), kMdlmMathTol);
    auto onehot = torch::full({kept.size(0), N + 1}, kMdlmNegInfinity, torch::kDouble)
                      .scatter_(1, flat.index_select(0, kept).unsqueeze(1), 0.0);
    c.expect_equal("/subs/log_probs", onehot, lp.index_select(0, kept), idx.index_select(0, kept));
  }

  // The continuous-time NELBO at their t and x_t: per position (our SUBS log-probabilities and our
  // weight sigma'/(e^sigma - 1)), per sequence through mdlm_sequence_loss (fused and unfused) and
  // their token mean, for both time-conditioning settings, float64 and float32.
  {
    auto x0 = c.read("/nelbo/x0"), xt = c.read("/nelbo/xt"), u = c.read("/nelbo/u", torch::kDouble);
    auto eps = c.read("/nelbo/eps", torch::kDouble), t = c.read("/nelbo/t");
    const int64_t B = x0.size(0), L = x0.size(1);
    auto stratified = (torch::arange(B, torch::kDouble) + eps) / static_cast<double>(B);
    c.compare("/nelbo/t", training_time(stratified), t, mdlm_flat_index(t), kMdlmMathTol);
    // Their corruption: masked where u < 1 - e^-sigma(t), with our schedule.
    auto move = -torch::expm1(-noise->total(t)).unsqueeze(1);
    c.expect_equal("/nelbo/xt", torch::where(u < move, torch::full_like(x0, N), x0), xt, mdlm_flat_index(xt));
    auto weight = noise->rate(t) / torch::expm1(noise->total(t));  // [B]
    auto flat = xt.reshape({-1});
    auto masked = (flat == N).nonzero().squeeze(1);
    auto batch = torch::div(masked, L, "floor");
    for (int tc : {0, 1})
      for (const char* name : {"f64", "f32"}) {
        const bool f64 = std::string(name) == "f64";
        const std::string g = fmt::format("/nelbo/tc{}/{}", tc, name);
        DDiT m = c.model(tc != 0, f64 ? torch::kDouble : torch::kFloat);
        auto loss = c.read(g + "/loss"), token_nll = c.read(g + "/token_nll");
        const double tol = f64 ? kMdlmMathTol : kMdlmModelTol;
        DDiTScore score(m, false);
        score.evaluate(xt, noise->total(t));
        auto target = x0.reshape({-1}).index_select(0, masked).unsqueeze(1);
        auto nll = -score.rows(masked).to(torch::kDouble).gather(1, target);
        auto per_pos = torch::zeros({B * L}, torch::kDouble)
                           .index_copy_(0, masked, nll.squeeze(1) * weight.index_select(0, batch))
                           .view({B, L});
        c.compare(g + "/loss", per_pos, loss, mdlm_flat_index(loss), tol, !f64);
        for (bool fused : {true, false}) {
          LossOptions o;
          o.fused = fused;
          auto per_seq = mdlm_sequence_loss(m, *graph, *noise, xt, x0, t.to(f64 ? torch::kDouble : torch::kFloat),
                                            nullptr, o);
          c.compare(g + "/loss", per_seq, loss.sum(1), mdlm_flat_index(loss).select(1, 0), tol, !f64);
          c.compare(g + "/token_nll", per_seq.sum() / static_cast<double>(B * L), token_nll, mdlm_flat_index(token_nll),
                    tol);
        }
      }
  }

  // One ancestral step x_t -> x_s (s = t - dt) at masked positions: our posterior
  // (Graph::model_posterior, what sample_ancestral draws from) against their q_xs normalised (theirs
  // is p_x0 (t - s) and s in the mask column, unnormalised; the draw does not need the division).
  {
    auto x = c.read("/ddpm_step/x"), t = c.read("/ddpm_step/t");
    const double dt = f.attr_double("/ddpm_step", "dt");
    auto flat = x.reshape({-1});
    const int64_t L = x.size(1);
    auto masked = (flat == N).nonzero().squeeze(1), kept = (flat != N).nonzero().squeeze(1);
    auto batch = torch::div(masked, L, "floor");
    auto sigma_t = noise->total(t), sigma_s = noise->total(t - dt);
    auto rows_of = [&](const torch::Tensor& v) { return v.reshape({flat.size(0), -1}).index_select(0, masked); };
    auto posterior = [&](const torch::Tensor& p0) {
      return graph->model_posterior(flat.index_select(0, masked), p0, sigma_s.index_select(0, batch),
                                    sigma_t.index_select(0, batch));
    };
    auto check_q = [&](const std::string& ds, const torch::Tensor& ours) {
      auto q = c.read(ds);
      auto qm = rows_of(q);
      c.compare(ds, ours, qm / qm.sum(1, true), rows_of(mdlm_flat_index(q)), kMdlmMathTol);
    };
    auto given = c.read("/ddpm_step/p_x0_given");
    check_q("/ddpm_step/given/q_xs", posterior(rows_of(given).narrow(1, 0, N)));
    DDiTScore score(model64, false);
    score.evaluate(x, sigma_t);
    auto p0 = score.rows(masked).exp();
    auto p_x0 = c.read("/ddpm_step/model/p_x0");
    c.compare("/ddpm_step/model/p_x0", p0, rows_of(p_x0).narrow(1, 0, N),
              rows_of(mdlm_flat_index(p_x0)).narrow(1, 0, N), kMdlmMathTol);
    // Unmasked positions: their p_x0 is one-hot at the current token (ours copies it).
    auto pk = p_x0.reshape({flat.size(0), -1}).index_select(0, kept);
    c.expect_equal("/ddpm_step/model/p_x0",
                   torch::zeros_like(pk).scatter_(1, flat.index_select(0, kept).unsqueeze(1), 1.0), pk,
                   mdlm_flat_index(p_x0).reshape({flat.size(0), -1}).index_select(0, kept));
    check_q("/ddpm_step/model/q_xs", posterior(p0));
  }
  return c.rep;
}

// The outputs the shipped file holds; losing one must fail.
const char* const kMdlmOutputs[] = {
    "/noise/loglinear/total", "/noise/loglinear/rate", "/sample_t/t_iid", "/sample_t/t_antithetic",
    "/model/output/logits", "/model/output/logits_sigma0", "/subs/logits", "/subs/log_probs", "/nelbo/t",
    "/nelbo/xt", "/nelbo/tc0/f64/loss", "/nelbo/tc0/f64/token_nll", "/nelbo/tc0/f32/loss",
    "/nelbo/tc0/f32/token_nll", "/nelbo/tc1/f64/loss", "/nelbo/tc1/f64/token_nll", "/nelbo/tc1/f32/loss",
    "/nelbo/tc1/f32/token_nll", "/ddpm_step/given/q_xs", "/ddpm_step/model/p_x0", "/ddpm_step/model/q_xs"};

}  // namespace

TEST(GoldenMdlm, MatchesEveryStoredOutput) {
  auto rep = check_mdlm_golden(mdlm_golden_path());
  for (const auto& m : rep.mismatches) ADD_FAILURE() << m;
  for (const char* ds : kMdlmOutputs) EXPECT_TRUE(rep.probe.count(ds)) << ds << " was not compared";
  for (const auto& ds : list_datasets(mdlm_golden_path()))
    EXPECT_TRUE(rep.used.count(ds)) << ds << " is in " << mdlm_golden_path() << " but no check read it";
  for (const auto& [ds, err] : rep.worst) std::cout << ds << ": max rel err " << err << "\n";
}

// Every output, one entry (its largest compared one) moved by 1%, must be reported by name.
TEST(GoldenMdlm, DetectsOnePercentError) {
  TempDir tmp;
  const std::string copy = tmp / "mdlm.h5";
  std::filesystem::copy_file(mdlm_golden_path(), copy);
  auto probes = check_mdlm_golden(copy).probe;
  ASSERT_EQ(probes.size(), std::size(kMdlmOutputs));
  for (const auto& [ds, at] : probes) {
    torch::Tensor orig;
    {
      h5::File f(copy, h5::Mode::ReadWrite);
      orig = f.read(ds);
      auto bad = orig.clone().reshape({-1});
      if (bad.is_floating_point()) bad[at] = bad[at].item<double>() * 1.01;
      else bad[at] = bad[at].item<int64_t>() == 0 ? 1 : 0;  // an integer output: another token
      f.overwrite(ds, bad.view(orig.sizes()));
    }
    auto rep = check_mdlm_golden(copy);
    h5::File(copy, h5::Mode::ReadWrite).overwrite(ds, orig);
    bool named = false;
    for (const auto& m : rep.mismatches) named = named || m.rfind(ds + ":", 0) == 0;
    EXPECT_TRUE(named) << "a 1% error in " << ds << " at entry " << at << " went unnoticed";
  }
}

// With the exact clean-token posterior, the masked-diffusion bound is tight (equal to the entropy
// within Monte Carlo error), and its ancestral sampler reproduces the marginals.
TEST(ObjectiveOracle, MdlmBoundIsTightAndItsSamplerReproducesTheMarginals) {
  expect_clean_token_oracle_is_exact("mdlm", "absorb");
}

TEST(ObjectiveTraining, Mdlm) { expect_objective_learns("--diffusion.objective mdlm"); }
