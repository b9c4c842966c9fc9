// The DDiT score network: config validation, strict weight files, PyTorch interop, gradients.
#include <gtest/gtest.h>
#include <ATen/autocast_mode.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "objectives/sedd.h"
#include "golden.h"
#include "io/error.h"
#include "model/weights.h"
#include "test_util.h"

using namespace sedd;
using namespace sedd::test;

namespace {

ModelConfig tiny_config(const std::string& graph = "absorb") {
  ModelConfig c;
  c.tokens = 11;
  c.graph = graph;
  c.hidden_size = 16;
  c.n_heads = 2;
  c.n_blocks = 2;
  c.cond_dim = 8;
  c.length = 6;
  c.scale_by_sigma = graph == "absorb";
  return c;
}

// Random values everywhere (the zero-initialised adaLN layers would hide most of the network).
void randomize(DDiT& m, uint64_t seed) {
  torch::manual_seed(seed);
  torch::NoGradGuard ng;
  for (auto& p : m->parameters()) p.normal_(0, 0.3);
}

std::string expect_error(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const sedd::Error& e) {
    return e.what();
  }
  ADD_FAILURE() << "expected a sedd::Error";
  return "";
}

}  // namespace

TEST(ModelConfig, RejectsImpossibleShapesWithAClearMessage) {
  auto c = tiny_config();
  c.n_heads = 3;
  EXPECT_NE(expect_error([&] { c.validate(); }).find("divisible by model.n_heads"), std::string::npos);
  c = tiny_config();
  c.hidden_size = 18;
  c.n_heads = 6;  // head dim 3: odd
  EXPECT_NE(expect_error([&] { c.validate(); }).find("even for rotary"), std::string::npos);
  c = tiny_config("uniform");
  c.scale_by_sigma = true;
  EXPECT_NE(expect_error([&] { c.validate(); }).find("scale_by_sigma"), std::string::npos);
  c = tiny_config("uniform");
  c.time_conditioning = false;
  EXPECT_NE(expect_error([&] { c.validate(); }).find("time_conditioning"), std::string::npos);
}

TEST(ModelOutput, CurrentTokenEntryIsZeroAndShapesFollowTheGraph) {
  for (const char* graph : {"absorb", "uniform"}) {
    DDiT m(tiny_config(graph));
    randomize(m, 1);
    auto x = torch::randint(m->cfg.vocab_dim(), {3, 6}, torch::kLong);
    auto out = m->forward(x, torch::rand({3}));
    ASSERT_EQ(out.sizes(), (std::vector<int64_t>{3, 6, m->cfg.vocab_dim()}));
    EXPECT_EQ(out.gather(-1, x.unsqueeze(-1)).abs().max().item<float>(), 0.0f);
    EXPECT_GT(out.abs().max().item<float>(), 0.0f);
  }
}

TEST(ModelOutput, WithoutTimeConditioningSigmaOnlyShiftsTheScore) {
  auto c = tiny_config();
  c.time_conditioning = false;
  DDiT m(c);
  randomize(m, 2);
  m->eval();
  auto x = torch::randint(c.vocab_dim(), {2, 6}, torch::kLong);
  auto a = m->forward(x, torch::full({2}, 0.3)), b = m->forward(x, torch::full({2}, 2.0));
  // scale_by_sigma shift: -log(e^sigma - 1), the same for every non-current entry.
  double shift = std::log(std::expm1(2.0)) - std::log(std::expm1(0.3));
  auto diff = (a - b).masked_select(a != 0);
  EXPECT_LT((diff - shift).abs().max().item<float>(), 1e-4);
  // With time conditioning on, sigma changes more than a constant shift.
  DDiT mt(tiny_config());
  randomize(mt, 2);
  mt->eval();
  auto d2 = (mt->forward(x, torch::full({2}, 0.3)) - mt->forward(x, torch::full({2}, 2.0)));
  EXPECT_GT((d2 - d2.masked_select(d2 != 0).mean()).masked_select(d2 != 0).abs().max().item<float>(), 1e-3);
}

