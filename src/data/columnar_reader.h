// One string column of a Parquet file or an Arrow IPC file/stream, row by row, through the Arrow
// C++ library of the pyarrow wheel. Only columnar_reader.cpp includes Arrow headers; this
// interface passes no std::string (only string_view and integers), so that file may be compiled
// with the wheel's libstdc++ string ABI where it differs from torch's.
#pragma once
#include <cstdint>
#include <memory>
#include <string_view>

namespace sedd {

enum class ColumnarFormat { Parquet, ArrowIpc };

class ColumnarTextReader {
 public:
  virtual ~ColumnarTextReader() = default;
  // The next row's text, valid until the next call; false after the last row. Throws sedd::Error
  // naming the file and row for a null, damaged data or a truncated file.
  virtual bool next(std::string_view& text) = 0;
  // Index of the row last returned, from 0 (counted from the file's start, also after seek_part).
  virtual int64_t row() const = 0;
  // The file's parts: Parquet row groups, Arrow record batches (a stream is read through once to
  // count them).
  virtual int64_t parts() = 0;
  // Moves to the start of part `k`; next() then returns that part's rows only (false at its end).
  // A stream moves forward only: k must not be before the part last read.
  virtual void seek_part(int64_t k) = 0;
};

// Opens `path` and checks that column `field` exists and holds strings (string or large_string);
// throws sedd::Error naming the file otherwise. Parquet is read one row group at a time; Arrow IPC
// files in the file format (magic "ARROW1") by record batch, others as an IPC stream.
std::unique_ptr<ColumnarTextReader> open_columnar_text(std::string_view path, ColumnarFormat format,
                                                       std::string_view field);

}  // namespace sedd
