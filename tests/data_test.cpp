// Data: shards, the world-size-independent global order, exact resume, bad input, tokenizers.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <set>

#include "data/prepare.h"
#include "data/shard.h"
#include "data/token_stream.h"
#include "data/tokenizer.h"
#include "io/error.h"
#include "io/hdf5.h"
#include "io/fs.h"
#include <nlohmann/json.hpp>
#include "test_util.h"

using namespace sedd;
using namespace sedd::test;

namespace {

constexpr int64_t kVocab = 1000, kLen = 16;
const int64_t kShardSizes[] = {1000, 700, 1300};

// Counting shards: token at global offset p is p mod vocab, so every window is arithmetic.
std::string make_counting_shards(const TempDir& tmp) {
  int64_t base = 0;
  for (int i = 0; i < 3; ++i) {
    write_shard(tmp / fmt::format("count-{}.h5", i), torch::arange(base, base + kShardSizes[i]) % kVocab, kVocab, 0,
                "byte");
    base += kShardSizes[i];
  }
  return tmp / "count-*.h5";
}

torch::Tensor expected_window(const WindowRef& w) {
  int64_t base = 0;
  for (int i = 0; i < w.shard; ++i) base += kShardSizes[i];
  return (torch::arange(kLen) + base + w.window * kLen) % kVocab;
}

TokenStreamConfig stream_config(const std::string& data, int rank, int world) {
  TokenStreamConfig c;
  c.data = data;
  c.seq_len = kLen;
  c.global_batch = 6;
  c.rank = rank;
  c.world = world;
  c.seed = 1234;
  return c;
}

// All ranks' rows of the next global batch, in rank order.
torch::Tensor next_global(std::vector<std::unique_ptr<TokenStream>>& ranks) {
  std::vector<torch::Tensor> parts;
  for (auto& r : ranks) parts.push_back(r->next());
  return torch::cat(parts);
}

std::vector<std::unique_ptr<TokenStream>> make_ranks(const std::string& data, int world) {
  std::vector<std::unique_ptr<TokenStream>> v;
  for (int r = 0; r < world; ++r) v.push_back(std::make_unique<TokenStream>(stream_config(data, r, world)));
  return v;
}

}  // namespace

TEST(DataStream, OneGlobalOrderForAnyWorldSize) {
  TempDir tmp;
  std::string data = make_counting_shards(tmp);
  auto one = make_ranks(data, 1);
  const int64_t M = one[0]->windows_per_epoch();
  ASSERT_EQ(M, 1000 / kLen + 700 / kLen + 1300 / kLen);
  const int batches = static_cast<int>((2 * M + 5) / 6);  // two epochs
  std::vector<torch::Tensor> reference;
  for (int b = 0; b < batches; ++b) reference.push_back(one[0]->next());
  // Sequence k is exactly the window locate(k) says, and every epoch visits every window once.
  for (int epoch = 0; epoch < 2; ++epoch) {
    std::set<std::pair<int, int64_t>> seen;
    for (int64_t k = epoch * M; k < (epoch + 1) * M; ++k) {
      auto w = one[0]->locate(k);
      EXPECT_TRUE(torch::equal(reference[k / 6][k % 6], expected_window(w))) << "k=" << k;
      seen.insert({w.shard, w.window});
    }
    EXPECT_EQ(static_cast<int64_t>(seen.size()), M) << "epoch " << epoch << ": overlap or gap";
  }
  EXPECT_FALSE(torch::equal(reference[0], reference[M / 6 + 1])) << "epochs should be shuffled differently";
  for (int world : {2, 3}) {
    auto ranks = make_ranks(data, world);
    for (int b = 0; b < batches; ++b)
      ASSERT_TRUE(torch::equal(next_global(ranks), reference[b])) << "W=" << world << " batch " << b;
  }
}

