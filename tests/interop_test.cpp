// Corpus input formats: Parquet and Arrow IPC (stream and file) files written here by pyarrow,
// prepared by sedd-prepare on 2 MPI ranks into byte-token shards; bad columnar input is refused
// naming the file, and nothing is published. The Python tools' options and inputs: sedd_convert.py
// to-torch --ema / --force and to-h5 --noise cosine, sedd_plot.py on rows without a loss.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>

#include "data/prepare.h"
#include "data/shard.h"
#include "data/text_source.h"
#include "io/hdf5.h"
#include "model/ddit.h"
#include "model/weights.h"
#include "test_util.h"

using namespace sedd;
using namespace sedd::test;

namespace {

// Writes `docs` (name -> texts) as JSON for the generator script, then runs `script` with the
// venv's python in `tmp` (argv[1]: the JSON file).
void make_with_pyarrow(const TempDir& tmp, const std::map<std::string, std::vector<std::string>>& docs,
                       const std::string& script) {
  std::ofstream(tmp / "docs.json") << nlohmann::json(docs).dump();
  std::ofstream(tmp / "make.py") << script;
  std::string out;
  ASSERT_EQ(run(fmt::format("cd {} && {} make.py docs.json", tmp.path, python()), &out), 0) << out;
}

int prepare(const TempDir& tmp, int ranks, const std::string& args, std::string* out) {
  return run(fmt::format("cd {} && {} -np {} {}/sedd-prepare {} --out shards", tmp.path, kMpirun, ranks, bin_dir(), args),
             out);
}

// The tokens of every shard, in shard order (the same whatever the number of ranks).
std::vector<int64_t> all_tokens(const TempDir& tmp) {
  std::vector<int64_t> all;
  for (const auto& f : expand_shard_list(tmp / "shards/shard-*.h5")) {
    auto ids = h5::File(f, h5::Mode::Read).read("/tokens").to(torch::kLong);
    all.insert(all.end(), ids.data_ptr<int64_t>(), ids.data_ptr<int64_t>() + ids.numel());
  }
  return all;
}

// Byte tokens of the documents, each followed by end-of-text (256).
std::vector<int64_t> byte_tokens(const std::vector<std::vector<std::string>>& files) {
  std::vector<int64_t> ids;
  for (const auto& docs : files)
    for (const auto& d : docs) {
      for (unsigned char c : d) ids.push_back(c);
      ids.push_back(256);
    }
  return ids;
}

bool any_shard_left(const TempDir& tmp) {
  if (!std::filesystem::exists(tmp / "shards")) return false;
  for (const auto& e : std::filesystem::recursive_directory_iterator(tmp / "shards"))
    if (e.path().extension() == ".h5" || e.path().filename().string().rfind(".staging", 0) == 0 ||
        e.path().filename() == ".sedd-prepare")
      return true;
  return false;
}

const char* kMakeGoodInputs = R"(import json, sys
import pyarrow as pa, pyarrow.parquet as pq
docs = json.load(open(sys.argv[1], encoding="utf-8"))

def table(texts, text_type=pa.string()):
    return pa.table({"id": pa.array(range(len(texts)), pa.int64()), "text": pa.array(texts, text_type),
                     "lang": pa.array(["xx"] * len(texts))})

# Parquet, three rows per row group.
pq.write_table(table(docs["parquet"]), "a.parquet", row_group_size=3)
assert pq.ParquetFile("a.parquet").num_row_groups == 3
# What Hugging Face datasets writes as data-*.arrow: an IPC stream, here large_string, 2 rows a batch.
t = table(docs["stream"], pa.large_string())
with pa.ipc.new_stream("b.arrow", t.schema) as w:
    for batch in t.to_batches(max_chunksize=2):
        w.write_batch(batch)
# The IPC file format, 4 rows a batch.
t = table(docs["file"])
with pa.ipc.new_file("c.arrow", t.schema) as w:
    for batch in t.to_batches(max_chunksize=4):
        w.write_batch(batch)
assert open("c.arrow", "rb").read(6) == b"ARROW1" and open("b.arrow", "rb").read(6) != b"ARROW1"
with open("d.jsonl", "w", encoding="utf-8") as f:
    for d in docs["jsonl"]:
        f.write(json.dumps({"text": d}) + "\n")
# Another extension and column name: --format and --field say what it is.
pq.write_table(pa.table({"body": docs["body"]}), "corpus.dat", row_group_size=2)
)";

}  // namespace

