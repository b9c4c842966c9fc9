// File-system helpers for crash-safe writes: a file counts only once it is complete on disk.
#pragma once
#include <string>
#include <vector>

namespace sedd::fs {

void fsync_path(const std::string& path);               // file or directory
// fsync `tmp`, rename it to `final`, fsync the folder: readers see the old or the new file,
// never a partial one.
void commit_file(const std::string& tmp, const std::string& final);
// rename(2) `from` to `to`, then fsync the destination folder; every step checked.
void rename_durably(const std::string& from, const std::string& to);
std::string temp_name(const std::string& final);        // "<final>.tmp.<pid>"
std::string read_text(const std::string& path);
// A stable content hash ("fnv1a64:<16 hex digits>"), the same on every platform and build.
std::string content_hash(const std::string& bytes);
void write_text_atomic(const std::string& path, const std::string& text);
// The non-empty pieces of `text` between `sep` characters ("a//b/" -> {"a", "b"}).
std::vector<std::string> split_nonempty(const std::string& text, char sep);

}  // namespace sedd::fs
