// Crash-safe file helpers; see fs.h.
#include "io/fs.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "io/error.h"

namespace sedd::fs {

void fsync_path(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY);
  SEDD_CHECK(fd >= 0, "{}: cannot open for fsync: {}", path, std::strerror(errno));
  int rc = ::fsync(fd);
  int err = errno;
  int closed = ::close(fd);
  SEDD_CHECK(rc == 0, "{}: fsync failed: {} (the data may not be on disk)", path, std::strerror(err));
  SEDD_CHECK(closed == 0, "{}: close after fsync failed: {}", path, std::strerror(errno));
}

void commit_file(const std::string& tmp, const std::string& final) {
  fsync_path(tmp);
  rename_durably(tmp, final);
}

void rename_durably(const std::string& from, const std::string& to) {
  SEDD_CHECK(std::rename(from.c_str(), to.c_str()) == 0, "{}: cannot rename {} into place: {}", to, from,
             std::strerror(errno));
  auto dir = std::filesystem::path(to).parent_path();
  fsync_path(dir.empty() ? "." : dir.string());
}

std::string content_hash(const std::string& bytes) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (unsigned char c : bytes) h = (h ^ c) * 0x100000001b3ull;
  char buf[32];
  std::snprintf(buf, sizeof(buf), "fnv1a64:%016llx", static_cast<unsigned long long>(h));
  return buf;
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
    out.close();
    SEDD_CHECK(!out.fail(), "{}: write failed (disk full?)", tmp);
  }
  commit_file(tmp, path);
}

std::vector<std::string> split_nonempty(const std::string& text, char sep) {
  std::vector<std::string> parts;
  size_t i = 0;
  while (i < text.size()) {
    size_t j = text.find(sep, i);
    if (j == std::string::npos) j = text.size();
    if (j > i) parts.push_back(text.substr(i, j - i));
    i = j + 1;
  }
  return parts;
}

}  // namespace sedd::fs