TEST(Weights, RoundTripAndStrictLoading) {
  TempDir tmp;
  auto cfg = tiny_config();
  DDiT m(cfg);
  randomize(m, 3);
  std::string path = tmp / "model.h5";
  save_model_file(path, cfg, state_dict(*m), state_dict(*m), {7, 1234, true});
  ModelFileInfo info;
  DDiT back = load_model_file(path, /*use_ema=*/true, &info);
  EXPECT_EQ(info.step, 7);
  EXPECT_EQ(info.tokens_seen, 1234);
  EXPECT_TRUE(info.has_ema);
  EXPECT_EQ(back->cfg.summary(), cfg.summary());
  auto sd = state_dict(*m), sd2 = state_dict(*back);
  ASSERT_EQ(sd.size(), sd2.size());
  for (auto& [k, v] : sd) EXPECT_TRUE(torch::equal(v, sd2.at(k))) << k;

  // Another shape: every mismatch is named, together with the file.
  auto other = cfg;
  other.hidden_size = 32;
  DDiT wrong(other);
  std::string msg = expect_error([&] { load_state_dict(*wrong, sd, path); });
  EXPECT_NE(msg.find(path), std::string::npos) << msg;
  EXPECT_NE(msg.find("mis-shaped: blocks.0"), std::string::npos) << msg;
  auto partial = sd;
  partial.erase("blocks.1.mlp.0.bias");
  partial["blocks.9.extra"] = torch::zeros({1});
  msg = expect_error([&] { load_state_dict(*back, partial, "x.h5"); });
  EXPECT_NE(msg.find("missing: blocks.1.mlp.0.bias"), std::string::npos) << msg;
  EXPECT_NE(msg.find("unexpected: blocks.9.extra"), std::string::npos) << msg;
}

// Whole training loss against central finite differences, float64, on a tiny model.
TEST(ModelGradient, MatchesFiniteDifferences) {
  for (const char* graph : {"absorb", "uniform"}) {
    auto cfg = tiny_config(graph);
    DDiT m(cfg);
    randomize(m, 4);
    m->to(torch::kDouble);
    auto g = make_graph(cfg.graph, cfg.tokens);
    auto noise = make_noise(cfg.noise);
    auto gen = at::make_generator<at::CPUGeneratorImpl>(5);
    auto x0 = torch::randint(cfg.tokens, {2, 6}, gen, torch::kLong);
    auto t = torch::tensor({0.35, 0.8}, torch::kDouble);
    auto xt = g->sample_transition(x0, noise->total(t).unsqueeze(-1), gen);
    auto loss_fn = [&] { return sequence_loss(*g, *noise, m->forward(xt, noise->total(t)), t, xt, x0).mean(); };
    m->zero_grad();
    loss_fn().backward();
    int checked = 0;
    double worst = 0;
    for (auto& p : m->named_parameters()) {
      auto flat = p.value().view(-1);
      auto grad = p.value().grad().view(-1);
      for (int64_t i : {int64_t{0}, flat.numel() / 2, flat.numel() - 1}) {
        torch::NoGradGuard ng;
        double orig = flat[i].item<double>(), h = 1e-6;
        flat[i] = orig + h;
        double up = loss_fn().item<double>();
        flat[i] = orig - h;
        double down = loss_fn().item<double>();
        flat[i] = orig;
        double fd = (up - down) / (2 * h), ad = grad[i].item<double>();
        double err = std::abs(fd - ad) / (std::abs(fd) + std::abs(ad) + 1e-6);
        worst = std::max(worst, err);
        EXPECT_LT(err, 1e-4) << graph << " " << p.key() << "[" << i << "] fd " << fd << " autograd " << ad;
        checked++;
      }
    }
    EXPECT_GT(checked, 50);
    std::cout << graph << ": " << checked << " gradient entries, worst relative error " << worst << "\n";
  }
}

