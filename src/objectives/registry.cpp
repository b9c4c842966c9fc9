// The objectives by name: the one place that lists them all. Adding an objective is one file
// beside this one, one line below, one test file and one docs/DESIGN.md section.
#include <algorithm>

#include "io/error.h"
#include "objectives/objective.h"

namespace sedd {

const Objective& sedd_objective();
const Objective& mdlm_objective();
const Objective& d3pm_objective();
const Objective& ar_objective();
const Objective& dfm_objective();
const Objective& bd3_objective();

namespace {

const std::vector<const Objective*>& all() {
  static const std::vector<const Objective*> list = {&sedd_objective(), &mdlm_objective(), &d3pm_objective(),
                                                     &ar_objective(), &dfm_objective(), &bd3_objective()};
  return list;
}

}  // namespace

std::vector<std::string> objective_names() {
  std::vector<std::string> names;
  for (const auto* o : all()) names.push_back(o->name());
  return names;
}

const Objective& objective_named(const std::string& name) {
  for (const auto* o : all())
    if (o->name() == name) return *o;
  std::string known;
  for (const auto& n : objective_names()) known += (known.empty() ? "" : ", ") + n;
  fail("diffusion.objective must be one of {}, got '{}'", known, name);
}

// ModelConfig's network shape is the objective's to decide (model/config.h).
NetworkShape ModelConfig::network() const { return objective_named(objective).network(*this); }
void ModelConfig::check_objective() const {
  const Objective& own = objective_named(objective);
  own.check(*this);
  for (const auto* o : all())
    if (o != &own) o->refuse_own_settings(*this);
}
std::string ModelConfig::objective_summary() const { return objective_named(objective).describe(*this); }

void check_sampler_options(const ModelConfig& m, const std::set<std::string>& given, const std::string& path) {
  const Objective& own = objective_of(m);
  for (const auto* o : all()) {
    if (o == &own) continue;
    const auto mine = own.sampler_options();
    for (const auto& opt : o->sampler_options())
      SEDD_CHECK_OPTION(!given.count(opt) || std::find(mine.begin(), mine.end(), opt) != mine.end(), "--{}: {} is a {} model, which samples {}; --{} applies to {} models only",
                        opt, path, own.name(), own.sampling_manner(), opt, o->title());
  }
}

TrainingDraw training_draw(const ModelConfig& m, const Graph& graph, const Noise& noise, const torch::Tensor& x0,
                           const LossDraws& draws) {
  return objective_of(m).draw(Process{graph, noise, m}, x0, draws);
}

torch::Tensor training_loss(DDiT& model, const Graph& graph, const Noise& noise, const torch::Tensor& x0,
                            const LossDraws& draws, const DropoutKey* dropout, const LossOptions& options) {
  const auto& m = model->cfg;
  const Objective& o = objective_of(m);
  const Process p{graph, noise, m};
  return o.loss(model, p, x0, o.draw(p, x0, draws), dropout, options);
}

}  // namespace sedd
