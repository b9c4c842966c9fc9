// The detokenizers the SEDD and MDLM papers apply to their evaluation corpora before tokenizing
// (WikiText, PTB, LM1B, LAMBADA, Scientific Papers): each turns the corpus's tokenized spelling
// back into running text ("don 't" -> "don't", " @-@ " -> "-", "( x )" -> "(x)", ...). Each gives,
// string for string, what the authors' Python function gives (str.replace and re.sub applied in
// the same order, Python's Unicode `\s` and `\w`, `$` before a final newline), so prepared shards
// hold the tokens the papers evaluate on.
#pragma once
#include <string>
#include <string_view>

namespace sedd {

enum class Detokenizer { None, WikiText, Ptb, Lm1b, Lambada, ScientificPapers };

// "none", "wikitext", "ptb", "lm1b", "lambada" or "scientific_papers"; throws OptionError naming
// --detokenizer otherwise.
Detokenizer parse_detokenizer(const std::string& name);
const char* detokenizer_name(Detokenizer d);
// `text` (valid UTF-8) detokenized; safe to call from several threads.
std::string detokenize(Detokenizer d, std::string_view text);

}  // namespace sedd
