// Corpus preparation; see prepare.h. Part files (OUT/.sedd-prepare/parts/part-NNNNNNN.bin):
// the part's tokens (uint32, each document followed by end-of-text), then its documents' token
// counts (uint32), then a footer: tokens, documents, input bytes (int64 each) and "SEDDPRT1".
#include "data/prepare.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <exception>
#include <filesystem>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <thread>

#include "data/detokenizer.h"
#include "data/shard.h"
#include "data/text_source.h"
#include "data/tokenizer.h"
#include "io/error.h"
#include "io/fs.h"

namespace sedd {

namespace stdfs = std::filesystem;

std::string prepare_state_dir(const std::string& out) { return out + "/.sedd-prepare"; }

namespace {

constexpr char kPartMagic[8] = {'S', 'E', 'D', 'D', 'P', 'R', 'T', '1'};
constexpr int64_t kPartFooter = 32;

bool prep_is_state(const stdfs::path& p) {
  const std::string name = p.filename().string();
  return name == ".sedd-prepare" || name.rfind(".staging-r", 0) == 0;
}
bool prep_is_shard(const stdfs::directory_entry& e) {
  const std::string name = e.path().filename().string();
  return e.is_regular_file() && name.rfind("shard-", 0) == 0 && e.path().extension() == ".h5";
}
// A train/ or valid/ folder that holds shards only (an earlier run with a held-out split).
bool prep_is_split_folder(const stdfs::directory_entry& e) {
  const std::string name = e.path().filename().string();
  if (!e.is_directory() || (name != "train" && name != "valid")) return false;
  for (const auto& f : stdfs::directory_iterator(e.path()))
    if (!prep_is_shard(f)) return false;
  return true;
}

struct PartFooter {
  int64_t tokens = 0, documents = 0, bytes = 0;
};

// The footer of a complete part file; throws naming the file when it is damaged.
PartFooter prep_read_footer(const std::string& path) {
  std::FILE* f = std::fopen(path.c_str(), "rb");
  SEDD_CHECK(f, "{}: cannot open ({})", path, std::strerror(errno));
  PartFooter ft;
  char magic[8] = {};
  const bool ok = std::fseek(f, -kPartFooter, SEEK_END) == 0 && std::fread(&ft.tokens, 8, 1, f) == 1 &&
                  std::fread(&ft.documents, 8, 1, f) == 1 && std::fread(&ft.bytes, 8, 1, f) == 1 &&
                  std::fread(magic, 8, 1, f) == 1;
  const long size = (std::fseek(f, 0, SEEK_END) == 0) ? std::ftell(f) : -1;
  std::fclose(f);
  SEDD_CHECK(ok && std::memcmp(magic, kPartMagic, 8) == 0 &&
                 size == 4 * (ft.tokens + ft.documents) + kPartFooter,
             "{}: damaged part file of an unfinished run; remove the folder's .sedd-prepare and run again", path);
  return ft;
}

// Reads `count` uint32 values at element offset `first` of an open part file.
void prep_read_u32(int fd, const std::string& path, int64_t first, int64_t count, uint32_t* out) {
  auto* p = reinterpret_cast<char*>(out);
  int64_t want = count * 4, off = first * 4;
  while (want > 0) {
    const ssize_t got = ::pread(fd, p, static_cast<size_t>(want), off);
    SEDD_CHECK(got > 0, "{}: read error ({})", path, got < 0 ? std::strerror(errno) : "unexpected end");
    p += got;
    off += got;
    want -= got;
  }
}

std::string prep_describe(const nlohmann::json& v) { return v.is_string() ? v.get<std::string>() : v.dump(); }

}  // namespace

void check_output_folder(const std::string& out, bool overwrite) {
  if (!stdfs::exists(out)) return;
  SEDD_CHECK_OPTION(stdfs::is_directory(out), "--out {}: exists and is not a folder", out);
  std::vector<std::string> shards, others;
  for (const auto& e : stdfs::directory_iterator(out)) {
    if (prep_is_state(e.path())) continue;
    (prep_is_shard(e) || prep_is_split_folder(e) ? shards : others).push_back(e.path().filename().string());
  }
  std::sort(shards.begin(), shards.end());
  std::sort(others.begin(), others.end());
  if (!others.empty())
    fail_option("--out {}: the folder holds '{}'{}, which is not a shard of sedd-prepare; choose an empty or new "
                "folder{}",
                out, others.front(), others.size() > 1 ? fmt::format(" and {} more entries", others.size() - 1) : "",
                overwrite ? " (--overwrite replaces shard-*.h5 files only)" : "");
  if (!shards.empty() && !overwrite)
    fail_option("--out {}: the folder already holds {} shard(s) ({}{}); new shards would mix with them: choose an "
                "empty or new folder, or pass --overwrite to replace them",
                out, shards.size(), shards.front(), shards.size() > 1 ? ", ..." : "");
}

void remove_published_shards(const std::string& out) {
  for (const std::string dir : {out, out + "/train", out + "/valid"}) {
    if (!stdfs::is_directory(dir)) continue;
    std::vector<stdfs::path> old;
    for (const auto& e : stdfs::directory_iterator(dir))
      if (prep_is_shard(e)) old.push_back(e.path());
    for (const auto& p : old) stdfs::remove(p);
    if (dir != out && stdfs::is_empty(dir)) stdfs::remove(dir);
  }
}

Preparation::Preparation(PrepareOptions opt) : opt_(std::move(opt)) {
  SEDD_CHECK_OPTION(!opt_.inputs.empty(), "--input: no input files given");
  SEDD_CHECK_OPTION(!opt_.out.empty(), "--out: an output folder is required");
  SEDD_CHECK_OPTION(opt_.shard_tokens > 0, "--shard-tokens must be positive, got {}", opt_.shard_tokens);
  SEDD_CHECK_OPTION(opt_.threads >= 1, "--threads must be at least 1, got {}", opt_.threads);
  SEDD_CHECK_OPTION(opt_.part_bytes >= 0, "--part-bytes must not be negative, got {}", opt_.part_bytes);
  SEDD_CHECK_OPTION(opt_.valid_docs >= 0, "--valid-docs must not be negative, got {}", opt_.valid_docs);
  SEDD_CHECK_OPTION(opt_.valid_every == 0 || opt_.valid_every >= 2, "--valid-every must be at least 2, got {}",
                    opt_.valid_every);
  SEDD_CHECK_OPTION(opt_.valid_docs == 0 || opt_.valid_every == 0, "--valid-docs and --valid-every: give one of them");
  std::map<std::string, std::string> seen;  // resolved path -> as given
  nlohmann::json inputs = nlohmann::json::array();
  int64_t total_bytes = 0;
  for (const auto& in : opt_.inputs) {
    SEDD_CHECK_INPUT(stdfs::exists(in), "{}: no such input file", in);
    // A file given twice would be tokenized twice: duplicated documents.
    auto [it, fresh] = seen.emplace(stdfs::weakly_canonical(in).string(), in);
    SEDD_CHECK_OPTION(fresh, "--input: {} is given twice{}", in,
                      it->second == in ? std::string() : fmt::format(" (also as {})", it->second));
    formats_.push_back(opt_.format ? *opt_.format : input_format_of(in));
    check_format_supported(in, formats_.back());
    const auto size = static_cast<int64_t>(stdfs::file_size(in));
    SEDD_CHECK_INPUT(size > 0, "{}: empty input file", in);
    total_bytes += size;
    const auto mtime = stdfs::last_write_time(in).time_since_epoch().count();
    inputs.push_back({{"path", it->first}, {"size", size}, {"modified", mtime}, {"format", format_name(formats_.back())}});
  }
  // Parts of about 1/256 of the input, 64 KiB to 64 MiB: enough to share among ranks and threads,
  // few enough files. A function of the inputs alone, so a rerun finds the same parts.
  if (opt_.part_bytes == 0) opt_.part_bytes = std::clamp<int64_t>(total_bytes / 256, 64 << 10, 64 << 20);
  tok_ = make_tokenizer(opt_.tokenizer);
  for (size_t f = 0; f < opt_.inputs.size(); ++f) {
    auto source = open_documents(opt_.inputs[f], formats_[f], opt_.field);
    const int64_t n = source->parts(opt_.part_bytes);
    const int64_t size = static_cast<int64_t>(stdfs::file_size(opt_.inputs[f]));
    for (int64_t k = 0; k < n; ++k) parts_.push_back({static_cast<int>(f), k, std::max<int64_t>(1, size / n)});
  }
  // What the shards depend on; a rerun must match it to continue an unfinished run.
  nlohmann::json m;
  m["inputs"] = inputs;
  m["field"] = opt_.field;
  m["tokenizer"] = fs::content_hash(tok_->serialize());
  m["detokenizer"] = detokenizer_name(opt_.detokenizer);
  m["skip_empty"] = opt_.skip_empty;
  m["shard_tokens"] = opt_.shard_tokens;
  m["part_bytes"] = opt_.part_bytes;
  m["valid_docs"] = opt_.valid_docs;
  m["valid_every"] = opt_.valid_every;
  manifest_ = m.dump(1);
}

Preparation::~Preparation() = default;

std::string Preparation::part_path(size_t i) const {
  return fmt::format("{}/parts/part-{:07d}.bin", prepare_state_dir(opt_.out), i);
}

int64_t Preparation::open_output() {
  const std::string state = prepare_state_dir(opt_.out);
  const std::string manifest_path = state + "/manifest.json";
  if (stdfs::exists(manifest_path)) {
    const auto there = nlohmann::json::parse(fs::read_text(manifest_path), nullptr, false);
    const auto here = nlohmann::json::parse(manifest_);
    if (there != here) {
      // Name the first argument that differs (in the manifest's order).
      std::string option = "the arguments", detail;
      if (there.is_object())
        for (auto it = here.begin(); it != here.end(); ++it) {
          if (there.contains(it.key()) && there[it.key()] == it.value()) continue;
          option = it.key() == "inputs" ? "--input" : "--" + it.key();
          std::replace(option.begin(), option.end(), '_', '-');
          detail = it.key() == "inputs" ? " (the files, their sizes or times)"
                                        : fmt::format(": {} there, {} here",
                                                      there.contains(it.key()) ? prep_describe(there[it.key()]) : "unset",
                                                      prep_describe(it.value()));
          break;
        }
      if (!opt_.overwrite)
        fail_option("--out {}: holds an unfinished sedd-prepare run with other arguments ({} differs{}); rerun it with "
                    "the same arguments to continue it, or pass --overwrite to discard it",
                    opt_.out, option, detail);
      stdfs::remove_all(state);
    }
  } else if (stdfs::exists(state)) {
    stdfs::remove_all(state);  // killed before its manifest was written: nothing to continue
  }
  check_output_folder(opt_.out, opt_.overwrite);
  stdfs::create_directories(state + "/parts");
  if (!stdfs::exists(manifest_path)) fs::write_text_atomic(manifest_path, manifest_);
  int64_t done = 0;
  for (size_t i = 0; i < parts_.size(); ++i) done += stdfs::exists(part_path(i));
  return done;
}

void Preparation::tokenize_part(size_t i, std::unique_ptr<DocumentSource>& source, int64_t& source_part,
                                PrepareProgress& done) {
  const Part& part = parts_[i];
  const std::string& path = opt_.inputs[part.file];
  // A reader moves forwards through its file (an Arrow stream can only): reopened to go back.
  if (!source || source_part >= part.index) source = open_documents(path, formats_[part.file], opt_.field);
  source->seek_part(part.index, opt_.part_bytes);
  source_part = part.index;
  const std::string final_path = part_path(i);
  const std::string tmp = fs::temp_name(final_path) + fmt::format(".{}", std::hash<std::thread::id>()(std::this_thread::get_id()));
  std::FILE* f = std::fopen(tmp.c_str(), "wb");
  SEDD_CHECK(f, "{}: cannot write ({})", tmp, std::strerror(errno));
  std::vector<char> buffer(1 << 20);
  std::setvbuf(f, buffer.data(), _IOFBF, buffer.size());
  std::vector<uint32_t> lengths, ids32;
  PartFooter ft;
  std::string text;
  const int64_t bos = tok_->bos_id(), eot = tok_->eot_id();
  const int64_t bytes_before = source->bytes_read();
  try {
    while (source->next(text)) {
      if (first_invalid_utf8(text) != std::string::npos) check_utf8(text, source->where());
      if (opt_.detokenizer != Detokenizer::None) text = detokenize(opt_.detokenizer, text);
      if (opt_.skip_empty && text.empty()) continue;
      const auto ids = tok_->encode(text);
      ids32.clear();
      if (bos >= 0) ids32.push_back(static_cast<uint32_t>(bos));
      for (auto id : ids) ids32.push_back(static_cast<uint32_t>(id));
      ids32.push_back(static_cast<uint32_t>(eot));
      SEDD_CHECK(std::fwrite(ids32.data(), 4, ids32.size(), f) == ids32.size(), "{}: write error", tmp);
      lengths.push_back(static_cast<uint32_t>(ids32.size()));
      ft.tokens += static_cast<int64_t>(ids32.size());
      ++ft.documents;
      ++done.documents;
      done.tokens += static_cast<int64_t>(ids32.size());
    }
    ft.bytes = source->bytes_read() - bytes_before;
    done.bytes += ft.bytes;
    SEDD_CHECK(std::fwrite(lengths.data(), 4, lengths.size(), f) == lengths.size() &&
                   std::fwrite(&ft.tokens, 8, 1, f) == 1 && std::fwrite(&ft.documents, 8, 1, f) == 1 &&
                   std::fwrite(&ft.bytes, 8, 1, f) == 1 && std::fwrite(kPartMagic, 8, 1, f) == 1,
               "{}: write error", tmp);
    SEDD_CHECK(std::fclose(f) == 0, "{}: write error ({})", tmp, std::strerror(errno));
    f = nullptr;
    stdfs::rename(tmp, final_path);
  } catch (...) {
    if (f) std::fclose(f);
    std::error_code ec;
    stdfs::remove(tmp, ec);
    throw;
  }
}

PrepareStats Preparation::tokenize(int rank, int world, const std::function<void(const PrepareProgress&)>& progress) {
  PrepareStats st;
  st.parts = static_cast<int64_t>(parts_.size());
  std::vector<size_t> todo;
  PrepareProgress total;
  for (size_t i = static_cast<size_t>(rank); i < parts_.size(); i += static_cast<size_t>(world)) {
    if (stdfs::exists(part_path(i))) {
      ++st.parts_resumed;
      continue;
    }
    todo.push_back(i);
    total.bytes_total += parts_[i].bytes;
  }
  const int threads = std::max(1, std::min<int>(opt_.threads, static_cast<int>(todo.size())));
  std::atomic<size_t> next{0};
  std::atomic<bool> stop{false};
  std::mutex mutex;
  std::exception_ptr error;
  size_t error_part = SIZE_MAX;
  std::vector<PrepareProgress> done(static_cast<size_t>(threads));
  auto worker = [&](int t) {
    std::map<int, std::pair<std::unique_ptr<DocumentSource>, int64_t>> sources;  // file -> reader, its part
    for (size_t k; !stop && (k = next.fetch_add(1)) < todo.size();) {
      const size_t i = todo[k];
      try {
        auto& [source, at] = sources.try_emplace(parts_[i].file, nullptr, -1).first->second;
        PrepareProgress mine = done[t];
        tokenize_part(i, source, at, mine);
        std::lock_guard<std::mutex> lock(mutex);
        done[t] = mine;
      } catch (...) {
        std::lock_guard<std::mutex> lock(mutex);
        if (i < error_part) {  // the first bad part in input order is the one reported
          error_part = i;
          error = std::current_exception();
        }
        stop = true;
      }
    }
  };
  std::vector<std::thread> pool;
  for (int t = 1; t < threads; ++t) pool.emplace_back(worker, t);
  bool finished = false;
  std::condition_variable wake;
  std::thread reporter;
  if (progress && !todo.empty())
    reporter = std::thread([&] {
      std::unique_lock<std::mutex> lock(mutex);
      while (!wake.wait_for(lock, std::chrono::milliseconds(200), [&] { return finished; })) {
        PrepareProgress now = total;
        for (const auto& d : done) {
          now.bytes += d.bytes;
          now.documents += d.documents;
          now.tokens += d.tokens;
        }
        lock.unlock();
        progress(now);
        lock.lock();
      }
    });
  worker(0);
  for (auto& t : pool) t.join();
  {
    std::lock_guard<std::mutex> lock(mutex);
    finished = true;
  }
  wake.notify_all();
  if (reporter.joinable()) reporter.join();
  if (error) std::rethrow_exception(error);
  for (const auto& d : done) st.bytes += d.bytes;
  return st;
}

PrepareStats Preparation::write_shards(int rank, int world) {
  PrepareStats st;
  st.parts = static_cast<int64_t>(parts_.size());
  const size_t n = parts_.size();
  std::vector<PartFooter> footers(n);
  std::vector<int64_t> file_docs(opt_.inputs.size(), 0);
  int64_t documents = 0;
  for (size_t i = 0; i < n; ++i) {
    SEDD_CHECK(stdfs::exists(part_path(i)), "{}: missing part file (a rank's part was not written)", part_path(i));
    footers[i] = prep_read_footer(part_path(i));
    file_docs[parts_[i].file] += footers[i].documents;
    documents += footers[i].documents;
  }
  for (size_t f = 0; f < opt_.inputs.size(); ++f)
    SEDD_CHECK_INPUT(file_docs[f] > 0, "{}: no documents in the file{}", opt_.inputs[f],
                     opt_.skip_empty ? " (--skip-empty dropped the empty ones)" : "");
  SEDD_CHECK_INPUT(opt_.valid_docs < documents,
                   "--valid-docs {}: the inputs hold {} documents; the training split would be empty", opt_.valid_docs,
                   documents);
  SEDD_CHECK_INPUT(opt_.valid_every <= documents,
                   "--valid-every {}: the inputs hold {} documents; the held-out split would be empty",
                   opt_.valid_every, documents);
  const bool split = has_valid_split();
  auto held_out = [&](int64_t g) {
    return (opt_.valid_every > 0 && (g + 1) % opt_.valid_every == 0) ||
           (opt_.valid_docs > 0 && g >= documents - opt_.valid_docs);
  };
  // Per part and split: tokens and documents (split: from the documents' lengths).
  std::vector<std::vector<uint32_t>> lengths(split ? n : 0);
  std::vector<int64_t> first_doc(n);
  std::vector<std::array<int64_t, 2>> part_tokens(n, {0, 0});
  int64_t g = 0;
  for (size_t i = 0; i < n; ++i) {
    first_doc[i] = g;
    if (!split) {
      part_tokens[i][0] = footers[i].tokens;
      st.train.documents += footers[i].documents;
      g += footers[i].documents;
      continue;
    }
    const int fd = ::open(part_path(i).c_str(), O_RDONLY);
    SEDD_CHECK(fd >= 0, "{}: cannot open ({})", part_path(i), std::strerror(errno));
    lengths[i].resize(static_cast<size_t>(footers[i].documents));
    try {
      prep_read_u32(fd, part_path(i), footers[i].tokens, footers[i].documents, lengths[i].data());
    } catch (...) {
      ::close(fd);
      throw;
    }
    ::close(fd);
    for (uint32_t len : lengths[i]) {
      const int s = held_out(g++) ? 1 : 0;
      part_tokens[i][s] += len;
      (s ? st.valid : st.train).documents += 1;
    }
  }
  const std::string stage = prepare_state_dir(opt_.out) + "/shards";
  for (int s = 0; s < (split ? 2 : 1); ++s) {
    SplitStats& sp = s ? st.valid : st.train;
    std::vector<int64_t> cum(n + 1, 0);  // tokens of this split before part i
    for (size_t i = 0; i < n; ++i) cum[i + 1] = cum[i] + part_tokens[i][s];
    sp.tokens = cum[n];
    sp.shards = (sp.tokens + opt_.shard_tokens - 1) / opt_.shard_tokens;
    const std::string dir = split ? stage + (s ? "/valid" : "/train") : stage;
    stdfs::create_directories(dir);
    std::vector<uint32_t> buf;
    for (int64_t k = rank; k < sp.shards; k += world) {
      const int64_t lo = k * opt_.shard_tokens, hi = std::min(sp.tokens, lo + opt_.shard_tokens);
      buf.assign(static_cast<size_t>(hi - lo), 0);
      size_t i = static_cast<size_t>(std::upper_bound(cum.begin(), cum.end(), lo) - cum.begin()) - 1;
      for (; i < n && cum[i] < hi; ++i) {
        if (part_tokens[i][s] == 0) continue;
        const int fd = ::open(part_path(i).c_str(), O_RDONLY);
        SEDD_CHECK(fd >= 0, "{}: cannot open ({})", part_path(i), std::strerror(errno));
        // Copies [a, b) of the split's tokens, which start at part offset `at`.
        auto copy = [&](int64_t split_at, int64_t part_at, int64_t count) {
          const int64_t a = std::max(split_at, lo), b = std::min(split_at + count, hi);
          if (a < b) prep_read_u32(fd, part_path(i), part_at + (a - split_at), b - a, buf.data() + (a - lo));
        };
        try {
          if (!split) {
            copy(cum[i], 0, footers[i].tokens);
          } else {
            int64_t split_at = cum[i], part_at = 0;
            for (size_t d = 0; d < lengths[i].size() && split_at < hi; ++d) {
              const int64_t len = lengths[i][d];
              if ((held_out(first_doc[i] + static_cast<int64_t>(d)) ? 1 : 0) == s) {
                copy(split_at, part_at, len);
                split_at += len;
              }
              part_at += len;
            }
          }
        } catch (...) {
          ::close(fd);
          throw;
        }
        ::close(fd);
      }
      auto tokens = torch::from_blob(buf.data(), {static_cast<int64_t>(buf.size())}, torch::kInt32);
      write_shard(fmt::format("{}/shard-{:05d}.h5", dir, k), tokens, tok_->vocab_size(), tok_->eot_id(),
                  tok_->serialize());
    }
  }
  return st;
}

void Preparation::publish() {
  const std::string stage = prepare_state_dir(opt_.out) + "/shards";
  if (opt_.overwrite) remove_published_shards(opt_.out);
  auto move_all = [&](const std::string& from, const std::string& to) {
    if (!stdfs::exists(from)) return;
    stdfs::create_directories(to);
    std::vector<stdfs::path> files;
    for (const auto& e : stdfs::directory_iterator(from))
      if (prep_is_shard(e)) files.push_back(e.path());
    std::sort(files.begin(), files.end());
    for (const auto& p : files) stdfs::rename(p, stdfs::path(to) / p.filename());
  };
  if (has_valid_split()) {
    move_all(stage + "/train", opt_.out + "/train");
    move_all(stage + "/valid", opt_.out + "/valid");
  } else {
    move_all(stage, opt_.out);
  }
  fs::fsync_path(opt_.out);
  stdfs::remove_all(prepare_state_dir(opt_.out));
}

void Preparation::discard() {
  std::error_code ec;
  stdfs::remove_all(prepare_state_dir(opt_.out), ec);
}

}  // namespace sedd
