#include "golden.h"

#include <fmt/format.h>

#include <functional>
#include <map>
#include <set>

#include "diffusion/graph.h"
#include "objectives/sedd.h"
#include "diffusion/noise.h"
#include "model/weights.h"
#include "io/hdf5.h"
#include "test_util.h"

namespace sedd::test {

namespace {

void compare(GoldenReport& rep, const std::string& name, const torch::Tensor& ours,
             const torch::Tensor& ref, double rtol) {
  rep.compared++;
  rep.used.insert(name);
  if (ours.sizes() != ref.sizes()) {
    rep.mismatches.push_back(fmt::format("{}: shape {} != stored {}", name, c10::str(ours.sizes()),
                                         c10::str(ref.sizes())));
    return;
  }
  // Relative error against the stored value; a tiny absolute floor keeps exact zeros exact.
  double err = max_rel_error(ours, ref, 1e-12);
  rep.worst = std::max(rep.worst, err);
  if (!(err <= rtol)) rep.mismatches.push_back(fmt::format("{}: max rel err {:.3g} > {:.1g}", name, err, rtol));
}

NoiseConfig noise_config_from(const h5::File& f, const std::string& group, const std::string& kind) {
  NoiseConfig c;
  c.kind = kind;
  if (f.has_attr(group, "eps")) c.eps = f.attr_double(group, "eps");
  if (f.has_attr(group, "sigma_min")) c.sigma_min = f.attr_double(group, "sigma_min");
  if (f.has_attr(group, "sigma_max")) c.sigma_max = f.attr_double(group, "sigma_max");
  return c;
}

}  // namespace

GoldenReport check_golden_diffusion(const std::string& path, double rtol) {
  GoldenReport rep;
  h5::File f(path, h5::Mode::Read);

  if (f.is_group("/noise")) {
    for (const auto& kind : f.children("/noise")) {
      std::string g = "/noise/" + kind;
      auto noise = make_noise(noise_config_from(f, g, kind));
      torch::Tensor t = f.read(g + "/t");
      rep.used.insert(g + "/t");
      for (const auto& ds : f.children(g)) {
        if (ds == "t") continue;
        torch::Tensor ref = f.read(g + "/" + ds);
        if (ds == "sigma") compare(rep, g + "/sigma", noise->total(t), ref, rtol);
        else if (ds == "dsigma") compare(rep, g + "/dsigma", noise->rate(t), ref, rtol);
        else rep.mismatches.push_back(g + "/" + ds + ": unknown output (no rule to check it)");
      }
    }
  }

  if (f.is_group("/graph")) {
    const std::set<std::string> inputs = {"x0", "x", "sigma", "dsigma", "log_score"};
    for (const auto& kind : f.children("/graph")) {
      std::string g = "/graph/" + kind;
      auto graph = make_graph(kind, f.attr_int(g, "tokens"));
      if (f.has_attr(g, "dim") && f.attr_int(g, "dim") != graph->dim())
        rep.mismatches.push_back(fmt::format("{}: dim attribute {} != graph dim {}", g, f.attr_int(g, "dim"),
                                             graph->dim()));
      torch::Tensor x0 = f.read(g + "/x0"), x = f.read(g + "/x");
      torch::Tensor sigma = f.read(g + "/sigma", torch::kDouble).unsqueeze(-1);   // [B, 1]
      torch::Tensor dsigma = f.read(g + "/dsigma", torch::kDouble).unsqueeze(-1); // [B, 1]
      torch::Tensor log_score = f.read(g + "/log_score", torch::kDouble);
      for (const auto& in : inputs) rep.used.insert(g + "/" + in);
      std::map<std::string, std::function<torch::Tensor()>> rules = {
          {"score_entropy", [&] { return graph->score_entropy(log_score, sigma, x, x0); }},
          {"transp_transition", [&] { return graph->transp_transition(x, sigma); }},
          {"transition", [&] { return graph->transition(x, sigma); }},
          {"staggered_score", [&] { return graph->staggered_score(log_score.exp(), dsigma); }},
          {"reverse_rate", [&] { return graph->reverse_rate(x, log_score.exp()); }},
          {"rate", [&] { return graph->rate(x, torch::kDouble); }},
          {"transp_rate", [&] { return graph->transp_rate(x, torch::kDouble); }},
      };
      for (const auto& ds : f.children(g)) {
        if (inputs.count(ds)) continue;
        auto rule = rules.find(ds);
        if (rule == rules.end()) {
          rep.mismatches.push_back(g + "/" + ds + ": unknown output (no rule to check it)");
          continue;
        }
        compare(rep, g + "/" + ds, rule->second(), f.read(g + "/" + ds, torch::kDouble), rtol);
      }
    }
  }
  return rep;
}

double model_rel_error(const torch::Tensor& ours, const torch::Tensor& ref) {
  auto a = ours.to(torch::kDouble), b = ref.to(torch::kDouble);
  double floor = 1e-2 * b.abs().max().item<double>() + 1e-30;
  return ((a - b).abs() / (b.abs() + floor)).max().item<double>();
}

GoldenReport check_golden_models(const std::string& path, double rtol) {
  GoldenReport rep;
  h5::File f(path, h5::Mode::Read);
  if (!f.is_group("/model")) return rep;
  for (const auto& name : f.children("/model")) {
    std::string g = "/model/" + name;
    ModelConfig cfg = read_model_config(f, g);
    DDiT model(cfg);
    model->eval();
    // load_state_dict refuses a missing or an unexpected tensor: every one of params/ is used.
    load_state_dict(*model, read_state_dict(f, g + "/params"), path + ":" + g + "/params");
    for (const auto& p : f.children(g + "/params")) rep.used.insert(g + "/params/" + p);
    torch::NoGradGuard no_grad;
    auto check = [&](const std::string& ds, const torch::Tensor& ours) {
      rep.compared++;
      rep.used.insert(ds);
      torch::Tensor ref = f.read(ds, torch::kFloat);
      if (ours.sizes() != ref.sizes()) {
        rep.mismatches.push_back(fmt::format("{}: shape {} != stored {}", ds, c10::str(ours.sizes()), c10::str(ref.sizes())));
        return;
      }
      double err = model_rel_error(ours, ref);
      rep.worst = std::max(rep.worst, err);
      if (!(err <= rtol)) rep.mismatches.push_back(fmt::format("{}: max rel err {:.3g} > {:.1g}", ds, err, rtol));
    };
    if (f.exists(g + "/output/log_score")) {
      rep.used.insert(g + "/input/indices");
      rep.used.insert(g + "/input/sigma");
      check(g + "/output/log_score", model->forward(f.read(g + "/input/indices"), f.read(g + "/input/sigma", torch::kFloat)));
    }
    if (f.exists(g + "/loss/loss")) {
      for (const char* in : {"/loss/t", "/loss/xt", "/loss/x0"}) rep.used.insert(g + in);
      auto graph = make_graph(cfg.graph, cfg.tokens);
      auto noise = make_noise(cfg.noise);
      auto t = f.read(g + "/loss/t", torch::kFloat);
      auto xt = f.read(g + "/loss/xt"), x0 = f.read(g + "/loss/x0");
      auto log_score = model->forward(xt, noise->total(t));
      check(g + "/loss/loss", sequence_loss(*graph, *noise, log_score, t, xt, x0));
    }
  }
  return rep;
}

std::vector<std::string> list_datasets(const std::string& path) {
  h5::File f(path, h5::Mode::Read);
  std::vector<std::string> out;
  std::function<void(const std::string&)> walk = [&](const std::string& group) {
    for (const auto& name : f.children(group)) {
      std::string child = (group == "/" ? "" : group) + "/" + name;
      if (f.is_group(child)) walk(child);
      else out.push_back(child);
    }
  };
  walk("/");
  return out;
}

}  // namespace sedd::test
