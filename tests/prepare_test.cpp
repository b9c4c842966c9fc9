// sedd-prepare at scale: the shards are the same for 1, 2 and 3 ranks (and threads) on inputs that
// are split into parts (JSONL byte ranges, Parquet row groups, Arrow record batches) and hold the
// documents in input order, tokenized exactly as Hugging Face `tokenizers` does; the held-out
// split; a run killed with SIGKILL continues to the same shards, and an unfinished run with other
// arguments is refused. The tokenizers against `tokenizers` on text chosen to hit the corners of
// the GPT-2 pre-tokenizer (Unicode letters and numbers, white space runs, contractions).
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <thread>

#include "data/prepare.h"
#include "data/shard.h"
#include "data/text_source.h"
#include "data/tokenizer.h"
#include "io/fs.h"
#include "io/hdf5.h"
#include "test_util.h"

using namespace sedd;
using namespace sedd::test;

namespace {

int prep_run(const TempDir& tmp, int np, const std::string& args, std::string* out) {
  return run(fmt::format("cd {} && SEDD_CORES=2 {} -np {} {}/sedd-prepare {}", tmp.path, kMpirun, np, bin_dir(), args),
             out);
}

// file name -> tokens, for every shard-*.h5 in `dir`.
std::map<std::string, std::vector<int64_t>> prep_shards(const std::string& dir) {
  std::map<std::string, std::vector<int64_t>> m;
  if (!std::filesystem::exists(dir)) return m;
  for (const auto& e : std::filesystem::directory_iterator(dir))
    if (e.path().extension() == ".h5") {
      auto ids = h5::File(e.path().string(), h5::Mode::Read).read("/tokens").to(torch::kLong);
      m[e.path().filename().string()] = std::vector<int64_t>(ids.data_ptr<int64_t>(), ids.data_ptr<int64_t>() + ids.numel());
    }
  return m;
}

std::vector<int64_t> prep_concat(const std::map<std::string, std::vector<int64_t>>& shards) {
  std::vector<int64_t> all;
  for (const auto& [name, ids] : shards) all.insert(all.end(), ids.begin(), ids.end());
  return all;
}

void prep_python(const TempDir& tmp, const std::string& script) {
  std::ofstream(tmp / "make.py") << script;
  std::string out;
  ASSERT_EQ(run(fmt::format("cd {} && {} make.py", tmp.path, python()), &out), 0) << out;
}

// Documents of varied length and script, some with the tokenizer's special token inside.
const char* kMakeCorpus = R"PY(import json, random
from tokenizers import ByteLevelBPETokenizer
random.seed(7)
words = ["the", "model", "noise", "score", "entropy", "diffusion", "It's", "we'll", "they're", "don't", "3.14",
         "2026", "naïve", "café", "Straße", "Привет", "мир", "你好", "世界", "🙂", "🚀", "x²", "Ⅻ", "٣٤", "e\u0301",
         "tab\there", "  ", "\n\n", "\u00a0", "\u3000", "(parens)", "[brackets]", "'quoted'", "\"double\"", "--", "...",
         "<|endoftext|>"]
def doc(n):
    return " ".join(random.choice(words) for _ in range(n))
jsonl = [doc(random.randint(1, 120)) for _ in range(260)]
text = doc(400)
parquet = [doc(random.randint(1, 40)) for _ in range(23)]
stream = [doc(random.randint(1, 40)) for _ in range(17)]
t = ByteLevelBPETokenizer()
t.train_from_iterator(jsonl + [text], vocab_size=700, min_frequency=2, special_tokens=["<|endoftext|>"])
t.save("tok.json")
with open("a.jsonl", "w", encoding="utf-8") as f:
    for d in jsonl:
        f.write(json.dumps({"text": d}) + "\n")
open("b.txt", "w", encoding="utf-8").write(text)
order = jsonl + [text]
try:
    import pyarrow as pa, pyarrow.parquet as pq
    pq.write_table(pa.table({"text": parquet}), "c.parquet", row_group_size=4)
    tb = pa.table({"text": pa.array(stream, pa.large_string())})
    with pa.ipc.new_stream("d.arrow", tb.schema) as w:
        for batch in tb.to_batches(max_chunksize=3):
            w.write_batch(batch)
    order += parquet + stream
except ImportError:
    pass
eot = t.token_to_id("<|endoftext|>")
ids = []
for d in order:
    ids += t.encode(d).ids + [eot]
json.dump({"ids": ids, "docs": len(order)}, open("expect.json", "w"))
)PY";

}  // namespace

