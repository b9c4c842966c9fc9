// Crash-safe file helpers; see fs.h.
#include "io/fs.h"

#include <fcntl.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "io/error.h"

namespace sedd::fs {

void fsync_path(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY);
  SEDD_CHECK(fd >= 0, "{}: cannot open for fsync", path);
  ::fsync(fd);
  ::close(fd);
}

void commit_file(const std::string& tmp, const std::string& final) {
  fsync_path(tmp);
  SEDD_CHECK(std::rename(tmp.c_str(), final.c_str()) == 0, "{}: cannot rename {} into place", final, tmp);
  auto dir = std::filesystem::path(final).parent_path();
  fsync_path(dir.empty() ? "." : dir.string());
}

std::string temp_name(const std::string& final) { return final + ".tmp." + std::to_string(::getpid()); }

std::string read_text(const std::string& path) {
  std::ifstream in(path);
  SEDD_CHECK(in.good(), "{}: cannot read (missing file?)", path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void write_text_atomic(const std::string& path, const std::string& text) {
  std::string tmp = temp_name(path);
  {
    std::ofstream out(tmp);
    SEDD_CHECK(out.good(), "{}: cannot write", tmp);
    out << text;
    out.flush();
    SEDD_CHECK(out.good(), "{}: write failed (disk full?)", tmp);
  }
  commit_file(tmp, path);
}

}  // namespace sedd::fs
