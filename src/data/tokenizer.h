// Tokenizers: text <-> token ids.
//  - ByteTokenizer: 256 byte ids + end-of-text (id 256); needs no files.
//  - BpeTokenizer: Hugging Face tokenizer.json byte-level BPE (GPT-2 style): the pre-tokenizer
//    regex through PCRE2, byte-to-unicode map, merges by rank, added/special tokens. Encodes and
//    decodes exactly like the `tokenizers` package for such files.
#pragma once
#include <memory>
#include <string>
#include <vector>

namespace sedd {

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;
  virtual std::vector<int64_t> encode(const std::string& text) const = 0;
  virtual std::string decode(const std::vector<int64_t>& ids) const = 0;
  virtual int64_t vocab_size() const = 0;
  virtual int64_t eot_id() const = 0;
  // What shards store in their `tokenizer` attribute: "byte" or the tokenizer.json text.
  virtual std::string serialize() const = 0;
  virtual std::string name() const = 0;
};

// "byte", a path to tokenizer.json, or (from a shard attribute) the JSON text itself.
std::unique_ptr<Tokenizer> make_tokenizer(const std::string& spec);

// Throws naming `where` and the byte offset of the first invalid UTF-8 sequence.
void check_utf8(const std::string& text, const std::string& where);

// Two stored tokenizer descriptions compared: the same, different, or unknown when either does
// not say which tokenizer it is (empty: a model converted from elsewhere; a bare file name: older
// shards). Definite descriptions are "byte" and tokenizer.json texts.
enum class TokenizerMatch { Same, Different, Unknown };
TokenizerMatch compare_tokenizers(const std::string& a, const std::string& b);
// "byte", "a tokenizer.json", or "none stored" (what a message calls a description).
std::string describe_tokenizer(const std::string& t);

}  // namespace sedd