TEST(DataFormats, ParquetAndArrowStreamAndFileBecomeTheirByteTokensInOrder) {
  if (!columnar_input_available()) GTEST_SKIP() << "built without the Arrow C++ library (no pyarrow)";
  TempDir tmp;
  const std::map<std::string, std::vector<std::string>> docs = {
      {"parquet",
       {"plain ascii", "naïve café", "日本語のテキスト", "emoji 🙂 and ü", "line\nbreaks\tand tabs", "x", "last of a"}},
      {"stream", {"Ελληνικά", "русский текст", "stream three", "עברית", "five"}},
      {"file", {"file one", "Ünïcödé", "three", "four", "fünf", "six 六"}},
      {"jsonl", {"jsonl one", "jsonl två"}},
      {"body", {"body one", "body two", "bödy three"}},
  };
  make_with_pyarrow(tmp, docs, kMakeGoodInputs);
  std::string out;
  // Formats from the extensions; the two ranks share the files' row groups and record batches,
  // and the shards hold the documents in input order.
  ASSERT_EQ(prepare(tmp, 2, "--input a.parquet b.arrow c.arrow d.jsonl --shard-tokens 50", &out), 0) << out;
  auto want = byte_tokens({docs.at("parquet"), docs.at("stream"), docs.at("file"), docs.at("jsonl")});
  EXPECT_EQ(all_tokens(tmp), want);
  EXPECT_NE(out.find(fmt::format("20 documents, {} tokens", want.size())), std::string::npos) << out;
  EXPECT_GT(expand_shard_list(tmp / "shards/shard-*.h5").size(), 2u) << "expected several shards of 50 tokens";
  EXPECT_FALSE(std::filesystem::exists(prepare_state_dir(tmp / "shards")));

  // An explicit --format wins over the extension; --field picks the column.
  std::filesystem::remove_all(tmp / "shards");
  ASSERT_EQ(prepare(tmp, 1, "--input corpus.dat --format parquet --field body", &out), 0) << out;
  EXPECT_EQ(all_tokens(tmp), byte_tokens({docs.at("body")}));
  EXPECT_NE(prepare(tmp, 1, "--input corpus.dat --format feather", &out), 0);
  EXPECT_NE(out.find("--format: unknown input format 'feather'"), std::string::npos) << out;
}

