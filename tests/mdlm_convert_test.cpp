// The MDLM authors' checkpoints through tools/sedd_convert.py to-h5: their Lightning .ckpt (EMA by
// default, raw weights with --no-ema) and their Hugging Face export (model.safetensors +
// config.json) become objective-mdlm model files whose forward equals their code's (DIT logits and
// SUBS log-probabilities stored by tests/data/make_mdlm_checkpoints.py); inputs that cannot convert
// are refused with one message naming the file, and nothing is written.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <iostream>

#include "io/hdf5.h"
#include "model/ddit.h"
#include "objectives/score.h"
#include "model/weights.h"
#include "test_util.h"

using namespace sedd;
using namespace sedd::test;

namespace {

std::string mdlm_fixture(const std::string& name) { return source_dir() + "/tests/data/mdlm_checkpoints/" + name; }

int mdlm_to_h5(const std::string& args, std::string* out) {
  return run(python() + " " + source_dir() + "/tools/sedd_convert.py to-h5 " + args, out);
}

double max_abs_diff(const torch::Tensor& a, const torch::Tensor& b) {
  EXPECT_EQ(a.sizes(), b.sizes());
  return (a.to(torch::kDouble) - b.to(torch::kDouble)).abs().max().item<double>();
}

// Our network from `model_h5` against the authors' outputs in expected.h5's `group`: the raw
// output (their DIT / HF MDLM logits) and, at the masked positions, the clean-token
// log-probabilities our samplers and bounds read (their SUBS parameterisation without the mask column).
void expect_authors_outputs(const std::string& model_h5, bool use_ema, const std::string& group) {
  ModelFileInfo info;
  DDiT m = load_model_file(model_h5, use_ema, &info);
  m->eval();
  EXPECT_EQ(m->cfg.objective, "mdlm");
  EXPECT_EQ(m->cfg.graph, "absorb");
  EXPECT_EQ(m->cfg.tokens, 49);
  EXPECT_FALSE(m->cfg.scale_by_sigma);
  h5::File ref(mdlm_fixture("expected.h5"), h5::Mode::Read);
  const int64_t mask = ref.attr_int("/", "mask_index");
  ASSERT_EQ(mask, m->cfg.vocab_dim() - 1);
  auto indices = ref.read("/input/indices", torch::kLong), sigma = ref.read("/input/sigma", torch::kFloat);
  torch::NoGradGuard ng;
  const double logits_err = max_abs_diff(m->forward_raw(indices, sigma), ref.read(group + "/logits", torch::kFloat));
  EXPECT_LE(logits_err, 1e-4) << group << " logits from " << model_h5;

  DDiTScore score(m, /*cache=*/false);
  score.evaluate(indices, sigma);
  auto masked = (indices.reshape({-1}) == mask).nonzero().squeeze(1);
  ASSERT_GT(masked.numel(), 4);
  auto theirs = ref.read(group + "/subs", torch::kFloat).reshape({-1, mask + 1}).index_select(0, masked);
  const double subs_err = max_abs_diff(score.rows(masked), theirs.narrow(1, 0, mask));
  EXPECT_LE(subs_err, 1e-4) << group << " SUBS from " << model_h5;
  std::cout << group << (use_ema ? " (EMA requested)" : " (raw requested)") << ": logits max |ours - theirs| "
            << logits_err << ", SUBS log-probs at " << masked.numel() << " masked positions " << subs_err << "\n";
  EXPECT_LT(theirs.select(1, mask).max().item<float>(), -1e5) << "their SUBS gives the mask no mass";
}

std::string expected_tokenizer_json() {
  return h5::File(mdlm_fixture("expected.h5"), h5::Mode::Read).attr_string("/", "tokenizer_json");
}

}  // namespace

// Lightning .ckpt: the EMA (their shadow_params mapped onto the backbone's parameters by order) by
// default, beside the raw weights; --no-ema writes the raw weights alone. The config (shape,
// time_conditioning = True, log-linear noise), the step and the pickled tokenizer come along,
// though omegaconf and transformers are not needed to read the checkpoint.
TEST(WeightsMdlmLightning, EmaByDefaultRawWithTheFlagEqualTheAuthorsForward) {
  SEDD_REQUIRE_PYTHON("torch", "numpy", "h5py", "safetensors");
  TempDir tmp;
  std::string out;
  ASSERT_EQ(mdlm_to_h5(mdlm_fixture("lightning.ckpt") + " " + (tmp / "ema.h5"), &out), 0) << out;
  ASSERT_EQ(mdlm_to_h5(mdlm_fixture("lightning.ckpt") + " " + (tmp / "raw.h5") + " --no-ema", &out), 0) << out;

  ModelFileInfo info;
  DDiT m = load_model_file(tmp / "ema.h5", true, &info);
  EXPECT_TRUE(info.has_ema);
  EXPECT_EQ(info.step, 3);
  EXPECT_EQ(info.tokenizer, expected_tokenizer_json());
  EXPECT_TRUE(m->cfg.time_conditioning);
  EXPECT_EQ(m->cfg.hidden_size, 24);
  EXPECT_EQ(m->cfg.n_heads, 4);
  EXPECT_EQ(m->cfg.n_blocks, 2);
  EXPECT_EQ(m->cfg.cond_dim, 16);
  EXPECT_EQ(m->cfg.length, 16);
  EXPECT_EQ(m->cfg.noise.kind, "loglinear");
  EXPECT_EQ(m->cfg.noise.eps, 1e-3);

  expect_authors_outputs(tmp / "ema.h5", true, "/lightning/ema");
  expect_authors_outputs(tmp / "ema.h5", false, "/lightning/raw");  // the tools' --no-ema
  load_model_file(tmp / "raw.h5", true, &info);
  EXPECT_FALSE(info.has_ema);
  expect_authors_outputs(tmp / "raw.h5", true, "/lightning/raw");
  // The two weight sets are far apart, so a swap could not pass.
  h5::File ref(mdlm_fixture("expected.h5"), h5::Mode::Read);
  EXPECT_GT(max_abs_diff(ref.read("/lightning/ema/logits"), ref.read("/lightning/raw/logits")), 0.1);
}

