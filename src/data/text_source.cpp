// Input documents of the four formats; see text_source.h. Parquet and Arrow go through
// columnar_reader.cpp, which exists only in builds with the Arrow C++ library.
#include "data/text_source.h"

#include <algorithm>
#include <cctype>
#include <climits>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "io/error.h"
#ifdef SEDD_HAVE_ARROW
#include "data/columnar_reader.h"
#endif

namespace sedd {

namespace {

class PlainTextDocument final : public DocumentSource {
 public:
  explicit PlainTextDocument(std::string path) : path_(std::move(path)) {}
  bool next(std::string& text) override {
    if (done_) return false;
    std::ifstream in(path_, std::ios::binary);
    SEDD_CHECK_INPUT(in.good(), "{}: cannot open input", path_);
    text.assign(std::istreambuf_iterator<char>(in), {});
    SEDD_CHECK(!in.bad(), "{}: read error", path_);
    bytes_ = static_cast<int64_t>(text.size());
    done_ = true;
    return true;
  }
  std::string where() const override { return path_; }
  int64_t bytes_read() const override { return bytes_; }
  int64_t parts(int64_t) override { return 1; }
  void seek_part(int64_t k, int64_t) override {
    SEDD_CHECK(k == 0, "{}: a text file is one part", path_);
    done_ = false;
  }

 private:
  std::string path_;
  bool done_ = false;
  int64_t bytes_ = 0;
};

class JsonLinesDocuments final : public DocumentSource {
 public:
  JsonLinesDocuments(std::string path, std::string field)
      : path_(std::move(path)), field_(std::move(field)), in_(path_, std::ios::binary) {
    SEDD_CHECK_INPUT(in_.good(), "{}: cannot open input", path_);
  }
  bool next(std::string& text) override {
    std::string& line = line_;
    while (pos_ < end_ && std::getline(in_, line)) {
      ++line_no_;
      pos_ += static_cast<int64_t>(line.size()) + 1;
      bytes_ += static_cast<int64_t>(line.size()) + 1;
      if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
      nlohmann::json j;
      try {
        j = nlohmann::json::parse(line);
      } catch (const nlohmann::json::exception& e) {
        fail_input("{}:{}: not valid JSON ({})", path_, line_no_, e.what());
      }
      auto it = j.is_object() ? j.find(field_) : j.end();
      SEDD_CHECK_INPUT(it != j.end() && it->is_string(), "{}:{}: no string field '{}' (set --field)", path_, line_no_,
                       field_);
      text = it->get<std::string>();
      return true;
    }
    SEDD_CHECK(!in_.bad(), "{}: read error", path_);
    return false;
  }
  // After seek_part the line number is counted (once, on a message's demand) from the file's start.
  std::string where() const override {
    if (lines_before_ < 0) {
      std::ifstream count(path_, std::ios::binary);
      lines_before_ = 0;
      std::vector<char> buf(1 << 20);
      for (int64_t left = part_start_; left > 0 && count;) {
        count.read(buf.data(), std::min<int64_t>(left, static_cast<int64_t>(buf.size())));
        const auto got = count.gcount();
        lines_before_ += std::count(buf.data(), buf.data() + got, '\n');
        left -= got;
        if (got == 0) break;
      }
    }
    return fmt::format("{}:{}", path_, lines_before_ + line_no_);
  }
  int64_t bytes_read() const override { return bytes_; }
  int64_t parts(int64_t part_bytes) override {
    SEDD_CHECK(part_bytes > 0, "part size must be positive");
    const auto size = static_cast<int64_t>(std::filesystem::file_size(path_));
    return std::max<int64_t>(1, (size + part_bytes - 1) / part_bytes);
  }
  void seek_part(int64_t k, int64_t part_bytes) override {
    const auto size = static_cast<int64_t>(std::filesystem::file_size(path_));
    const int64_t begin = std::min(size, k * part_bytes);
    end_ = std::min(size, begin + part_bytes);
    in_.clear();
    pos_ = begin;
    if (begin > 0) {  // the line that starts before the range is the previous part's
      in_.seekg(begin - 1);
      std::string rest;
      std::getline(in_, rest);
      pos_ = begin - 1 + static_cast<int64_t>(rest.size()) + 1;
    } else {
      in_.seekg(0);
    }
    SEDD_CHECK(!in_.bad(), "{}: read error", path_);
    part_start_ = pos_;
    lines_before_ = pos_ == 0 ? 0 : -1;
    line_no_ = 0;
  }

