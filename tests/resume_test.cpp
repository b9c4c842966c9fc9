// Resuming safely: the run fingerprint, the fallback to an older checkpoint, format versions,
// elapsed time across segments, dropout keyed per sequence, and the tokenizer that travels with
// data and checkpoints. Real mpirun runs of sedd-train, sedd-sample and sedd-eval.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "data/shard.h"
#include "io/fs.h"
#include "io/hdf5.h"
#include "model/weights.h"
#include "recipes.h"
#include "test_util.h"
#include "train/checkpoint.h"

using namespace sedd;
using namespace sedd::test;
namespace stdfs = std::filesystem;

namespace {

std::string resume_data(const TempDir& tmp, const std::string& name = "d", int shards = 2) {
  torch::manual_seed(7);
  for (int i = 0; i < shards; ++i) {
    auto motif = torch::randint(39, {37});
    write_shard(tmp / fmt::format("{}{}.h5", name, i), torch::cat({motif.repeat({40}), torch::randint(39, {700})}), 40,
                39, "byte");
  }
  return tmp / (name + "*.h5");
}

// Options given in `extra` replace the defaults below (the command line takes each option once).
std::string resume_train(int np, const std::string& data, const std::string& dir, const std::string& extra) {
  return tiny_sedd().set("train.ema", "0.9").command(np, data, dir, extra);
}

}  // namespace

// Every checked setting, changed on resume, is refused with exit 2 and named; latest stays.
TEST(ResumeFingerprint, EachChangedSettingIsRefusedAndNamed) {
  TempDir tmp;
  std::string data = resume_data(tmp), other = resume_data(tmp, "other", 3), out, dir = tmp / "run";
  ASSERT_EQ(run(resume_train(1, data, dir, "--train.steps 2"), &out), 0) << out;
  const std::string latest = fs::read_text(dir + "/checkpoints/latest");
  struct Change {
    std::string args, key;
  };
  std::vector<Change> changes = {
      {"--data.seq_len 8", "data.seq_len: checkpoint 16, now 8"},
      {"--train.batch_size 4", "train.batch_size: checkpoint 8, now 4"},
      {"--run.seed 3", "run.seed: checkpoint 0, now 3"},
      {"--diffusion.graph uniform --model.scale_by_sigma false", "diffusion.graph: checkpoint \"absorb\""},
      {"--diffusion.noise geometric", "diffusion.noise: checkpoint \"loglinear\", now \"geometric\""},
      {"--train.time_sampling stratified", "train.time_sampling"},
      {"--model.dropout 0.1", "model.dropout: checkpoint 0.0, now 0.1"},
  };
  for (const auto& c : changes) {
    EXPECT_EQ(run(resume_train(1, data, dir, "--train.steps 4 " + c.args), &out), 2) << c.args << "\n" << out;
    EXPECT_NE(out.find(c.key), std::string::npos) << c.args << "\n" << out;
    EXPECT_NE(out.find("--resume.allow"), std::string::npos) << out;
    EXPECT_EQ(fs::read_text(dir + "/checkpoints/latest"), latest) << c.args;
  }
  // Another dataset (other shard names, sizes, token counts) is a change too.
  EXPECT_EQ(run(fmt::format("{} --train.steps 4", resume_train(1, other, dir, "")), &out), 2) << out;
  EXPECT_NE(out.find("data.train: checkpoint 2 shards"), std::string::npos) << out;
  // Allowed explicitly, the change goes through; free settings (lr, steps, logging) need nothing.
  EXPECT_EQ(run(resume_train(1, data, dir, "--train.steps 3 --run.seed 3 --resume.allow run.seed"), &out), 0) << out;
  EXPECT_EQ(run(resume_train(1, data, dir, "--train.steps 4 --run.seed 3 --train.lr 1e-3 --train.log_every 2"), &out), 0)
      << out;
  EXPECT_NE(out.find("resumed from"), std::string::npos) << out;
  // A misspelt key in resume.allow is refused rather than ignored.
  EXPECT_EQ(run(resume_train(1, data, dir, "--train.steps 5 --resume.allow run.sed"), &out), 2) << out;
  EXPECT_NE(out.find("resume.allow: 'run.sed' is not a checked setting"), std::string::npos) << out;
}

