// Run fingerprint: what a resumed run must share with the run that wrote the checkpoint. The model
// shape, the diffusion settings, the data (shard names, sizes and token counts, tokenizer hash),
// seq_len, the global batch, the seed and the time sampling decide which sequences and random
// draws each step sees; resuming with another value would silently continue a different run from
// the saved data position and random keys. Learning rate, steps, logging, evaluation and
// checkpoint settings, precision and the device may change freely and are not part of it.
#pragma once
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <vector>

#include "data/token_stream.h"
#include "train/config.h"

namespace sedd {

constexpr int64_t kFingerprintVersion = 1;

// {"key": value, ...} with the keys named as the options are (model.hidden_size, data.train, ...).
nlohmann::json run_fingerprint(const TrainingConfig& cfg, const TokenStream& train);
// The part that comes from the settings alone (run_fingerprint adds the data and tokenizer);
// diffusion.timesteps and diffusion.lambda_ce only for the objective that uses them (d3pm).
nlohmann::json settings_fingerprint(const TrainingConfig& cfg);

// One line per key that differs and is not in `allowed` ("data.seq_len: checkpoint 128, now 64").
std::vector<std::string> fingerprint_differences(const nlohmann::json& saved, const nlohmann::json& now,
                                                 const std::set<std::string>& allowed);

// Resuming under other objective defaults than the checkpoint was written with: each key of
// `defaulted` (objective defaults the user did not set) whose value differs from the one the
// checkpoint trained with takes that value, so that the same command line resumes the same run.
// The recorded value: the checkpoint's fingerprint, else its resolved settings (`config`, the INI
// text in state.json), else, for a key newer than the checkpoint, the built-in default (what every
// run did before the key existed). Only when the checkpoint's objective and graph are this run's
// (else the fingerprint check names them). Returns "key = value: ..." per key taken.
std::vector<std::string> keep_checkpoint_settings(TrainingConfig& cfg, const nlohmann::json& saved_fingerprint,
                                                  const std::string& saved_config,
                                                  const std::vector<std::string>& defaulted);

// "a,b , c" -> {"a", "b", "c"}; throws OptionError naming a key that is not a fingerprint key.
std::set<std::string> parse_allowed_changes(const std::string& list);

}  // namespace sedd
