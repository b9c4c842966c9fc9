// Byte and byte-level BPE tokenizers; see tokenizer.h.
#include "data/tokenizer.h"

#include <pcre2.h>
#include <unicode/normalizer2.h>
#include <unicode/uchar.h>
#include <unicode/unistr.h>

#include <array>
#include <atomic>
#include <cctype>
#include <climits>
#include <string_view>
#include <thread>
#include <filesystem>
#include <map>
#include <mutex>
#include <set>
#include <nlohmann/json.hpp>
#include <unordered_map>

#include "io/error.h"
#include "io/fs.h"

namespace sedd {

using json = nlohmann::json;

size_t first_invalid_utf8(std::string_view s) {
  size_t i = 0, n = s.size();
  while (i < n) {
    unsigned char c = s[i];
    if (c < 0x80) {  // ASCII runs, the common case
      ++i;
      continue;
    }
    int len = (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xE ? 3 : (c >> 3) == 0x1E ? 4 : 0;
    bool ok = len > 0 && i + len <= n;
    for (int k = 1; ok && k < len; ++k) ok = (static_cast<unsigned char>(s[i + k]) >> 6) == 0x2;
    if (ok && len == 2) ok = c >= 0xC2;
    if (ok && len == 3) {
      unsigned cp = ((c & 0xF) << 12) | ((s[i + 1] & 0x3F) << 6) | (s[i + 2] & 0x3F);
      ok = cp >= 0x800 && !(cp >= 0xD800 && cp <= 0xDFFF);
    }
    if (ok && len == 4) {
      unsigned cp = ((c & 0x7) << 18) | ((s[i + 1] & 0x3F) << 12) | ((s[i + 2] & 0x3F) << 6) | (s[i + 3] & 0x3F);
      ok = cp >= 0x10000 && cp <= 0x10FFFF;
    }
    if (!ok) return i;
    i += len;
  }
  return std::string_view::npos;
}

void check_utf8(const std::string& s, const std::string& where) {
  const size_t bad = first_invalid_utf8(s);
  SEDD_CHECK_INPUT(bad == std::string_view::npos, "{}: invalid UTF-8 at byte offset {}", where, bad);
}

namespace {

// Added tokens are matched first, verbatim (the earliest occurrence; at one spot the longest, as
// `added` is sorted longest first); `segment` encodes the text between them (BPE or WordPiece).
template <class EncodeSegment>
void encode_around_added_tokens(std::string_view text, const std::vector<std::pair<std::string, int64_t>>& added,
                                std::vector<int64_t>& ids, EncodeSegment&& segment) {
  size_t start = 0;
  while (start < text.size()) {
    size_t best = std::string_view::npos;
    const std::pair<std::string, int64_t>* hit = nullptr;
    for (const auto& a : added) {
      const size_t at = text.find(a.first, start);
      if (at != std::string_view::npos && at < best) {
        best = at;
        hit = &a;
      }
    }
    segment(text.substr(start, (hit ? best : text.size()) - start));
    if (!hit) break;
    ids.push_back(hit->second);
    start = best + hit->first.size();
  }
}

// ---------------------------------------------------------------------------------------------
class ByteTokenizer final : public Tokenizer {
 public:
  std::vector<int64_t> encode(const std::string& text) const override {
    std::vector<int64_t> ids(text.size());
    for (size_t i = 0; i < text.size(); ++i) ids[i] = static_cast<unsigned char>(text[i]);
    return ids;
  }
  std::string decode(const std::vector<int64_t>& ids) const override {
    std::string out;
    for (auto id : ids)
      if (id >= 0 && id < 256) out.push_back(static_cast<char>(id));
    return out;
  }
  int64_t vocab_size() const override { return 257; }
  int64_t eot_id() const override { return 256; }
  std::string serialize() const override { return "byte"; }
  std::string name() const override { return "byte"; }
};

// ---------------------------------------------------------------------------------------------
std::string utf8_of(uint32_t cp) {
  std::string s;
  if (cp < 0x80) s.push_back(static_cast<char>(cp));
  else if (cp < 0x800) {
    s.push_back(static_cast<char>(0xC0 | (cp >> 6)));
    s.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    s.push_back(static_cast<char>(0xE0 | (cp >> 12)));
    s.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    s.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
  return s;
}

// GPT-2's reversible byte -> printable unicode map.
std::vector<std::string> bytes_to_unicode() {
  std::vector<std::string> map(256);
  std::vector<bool> direct(256, false);
  for (int b = '!'; b <= '~'; ++b) direct[b] = true;
  for (int b = 0xA1; b <= 0xAC; ++b) direct[b] = true;
  for (int b = 0xAE; b <= 0xFF; ++b) direct[b] = true;
  int extra = 0;
  for (int b = 0; b < 256; ++b) map[b] = utf8_of(direct[b] ? b : 256 + extra++);
  return map;
}

// Splits a UTF-8 string into its code points (as strings).
std::vector<std::string> utf8_chars(const std::string& s) {
  std::vector<std::string> out;
  for (size_t i = 0; i < s.size();) {
    unsigned char c = s[i];
    size_t len = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xE ? 3 : 4;
    out.push_back(s.substr(i, len));
    i += len;
  }
  return out;
}

const char* kGpt2Pattern = R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

// ---------------------------------------------------------------------------------------------
// The classes of the GPT-2 pattern: \p{L}, \p{N}, \s (Unicode White_Space, as the Oniguruma
// engine of `tokenizers` has it) and everything else. Letters and numbers come from PCRE2's
// Unicode tables, one 256-code-point block at a time when first met, so no general regex runs
// per character.
enum class Gpt2CharClass : uint8_t { Other, Letter, Number, Space };

class Gpt2ClassTable {
 public:
  static Gpt2CharClass of(uint32_t cp) {
    if (cp < 0x80) return ascii()[cp];
    if (cp > 0x10FFFF) return Gpt2CharClass::Other;
    auto& t = instance();
    const uint32_t block = cp >> 8;
    if (!t.ready_[block].load(std::memory_order_acquire)) t.fill(block);
    return t.classes_[cp];
  }

 private:
  static const std::array<Gpt2CharClass, 128>& ascii() {
    static const std::array<Gpt2CharClass, 128> table = [] {
      std::array<Gpt2CharClass, 128> a{};
      for (int c = 0; c < 128; ++c)
        a[c] = std::isalpha(c) ? Gpt2CharClass::Letter : std::isdigit(c) ? Gpt2CharClass::Number
               : (c == ' ' || (c >= 9 && c <= 13)) ? Gpt2CharClass::Space : Gpt2CharClass::Other;
      return a;
    }();
    return table;
  }
  static Gpt2ClassTable& instance() {
    static Gpt2ClassTable t;
    return t;
  }
  static bool white_space(uint32_t cp) {
    return (cp >= 9 && cp <= 13) || cp == 0x20 || cp == 0x85 || cp == 0xA0 || cp == 0x1680 ||
           (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 || cp == 0x202F || cp == 0x205F ||
           cp == 0x3000;
  }
  Gpt2ClassTable() : classes_(0x110000, Gpt2CharClass::Other), ready_(0x1100) {
    int err = 0;
    PCRE2_SIZE off = 0;
    const std::string pattern = R"(^(?:(\p{L})|(\p{N})))";
    code_ = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.c_str()), pattern.size(), PCRE2_UTF | PCRE2_UCP, &err,
                          &off, nullptr);
    SEDD_CHECK(code_ != nullptr, "cannot compile the Unicode class pattern");
    match_ = pcre2_match_data_create_from_pattern(code_, nullptr);
  }
  void fill(uint32_t block) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (ready_[block].load(std::memory_order_relaxed)) return;
    for (uint32_t cp = block << 8; cp < ((block + 1) << 8); ++cp) {
      Gpt2CharClass c = Gpt2CharClass::Other;
      if (white_space(cp)) c = Gpt2CharClass::Space;
      else if (cp < 0xD800 || cp > 0xDFFF) {
        const std::string ch = utf8_of4(cp);
        int rc = pcre2_match(code_, reinterpret_cast<PCRE2_SPTR>(ch.data()), ch.size(), 0, 0, match_, nullptr);
        if (rc == 2) c = Gpt2CharClass::Letter;
        else if (rc == 3) c = Gpt2CharClass::Number;
      }
      classes_[cp] = c;
    }
    ready_[block].store(true, std::memory_order_release);
  }
  static std::string utf8_of4(uint32_t cp) {
    if (cp < 0x10000) return utf8_of(cp);
    std::string s;
    s.push_back(static_cast<char>(0xF0 | (cp >> 18)));
    s.push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    s.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    s.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    return s;
  }
  std::vector<Gpt2CharClass> classes_;
  std::vector<std::atomic<bool>> ready_;
  std::mutex mutex_;
  pcre2_code* code_ = nullptr;
  pcre2_match_data* match_ = nullptr;
};

// The code point at s[i] and its length in bytes; a byte that starts no valid sequence is one
// "other" character (never met in checked input, but encode() must not read past the end).
inline std::pair<uint32_t, int> bpe_decode_utf8(const unsigned char* s, size_t i, size_t n) {
  const unsigned c = s[i];
  if (c < 0x80) return {c, 1};
  const int len = (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xE ? 3 : (c >> 3) == 0x1E ? 4 : 0;
  if (len == 0 || i + len > n) return {0xFFFFFFFFu, 1};
  uint32_t cp = c & (0x7F >> len);
  for (int k = 1; k < len; ++k) {
    if ((s[i + k] >> 6) != 0x2) return {0xFFFFFFFFu, 1};
    cp = (cp << 6) | (s[i + k] & 0x3F);
  }
  return {cp, len};
}

// The GPT-2 pre-tokenizer pattern, hand-coded: calls emit(offset, length) for each piece, exactly
// as the regex's leftmost-first alternation (with the backtracking of \s+(?!\S)) splits the text.
template <typename Emit>
void gpt2_pretokenize(std::string_view text, Emit&& emit) {
  const auto* s = reinterpret_cast<const unsigned char*>(text.data());
  const size_t n = text.size();
  auto class_at = [&](size_t i, int& len) {
    auto [cp, l] = bpe_decode_utf8(s, i, n);
    len = l;
    return Gpt2ClassTable::of(cp);
  };
  size_t i = 0;
  while (i < n) {
    if (s[i] == '\'' && i + 1 < n) {  // 's 't 're 've 'm 'll 'd
      const char a = static_cast<char>(s[i + 1]);
      if (a == 's' || a == 't' || a == 'm' || a == 'd') {
        emit(i, 2);
        i += 2;
        continue;
      }
      if (i + 2 < n) {
        const char b = static_cast<char>(s[i + 2]);
        if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) {
          emit(i, 3);
          i += 3;
          continue;
        }
      }
    }
    int len = 0;
    Gpt2CharClass run = class_at(i, len);
    size_t j = i + len;
    if (s[i] == ' ' && j < n) {  // " ?" before a run of letters, numbers or others
      int len2 = 0;
      Gpt2CharClass next = class_at(j, len2);
      if (next != Gpt2CharClass::Space) {
        run = next;
        j += len2;
      }
    }
    if (run != Gpt2CharClass::Space) {
      while (j < n) {
        int l = 0;
        if (class_at(j, l) != run) break;
        j += l;
      }
      emit(i, j - i);
      i = j;
      continue;
    }
    // White space: \s+(?!\S) leaves the last one before a non-space to the next piece; a single
    // one there is \s+ on its own.
    size_t last = i;
    while (j < n) {
      int l = 0;
      if (class_at(j, l) != Gpt2CharClass::Space) break;
      last = j;
      j += l;
    }
    if (j < n && last > i) j = last;
    emit(i, j - i);
    i = j;
  }
}

// Merge ranks by (left id, right id): open addressing over 64-bit keys, no strings.
class BpeMergeTable {
 public:
  struct Merge {
    int32_t rank, id;
  };
  void reserve(size_t n) {
    size_t cap = 16;
    while (cap < 2 * n) cap <<= 1;
    keys_.assign(cap, kEmpty);
    values_.assign(cap, {0, 0});
    mask_ = cap - 1;
  }
  void insert(int32_t a, int32_t b, Merge m) {
    const uint64_t key = pack(a, b);
    size_t h = slot(key);
    while (keys_[h] != kEmpty && keys_[h] != key) h = (h + 1) & mask_;
    if (keys_[h] == key) return;  // a repeated merge keeps its first (lowest) rank
    keys_[h] = key;
    values_[h] = m;
  }
  const Merge* find(int32_t a, int32_t b) const {
    const uint64_t key = pack(a, b);
    for (size_t h = slot(key);; h = (h + 1) & mask_) {
      if (keys_[h] == key) return &values_[h];
      if (keys_[h] == kEmpty) return nullptr;
    }
  }

 private:
  static constexpr uint64_t kEmpty = ~uint64_t{0};
  static uint64_t pack(int32_t a, int32_t b) { return (uint64_t(uint32_t(a)) << 32) | uint32_t(b); }
  size_t slot(uint64_t key) const { return size_t((key * 0x9E3779B97F4A7C15ull) >> 17) & mask_; }
  std::vector<uint64_t> keys_;
  std::vector<Merge> values_;
  size_t mask_ = 0;
};

// Encoded pre-tokenized words, one cache per encoding thread (no lock per word). Bounded: emptied
// when full, which changes nothing but speed.
struct BpeStringHash {
  using is_transparent = void;
  size_t operator()(std::string_view s) const { return std::hash<std::string_view>()(s); }
};
class BpeWordCache {
 public:
  const std::vector<int32_t>* find(std::string_view word) const {
    auto it = map_.find(word);
    return it == map_.end() ? nullptr : &it->second;
  }
  void add(std::string_view word, std::vector<int32_t> ids) {
    if (map_.size() >= kMaxWords) map_.clear();
    map_.emplace(std::string(word), std::move(ids));
  }

 private:
  static constexpr size_t kMaxWords = 1 << 18;
  std::unordered_map<std::string, std::vector<int32_t>, BpeStringHash, std::equal_to<>> map_;
};

class BpeTokenizer final : public Tokenizer {
 public:
  BpeTokenizer(const std::string& text, const std::string& source) : json_text_(text), source_(source) {
    json j;
    try {
      j = json::parse(text);
    } catch (const json::exception& e) {
      fail_input("{}: not valid tokenizer JSON ({})", source, e.what());
    }
    SEDD_CHECK(j.contains("model") && j["model"].value("type", "") == "BPE",
               "{}: only byte-level BPE and WordPiece tokenizer.json files are supported (model.type BPE or "
               "WordPiece)", source);
    SEDD_CHECK(!j.contains("normalizer") || j["normalizer"].is_null(),
               "{}: tokenizers with a normalizer are not supported", source);
    const auto& model = j["model"];
    for (auto it = model["vocab"].begin(); it != model["vocab"].end(); ++it) {
      int64_t id = it.value().get<int64_t>();
      vocab_[it.key()] = id;
      max_id_ = std::max(max_id_, id);
    }
    ignore_merges_ = model.value("ignore_merges", false);
    std::vector<std::pair<std::string, std::string>> merges;
    for (const auto& m : model["merges"]) {
      if (m.is_string()) {
        auto s = m.get<std::string>();
        auto sp = s.find(' ');
        SEDD_CHECK(sp != std::string::npos, "{}: bad merge '{}'", source, s);
        merges.emplace_back(s.substr(0, sp), s.substr(sp + 1));
      } else {
        merges.emplace_back(m[0].get<std::string>(), m[1].get<std::string>());
      }
    }
    // Merges on ids; one whose parts or result are not in the vocabulary can never apply.
    merge_table_.reserve(merges.size());
    for (size_t r = 0; r < merges.size(); ++r) {
      const auto& [a, b] = merges[r];
      auto ia = vocab_.find(a), ib = vocab_.find(b), ic = vocab_.find(a + b);
      if (ia == vocab_.end() || ib == vocab_.end() || ic == vocab_.end()) continue;
      merge_table_.insert(static_cast<int32_t>(ia->second), static_cast<int32_t>(ib->second),
                          {static_cast<int32_t>(r), static_cast<int32_t>(ic->second)});
    }
    if (j.contains("added_tokens"))
      for (const auto& a : j["added_tokens"]) {
        added_.push_back({a["content"].get<std::string>(), a["id"].get<int64_t>()});
        vocab_[a["content"].get<std::string>()] = a["id"].get<int64_t>();
        max_id_ = std::max(max_id_, a["id"].get<int64_t>());
      }
    SEDD_CHECK(max_id_ < INT32_MAX, "{}: token ids beyond 2^31 are not supported", source);
    // Longest added token first, so overlapping specials match greedily.
    std::sort(added_.begin(), added_.end(), [](auto& a, auto& b) { return a.first.size() > b.first.size(); });

    std::string pattern = kGpt2Pattern;
    const json& pre = j["pre_tokenizer"];
    auto read_byte_level = [&](const json& p) {
      add_prefix_space_ = p.value("add_prefix_space", false);
      if (!p.value("use_regex", true)) pattern.clear();
    };
    if (pre.is_object() && pre.value("type", "") == "ByteLevel") {
      read_byte_level(pre);
    } else if (pre.is_object() && pre.value("type", "") == "Sequence") {
      std::string split;
      for (const auto& p : pre["pretokenizers"]) {
        if (p.value("type", "") == "Split" && p["pattern"].contains("Regex")) split = p["pattern"]["Regex"];
        else if (p.value("type", "") == "ByteLevel") read_byte_level(p);
        else fail("{}: unsupported pre-tokenizer step '{}'", source, p.value("type", "?"));
      }
      SEDD_CHECK(!split.empty(), "{}: a Sequence pre-tokenizer needs a Split regex", source);
      pattern = split;
    } else {
      fail("{}: unsupported pre_tokenizer (need ByteLevel, or Sequence of Split + ByteLevel)", source);
    }
    // The GPT-2 pattern is hand-coded; any other goes through PCRE2.
    if (pattern != kGpt2Pattern) compile(pattern);
    split_ = pattern.empty() ? Split::None : pattern == kGpt2Pattern ? Split::Gpt2 : Split::Regex;
    byte_map_ = bytes_to_unicode();
    for (int b = 0; b < 256; ++b) {
      unicode_to_byte_[byte_map_[b]] = static_cast<unsigned char>(b);
      auto it = vocab_.find(byte_map_[b]);
      byte_id_[b] = it == vocab_.end() ? -1 : static_cast<int32_t>(it->second);
    }
    // What each id decodes to: special tokens verbatim, the others through the byte map.
    id_bytes_.resize(static_cast<size_t>(max_id_ + 1));
    id_known_.assign(static_cast<size_t>(max_id_ + 1), false);
    for (const auto& [tok, id] : vocab_) {
      if (id < 0) continue;
      std::string bytes;
      for (const auto& ch : utf8_chars(tok)) {
        auto b = unicode_to_byte_.find(ch);
        if (b != unicode_to_byte_.end()) bytes.push_back(static_cast<char>(b->second));
      }
      id_bytes_[id] = bytes;
      id_known_[id] = true;
    }
    for (const auto& [tok, id] : added_)
      if (id >= 0) id_bytes_[id] = tok;
    eot_ = -1;
    for (const char* name : {"<|endoftext|>", "</s>", "<eos>", "[SEP]"})
      if (vocab_.count(name)) {
        eot_ = vocab_.at(name);
        break;
      }
    SEDD_CHECK(eot_ >= 0, "{}: no end-of-text token (<|endoftext|>, </s> or <eos>) in the vocabulary", source);
  }

  ~BpeTokenizer() override {
    if (code_) pcre2_code_free(code_);
  }

  std::vector<int64_t> encode(const std::string& text) const override {
    std::vector<int64_t> ids;
    ids.reserve(text.size() / 3 + 8);
    BpeWordCache& cache = cache_of_this_thread();
    encode_around_added_tokens(text, added_, ids, [&](std::string_view segment) { encode_segment(segment, ids, cache); });
    return ids;
  }

  std::string decode(const std::vector<int64_t>& ids) const override {
    std::string bytes;
    for (auto id : ids)
      if (id >= 0 && id <= max_id_ && id_known_[id]) bytes += id_bytes_[id];
    return bytes;
  }

  int64_t vocab_size() const override { return max_id_ + 1; }
  int64_t eot_id() const override { return eot_; }
  std::string serialize() const override { return json_text_; }
  std::string name() const override { return "bpe:" + source_; }

 private:
  enum class Split { None, Gpt2, Regex };

  void compile(const std::string& pattern) {
    if (pattern.empty()) return;
    int err = 0;
    PCRE2_SIZE off = 0;
    code_ = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.c_str()), pattern.size(),
                          PCRE2_UTF | PCRE2_UCP, &err, &off, nullptr);
    SEDD_CHECK(code_ != nullptr, "{}: cannot compile the pre-tokenizer regex at offset {}", source_, off);
    pcre2_jit_compile(code_, PCRE2_JIT_COMPLETE);
  }

