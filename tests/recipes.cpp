#include "recipes.h"

#include <fmt/format.h>

#include <atomic>
#include <sstream>

#include "distributed/communicator.h"
#include "distributed/control.h"
#include "distributed/runtime.h"
#include "distributed/watchdog.h"
#include "test_util.h"
#include "train/trainer.h"
#include "train_options.h"

namespace sedd::test {

Recipe& Recipe::set(const std::string& key, const std::string& value) {
  for (auto& [k, v] : options_)
    if (k == key) {
      v = value;
      return *this;
    }
  options_.emplace_back(key, value);
  return *this;
}

Recipe& Recipe::erase(const std::string& key) {
  std::erase_if(options_, [&](const auto& kv) { return kv.first == key; });
  return *this;
}

std::string Recipe::args(const std::string& extra) const {
  std::string out;
  for (const auto& [k, v] : options_) {
    const std::string flag = "--" + k;
    const size_t at = extra.find(flag);
    const bool given = at != std::string::npos && (at + flag.size() == extra.size() || extra[at + flag.size()] == ' ' ||
                                                   extra[at + flag.size()] == '=');
    if (!given) out += fmt::format("{} {} ", flag, v);
  }
  return out + extra;
}

std::string Recipe::command(int np, const std::string& data, const std::string& dir, const std::string& extra) const {
  const std::string launcher = np == 0 ? "" : fmt::format("{} -np {} ", kMpirun, np);
  return fmt::format("{}{}/sedd-train --data.train '{}' --run.dir {} {}", launcher, bin_dir(), data, dir, args(extra));
}

int64_t train_in_process(const Recipe& recipe, const std::string& data, const std::string& dir,
                         const std::string& extra) {
  std::vector<std::string> words = {"sedd-train", "--data.train", data, "--run.dir", dir};
  std::istringstream in(recipe.args(extra));
  for (std::string w; in >> w;) words.push_back(w);
  std::vector<char*> argv;
  for (auto& w : words) argv.push_back(w.data());
  argv.push_back(nullptr);
  TrainingConfig cfg;
  tools::OptionTable options;
  tools::build_train_options(options, cfg);
  tools::parse_train_options(options, static_cast<int>(words.size()), argv.data());
  Runtime& rt = child_runtime("cpu");
  tools::validate_settings(cfg, rt.world);
  rt.select_device(cfg.run.device);
  Watchdog watchdog(cfg.dist.timeout_s, rt.rank, rt.host);
  ControlPlane control(&watchdog);
  auto comm = make_mpi_communicator(&watchdog);
  Trainer trainer(cfg, rt, *comm, control, tools::resolved_settings(options));
  const std::atomic<int> no_stop{0};
  trainer.run(&no_stop);
  return trainer.step();
}

Recipe tiny_sedd() {
  return Recipe({{"run.device", "cpu"},
                 {"data.seq_len", "16"},
                 {"model.hidden_size", "32"},
                 {"model.n_heads", "2"},
                 {"model.n_blocks", "2"},
                 {"model.cond_dim", "16"},
                 {"train.batch_size", "8"},
                 {"train.lr", "3e-3"},
                 {"train.warmup", "2"},
                 {"train.log_every", "1"}});
}

Recipe tiny(const std::string& objective) { return tiny_sedd().set("diffusion.objective", objective); }

Recipe one_block() {
  return tiny_sedd().set("data.seq_len", 32).set("model.n_blocks", 1).set("train.batch_size", 4).erase("train.lr")
      .erase("train.warmup").erase("train.log_every");
}

Recipe slow_steps() {
  return tiny_sedd()
      .set("data.seq_len", 32)
      .set("model.hidden_size", 64)
      .set("train.batch_size", 12)
      .set("train.lr", "1e-3")
      .set("train.warmup", 5)
      .set("train.schedule", "constant");
}

Recipe exact_tiny() { return tiny_sedd().set("train.ema", "0.9").set("train.precision", "fp64"); }

}  // namespace sedd::test
