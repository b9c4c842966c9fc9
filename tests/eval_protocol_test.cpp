// Evaluation protocols (src/eval/protocol.h): the windows of every protocol equal, token for token,
// the ones the authors' pipelines build (tests/data/protocol_reference.h5, written by SEDD's
// data.get_dataset and MDLM's dataloader.get_dataset; see tests/data/README.md) from the same
// documents; the likelihood bound honours the loss mask of padded windows for every objective; and
// sedd-eval on prepared shards reports the reference's window and token counts.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>

#include "data/shard.h"
#include "data/tokenizer.h"
#include "eval/elbo.h"
#include "eval/protocol.h"
#include "io/error.h"
#include "io/fs.h"
#include "io/hdf5.h"
#include "model/ddit.h"
#include "objectives/score.h"
#include "model/weights.h"
#include "test_util.h"

using namespace sedd;
using namespace sedd::test;

namespace {

std::string protocol_fixture(const std::string& file) { return source_dir() + "/tests/data/" + file; }

// The fixture documents as sedd-prepare stores them: our tokenizer's ids, then the end-of-text id.
struct ProtocolFixture {
  std::unique_ptr<Tokenizer> tok = make_tokenizer(protocol_fixture("protocol_tokenizer.json"));
  std::vector<std::vector<int64_t>> stored;
  std::vector<int64_t> flat;
  ProtocolFixture() {
    for (const auto& j : read_jsonl(protocol_fixture("protocol_documents.jsonl"))) {
      auto ids = tok->encode(j["text"].get<std::string>());
      ids.push_back(tok->eot_id());
      flat.insert(flat.end(), ids.begin(), ids.end());
      stored.push_back(std::move(ids));
    }
  }
  StoredReader reader() const {
    return [this](int64_t b, int64_t c, int64_t* out) { std::copy(flat.begin() + b, flat.begin() + b + c, out); };
  }
  std::function<int64_t(int64_t)> token_at() const {
    return [this](int64_t at) { return flat.at(at); };
  }
};

// "sedd/L30_procs2" -> protocol sedd, L 30, procs 2 (mdlm-pad groups have no procs).
struct ReferenceCase {
  std::string group, protocol;
  int64_t length = 0, procs = 1;
};

std::vector<ReferenceCase> reference_cases(const h5::File& f) {
  std::vector<ReferenceCase> out;
  for (const auto& protocol : f.children("/"))
    for (const auto& child : f.children("/" + protocol)) {
      ReferenceCase c{"/" + protocol + "/" + child, protocol};
      auto at = child.find("_procs");
      c.length = std::stoll(child.substr(1, at == std::string::npos ? std::string::npos : at - 1));
      if (at != std::string::npos) c.procs = std::stoll(child.substr(at + 6));
      out.push_back(c);
    }
  return out;
}

DDiT random_protocol_model(const std::string& objective, const std::string& graph, int64_t tokens, int64_t length) {
  ModelConfig cfg;
  cfg.tokens = tokens;
  cfg.hidden_size = 32;
  cfg.n_heads = 2;
  cfg.n_blocks = 1;
  cfg.cond_dim = 16;
  cfg.length = length;
  cfg.graph = graph;
  cfg.objective = objective;
  if (objective == "ar") {
    cfg.time_conditioning = false;
    cfg.scale_by_sigma = false;
    cfg.bos = 0;
  }
  cfg.scale_by_sigma = objective == "sedd" && graph == "absorb";
  cfg.validate();
  torch::manual_seed(3);
  DDiT m(cfg);
  torch::NoGradGuard ng;
  for (auto& t : m->parameters()) t.normal_(0, 0.3);
  m->eval();
  return m;
}

}  // namespace