// A damaged newest checkpoint: the run says why and resumes from the previous complete one; an
// unreadable `latest` pointer too. Nothing is deleted.
TEST(ResumeFallback, DamagedLatestFallsBackToThePreviousCheckpoint) {
  TempDir tmp;
  std::string data = resume_data(tmp), out, dir = tmp / "run";
  ASSERT_EQ(run(resume_train(2, data, dir, "--train.steps 6 --train.ckpt_every 3 --train.keep_ckpts 3"), &out), 0) << out;
  std::string model = dir + "/checkpoints/step_6/model.h5";
  stdfs::resize_file(model, stdfs::file_size(model) / 2);
  ASSERT_EQ(run(resume_train(2, data, dir, "--train.steps 8 --train.ckpt_every 0 --train.keep_ckpts 3"), &out), 0) << out;
  EXPECT_NE(out.find("cannot resume from it: " + model), std::string::npos) << out;
  EXPECT_NE(out.find("resumed from " + dir + "/checkpoints/step_3 (an older checkpoint)"), std::string::npos) << out;
  EXPECT_TRUE(stdfs::exists(model)) << "the damaged checkpoint was deleted";
  auto rows = run_metrics(dir);
  ASSERT_FALSE(rows.empty());
  EXPECT_EQ(rows.back()["step"].get<int64_t>(), 8);
  // latest pointing nowhere: the newest complete checkpoint is used.
  fs::write_text_atomic(dir + "/checkpoints/latest", "step_999\n");
  ASSERT_EQ(run(resume_train(2, data, dir, "--train.steps 9 --train.ckpt_every 0 --train.keep_ckpts 3"), &out), 0) << out;
  EXPECT_NE(out.find("points to 'step_999', which is missing or incomplete"), std::string::npos) << out;
  EXPECT_NE(out.find("resumed from " + dir + "/checkpoints/step_8"), std::string::npos) << out;
}

// elapsed_s continues over segments; unknown format versions are refused, naming the file.
TEST(ResumeState, ElapsedTimeContinuesAndUnknownFormatVersionsAreRefused) {
  TempDir tmp;
  std::string data = resume_data(tmp), out, dir = tmp / "run";
  ASSERT_EQ(run(resume_train(1, data, dir, "--train.steps 4"), &out), 0) << out;
  double first = run_metrics(dir).back()["elapsed_s"].get<double>();
  auto state = nlohmann::json::parse(fs::read_text(dir + "/checkpoints/step_4/state.json"));
  EXPECT_GE(state["elapsed_s"].get<double>(), first);
  EXPECT_TRUE(state["fingerprint"].is_object());
  ASSERT_EQ(run(resume_train(1, data, dir, "--train.steps 6"), &out), 0) << out;
  auto rows = run_metrics(dir);
  EXPECT_GT(rows[4]["elapsed_s"].get<double>(), first) << "elapsed_s restarted after the resume";
  // state.json from a newer release.
  std::string st = dir + "/checkpoints/step_6/state.json";
  auto j = nlohmann::json::parse(fs::read_text(st));
  j["format_version"] = 99;
  fs::write_text_atomic(st, j.dump());
  // Not a damaged checkpoint to skip: refused, so an older build never overwrites a newer run.
  EXPECT_EQ(run(resume_train(1, data, dir, "--train.steps 8"), &out), 2);
  EXPECT_NE(out.find(st + ": format_version 99 is not one this build reads"), std::string::npos) << out;
  // model.h5 from a newer release: sample and eval refuse it by name.
  std::string model = dir + "/checkpoints/step_4/model.h5";
  h5::File(model, h5::Mode::ReadWrite).set_attr("/", "format_version", int64_t{7});
  EXPECT_EQ(run(fmt::format("{} -np 1 {}/sedd-sample --checkpoint {} --device cpu --num-samples 1 --steps 2", kMpirun, bin_dir(),
                            model),
                &out),
            2);
  EXPECT_NE(out.find(model + ": model file format_version 7"), std::string::npos) << out;
}