  BpeWordCache& cache_of_this_thread() const {
    std::lock_guard<std::mutex> lock(cache_mutex_);
    auto& c = caches_[std::this_thread::get_id()];
    if (!c) c = std::make_unique<BpeWordCache>();
    return *c;
  }

  void encode_segment(std::string_view seg_in, std::vector<int64_t>& ids, BpeWordCache& cache) const {
    if (seg_in.empty()) return;
    std::string prefixed;
    std::string_view seg = seg_in;
    if (add_prefix_space_ && seg_in[0] != ' ') {
      prefixed = " " + std::string(seg_in);
      seg = prefixed;
    }
    if (split_ == Split::None) {
      encode_word(seg, ids, cache);
      return;
    }
    if (split_ == Split::Gpt2) {
      gpt2_pretokenize(seg, [&](size_t at, size_t len) { encode_word(seg.substr(at, len), ids, cache); });
      return;
    }
    pcre2_match_data* md = pcre2_match_data_create_from_pattern(code_, nullptr);
    PCRE2_SIZE pos = 0;
    auto subject = reinterpret_cast<PCRE2_SPTR>(seg.data());
    while (pos < seg.size()) {
      int rc = pcre2_match(code_, subject, seg.size(), pos, 0, md, nullptr);
      if (rc < 0) {  // no further match: the rest is one piece (isolated split semantics)
        encode_word(seg.substr(pos), ids, cache);
        break;
      }
      PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
      if (ov[0] > pos) encode_word(seg.substr(pos, ov[0] - pos), ids, cache);
      if (ov[1] == ov[0]) {  // empty match: advance one character
        encode_word(seg.substr(ov[0], 1), ids, cache);
        pos = ov[0] + 1;
        continue;
      }
      encode_word(seg.substr(ov[0], ov[1] - ov[0]), ids, cache);
      pos = ov[1];
    }
    pcre2_match_data_free(md);
  }

