// The detokenizers of src/data/detokenizer.h against the authors' Python functions (MDLM
// dataloader.py, SEDD data.py) on the inputs of tests/data/detokenizer_reference.json (made by
// tests/data/make_detokenizer_reference.py): the same string for every input and function. Then
// sedd-prepare --detokenizer: the shards hold the tokens of the detokenized text, empty documents
// as one end-of-text token (or dropped with --skip-empty), and an unfinished run with another
// detokenizer is refused.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "data/detokenizer.h"
#include "data/prepare.h"
#include "io/error.h"
#include "io/fs.h"
#include "io/hdf5.h"
#include "test_util.h"

using namespace sedd;
using namespace sedd::test;

namespace {

nlohmann::json detok_reference() {
  return nlohmann::json::parse(fs::read_text(source_dir() + "/tests/data/detokenizer_reference.json"));
}

// Tokens of every shard-*.h5 in `dir`, in file name order.
std::vector<int64_t> detok_shard_tokens(const std::string& dir) {
  std::vector<std::string> files;
  for (const auto& e : std::filesystem::directory_iterator(dir))
    if (e.path().extension() == ".h5") files.push_back(e.path().string());
  std::sort(files.begin(), files.end());
  std::vector<int64_t> all;
  for (const auto& f : files) {
    auto ids = h5::File(f, h5::Mode::Read).read("/tokens").to(torch::kLong);
    all.insert(all.end(), ids.data_ptr<int64_t>(), ids.data_ptr<int64_t>() + ids.numel());
  }
  return all;
}

// The byte tokenizer's ids of `docs`, each followed by end-of-text (256).
std::vector<int64_t> detok_byte_ids(const std::vector<std::string>& docs) {
  std::vector<int64_t> ids;
  for (const auto& d : docs) {
    for (unsigned char c : d) ids.push_back(c);
    ids.push_back(256);
  }
  return ids;
}

}  // namespace

TEST(DetokenizerReference, EveryFunctionMatchesTheAuthorsOnEveryInput) {
  const auto ref = detok_reference();
  const auto inputs = ref["inputs"].get<std::vector<std::string>>();
  ASSERT_GT(inputs.size(), 100u);
  for (const char* name : {"wikitext", "ptb", "lm1b", "lambada", "scientific_papers"}) {
    const Detokenizer d = parse_detokenizer(name);
    EXPECT_STREQ(detokenizer_name(d), name);
    const auto want = ref["outputs"][name].get<std::vector<std::string>>();
    ASSERT_EQ(want.size(), inputs.size()) << name;
    int wrong = 0, changed = 0;
    for (size_t i = 0; i < inputs.size(); ++i) {
      const std::string got = detokenize(d, inputs[i]);
      changed += want[i] != inputs[i];
      if (got != want[i] && ++wrong <= 5)
        ADD_FAILURE() << name << " on " << nlohmann::json(inputs[i]).dump() << ": " << nlohmann::json(got).dump()
                      << " != " << nlohmann::json(want[i]).dump();
    }
    EXPECT_EQ(wrong, 0) << name << ": of " << inputs.size() << " inputs";
    EXPECT_GT(changed, 0) << name << ": the fixture exercises nothing";
  }
  EXPECT_EQ(detokenize(Detokenizer::None, "a ( b )"), "a ( b )");
}

TEST(DetokenizerReference, UnknownNameIsAnOptionError) {
  EXPECT_THROW(parse_detokenizer("wikitext103"), OptionError);
  EXPECT_NE(error_of([] { parse_detokenizer("gpt2"); }).find("--detokenizer: unknown detokenizer 'gpt2'"),
            std::string::npos);
}