// Dropout masks keyed per sequence: with dropout 0.1 a run gives the same weights on 1 and 2 ranks
// (float64), and a run resumed on another world size continues it exactly.
TEST(ResumeDropout, DropoutRunsDoNotDependOnTheNumberOfRanks) {
  TempDir tmp;
  std::string data = resume_data(tmp), out;
  const std::string opts = "--model.dropout 0.1 --train.precision fp64 --train.micro_batch_size 2";
  for (int np : {1, 2})
    ASSERT_EQ(run(resume_train(np, data, tmp / fmt::format("w{}", np), "--train.steps 6 " + opts), &out), 0) << out;
  // docs/cluster.md: W ranks match 1 rank in float64, dropout included. The float64 state is compared
  // through the Adam moments (saved in float64; model.h5 holds float32 weights): not bit for bit,
  // another rank count sums in another order (measured ~1e-15 relative), bound 1e-12.
  double d = max_abs_diff(run_weights(tmp / "w1"), run_weights(tmp / "w2"));
  const torch::Tensor m1 = checkpoint_moments(tmp / "w1"), m2 = checkpoint_moments(tmp / "w2");
  ASSERT_EQ(m1.scalar_type(), torch::kDouble);
  std::cout << "dropout 0.1: W=1 vs W=2 max |dw| = " << d << ", float64 Adam moments " << moments_rel_diff(m1, m2)
            << " (relative)\n";
  EXPECT_LE(d, 1e-6);
  EXPECT_LE(moments_rel_diff(m1, m2), 1e-12);
  // The same with dropout off differs: dropout really acted.
  ASSERT_EQ(run(resume_train(1, data, tmp / "nodrop", "--train.steps 6 --train.precision fp64"), &out), 0) << out;
  EXPECT_GT(max_abs_diff(run_weights(tmp / "w1"), run_weights(tmp / "nodrop")), 1e-4);
  // Resume on another world size: 3 steps on 2 ranks, then 3 more on 1.
  std::string cut = tmp / "cut";
  ASSERT_EQ(run(resume_train(2, data, cut, "--train.steps 3 " + opts), &out), 0) << out;
  ASSERT_EQ(run(resume_train(1, data, cut, "--train.steps 6 " + opts), &out), 0) << out;
  auto a = run_metrics(tmp / "w1"), b = run_metrics(cut);
  ASSERT_EQ(a.size(), b.size());
  double dl = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    const double x = a[i]["loss"].get<double>(), y = b[i]["loss"].get<double>();
    dl = std::max(dl, std::abs(x - y) / std::abs(x));
    EXPECT_NEAR(x, y, 1e-9) << "step " << i + 1;
  }
  // A float64 run resumes from model.h5's float32 weights (the moments are saved in float64): the
  // resumed steps continue from weights rounded to float32, so they differ from the straight run by
  // float32 rounding (measured: weights 1 float32 ulp, moments 6e-8 relative), not by float64 ulps.
  const torch::Tensor mc = checkpoint_moments(cut);
  const double dw = max_abs_diff(run_weights(tmp / "w1"), run_weights(cut));
  std::cout << "resumed W=2 -> W=1: max |dw| = " << dw << ", float64 Adam moments " << moments_rel_diff(m1, mc)
            << ", losses " << dl << " (relative)\n";
  EXPECT_LE(dw, 1e-6);
  EXPECT_LE(moments_rel_diff(m1, mc), 1e-5);
}