  void encode_word(std::string_view word, std::vector<int64_t>& ids, BpeWordCache& cache) const {
    if (const auto* hit = cache.find(word)) {
      ids.insert(ids.end(), hit->begin(), hit->end());
      return;
    }
    std::vector<int32_t> parts;
    if (ignore_merges_) {
      std::string mapped;
      for (unsigned char b : word) mapped += byte_map_[b];
      auto it = vocab_.find(mapped);
      if (it != vocab_.end()) parts.push_back(static_cast<int32_t>(it->second));
    }
    if (parts.empty()) {
      parts.reserve(word.size());
      for (unsigned char b : word) {
        SEDD_CHECK(byte_id_[b] >= 0, "{}: piece '{}' is not in the vocabulary", source_, byte_map_[b]);
        parts.push_back(byte_id_[b]);
      }
      // Lowest rank first, leftmost among equals: what the ranks mean in `tokenizers`.
      while (parts.size() > 1) {
        int32_t best_rank = INT32_MAX, best_id = -1;
        size_t best_i = 0;
        for (size_t i = 0; i + 1 < parts.size(); ++i) {
          const auto* m = merge_table_.find(parts[i], parts[i + 1]);
          if (m && m->rank < best_rank) {
            best_rank = m->rank;
            best_id = m->id;
            best_i = i;
          }
        }
        if (best_id < 0) break;
        parts[best_i] = best_id;
        parts.erase(parts.begin() + static_cast<long>(best_i) + 1);
      }
    }
    ids.insert(ids.end(), parts.begin(), parts.end());
    cache.add(word, std::move(parts));
  }

