// Run fingerprint; see fingerprint.h.
#include "train/fingerprint.h"

#include <filesystem>
#include <sstream>

#include "io/error.h"
#include "objectives/objective.h"
#include "io/fs.h"

namespace sedd {

namespace {

const char* const kKeys[] = {"diffusion.objective", "diffusion.timesteps",  "diffusion.lambda_ce",
                             "diffusion.source",    "diffusion.kappa_power", "diffusion.dfm_loss",
                             "diffusion.block_size", "diffusion.clip",
                             "model.hidden_size",   "model.n_heads",        "model.n_blocks",
                             "model.cond_dim",      "model.dropout",        "model.scale_by_sigma",
                             "model.time_conditioning", "diffusion.graph",  "diffusion.noise",
                             "diffusion.eps",       "diffusion.sigma_min",  "diffusion.sigma_max",
                             "data.seq_len",        "data.train",           "tokenizer",
                             "train.batch_size",    "run.seed",             "train.time_sampling"};

std::string describe(const nlohmann::json& v) {
  if (v.is_array()) {  // a dataset: its shards
    int64_t tokens = 0;
    for (const auto& s : v) tokens += s.value("tokens", int64_t{0});
    return fmt::format("{} shards, {} tokens", v.size(), tokens);
  }
  return v.dump();
}

}  // namespace

nlohmann::json run_fingerprint(const TrainingConfig& c, const TokenStream& train) {
  nlohmann::json shards = nlohmann::json::array();
  for (size_t i = 0; i < train.shard_count(); ++i) {
    const auto& s = train.shard(static_cast<int>(i));
    std::error_code ec;
    auto bytes = std::filesystem::file_size(s.path, ec);
    shards.push_back({{"name", std::filesystem::path(s.path).filename().string()},
                      {"bytes", ec ? -1 : static_cast<int64_t>(bytes)},
                      {"tokens", s.tokens}});
  }
  auto f = settings_fingerprint(c);
  f["data.train"] = shards;
  f["tokenizer"] = fs::content_hash(train.tokenizer());
  return f;
}

nlohmann::json settings_fingerprint(const TrainingConfig& c) {
  const auto& m = c.model;
  nlohmann::json f = {{"fingerprint_version", kFingerprintVersion},
                      {"diffusion.objective", m.objective},
                      {"model.hidden_size", m.hidden_size},
                      {"model.n_heads", m.n_heads},
                      {"model.n_blocks", m.n_blocks},
                      {"model.cond_dim", m.cond_dim},
                      {"model.dropout", m.dropout},
                      {"model.scale_by_sigma", m.scale_by_sigma},
                      {"model.time_conditioning", m.time_conditioning},
                      {"diffusion.graph", m.graph},
                      {"diffusion.noise", m.noise.kind},
                      {"diffusion.eps", m.noise.eps},
                      {"diffusion.sigma_min", m.noise.sigma_min},
                      {"diffusion.sigma_max", m.noise.sigma_max},
                      {"data.seq_len", c.data.seq_len},
                      {"train.batch_size", c.train.batch_size},
                      {"run.seed", c.run.seed},
                      {"train.time_sampling", c.train.time_sampling}};
  // The settings only some objectives read (d3pm's chain length, dfm's path): the others leave
  // them out, so a resume never trips over a setting it does not use.
  objective_of(m).fingerprint(m, c.train.lambda_ce, f);
  return f;
}

std::vector<std::string> fingerprint_differences(const nlohmann::json& saved, const nlohmann::json& now,
                                                 const std::set<std::string>& allowed) {
  std::vector<std::string> out;
  for (const char* key : kKeys) {
    if (allowed.count(key) || !now.contains(key)) continue;
    if (!saved.contains(key)) {
      out.push_back(fmt::format("{}: not recorded in the checkpoint, now {}", key, describe(now[key])));
    } else if (saved[key] != now[key]) {
      out.push_back(fmt::format("{}: checkpoint {}, now {}", key, describe(saved[key]), describe(now[key])));
    }
  }
  return out;
}

std::vector<std::string> keep_checkpoint_settings(TrainingConfig& cfg, const nlohmann::json& saved,
                                                  const std::string& saved_config,
                                                  const std::vector<std::string>& defaulted) {
  std::vector<std::string> kept;
  const auto now = settings_fingerprint(cfg);
  for (const char* same : {"diffusion.objective", "diffusion.graph"})
    if (!saved.contains(same) || saved[same] != now[same]) return kept;
  auto recorded = [&](const std::string& key) -> std::string {
    if (saved.contains(key)) {
      const auto& v = saved[key];
      return v.is_boolean() ? std::string(v.get<bool>() ? "true" : "false") : v.is_string() ? v.get<std::string>() : "";
    }
    if (saved_config.empty()) return "";
    const std::string name = key.substr(key.find('.') + 1);  // unique over the sections
    for (std::string line : fs::split_nonempty(saved_config, '\n')) {
      line = line.substr(0, line.find('#'));
      const auto eq = line.find('=');
      if (eq == std::string::npos) continue;
      auto trim = [](std::string x) {
        x.erase(0, x.find_first_not_of(" \t"));
        x.erase(x.find_last_not_of(" \t\r") + 1);
        return x;
      };
      if (trim(line.substr(0, eq)) == name) return trim(line.substr(eq + 1));
    }
    return objective_setting(TrainingConfig{}, key);  // the key did not exist when it was written
  };
  for (const auto& key : defaulted) {
    const std::string value = recorded(key), current = objective_setting(cfg, key);
    if (value.empty() || value == current) continue;
    set_objective_setting(cfg, key, value);
    kept.push_back(fmt::format("{} = {}: the checkpoint's value (the {} default is {})", key, value,
                               cfg.model.objective, current));
  }
  return kept;
}

std::set<std::string> parse_allowed_changes(const std::string& list) {
  std::set<std::string> keys;
  std::stringstream ss(list);
  for (std::string item; std::getline(ss, item, ',');) {
    item.erase(0, item.find_first_not_of(" \t"));
    item.erase(item.find_last_not_of(" \t") + 1);
    if (item.empty()) continue;
    bool known = false;
    for (const char* k : kKeys) known |= item == k;
    if (!known) {
      std::string all;
      for (const char* k : kKeys) all += std::string(all.empty() ? "" : ", ") + k;
      throw OptionError(fmt::format("resume.allow: '{}' is not a checked setting (checked: {}); other settings may "
                                    "change on resume without being allowed",
                                    item, all));
    }
    keys.insert(item);
  }
  return keys;
}

}  // namespace sedd
