// Tokenizers: text <-> token ids.
//  - ByteTokenizer: 256 byte ids + end-of-text (id 256); needs no files.
//  - BpeTokenizer: Hugging Face tokenizer.json byte-level BPE (GPT-2 style): the GPT-2
//    pre-tokenizer pattern hand-coded (other Split patterns through PCRE2), byte-to-unicode map,
//    merges by rank on id pairs, a per-thread cache of encoded words, added/special tokens.
//  - WordPieceTokenizer: tokenizer.json WordPiece (bert-base-uncased style): BertNormalizer,
//    BertPreTokenizer, greedy longest-match pieces; bos_id() [CLS] and eot_id() [SEP] from the
//    post-processor's template, so a document is stored as [CLS] text [SEP].
// Both encode (without the template's special tokens) and decode exactly like the `tokenizers`
// package for such files. encode() may be called from several threads at once.
#pragma once
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace sedd {

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;
  virtual std::vector<int64_t> encode(const std::string& text) const = 0;
  virtual std::string decode(const std::vector<int64_t>& ids) const = 0;
  virtual int64_t vocab_size() const = 0;
  virtual int64_t eot_id() const = 0;
  // The token put before every document (WordPiece's [CLS]), or -1 for none.
  virtual int64_t bos_id() const { return -1; }
  // What shards store in their `tokenizer` attribute: "byte" or the tokenizer.json text.
  virtual std::string serialize() const = 0;
  virtual std::string name() const = 0;
};

// "byte", a path to tokenizer.json, or (from a shard attribute) the JSON text itself.
std::unique_ptr<Tokenizer> make_tokenizer(const std::string& spec);

// Throws naming `where` and the byte offset of the first invalid UTF-8 sequence.
void check_utf8(const std::string& text, const std::string& where);
// The byte offset of the first invalid UTF-8 sequence, or npos.
size_t first_invalid_utf8(std::string_view text);

// Two stored tokenizer descriptions compared: the same, different, or unknown when either does
// not say which tokenizer it is (empty: a model converted from elsewhere; a bare file name: older
// shards). Definite descriptions are "byte" and tokenizer.json texts.
enum class TokenizerMatch { Same, Different, Unknown };
TokenizerMatch compare_tokenizers(const std::string& a, const std::string& b);
// "byte", "a tokenizer.json", or "none stored" (what a message calls a description).
std::string describe_tokenizer(const std::string& t);

}  // namespace sedd