// PyTorch state dict (as the official checkpoints ship) -> model.h5 -> our forward == golden.
TEST(ModelInterop, PyTorchCheckpointRoundTripThroughTheConverter) {
  SEDD_REQUIRE_PYTHON("torch", "numpy", "h5py", "safetensors");
  TempDir tmp;
  std::string conv = source_dir() + "/tools/sedd_convert.py";
  h5::File golden(golden_path(), h5::Mode::Read);
  for (const auto& name : golden.children("/model")) {
    std::string g = "/model/" + name;
    ModelConfig ref_cfg = read_model_config(golden, g);
    for (const char* ext : {"pth", "safetensors"}) {
      std::string src = tmp / (name + "." + ext), h5out = tmp / (name + "_" + ext + ".h5");
      std::string back = tmp / (name + "_back." + ext);
      // Write the golden params as a training checkpoint with DDP prefixes, or a bare safetensors.
      std::string make = fmt::format(
          "{} -c \"import h5py,torch,sys\n"
          "f=h5py.File('{}','r'); sd={{k: torch.from_numpy(v[()]) for k,v in f['{}/params'].items()}}\n"
          "if '{}'=='pth': torch.save({{'model': {{'module.'+k: v for k,v in sd.items()}}, 'step': 3}}, '{}')\n"
          "else:\n  from safetensors.torch import save_file; save_file(sd, '{}')\"",
          python(), golden_path(), g, ext, src, src);
      std::string out;
      ASSERT_EQ(run(make, &out), 0) << out;
      std::string args = fmt::format(" --n-heads {} --graph {} --noise {} --eps {} --sigma-min {} --sigma-max {} --length {}",
                                     ref_cfg.n_heads, ref_cfg.graph, ref_cfg.noise.kind, ref_cfg.noise.eps,
                                     ref_cfg.noise.sigma_min, ref_cfg.noise.sigma_max, ref_cfg.length);
      ASSERT_EQ(run(python() + " " + conv + " to-h5 " + src + " " + h5out + args, &out), 0) << out;
      DDiT m = load_model_file(h5out, false);
      m->eval();
      EXPECT_EQ(m->cfg.summary(), ref_cfg.summary());
      torch::NoGradGuard ng;
      auto ours = m->forward(golden.read(g + "/input/indices"), golden.read(g + "/input/sigma", torch::kFloat));
      double err = model_rel_error(ours, golden.read(g + "/output/log_score", torch::kFloat));
      EXPECT_LE(err, 1e-4) << name << " via " << ext;
      // ... and back to PyTorch: identical tensors under the same names.
      // --force: every conversion of this loop writes its config.json into the same folder.
      ASSERT_EQ(run(python() + " " + conv + " to-torch --force " + h5out + " " + back, &out), 0) << out;
      std::string cmp = fmt::format(
          "{} -c \"import h5py,torch\n"
          "f=h5py.File('{}','r'); ref={{k: torch.from_numpy(v[()]) for k,v in f['{}/params'].items()}}\n"
          "p='{}'\n"
          "sd=__import__('safetensors.torch',fromlist=['load_file']).load_file(p) if p.endswith('safetensors') else torch.load(p)\n"
          "assert sorted(sd)==sorted(ref), (sorted(sd), sorted(ref))\n"
          "assert all(torch.equal(sd[k], ref[k]) for k in ref)\"",
          python(), golden_path(), g, back);
      EXPECT_EQ(run(cmp, &out), 0) << out;
    }
  }
  std::string out;
  EXPECT_NE(run(python() + " " + conv + " to-h5 " + golden_path() + " " + (tmp / "x.h5"), &out), 0);
  EXPECT_NE(out.find("cannot read"), std::string::npos) << out;
}

namespace {

std::string converter() { return python() + " " + source_dir() + "/tools/sedd_convert.py "; }

nlohmann::json read_json(const std::string& path) {
  std::ifstream in(path);
  EXPECT_TRUE(in.good()) << path;
  return nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
}

void expect_same_weights(const DDiT& a, const DDiT& b) {
  auto sa = state_dict(*a), sb = state_dict(*b);
  ASSERT_EQ(sa.size(), sb.size());
  for (auto& [k, v] : sa) EXPECT_TRUE(torch::equal(v, sb.at(k))) << k;
}

// A config no default reproduces: dropout 0.1, no time conditioning, 4 heads of 4 (the converter's
// guess would be 1), geometric noise with unusual bounds.
ModelConfig unusual_config() {
  auto c = tiny_config();
  c.dropout = 0.1;
  c.time_conditioning = false;
  c.n_heads = 4;
  c.length = 48;
  c.noise.kind = "geometric";
  c.noise.eps = 0.02;
  c.noise.sigma_min = 2e-4;
  c.noise.sigma_max = 17.5;
  return c;
}

}  // namespace