TEST(DataStream, ResumeEqualsContinueAcrossWorldSizes) {
  TempDir tmp;
  std::string data = make_counting_shards(tmp);
  auto straight = make_ranks(data, 2);
  std::vector<torch::Tensor> expect;
  for (int b = 0; b < 48; ++b) expect.push_back(next_global(straight));
  for (int resume_world : {2, 1, 3}) {
    auto first = make_ranks(data, 2);
    for (int b = 0; b < 40; ++b) next_global(first);
    int64_t saved = first[0]->position();
    EXPECT_EQ(saved, 40 * 6);
    first.clear();
    auto resumed = make_ranks(data, resume_world);
    for (auto& r : resumed) r->seek(saved);
    for (int b = 40; b < 48; ++b)
      EXPECT_TRUE(torch::equal(next_global(resumed), expect[b])) << "resumed on W=" << resume_world << " batch " << b;
  }
}

TEST(DataStream, SynchronousAndPrefetchedReadsAgree) {
  TempDir tmp;
  std::string data = make_counting_shards(tmp);
  auto a = stream_config(data, 0, 1), b = a;
  b.prefetch = 0;
  TokenStream sa(a), sb(b);
  for (int i = 0; i < 30; ++i) EXPECT_TRUE(torch::equal(sa.next(), sb.next()));
}

TEST(DataBadInput, EachProblemNamesTheFile) {
  TempDir tmp;
  auto check = [&](const std::string& data, const std::string& needle) {
    std::string msg = error_of([&] {
      TokenStream s(stream_config(data, 0, 1));
      for (int i = 0; i < 200; ++i) s.next();
    });
    EXPECT_NE(msg.find(needle), std::string::npos) << "expected '" << needle << "' in: " << msg;
  };
  check(tmp / "missing.h5", "missing.h5: no such shard file");
  check(tmp / "nothing-*.h5", "matches no shard files");
  std::ofstream(tmp / "text.h5") << "hello";
  check(tmp / "text.h5", "text.h5: not an HDF5 file");
  {
    h5::File f(tmp / "notokens.h5", h5::Mode::Create);
    f.write("/other", torch::arange(10));
  }
  check(tmp / "notokens.h5", "notokens.h5: not a token shard: dataset /tokens is missing");
  {
    h5::File f(tmp / "float.h5", h5::Mode::Create);
    f.write("/tokens", torch::rand({100}));
    f.set_attr("/", "vocab_size", int64_t{10});
    f.set_attr("/", "eot_id", int64_t{0});
    f.set_attr("/", "tokenizer", std::string("byte"));
    f.set_attr("/", "format_version", int64_t{1});
  }
  check(tmp / "float.h5", "float.h5: /tokens has dtype Float, expected uint16 or uint32");
  auto bad = torch::arange(2000) % 100;
  bad[1234] = 700;  // >= vocab 500
  write_shard(tmp / "oob.h5", bad, 500, 0, "byte");
  check(tmp / "oob.h5", "oob.h5: token id 700 >= vocab_size 500 at offset 1234");
  write_shard(tmp / "va.h5", torch::arange(100) % 50, 50, 0, "byte");
  write_shard(tmp / "vb.h5", torch::arange(100) % 50, 60, 0, "byte");
  check(tmp / "va.h5," + tmp / "vb.h5", "vb.h5: vocabulary/tokenizer differs from");
  // A truncated copy of a good shard.
  write_shard(tmp / "good.h5", torch::arange(200000) % 1000, 1000, 0, "byte");
  {
    std::ifstream in(tmp / "good.h5", std::ios::binary);
    std::string bytes((std::istreambuf_iterator<char>(in)), {});
    std::ofstream(tmp / "cut.h5", std::ios::binary).write(bytes.data(), bytes.size() / 2);
  }
  std::string msg = error_of([&] {
    TokenStream s(stream_config(tmp / "cut.h5", 0, 1));
    for (int i = 0; i < 5000; ++i) s.next();
  });
  EXPECT_NE(msg.find("cut.h5"), std::string::npos) << msg;
  EXPECT_TRUE(msg.find("truncated") != std::string::npos || msg.find("damaged") != std::string::npos) << msg;
}

