// Step parity; see parity.h.
#include "train/parity.h"

#include <algorithm>
#include <cmath>
#include <filesystem>

#include "data/shard.h"
#include "io/error.h"
#include "io/fs.h"
#include "model/weights.h"

namespace sedd {

namespace {

std::string step_group(const std::string& root, int64_t step) { return fmt::format("{}/step_{:06d}", root, step); }

std::vector<std::string> split_lines(const std::string& s) { return fs::split_nonempty(s, '\n'); }

// ||a - b|| / ||b|| (both float64); ||a - b|| when b is zero, so equal zeros give 0.
double rel_error(const torch::Tensor& a, const torch::Tensor& b) {
  const double diff = (a.to(torch::kDouble) - b.to(torch::kDouble)).norm().item<double>();
  const double ref = b.to(torch::kDouble).norm().item<double>();
  return ref > 0 ? diff / ref : diff;
}

torch::Tensor stack_rows(const std::vector<torch::Tensor>& rows) { return torch::stack(rows).contiguous(); }

}  // namespace

// ---------------------------------------------------------------------------------------------
ParityRecorder::ParityRecorder(const std::string& path, Trainer& trainer, const TrainingConfig& cfg,
                               const std::string& settings, std::vector<int64_t> snapshots)
    : path_(path), snapshots_(std::move(snapshots)) {
  auto shards = expand_shard_list(cfg.data.train);
  SEDD_CHECK(shards.size() == 1, "{}: a parity record reads exactly one shard, got {}", cfg.data.train, shards.size());
  ShardInfo info = read_shard_info(shards[0]);
  h5::File in(shards[0], h5::Mode::Read);
  file_ = std::make_unique<h5::File>(path_ + ".partial", h5::Mode::Create);
  file_->set_attr("/", "settings", settings);
  file_->set_attr("/", "format", std::string("sedd-parity 1"));
  file_->write("/data/tokens", in.read("/tokens", torch::kLong));
  file_->set_attr("/data", "vocab_size", info.vocab_size);
  file_->set_attr("/data", "eot_id", info.eot_id);
  file_->set_attr("/data", "tokenizer", info.tokenizer);
  std::string order;
  for (const auto& p : trainer.model()->named_parameters()) {
    names_.push_back(p.key());
    order += p.key() + "\n";
    file_->write("/init/" + p.key(), p.value().detach().to(torch::kCPU, torch::kDouble));
  }
  file_->set_attr("/init", "order", order);
  previous_params_ = flat_parameters(*trainer.model());
  trainer.observe_steps([this](const StepTrace& tr) {
    SEDD_CHECK(tr.t.defined(), "parity records need a diffusion time and a noisy input; this objective draws none");
    x0_.push_back(tr.x0);
    t_.push_back(tr.t);
    xt_.push_back(tr.xt);
    loss_.push_back(tr.loss);
    grad_norm_.push_back(tr.grad_norm);
    clip_.push_back(tr.clip_coef);
    lr_.push_back(tr.lr);
    if (std::find(snapshots_.begin(), snapshots_.end(), tr.step) != snapshots_.end()) {
      const auto g = step_group("/ours", tr.step);
      file_->write(g + "/gradient", tr.gradient);
      file_->write(g + "/clipped_gradient", tr.gradient * tr.clip_coef);
      file_->write(g + "/update", tr.params - previous_params_);
      file_->write(g + "/params", tr.params);
      file_->write(g + "/ema", tr.ema);
    }
    previous_params_ = tr.params;
  });
}

void ParityRecorder::finish() {
  SEDD_CHECK(!x0_.empty(), "{}: no step was recorded", path_);
  file_->write("/steps/x0", stack_rows(x0_));
  file_->write("/steps/t", stack_rows(t_));
  file_->write("/steps/xt", stack_rows(xt_));
  auto vec = [](const std::vector<double>& v) { return torch::tensor(v, torch::kDouble); };
  file_->write("/ours/loss", vec(loss_));
  file_->write("/ours/grad_norm", vec(grad_norm_));
  file_->write("/ours/clip_coef", vec(clip_));
  file_->write("/ours/lr", vec(lr_));
  file_->write("/ours/snapshot_steps", torch::tensor(snapshots_, torch::kLong));
  file_->close();
  std::filesystem::rename(path_ + ".partial", path_);
}

// ---------------------------------------------------------------------------------------------
std::string parity_settings(const std::string& reference) {
  h5::File f(reference, h5::Mode::Read);
  SEDD_CHECK(f.has_attr("/", "settings") && f.exists("/authors"),
             "{}: not a parity reference (no settings or no /authors group; see tests/data/README.md)", reference);
  return f.attr_string("/", "settings");
}

void unpack_parity_inputs(const std::string& reference, const std::string& workdir, const ModelConfig& model) {
  h5::File f(reference, h5::Mode::Read);
  std::filesystem::create_directories(workdir);
  write_shard(workdir + "/train-00000.h5", f.read("/data/tokens", torch::kLong), f.attr_int("/data", "vocab_size"),
              f.attr_int("/data", "eot_id"), f.attr_string("/data", "tokenizer"));
  DDiT shape(model);
  StateDict init = state_dict(*shape);  // buffers (rotary frequencies) as the model makes them
  for (const auto& name : split_lines(f.attr_string("/init", "order"))) {
    // model.h5 keeps float32 weights: the initial weights are float32 values (both trainers draw
    // them in float32), so nothing is lost.
    auto t = f.read("/init/" + name, torch::kDouble), f32 = t.to(torch::kFloat);
    SEDD_CHECK(init.count(name), "{}: initial weight {} is not a parameter of the model", reference, name);
    SEDD_CHECK(torch::equal(f32.to(torch::kDouble), t), "{}: initial weight {} is not float32-representable",
               reference, name);
    init[name] = f32;
  }
  save_model_file(workdir + "/init.h5", model, init, {}, ModelFileInfo{});
}

// ---------------------------------------------------------------------------------------------
ParityCheck::ParityCheck(const std::string& reference, Trainer& trainer, ControlPlane& control, double tolerance)
    : ref_(std::make_unique<h5::File>(reference, h5::Mode::Read)), control_(control) {
  report_.tolerance = tolerance;
  names_ = split_lines(ref_->attr_string("/init", "order"));
  auto params = trainer.model()->named_parameters();
  SEDD_CHECK(params.size() == names_.size(), "{}: {} parameters in the reference, {} in the model", reference,
             names_.size(), params.size());
  for (size_t i = 0; i < names_.size(); ++i) {
    SEDD_CHECK(params[i].key() == names_[i], "{}: parameter {} is {} in the reference, {} in the model", reference, i,
               names_[i], params[i].key());
    numels_.push_back(params[i].value().numel());
    record("initial_weights", 0, rel_error(params[i].value(), ref_->read("/init/" + names_[i])));
  }
  previous_params_ = flat_parameters(*trainer.model());
  x0_ = ref_->read("/steps/x0", torch::kLong);
  t_ = ref_->read("/steps/t", torch::kDouble);
  xt_ = ref_->read("/steps/xt", torch::kLong);
  loss_ = ref_->read("/authors/loss", torch::kDouble);
  grad_norm_ = ref_->read("/authors/grad_norm", torch::kDouble);
  clip_ = ref_->read("/authors/clip_coef", torch::kDouble);
  lr_ = ref_->read("/authors/lr", torch::kDouble);
  // The authors' loss per sequence (SEDD: the batch mean of per-sequence sums, as ours) or per
  // token (MDLM: token_nll, the sum over the batch's tokens / B L).
  if (ref_->has_attr("/authors", "loss_per") && ref_->attr_string("/authors", "loss_per") == "token")
    loss_scale_ = 1.0 / static_cast<double>(x0_.size(2));

  // Data windows: every row of every batch is a window [kL, (k+1)L) of the token stream, the
  // windows the reference's data pipeline (group_texts: concatenate, cut into blocks) produces.
  auto tokens = ref_->read("/data/tokens", torch::kLong);
  const int64_t L = x0_.size(2), windows = tokens.size(0) / L;
  auto all = tokens.narrow(0, 0, windows * L).view({windows, L});
  auto rows = x0_.reshape({-1, L});
  for (int64_t r = 0; r < rows.size(0); ++r)
    if (!(all == rows[r]).all(1).any().item<bool>()) ++window_mismatches_;
  trainer.observe_steps([this](const StepTrace& tr) { observe(tr); });
}

void ParityCheck::record(const std::string& quantity, int64_t step, double rel_error) {
  ParityStat& s = report_.quantities[quantity];
  if (s.compared++ == 0 || !(rel_error <= s.max_rel_error)) {  // NaN counts as the worst
    s.max_rel_error = rel_error;
    s.worst_step = step;
  }
  if (report_.first_failure_step == 0 && !(rel_error <= report_.tolerance)) {
    report_.first_failure_step = std::max<int64_t>(step, 1);
    report_.first_failure_quantity = quantity;
    report_.first_failure_error = rel_error;
  }
}

void ParityCheck::observe(const StepTrace& tr) {
  const int64_t s = tr.step - 1;
  SEDD_CHECK(s < x0_.size(0), "parity: step {} is past the reference's {} steps", tr.step, x0_.size(0));
  const int64_t rows = tr.x0.size(0);
  ++steps_seen_;
  // This rank's batch and draws must be the reference's rows [first_row, first_row + rows).
  if (!torch::equal(tr.x0, x0_[s].narrow(0, tr.first_row, rows))) ++draw_mismatches_;
  if (tr.t.defined()) {
    record("time_draws", tr.step, rel_error(tr.t, t_[s].narrow(0, tr.first_row, rows)));
    if (!torch::equal(tr.xt, xt_[s].narrow(0, tr.first_row, rows))) ++draw_mismatches_;
  }
  record("loss", tr.step, rel_error(torch::tensor(tr.loss * loss_scale_, torch::kDouble), loss_[s]));
  record("grad_norm", tr.step, rel_error(torch::tensor(tr.grad_norm, torch::kDouble), grad_norm_[s]));
  record("clip_coef", tr.step, rel_error(torch::tensor(tr.clip_coef, torch::kDouble), clip_[s]));
  record("lr", tr.step, rel_error(torch::tensor(tr.lr, torch::kDouble), lr_[s]));
  const auto g = step_group("/authors", tr.step);
  if (ref_->exists(g)) {
    const std::map<std::string, torch::Tensor> ours = {{"gradient", tr.gradient},
                                                       {"clipped_gradient", tr.gradient * tr.clip_coef},
                                                       {"update", tr.params - previous_params_},
                                                       {"params", tr.params},
                                                       {"ema", tr.ema}};
    for (const auto& [quantity, mine] : ours) {
      auto theirs = ref_->read(g + "/" + quantity, torch::kDouble);
      SEDD_CHECK(theirs.numel() == mine.numel(), "{}/{}: {} elements, the model has {}", g, quantity, theirs.numel(),
                 mine.numel());
      // Per parameter tensor, so a small tensor's error is not hidden by a large one's norm.
      int64_t off = 0;
      for (size_t i = 0; i < names_.size(); ++i) {
        record(quantity, tr.step, rel_error(mine.narrow(0, off, numels_[i]), theirs.narrow(0, off, numels_[i])));
        off += numels_[i];
      }
    }
  }
  previous_params_ = tr.params;
}

ParityReport ParityCheck::finish() {
  const double mismatched = control_.sum(static_cast<double>(draw_mismatches_), "parity draw mismatches");
  ParityStat& d = report_.quantities["batches_and_mask_draws"];
  d.compared = steps_seen_;
  d.max_rel_error = mismatched;  // rows that differ (any difference is a failure)
  ParityStat& w = report_.quantities["data_windows"];
  w.compared = x0_.size(0) * x0_.size(1);
  w.max_rel_error = static_cast<double>(window_mismatches_);
  if (report_.first_failure_step == 0 && (mismatched > 0 || window_mismatches_ > 0)) {
    report_.first_failure_step = 1;
    report_.first_failure_quantity = mismatched > 0 ? "batches_and_mask_draws" : "data_windows";
    report_.first_failure_error = mismatched > 0 ? mismatched : static_cast<double>(window_mismatches_);
  }
  // Every rank compared its own rows: the worst over the ranks is the result.
  const bool any_failed = control_.any(!report_.ok(), "parity result");
  if (any_failed && report_.ok()) report_.first_failure_quantity = "on another rank", report_.first_failure_step = -1;
  return report_;
}

std::string ParityReport::table() const {
  std::string out = fmt::format("{:<24} {:>9} {:>14} {:>10}\n", "quantity", "compared", "max rel error", "worst step");
  for (const auto& [name, s] : quantities)
    out += fmt::format("{:<24} {:>9} {:>14.3e} {:>10}\n", name, s.compared, s.max_rel_error, s.worst_step);
  if (ok())
    out += fmt::format("equal within {:.0e} at every step\n", tolerance);
  else
    out += fmt::format("FIRST DIFFERENCE: step {}, {} (relative error {:.3e} > {:.0e})\n", first_failure_step,
                       first_failure_quantity, first_failure_error, tolerance);
  return out;
}

nlohmann::json ParityReport::to_json() const {
  nlohmann::json q = nlohmann::json::object();
  for (const auto& [name, s] : quantities)
    q[name] = {{"max_rel_error", s.max_rel_error}, {"worst_step", s.worst_step}, {"compared", s.compared}};
  nlohmann::json out = {{"ok", ok()}, {"tolerance", tolerance}, {"quantities", q}};
  out["first_failure"] = ok() ? nlohmann::json(nullptr)
                              : nlohmann::json{{"step", first_failure_step},
                                               {"quantity", first_failure_quantity},
                                               {"rel_error", first_failure_error}};
  return out;
}

// ---------------------------------------------------------------------------------------------
namespace {

// Two-sample Kolmogorov-Smirnov statistic of float64 samples.
double ks_statistic(torch::Tensor a, torch::Tensor b) {
  auto x = std::get<0>(a.reshape({-1}).to(torch::kDouble).sort()), y = std::get<0>(b.reshape({-1}).to(torch::kDouble).sort());
  const double* xa = x.data_ptr<double>();
  const double* ya = y.data_ptr<double>();
  const int64_t n = x.numel(), m = y.numel();
  int64_t i = 0, j = 0;
  double d = 0;
  while (i < n && j < m) {
    const double v = std::min(xa[i], ya[j]);
    while (i < n && xa[i] <= v) ++i;
    while (j < m && ya[j] <= v) ++j;
    d = std::max(d, std::abs(static_cast<double>(i) / n - static_cast<double>(j) / m));
  }
  return d;
}

}  // namespace

std::string compare_init_laws(const std::string& reference, const ModelConfig& model, std::string* summary) {
  h5::File f(reference, h5::Mode::Read);
  SEDD_CHECK(f.exists("/init_law"), "{}: no /init_law group", reference);
  const int64_t seeds = f.attr_int("/init_law", "seeds"), cap = f.attr_int("/init_law", "cap_per_seed");
  std::map<std::string, std::vector<torch::Tensor>> ours;
  for (int64_t s = 0; s < seeds; ++s) {
    torch::manual_seed(static_cast<uint64_t>(s));
    DDiT m(model);
    for (const auto& p : m->named_parameters())
      ours[p.key()].push_back(p.value().detach().reshape({-1}).narrow(0, 0, std::min(cap, p.value().numel())));
  }
  std::string bad;
  for (const auto& [name, parts] : ours) {
    SEDD_CHECK(f.exists("/init_law/" + name), "{}: no initialisation sample of {}", reference, name);
    auto theirs = f.read("/init_law/" + name, torch::kDouble), mine = torch::cat(parts).to(torch::kDouble);
    std::string line;
    const bool constant = (theirs == theirs[0]).all().item<bool>();
    if (constant) {
      const bool same = (mine == theirs[0]).all().item<bool>();
      line = fmt::format("{:<40} constant {:g}: {}", name, theirs[0].item<double>(), same ? "equal" : "DIFFERENT");
      if (!same) bad += " " + name;
    } else {
      const int64_t n = mine.numel(), m = theirs.numel();
      const double d = ks_statistic(mine, theirs);
      const double critical = 1.949 * std::sqrt(static_cast<double>(n + m) / (static_cast<double>(n) * m));  // alpha 1e-3
      line = fmt::format("{:<40} KS D = {:.4f} (critical {:.4f}, n = {}, m = {}), range ours [{:.4g}, {:.4g}] "
                         "theirs [{:.4g}, {:.4g}]: {}",
                         name, d, critical, n, m, mine.min().item<double>(), mine.max().item<double>(),
                         theirs.min().item<double>(), theirs.max().item<double>(), d < critical ? "same law" : "DIFFERENT");
      if (!(d < critical)) bad += " " + name;
    }
    if (summary) *summary += line + "\n";
  }
  return bad;
}

}  // namespace sedd