// model.h5 -> .safetensors / .bin + config.json (+ tokenizer.json) -> model.h5: the same tensors
// and the same root attributes, every config field included.
TEST(ModelInteropConfig, RoundTripThroughSafetensorsAndBinKeepsEveryAttribute) {
  SEDD_REQUIRE_PYTHON("torch", "numpy", "h5py", "safetensors");
  TempDir tmp;
  const auto cfg = unusual_config();
  DDiT m(cfg);
  randomize(m, 11);
  const std::string tokenizer_json = R"({"version": "1.0", "model": {"type": "BPE", "vocab": {"ü": 0}}})";
  for (const auto& [ext, tokenizer] : {std::pair<std::string, std::string>{"safetensors", tokenizer_json},
                                       std::pair<std::string, std::string>{"bin", "byte"}}) {
    std::string dir = tmp / ext, src = dir + "/model.h5", hf = dir + "/hf/model." + ext, back = dir + "/back.h5";
    std::filesystem::create_directories(dir + "/hf");
    save_model_file(src, cfg, state_dict(*m), {}, {42, 987654, false, tokenizer});
    std::string out;
    ASSERT_EQ(run(converter() + "to-torch " + src + " " + hf, &out), 0) << out;

    auto j = read_json(dir + "/hf/config.json");
    EXPECT_EQ(j.value("model_type", ""), "sedd");
    EXPECT_EQ(j.value("vocab_size", 0), 12);  // 11 tokens + the absorbing mask
    EXPECT_EQ(j.value("tokens", 0), 11);
    EXPECT_EQ(j.value("hidden_size", 0), 16);
    EXPECT_EQ(j.value("n_heads", 0), 4);
    EXPECT_EQ(j.value("n_blocks", 0), 2);
    EXPECT_EQ(j.value("cond_dim", 0), 8);
    EXPECT_EQ(j.value("length", 0), 48);
    EXPECT_EQ(j.value("dropout", 0.0), 0.1);
    EXPECT_EQ(j.value("time_conditioning", true), false);
    EXPECT_EQ(j.value("scale_by_sigma", false), true);
    EXPECT_EQ(j.value("graph", ""), "absorb");
    EXPECT_EQ(j.value("noise", ""), "geometric");
    EXPECT_EQ(j.value("eps", 0.0), 0.02);
    EXPECT_EQ(j.value("sigma_min", 0.0), 2e-4);
    EXPECT_EQ(j.value("sigma_max", 0.0), 17.5);
    EXPECT_EQ(j.value("step", 0), 42);
    EXPECT_EQ(j.value("tokens_seen", 0), 987654);
    bool json_tokenizer = tokenizer != "byte";
    ASSERT_EQ(std::filesystem::exists(dir + "/hf/tokenizer.json"), json_tokenizer);
    if (json_tokenizer) {
      std::ifstream in(dir + "/hf/tokenizer.json");
      EXPECT_EQ(std::string((std::istreambuf_iterator<char>(in)), {}), tokenizer_json);
    }

    // Back, with no flags: config.json beside the weights says everything.
    ASSERT_EQ(run(converter() + "to-h5 " + hf + " " + back, &out), 0) << out;
    ModelFileInfo info;
    DDiT b = load_model_file(back, false, &info);
    EXPECT_EQ(b->cfg.summary(), cfg.summary());
    EXPECT_EQ(b->cfg.dropout, 0.1);
    EXPECT_FALSE(b->cfg.time_conditioning);
    EXPECT_EQ(b->cfg.noise.eps, 0.02);
    EXPECT_EQ(b->cfg.noise.sigma_min, 2e-4);
    EXPECT_EQ(b->cfg.noise.sigma_max, 17.5);
    EXPECT_EQ(info.step, 42);
    EXPECT_EQ(info.tokens_seen, 987654);
    EXPECT_EQ(info.tokenizer, tokenizer);
    expect_same_weights(m, b);
    // Every root attribute: the same names, types and values.
    std::string cmp = fmt::format(
        "{} -c \"import h5py\n"
        "a, b = h5py.File('{}', 'r').attrs, h5py.File('{}', 'r').attrs\n"
        "assert sorted(a) == sorted(b), (sorted(a), sorted(b))\n"
        "for k in a:\n"
        "    assert type(a[k]) == type(b[k]) and a[k] == b[k], (k, a[k], b[k])\n"
        "print(len(a), 'attributes identical')\"",
        python(), src, back);
    ASSERT_EQ(run(cmp, &out), 0) << out;
    EXPECT_NE(out.find("22 attributes identical"), std::string::npos) << out;
  }
}

