// Byte and byte-level BPE tokenizers; see tokenizer.h.
#include "data/tokenizer.h"

#include <pcre2.h>

#include <climits>
#include <filesystem>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <unordered_map>

#include "io/error.h"
#include "io/fs.h"

namespace sedd {

using json = nlohmann::json;

void check_utf8(const std::string& s, const std::string& where) {
  size_t i = 0, n = s.size();
  while (i < n) {
    unsigned char c = s[i];
    int len = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xE ? 3 : (c >> 3) == 0x1E ? 4 : 0;
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
    SEDD_CHECK_INPUT(ok, "{}: invalid UTF-8 at byte offset {}", where, i);
    i += len;
  }
}

namespace {

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

struct PairHash {
  size_t operator()(const std::pair<std::string, std::string>& p) const {
    return std::hash<std::string>()(p.first) * 31 + std::hash<std::string>()(p.second);
  }
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
               "{}: only byte-level BPE tokenizer.json files are supported (model.type must be BPE)", source);
    SEDD_CHECK(!j.contains("normalizer") || j["normalizer"].is_null(),
               "{}: tokenizers with a normalizer are not supported", source);
    const auto& model = j["model"];
    for (auto it = model["vocab"].begin(); it != model["vocab"].end(); ++it) {
      int64_t id = it.value().get<int64_t>();
      vocab_[it.key()] = id;
      max_id_ = std::max(max_id_, id);
    }
    ignore_merges_ = model.value("ignore_merges", false);
    int rank = 0;
    for (const auto& m : model["merges"]) {
      std::pair<std::string, std::string> p;
      if (m.is_string()) {
        auto s = m.get<std::string>();
        auto sp = s.find(' ');
        SEDD_CHECK(sp != std::string::npos, "{}: bad merge '{}'", source, s);
        p = {s.substr(0, sp), s.substr(sp + 1)};
      } else {
        p = {m[0].get<std::string>(), m[1].get<std::string>()};
      }
      ranks_.emplace(p, rank++);
    }
    if (j.contains("added_tokens"))
      for (const auto& a : j["added_tokens"]) {
        added_.push_back({a["content"].get<std::string>(), a["id"].get<int64_t>()});
        vocab_[a["content"].get<std::string>()] = a["id"].get<int64_t>();
        max_id_ = std::max(max_id_, a["id"].get<int64_t>());
      }
    // Longest added token first, so overlapping specials match greedily.
    std::sort(added_.begin(), added_.end(), [](auto& a, auto& b) { return a.first.size() > b.first.size(); });
    for (const auto& [tok, id] : vocab_) id_to_token_[id] = tok;

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
    compile(pattern);
    byte_map_ = bytes_to_unicode();
    for (int b = 0; b < 256; ++b) unicode_to_byte_[byte_map_[b]] = static_cast<unsigned char>(b);
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
    // Added tokens are matched first, verbatim; the text between them goes through BPE.
    size_t start = 0;
    while (start < text.size()) {
      size_t best = std::string::npos;
      const std::pair<std::string, int64_t>* hit = nullptr;
      for (const auto& a : added_) {
        size_t at = text.find(a.first, start);
        if (at != std::string::npos && (at < best)) {
          best = at;
          hit = &a;
        }
      }
      size_t end = hit ? best : text.size();
      encode_segment(text.substr(start, end - start), ids);
      if (!hit) break;
      ids.push_back(hit->second);
      start = best + hit->first.size();
    }
    return ids;
  }

  std::string decode(const std::vector<int64_t>& ids) const override {
    std::string bytes;
    for (auto id : ids) {
      auto it = id_to_token_.find(id);
      if (it == id_to_token_.end()) continue;
      bool special = false;
      for (const auto& a : added_) special |= a.second == id;
      if (special) {
        bytes += it->second;
        continue;
      }
      for (const auto& ch : utf8_chars(it->second)) {
        auto b = unicode_to_byte_.find(ch);
        if (b != unicode_to_byte_.end()) bytes.push_back(static_cast<char>(b->second));
      }
    }
    return bytes;
  }

  int64_t vocab_size() const override { return max_id_ + 1; }
  int64_t eot_id() const override { return eot_; }
  std::string serialize() const override { return json_text_; }
  std::string name() const override { return "bpe:" + source_; }

