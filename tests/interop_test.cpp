// Corpus input formats: Parquet and Arrow IPC (stream and file) files written here by pyarrow,
// prepared by sedd-prepare on 2 MPI ranks into byte-token shards; bad columnar input is refused
// naming the file, and nothing is published.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>

#include "data/prepare.h"
#include "data/shard.h"
#include "data/text_source.h"
#include "io/hdf5.h"
#include "test_util.h"

using namespace sedd;
using namespace sedd::test;

namespace {

// Writes `docs` (name -> texts) as JSON for the generator script, then runs `script` with the
// venv's python in `tmp` (argv[1]: the JSON file).
void make_with_pyarrow(const TempDir& tmp, const std::map<std::string, std::vector<std::string>>& docs,
                       const std::string& script) {
  ASSERT_FALSE(python().empty()) << "configure with -DSEDD_PYTHON=<venv>/bin/python";
  std::ofstream(tmp / "docs.json") << nlohmann::json(docs).dump();
  std::ofstream(tmp / "make.py") << script;
  std::string out;
  ASSERT_EQ(run(fmt::format("cd {} && {} make.py docs.json", tmp.path, python()), &out), 0) << out;
}

int prepare(const TempDir& tmp, int ranks, const std::string& args, std::string* out) {
  return run(fmt::format("cd {} && {} -np {} {}/sedd-prepare {} --out shards", tmp.path, kMpirun, ranks, bin_dir(), args),
             out);
}

// The tokens of one rank's shards, in shard order.
std::vector<int64_t> rank_tokens(const TempDir& tmp, int rank) {
  std::vector<int64_t> all;
  for (const auto& f : expand_shard_list(tmp / fmt::format("shards/shard-r{:03d}-*.h5", rank))) {
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
    if (e.path().extension() == ".h5" || e.path().filename().string().rfind(".staging", 0) == 0) return true;
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
  // Formats from the extensions; file i goes to rank i mod 2.
  ASSERT_EQ(prepare(tmp, 2, "--input a.parquet b.arrow c.arrow d.jsonl --shard-tokens 50", &out), 0) << out;
  auto rank0 = byte_tokens({docs.at("parquet"), docs.at("file")});
  auto rank1 = byte_tokens({docs.at("stream"), docs.at("jsonl")});
  EXPECT_EQ(rank_tokens(tmp, 0), rank0);
  EXPECT_EQ(rank_tokens(tmp, 1), rank1);
  EXPECT_NE(out.find(fmt::format("20 documents, {} tokens", rank0.size() + rank1.size())), std::string::npos) << out;
  EXPECT_GT(expand_shard_list(tmp / "shards/shard-r000-*.h5").size(), 2u) << "expected several shards of 50 tokens";
  for (int r : {0, 1}) EXPECT_FALSE(std::filesystem::exists(staging_dir(tmp / "shards", r)));

  // An explicit --format wins over the extension; --field picks the column.
  std::filesystem::remove_all(tmp / "shards");
  ASSERT_EQ(prepare(tmp, 1, "--input corpus.dat --format parquet --field body", &out), 0) << out;
  EXPECT_EQ(rank_tokens(tmp, 0), byte_tokens({docs.at("body")}));
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
    // The good file is rank 0's, the bad one rank 1's: rank 0 succeeds but must not publish.
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