// The same shards, in input order and as `tokenizers` encodes the documents, for 1 rank, 2 ranks
// of 2 threads and 3 ranks: every input is cut into parts the ranks share.
TEST(PrepareSplit, ShardsAreTheSameForOneTwoAndThreeRanks) {
  TempDir tmp;
  prep_python(tmp, kMakeCorpus);
  const auto expect = nlohmann::json::parse(fs::read_text(tmp / "expect.json"));
  const auto want = expect["ids"].get<std::vector<int64_t>>();
  std::string inputs = "a.jsonl b.txt";
  if (std::filesystem::exists(tmp / "c.parquet")) inputs += " c.parquet d.arrow";
  std::map<std::string, std::vector<int64_t>> first;
  for (auto [np, threads] : {std::pair{1, 1}, {2, 2}, {3, 1}}) {
    const std::string out = fmt::format("out{}", np);
    std::string log;
    ASSERT_EQ(prep_run(tmp, np,
                       fmt::format("--input {} --tokenizer tok.json --out {} --shard-tokens 997 --part-bytes 2048 "
                                   "--threads {}",
                                   inputs, out, threads),
                       &log),
              0)
        << log;
    EXPECT_NE(log.find(fmt::format("{} documents, {} tokens", expect["docs"].get<int64_t>(), want.size())),
              std::string::npos)
        << log;
    auto shards = prep_shards(tmp / out);
    ASSERT_GT(shards.size(), 3u);
    for (const auto& [name, ids] : shards) EXPECT_LE(ids.size(), 997u) << name;
    EXPECT_EQ(prep_concat(shards), want) << np << " ranks: not the documents in input order";
    if (np == 1) first = shards;
    else EXPECT_EQ(shards, first) << np << " ranks give other shards than one";
    EXPECT_FALSE(std::filesystem::exists(prepare_state_dir(tmp / out)));
  }
}

// --valid-docs N holds out the last N documents, --valid-every K every K-th, in input order and
// whatever the number of ranks; the counts are printed. Impossible splits are refused.
TEST(PrepareHeldOut, LastDocumentsOrEveryKthGoToValid) {
  TempDir tmp;
  std::vector<std::string> docs;
  {
    std::ofstream f(tmp / "a.jsonl");
    for (int d = 0; d < 40; ++d) {
      docs.push_back(fmt::format("document number {} {}", d, std::string(d % 7, 'x')));
      f << nlohmann::json{{"text", docs.back()}}.dump() << "\n";
    }
  }
  auto bytes_of = [&](auto pick) {
    std::vector<int64_t> ids;
    for (size_t d = 0; d < docs.size(); ++d)
      if (pick(d)) {
        for (unsigned char c : docs[d]) ids.push_back(c);
        ids.push_back(256);
      }
    return ids;
  };
  std::string log;
  ASSERT_EQ(prep_run(tmp, 2, "--input a.jsonl --out last --valid-docs 6 --shard-tokens 100 --part-bytes 300", &log), 0)
      << log;
  EXPECT_NE(log.find("train: 34 documents"), std::string::npos) << log;
  EXPECT_NE(log.find("valid: 6 documents"), std::string::npos) << log;
  EXPECT_EQ(prep_concat(prep_shards(tmp / "last/train")), bytes_of([](size_t d) { return d < 34; }));
  EXPECT_EQ(prep_concat(prep_shards(tmp / "last/valid")), bytes_of([](size_t d) { return d >= 34; }));
  for (const auto& e : std::filesystem::directory_iterator(tmp / "last"))
    EXPECT_TRUE(e.path().filename() == "train" || e.path().filename() == "valid") << e.path();

  ASSERT_EQ(prep_run(tmp, 3, "--input a.jsonl --out every --valid-every 4 --shard-tokens 100 --part-bytes 300", &log), 0)
      << log;
  EXPECT_NE(log.find("train: 30 documents"), std::string::npos) << log;
  EXPECT_NE(log.find("valid: 10 documents"), std::string::npos) << log;
  EXPECT_EQ(prep_concat(prep_shards(tmp / "every/train")), bytes_of([](size_t d) { return (d + 1) % 4 != 0; }));
  EXPECT_EQ(prep_concat(prep_shards(tmp / "every/valid")), bytes_of([](size_t d) { return (d + 1) % 4 == 0; }));
  // One rank, one thread: the same split.
  ASSERT_EQ(prep_run(tmp, 1, "--input a.jsonl --out every1 --valid-every 4 --shard-tokens 100 --threads 1", &log), 0)
      << log;
  EXPECT_EQ(prep_shards(tmp / "every1/valid"), prep_shards(tmp / "every/valid"));
  EXPECT_EQ(prep_shards(tmp / "every1/train"), prep_shards(tmp / "every/train"));

  EXPECT_EQ(prep_run(tmp, 1, "--input a.jsonl --out bad1 --valid-docs 40", &log), 2);
  EXPECT_NE(log.find("--valid-docs 40: the inputs hold 40 documents; the training split would be empty"),
            std::string::npos)
      << log;
  EXPECT_EQ(prep_run(tmp, 1, "--input a.jsonl --out bad2 --valid-docs 2 --valid-every 3", &log), 2);
  EXPECT_NE(log.find("--valid-docs and --valid-every: give one of them"), std::string::npos) << log;
  EXPECT_EQ(prep_run(tmp, 1, "--input a.jsonl --out bad3 --valid-every 1", &log), 2);
  EXPECT_NE(log.find("--valid-every must be at least 2"), std::string::npos) << log;
  for (const char* bad : {"bad1", "bad2", "bad3"})
    EXPECT_TRUE(prep_shards(tmp / bad).empty() && !std::filesystem::exists(prepare_state_dir(tmp / bad))) << bad;
  // --overwrite replaces a split dataset's shards (train/ and valid/ count as shards).
  ASSERT_EQ(prep_run(tmp, 1, "--input a.jsonl --out last --overwrite --shard-tokens 100", &log), 0) << log;
  EXPECT_FALSE(std::filesystem::exists(tmp / "last/train"));
  EXPECT_EQ(prep_concat(prep_shards(tmp / "last")), bytes_of([](size_t) { return true; }));
}

