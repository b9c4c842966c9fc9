// Evaluating a model on datasets; see evaluate.h.
#include "eval/evaluate.h"

#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <tuple>

#include "data/tokenizer.h"
#include "io/error.h"
#include "objectives/objective.h"

namespace sedd {

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
          {"tokenizer_check", s.tokenizer_check},
          {"protocol", s.protocol},
          {"protocol_description", s.protocol_description},
          {"documents", s.documents}};
}

void EvalOptions::validate() const {
  elbo.validate();
  SEDD_CHECK_OPTION(batch_size > 0, "--batch-size must be positive, got {}", batch_size);
  SEDD_CHECK_OPTION(max_sequences >= 0, "--max-sequences must be >= 0 (0: every window), got {}", max_sequences);
  protocol.validate();
}


EvalSummary evaluate_dataset(ScoreModel& model, const ModelConfig& cfg, const std::string& name,
                             const std::string& data, const EvalOptions& o, torch::Device device,
                             ControlPlane& control, const std::function<void(int64_t, int64_t)>& progress) {
  o.validate();
  const int W = control.size(), r = control.rank();
  StoredDataset dataset(data);
  const ShardInfo& info = dataset.info();
  SEDD_CHECK_INPUT(info.vocab_size == cfg.tokens, "{}: the data has vocab_size {}, the model {} tokens", data,
                   info.vocab_size, cfg.tokens);
  // The same tokenizer as the model's, when both say which; otherwise the summary says it was not checked.
  const TokenizerMatch match = compare_tokenizers(o.model_tokenizer, info.tokenizer);
  SEDD_CHECK_INPUT(match != TokenizerMatch::Different,
                   "{}: the data was tokenized with another tokenizer than the model ({} vs {}); prepare the held-out "
                   "set with the model's tokenizer.json",
                   data, describe_tokenizer(info.tokenizer),
                   o.model_tokenizer == "byte" ? "byte" : "another tokenizer.json");
  std::string tokenizer_check = "same";
  if (match == TokenizerMatch::Unknown)
    tokenizer_check = fmt::format("skipped: the model's tokenizer is {}, the data's {}; make sure the data was "
                                  "prepared with the model's tokenizer",
                                  describe_tokenizer(o.model_tokenizer), describe_tokenizer(info.tokenizer));
  const bool packed = o.protocol.name == "packed";
  const ProtocolIds ids =
      protocol_ids(info.tokenizer, info.eot_id, cfg.vocab_dim() > cfg.tokens ? cfg.tokens : -1, cfg.causal());
  WindowPlan plan;  // packed needs the shards' lengths only; the others find the documents
  try {
    plan = plan_windows(packed ? dataset.shard_layout() : dataset.documents(), o.protocol, ids, cfg.length,
                        [&](int64_t at) { return dataset.token_at(at); });
  } catch (const InputError& e) {
    throw InputError(fmt::format("{} ({}): {}", name, data, e.what()));
  }
  SEDD_CHECK_INPUT(!plan.windows.empty(), "{} ({}), --protocol {}: {}", name, data, o.protocol.name,
                   plan.no_window_reason);
  int64_t n = static_cast<int64_t>(plan.windows.size());
  if (o.max_sequences > 0) n = std::min(n, o.max_sequences);
  const bool padded = o.protocol.name == "mdlm-pad";
  auto graph = make_graph(cfg.graph, cfg.tokens);
  auto noise = make_noise(cfg.noise);
  auto start = std::chrono::steady_clock::now();
  // bound, MC variance, windows, sum bound^2, sum bound*scored, sum scored^2, scored tokens
  std::vector<double> sums(7, 0.0);
  const int64_t stride = o.batch_size * W, L = cfg.length;
  const int64_t unscored = objective_of(cfg).unscored_positions(cfg);
  const StoredReader read = [&](int64_t b, int64_t c, int64_t* out) { dataset.read(b, c, out); };
  for (int64_t first = 0; first < n; first += stride) {
    const int64_t row0 = first + r * o.batch_size, rows = std::clamp<int64_t>(n - row0, 0, o.batch_size);
    if (rows > 0) {
      auto x0 = torch::empty({rows, L}, torch::kLong);
      auto scored = torch::empty({rows, L}, torch::kUInt8);
      for (int64_t i = 0; i < rows; ++i)
        fill_window(plan, row0 + i, read, x0[i].data_ptr<int64_t>(), scored[i].data_ptr<uint8_t>());
      // Positions the objective's bound never scores (bd3's position 0) do not count as tokens.
      scored.narrow(1, 0, unscored).zero_();
      auto res = elbo_batch(*graph, *noise, model, x0, row0, o.elbo, device,
                            padded ? scored.to(torch::kBool) : torch::Tensor());
      auto counts = scored.sum(1).to(torch::kDouble);
      sums[0] += res.bound.sum().item<double>();
      sums[1] += res.mc_variance.sum().item<double>();
      sums[2] += static_cast<double>(rows);
      sums[3] += res.bound.square().sum().item<double>();
      sums[4] += (res.bound * counts).sum().item<double>();
      sums[5] += counts.square().sum().item<double>();
      sums[6] += counts.sum().item<double>();
    }
    if (progress && r == 0) progress(std::min(n, first + stride), n);
  }
  auto total = control.sum(sums, "evaluation sums");
  EvalSummary s;
  s.name = name;
  s.data = data;
  s.sequences = static_cast<int64_t>(total[2]);
  s.tokens = static_cast<int64_t>(total[6]);
  s.documents = packed ? -1 : plan.documents;
  s.protocol = o.protocol.name;
  s.protocol_description = describe_protocol(o.protocol);
  SEDD_CHECK_INPUT(s.tokens > 0, "{} ({}): no scored token in {} windows", name, data, s.sequences);
  const double tokens = total[6], windows = total[2], ratio = total[0] / tokens;
  s.nats_per_token = ratio;
  s.stderr_mc = std::sqrt(total[1]) / tokens;
  // The ratio estimator's standard error over windows: sum_k (b_k - R s_k)^2 with R = sum b / sum s
  // (with equal window lengths: the standard error of the per-window nats/token).
  const double residual = std::max(0.0, total[3] - 2 * ratio * total[4] + ratio * ratio * total[5]);
  s.stderr_data = windows > 1 ? std::sqrt(residual * windows / (windows - 1)) / tokens : 0.0;
  const Objective& objective = objective_of(o.elbo.model);
  s.prior_nats_per_token = objective.prior_nats_per_token(Process{*graph, *noise, o.elbo.model});
  s.exact = objective.exact(o.elbo.model);
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

std::vector<SuiteDataset> read_dataset_suite(const std::string& path) {
  std::ifstream in(path);
  SEDD_CHECK_INPUT(in.good(), "{}: cannot read the suite file", path);
  std::vector<SuiteDataset> out;
  int line_no = 0;
  for (std::string line; std::getline(in, line);) {
    ++line_no;
    auto hash = line.find('#');
    if (hash != std::string::npos) line.erase(hash);
    std::stringstream ss(line);
    std::vector<std::string> fields;
    for (std::string f; ss >> f;) fields.push_back(f);
    if (fields.empty()) continue;
    const bool joined = fields[0].find('=') != std::string::npos && fields[0].find('=') > 0;
    const size_t named = joined ? 1 : 2;  // fields before the optional protocol
    SEDD_CHECK_INPUT(fields.size() >= named && fields.size() <= named + 1,
                     "{}:{}: expected 'NAME GLOB [PROTOCOL]' or 'NAME=GLOB [PROTOCOL]'", path, line_no);
    SuiteDataset d;
    if (joined) std::tie(d.name, d.glob) = parse_named_dataset(fields[0]);
    else d.name = fields[0], d.glob = fields[1];
    if (fields.size() > named) {
      d.protocol = fields[named];
      ProtocolOptions p;
      p.name = d.protocol;
      try {
        p.validate();
      } catch (const OptionError& e) {
        fail_input("{}:{}: {}", path, line_no, e.what());
      }
    }
    out.push_back(d);
  }
  SEDD_CHECK_INPUT(!out.empty(), "{}: the suite names no dataset", path);
  return out;
}

}  // namespace sedd