// A config.json that describes other weights is refused naming both files and the field, and
// writes nothing; flags override what the config says.
TEST(ModelInteropConfig, ConfigIsCheckedAgainstTheWeightsAndFlagsOverrideIt) {
  SEDD_REQUIRE_PYTHON("torch", "numpy", "h5py", "safetensors");
  TempDir tmp;
  const auto cfg = unusual_config();
  DDiT m(cfg);
  randomize(m, 12);
  save_model_file(tmp / "model.h5", cfg, state_dict(*m), {}, {});
  std::filesystem::create_directories(tmp / "hf");
  std::string hf = tmp / "hf/model.safetensors", back = tmp / "back.h5", out;
  ASSERT_EQ(run(converter() + "to-torch " + tmp / "model.h5" + " " + hf, &out), 0) << out;
  const auto good = read_json(tmp / "hf/config.json");
  auto with = [&](const char* field, int value) {
    auto j = good;
    j[field] = value;
    std::ofstream(tmp / "hf/config.json") << j.dump(2);
  };
  with("hidden_size", 32);
  EXPECT_NE(run(converter() + "to-h5 " + hf + " " + back, &out), 0);
  EXPECT_NE(out.find(tmp / "hf/config.json: hidden_size is 32 but the weights in " + hf + " have 16"), std::string::npos)
      << out;
  EXPECT_FALSE(std::filesystem::exists(back));
  with("n_blocks", 3);
  EXPECT_NE(run(converter() + "to-h5 " + hf + " " + back, &out), 0);
  EXPECT_NE(out.find("config.json: n_blocks is 3"), std::string::npos) << out;
  with("vocab_size", 99);
  EXPECT_NE(run(converter() + "to-h5 " + hf + " " + back, &out), 0);
  EXPECT_NE(out.find("config.json: vocab_size is 99 but the weights in " + hf + " have 12"), std::string::npos) << out;
  EXPECT_FALSE(std::filesystem::exists(back));
  std::filesystem::path leftovers = tmp.path;
  for (const auto& e : std::filesystem::directory_iterator(leftovers))
    EXPECT_NE(e.path().filename().string().rfind(".back.h5", 0), 0u) << "temporary file left: " << e.path();

  with("n_heads", 4);  // the good config again
  // The head count is fixed by the rotary buffer (head dim = 2 x its length): a flag cannot change it.
  EXPECT_NE(run(converter() + "to-h5 " + hf + " " + back + " --n-heads 2", &out), 0);
  EXPECT_NE(out.find("--n-heads: n_heads is 2 but the weights in " + hf + " have 4"), std::string::npos) << out;
  ASSERT_EQ(run(converter() + "to-h5 " + hf + " " + back + " --dropout 0.25 --length 64 --time-conditioning 1", &out), 0)
      << out;
  DDiT b = load_model_file(back, false);
  EXPECT_EQ(b->cfg.dropout, 0.25);
  EXPECT_EQ(b->cfg.length, 64);
  EXPECT_TRUE(b->cfg.time_conditioning);
  EXPECT_EQ(b->cfg.n_heads, 4);  // from the config
  EXPECT_EQ(b->cfg.noise.sigma_max, 17.5);
}

