// Parquet and Arrow IPC string columns through Arrow C++; see columnar_reader.h. The one file of
// the project that includes Arrow headers (built without the torch header, outside unity batches).
#include "data/columnar_reader.h"

#include <arrow/array.h>
#include <arrow/chunked_array.h>
#include <arrow/io/file.h>
#include <arrow/ipc/reader.h>
#include <arrow/record_batch.h>
#include <arrow/type.h>
#include <parquet/arrow/reader.h>
#include <parquet/file_reader.h>
#include <parquet/metadata.h>

#include <cstring>
#include <string>
#include <vector>

#include "io/error.h"

namespace sedd {

namespace {

// Arrow and Parquet report most problems as a Status, a few (deep in Parquet) as exceptions.
void check_status(const arrow::Status& status, std::string_view path, std::string_view what,
                  std::string_view hint = "") {
  if (!status.ok()) fail_input("{}: {} ({}){}", path, what, status.message(), hint);
}

template <typename T>
T value_or_fail(arrow::Result<T> result, std::string_view path, std::string_view what, std::string_view hint = "") {
  check_status(result.status(), path, what, hint);
  return std::move(result).ValueOrDie();
}

// Offsets and lengths come from the file: check them before any string is viewed. The bytes are
// checked as binary; UTF-8 is the caller's (check_utf8 names the row and byte).
arrow::Status check_layout(const arrow::Array& a) {
  auto data = std::make_shared<arrow::ArrayData>(*a.data());
  data->type = a.type_id() == arrow::Type::LARGE_STRING ? arrow::large_binary() : arrow::binary();
  return arrow::MakeArray(data)->ValidateFull();
}

template <typename Fn>
auto guarded(std::string_view path, std::string_view what, Fn&& fn) {
  try {
    return fn();
  } catch (const Error&) {
    throw;
  } catch (const std::exception& e) {
    fail_input("{}: {} ({})", path, what, e.what());
  }
}

// Index of the string column `field` in `schema`; throws naming the file otherwise.
int text_column(const arrow::Schema& schema, std::string_view path, std::string_view field) {
  auto found = schema.GetAllFieldIndices(std::string(field));
  if (found.empty()) {
    std::string names;
    for (const auto& f : schema.fields()) names += (names.empty() ? "" : ", ") + f->name();
    fail_input("{}: no column '{}' (columns: {}); name the text column with --field", path, field, names);
  }
  SEDD_CHECK_INPUT(found.size() == 1, "{}: column '{}' appears {} times", path, field, found.size());
  const auto& type = *schema.field(found[0])->type();
  SEDD_CHECK_INPUT(type.id() == arrow::Type::STRING || type.id() == arrow::Type::LARGE_STRING,
                   "{}: column '{}' has type {}, expected string or large_string", path, field, type.ToString());
  return found[0];
}

// Walks the chunks of one row group / record batch after another; subclasses load the next one.
class ChunkedTextReader : public ColumnarTextReader {
 public:
  ChunkedTextReader(std::string_view path, std::string_view field) : path_(path), field_(field) {}

  bool next(std::string_view& text) override {
    for (;;) {
      if (chunk_ < chunks_.size()) {
        const arrow::Array& a = *chunks_[chunk_];
        if (pos_ < a.length()) {
          ++row_;
          SEDD_CHECK_INPUT(!a.IsNull(pos_), "{}: row {}: column '{}' is null (every row needs a text)", path_, row_,
                           field_);
          text = a.type_id() == arrow::Type::LARGE_STRING ? static_cast<const arrow::LargeStringArray&>(a).GetView(pos_)
                                                          : static_cast<const arrow::StringArray&>(a).GetView(pos_);
          ++pos_;
          return true;
        }
        ++chunk_;
        pos_ = 0;
        continue;
      }
      if (one_part_ && part_loaded_) return false;
      chunks_.clear();
      chunk_ = 0;
      pos_ = 0;
      part_loaded_ = true;
      std::string part;
      if (!guarded(path_, "read error", [&] { return load(chunks_, part); })) return false;
      for (const auto& c : chunks_) {
        SEDD_CHECK_INPUT(c->type_id() == arrow::Type::STRING || c->type_id() == arrow::Type::LARGE_STRING,
                         "{}: {}: column '{}' holds {}, not strings", path_, part, field_, c->type()->ToString());
        check_status(check_layout(*c), path_, fmt::format("{} (from row {}): damaged column '{}'", part, row_ + 1, field_));
      }
    }
  }
  int64_t row() const override { return row_; }

  void seek_part(int64_t k) override {
    SEDD_CHECK(k >= 0 && k < parts(), "{}: no part {}", path_, k);
    chunks_.clear();
    chunk_ = 0;
    pos_ = 0;
    row_ = guarded(path_, "read error", [&] { return skip_to(k); }) - 1;
    one_part_ = true;
    part_loaded_ = false;
  }

