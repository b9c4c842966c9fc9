// MetricsLog; see metrics.h.
#include "train/metrics.h"

#include <filesystem>
#include <fstream>
#include <sstream>

#include "io/error.h"
#include "io/fs.h"

namespace sedd {

MetricsLog::MetricsLog(const std::string& path, int64_t keep_until_step) {
  std::string kept;
  if (std::filesystem::exists(path)) {
    std::ifstream in(path);
    std::string line;
    while (std::getline(in, line)) {
      try {
        auto j = nlohmann::json::parse(line);
        if (j.value("step", int64_t{0}) <= keep_until_step) kept += line + "\n";
      } catch (const nlohmann::json::exception&) {  // a torn last line from a crash
      }
    }
  }
  fs::write_text_atomic(path, kept);
  file_ = std::fopen(path.c_str(), "a");
  SEDD_CHECK(file_ != nullptr, "{}: cannot open metrics file for writing", path);
}

MetricsLog::~MetricsLog() {
  if (file_) std::fclose(file_);
}

void MetricsLog::write(const nlohmann::json& row) {
  std::string s = row.dump() + "\n";
  std::fwrite(s.data(), 1, s.size(), file_);
  std::fflush(file_);
}

}  // namespace sedd