  std::string json_text_, source_;
  std::unordered_map<std::string, int64_t> vocab_;
  BpeMergeTable merge_table_;
  std::vector<std::pair<std::string, int64_t>> added_;
  std::vector<std::string> byte_map_;
  std::array<int32_t, 256> byte_id_{};
  std::unordered_map<std::string, unsigned char> unicode_to_byte_;
  std::vector<std::string> id_bytes_;
  std::vector<bool> id_known_;
  pcre2_code* code_ = nullptr;
  Split split_ = Split::Gpt2;
  bool add_prefix_space_ = false, ignore_merges_ = false;
  int64_t max_id_ = -1, eot_ = -1;
  mutable std::mutex cache_mutex_;
  mutable std::unordered_map<std::thread::id, std::unique_ptr<BpeWordCache>> caches_;
};

// ---------------------------------------------------------------------------------------------
// WordPiece (BERT) as `tokenizers` runs it: BertNormalizer (clean text, pad CJK ideographs,
// strip accents by NFD without non-spacing marks, lower-case; Unicode data from ICU), then
// BertPreTokenizer (split at white space, punctuation isolated), then greedy longest-match-first
// pieces with the "##" continuation prefix. The template's [CLS] ... [SEP] is what bos_id() and
// eot_id() give: sedd-prepare writes [CLS] text [SEP] per document.
bool wp_is_whitespace(UChar32 c) { return c == '\t' || c == '\n' || c == '\r' || u_isUWhiteSpace(c); }
bool wp_is_control(UChar32 c) {
  if (c == '\t' || c == '\n' || c == '\r') return false;
  const auto t = u_charType(c);
  return t == U_CONTROL_CHAR || t == U_FORMAT_CHAR || t == U_PRIVATE_USE_CHAR || t == U_SURROGATE;
}
bool wp_is_chinese(UChar32 c) {
  return (c >= 0x4E00 && c <= 0x9FFF) || (c >= 0x3400 && c <= 0x4DBF) || (c >= 0x20000 && c <= 0x2A6DF) ||
         (c >= 0x2A700 && c <= 0x2B73F) || (c >= 0x2B740 && c <= 0x2B81F) || (c >= 0x2B920 && c <= 0x2CEAF) ||
         (c >= 0xF900 && c <= 0xFAFF) || (c >= 0x2F800 && c <= 0x2FA1F);
}
bool wp_is_punctuation(UChar32 c) {
  if (c < 0x80) return std::ispunct(static_cast<int>(c)) != 0;
  switch (u_charType(c)) {
    case U_CONNECTOR_PUNCTUATION: case U_DASH_PUNCTUATION: case U_START_PUNCTUATION: case U_END_PUNCTUATION:
    case U_INITIAL_PUNCTUATION: case U_FINAL_PUNCTUATION: case U_OTHER_PUNCTUATION: return true;
    default: return false;
  }
}
void wp_append_utf8(std::string& s, UChar32 c) {
  if (c < 0x80) s.push_back(static_cast<char>(c));
  else if (c < 0x800) {
    s.push_back(static_cast<char>(0xC0 | (c >> 6)));
    s.push_back(static_cast<char>(0x80 | (c & 0x3F)));
  } else if (c < 0x10000) {
    s.push_back(static_cast<char>(0xE0 | (c >> 12)));
    s.push_back(static_cast<char>(0x80 | ((c >> 6) & 0x3F)));
    s.push_back(static_cast<char>(0x80 | (c & 0x3F)));
  } else {
    s.push_back(static_cast<char>(0xF0 | (c >> 18)));
    s.push_back(static_cast<char>(0x80 | ((c >> 12) & 0x3F)));
    s.push_back(static_cast<char>(0x80 | ((c >> 6) & 0x3F)));
    s.push_back(static_cast<char>(0x80 | (c & 0x3F)));
  }
}