TEST(DataFormats, BadColumnarInputNamesTheFileAndPublishesNothing) {
  if (!columnar_input_available()) GTEST_SKIP() << "built without the Arrow C++ library (no pyarrow)";
  TempDir tmp;
  make_with_pyarrow(tmp, {{"text", {"one", "two", "three", "four", "five", "six", "seven"}}}, R"(import json, sys
import pyarrow as pa, pyarrow.parquet as pq
texts = json.load(open(sys.argv[1], encoding="utf-8"))["text"]
good = pa.table({"text": texts})
pq.write_table(good, "good.parquet", row_group_size=2)

def stream(path, table, rows_per_batch=2):
    with pa.ipc.new_stream(path, table.schema) as w:
        for batch in table.to_batches(max_chunksize=rows_per_batch):
            w.write_batch(batch)

pq.write_table(pa.table({"body": texts}), "nocol.parquet")
stream("intcol.arrow", pa.table({"text": list(range(7))}))
pq.write_table(pa.table({"text": ["a", None, "c"]}), "nulls.parquet", row_group_size=2)
stream("nulls.arrow", pa.table({"text": ["a", "b", "c", "d", None, "f"]}))
stream("good.arrow", good)
with pa.ipc.new_file("good_file.arrow", good.schema) as w:
    w.write_table(good, max_chunksize=2)
data = open("good.parquet", "rb").read()
open("cut.parquet", "wb").write(data[: len(data) // 2])
data = open("good.arrow", "rb").read()
open("cut_mid.arrow", "wb").write(data[: len(data) * 3 // 5])
open("cut_eos.arrow", "wb").write(data[:-8])          # every batch, no end-of-stream marker
data = open("good_file.arrow", "rb").read()
open("cut_file.arrow", "wb").write(data[: len(data) // 2])
open("pq.arrow", "wb").write(open("good.parquet", "rb").read())
bad_utf8 = pa.array([b"ok", b"caf\xc3", b"fine"], pa.binary()).view(pa.string())  # pyarrow checks no UTF-8 here
pq.write_table(pa.table({"text": bad_utf8}), "badutf.parquet")
data = bytearray(open("good.parquet", "rb").read())
data[4:60] = bytes(56)                                # the first pages' headers zeroed
open("zeroed.parquet", "wb").write(bytes(data))
)");
  std::string out;
  ASSERT_EQ(prepare(tmp, 2, "--input good.parquet good.arrow good_file.arrow", &out), 0) << out;
  EXPECT_NE(out.find("21 documents"), std::string::npos) << out;
  std::filesystem::remove_all(tmp / "shards");

  const std::pair<const char*, const char*> cases[] = {
      {"nocol.parquet", "nocol.parquet: no column 'text' (columns: body)"},
      {"intcol.arrow", "intcol.arrow: column 'text' has type int64, expected string or large_string"},
      {"nulls.parquet", "nulls.parquet: row 1: column 'text' is null"},
      {"nulls.arrow", "nulls.arrow: row 4: column 'text' is null"},
      {"cut.parquet", "cut.parquet: not a readable Parquet file"},
      {"cut_mid.arrow", "cut_mid.arrow: cannot read record batch"},
      {"cut_eos.arrow", "cut_eos.arrow: the Arrow IPC stream ends after 4 record batches without its end-of-stream marker"},
      {"cut_file.arrow", "cut_file.arrow: not a readable Arrow IPC file"},
      {"pq.arrow", "pq.arrow: this is a Parquet file, not Arrow IPC; use --format parquet"},
      {"badutf.parquet", "badutf.parquet: row 1: invalid UTF-8 at byte offset 3"},
      {"zeroed.parquet", "zeroed.parquet: cannot read row group 0"},
  };
  for (const auto& [bad, needle] : cases) {
    // One rank may finish its parts of the good file, but nothing may be published.
    EXPECT_NE(prepare(tmp, 2, fmt::format("--input good.parquet {}", bad), &out), 0) << bad;
    EXPECT_NE(out.find(needle), std::string::npos) << "expected '" << needle << "' in: " << out;
    EXPECT_FALSE(any_shard_left(tmp)) << "a failed prepare left shards behind (" << bad << ")";
  }
}

TEST(DataFormats, WithoutArrowParquetAndArrowInputSayWhatIsMissing) {
  if (columnar_input_available()) GTEST_SKIP() << "built with the Arrow C++ library: nothing is missing";
  TempDir tmp;
  std::ofstream(tmp / "a.parquet") << "PAR1 not really";
  std::string out;
  EXPECT_NE(prepare(tmp, 1, "--input a.parquet", &out), 0);
  EXPECT_NE(out.find("a.parquet: reading parquet files needs sedd built with the Arrow C++ library of pyarrow"),
            std::string::npos)
      << out;
  EXPECT_FALSE(any_shard_left(tmp));
}

namespace {

std::string convert_tool() { return python() + " " + source_dir() + "/tools/sedd_convert.py "; }

// A small model file: random raw weights and, when asked, an EMA that differs from them (+1).
StateDict save_small_model(const std::string& path, bool with_ema, uint64_t seed, const std::string& tokenizer = "byte",
                           const std::string& noise = "loglinear") {
  ModelConfig c;
  c.tokens = 11;
  c.hidden_size = 16;
  c.n_heads = 2;
  c.n_blocks = 1;
  c.cond_dim = 8;
  c.length = 6;
  c.noise.kind = noise;
  torch::manual_seed(seed);
  DDiT m(c);
  StateDict raw, ema;
  for (auto& [k, v] : state_dict(*m)) {
    bool buffer = k.find("inv_freq") != std::string::npos;  // the rotary frequencies stay what they are
    raw[k] = buffer ? v.detach().clone() : v.detach().clone().normal_(0, 0.3);
  }
  if (with_ema)
    for (auto& [k, v] : raw) ema[k] = k.find("inv_freq") != std::string::npos ? v : v + 1;
  save_model_file(path, c, raw, ema, {7, 700, with_ema, tokenizer});
  return with_ema ? ema : raw;
}

void expect_weights(const std::string& model_h5, const StateDict& want) {
  DDiT b = load_model_file(model_h5, false);
  auto got = state_dict(*b);
  ASSERT_EQ(got.size(), want.size());
  for (auto& [k, v] : want) EXPECT_TRUE(torch::equal(got.at(k).detach(), v)) << k;
}

std::string read_all(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), {});
}

}  // namespace

// to-torch --ema writes the EMA weights; on a file without an EMA it is refused naming the file
// (before, it wrote the raw weights as if they were the EMA), and nothing is written.
TEST(OptionsConvert, ToTorchEmaWritesTheEmaAndIsRefusedWithoutOne) {
  SEDD_REQUIRE_PYTHON("torch", "numpy", "h5py", "safetensors");
  TempDir tmp;
  auto ema = save_small_model(tmp / "with_ema.h5", true, 1);
  auto raw = save_small_model(tmp / "no_ema.h5", false, 2);
  for (const char* d : {"ema", "raw", "refused"}) std::filesystem::create_directories(tmp / d);
  std::string out;
  ASSERT_EQ(run(convert_tool() + "to-torch " + (tmp / "with_ema.h5") + " " + (tmp / "ema/model.safetensors") + " --ema",
                &out),
            0)
      << out;
  EXPECT_NE(out.find("from /ema"), std::string::npos) << out;
  ASSERT_EQ(run(convert_tool() + "to-h5 " + (tmp / "ema/model.safetensors") + " " + (tmp / "ema.h5"), &out), 0) << out;
  expect_weights(tmp / "ema.h5", ema);

  ASSERT_EQ(run(convert_tool() + "to-torch " + (tmp / "no_ema.h5") + " " + (tmp / "raw/model.bin"), &out), 0) << out;
  ASSERT_EQ(run(convert_tool() + "to-h5 " + (tmp / "raw/model.bin") + " " + (tmp / "raw.h5"), &out), 0) << out;
  expect_weights(tmp / "raw.h5", raw);

  EXPECT_NE(run(convert_tool() + "to-torch " + (tmp / "no_ema.h5") + " " + (tmp / "refused/model.safetensors") + " --ema",
                &out),
            0);
  EXPECT_NE(out.find(tmp / "no_ema.h5" + ": --ema, but the file holds no EMA weights"), std::string::npos) << out;
  EXPECT_EQ(out.find("Traceback"), std::string::npos) << out;
  EXPECT_TRUE(std::filesystem::is_empty(tmp / "refused")) << "a refused conversion wrote files";
}

// A config.json or tokenizer.json already beside the output (another model's) is not replaced
// silently: refused naming it, unless --force, which also removes a tokenizer.json the new model
// does not have (to-h5 would embed it).
TEST(OptionsConvert, ExistingConfigOrTokenizerBesideTheOutputNeedsForce) {
  SEDD_REQUIRE_PYTHON("torch", "numpy", "h5py", "safetensors");
  TempDir tmp;
  const std::string tokenizer_json = R"({"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0}}})";
  save_small_model(tmp / "first.h5", false, 3, tokenizer_json);
  auto second = save_small_model(tmp / "second.h5", false, 4);  // byte tokenizer: no tokenizer.json
  std::filesystem::create_directories(tmp / "hf");
  std::string out;
  ASSERT_EQ(run(convert_tool() + "to-torch " + (tmp / "first.h5") + " " + (tmp / "hf/first.safetensors"), &out), 0) << out;
  const std::string config_before = read_all(tmp / "hf/config.json");
  ASSERT_EQ(read_all(tmp / "hf/tokenizer.json"), tokenizer_json);

  EXPECT_NE(run(convert_tool() + "to-torch " + (tmp / "second.h5") + " " + (tmp / "hf/second.safetensors"), &out), 0);
  EXPECT_NE(out.find(tmp / "hf/config.json" + " already exists beside the output"), std::string::npos) << out;
  EXPECT_NE(out.find("--force"), std::string::npos) << out;
  EXPECT_EQ(read_all(tmp / "hf/config.json"), config_before);
  EXPECT_FALSE(std::filesystem::exists(tmp / "hf/second.safetensors"));
  // A tokenizer.json alone is protected too.
  std::filesystem::rename(tmp / "hf/config.json", tmp / "config.json.saved");
  EXPECT_NE(run(convert_tool() + "to-torch " + (tmp / "second.h5") + " " + (tmp / "hf/second.safetensors"), &out), 0);
  EXPECT_NE(out.find(tmp / "hf/tokenizer.json" + " already exists beside the output"), std::string::npos) << out;
  EXPECT_EQ(read_all(tmp / "hf/tokenizer.json"), tokenizer_json);
  std::filesystem::rename(tmp / "config.json.saved", tmp / "hf/config.json");

  ASSERT_EQ(run(convert_tool() + "to-torch " + (tmp / "second.h5") + " " + (tmp / "hf/second.safetensors") + " --force",
                &out),
            0)
      << out;
  EXPECT_NE(read_all(tmp / "hf/config.json"), config_before);
  EXPECT_FALSE(std::filesystem::exists(tmp / "hf/tokenizer.json")) << "the first model's tokenizer was left beside the second";
  ASSERT_EQ(run(convert_tool() + "to-h5 " + (tmp / "hf/second.safetensors") + " " + (tmp / "back.h5"), &out), 0) << out;
  ModelFileInfo info;
  load_model_file(tmp / "back.h5", false, &info);
  EXPECT_EQ(info.tokenizer, "byte");
  expect_weights(tmp / "back.h5", second);
}

