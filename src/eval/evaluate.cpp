// Evaluating a model on datasets; see evaluate.h.
#include "eval/evaluate.h"

#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "data/token_stream.h"
#include "data/tokenizer.h"
#include "io/error.h"

namespace sedd {

const char* const kPackingDescription =
    "documents concatenated with the end-of-text id after each, cut into windows of the model's length; windows "
    "cross document boundaries, end-of-text ids count as tokens, no BOS is added, each shard's partial last window "
    "is dropped";

double EvalSummary::bits_per_token() const { return nats_per_token / std::log(2.0); }
double EvalSummary::perplexity() const { return std::exp(nats_per_token); }
double EvalSummary::stderr_total() const { return std::hypot(stderr_mc, stderr_data); }

nlohmann::ordered_json to_json(const EvalSummary& s) {
  return {{"dataset", s.name},
          {"data", s.data},
          {"nats_per_token", s.nats_per_token},
          {"bits_per_token", s.bits_per_token()},
          {"perplexity", s.perplexity()},
          {"stderr_nats_per_token", s.stderr_mc},
          {"stderr_data_nats_per_token", s.stderr_data},
          {"stderr_total_nats_per_token", s.stderr_total()},
          {"exact", s.exact},
          {"tokens", s.tokens},
          {"sequences", s.sequences},
          {"prior_nats_per_token", s.prior_nats_per_token},
          {"seconds", s.seconds},
          {"tokenizer_check", s.tokenizer_check}};
}

void EvalOptions::validate() const {
  elbo.validate();
  SEDD_CHECK_OPTION(batch_size > 0, "--batch-size must be positive, got {}", batch_size);
  SEDD_CHECK_OPTION(max_sequences >= 0, "--max-sequences must be >= 0 (0: every window), got {}", max_sequences);
}

EvalSummary evaluate_dataset(ScoreModel& model, const ModelConfig& cfg, const std::string& name,
                             const std::string& data, const EvalOptions& o, torch::Device device,
                             ControlPlane& control, const std::function<void(int64_t, int64_t)>& progress) {
  o.validate();
  const int W = control.size(), r = control.rank();
  TokenStreamConfig tc;
  tc.data = data;
  tc.seq_len = cfg.length;
  tc.global_batch = o.batch_size * W;
  tc.rank = r;
  tc.world = W;
  tc.shuffle = false;
  TokenStream stream(tc);
  SEDD_CHECK_INPUT(stream.vocab_size() == cfg.tokens, "{}: the data has vocab_size {}, the model {} tokens", data,
                   stream.vocab_size(), cfg.tokens);
  // The same tokenizer as the model's, when both say which; otherwise the summary says it was not checked.
  const TokenizerMatch match = compare_tokenizers(o.model_tokenizer, stream.tokenizer());
  SEDD_CHECK_INPUT(match != TokenizerMatch::Different,
                   "{}: the data was tokenized with another tokenizer than the model ({} vs {}); prepare the held-out "
                   "set with the model's tokenizer.json",
                   data, describe_tokenizer(stream.tokenizer()),
                   o.model_tokenizer == "byte" ? "byte" : "another tokenizer.json");
  std::string tokenizer_check = "same";
  if (match == TokenizerMatch::Unknown)
    tokenizer_check = fmt::format("skipped: the model's tokenizer is {}, the data's {}; make sure the data was "
                                  "prepared with the model's tokenizer",
                                  describe_tokenizer(o.model_tokenizer), describe_tokenizer(stream.tokenizer()));
  int64_t n = stream.windows_per_epoch();
  if (o.max_sequences > 0) n = std::min(n, o.max_sequences);
  auto graph = make_graph(cfg.graph, cfg.tokens);
  auto noise = make_noise(cfg.noise);
  auto start = std::chrono::steady_clock::now();
  double sums[5] = {0, 0, 0, 0, 0};  // bound, MC variance, sequences, sum of squared per-token bounds, prior
  const int64_t stride = o.batch_size * W;
  for (int64_t first = 0; first < n; first += stride) {
    auto x0 = stream.next();
    const int64_t row0 = first + r * o.batch_size, rows = std::clamp<int64_t>(n - row0, 0, o.batch_size);
    if (rows > 0) {
      auto res = elbo_batch(*graph, *noise, model, x0.narrow(0, 0, rows), row0, o.elbo, device);
      auto per_token = res.bound / static_cast<double>(cfg.length);
      sums[0] += res.bound.sum().item<double>();
      sums[1] += res.mc_variance.sum().item<double>();
      sums[2] += static_cast<double>(rows);
      sums[3] += per_token.square().sum().item<double>();
      sums[4] = res.prior_nats;
    }
    if (progress && r == 0) progress(std::min(n, first + stride), n);
  }
  auto total = control.sum(std::vector<double>(sums, sums + 4), "evaluation sums");
  EvalSummary s;
  s.name = name;
  s.data = data;
  s.sequences = static_cast<int64_t>(total[2]);
  s.tokens = s.sequences * cfg.length;
  SEDD_CHECK_INPUT(s.sequences > 0, "{}: no window of {} tokens to evaluate", data, cfg.length);
  const double tokens = static_cast<double>(s.tokens);
  s.nats_per_token = total[0] / tokens;
  s.stderr_mc = std::sqrt(total[1]) / tokens;
  const double mean = total[0] / tokens, m2 = total[3] / total[2];  // per-sequence nats/token moments
  s.stderr_data = total[2] > 1 ? std::sqrt(std::max(0.0, m2 - mean * mean) / (total[2] - 1)) : 0.0;
  s.prior_nats_per_token = control.max(sums[4], "prior") / static_cast<double>(cfg.length);
  s.exact = o.elbo.objective.name == "ar";
  s.tokenizer_check = tokenizer_check;
  s.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return s;
}

std::pair<std::string, std::string> parse_named_dataset(const std::string& spec) {
  auto eq = spec.find('=');
  if (eq != std::string::npos && eq > 0) return {spec.substr(0, eq), spec.substr(eq + 1)};
  auto parent = std::filesystem::path(spec).parent_path().filename().string();
  return {parent.empty() ? spec : parent, spec};
}

std::vector<std::pair<std::string, std::string>> read_dataset_suite(const std::string& path) {
  std::ifstream in(path);
  SEDD_CHECK_INPUT(in.good(), "{}: cannot read the suite file", path);
  std::vector<std::pair<std::string, std::string>> out;
  int line_no = 0;
  for (std::string line; std::getline(in, line);) {
    ++line_no;
    auto hash = line.find('#');
    if (hash != std::string::npos) line.erase(hash);
    std::stringstream ss(line);
    std::string a, b, rest;
    ss >> a >> b >> rest;
    if (a.empty()) continue;
    SEDD_CHECK_INPUT(rest.empty(), "{}:{}: expected 'NAME GLOB' or 'NAME=GLOB'", path, line_no);
    if (b.empty()) {
      SEDD_CHECK_INPUT(a.find('=') != std::string::npos, "{}:{}: expected 'NAME GLOB' or 'NAME=GLOB'", path, line_no);
      out.push_back(parse_named_dataset(a));
    } else {
      out.push_back({a, b});
    }
  }
  SEDD_CHECK_INPUT(!out.empty(), "{}: the suite names no dataset", path);
  return out;
}

}  // namespace sedd
