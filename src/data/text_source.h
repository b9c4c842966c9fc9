// The documents of one corpus input file, whatever its format:
//   text     the whole file is one document
//   jsonl    one JSON object per line; the document is its string field
//   parquet  one document per row of a string column, read row group by row group
//   arrow    the same from an Arrow IPC stream (Hugging Face `datasets` data-*.arrow) or IPC file
// Parquet and Arrow need the build to have found the Arrow C++ library of pyarrow.
#pragma once
#include <cstdint>
#include <memory>
#include <optional>
#include <string>

namespace sedd {

enum class InputFormat { Text, Jsonl, Parquet, Arrow };

// "text", "jsonl", "parquet" or "arrow"; throws sedd::Error naming --format otherwise.
InputFormat parse_input_format(const std::string& name);
// .parquet -> parquet, .arrow -> arrow, .jsonl / .json -> jsonl, anything else text.
InputFormat input_format_of(const std::string& path);
const char* format_name(InputFormat format);
// Whether this build reads Parquet and Arrow files.
bool columnar_input_available();
// Throws sedd::Error naming `path` when this build cannot read `format` (Parquet or Arrow without
// the Arrow C++ library), with what to install.
void check_format_supported(const std::string& path, InputFormat format);

class DocumentSource {
 public:
  virtual ~DocumentSource() = default;
  // The next document into `text`; false after the last one. Throws sedd::Error naming the file
  // (and line or row) when the input is unreadable.
  virtual bool next(std::string& text) = 0;
  // Where the last document came from, for messages: "FILE", "FILE:LINE" or "FILE: row N" (rows
  // count from 0, like `datasets` indices).
  virtual std::string where() const = 0;
  // Input bytes consumed so far (text bytes for Parquet and Arrow), for progress reports.
  virtual int64_t bytes_read() const = 0;
  // The parts the file splits into, so that ranks and threads share one file: byte ranges of
  // `part_bytes` (jsonl; a part holds the lines that start in its range), row groups (parquet),
  // record batches (arrow); a text file is one part. The split depends on the file only.
  virtual int64_t parts(int64_t part_bytes) = 0;
  // Moves to the start of part `k` (of parts(part_bytes)); next() then returns that part's
  // documents only. An Arrow stream moves forwards only.
  virtual void seek_part(int64_t k, int64_t part_bytes) = 0;
};

// `field`: the JSON field (jsonl) or column (parquet, arrow) holding the text; unused for text.
std::unique_ptr<DocumentSource> open_documents(const std::string& path, InputFormat format, const std::string& field);

}  // namespace sedd
