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

double gpu_peak_bf16_flops(const std::string& name) {
  auto has = [&](const char* s) { return name.find(s) != std::string::npos; };
  if (has("H100")) return has("PCIe") ? 756e12 : has("NVL") ? 835e12 : 989e12;
  if (has("H200") || has("GH200")) return 989e12;
  if (has("B200")) return 2250e12;
  if (has("A100")) return 312e12;
  if (has("L40S")) return 362e12;
  return 0;
}

}  // namespace sedd