// The official training run: checkpoints-meta/checkpoint.pth ({'model', 'ema', 'step'}, DDP names)
// and its Hydra config .hydra/config.yaml, which --config names.
TEST(ModelInteropConfig, HydraConfigOfATrainingRunIsRead) {
  SEDD_REQUIRE_PYTHON("torch", "numpy", "h5py", "safetensors");
  TempDir tmp;
  auto cfg = tiny_config();  // 2x16, 2 heads, cond 8, 11 tokens, L=6
  DDiT m(cfg);
  randomize(m, 13);
  save_model_file(tmp / "model.h5", cfg, state_dict(*m), {}, {});
  std::filesystem::create_directories(tmp / "run/.hydra");
  std::filesystem::create_directories(tmp / "run/checkpoints-meta");
  std::string out;
  // EMA as SEDD keeps it: shadow copies of the parameters, in order (here: the weights + 1).
  ASSERT_EQ(run(fmt::format("{} -c \"import h5py, torch\n"
                            "sd = {{k: torch.from_numpy(v[()]) for k, v in h5py.File('{}', 'r')['model'].items()}}\n"
                            "shadow = [v + 1 for k, v in sd.items() if not k.endswith('inv_freq')]\n"
                            "torch.save({{'model': {{'module.' + k: v for k, v in sd.items()}}, 'step': 5,\n"
                            "            'ema': {{'decay': 0.9999, 'num_updates': 5, 'shadow_params': shadow}}}},\n"
                            "           '{}')\"",
                            python(), tmp / "model.h5", tmp / "run/checkpoints-meta/checkpoint.pth"),
                &out),
            0)
      << out;
  // As Hydra saves it; YAML 1.1 reads 1e-4 as a string.
  const std::string yaml = R"(ngpus: 8
tokens: 11
training:
  batch_size: 512
  ema: 0.9999
data:
  train: openwebtext
  valid: wikitext103
graph:
  type: absorb
  file: data
  report_all: false
noise:
  type: geometric
  sigma_min: 1e-4
  sigma_max: 20
sampling:
  predictor: euler
  steps: 128
model:
  name: small
  type: ddit
  hidden_size: 16
  cond_dim: 8
  length: 6
  n_blocks: 2
  n_heads: 2
  scale_by_sigma: True
  dropout: 0.1
)";
  std::ofstream(tmp / "run/.hydra/config.yaml") << yaml;
  std::string ckpt = tmp / "run/checkpoints-meta/checkpoint.pth", h5 = tmp / "converted.h5";
  ASSERT_EQ(run(converter() + "to-h5 " + ckpt + " " + h5 + " --config " + tmp / "run/.hydra/config.yaml", &out), 0)
      << out;
  ModelFileInfo info;
  DDiT b = load_model_file(h5, false, &info);
  EXPECT_EQ(b->cfg.n_heads, 2);
  EXPECT_EQ(b->cfg.dropout, 0.1);
  EXPECT_EQ(b->cfg.length, 6);
  EXPECT_TRUE(b->cfg.scale_by_sigma);
  EXPECT_EQ(b->cfg.graph, "absorb");
  EXPECT_EQ(b->cfg.noise.kind, "geometric");
  EXPECT_EQ(b->cfg.noise.sigma_min, 1e-4);
  EXPECT_EQ(b->cfg.noise.sigma_max, 20.0);
  EXPECT_EQ(info.step, 5);
  EXPECT_TRUE(info.has_ema);
  expect_same_weights(m, b);
  DDiT e = load_model_file(h5, /*use_ema=*/true);
  EXPECT_TRUE(torch::equal(state_dict(*e).at("vocab_embed.embedding"), state_dict(*m).at("vocab_embed.embedding") + 1));

  // A run whose config describes other weights.
  std::string wrong = yaml;
  wrong.replace(wrong.find("n_blocks: 2"), 11, "n_blocks: 3");
  std::ofstream(tmp / "run/.hydra/config.yaml") << wrong;
  EXPECT_NE(run(converter() + "to-h5 " + ckpt + " " + tmp / "x.h5" + " --config " + tmp / "run/.hydra/config.yaml", &out),
            0);
  EXPECT_NE(out.find("config.yaml: n_blocks is 3 but the weights in " + ckpt + " have 2"), std::string::npos) << out;
}

// CUDA: bf16 autocast in the blocks, LayerNorm and the log-score in fp32. Skips without a GPU.
TEST(ModelGpu, Bf16AutocastStaysCloseToFp32) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  auto cfg = tiny_config();
  cfg.hidden_size = 64;
  cfg.n_heads = 4;
  DDiT m(cfg);
  randomize(m, 8);
  m->to(torch::kCUDA);
  m->eval();
  auto x = torch::randint(cfg.vocab_dim(), {4, 32}, torch::kLong).to(torch::kCUDA);
  auto sigma = torch::rand({4}).to(torch::kCUDA) + 0.1;
  torch::NoGradGuard ng;
  auto ref = m->forward(x, sigma);
  m->bf16 = true;
  auto low = m->forward(x, sigma);
  EXPECT_EQ(low.scalar_type(), torch::kFloat);
  double rel = ((low - ref).abs().max() / ref.abs().max()).item<double>();
  std::cout << "bf16 vs fp32 on GPU: max error " << rel << " of the largest log-score\n";
  EXPECT_LT(rel, 5e-2);
  EXPECT_GT(rel, 0.0) << "autocast did not engage";
}

// The bf16 autocast guard of the forward restores the caller's autocast state and dtype.
TEST(ModelGpu, Bf16ForwardRestoresTheCallersAutocastDtype) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  auto cfg = tiny_config();
  DDiT m(cfg);
  m->to(torch::kCUDA);
  m->eval();
  m->bf16 = true;
  const auto dtype = at::autocast::get_autocast_dtype(at::kCUDA);
  const bool enabled = at::autocast::is_autocast_enabled(at::kCUDA);
  at::autocast::set_autocast_dtype(at::kCUDA, at::kHalf);
  torch::NoGradGuard ng;
  m->forward(torch::randint(cfg.vocab_dim(), {2, 16}, torch::kLong).to(torch::kCUDA), torch::rand({2}).to(torch::kCUDA));
  EXPECT_EQ(at::autocast::get_autocast_dtype(at::kCUDA), at::kHalf);
  EXPECT_EQ(at::autocast::is_autocast_enabled(at::kCUDA), enabled);
  at::autocast::set_autocast_dtype(at::kCUDA, dtype);
}
