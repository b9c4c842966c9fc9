// MetricsLog: one JSON object per logged step in <run.dir>/metrics.jsonl (rank 0 only), flushed
// per line so a crash loses nothing and plotting tools can read a live run.
#pragma once
#include <cstdio>
#include <nlohmann/json.hpp>
#include <string>

namespace sedd {

class MetricsLog {
 public:
  // Keeps existing lines with step <= keep_until_step (a resumed run continues one curve).
  MetricsLog(const std::string& path, int64_t keep_until_step);
  ~MetricsLog();
  void write(const nlohmann::json& row);

 private:
  std::FILE* file_ = nullptr;
};

}  // namespace sedd