// to-h5 --noise takes every schedule the library has, cosine included.
TEST(OptionsConvert, ToH5NoiseAcceptsCosine) {
  SEDD_REQUIRE_PYTHON("torch", "numpy", "h5py", "safetensors");
  TempDir tmp;
  save_small_model(tmp / "model.h5", false, 5);
  std::filesystem::create_directories(tmp / "hf");
  std::string out;
  ASSERT_EQ(run(convert_tool() + "to-torch " + (tmp / "model.h5") + " " + (tmp / "hf/model.safetensors"), &out), 0) << out;
  ASSERT_EQ(run(convert_tool() + "to-h5 " + (tmp / "hf/model.safetensors") + " " + (tmp / "cosine.h5") +
                    " --noise cosine --eps 0.002",
                &out),
            0)
      << out;
  DDiT m = load_model_file(tmp / "cosine.h5", false);
  EXPECT_EQ(m->cfg.noise.kind, "cosine");
  EXPECT_EQ(m->cfg.noise.eps, 0.002);
  EXPECT_NE(run(convert_tool() + "to-h5 " + (tmp / "hf/model.safetensors") + " " + (tmp / "x.h5") + " --noise cosin", &out),
            0);
  EXPECT_NE(out.find("invalid choice: 'cosin'"), std::string::npos) << out;
}