TEST(DataPrepare, ShardsFromJsonlAndPlainTextAcrossRanks) {
  TempDir tmp;
  std::ofstream(tmp / "a.jsonl") << R"({"text": "hello world"})" << "\n" << R"({"text": "second doc"})" << "\n";
  std::ofstream(tmp / "b.jsonl") << R"({"text": "third"})" << "\n";
  std::string out;
  std::string cmd = fmt::format("cd {} && OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 mpirun --oversubscribe -np 2 "
                                "{}/sedd-prepare --input a.jsonl b.jsonl --jsonl-field text --out shards --shard-tokens 8",
                                tmp.path, bin_dir());
  ASSERT_EQ(run(cmd, &out), 0) << out;
  EXPECT_NE(out.find("3 documents, 29 tokens"), std::string::npos) << out;
  auto files = expand_shard_list(tmp / "shards/*.h5");
  int64_t total = 0;
  std::string text;
  auto tok = make_tokenizer("byte");
  for (const auto& f : files) {
    auto info = read_shard_info(f);
    EXPECT_LE(info.tokens, 8);
    EXPECT_EQ(info.dtype, torch::kUInt16);
    total += info.tokens;
    auto ids = h5::File(f, h5::Mode::Read).read("/tokens");
    std::vector<int64_t> v(ids.data_ptr<int64_t>(), ids.data_ptr<int64_t>() + ids.numel());
    for (auto id : v) text += id == 256 ? std::string("|") : tok->decode({id});
  }
  EXPECT_EQ(total, 29);  // 11 + 10 + 5 bytes + 3 end-of-text
  EXPECT_NE(text.find("hello world|second doc|"), std::string::npos) << text;
  EXPECT_FALSE(std::filesystem::exists(prepare_state_dir(tmp / "shards")));
}

TEST(DataPrepare, BadInputFailsCleanlyAndPublishesNothing) {
  TempDir tmp;
  std::ofstream(tmp / "ok.jsonl") << R"({"text": "fine"})" << "\n";
  std::ofstream(tmp / "nofield.jsonl") << R"({"text": "a"})" << "\n" << R"({"body": "b"})" << "\n";
  std::ofstream(tmp / "badutf.txt") << "abc\xff\xfe" << "def";
  std::ofstream(tmp / "empty.txt");
  auto prepare = [&](const std::string& args, std::string* out) {
    return run(fmt::format("cd {} && OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 mpirun --oversubscribe "
                           "-np 2 {}/sedd-prepare {} --out shards",
                           tmp.path, bin_dir(), args),
               out);
  };
  std::string out;
  // Bad input data and bad options: exit 2 on both ranks (tools/tool_common.h, the exit codes).
  EXPECT_EQ(prepare("--input ok.jsonl nofield.jsonl --jsonl-field text", &out), 2);
  EXPECT_NE(out.find("nofield.jsonl:2: no string field 'text'"), std::string::npos) << out;
  EXPECT_EQ(prepare("--input badutf.txt", &out), 2);
  EXPECT_NE(out.find("badutf.txt: invalid UTF-8 at byte offset 3"), std::string::npos) << out;
  EXPECT_EQ(prepare("--input empty.txt", &out), 2);
  EXPECT_NE(out.find("empty.txt: empty input file"), std::string::npos) << out;
  EXPECT_EQ(prepare("--input missing.txt", &out), 2);
  EXPECT_NE(out.find("missing.txt: no such input file"), std::string::npos) << out;
  EXPECT_EQ(prepare("--input ok.jsonl --bogus 1", &out), 2);
  EXPECT_NE(out.find("bogus"), std::string::npos) << out;
  // The good rank's shard was never published.
  bool any = false;
  if (std::filesystem::exists(tmp / "shards"))
    for (const auto& e : std::filesystem::recursive_directory_iterator(tmp / "shards"))
      any |= e.path().extension() == ".h5";
  EXPECT_FALSE(any) << "a failed prepare left shards behind";
}

namespace {

int run_prepare(const TempDir& tmp, int np, const std::string& args, std::string* out) {
  return run(fmt::format("cd {} && {} -np {} {}/sedd-prepare {}", tmp.path, kMpirun, np, bin_dir(), args), out);
}

// name -> tokens of every shard-*.h5 in `dir`.
std::map<std::string, std::vector<int64_t>> shards_in(const std::string& dir) {
  std::map<std::string, std::vector<int64_t>> m;
  for (const auto& e : std::filesystem::directory_iterator(dir))
    if (e.path().extension() == ".h5") {
      auto ids = h5::File(e.path().string(), h5::Mode::Read).read("/tokens").to(torch::kLong);
      m[e.path().filename().string()] = std::vector<int64_t>(ids.data_ptr<int64_t>(), ids.data_ptr<int64_t>() + ids.numel());
    }
  return m;
}

}  // namespace