// Hugging Face export (kuleshov-group/mdlm-owt's layout): config.json beside model.safetensors,
// time_conditioning False (sigma is then ignored, as their backbone zeroes it); --tokenizer embeds a
// tokenizer.json after checking that the mask is one past its vocabulary; flags override config.json.
TEST(WeightsMdlmHuggingFace, ExportEqualsTheAuthorsForwardAndTakesATokenizer) {
  SEDD_REQUIRE_PYTHON("torch", "numpy", "h5py", "safetensors");
  TempDir tmp;
  std::ofstream(tmp / "tokenizer.json") << expected_tokenizer_json();
  std::string out;
  ASSERT_EQ(mdlm_to_h5(mdlm_fixture("hf/model.safetensors") + " " + (tmp / "hf.h5"), &out), 0) << out;
  ASSERT_EQ(mdlm_to_h5(mdlm_fixture("hf/model.safetensors") + " " + (tmp / "hf_tok.h5") + " --tokenizer " +
                           (tmp / "tokenizer.json"),
                       &out),
            0)
      << out;
  ModelFileInfo info;
  DDiT m = load_model_file(tmp / "hf.h5", true, &info);
  EXPECT_FALSE(m->cfg.time_conditioning);
  EXPECT_FALSE(info.has_ema);
  EXPECT_EQ(info.tokenizer, "");
  expect_authors_outputs(tmp / "hf.h5", true, "/hf");
  load_model_file(tmp / "hf_tok.h5", true, &info);
  EXPECT_EQ(info.tokenizer, expected_tokenizer_json());
  // The export holds the Lightning checkpoint's EMA weights: with time conditioning switched on by
  // the flag (which overrides config.json) it is that checkpoint's EMA model.
  ASSERT_EQ(mdlm_to_h5(mdlm_fixture("hf/model.safetensors") + " " + (tmp / "hf_tc.h5") + " --time-conditioning 1", &out),
            0)
      << out;
  expect_authors_outputs(tmp / "hf_tc.h5", true, "/lightning/ema");
}

// What cannot convert is refused (exit 2) with one message naming the file and the problem, and
// nothing is written: a mask that is not the last id, an export without its config.json, a .ckpt
// without EMA weights when they are asked for, truncated or corrupt files.
TEST(OptionsConvertMdlm, UnconvertibleInputsAreRefusedAndWriteNothing) {
  SEDD_REQUIRE_PYTHON("torch", "numpy", "h5py", "safetensors");
  TempDir tmp;
  std::filesystem::create_directories(tmp / "out");
  std::filesystem::create_directories(tmp / "alone");
  std::filesystem::copy_file(mdlm_fixture("hf/model.safetensors"), tmp / "alone/model.safetensors");
  {
    std::ifstream in(mdlm_fixture("lightning.ckpt"), std::ios::binary);
    std::string bytes((std::istreambuf_iterator<char>(in)), {});
    std::ofstream(tmp / "truncated.ckpt", std::ios::binary) << bytes.substr(0, bytes.size() / 2);
    std::ofstream(tmp / "corrupt.safetensors", std::ios::binary) << "not a safetensors file at all";
  }
  struct Case {
    std::string input, extra, message;
  };
  const std::vector<Case> cases = {
      {mdlm_fixture("mask_inside.ckpt"), "",
       mdlm_fixture("mask_inside.ckpt") + ": the mask is the tokenizer's own '[MASK]' = id 3"},
      {tmp / "alone/model.safetensors", "",
       tmp / "alone/model.safetensors" + ": MDLM weights (backbone.*) without their config.json"},
      {mdlm_fixture("no_ema.ckpt"), "", mdlm_fixture("no_ema.ckpt") + ": the checkpoint holds no EMA weights"},
      {tmp / "truncated.ckpt", "", tmp / "truncated.ckpt" + ": cannot read as a PyTorch file"},
      {tmp / "corrupt.safetensors", "", tmp / "corrupt.safetensors" + ": cannot read as a safetensors file"},
  };
  for (const auto& c : cases) {
    std::string out;
    EXPECT_EQ(mdlm_to_h5(c.input + " " + (tmp / "out/model.h5") + c.extra, &out), 2) << c.input << "\n" << out;
    EXPECT_NE(out.find("sedd_convert: error: " + c.message), std::string::npos) << out;
    EXPECT_EQ(out.find("sedd_convert: error:"), out.rfind("sedd_convert: error:")) << "one message: " << out;
    EXPECT_EQ(out.find("Traceback"), std::string::npos) << out;
    EXPECT_TRUE(std::filesystem::is_empty(tmp / "out")) << c.input << " left files behind";
  }
  // The checkpoint without an EMA converts when the raw weights are asked for.
  std::string out;
  ASSERT_EQ(mdlm_to_h5(mdlm_fixture("no_ema.ckpt") + " " + (tmp / "out/raw.h5") + " --no-ema", &out), 0) << out;
  ModelFileInfo info;
  DDiT m = load_model_file(tmp / "out/raw.h5", true, &info);
  EXPECT_FALSE(info.has_ema);
  EXPECT_EQ(m->cfg.hidden_size, 4);
}