class WordPieceTokenizer final : public Tokenizer {
 public:
  WordPieceTokenizer(const json& j, const std::string& text, const std::string& source)
      : json_text_(text), source_(source) {
    const auto& model = j["model"];
    for (auto it = model["vocab"].begin(); it != model["vocab"].end(); ++it) {
      vocab_.emplace(it.key(), it.value().get<int64_t>());
      max_id_ = std::max(max_id_, it.value().get<int64_t>());
    }
    prefix_ = model.value("continuing_subword_prefix", std::string("##"));
    max_chars_ = model.value("max_input_chars_per_word", int64_t{100});
    const std::string unk = model.value("unk_token", std::string("[UNK]"));
    SEDD_CHECK(vocab_.count(unk), "{}: the unknown token '{}' is not in the vocabulary", source, unk);
    unk_ = vocab_.at(unk);
    const json& norm = j.contains("normalizer") ? j["normalizer"] : json();
    if (!norm.is_null()) {
      SEDD_CHECK(norm.value("type", "") == "BertNormalizer", "{}: unsupported normalizer '{}' (need BertNormalizer)",
                 source, norm.value("type", "?"));
      clean_text_ = norm.value("clean_text", true);
      chinese_ = norm.value("handle_chinese_chars", true);
      lowercase_ = norm.value("lowercase", true);
      strip_accents_ = norm.contains("strip_accents") && !norm["strip_accents"].is_null()
                           ? norm["strip_accents"].get<bool>() : lowercase_;
    } else {
      clean_text_ = chinese_ = lowercase_ = strip_accents_ = false;
    }
    const json& pre = j.contains("pre_tokenizer") ? j["pre_tokenizer"] : json();
    SEDD_CHECK(pre.is_object() && pre.value("type", "") == "BertPreTokenizer",
               "{}: unsupported pre_tokenizer for WordPiece (need BertPreTokenizer)", source);
    if (j.contains("added_tokens"))
      for (const auto& a : j["added_tokens"]) {
        const auto id = a["id"].get<int64_t>();
        added_.push_back({a["content"].get<std::string>(), id});
        if (a.value("special", false)) special_.insert(id);
        vocab_[a["content"].get<std::string>()] = id;
        max_id_ = std::max(max_id_, id);
      }
    std::sort(added_.begin(), added_.end(), [](auto& a, auto& b) { return a.first.size() > b.first.size(); });
    // [CLS] $A [SEP]: from TemplateProcessing's single template or BertProcessing.
    const json& post = j.contains("post_processor") ? j["post_processor"] : json();
    auto id_of = [&](const std::string& name) {
      SEDD_CHECK(vocab_.count(name), "{}: post_processor token '{}' is not in the vocabulary", source, name);
      return vocab_.at(name);
    };
    if (post.is_object() && post.value("type", "") == "TemplateProcessing") {
      const auto& single = post["single"];
      bool seen_a = false;
      for (const auto& piece : single) {
        if (piece.contains("Sequence")) seen_a = true;
        else if (piece.contains("SpecialToken")) {
          const auto name = piece["SpecialToken"]["id"].get<std::string>();
          SEDD_CHECK((seen_a ? eot_ : bos_) < 0, "{}: only templates like [CLS] $A [SEP] are supported", source);
          (seen_a ? eot_ : bos_) = id_of(name);
        }
      }
    } else if (post.is_object() && post.value("type", "") == "BertProcessing") {
      bos_ = id_of(post["cls"][0].get<std::string>());
      eot_ = id_of(post["sep"][0].get<std::string>());
    } else {
      SEDD_CHECK(post.is_null(), "{}: unsupported post_processor '{}'", source, post.value("type", "?"));
    }
    if (eot_ < 0 && vocab_.count("[SEP]")) eot_ = vocab_.at("[SEP]");
    SEDD_CHECK(eot_ >= 0, "{}: no end-of-document token ([SEP] or the template's last one)", source);
    UErrorCode err = U_ZERO_ERROR;
    nfd_ = icu::Normalizer2::getNFDInstance(err);
    SEDD_CHECK(U_SUCCESS(err), "ICU: no NFD normalizer ({})", u_errorName(err));
    id_to_token_.resize(static_cast<size_t>(max_id_ + 1));
    for (const auto& [tok, id] : vocab_)
      if (id >= 0) id_to_token_[id] = tok;
  }