// Every reference case: the same number of windows and every token equal; the scored positions
// equal MDLM's attention_mask.
TEST(EvalProtocolReference, WindowsEqualTheAuthorsPipelinesTokenForToken) {
  ProtocolFixture fx;
  h5::File f(protocol_fixture("protocol_reference.h5"), h5::Mode::Read);
  ASSERT_GT(fx.stored.size(), 1000u);  // more than one map batch
  // MDLM's ids: <|endoftext|> as BOS and EOS, [PAD] the new id after the vocabulary (its mask id).
  const ProtocolIds ids = protocol_ids(fx.tok->serialize(), fx.tok->eot_id(), fx.tok->vocab_size(), false);
  EXPECT_EQ(ids.pad, f.attr_int("/", "pad_id"));
  EXPECT_EQ(ids.eot, f.attr_int("/", "eos_id"));
  EXPECT_EQ(ids.bos < 0 ? ids.eot : ids.bos, f.attr_int("/", "bos_id"));
  const auto docs = index_documents(fx.stored);
  auto cases = reference_cases(f);
  ASSERT_EQ(cases.size(), 15u);
  std::map<std::string, std::pair<int64_t, int64_t>> equal;  // protocol -> windows equal, windows
  bool some_batch_without_window = false;
  for (const auto& c : cases) {
    SCOPED_TRACE(c.group);
    ProtocolOptions p;
    p.name = c.protocol;
    p.procs = c.procs;
    p.batch_docs = f.attr_int("/", "batch_docs");
    auto plan = plan_windows(docs, p, ids, c.length, fx.token_at());
    const int64_t n = f.attr_int(c.group, "windows");
    ASSERT_EQ(static_cast<int64_t>(plan.windows.size()), n);
    ASSERT_GT(n, 0);
    auto want = f.read(c.group + "/input_ids", torch::kLong);
    torch::Tensor mask = f.exists(c.group + "/attention_mask") ? f.read(c.group + "/attention_mask", torch::kLong)
                                                               : torch::ones_like(want);
    std::vector<int64_t> tokens(c.length);
    std::vector<uint8_t> scored(c.length);
    int64_t same = 0, scored_total = 0;
    for (int64_t k = 0; k < n; ++k) {
      fill_window(plan, k, fx.reader(), tokens.data(), scored.data());
      bool ok = true;
      for (int64_t l = 0; l < c.length; ++l)
        ok = ok && tokens[l] == want[k][l].item<int64_t>() && scored[l] == mask[k][l].item<int64_t>();
      same += ok;
      if (!ok && same + 1 == k + 1) ADD_FAILURE() << "first differing window " << k;
      EXPECT_EQ(plan.scored(k), mask[k].sum().item<int64_t>());
      scored_total += plan.scored(k);
    }
    EXPECT_EQ(same, n);
    EXPECT_EQ(plan.scored_tokens, scored_total);
    equal[c.protocol].first += same;
    equal[c.protocol].second += n;
    // The 1-process L = 1024 cases: the last map batch (30 documents) is shorter than a window.
    if (c.length == 1024 && c.procs == 1) {
      const int64_t chunk = c.protocol == "sedd" ? 1024 : 1022;
      EXPECT_LT(docs.tokens() - (docs.doc_ends[999]), chunk);
      some_batch_without_window = true;
    }
  }
  EXPECT_TRUE(some_batch_without_window);
  for (const auto& [protocol, counts] : equal)
    std::printf("[protocol] %s: windows equal %lld of %lld\n", protocol.c_str(), static_cast<long long>(counts.first),
                static_cast<long long>(counts.second));
}