 protected:
  // The next part's arrays of the text column, and the part's name for messages; false at the end.
  virtual bool load(arrow::ArrayVector& out, std::string& part) = 0;
  // Makes part k the next one load() reads; returns the rows before it.
  virtual int64_t skip_to(int64_t k) = 0;
  std::string path_, field_;

 private:
  arrow::ArrayVector chunks_;
  size_t chunk_ = 0;
  int64_t pos_ = 0, row_ = -1;
  bool one_part_ = false, part_loaded_ = false;
};

class ParquetTextReader final : public ChunkedTextReader {
 public:
  ParquetTextReader(std::string_view path, std::string_view field) : ChunkedTextReader(path, field) {
    auto file = value_or_fail(arrow::io::ReadableFile::Open(path_), path_, "cannot open");
    reader_ = guarded(path_, "not a readable Parquet file", [&] {
      return value_or_fail(parquet::arrow::OpenFile(file, arrow::default_memory_pool()), path_,
                           "not a readable Parquet file");
    });
    std::shared_ptr<arrow::Schema> schema;
    check_status(reader_->GetSchema(&schema), path_, "cannot read the Parquet schema");
    column_ = text_column(*schema, path_, field_);
    row_groups_ = reader_->num_row_groups();
  }
  int64_t parts() override { return row_groups_; }

 private:
  int64_t skip_to(int64_t k) override {
    int64_t rows = 0;
    for (int g = 0; g < k; ++g) rows += reader_->parquet_reader()->metadata()->RowGroup(g)->num_rows();
    next_group_ = static_cast<int>(k);
    return rows;
  }

  bool load(arrow::ArrayVector& out, std::string& part) override {
    if (next_group_ == row_groups_) return false;
    part = fmt::format("row group {}", next_group_);
    std::shared_ptr<arrow::ChunkedArray> column;
    check_status(reader_->RowGroup(next_group_)->Column(column_)->Read(&column), path_,
                 fmt::format("cannot read {}", part), "; the file is damaged");
    ++next_group_;
    out = column->chunks();
    return true;
  }
  std::unique_ptr<parquet::arrow::FileReader> reader_;
  int column_ = 0, row_groups_ = 0, next_group_ = 0;
};

// Hugging Face `datasets` writes streams; pyarrow's new_file and Feather v2 the file format.
class ArrowIpcTextReader final : public ChunkedTextReader {
 public:
  ArrowIpcTextReader(std::string_view path, std::string_view field) : ChunkedTextReader(path, field) {
    // Memory-mapped: batches are zero-copy views, only the text column's pages are touched.
    file_ = value_or_fail(arrow::io::MemoryMappedFile::Open(path_, arrow::io::FileMode::READ), path_, "cannot open");
    size_ = value_or_fail(file_->GetSize(), path_, "cannot open");
    std::string head = prefix(0, std::min<int64_t>(size_, 6));
    SEDD_CHECK_INPUT(head.rfind("PAR1", 0) != 0, "{}: this is a Parquet file, not Arrow IPC; use --format parquet",
                     path_);
    auto options = arrow::ipc::IpcReadOptions::Defaults();
    if (head == "ARROW1") {
      const char* what = "not a readable Arrow IPC file", *hint = "; it may be truncated";
      auto probe = value_or_fail(arrow::ipc::RecordBatchFileReader::Open(file_, options), path_, what, hint);
      options.included_fields = {text_column(*probe->schema(), path_, field_)};
      file_reader_ = value_or_fail(arrow::ipc::RecordBatchFileReader::Open(file_, options), path_, what, hint);
      batches_ = file_reader_->num_record_batches();
    } else {
      const char* what = "not a readable Arrow IPC stream";
      auto schema = value_or_fail(arrow::ipc::RecordBatchStreamReader::Open(file_, options), path_, what)->schema();
      options.included_fields = {text_column(*schema, path_, field_)};
      check_status(file_->Seek(0), path_, "cannot read");
      stream_reader_ = value_or_fail(arrow::ipc::RecordBatchStreamReader::Open(file_, options), path_, what);
    }
    options_ = options;
  }