  std::vector<int64_t> encode(const std::string& text) const override {
    std::vector<int64_t> ids;
    encode_around_added_tokens(text, added_, ids, [&](std::string_view segment) { encode_segment(segment, ids); });
    return ids;
  }

  // As `tokenizers` decodes by default: special tokens skipped, "##" pieces glued, the
  // WordPiece decoder's clean-up of spaces before punctuation and contractions.
  std::string decode(const std::vector<int64_t>& ids) const override {
    std::string out;
    bool first = true;
    for (auto id : ids) {
      if (id < 0 || id > max_id_ || special_.count(id) || id_to_token_[id].empty()) continue;
      std::string token = id_to_token_[id];
      if (!first) {
        if (token.rfind(prefix_, 0) == 0) token.erase(0, prefix_.size());
        else token = " " + token;
      }
      first = false;
      for (const auto& [from, to] : {std::pair<const char*, const char*>{" .", "."}, {" ?", "?"}, {" !", "!"},
                                     {" ,", ","}, {" ' ", "'"}, {" n't", "n't"}, {" 'm", "'m"},
                                     {" do not", " don't"}, {" 's", "'s"}, {" 've", "'ve"}, {" 're", "'re"}}) {
        const std::string f = from, t = to;
        for (size_t at = 0; (at = token.find(f, at)) != std::string::npos; at += t.size()) token.replace(at, f.size(), t);
      }
      out += token;
    }
    return out;
  }