// The tokenizer travels: shards hold its full definition, checkpoints a tokenizer.json beside
// model.h5; a checkpoint copied elsewhere samples with --prefix, and evaluation needs no tokenizer.
TEST(ResumeTokenizer, TheTokenizerTravelsWithDataAndCheckpoints) {
  SEDD_REQUIRE_PYTHON("tokenizers");
  TempDir tmp;
  std::string out;
  // A small byte-level BPE tokenizer.json trained with the `tokenizers` package.
  std::string corpus = tmp / "corpus.txt";
  {
    std::ofstream c(corpus);
    for (int i = 0; i < 400; ++i) c << "the cat sat on the mat. a dog ran in the fog. " << i << "\n";
  }
  stdfs::create_directories(tmp / "tok");
  ASSERT_EQ(run(fmt::format("{} -c \"from tokenizers import ByteLevelBPETokenizer as B\n"
                            "t=B(); t.train(['{}'], vocab_size=300, special_tokens=['<|endoftext|>'])\n"
                            "t.save('{}')\"",
                            python(), corpus, tmp / "tok/tokenizer.json"),
                &out),
            0)
      << out;
  ASSERT_EQ(run(fmt::format("{} -np 1 {}/sedd-prepare --input {} --tokenizer {} --out {} --shard-tokens 100000",
                            kMpirun, bin_dir(), corpus, tmp / "tok/tokenizer.json", tmp / "shards"),
                &out),
            0)
      << out;
  stdfs::remove_all(tmp / "tok");  // the tokenizer file is gone: the data must carry it
  auto info = read_shard_info(expand_shard_list(tmp / "shards/*.h5").front());
  EXPECT_EQ(info.tokenizer.front(), '{');
  ASSERT_EQ(run(fmt::format("{} -np 1 {}/sedd-train --data.train '{}' --run.dir {} --run.device cpu --data.seq_len 16 "
                            "--model.hidden_size 32 --model.n_heads 2 --model.n_blocks 1 --model.cond_dim 16 "
                            "--train.batch_size 4 --train.steps 2",
                            kMpirun, bin_dir(), tmp / "shards/*.h5", tmp / "run"),
                &out),
            0)
      << out;
  std::string ckpt = tmp / "run/checkpoints/step_2";
  ASSERT_TRUE(stdfs::exists(ckpt + "/tokenizer.json"));
  EXPECT_EQ(fs::read_text(ckpt + "/tokenizer.json"), info.tokenizer);
  stdfs::copy(ckpt, tmp / "elsewhere", stdfs::copy_options::recursive);
  ASSERT_EQ(run(fmt::format("cd / && {} -np 1 {}/sedd-sample --checkpoint {} --device cpu --num-samples 2 --steps 4 --prefix 'the cat' "
                            "--out {}",
                            kMpirun, bin_dir(), tmp / "elsewhere", tmp / "s.jsonl"),
                &out),
            0)
      << out;
  auto row = nlohmann::json::parse(fs::read_text(tmp / "s.jsonl").substr(0, fs::read_text(tmp / "s.jsonl").find('\n')));
  EXPECT_EQ(row["text"].get<std::string>().substr(0, 7), "the cat") << row.dump();
  // Evaluation reads no tokenizer at all: shards claiming a tokenizer file that exists nowhere.
  write_shard(tmp / "foreign.h5", torch::randint(300, {2000}), info.vocab_size, info.eot_id, "/nowhere/tokenizer.json");
  ASSERT_EQ(run(fmt::format("{} -np 1 {}/sedd-eval --checkpoint {} --device cpu --data {} --mc-samples 2 --max-sequences 4", kMpirun,
                            bin_dir(), tmp / "elsewhere", tmp / "foreign.h5"),
                &out),
            0)
      << out;
  EXPECT_NE(out.find("nats/token"), std::string::npos) << out;
}