  int64_t parts() override {
    if (file_reader_) return batches_;
    if (stream_batches_ < 0) {
      // A second reader over the mapped file counts the batches (only their metadata is touched).
      auto counter = value_or_fail(arrow::ipc::RecordBatchStreamReader::Open(
                                       value_or_fail(arrow::io::MemoryMappedFile::Open(path_, arrow::io::FileMode::READ),
                                                     path_, "cannot open"),
                                       options_),
                                   path_, "not a readable Arrow IPC stream");
      int64_t n = 0;
      for (;;) {
        std::shared_ptr<arrow::RecordBatch> batch;
        check_status(counter->ReadNext(&batch), path_, fmt::format("cannot read record batch {}", n),
                     "; the file is truncated or damaged");
        if (!batch) break;
        ++n;
      }
      static const char kEnd[8] = {'\xff', '\xff', '\xff', '\xff', 0, 0, 0, 0};
      SEDD_CHECK_INPUT(size_ >= 8 && std::memcmp(prefix(size_ - 8, 8).data(), kEnd, 8) == 0,
                       "{}: the Arrow IPC stream ends after {} record batches without its end-of-stream marker; "
                       "the file is truncated (or its writer was never closed)",
                       path_, n);
      stream_batches_ = n;
    }
    return stream_batches_;
  }

 private:
  int64_t skip_to(int64_t k) override {
    if (file_reader_) {
      for (; skipped_ < k; ++skipped_)
        skipped_rows_ += value_or_fail(file_reader_->ReadRecordBatch(static_cast<int>(skipped_)), path_,
                                       fmt::format("cannot read record batch {}", skipped_))->num_rows();
      if (k < skipped_) {  // backwards: count again from the start
        skipped_ = 0;
        skipped_rows_ = 0;
        return skip_to(k);
      }
      next_batch_ = static_cast<int>(k);
      return skipped_rows_;
    }
    SEDD_CHECK(k >= next_batch_, "{}: an Arrow IPC stream is read forwards only (record batch {} after {})", path_, k,
               next_batch_);
    while (next_batch_ < k) {
      std::shared_ptr<arrow::RecordBatch> batch;
      check_status(stream_reader_->ReadNext(&batch), path_, fmt::format("cannot read record batch {}", next_batch_),
                   "; the file is truncated or damaged");
      SEDD_CHECK_INPUT(batch != nullptr, "{}: no record batch {}", path_, k);
      stream_rows_ += batch->num_rows();
      ++next_batch_;
    }
    return stream_rows_;
  }

  std::string prefix(int64_t offset, int64_t n) {
    auto buf = value_or_fail(file_->ReadAt(offset, n), path_, "cannot read");
    return std::string(reinterpret_cast<const char*>(buf->data()), buf->size());
  }

  bool load(arrow::ArrayVector& out, std::string& part) override {
    part = fmt::format("record batch {}", next_batch_);
    std::shared_ptr<arrow::RecordBatch> batch;
    if (file_reader_) {
      if (next_batch_ == batches_) return false;
      batch = value_or_fail(file_reader_->ReadRecordBatch(next_batch_), path_, fmt::format("cannot read {}", part),
                            "; the file is truncated or damaged");
    } else {
      check_status(stream_reader_->ReadNext(&batch), path_, fmt::format("cannot read {}", part),
                   "; the file is truncated or damaged");
      if (!batch) {
        // A stream cut at a message boundary reads like a short one: only the end-of-stream
        // marker (continuation 0xFFFFFFFF, length 0) that a closed writer appends tells them apart.
        static const char kEnd[8] = {'\xff', '\xff', '\xff', '\xff', 0, 0, 0, 0};
        SEDD_CHECK_INPUT(size_ >= 8 && std::memcmp(prefix(size_ - 8, 8).data(), kEnd, 8) == 0,
                         "{}: the Arrow IPC stream ends after {} record batches without its end-of-stream marker; "
                         "the file is truncated (or its writer was never closed)",
                         path_, next_batch_);
        return false;
      }
    }
    ++next_batch_;
    if (stream_reader_) stream_rows_ += batch->num_rows();
    out = {batch->column(0)};
    return true;
  }

  std::shared_ptr<arrow::io::MemoryMappedFile> file_;
  std::shared_ptr<arrow::ipc::RecordBatchFileReader> file_reader_;
  std::shared_ptr<arrow::ipc::RecordBatchStreamReader> stream_reader_;
  arrow::ipc::IpcReadOptions options_ = arrow::ipc::IpcReadOptions::Defaults();
  int64_t size_ = 0, stream_batches_ = -1, stream_rows_ = 0, skipped_ = 0, skipped_rows_ = 0;
  int batches_ = 0, next_batch_ = 0;
};

}  // namespace

std::unique_ptr<ColumnarTextReader> open_columnar_text(std::string_view path, ColumnarFormat format,
                                                       std::string_view field) {
  const char* what = format == ColumnarFormat::Parquet ? "cannot read as Parquet" : "cannot read as Arrow IPC";
  return guarded(path, what, [&]() -> std::unique_ptr<ColumnarTextReader> {
    if (format == ColumnarFormat::Parquet) return std::make_unique<ParquetTextReader>(path, field);
    return std::make_unique<ArrowIpcTextReader>(path, field);
  });
}

}  // namespace sedd
