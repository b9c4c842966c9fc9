// Named tiny training recipes: the sedd-train options of one small CPU run each, so a test starts
// from a named recipe and changes only what it is about, instead of spelling a command line.
#pragma once
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace sedd::test {

class Recipe {
 public:
  Recipe() = default;
  explicit Recipe(std::vector<std::pair<std::string, std::string>> options) : options_(std::move(options)) {}
  // Sets (or adds) one key, e.g. set("train.steps", 10).
  Recipe& set(const std::string& key, const std::string& value);
  Recipe& set(const std::string& key, int64_t value) { return set(key, std::to_string(value)); }
  Recipe& erase(const std::string& key);
  // "--key value ..." without the keys that `extra` ("--train.steps 4 ...") sets itself: a key
  // given twice is an error for sedd-train.
  std::string args(const std::string& extra = "") const;
  // sedd-train on `np` ranks through mpirun (0: the executable alone) over the shards `data` into
  // the run folder `dir`.
  std::string command(int np, const std::string& data, const std::string& dir, const std::string& extra = "") const;

 private:
  std::vector<std::pair<std::string, std::string>> options_;
};

// 2 blocks x 32, 2 heads, L 16, batch 8, lr 3e-3, warm-up 2, a metrics row every step, CPU.
Recipe tiny_sedd();
// tiny_sedd() trained with another objective (mdlm, d3pm, ar).
Recipe tiny(const std::string& objective);
// 1 block x 32, L 32, batch 4: runs that need a model or a run folder, not learning.
Recipe one_block();
// 2 blocks x 64, L 32, batch 12, constant lr: steps slow enough to signal a run between them.
Recipe slow_steps();
// tiny_sedd() in float64 with an EMA of 0.9 and small buckets: runs compared across world sizes.
Recipe exact_tiny();

// sedd-train inside this test process on one rank: the same option table, settings check and
// Trainer as the executable, without starting processes (start-up is most of a tiny run's time).
// For single-rank behaviour; several ranks, signals and exit codes need real mpirun runs. Throws
// what sedd-train would report; returns the step the run reached.
int64_t train_in_process(const Recipe& recipe, const std::string& data, const std::string& dir,
                         const std::string& extra = "");

}  // namespace sedd::test
