// Detokenizers; see detokenizer.h. The rules and their order are those of the authors' functions
// (MDLM dataloader.py, SEDD data.py: wt_detokenizer, ptb_detokenizer, lm1b_detokenizer,
// lambada_detokenizer, scientific_papers_detokenizer). Python's `\s` and `\w` on str patterns are
// spelled out as classes so that PCRE2's own (which differ: \x1c-\x1f and \x85 are Python
// white space, combining marks are not Python word characters) play no part.
#include "data/detokenizer.h"

#include <pcre2.h>

#include <memory>
#include <vector>

#include "io/error.h"

namespace sedd {

namespace {

// Python's str.isspace(): general category Zs, or bidirectional class WS, B or S.
#define DETOK_S "[\\t-\\r\\x1c-\\x20\\x85\\xa0\\x{1680}\\x{2000}-\\x{200a}\\x{2028}\\x{2029}\\x{202f}\\x{205f}\\x{3000}]"
// Python's `\w`: str.isalnum() (letters, numbers) or the underscore.
#define DETOK_W "[\\p{L}\\p{N}_]"

bool detok_is_space(char32_t c) {
  return (c >= 0x09 && c <= 0x0d) || (c >= 0x1c && c <= 0x20) || c == 0x85 || c == 0xa0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200a) || c == 0x2028 || c == 0x2029 || c == 0x202f || c == 0x205f || c == 0x3000;
}

// Python's str.replace(from, to): every non-overlapping occurrence, left to right. On UTF-8 the
// byte search finds exactly the code point matches.
void detok_replace(std::string& s, std::string_view from, std::string_view to) {
  size_t pos = s.find(from);
  if (pos == std::string::npos) return;
  std::string out;
  out.reserve(s.size());
  size_t last = 0;
  for (; pos != std::string::npos; pos = s.find(from, last)) {
    out.append(s, last, pos - last);
    out.append(to);
    last = pos + from.size();
  }
  out.append(s, last, std::string::npos);
  s.swap(out);
}

// One re.sub(pattern, replacement, s): the replacement is literal text and group references \1..\9.
class DetokRegex {
 public:
  DetokRegex(const char* pattern, std::string_view replacement) : pattern_(pattern) {
    int err = 0;
    PCRE2_SIZE off = 0;
    code_ = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern), PCRE2_ZERO_TERMINATED, PCRE2_UTF | PCRE2_UCP, &err,
                          &off, nullptr);
    SEDD_CHECK(code_, "detokenizer: pattern {} does not compile (PCRE2 error {} at {})", pattern, err, off);
    for (size_t i = 0; i < replacement.size(); ++i) {
      if (replacement[i] == '\\' && i + 1 < replacement.size() && replacement[i + 1] >= '1' &&
          replacement[i + 1] <= '9') {
        pieces_.push_back({{}, replacement[i + 1] - '0'});
        ++i;
      } else {
        if (pieces_.empty() || pieces_.back().group) pieces_.push_back({{}, 0});
        pieces_.back().literal += replacement[i];
      }
    }
  }
  ~DetokRegex() { pcre2_code_free(code_); }
  DetokRegex(const DetokRegex&) = delete;
  DetokRegex& operator=(const DetokRegex&) = delete;

  // Every pattern here matches at least one character, so Python's rules for empty matches do
  // not arise: matches are found left to right, each after the previous one.
  void apply(std::string& s) const {
    std::unique_ptr<pcre2_match_data, decltype(&pcre2_match_data_free)> md(
        pcre2_match_data_create_from_pattern(code_, nullptr), &pcre2_match_data_free);
    SEDD_CHECK(md, "detokenizer: out of memory");
    const auto subject = reinterpret_cast<PCRE2_SPTR>(s.data());
    std::string out;
    PCRE2_SIZE pos = 0, last = 0;
    bool changed = false;
    while (pos <= s.size()) {
      const int rc = pcre2_match(code_, subject, s.size(), pos, PCRE2_NO_UTF_CHECK, md.get(), nullptr);
      if (rc == PCRE2_ERROR_NOMATCH) break;
      SEDD_CHECK(rc > 0, "detokenizer: matching {} failed (PCRE2 error {})", pattern_, rc);
      const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md.get());
      if (!changed) out.reserve(s.size());
      changed = true;
      out.append(s, last, ov[0] - last);
      for (const auto& p : pieces_) {
        if (!p.group) {
          out += p.literal;
        } else if (p.group < rc && ov[2 * p.group] != PCRE2_UNSET) {
          out.append(s, ov[2 * p.group], ov[2 * p.group + 1] - ov[2 * p.group]);
        }
      }
      last = pos = ov[1];
      SEDD_CHECK(ov[1] > ov[0], "detokenizer: {} matched an empty string", pattern_);
    }
    if (!changed) return;
    out.append(s, last, std::string::npos);
    s.swap(out);
  }

 private:
  struct Piece {
    std::string literal;
    int group;
  };
  const char* pattern_;
  pcre2_code* code_ = nullptr;
  std::vector<Piece> pieces_;
};