// sedd-prepare --detokenizer wikitext on JSONL documents (the fixture's inputs, empty ones
// included): the shards are the byte tokens of the authors' outputs, each followed by end-of-text.
TEST(DetokenizerPrepare, ShardsHoldTheDetokenizedText) {
  const auto ref = detok_reference();
  const auto inputs = ref["inputs"].get<std::vector<std::string>>();
  const auto want = ref["outputs"]["wikitext"].get<std::vector<std::string>>();
  TempDir tmp;
  {
    std::ofstream f(tmp / "docs.jsonl");
    for (const auto& s : inputs) f << nlohmann::json({{"text", s}}).dump() << "\n";
  }
  std::string log;
  ASSERT_EQ(run(fmt::format("cd {} && {}/sedd-prepare --input docs.jsonl --tokenizer byte --detokenizer wikitext "
                            "--out kept --threads 2 --part-bytes 4096 2>&1",
                            tmp.path, bin_dir()),
                &log),
            0)
      << log;
  EXPECT_EQ(detok_shard_tokens(tmp / "kept"), detok_byte_ids(want));
  ASSERT_NE(std::find(want.begin(), want.end(), std::string()), want.end()) << "the fixture has no empty output";

  // --skip-empty: the documents whose detokenized text is empty are gone, the others unchanged.
  ASSERT_EQ(run(fmt::format("cd {} && {}/sedd-prepare --input docs.jsonl --tokenizer byte --detokenizer wikitext "
                            "--skip-empty --out skipped 2>&1",
                            tmp.path, bin_dir()),
                &log),
            0)
      << log;
  std::vector<std::string> nonempty;
  for (const auto& s : want)
    if (!s.empty()) nonempty.push_back(s);
  EXPECT_EQ(detok_shard_tokens(tmp / "skipped"), detok_byte_ids(nonempty));

  // lambada turns every document, the empty one too, into "\n" + its stripped text.
  ASSERT_EQ(run(fmt::format("cd {} && {}/sedd-prepare --input docs.jsonl --tokenizer byte --detokenizer lambada "
                            "--skip-empty --out lambada 2>&1",
                            tmp.path, bin_dir()),
                &log),
            0)
      << log;
  EXPECT_EQ(detok_shard_tokens(tmp / "lambada"),
            detok_byte_ids(ref["outputs"]["lambada"].get<std::vector<std::string>>()));

  // A bad name: exit 2, naming the option.
  EXPECT_EQ(run(fmt::format("cd {} && {}/sedd-prepare --input docs.jsonl --detokenizer wt --out bad 2>&1", tmp.path,
                            bin_dir()),
                &log),
            2)
      << log;
  EXPECT_NE(log.find("--detokenizer: unknown detokenizer 'wt'"), std::string::npos) << log;
  EXPECT_FALSE(std::filesystem::exists(tmp / "bad/shard-00000.h5"));
}

// The detokenizer and --skip-empty are part of what the shards depend on: an unfinished run with
// another of them is refused, naming it; the same arguments continue it.
TEST(DetokenizerPrepare, UnfinishedRunWithAnotherDetokenizerIsRefused) {
  TempDir tmp;
  std::ofstream(tmp / "a.jsonl") << "{\"text\": \"a ( b )\"}\n{\"text\": \"\"}\n";
  PrepareOptions opt;
  opt.inputs = {tmp / "a.jsonl"};
  opt.out = tmp / "out";
  opt.detokenizer = Detokenizer::WikiText;
  Preparation(opt).open_output();  // leaves the manifest of an unfinished run
  PrepareOptions other = opt;
  other.detokenizer = Detokenizer::Ptb;
  const std::string msg = error_of([&] { Preparation(other).open_output(); });
  EXPECT_NE(msg.find("(--detokenizer differs: wikitext there, ptb here)"), std::string::npos) << msg;
  other = opt;
  other.skip_empty = true;
  const std::string msg2 = error_of([&] { Preparation(other).open_output(); });
  EXPECT_NE(msg2.find("--skip-empty differs"), std::string::npos) << msg2;
  EXPECT_EQ(Preparation(opt).open_output(), 0);  // same arguments: continued
}