 private:
  void compile(const std::string& pattern) {
    if (pattern.empty()) return;
    int err = 0;
    PCRE2_SIZE off = 0;
    code_ = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.c_str()), pattern.size(),
                          PCRE2_UTF | PCRE2_UCP, &err, &off, nullptr);
    SEDD_CHECK(code_ != nullptr, "{}: cannot compile the pre-tokenizer regex at offset {}", source_, off);
    pcre2_jit_compile(code_, PCRE2_JIT_COMPLETE);
  }

  void encode_segment(const std::string& seg_in, std::vector<int64_t>& ids) const {
    if (seg_in.empty()) return;
    std::string seg = (add_prefix_space_ && seg_in[0] != ' ') ? " " + seg_in : seg_in;
    if (!code_) {
      encode_word(seg, ids);
      return;
    }
    pcre2_match_data* md = pcre2_match_data_create_from_pattern(code_, nullptr);
    PCRE2_SIZE pos = 0;
    auto subject = reinterpret_cast<PCRE2_SPTR>(seg.c_str());
    while (pos < seg.size()) {
      int rc = pcre2_match(code_, subject, seg.size(), pos, 0, md, nullptr);
      if (rc < 0) {  // no further match: the rest is one piece (isolated split semantics)
        encode_word(seg.substr(pos), ids);
        break;
      }
      PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
      if (ov[0] > pos) encode_word(seg.substr(pos, ov[0] - pos), ids);
      if (ov[1] == ov[0]) {  // empty match: advance one character
        encode_word(seg.substr(ov[0], 1), ids);
        pos = ov[0] + 1;
        continue;
      }
      encode_word(seg.substr(ov[0], ov[1] - ov[0]), ids);
      pos = ov[1];
    }
    pcre2_match_data_free(md);
  }

  void encode_word(const std::string& word, std::vector<int64_t>& ids) const {
    {
      std::lock_guard<std::mutex> lock(cache_mutex_);
      auto it = cache_.find(word);
      if (it != cache_.end()) {
        ids.insert(ids.end(), it->second.begin(), it->second.end());
        return;
      }
    }
    std::string mapped;
    for (unsigned char b : word) mapped += byte_map_[b];
    std::vector<int64_t> out;
    if (ignore_merges_ && vocab_.count(mapped)) {
      out.push_back(vocab_.at(mapped));
    } else {
      std::vector<std::string> parts = utf8_chars(mapped);
      while (parts.size() > 1) {
        int best_rank = INT_MAX;
        size_t best_i = 0;
        for (size_t i = 0; i + 1 < parts.size(); ++i) {
          auto r = ranks_.find({parts[i], parts[i + 1]});
          if (r != ranks_.end() && r->second < best_rank) {
            best_rank = r->second;
            best_i = i;
          }
        }
        if (best_rank == INT_MAX) break;
        parts[best_i] += parts[best_i + 1];
        parts.erase(parts.begin() + static_cast<long>(best_i) + 1);
      }
      for (const auto& p : parts) {
        auto v = vocab_.find(p);
        SEDD_CHECK(v != vocab_.end(), "{}: piece '{}' is not in the vocabulary", source_, p);
        out.push_back(v->second);
      }
    }
    ids.insert(ids.end(), out.begin(), out.end());
    std::lock_guard<std::mutex> lock(cache_mutex_);
    if (cache_.size() < 200000) cache_.emplace(word, std::move(out));
  }

  std::string json_text_, source_;
  std::unordered_map<std::string, int64_t> vocab_;
  std::unordered_map<int64_t, std::string> id_to_token_;
  std::unordered_map<std::pair<std::string, std::string>, int, PairHash> ranks_;
  std::vector<std::pair<std::string, int64_t>> added_;
  std::vector<std::string> byte_map_;
  std::unordered_map<std::string, unsigned char> unicode_to_byte_;
  pcre2_code* code_ = nullptr;
  bool add_prefix_space_ = false, ignore_merges_ = false;
  int64_t max_id_ = -1, eot_ = -1;
  mutable std::mutex cache_mutex_;
  mutable std::unordered_map<std::string, std::vector<int64_t>> cache_;
};

}  // namespace

std::unique_ptr<Tokenizer> make_tokenizer(const std::string& spec) {
  if (spec == "byte") return std::make_unique<ByteTokenizer>();
  if (!spec.empty() && spec.front() == '{') return std::make_unique<BpeTokenizer>(spec, "tokenizer stored in the data");
  SEDD_CHECK_INPUT(std::filesystem::exists(spec),
                   "{}: tokenizer file not found (use --tokenizer byte or a tokenizer.json)", spec);
  return std::make_unique<BpeTokenizer>(fs::read_text(spec), spec);
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