// WordPiece-style documents ([CLS] text [SEP]), worked by hand: MDLM drops the stored [CLS] and adds
// its own BOS ([CLS]) per window; a document without its [CLS] is refused by name.
TEST(EvalProtocol, WordPieceDocumentsByHand) {
  const int64_t cls = 5, sep = 9, pad = 0;
  std::vector<std::vector<int64_t>> stored = {{cls, 1, 2, sep}, {cls, sep}, {cls, 3, 4, 6, 7, sep}};
  std::vector<int64_t> flat;
  for (const auto& d : stored) flat.insert(flat.end(), d.begin(), d.end());
  auto read = [&](int64_t b, int64_t c, int64_t* out) { std::copy(flat.begin() + b, flat.begin() + b + c, out); };
  auto at = [&](int64_t i) { return flat.at(i); };
  const ProtocolIds ids{sep, cls, pad};
  auto windows = [&](const std::string& name, int64_t L, int64_t procs, const std::vector<std::vector<int64_t>>& docs) {
    ProtocolOptions p;
    p.name = name;
    p.procs = procs;
    p.batch_docs = 2;
    auto plan = plan_windows(index_documents(docs), p, ids, L, at);
    std::vector<std::vector<int64_t>> out;
    for (size_t k = 0; k < plan.windows.size(); ++k) {
      std::vector<int64_t> t(L);
      std::vector<uint8_t> s(L);
      fill_window(plan, k, read, t.data(), s.data());
      for (int64_t l = 0; l < L; ++l) t[l] = s[l] ? t[l] : -t[l] - 1;  // unscored: negative
      out.push_back(t);
    }
    return out;
  };
  // mdlm-wrap, L 5 (chunks of 3), batches of 2 documents: [1 2 sep sep] -> one chunk, remainder
  // dropped; [3 4 6 7 sep] -> one chunk, remainder dropped.
  using W = std::vector<std::vector<int64_t>>;
  EXPECT_EQ(windows("mdlm-wrap", 5, 1, stored), (W{{cls, 1, 2, sep, sep}, {cls, 3, 4, 6, sep}}));
  // mdlm-pad, L 4: [CLS] text[:2] [SEP], then padding (-1: pad id 0, unscored).
  EXPECT_EQ(windows("mdlm-pad", 4, 1, stored), (W{{cls, 1, 2, sep}, {cls, sep, -1, -1}, {cls, 3, 4, sep}}));
  // sedd keeps the stored documents as they are; 2 processes: parts of 2 and 1 documents.
  EXPECT_EQ(windows("sedd", 3, 2, stored), (W{{cls, 1, 2}, {sep, cls, sep}, {cls, 3, 4}, {6, 7, sep}}));
  EXPECT_EQ(windows("packed", 4, 1, stored), (W{{cls, 1, 2, sep}, {cls, sep, cls, 3}, {4, 6, 7, sep}}));
  flat[4] = 8;  // the second document loses its [CLS]
  auto msg = error_of([&] { windows("mdlm-wrap", 5, 1, stored); });
  EXPECT_NE(msg.find("document 1 (stored tokens 4..6) does not start with the tokenizer's [CLS] id 5"),
            std::string::npos)
      << msg;
}

// No window: the reason names the documents, tokens and the window length; bad options are refused.
TEST(EvalProtocol, NoWindowSaysWhyAndBadOptionsAreRefused) {
  std::vector<std::vector<int64_t>> stored = {{1, 2, 0}, {0}, {3, 0}};
  const ProtocolIds ids{0, -1, 7};
  ProtocolOptions p;
  p.name = "sedd";
  auto plan = plan_windows(index_documents(stored), p, ids, 1024);
  EXPECT_TRUE(plan.windows.empty());
  EXPECT_NE(plan.no_window_reason.find("3 documents, 6 tokens in 3 map batch(es)"), std::string::npos)
      << plan.no_window_reason;
  EXPECT_NE(plan.no_window_reason.find("shorter than one window's 1024 tokens"), std::string::npos);
  p.name = "mdlm-pad";
  EXPECT_EQ(plan_windows(index_documents(stored), p, ids, 8).windows.size(), 3u);  // one per document, even empty
  EXPECT_NE(error_of([&] { plan_windows(index_documents(stored), p, ProtocolIds{0, -1, -1}, 8); })
                .find("needs a pad id"),
            std::string::npos);
  p.name = "mdlm-wrap";
  StoredDocuments trailing;  // one document, then a token without its end-of-text id
  trailing.doc_ends = {2};
  trailing.shard_ends = {3};
  EXPECT_NE(error_of([&] { plan_windows(trailing, p, ids, 8); }).find("do not end with the end-of-text id (1 tokens"),
            std::string::npos);
  p.name = "sedd-pad";
  EXPECT_NE(error_of([&] { p.validate(); }).find("--protocol must be one of packed | sedd | mdlm-wrap | mdlm-pad"),
            std::string::npos);
  p.name = "sedd";
  p.procs = 0;
  EXPECT_NE(error_of([&] { p.validate(); }).find("--protocol-procs"), std::string::npos);
}