// Shards of two runs must never mix in one folder: a non-empty --out is refused naming it; with
// --overwrite the old shards are replaced, and only once the new ones are complete (a failed run
// leaves the old set intact); what is not a shard is never deleted.
TEST(DataPrepare, NonEmptyOutIsRefusedUnlessOverwriteReplacesEveryOldShard) {
  TempDir tmp;
  std::ofstream(tmp / "a.jsonl") << R"({"text": "first corpus, one"})" << "\n" << R"({"text": "first corpus, two"})" << "\n";
  std::ofstream(tmp / "b.jsonl") << R"({"text": "first corpus, three"})" << "\n";
  std::ofstream(tmp / "c.jsonl") << R"({"text": "second"})" << "\n";
  std::ofstream(tmp / "bad.txt") << "abc\xff";
  std::string out;
  ASSERT_EQ(run_prepare(tmp, 2, "--input a.jsonl b.jsonl --out shards --shard-tokens 8", &out), 0) << out;
  const auto first = shards_in(tmp / "shards");
  ASSERT_GT(first.size(), 4u);
  ASSERT_TRUE(first.count("shard-00004.h5"));

  EXPECT_EQ(run_prepare(tmp, 1, "--input c.jsonl --out shards", &out), 2);
  EXPECT_NE(out.find("--out shards: the folder already holds"), std::string::npos) << out;
  EXPECT_NE(out.find("--overwrite"), std::string::npos) << out;
  EXPECT_EQ(shards_in(tmp / "shards"), first);

  // --overwrite, but a rank fails: the old set stays as it was, with no new shard among it.
  EXPECT_EQ(run_prepare(tmp, 2, "--input c.jsonl bad.txt --out shards --overwrite", &out), 2);
  EXPECT_NE(out.find("bad.txt: invalid UTF-8"), std::string::npos) << out;
  EXPECT_EQ(shards_in(tmp / "shards"), first);

  // --overwrite with one rank and one document: exactly the new shard is left.
  ASSERT_EQ(run_prepare(tmp, 1, "--input c.jsonl --out shards --overwrite", &out), 0) << out;
  auto now = shards_in(tmp / "shards");
  ASSERT_EQ(now.size(), 1u);
  std::vector<int64_t> want = {'s', 'e', 'c', 'o', 'n', 'd', 256};
  EXPECT_EQ(now.begin()->second, want);
  for (const auto& e : std::filesystem::directory_iterator(tmp / "shards"))
    EXPECT_EQ(e.path().extension(), ".h5") << "left behind: " << e.path();

  // Something that is not a shard is refused even with --overwrite, and kept.
  std::ofstream(tmp / "shards/notes.txt") << "mine";
  EXPECT_EQ(run_prepare(tmp, 1, "--input c.jsonl --out shards --overwrite", &out), 2);
  EXPECT_NE(out.find("--out shards: the folder holds 'notes.txt', which is not a shard"), std::string::npos) << out;
  EXPECT_TRUE(std::filesystem::exists(tmp / "shards/notes.txt"));
  EXPECT_EQ(shards_in(tmp / "shards"), now);
  EXPECT_EQ(run_prepare(tmp, 1, "--input c.jsonl --out c.jsonl", &out), 2);
  EXPECT_NE(out.find("--out c.jsonl: exists and is not a folder"), std::string::npos) << out;
  // An empty folder (made beforehand, or left by a failed run) is fine.
  std::filesystem::create_directories(tmp / "empty");
  EXPECT_EQ(run_prepare(tmp, 2, "--input a.jsonl b.jsonl --out empty", &out), 0) << out;
}

