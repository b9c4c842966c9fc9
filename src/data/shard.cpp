// Token shards; see shard.h.
#include "data/shard.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <glob.h>
#include <unistd.h>

#include <climits>

#include <algorithm>
#include <filesystem>
#include <sstream>

#include "io/error.h"
#include "io/fs.h"
#include "io/hdf5.h"

namespace sedd {

namespace {
// Copies n stored ids into int64 and returns the largest (one pass: validation for free).
template <typename T>
int64_t widen(const T* src, int64_t n, int64_t* out) {
  T m = 0;
  for (int64_t i = 0; i < n; ++i) {
    out[i] = src[i];
    m = std::max(m, src[i]);
  }
  return static_cast<int64_t>(m);
}
}  // namespace

class H5Fallback {
 public:
  explicit H5Fallback(const std::string& path) : file(path, h5::Mode::Read) {}
  h5::File file;
};

ShardReader::ShardReader(const ShardInfo& info) : info_(info) {
  elem_ = info.dtype == torch::kUInt16 ? 2 : 4;
  {
    h5::H5Guard guard;
    h5::Handle file(H5Fopen(info.path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT), H5Fclose);
    SEDD_CHECK_INPUT(file.valid(), "{}: cannot open (truncated or damaged?)", info.path);
    h5::Handle ds(H5Dopen2(file.get(), "/tokens", H5P_DEFAULT), H5Dclose);
    SEDD_CHECK_INPUT(ds.valid(), "{}: cannot open /tokens", info.path);
    h5::Handle dcpl(H5Dget_create_plist(ds.get()), H5Pclose);
    h5::Handle type(H5Dget_type(ds.get()), H5Tclose);
    bool little = H5Tget_order(type.get()) == H5T_ORDER_LE;
    bool plain = H5Pget_nfilters(dcpl.get()) == 0 && little;
    H5D_layout_t layout = H5Pget_layout(dcpl.get());
    if (plain && layout == H5D_CONTIGUOUS) {
      haddr_t off = H5Dget_offset(ds.get());
      if (off != HADDR_UNDEF) extents_.push_back({0, info.tokens, static_cast<int64_t>(off)});
    } else if (plain && layout == H5D_CHUNKED) {
      h5::Handle space(H5Dget_space(ds.get()), H5Sclose);
      hsize_t nchunks = 0, chunk_dim = 0;
      H5Dget_num_chunks(ds.get(), space.get(), &nchunks);
      H5Pget_chunk(dcpl.get(), 1, &chunk_dim);
      bool complete = nchunks == (static_cast<hsize_t>(info.tokens) + chunk_dim - 1) / std::max<hsize_t>(1, chunk_dim);
      for (hsize_t i = 0; complete && i < nchunks; ++i) {
        hsize_t coord = 0, size = 0;
        haddr_t addr = 0;
        unsigned mask = 0;
        if (H5Dget_chunk_info(ds.get(), space.get(), i, &coord, &mask, &addr, &size) < 0 || addr == HADDR_UNDEF) {
          complete = false;
          break;
        }
        int64_t n = std::min<int64_t>(static_cast<int64_t>(chunk_dim), info.tokens - static_cast<int64_t>(coord));
        extents_.push_back({static_cast<int64_t>(coord), n, static_cast<int64_t>(addr)});
      }
      if (!complete) extents_.clear();
      std::sort(extents_.begin(), extents_.end(), [](auto& a, auto& b) { return a.first_token < b.first_token; });
    }
  }
  if (extents_.empty()) {
    fallback_ = std::make_unique<H5Fallback>(info.path);
    return;
  }
  int fd = ::open(info.path.c_str(), O_RDONLY);
  SEDD_CHECK(fd >= 0, "{}: cannot open for reading", info.path);
  struct stat st {};
  ::fstat(fd, &st);
  map_size_ = static_cast<size_t>(st.st_size);
  // Every extent must lie inside the file: a truncated shard is refused here, never read as
  // garbage (or a SIGBUS) later.
  for (const auto& e : extents_) {
    if (e.file_offset + e.tokens * elem_ > static_cast<int64_t>(map_size_)) {
      ::close(fd);
      fail_input("{}: the file is truncated (tokens {}..{} lie past its end)", info.path, e.first_token,
                 e.first_token + e.tokens);
    }
  }
  void* m = ::mmap(nullptr, map_size_, PROT_READ, MAP_SHARED, fd, 0);
  ::close(fd);
  SEDD_CHECK(m != MAP_FAILED, "{}: cannot memory-map the file", info.path);
  map_ = static_cast<const unsigned char*>(m);
}

ShardReader::~ShardReader() {
  if (map_) ::munmap(const_cast<unsigned char*>(map_), map_size_);
}

int64_t ShardReader::read(int64_t offset, int64_t count, int64_t* out) {
  SEDD_CHECK(offset >= 0 && offset + count <= info_.tokens, "{}: read past the end of /tokens", info_.path);
  if (fallback_) {
    torch::Tensor buf = torch::from_blob(out, {count}, torch::kInt64);
    fallback_->file.read_range("/tokens", offset, count, buf);
    return buf.max().item<int64_t>();
  }
  int64_t hi = 0;
  // The extent holding `offset`, then as many following ones as the window spans.
  auto it = std::upper_bound(extents_.begin(), extents_.end(), offset,
                             [](int64_t v, const Extent& e) { return v < e.first_token; }) - 1;
  int64_t done = 0;
  while (done < count) {
    int64_t pos = offset + done, in_extent = pos - it->first_token;
    int64_t n = std::min(count - done, it->tokens - in_extent);
    const unsigned char* bytes = map_ + it->file_offset + in_extent * elem_;
    int64_t m = elem_ == 2 ? widen(reinterpret_cast<const uint16_t*>(bytes), n, out + done)
                           : widen(reinterpret_cast<const uint32_t*>(bytes), n, out + done);
    hi = std::max(hi, m);
    done += n;
    ++it;
  }
  return hi;
}

ShardInfo read_shard_info(const std::string& path) {
  h5::File f(path, h5::Mode::Read);
  ShardInfo info;
  info.path = path;
  SEDD_CHECK_INPUT(f.exists("/tokens"), "{}: not a token shard: dataset /tokens is missing", path);
  for (const char* attr : {"vocab_size", "eot_id", "tokenizer", "format_version"})
    SEDD_CHECK_INPUT(f.has_attr("/", attr), "{}: not a token shard: root attribute '{}' is missing", path, attr);
  int64_t version = f.attr_int("/", "format_version");
  SEDD_CHECK_INPUT(version == kShardFormatVersion, "{}: shard format_version {} is not supported (expected {})", path,
                   version, kShardFormatVersion);
  auto shape = f.shape("/tokens");
  SEDD_CHECK_INPUT(shape.size() == 1, "{}: /tokens must be 1-D, found {} dimensions", path, shape.size());
  info.tokens = shape[0];
  info.dtype = f.stored_dtype("/tokens");
  SEDD_CHECK_INPUT(info.dtype == torch::kUInt16 || info.dtype == torch::kUInt32,
                   "{}: /tokens has dtype {}, expected uint16 or uint32", path, c10::toString(info.dtype));
  info.vocab_size = f.attr_int("/", "vocab_size");
  info.eot_id = f.attr_int("/", "eot_id");
  info.tokenizer = f.attr_string("/", "tokenizer");
  if (f.has_attr("/", "tokenizer_hash"))  // written since the tokenizer travels with the data
    SEDD_CHECK_INPUT(f.attr_string("/", "tokenizer_hash") == fs::content_hash(info.tokenizer),
                     "{}: the stored tokenizer does not match its tokenizer_hash (damaged file?)", path);
  SEDD_CHECK_INPUT(info.vocab_size >= 2 && info.eot_id >= 0 && info.eot_id < info.vocab_size,
                   "{}: inconsistent attributes vocab_size={} eot_id={}", path, info.vocab_size, info.eot_id);
  SEDD_CHECK_INPUT(info.dtype == torch::kUInt32 || info.vocab_size <= 65536,
                   "{}: vocab_size {} does not fit the uint16 tokens", path, info.vocab_size);
  return info;
}

std::vector<std::string> expand_shard_list(const std::string& spec) {
  std::vector<std::string> files;
  std::stringstream ss(spec);
  std::string item;
  while (std::getline(ss, item, ',')) {
    if (item.empty()) continue;
    if (item.find_first_of("*?[") == std::string::npos) {
      SEDD_CHECK_INPUT(std::filesystem::exists(item), "{}: no such shard file", item);
      files.push_back(item);
      continue;
    }
    glob_t g{};
    int rc = glob(item.c_str(), 0, nullptr, &g);
    std::vector<std::string> hits(g.gl_pathv, g.gl_pathv + (rc == 0 ? g.gl_pathc : 0));
    globfree(&g);
    SEDD_CHECK_INPUT(!hits.empty(), "{}: the pattern matches no shard files", item);
    std::sort(hits.begin(), hits.end());
    files.insert(files.end(), hits.begin(), hits.end());
  }
  SEDD_CHECK_INPUT(!files.empty(), "no shard files given (empty data list '{}')", spec);
  return files;
}

std::vector<ShardInfo> read_shard_set(const std::string& spec) {
  std::vector<ShardInfo> shards;
  for (const auto& path : expand_shard_list(spec)) shards.push_back(read_shard_info(path));
  const ShardInfo& first = shards.front();
  for (const auto& s : shards)
    SEDD_CHECK_INPUT(s.vocab_size == first.vocab_size && s.eot_id == first.eot_id && s.tokenizer == first.tokenizer,
                     "{}: vocabulary/tokenizer differs from {} (vocab {} vs {}); all shards of a dataset must share "
                     "one",
                     s.path, first.path, s.vocab_size, first.vocab_size);
  return shards;
}

void write_shard(const std::string& path, const torch::Tensor& tokens, int64_t vocab_size, int64_t eot_id,
                 const std::string& tokenizer) {
  auto dtype = vocab_size <= 65536 ? torch::kUInt16 : torch::kUInt32;
  std::string tmp = fs::temp_name(path);
  {
    h5::File f(tmp, h5::Mode::Create);
    f.write("/tokens", tokens.to(torch::kLong).to(dtype), /*chunk_elems=*/1 << 16);
    f.set_attr("/", "vocab_size", vocab_size);
    f.set_attr("/", "eot_id", eot_id);
    f.set_attr("/", "tokenizer", tokenizer);
    f.set_attr("/", "tokenizer_hash", fs::content_hash(tokenizer));
    f.set_attr("/", "format_version", kShardFormatVersion);
    f.close();
  }
  fs::commit_file(tmp, path);
}

ShardWriter::ShardWriter(std::string dir, std::string prefix, int64_t vocab_size, int64_t eot_id,
                         std::string tokenizer, int64_t shard_tokens)
    : dir_(std::move(dir)), prefix_(std::move(prefix)), tokenizer_(std::move(tokenizer)), vocab_(vocab_size),
      eot_(eot_id), shard_tokens_(shard_tokens) {
  SEDD_CHECK(shard_tokens_ > 0, "--shard-tokens must be positive, got {}", shard_tokens_);
  std::filesystem::create_directories(dir_);
}

void ShardWriter::add_document(const std::vector<int64_t>& ids) {
  for (auto id : ids) {
    buffer_.push_back(id);
    if (static_cast<int64_t>(buffer_.size()) == shard_tokens_) flush();
  }
  buffer_.push_back(eot_);
  if (static_cast<int64_t>(buffer_.size()) == shard_tokens_) flush();
  documents_++;
  tokens_ += static_cast<int64_t>(ids.size()) + 1;
}

void ShardWriter::flush() {
  if (buffer_.empty()) return;
  std::string path = fmt::format("{}/{}-{:05d}.h5", dir_, prefix_, written_.size());
  write_shard(path, torch::tensor(buffer_, torch::kLong), vocab_, eot_, tokenizer_);
  written_.push_back(path);
  buffer_.clear();
}

void ShardWriter::finish() { flush(); }

}  // namespace sedd