// The loss mask, for every objective: the bound is additive over disjoint masks with the same draws
// (bound(m) + bound(not m) = bound(all) = bound without a mask), and an empty mask scores nothing:
// the unscored positions are still corrupted and fed (the scored ones see the same inputs).
TEST(EvalProtocolElbo, LossMaskIsHonouredByEveryObjective) {
  const int64_t V = 12, L = 10, B = 3;
  torch::manual_seed(5);
  auto x0 = torch::randint(0, V, {B, L}, torch::kLong);
  auto mask = torch::rand({B, L}) < 0.6;
  mask[0].fill_(true);
  for (auto [objective, graph] : std::vector<std::pair<std::string, std::string>>{
           {"sedd", "absorb"}, {"sedd", "uniform"}, {"mdlm", "absorb"}, {"d3pm", "absorb"}, {"ar", "absorb"}}) {
    SCOPED_TRACE(objective + "-" + graph);
    DDiT m = random_protocol_model(objective, graph, V, L);
    DDiTScore score(m, false);
    auto g = make_graph(m->cfg.graph, V);
    auto noise = make_noise(m->cfg.noise);
    ElboConfig ec{8, "antithetic", 7};
    ec.model = m->cfg;
    auto bound = [&](const torch::Tensor& mk) { return elbo_batch(*g, *noise, score, x0, 0, ec, torch::kCPU, mk).bound; };
    auto plain = elbo_batch(*g, *noise, score, x0, 0, ec, torch::kCPU).bound;
    auto all = bound(torch::ones_like(mask)), part = bound(mask), rest = bound(mask.logical_not());
    // Equal up to the float32 network's rounding on other sets of rows.
    EXPECT_TRUE(torch::allclose(all, plain, 1e-6, 1e-9)) << all << plain;
    EXPECT_TRUE(torch::allclose(part + rest, all, 1e-6, 1e-9)) << part + rest << all;
    EXPECT_TRUE(torch::allclose(bound(torch::zeros_like(mask)), torch::zeros({B}, torch::kDouble)));
    EXPECT_GT(rest.sum().item<double>(), 0.0);
  }
}