struct DetokRules {
  // wt_detokenizer
  DetokRegex wt_slash{"/' [0-9]/", "/'[0-9]/"};
  DetokRegex wt_paren{"\\(" DETOK_S "*([^\\)]*?)" DETOK_S "*\\)", "(\\1)"};
  DetokRegex wt_bracket{"\\[" DETOK_S "*([^\\]]*?)" DETOK_S "*\\]", "[\\1]"};
  DetokRegex wt_brace{"\\{" DETOK_S "*([^}]*?)" DETOK_S "*\\}", "{\\1}"};
  DetokRegex wt_double{"\"" DETOK_S "*([^\"]*?)" DETOK_S "*\"", "\"\\1\""};
  DetokRegex wt_single{"'" DETOK_S "*([^']*?)" DETOK_S "*'", "'\\1'"};
  // lm1b_detokenizer
  DetokRegex lm_apostrophe{" '(" DETOK_W "+)", "'\\1"};
  DetokRegex lm_period{" (" DETOK_W "+) \\. ", " \\1. "};
  DetokRegex lm_period_end{" (" DETOK_W "+) \\.$", " \\1."};
  DetokRegex lm_question_end{" \\?$", "?"};
  DetokRegex lm_bang_end{" \\!$", "!"};
  DetokRegex lm_double{"\" ([^\"]+) \"", "\"\\1\""};
  DetokRegex lm_single{"' ([^']+) '", "'\\1'"};
  DetokRegex lm_paren{"\\( ([^\\(\\)]+) \\)", "(\\1)"};
  DetokRegex lm_bracket{"\\[ ([^\\[\\]]+) \\]", "[\\1]"};
};

const DetokRules& detok_rules() {
  static const DetokRules rules;  // compiled once, thread-safe initialisation; read-only after
  return rules;
}

void detok_wikitext(std::string& s) {
  const auto& r = detok_rules();
  // contractions
  detok_replace(s, "s '", "s'");
  r.wt_slash.apply(s);
  // number separators
  detok_replace(s, " @-@ ", "-");
  detok_replace(s, " @,@ ", ",");
  detok_replace(s, " @.@ ", ".");
  // punctuation
  detok_replace(s, " : ", ": ");
  detok_replace(s, " ; ", "; ");
  detok_replace(s, " . ", ". ");
  detok_replace(s, " ! ", "! ");
  detok_replace(s, " ? ", "? ");
  detok_replace(s, " , ", ", ");
  // double brackets
  r.wt_paren.apply(s);
  r.wt_bracket.apply(s);
  r.wt_brace.apply(s);
  r.wt_double.apply(s);
  r.wt_single.apply(s);
  // miscellaneous
  detok_replace(s, "= = = =", "====");
  detok_replace(s, "= = =", "===");
  detok_replace(s, "= =", "==");
  detok_replace(s, " \u00b0 ", "\u00b0");
  detok_replace(s, " \n", "\n");
  detok_replace(s, "\n ", "\n");
  detok_replace(s, " N ", " 1 ");
  detok_replace(s, " 's", "'s");
}