  int64_t vocab_size() const override { return max_id_ + 1; }
  int64_t eot_id() const override { return eot_; }
  int64_t bos_id() const override { return bos_; }
  std::string serialize() const override { return json_text_; }
  std::string name() const override { return "wordpiece:" + source_; }

 private:
  void encode_segment(std::string_view seg, std::vector<int64_t>& ids) const {
    if (seg.empty()) return;
    // Clean text and CJK padding, code point by code point (invalid UTF-8 reads as U+FFFD: removed).
    icu::UnicodeString s;
    const auto* p = reinterpret_cast<const unsigned char*>(seg.data());
    for (size_t i = 0; i < seg.size();) {
      auto [cp32, len] = bpe_decode_utf8(p, i, seg.size());
      i += len;
      UChar32 c = cp32 == 0xFFFFFFFFu ? 0xFFFD : static_cast<UChar32>(cp32);
      if (clean_text_) {
        if (c == 0 || c == 0xFFFD || wp_is_control(c)) continue;
        if (wp_is_whitespace(c)) c = ' ';
      }
      if (chinese_ && wp_is_chinese(c)) {
        s.append(UChar32(' ')).append(c).append(UChar32(' '));
      } else {
        s.append(c);
      }
    }
    if (strip_accents_) {
      UErrorCode err = U_ZERO_ERROR;
      icu::UnicodeString d = nfd_->normalize(s, err);
      SEDD_CHECK(U_SUCCESS(err), "ICU NFD failed ({})", u_errorName(err));
      s.remove();
      for (int32_t i = 0; i < d.length(); i = d.moveIndex32(i, 1)) {
        const UChar32 c = d.char32At(i);
        if (u_charType(c) != U_NON_SPACING_MARK) s.append(c);
      }
    }
    // Lower-case (full mapping per character, as Rust's char::to_lowercase), then split into words.
    std::string word;
    auto flush = [&] {
      if (!word.empty()) encode_word(word, ids);
      word.clear();
    };
    for (int32_t i = 0; i < s.length(); i = s.moveIndex32(i, 1)) {
      UChar32 c = s.char32At(i);
      if (wp_is_whitespace(c)) {
        flush();
        continue;
      }
      if (wp_is_punctuation(c)) {
        flush();
        wp_append_utf8(word, lowercase_ ? u_tolower(c) : c);
        flush();
        continue;
      }
      if (lowercase_ && c == 0x130) {  // İ: the one unconditional two-character lower case
        wp_append_utf8(word, 'i');
        wp_append_utf8(word, 0x307);
      } else {
        wp_append_utf8(word, lowercase_ ? u_tolower(c) : c);
      }
    }
    flush();
  }