// sedd-prepare -> shards -> sedd-eval --protocol ...: the windows and scored tokens equal the
// reference's; mdlm-pad's nats/token of an autoregressive model equals its exact likelihood of the
// reference windows' non-pad tokens, computed here on each window cut to its scored tokens; a suite
// line's protocol overrides --protocol; a dataset without a window exits 2 saying why.
TEST(EvalProtocolCli, PreparedShardsGiveTheReferenceCounts) {
  TempDir tmp;
  std::string out;
  ASSERT_EQ(run(fmt::format("cd {} && {}/sedd-prepare --input {} --jsonl-field text --tokenizer {} --out shards",
                            tmp.path, bin_dir(), protocol_fixture("protocol_documents.jsonl"),
                            protocol_fixture("protocol_tokenizer.json")),
                &out),
            0)
      << out;
  const std::string shards = tmp / "shards/shard-*.h5";
  auto tok = make_tokenizer(protocol_fixture("protocol_tokenizer.json"));
  const int64_t L = 8, V = tok->vocab_size();
  ModelFileInfo info;
  info.tokenizer = tok->serialize();
  DDiT mdlm = random_protocol_model("mdlm", "absorb", V, L), ar = random_protocol_model("ar", "absorb", V, L);
  save_model_file(tmp / "mdlm.h5", mdlm->cfg, state_dict(*mdlm), {}, info);
  save_model_file(tmp / "ar.h5", ar->cfg, state_dict(*ar), {}, info);
  h5::File ref(protocol_fixture("protocol_reference.h5"), h5::Mode::Read);
  auto eval = [&](const std::string& model, const std::string& args, const std::string& json) {
    return run(fmt::format("{} -np 2 {}/sedd-eval --checkpoint {} --device cpu --mc-samples 2 --batch-size 128 {} "
                           "--json {}",
                           kMpirun, bin_dir(), tmp / model, args, tmp / json),
               &out);
  };
  std::ofstream(tmp / "suite.txt") << "s " << shards << " sedd\nw=" << shards << " mdlm-wrap\np " << shards
                                   << " mdlm-pad # padded\n";
  ASSERT_EQ(eval("mdlm.h5", "--suite " + (tmp / "suite.txt") + " --protocol packed --protocol-procs 2", "suite.json"), 0)
      << out;
  EXPECT_NE(out.find("protocol mdlm-pad (p); packing: MDLM's get_dataset(wrap=False)"), std::string::npos) << out;
  auto j = nlohmann::json::parse(fs::read_text(tmp / "suite.json"));
  const char* groups[] = {"/sedd/L8_procs2", "/mdlm-wrap/L8_procs2", "/mdlm-pad/L8"};
  const char* protocols[] = {"sedd", "mdlm-wrap", "mdlm-pad"};
  for (int i = 0; i < 3; ++i) {
    const auto& row = j["datasets"][i];
    SCOPED_TRACE(row.dump());
    const int64_t windows = ref.attr_int(groups[i], "windows");
    EXPECT_EQ(row["protocol"], protocols[i]);
    EXPECT_EQ(row["sequences"].get<int64_t>(), windows);
    const int64_t scored =
        i == 2 ? ref.read(std::string(groups[i]) + "/attention_mask", torch::kLong).sum().item<int64_t>() : windows * L;
    EXPECT_EQ(row["tokens"].get<int64_t>(), scored);
    EXPECT_EQ(row["documents"].get<int64_t>(), 1030);
    EXPECT_TRUE(std::isfinite(row["nats_per_token"].get<double>()));
  }
  // The autoregressive model on mdlm-pad: exact, against the reference windows cut to their scored tokens.
  ASSERT_EQ(eval("ar.h5", "--data " + shards + " --protocol mdlm-pad", "ar.json"), 0) << out;
  auto jar = nlohmann::json::parse(fs::read_text(tmp / "ar.json"));
  auto ids = ref.read("/mdlm-pad/L8/input_ids", torch::kLong), am = ref.read("/mdlm-pad/L8/attention_mask", torch::kLong);
  DDiTScore score(ar, false);
  auto g = make_graph(ar->cfg.graph, V);
  auto noise = make_noise(ar->cfg.noise);
  ElboConfig ec{2, "antithetic", 0};
  ec.model = test::objective_config("ar", 0, ar->cfg.bos);
  double nats = 0;
  int64_t count = 0;
  for (int64_t n = 2; n <= L; ++n) {  // the windows with n scored tokens, all at once
    auto rows = (am.sum(1) == n).nonzero().squeeze(1);
    if (rows.size(0) == 0) continue;
    auto x = ids.index_select(0, rows).narrow(1, 0, n).contiguous();
    nats += elbo_batch(*g, *noise, score, x, 0, ec, torch::kCPU).bound.sum().item<double>();
    count += rows.size(0) * n;
  }
  EXPECT_EQ(jar["tokens"].get<int64_t>(), count);
  EXPECT_NEAR(jar["nats_per_token"].get<double>(), nats / count, 1e-5 * nats / count);
  EXPECT_TRUE(jar["exact"].get<bool>());
  // No window: three short documents under sedd with windows of 8 tokens.
  write_shard(tmp / "tiny.h5", torch::tensor(std::vector<int64_t>{5, 0, 0, 6, 0}, torch::kLong), V, 0, tok->serialize());
  EXPECT_EQ(eval("mdlm.h5", "--data tiny=" + (tmp / "tiny.h5") + " --protocol sedd", "tiny.json"), 2) << out;
  EXPECT_NE(out.find("tiny (" + (tmp / "tiny.h5") + "), --protocol sedd: 3 documents, 5 tokens in 3 map batch(es)"),
            std::string::npos)
      << out;
  EXPECT_NE(out.find("no window"), std::string::npos) << out;
  EXPECT_FALSE(std::filesystem::exists(tmp / "tiny.json"));
}