// A run killed with SIGKILL in the middle publishes nothing; rerun with the same arguments (here
// on another number of ranks) it continues from the parts already done and gives the shards of
// an uninterrupted run. An unfinished run with other arguments is refused naming the argument.
TEST(PrepareRestart, KilledRunContinuesToTheSameShards) {
  TempDir tmp;
  {
    std::mt19937 rng(3);
    const char* words[] = {"alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"};
    std::ofstream f(tmp / "big.jsonl");
    for (int d = 0; d < 60000; ++d) {
      std::string text;
      const int n = 20 + static_cast<int>(rng() % 200);
      for (int w = 0; w < n; ++w) text += std::string(w ? " " : "") + words[rng() % 10] + std::to_string(rng() % 100);
      f << nlohmann::json{{"text", text}}.dump() << "\n";
    }
  }
  const std::string common = "--input big.jsonl --shard-tokens 1000000 --part-bytes 65536 --threads 1";
  const std::string args = common + " --out shards";
  std::string log;
  ASSERT_EQ(prep_run(tmp, 1, common + " --out whole", &log), 0) << log;
  const auto whole = prep_shards(tmp / "whole");
  ASSERT_GT(whole.size(), 5u);

  // Start a run and SIGKILL it once some parts are complete, but not all.
  const pid_t child = fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    ::chdir(tmp.path.c_str());
    ::setenv("SEDD_CORES", "1", 1);
    const std::string exe = bin_dir() + "/sedd-prepare";
    ::execl(exe.c_str(), exe.c_str(), "--input", "big.jsonl", "--out", "shards", "--shard-tokens", "1000000",
            "--part-bytes", "65536", "--threads", "1", static_cast<char*>(nullptr));
    ::_exit(127);
  }
  const std::string parts_dir = prepare_state_dir(tmp / "shards") + "/parts";
  auto parts_done = [&] {
    int n = 0;
    if (std::filesystem::exists(parts_dir))
      for (const auto& e : std::filesystem::directory_iterator(parts_dir)) n += e.path().extension() == ".bin";
    return n;
  };
  auto t0 = std::chrono::steady_clock::now();
  while (parts_done() < 20 && std::chrono::steady_clock::now() - t0 < std::chrono::seconds(60))
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  ::kill(child, SIGKILL);
  int status = 0;
  ::waitpid(child, &status, 0);
  ASSERT_TRUE(WIFSIGNALED(status)) << "the run ended before it was killed; make the input larger";
  const int done_before = parts_done();
  ASSERT_GE(done_before, 20);
  EXPECT_TRUE(prep_shards(tmp / "shards").empty()) << "a killed run published shards";

  // Other arguments: refused, naming the argument; the unfinished run is kept.
  EXPECT_EQ(prep_run(tmp, 1, "--input big.jsonl --out shards --shard-tokens 5000 --part-bytes 65536", &log), 2);
  EXPECT_NE(log.find("--out shards: holds an unfinished sedd-prepare run with other arguments (--shard-tokens differs: "
                     "1000000 there, 5000 here)"),
            std::string::npos)
      << log;
  EXPECT_EQ(parts_done(), done_before);

  // The same arguments on 2 ranks: continued, and the shards of the whole run.
  ASSERT_EQ(prep_run(tmp, 2, args, &log), 0) << log;
  EXPECT_NE(log.find(fmt::format("continuing the unfinished run in shards: {} part(s) already done", done_before)),
            std::string::npos)
      << log;
  EXPECT_EQ(prep_shards(tmp / "shards"), whole);
  EXPECT_FALSE(std::filesystem::exists(prepare_state_dir(tmp / "shards")));
  // A finished output is not a run to continue: the old contract (--overwrite to replace).
  EXPECT_EQ(prep_run(tmp, 1, args, &log), 2);
  EXPECT_NE(log.find("--out shards: the folder already holds"), std::string::npos) << log;
}

