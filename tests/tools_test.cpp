// The executables as a user meets them (issue #23): every benchmark reads the options it prints
// and refuses others; MFU counts model FLOPs; output paths are checked before any work; options
// for another kind of model are refused; the scorer of --score-with must read the samples as the
// sampled model's data; sedd-eval's edge cases; and one exit code per class of error, printed
// once, for every executable and every number of ranks. Real binaries under mpirun.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "data/shard.h"
#include "io/hdf5.h"
#include "model/ddit.h"
#include "model/weights.h"
#include "recipes.h"
#include "test_util.h"
#include "train/checkpoint.h"

using namespace sedd;
using namespace sedd::test;
namespace stdfs = std::filesystem;

namespace {

// How often `needle` occurs in `text`.
int occurrences(const std::string& text, const std::string& needle) {
  int n = 0;
  for (size_t at = text.find(needle); at != std::string::npos; at = text.find(needle, at + needle.size())) ++n;
  return n;
}

// `tool args` under mpirun with np ranks.
std::string mpi(int np, const std::string& tool, const std::string& args) {
  return fmt::format("{} -np {} {}/{} {}", kMpirun, np, bin_dir(), tool, args);
}

nlohmann::json read_json(const std::string& path) {
  std::ifstream in(path);
  return nlohmann::json::parse(in);
}

bool gpu_visible() { return torch::cuda::is_available(); }

// A byte-level text shard and three tiny models trained on it once for the whole program (two
// steps each, seconds): sedd (L 16), ar (L 32) and mdlm (L 16).
struct Models {
  TempDir tmp;
  std::string data, sedd, ar, mdlm, error;
};

const Models& models() {
  static Models m = [] {
    Models m;
    std::string text;
    for (int i = 0; i < 300; ++i) text += "The quick brown fox jumps over the lazy dog. ";
    std::vector<int64_t> ids(text.begin(), text.end());
    write_shard(m.tmp / "d.h5", torch::tensor(ids, torch::kLong), 257, 256, "byte");
    m.data = m.tmp / "d.h5";
    auto train = [&](const std::string& name, const std::string& extra) {
      const std::string dir = m.tmp / name;
      try {
        train_in_process(one_block().set("train.steps", 2).set("train.log_every", 1), m.data, dir, extra);
      } catch (const std::exception& e) {
        m.error += name + ": " + e.what();
      }
      return dir;
    };
    m.sedd = train("sedd", "--data.seq_len 16");
    m.ar = train("ar", "--data.seq_len 32 --diffusion.objective ar --model.scale_by_sigma false "
                          "--model.time_conditioning false");
    m.mdlm = train("mdlm", "--data.seq_len 16 --diffusion.objective mdlm --model.scale_by_sigma false");
    return m;
  }();
  return m;
}

// A copy of `dir`'s model.h5 whose tokenizer attribute is `tokenizer` (empty: none stored, as in
// a converted official checkpoint).
std::string with_tokenizer(const std::string& dir, const std::string& tokenizer, const std::string& out) {
  const std::string src = resolve_model_file(dir);
  ModelFileInfo info;
  load_model_file(src, false, &info);
  h5::File f(src, h5::Mode::Read);
  info.tokenizer = tokenizer;
  save_model_file(out, read_model_config(f, "/"), read_state_dict(f, "/model"), read_state_dict(f, "/ema"), info);
  return out;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// MFU: model FLOPs, counted by hand.

TEST(ToolsFlops, FlopsPerTokenIsTheHandCountOfModelFlops) {
  ModelConfig c;
  c.tokens = 50;
  c.hidden_size = 64;
  c.n_heads = 4;
  c.n_blocks = 2;
  c.cond_dim = 32;
  c.length = 16;
  DDiT m(c);
  // L = 16, D = 64, V = 51 (50 tokens and the absorbing mask), C = 32, 256 sigma frequencies.
  // Per token: 2 blocks x (24 D^2 + 4 L D) = 204800 and the output layer 2 D V = 6528; per
  // sequence: the sigma MLP 2 (256 C + C^2) = 18432 and the adaLN modulations 2 C (6 x 2 + 2) D
  // = 57344, i.e. 4736 per token; forward + backward = 3 x forward.
  EXPECT_DOUBLE_EQ(m->flops_per_token(16), 3.0 * (204800 + 6528 + 4736));
  // The same from the module's own weight matrices, so a change to the network shows here: every
  // matrix but the embedding table (a lookup) is a product at every position, except the
  // conditioning's (once per sequence); attention's two products have no weights.
  double per_token = 2 * 4.0 * 16 * 64, per_sequence = 0;
  for (const auto& p : m->named_parameters()) {
    if (p.value().dim() != 2 || p.key() == "vocab_embed.embedding") continue;
    const bool conditioning = p.key().find("adaLN") != std::string::npos || p.key().rfind("sigma_map", 0) == 0;
    (conditioning ? per_sequence : per_token) += 2.0 * static_cast<double>(p.value().numel());
  }
  EXPECT_DOUBLE_EQ(m->flops_per_token(16), 3 * (per_token + per_sequence / 16));
  // The output layer covers the full vocabulary: an autoregressive model has no mask column.
  c.objective = "ar";
  c.scale_by_sigma = false;
  c.time_conditioning = false;
  DDiT ar(c);
  EXPECT_DOUBLE_EQ(ar->flops_per_token(16), 3.0 * (204800 + 2 * 64 * 50 + 4736));
}

// ---------------------------------------------------------------------------------------------
// Benchmarks: every option printed is read, unknown ones refused, --device/--precision/--json.

TEST(ToolsBench, ModelBenchmarkReadsItsOptionsAndRefusesOthers) {
  TempDir tmp;
  std::string out;
  const std::string bench = bin_dir() + "/sedd-bench-model ";
  EXPECT_EQ(run(bench + "--bogus 1", &out), 2);
  EXPECT_NE(out.find("bogus"), std::string::npos) << out;
  EXPECT_EQ(run(bench + "--small-batch x", &out), 2) << out;
  EXPECT_EQ(run(bench + "--small-batch -1", &out), 2);
  EXPECT_NE(out.find("--small-batch"), std::string::npos) << out;
  EXPECT_EQ(run(bench + "--shapes huge", &out), 2);
  EXPECT_NE(out.find("'huge'"), std::string::npos) << out;
  EXPECT_EQ(run(bench + "--device cpu --precision bf16", &out), 2);
  EXPECT_NE(out.find("needs a GPU"), std::string::npos) << out;
  EXPECT_EQ(run(bench + "--device tpu", &out), 2) << out;
  if (!gpu_visible()) {
    EXPECT_EQ(run(bench + "--device cuda", &out), 2);
    EXPECT_NE(out.find("no GPU"), std::string::npos) << out;
  }
  EXPECT_EQ(run(bench + "--json " + (tmp / "no/such/folder.json"), &out), 2);
  EXPECT_NE(out.find(tmp / "no/such/folder.json"), std::string::npos) << out;
  ASSERT_EQ(run(bench + "--device cpu --shapes tiny --steps 1 --tiny-batch 2 --json " + (tmp / "m.json"), &out), 0)
      << out;
  auto j = read_json(tmp / "m.json");
  ASSERT_EQ(j.size(), 1u) << j;
  EXPECT_EQ(j[0]["config"], "tiny");
  EXPECT_EQ(j[0]["device"], "cpu");
  EXPECT_EQ(j[0]["precision"], "fp32");
  EXPECT_EQ(j[0]["batch"], 2);
  EXPECT_EQ(j[0]["steps"], 1);
  ModelConfig tiny;
  tiny.hidden_size = 128, tiny.n_heads = 4, tiny.n_blocks = 2, tiny.cond_dim = 64, tiny.length = 128, tiny.tokens = 256;
  EXPECT_DOUBLE_EQ(j[0]["model_flops_per_token"].get<double>(), DDiT(tiny)->flops_per_token(128));
  EXPECT_GT(j[0]["tokens_per_s"].get<double>(), 0);
}

// Without --config every option is honoured (model, length, batch, vocabulary, precision, loss,
// device), not only train.fused_loss; with data.train its shards are measured.
TEST(ToolsBench, TrainBenchmarkHonoursTheDeviceAndEveryOption) {
  TempDir tmp;
  std::string out;
  auto bench = [&](int np, const std::string& args) {
    return run(fmt::format("TMPDIR={} {}", tmp.path, mpi(np, "sedd-bench-train", args)), &out);
  };
  EXPECT_EQ(bench(2, "--bogus 1"), 2);
  EXPECT_EQ(occurrences(out, "bogus"), 1) << out;
  EXPECT_EQ(bench(1, "--bench.steps x"), 2) << out;
  EXPECT_EQ(bench(1, "--bench.shapes huge"), 2);
  EXPECT_NE(out.find("'huge'"), std::string::npos) << out;
  EXPECT_EQ(bench(1, "--device cpu --precision bf16"), 2);
  EXPECT_NE(out.find("bf16 needs a GPU"), std::string::npos) << out;
  EXPECT_EQ(bench(1, "--device cpu --run.device cuda"), 2);
  EXPECT_NE(out.find("disagree"), std::string::npos) << out;
  if (!gpu_visible()) {  // an error message and exit 2, not std::terminate
    EXPECT_EQ(bench(2, "--run.device cuda"), 2);
    EXPECT_EQ(occurrences(out, "no GPU is visible"), 1) << out;
    EXPECT_EQ(out.find("terminate called"), std::string::npos) << out;
  }
  const std::string small = "--bench.shapes tiny --model.hidden_size 32 --model.n_heads 2 --model.n_blocks 1 "
                            "--data.seq_len 16 --bench.steps 1 --bench.warmup 1";
  ASSERT_EQ(bench(2, small + " --train.batch_size 4 --bench.vocab 40 --train.fused_loss false --precision fp64 "
                             "--device cpu --json " + (tmp / "a.json")),
            0)
      << out;
  auto a = read_json(tmp / "a.json");
  ASSERT_EQ(a.size(), 1u) << a;
  EXPECT_EQ(a[0]["device"], "cpu");
  EXPECT_EQ(a[0]["ranks"], 2);
  EXPECT_EQ(a[0]["hidden_size"], 32);
  EXPECT_EQ(a[0]["n_blocks"], 1);
  EXPECT_EQ(a[0]["seq_len"], 16);
  EXPECT_EQ(a[0]["batch"], 4);
  EXPECT_EQ(a[0]["vocab"], 40);
  EXPECT_EQ(a[0]["fused_loss"], false);
  EXPECT_EQ(a[0]["precision"], "fp64");
  EXPECT_EQ(a[0]["data"], "random");
  EXPECT_GT(a[0]["model_flops_per_token"].get<double>(), 0);
  // Given shards are measured: their vocabulary, not bench.vocab's.
  ASSERT_EQ(bench(1, small + " --data.train " + models().data + " --bench.json " + (tmp / "b.json")), 0) << out;
  auto b = read_json(tmp / "b.json");
  EXPECT_EQ(b[0]["vocab"], 257);
  EXPECT_EQ(b[0]["data"], models().data);
  EXPECT_EQ(b[0]["batch"], 16) << "the tiny shape's 16 sequences per rank";
  // Shards named on the command line must exist; a config's that this machine lacks (as
  // configs/sedd-small.ini's corpus) become random tokens, and the output says so.
  EXPECT_EQ(bench(2, small + " --data.train " + (tmp / "none*.h5")), 2);
  EXPECT_EQ(occurrences(out, "matches no shard files"), 1) << out;
  std::ofstream(tmp / "c.ini") << "[data]\ntrain = " << (tmp / "none*.h5") << "\nseq_len = 16\n"
                               << "[model]\nhidden_size = 32\nn_heads = 2\nn_blocks = 1\n[train]\nbatch_size = 4\n";
  ASSERT_EQ(bench(1, fmt::format("--config {} --device cpu --bench.steps 1 --bench.warmup 1 --bench.vocab 40 --json {}",
                                 tmp / "c.ini", tmp / "c.json")),
            0)
      << out;
  EXPECT_NE(out.find("random tokens over a vocabulary of 40 (data.train '" + (tmp / "none*.h5") + "' names no shards"),
            std::string::npos)
      << out;
  auto c = read_json(tmp / "c.json");
  EXPECT_EQ(c[0]["data"], "random");
  EXPECT_EQ(c[0]["hidden_size"], 32);
  EXPECT_EQ(c[0]["batch"], 4);
  // Its temporary folders (under TMPDIR) are gone.
  for (const auto& e : stdfs::directory_iterator(tmp.path))
    EXPECT_NE(e.path().filename().string().rfind("sedd-bench-train", 0), 0u) << "left behind: " << e.path();
}

// Shards are written into a fresh folder, of the size asked, every run, and removed at the end:
// a second run with another size never reads the first run's files.
TEST(ToolsBench, ReaderBenchmarkUsesFreshFilesOfTheAskedSize) {
  TempDir tmp;
  std::string out;
  stdfs::create_directories(tmp / "work");
  auto bench = [&](int np, const std::string& args) { return run(mpi(np, "sedd-bench-reader", args), &out); };
  EXPECT_EQ(bench(2, "--bogus"), 2);
  EXPECT_EQ(occurrences(out, "bogus"), 1) << out;
  EXPECT_EQ(bench(1, "/tmp/somewhere 32"), 2) << "positional arguments are refused: " << out;
  EXPECT_EQ(bench(1, "--tokens 0"), 2);
  EXPECT_NE(out.find("must be positive"), std::string::npos) << out;
  EXPECT_EQ(bench(1, "--tokens 1e6"), 2) << out;
  for (int64_t tokens : {200000, 300000}) {
    const std::string json = tmp / fmt::format("r{}.json", tokens);
    ASSERT_EQ(bench(2, fmt::format("--dir {} --tokens {} --shards 2 --seq-len 128 --batch 4 --batches 10 --device cpu "
                                   "--json {}",
                                   tmp / "work", tokens, json)),
              0)
        << out;
    auto j = read_json(json);
    EXPECT_EQ(j["tokens"], tokens) << j;
    EXPECT_EQ(j["ranks"], 2);
    EXPECT_GT(j["stream_tokens_per_s_per_rank"].get<double>(), 0);
    EXPECT_TRUE(stdfs::is_empty(tmp / "work")) << "the benchmark's files were left behind";
  }
}

TEST(ToolsBench, SampleBenchmarkRefusesBadOptionsAndFailsAFailedIdentityCheck) {
  TempDir tmp;
  std::string out;
  auto bench = [&](const std::string& args) { return run(mpi(1, "sedd-bench-sample", args), &out); };
  EXPECT_EQ(bench("--model medium"), 2);
  EXPECT_NE(out.find("--model must be tiny, small or bd3, got 'medium'"), std::string::npos) << out;
  EXPECT_EQ(bench("--precision fp16"), 2);
  EXPECT_NE(out.find("--precision must be auto, bf16 or fp32"), std::string::npos) << out;
  EXPECT_EQ(bench("--device cpu --precision bf16"), 2);
  EXPECT_EQ(bench("--steps 4,x"), 2);
  EXPECT_NE(out.find("'x' is not a positive step count"), std::string::npos) << out;
  EXPECT_EQ(bench("--bogus"), 2) << out;
  if (!gpu_visible()) EXPECT_EQ(bench("--device cuda"), 2) << out;
  const std::string small = "--device cpu --samples 2 --length 16 --steps 4 --json " + (tmp / "s.json");
  ASSERT_EQ(bench(small), 0) << out;
  auto j = read_json(tmp / "s.json");
  EXPECT_TRUE(j["results"][0]["identical"].get<bool>());
  // On the CPU the rule is bit-identity: every token equal.
  EXPECT_EQ(j["check_rule"], "bit-identical") << j;
  EXPECT_EQ(j["results"][0]["equal_token_fraction"].get<double>(), 1.0) << j;
  EXPECT_TRUE(j["results"][0]["check_passed"].get<bool>()) << j;
  // A failed identity check ("passed: NO") is a failure: exit 1, also with 31 of 32 tokens equal.
  EXPECT_EQ(bench(small + " --debug.alter-cached"), 1) << out;
  EXPECT_NE(out.find("NO"), std::string::npos) << out;
  j = read_json(tmp / "s.json");
  EXPECT_FALSE(j["results"][0]["identical"].get<bool>());
  EXPECT_FALSE(j["results"][0]["check_passed"].get<bool>());
  EXPECT_EQ(j["results"][0]["equal_token_fraction"].get<double>(), 31.0 / 32.0) << j;
}

// ---------------------------------------------------------------------------------------------
// sedd-sample, sedd-eval, sedd-compare.

// An output that cannot be written is found before any work: exit 2 naming the option and path,
// printed once, and nothing was sampled or evaluated.
TEST(ToolsCli, OutputPathsAreCheckedBeforeAnyWork) {
  const Models& m = models();
  ASSERT_TRUE(m.error.empty()) << m.error;
  TempDir tmp;
  std::string out;
  const std::string missing = tmp / "no/such/folder/x.json";
  auto refused = [&](const std::string& tool, const std::string& args, const std::string& option,
                     const std::string& path, const char* work_line) {
    EXPECT_EQ(run(mpi(2, tool, args), &out), 2) << tool << " " << args << "\n" << out;
    EXPECT_EQ(occurrences(out, option + " " + path), 1) << out;
    EXPECT_EQ(out.find(work_line), std::string::npos) << "work was done before the check: " << out;
  };
  const std::string sample = fmt::format("--checkpoint {} --device cpu --num-samples 2 --steps 2 ", m.sedd);
  refused("sedd-sample", sample + "--out " + missing, "--out", missing, "[sample]");
  refused("sedd-sample", sample + "--stats " + tmp.path, "--stats", tmp.path, "[sample]");
  const std::string eval = fmt::format("--checkpoint {} --device cpu --data {} --mc-samples 2 --max-sequences 4 ",
                                      m.sedd, m.data);
  refused("sedd-eval", eval + "--json " + missing, "--json", missing, "[eval]");
  refused("sedd-compare",
          fmt::format("--checkpoint {} --device cpu --data {} --mc-samples 2 --max-sequences 4 --json {}", m.sedd,
                      m.data, missing),
          "--json", missing, "[compare]");
  EXPECT_FALSE(stdfs::exists(tmp / "no")) << "a refused output path created folders";
}

// Options that do not apply to the checkpoint's kind of model are refused, not ignored.
TEST(ToolsCli, OptionsForAnotherKindOfModelAreRefused) {
  const Models& m = models();
  ASSERT_TRUE(m.error.empty()) << m.error;
  TempDir tmp;
  std::string out;
  auto sample = [&](const std::string& ckpt, const std::string& args) {
    const std::string common = fmt::format("--checkpoint {} --device cpu --num-samples 2 --steps 2 ", ckpt);
    return run(mpi(1, "sedd-sample", common + args), &out);
  };
  EXPECT_EQ(sample(m.ar, "--predictor euler"), 2);
  EXPECT_NE(out.find("--predictor: " + resolve_model_file(m.ar) + " is a ar model"), std::string::npos) << out;
  EXPECT_EQ(sample(m.mdlm, "--predictor analytic"), 2) << "given, even with the default value: " << out;
  EXPECT_NE(out.find("mdlm model, which samples ancestrally"), std::string::npos) << out;
  EXPECT_EQ(sample(m.sedd, "--temperature 0.5"), 2);
  EXPECT_NE(out.find("--temperature applies to autoregressive models only"), std::string::npos) << out;
  EXPECT_EQ(sample(m.sedd, "--predictor euler --out " + (tmp / "s.jsonl")), 0) << out;
  ASSERT_EQ(sample(m.ar, "--temperature 0.9 --out " + (tmp / "a.jsonl")), 0) << out;
  std::ifstream in(tmp / "a.jsonl");
  std::string line;
  ASSERT_TRUE(std::getline(in, line));
  EXPECT_EQ(nlohmann::json::parse(line)["predictor"], "autoregressive");
}

// The scorer reads the samples as its own data: the same tokenizer (compared, or said to be
// unknown), and a window that holds a whole sample (a diffusion scorer: exactly its length).
TEST(ToolsCli, ScorerMustShareTheTokenizerAndWindowRules) {
  const Models& m = models();
  ASSERT_TRUE(m.error.empty()) << m.error;
  TempDir tmp;
  std::string out;
  auto sample = [&](const std::string& args) {
    return run(mpi(2, "sedd-sample", fmt::format("--checkpoint {} --device cpu --num-samples 2 --steps 2 {}", m.sedd,
                                                 args)),
               &out);
  };
  ASSERT_EQ(sample(fmt::format("--score-with {} --stats {}", m.ar, tmp / "ok.json")), 0) << out;
  auto ok = read_json(tmp / "ok.json");
  EXPECT_EQ(ok["scorer_tokenizer_check"], "same");
  EXPECT_TRUE(std::isfinite(ok["gen_perplexity"].get<double>()));
  // Another tokenizer (the same vocabulary size): refused by name, once.
  const std::string other = with_tokenizer(m.ar, R"({"model": {"type": "BPE"}, "note": "another"})", tmp / "other.h5");
  EXPECT_EQ(sample("--score-with " + other), 2);
  EXPECT_EQ(occurrences(out, "the scorer was trained with another tokenizer"), 1) << out;
  // No tokenizer stored: scored, and the output says the check was skipped.
  const std::string none = with_tokenizer(m.ar, "", tmp / "none.h5");
  ASSERT_EQ(sample(fmt::format("--score-with {} --stats {}", none, tmp / "none.json")), 0) << out;
  EXPECT_NE(out.find("tokenizer check skipped: the scorer's tokenizer is none stored"), std::string::npos) << out;
  EXPECT_NE(read_json(tmp / "none.json")["scorer_tokenizer_check"].get<std::string>().find("skipped"),
            std::string::npos);
  // Samples of 32 tokens (two windows) against a diffusion scorer of window 16: refused.
  EXPECT_EQ(sample("--length 32 --score-with " + m.sedd), 2);
  EXPECT_NE(out.find("the samples have 32 tokens, the sedd scorer's window is 16"), std::string::npos) << out;
  // ... and 48 tokens against the autoregressive scorer's window of 32.
  EXPECT_EQ(sample("--length 48 --score-with " + m.ar), 2);
  EXPECT_NE(out.find("more than the autoregressive scorer's window of 32"), std::string::npos) << out;
}

// K = 2 antithetic draws are one pair: the standard error is still a number (the iid formula over
// the pair), never NaN.
TEST(ToolsEval, TwoAntitheticDrawsGiveAFiniteStandardError) {
  const Models& m = models();
  ASSERT_TRUE(m.error.empty()) << m.error;
  TempDir tmp;
  std::string out;
  ASSERT_EQ(run(mpi(2, "sedd-eval",
                    fmt::format("--checkpoint {} --device cpu --data {} --mc-samples 2 --max-sequences 8 --json {}",
                                m.sedd, m.data, tmp / "e.json")),
                &out),
            0)
      << out;
  auto j = read_json(tmp / "e.json");
  for (const char* key : {"stderr_nats_per_token", "stderr_total_nats_per_token"}) {
    ASSERT_TRUE(j[key].is_number()) << key << ": " << j;  // NaN is written as null
    EXPECT_TRUE(std::isfinite(j[key].get<double>())) << key;
    EXPECT_GT(j[key].get<double>(), 0) << key;
  }
  EXPECT_EQ(out.find("nan"), std::string::npos) << out;
}

TEST(ToolsEval, NegativeMaxSequencesIsRefused) {
  const Models& m = models();
  ASSERT_TRUE(m.error.empty()) << m.error;
  std::string out;
  for (const char* tool : {"sedd-eval", "sedd-compare"}) {
    const std::string args = fmt::format("--checkpoint {} --device cpu --data {} --max-sequences -1", m.sedd, m.data);
    EXPECT_EQ(run(mpi(2, tool, args), &out), 2) << tool;
    EXPECT_EQ(occurrences(out, "--max-sequences must be >= 0"), 1) << out;
  }
}

// A model without an embedded tokenizer (a converted official checkpoint) cannot be checked
// against the data: the output says so, in the table and the JSON.
TEST(ToolsEval, ASkippedTokenizerCheckIsSaid) {
  const Models& m = models();
  ASSERT_TRUE(m.error.empty()) << m.error;
  TempDir tmp;
  std::string out;
  auto eval = [&](const std::string& ckpt, const std::string& json) {
    return run(mpi(1, "sedd-eval",
                   fmt::format("--checkpoint {} --device cpu --data d={} --mc-samples 2 --max-sequences 4 --json {}",
                               ckpt, m.data, json)),
               &out);
  };
  ASSERT_EQ(eval(m.sedd, tmp / "with.json"), 0) << out;
  EXPECT_EQ(read_json(tmp / "with.json")["tokenizer_check"], "same");
  EXPECT_EQ(out.find("tokenizer check"), std::string::npos) << out;
  ASSERT_EQ(eval(with_tokenizer(m.sedd, "", tmp / "none.h5"), tmp / "none.json"), 0) << out;
  EXPECT_NE(out.find("d: tokenizer check skipped: the model's tokenizer is none stored, the data's byte"),
            std::string::npos)
      << out;
  EXPECT_EQ(read_json(tmp / "none.json")["datasets"][0]["tokenizer_check"].get<std::string>().rfind("skipped", 0), 0u);
}

// tokens_x_draws_per_s: K draws per token for a bound, one pass for the exact AR likelihood.
TEST(ToolsEval, ExactRowsCountOneDrawPerToken) {
  const Models& m = models();
  ASSERT_TRUE(m.error.empty()) << m.error;
  TempDir tmp;
  std::string out;
  for (const auto& [ckpt, draws] : {std::pair{m.ar, 1}, std::pair{m.sedd, 4}}) {
    ASSERT_EQ(run(mpi(1, "sedd-eval",
                      fmt::format("--checkpoint {} --device cpu --data {} --mc-samples 4 --max-sequences 4 --json {}",
                                  ckpt, m.data, tmp / "e.json")),
                  &out),
              0)
        << out;
    auto j = read_json(tmp / "e.json");
    EXPECT_EQ(j["exact"].get<bool>(), draws == 1);
    const double expected = j["tokens"].get<double>() * draws / j["seconds"].get<double>();
    EXPECT_NEAR(j["tokens_x_draws_per_s"].get<double>() / expected, 1.0, 1e-9) << ckpt;
  }
}

// ---------------------------------------------------------------------------------------------
// Exit codes: 0 ok, 1 a failure while running, 2 bad arguments / missing or bad input data /
// refused settings, 3 pre-emption (sedd-train; tests/resilience_test.cpp); the same at every
// number of ranks, each error printed once.

TEST(ToolsExitCodes, UsageErrorsExit2AndPrintOnceOnEveryRankCount) {
  std::string out;
  std::vector<std::string> cmds;
  for (const char* tool : {"sedd-train", "sedd-sample", "sedd-eval", "sedd-compare", "sedd-prepare",
                           "sedd-bench-train", "sedd-bench-reader", "sedd-bench-sample", "sedd-parity compare"})
    for (int np : {1, 2}) cmds.push_back(mpi(np, tool, "--no-such-option 1"));
  const auto results = run_all(cmds);
  for (size_t i = 0; i < cmds.size(); ++i) {
    EXPECT_EQ(results[i].rc, 2) << cmds[i] << ": " << results[i].output;
    EXPECT_EQ(occurrences(results[i].output, "no-such-option"), 1) << cmds[i] << ": " << results[i].output;
  }
  EXPECT_EQ(run(bin_dir() + "/sedd-bench-model --no-such-option 1", &out), 2) << out;
  EXPECT_EQ(run(mpi(2, "sedd-parity", "nonsense"), &out), 2) << out;
  EXPECT_EQ(occurrences(out, "unknown command"), 1) << out;
}

TEST(ToolsExitCodes, BadValuesExit2AndPrintOnce) {
  const Models& m = models();
  ASSERT_TRUE(m.error.empty()) << m.error;
  TempDir tmp;
  struct Case {
    const char* tool;
    std::string args, message;
  };
  const std::vector<Case> cases = {
      {"sedd-eval", fmt::format("--checkpoint {} --device cpu --data {} --mc-samples 3", m.sedd, m.data),
       "--mc-samples must be even for antithetic sampling"},
      {"sedd-eval", fmt::format("--checkpoint {} --device cpu --data {} --sampling sobol", m.sedd, m.data),
       "--sampling must be iid, antithetic or stratified"},
      {"sedd-sample", fmt::format("--checkpoint {} --device cpu --num-samples 0", m.sedd), "must be positive"},
      {"sedd-sample", fmt::format("--checkpoint {} --device cpu --fix 40=1", m.sedd), "outside the sequence"},
      {"sedd-sample", fmt::format("--checkpoint {} --device cpu --precision bf16", m.sedd), "bf16 needs a GPU"},
      {"sedd-compare", fmt::format("--checkpoint {} --device cpu --data {} --batch-size 0", m.sedd, m.data),
       "--batch-size must be positive"},
      {"sedd-train", fmt::format("--data.train {} --run.device cpu --train.batch_size 7", m.data),
       "must be divisible by the number of ranks"},
      {"sedd-train", fmt::format("--data.train {} --run.device cpu --train.precision bf16", m.data),
       "bf16 needs a GPU"},
      {"sedd-prepare", fmt::format("--input {} {} --out {}", m.data, m.data, tmp / "x"), "is given twice"},
      {"sedd-eval", fmt::format("--checkpoint {} --device tpu --data {}", m.sedd, m.data),
       "device must be cpu, cuda or auto"},
  };
  std::vector<std::string> cmds, messages;
  for (const auto& c : cases)
    for (int np : {1, 2}) {
      if (std::string(c.tool) == "sedd-train" && c.message.find("divisible") != std::string::npos && np == 1) continue;
      cmds.push_back(mpi(np, c.tool, c.args));
      messages.push_back(c.message);
    }
  if (!gpu_visible()) {  // Runtime's device errors: a message and exit 2 on every tool
    for (const std::string& cmd :
         {fmt::format("sedd-sample --checkpoint {} --device cuda", m.sedd),
          fmt::format("sedd-eval --checkpoint {} --device cuda --data {}", m.sedd, m.data),
          fmt::format("sedd-train --data.train {} --run.device cuda", m.data),
          std::string("sedd-bench-sample --device cuda")}) {
      cmds.push_back(mpi(1, cmd, ""));
      messages.push_back("no GPU is visible");
    }
  }
  const auto results = run_all(cmds);
  for (size_t i = 0; i < cmds.size(); ++i) {
    EXPECT_EQ(results[i].rc, 2) << cmds[i] << "\n" << results[i].output;
    EXPECT_EQ(occurrences(results[i].output, messages[i]), 1) << cmds[i] << ": " << results[i].output;
  }
}

// Missing or damaged input data exits 2 (docs/cli.md, "Exit codes"), on every rank count, printed once.
TEST(ToolsExitCodes, MissingOrBadInputDataExits2) {
  const Models& m = models();
  ASSERT_TRUE(m.error.empty()) << m.error;
  TempDir tmp;
  std::ofstream(tmp / "garbage.h5") << "not an HDF5 file";
  struct Case {
    const char* tool;
    std::string args, message;
  };
  const std::string nothing = tmp / "nothing*.h5";
  const std::vector<Case> cases = {
      {"sedd-train", fmt::format("--data.train '{}' --run.dir {} --run.device cpu", nothing, tmp / "run"),
       "matches no shard files"},
      {"sedd-eval", fmt::format("--checkpoint {} --device cpu --data '{}'", m.sedd, nothing), "matches no shard files"},
      {"sedd-compare", fmt::format("--checkpoint {} --device cpu --data '{}'", m.sedd, nothing),
       "matches no shard files"},
      {"sedd-sample", fmt::format("--checkpoint {} --device cpu", tmp / "no-run"), "no such checkpoint"},
      {"sedd-prepare", fmt::format("--input {} --out {}", tmp / "missing.txt", tmp / "shards"), "no such input file"},
      // Found while working (the ranks apart): still 2, still once.
      {"sedd-eval", fmt::format("--checkpoint {} --device cpu --data {}", m.sedd, tmp / "garbage.h5"),
       "not an HDF5 file"},
      {"sedd-train", fmt::format("--data.train {} --run.dir {} --run.device cpu", tmp / "garbage.h5", tmp / "run"),
       "not an HDF5 file"},
  };
  std::vector<std::string> cmds, messages;
  for (const auto& c : cases)
    for (int np : {1, 2}) {
      // each run its own run folder: the runs overlap
      std::string args = c.args;
      if (auto at = args.find(tmp / "run"); at != std::string::npos)
        args.replace(at, (tmp / "run").size(), tmp / fmt::format("run-{}-{}", cmds.size(), np));
      cmds.push_back(mpi(np, c.tool, args));
      messages.push_back(c.message);
    }
  const auto results = run_all(cmds);
  for (size_t i = 0; i < cmds.size(); ++i) {
    EXPECT_EQ(results[i].rc, 2) << cmds[i] << "\n" << results[i].output;
    EXPECT_EQ(occurrences(results[i].output, messages[i]), 1) << cmds[i] << ": " << results[i].output;
  }
}

// A failure while running (here a full disk) is exit 1, at every rank count.
TEST(ToolsExitCodes, RuntimeFailuresExit1) {
  const Models& m = models();
  ASSERT_TRUE(m.error.empty()) << m.error;
  std::string out;
  for (int np : {1, 2}) {
    EXPECT_EQ(run(mpi(np, "sedd-sample",
                      fmt::format("--checkpoint {} --device cpu --num-samples 2 --steps 2 --out /dev/full", m.sedd)),
                  &out),
              1)
        << out;
    EXPECT_EQ(occurrences(out, "/dev/full: writing the samples failed"), 1) << out;
  }
}