void detok_ptb(std::string& s) {
  detok_replace(s, " 's", "'s");
  detok_replace(s, "s ' ", "s' ");
  detok_replace(s, " n't", "n't");
  detok_replace(s, " \n ", "\n");
  detok_replace(s, "\\/", "/");
  for (int i = 0; i < 10; ++i) detok_replace(s, " N ", " 1 ");  // " N N N " needs several passes
  detok_replace(s, "$ 1", "$1");
  detok_replace(s, "# 1", "#1");
  detok_replace(s, "<unk>", "?");
}

void detok_lm1b(std::string& s) {
  const auto& r = detok_rules();
  detok_replace(s, "http : / / ", "http://");
  detok_replace(s, "https : / / ", "https://");
  r.lm_apostrophe.apply(s);
  r.lm_period.apply(s);
  r.lm_period_end.apply(s);
  detok_replace(s, " ? ", "? ");
  r.lm_question_end.apply(s);
  detok_replace(s, " ! ", "! ");
  r.lm_bang_end.apply(s);
  detok_replace(s, " , ", ", ");
  detok_replace(s, " : ", ": ");
  detok_replace(s, " ; ", "; ");
  detok_replace(s, " / ", "/");
  r.lm_double.apply(s);
  r.lm_single.apply(s);
  r.lm_paren.apply(s);
  r.lm_bracket.apply(s);
  detok_replace(s, "$ ", "$");
  detok_replace(s, "\u00a3 ", "\u00a3");
}

// The code point of the UTF-8 sequence starting at s[i] (valid UTF-8), and its length.
char32_t detok_decode(std::string_view s, size_t i, size_t& len) {
  const auto b = static_cast<unsigned char>(s[i]);
  len = b < 0x80 ? 1 : b < 0xe0 ? 2 : b < 0xf0 ? 3 : 4;
  char32_t c = len == 1 ? b : b & (0x3f >> (len - 1));
  for (size_t k = 1; k < len && i + k < s.size(); ++k) c = (c << 6) | (static_cast<unsigned char>(s[i + k]) & 0x3f);
  return c;
}

// Python's str.strip() without arguments.
std::string_view detok_strip(std::string_view s) {
  size_t begin = 0, len = 0;
  while (begin < s.size() && detok_is_space(detok_decode(s, begin, len))) begin += len;
  size_t end = s.size();
  while (end > begin) {
    size_t start = end - 1;
    while (start > begin && (static_cast<unsigned char>(s[start]) & 0xc0) == 0x80) --start;
    if (!detok_is_space(detok_decode(s, start, len))) break;
    end = start;
  }
  return s.substr(begin, end - begin);
}

void detok_lambada(std::string& s) {
  detok_replace(s, "\u201c", "\"");
  detok_replace(s, "\u201d", "\"");
  s = "\n" + std::string(detok_strip(s));
}

}  // namespace

Detokenizer parse_detokenizer(const std::string& name) {
  for (auto d : {Detokenizer::None, Detokenizer::WikiText, Detokenizer::Ptb, Detokenizer::Lm1b, Detokenizer::Lambada,
                 Detokenizer::ScientificPapers})
    if (name == detokenizer_name(d)) return d;
  fail_option("--detokenizer: unknown detokenizer '{}' (none, wikitext, ptb, lm1b, lambada or scientific_papers)", name);
}

const char* detokenizer_name(Detokenizer d) {
  switch (d) {
    case Detokenizer::None: return "none";
    case Detokenizer::WikiText: return "wikitext";
    case Detokenizer::Ptb: return "ptb";
    case Detokenizer::Lm1b: return "lm1b";
    case Detokenizer::Lambada: return "lambada";
    case Detokenizer::ScientificPapers: return "scientific_papers";
  }
  return "none";
}

std::string detokenize(Detokenizer d, std::string_view text) {
  std::string s(text);
  switch (d) {
    case Detokenizer::None: break;
    case Detokenizer::WikiText: detok_wikitext(s); break;
    case Detokenizer::Ptb: detok_ptb(s); break;
    case Detokenizer::Lm1b: detok_lm1b(s); break;
    case Detokenizer::Lambada: detok_lambada(s); break;
    case Detokenizer::ScientificPapers:
      detok_wikitext(s);
      detok_lm1b(s);
      break;
  }
  return s;
}

}  // namespace sedd