// The byte-level BPE (hand-coded GPT-2 pre-tokenizer, merges on id pairs, word cache) against
// `tokenizers` on random strings of the pre-tokenizer's hard cases, with and without
// add_prefix_space; and decoding gives the text back.
TEST(TokenizerBpe, MatchesHuggingFaceOnTrickyText) {
  TempDir tmp;
  prep_python(tmp, R"PY(import json, random
from tokenizers import ByteLevelBPETokenizer
random.seed(11)
pieces = ["a", "Z", "é", "ß", "Ω", "я", "中", "ー", "ก", "\u0301", "\u200d", "1", "٣", "²", "Ⅻ", "½", " ", "  ", "\t",
          "\n", "\r\n", "\u00a0", "\u2009", "\u3000", "\u0085", "\u2028", "'s", "'S", "'ll", "'re", "'ve", "'m", "'d",
          "'t", "'", "''", "!", "?", ".", ",", "-", "_", "$", "🙂", "👩\u200d💻", "🇫🇷", "\u0000", "\u001f", "\ufeff",
          "word", "Words", "1234", "x1", " 's", "\U00010400", "\U0001d7d8"]
docs = ["".join(random.choice(pieces) for _ in range(random.randint(0, 40))) for _ in range(1500)]
docs += ["   leading", "trailing   ", "a  b   c    d", "\n\n\nx", "x\n\n\n", " ", "", "'s's'S", "don't won't I'll"]
out = {"docs": docs}
for prefix in (False, True):
    t = ByteLevelBPETokenizer(add_prefix_space=prefix)
    t.train_from_iterator(docs * 3, vocab_size=500, min_frequency=2, special_tokens=["<|endoftext|>"])
    t.save("tok%d.json" % prefix)
    out["ids%d" % prefix] = [t.encode(d).ids for d in docs]
json.dump(out, open("expect.json", "w"))
)PY");
  const auto expect = nlohmann::json::parse(fs::read_text(tmp / "expect.json"));
  const auto docs = expect["docs"].get<std::vector<std::string>>();
  for (int prefix : {0, 1}) {
    auto tok = make_tokenizer(tmp / fmt::format("tok{}.json", prefix));
    const auto want = expect[fmt::format("ids{}", prefix)].get<std::vector<std::vector<int64_t>>>();
    int wrong = 0;
    for (size_t d = 0; d < docs.size(); ++d) {
      const auto ids = tok->encode(docs[d]);
      if (ids != want[d] && ++wrong <= 3)
        ADD_FAILURE() << "add_prefix_space " << prefix << ", document " << d << " " << nlohmann::json(docs[d]).dump()
                      << ": " << nlohmann::json(ids).dump() << " != " << nlohmann::json(want[d]).dump();
      if (!prefix) EXPECT_EQ(tok->decode(ids), docs[d]);
    }
    EXPECT_EQ(wrong, 0) << "of " << docs.size() << " documents";
  }
}