// sedd_plot.py: rows without a (finite) loss are skipped, not a traceback; a file with no
// plottable row is a clear error naming it; the PNG is written.
TEST(OptionsPlot, RowsWithoutALossAreSkippedAndAFileWithNoneIsAnError) {
  SEDD_REQUIRE_PYTHON("matplotlib");
  TempDir tmp;
  const std::string plot = python() + " " + source_dir() + "/tools/sedd_plot.py ";
  std::filesystem::create_directories(tmp / "run");
  std::ofstream(tmp / "run/metrics.jsonl") << R"({"step": 1, "loss": 3.5, "lr": 0.001})" << "\n"
                                           << R"({"step": 2, "valid_loss": 3.1})" << "\n"
                                           << R"({"step": 3, "loss": null, "skipped": 1})" << "\n"
                                           << R"({"step": 4, "loss": 2.5, "valid_loss": 2.8})" << "\n";
  std::string out;
  ASSERT_EQ(run(plot + (tmp / "run"), &out), 0) << out;
  EXPECT_EQ(out.find("Traceback"), std::string::npos) << out;
  EXPECT_NE(out.find("2 of 4 rows have no finite loss"), std::string::npos) << out;
  EXPECT_EQ(read_all(tmp / "run/loss.png").substr(0, 8), "\x89PNG\r\n\x1a\n") << "loss.png is not a PNG";
  ASSERT_EQ(run(plot + (tmp / "run/metrics.jsonl") + " --out " + (tmp / "other.png"), &out), 0) << out;
  EXPECT_EQ(read_all(tmp / "other.png").substr(0, 4), "\x89PNG");

  std::ofstream(tmp / "none.jsonl") << R"({"step": 1, "lr": 0.001})" << "\n" << R"({"step": 2, "loss": null})" << "\n";
  EXPECT_NE(run(plot + (tmp / "none.jsonl") + " --out " + (tmp / "none.png"), &out), 0);
  EXPECT_NE(out.find(tmp / "none.jsonl" + ": none of its 2 rows has a step with a finite loss"), std::string::npos) << out;
  EXPECT_EQ(out.find("Traceback"), std::string::npos) << out;
  EXPECT_FALSE(std::filesystem::exists(tmp / "none.png"));
}