// The same file given twice (under any spelling) would duplicate its documents: refused.
TEST(DataPrepare, DuplicateInputsAreRefused) {
  TempDir tmp;
  std::ofstream(tmp / "a.jsonl") << R"({"text": "one"})" << "\n";
  std::ofstream(tmp / "b.jsonl") << R"({"text": "two"})" << "\n";
  std::string out;
  EXPECT_EQ(run_prepare(tmp, 2, "--input a.jsonl b.jsonl a.jsonl --out shards", &out), 2);
  EXPECT_NE(out.find("--input: a.jsonl is given twice"), std::string::npos) << out;
  EXPECT_EQ(run_prepare(tmp, 1, fmt::format("--input a.jsonl ./b.jsonl {} --out shards", tmp / "a.jsonl"), &out), 2);
  EXPECT_NE(out.find(fmt::format("--input: {} is given twice (also as a.jsonl)", tmp / "a.jsonl")), std::string::npos)
      << out;
  EXPECT_TRUE(!std::filesystem::exists(tmp / "shards") || shards_in(tmp / "shards").empty());
  EXPECT_EQ(run_prepare(tmp, 2, "--input a.jsonl ./b.jsonl --out shards", &out), 0) << out;
}

TEST(DataTokenizer, ByteLevelBpeMatchesHuggingFaceTokenizers) {
  SEDD_REQUIRE_PYTHON("tokenizers");
  TempDir tmp;
  const std::string text =
      "The quick brown fox jumps over the lazy dog. It's 2026, isn't it?  Spaces   and\ttabs\n"
      "Größere Übungen für Käse und Straße. Ça va très bien, merci! ¿Qué tal? Ñandú.\n"
      "Привет, как дела? Съешь же ещё этих мягких французских булок.\n"
      "你好，世界！今天天气很好。日本語のテキストもあります。한국어 문장도 있습니다.\n"
      "Ελληνικά γράμματα, עברית, العربية, हिन्दी, emoji 🙂🚀 and numbers 3.14159 1,000,000.\n"
      "<|endoftext|>after the special token 'quoted' \"double\" (parens) [brackets] {braces}\n";
  std::ofstream(tmp / "text.txt") << text;
  std::string script = fmt::format(
      "import json\n"
      "from tokenizers import ByteLevelBPETokenizer\n"
      "text=open('{0}/text.txt',encoding='utf-8').read()\n"
      "t=ByteLevelBPETokenizer()\n"
      "t.train_from_iterator([text]*20, vocab_size=600, min_frequency=2, special_tokens=['<|endoftext|>'])\n"
      "t.save('{0}/tokenizer.json')\n"
      "ids=t.encode(text).ids\n"
      "json.dump({{'ids': ids, 'decoded': t.decode(ids, skip_special_tokens=False), 'vocab': t.get_vocab_size()}},"
      " open('{0}/expect.json','w'))\n",
      tmp.path);
  std::ofstream(tmp / "make.py") << script;
  std::string out;
  ASSERT_EQ(run(python() + " " + (tmp / "make.py"), &out), 0) << out;
  auto expect = nlohmann::json::parse(fs::read_text(tmp / "expect.json"));
  auto tok = make_tokenizer(tmp / "tokenizer.json");
  auto ids = tok->encode(text);
  auto want = expect["ids"].get<std::vector<int64_t>>();
  ASSERT_EQ(ids.size(), want.size());
  int64_t same = 0;
  for (size_t i = 0; i < ids.size(); ++i) same += ids[i] == want[i];
  EXPECT_EQ(same, static_cast<int64_t>(want.size())) << "ids differ from the tokenizers package";
  EXPECT_EQ(tok->decode(ids), expect["decoded"].get<std::string>());
  EXPECT_EQ(tok->decode(ids), text);
  EXPECT_EQ(tok->vocab_size(), expect["vocab"].get<int64_t>());
  EXPECT_EQ(tok->eot_id(), 0);
  // The tokenizer travels inside shards: rebuilding it from its serialized JSON gives the same ids.
  EXPECT_EQ(make_tokenizer(tok->serialize())->encode(text), ids);
  // Byte tokenizer: exact round trip of arbitrary bytes.
  auto bt = make_tokenizer("byte");
  EXPECT_EQ(bt->decode(bt->encode(text)), text);
  EXPECT_EQ(bt->vocab_size(), 257);
}