 private:
  std::string path_, field_, line_;
  std::ifstream in_;
  int64_t line_no_ = 0, bytes_ = 0, pos_ = 0, end_ = INT64_MAX, part_start_ = 0;
  mutable int64_t lines_before_ = 0;
};

#ifdef SEDD_HAVE_ARROW
class ColumnarDocuments final : public DocumentSource {
 public:
  ColumnarDocuments(std::string path, ColumnarFormat format, const std::string& field)
      : path_(std::move(path)), reader_(open_columnar_text(path_, format, field)) {}
  bool next(std::string& text) override {
    std::string_view view;
    if (!reader_->next(view)) return false;
    text.assign(view);
    bytes_ += static_cast<int64_t>(view.size());
    return true;
  }
  std::string where() const override { return fmt::format("{}: row {}", path_, reader_->row()); }
  int64_t bytes_read() const override { return bytes_; }
  int64_t parts(int64_t) override { return reader_->parts(); }
  void seek_part(int64_t k, int64_t) override { reader_->seek_part(k); }

 private:
  std::string path_;
  std::unique_ptr<ColumnarTextReader> reader_;
  int64_t bytes_ = 0;
};
#endif

}  // namespace

InputFormat parse_input_format(const std::string& name) {
  for (auto f : {InputFormat::Text, InputFormat::Jsonl, InputFormat::Parquet, InputFormat::Arrow})
    if (name == format_name(f)) return f;
  fail_option("--format: unknown input format '{}' (text, jsonl, parquet or arrow)", name);
}

InputFormat input_format_of(const std::string& path) {
  std::string ext = std::filesystem::path(path).extension().string();
  std::transform(ext.begin(), ext.end(), ext.begin(), [](unsigned char c) { return std::tolower(c); });
  if (ext == ".parquet") return InputFormat::Parquet;
  if (ext == ".arrow") return InputFormat::Arrow;
  if (ext == ".jsonl" || ext == ".json") return InputFormat::Jsonl;
  return InputFormat::Text;
}

const char* format_name(InputFormat format) {
  switch (format) {
    case InputFormat::Text: return "text";
    case InputFormat::Jsonl: return "jsonl";
    case InputFormat::Parquet: return "parquet";
    case InputFormat::Arrow: return "arrow";
  }
  return "?";
}

bool columnar_input_available() {
#ifdef SEDD_HAVE_ARROW
  return true;
#else
  return false;
#endif
}

void check_format_supported(const std::string& path, InputFormat format) {
  bool columnar = format == InputFormat::Parquet || format == InputFormat::Arrow;
  SEDD_CHECK(!columnar || columnar_input_available(),
             "{}: reading {} files needs sedd built with the Arrow C++ library of pyarrow; install pyarrow into "
             "the virtualenv (launch/setup.sh does) and configure again with -DSEDD_PYTHON=<venv>/bin/python",
             path, format_name(format));
}

std::unique_ptr<DocumentSource> open_documents(const std::string& path, InputFormat format, const std::string& field) {
  switch (format) {
    case InputFormat::Text: return std::make_unique<PlainTextDocument>(path);
    case InputFormat::Jsonl: return std::make_unique<JsonLinesDocuments>(path, field);
    case InputFormat::Parquet:
    case InputFormat::Arrow:
      check_format_supported(path, format);
#ifdef SEDD_HAVE_ARROW
      return std::make_unique<ColumnarDocuments>(
          path, format == InputFormat::Parquet ? ColumnarFormat::Parquet : ColumnarFormat::ArrowIpc, field);
#endif
  }
  fail("{}: unknown input format", path);
}

}  // namespace sedd