// WordPiece shaped like bert-base-uncased's tokenizer.json (BertNormalizer lower-casing and
// stripping accents, BertPreTokenizer, TemplateProcessing [CLS] $A [SEP]) built here by
// `tokenizers`: our ids and decoded text are its own; sedd-prepare stores each document as
// [CLS] text [SEP], what `tokenizers` gives with its special tokens.
TEST(TokenizerWordPiece, MatchesHuggingFaceBertUncasedIncludingNormaliserAndTemplate) {
  TempDir tmp;
  prep_python(tmp, R"PY(import json, random
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers, decoders
random.seed(5)
pieces = ["The", "quick", "BROWN", "fox", "Café", "naïve", "RÉSUMÉ", "Straße", "İstanbul", "ΣΟΦΙΑ", "Ωmega", "ﬁne",
          "e\u0301", "中文", "日本語", "한국어", "2026", "3.14", "½", "don't", "it's", "U.S.A.", "(x)", "[y]", "—",
          "“quoted”", "«guillemets»", "¿qué?", "¡sí!", "\t", "\n", "\u00a0", "\u3000", "\u0085", "\u0000", "\u0007",
          "\u200b", "\ufeff", "\ufffd", "\u0378", "\ue000", "🙂", "👩\u200d💻", "x" * 120, "antidisestablishment",
          "[CLS]", "[SEP]", "hello[MASK]world", "e-mail", "a_b", "#hash", "$5", "100%", "@user", "~", "`code`"]
docs = [" ".join(random.choice(pieces) for _ in range(random.randint(1, 30))) for _ in range(600)]
docs += ["", " ", "UPPER lower MiXeD", "Ünïcödé àçcèñts", "ﾃｽﾄ", "ＡＢＣ"]
tok = Tokenizer(models.WordPiece(unk_token="[UNK]", max_input_chars_per_word=100))
tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True)
tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
trainer = trainers.WordPieceTrainer(vocab_size=900, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
tok.train_from_iterator(docs * 2, trainer)
cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                   special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
tok.decoder = decoders.WordPiece()
tok.save("wp.json")
ids = [tok.encode(d).ids for d in docs]
with open("docs.jsonl", "w", encoding="utf-8") as f:
    for d in docs:
        f.write(json.dumps({"text": d}) + "\n")
json.dump({"docs": docs, "ids": ids, "decoded": [tok.decode(i) for i in ids], "cls": cls, "sep": sep},
          open("expect.json", "w"))
)PY");
  const auto expect = nlohmann::json::parse(fs::read_text(tmp / "expect.json"));
  const auto docs = expect["docs"].get<std::vector<std::string>>();
  const auto want = expect["ids"].get<std::vector<std::vector<int64_t>>>();
  const auto decoded = expect["decoded"].get<std::vector<std::string>>();
  auto tok = make_tokenizer(tmp / "wp.json");
  EXPECT_EQ(tok->bos_id(), expect["cls"].get<int64_t>());
  EXPECT_EQ(tok->eot_id(), expect["sep"].get<int64_t>());
  int wrong = 0;
  std::vector<int64_t> stream;
  for (size_t d = 0; d < docs.size(); ++d) {
    std::vector<int64_t> ids = {tok->bos_id()};
    for (auto id : tok->encode(docs[d])) ids.push_back(id);
    ids.push_back(tok->eot_id());
    stream.insert(stream.end(), ids.begin(), ids.end());
    if (ids != want[d] && ++wrong <= 3)
      ADD_FAILURE() << "document " << d << " " << nlohmann::json(docs[d]).dump() << ": " << nlohmann::json(ids).dump()
                    << " != " << nlohmann::json(want[d]).dump();
    EXPECT_EQ(tok->decode(ids), decoded[d]) << "document " << d;
  }
  EXPECT_EQ(wrong, 0) << "of " << docs.size() << " documents";
  std::string log;
  ASSERT_EQ(prep_run(tmp, 2, "--input docs.jsonl --tokenizer wp.json --out shards --part-bytes 4096", &log), 0) << log;
  EXPECT_EQ(prep_concat(prep_shards(tmp / "shards")), stream);
  EXPECT_EQ(make_tokenizer(tok->serialize())->encode(docs[0]), tok->encode(docs[0]));
}