  void encode_word(const std::string& word, std::vector<int64_t>& ids) const {
    const auto* p = reinterpret_cast<const unsigned char*>(word.data());
    std::vector<size_t> bounds;  // code point starts, and the end
    for (size_t i = 0; i < word.size(); i += bpe_decode_utf8(p, i, word.size()).second) bounds.push_back(i);
    if (static_cast<int64_t>(bounds.size()) > max_chars_) {
      ids.push_back(unk_);
      return;
    }
    bounds.push_back(word.size());
    const size_t first = ids.size();
    std::string piece;
    for (size_t b = 0; b + 1 < bounds.size();) {
      size_t e = bounds.size() - 1;
      int64_t found = -1;
      for (; e > b; --e) {
        piece.assign(b > 0 ? prefix_ : std::string());
        piece.append(word, bounds[b], bounds[e] - bounds[b]);
        auto it = vocab_.find(piece);
        if (it != vocab_.end()) {
          found = it->second;
          break;
        }
      }
      if (found < 0) {  // no piece fits: the whole word is unknown
        ids.resize(first);
        ids.push_back(unk_);
        return;
      }
      ids.push_back(found);
      b = e;
    }
  }

  std::string json_text_, source_, prefix_;
  std::unordered_map<std::string, int64_t> vocab_;
  std::vector<std::string> id_to_token_;
  std::vector<std::pair<std::string, int64_t>> added_;
  std::set<int64_t> special_;
  const icu::Normalizer2* nfd_ = nullptr;
  int64_t unk_ = -1, bos_ = -1, eot_ = -1, max_id_ = -1, max_chars_ = 100;
  bool clean_text_ = true, chinese_ = true, lowercase_ = true, strip_accents_ = true;
};

}  // namespace

namespace {
// tokenizer.json text -> the tokenizer its model.type names.
std::unique_ptr<Tokenizer> tokenizer_from_json(const std::string& text, const std::string& source) {
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception& e) {
    fail_input("{}: not valid tokenizer JSON ({})", source, e.what());
  }
  if (j.contains("model") && j["model"].value("type", "") == "WordPiece")
    return std::make_unique<WordPieceTokenizer>(j, text, source);
  return std::make_unique<BpeTokenizer>(text, source);
}
}  // namespace

std::unique_ptr<Tokenizer> make_tokenizer(const std::string& spec) {
  if (spec == "byte") return std::make_unique<ByteTokenizer>();
  if (!spec.empty() && spec.front() == '{') return tokenizer_from_json(spec, "tokenizer stored in the data");
  SEDD_CHECK_INPUT(std::filesystem::exists(spec),
                   "{}: tokenizer file not found (use --tokenizer byte or a tokenizer.json)", spec);
  return tokenizer_from_json(fs::read_text(spec), spec);
}

namespace {
bool definite_tokenizer(const std::string& t) { return t == "byte" || (!t.empty() && t.front() == '{'); }
}  // namespace

TokenizerMatch compare_tokenizers(const std::string& a, const std::string& b) {
  if (!definite_tokenizer(a) || !definite_tokenizer(b)) return TokenizerMatch::Unknown;
  return a == b ? TokenizerMatch::Same : TokenizerMatch::Different;
}

std::string describe_tokenizer(const std::string& t) {
  if (t == "byte") return "byte";
  if (t.empty()) return "none stored";
  return definite_tokenizer(t) ? "a tokenizer.json" : "a file name only (" + t + ")";
}

}  // namespace sedd
