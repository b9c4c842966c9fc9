// Conditional likelihood of (context, continuation) pairs; see conditional.h.
#include "eval/conditional.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <numeric>

#include "data/tokenizer.h"
#include "io/error.h"
#include "objectives/objective.h"

namespace sedd {

namespace {

// The ids of `field_ids` or the encoded text of `field` (neither: empty). Throws the reason.
std::vector<int64_t> score_request_tokens(const nlohmann::json& j, const std::string& field, const Tokenizer* tokenizer,
                                    int64_t vocab) {
  const std::string ids_field = field + "_ids";
  const bool has_text = j.contains(field), has_ids = j.contains(ids_field);
  SEDD_CHECK_INPUT(!(has_text && has_ids), "give \"{}\" or \"{}\", not both", field, ids_field);
  std::vector<int64_t> ids;
  if (has_ids) {
    SEDD_CHECK_INPUT(j[ids_field].is_array(), "\"{}\" must be an array of token ids", ids_field);
    for (const auto& v : j[ids_field]) {
      SEDD_CHECK_INPUT(v.is_number_integer(), "\"{}\" must be an array of integer token ids", ids_field);
      ids.push_back(v.get<int64_t>());
    }
  } else if (has_text) {
    SEDD_CHECK_INPUT(j[field].is_string(), "\"{}\" must be a string", field);
    SEDD_CHECK_INPUT(tokenizer != nullptr, "\"{}\" is text but the checkpoint stores no tokenizer; give \"{}\"", field,
                     ids_field);
    const std::string text = j[field].get<std::string>();
    check_utf8(text, "\"" + field + "\"");
    ids = tokenizer->encode(text);
  }
  for (int64_t id : ids)
    SEDD_CHECK_INPUT(id >= 0 && id < vocab, "\"{}\": token id {} is not in the model's vocabulary [0, {})", field, id,
                     vocab);
  return ids;
}

}  // namespace

std::vector<ScoreRequest> read_score_requests(const std::string& path, const Tokenizer* tokenizer, int64_t vocab,
                                              int64_t window) {
  std::ifstream in(path);
  SEDD_CHECK_INPUT(in.good(), "{}: cannot read the request file", path);
  std::vector<ScoreRequest> out;
  int64_t line_no = 0;
  for (std::string line; std::getline(in, line);) {
    ++line_no;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    ScoreRequest r;
    r.line = line_no;
    try {
      nlohmann::json j;
      try {
        j = nlohmann::json::parse(line);
      } catch (const nlohmann::json::exception& e) {
        fail_input("malformed JSON ({})", e.what());
      }
      SEDD_CHECK_INPUT(j.is_object(), "a request must be a JSON object");
      if (j.contains("id")) r.id = j["id"];
      r.context = score_request_tokens(j, "context", tokenizer, vocab);
      r.continuation = score_request_tokens(j, "continuation", tokenizer, vocab);
      SEDD_CHECK_INPUT(!r.continuation.empty(), "the continuation is empty or missing");
      SEDD_CHECK_INPUT(static_cast<int64_t>(r.continuation.size()) <= window,
                       "the continuation has {} tokens, more than the model's window of {}", r.continuation.size(),
                       window);
    } catch (const std::exception& e) {
      const nlohmann::json id = r.id;
      r = ScoreRequest{};
      r.line = line_no;
      r.id = id;
      r.error = fmt::format("{}:{}: {}", path, line_no, e.what());
    }
    out.push_back(std::move(r));
  }
  return out;
}

void ScoreOptions::validate() const {
  if (!elbo.model.causal()) elbo.validate();
  SEDD_CHECK_OPTION(batch_size > 0, "--batch-size must be positive, got {}", batch_size);
  SEDD_CHECK_OPTION(window > 0, "the model's window must be positive, got {}", window);
  SEDD_CHECK_OPTION(pad_id >= 0, "the model has no end-of-text id (neither its config nor its tokenizer says one)");
}

int64_t request_key(const ScoreRequest& r) {
  uint64_t h = 1469598103934665603ull;  // FNV-1a over the ids, the two parts told apart by their lengths
  auto mix = [&](uint64_t v) {
    for (int byte = 0; byte < 8; ++byte) h = (h ^ ((v >> (8 * byte)) & 0xff)) * 1099511628211ull;
  };
  mix(r.context.size());
  for (int64_t id : r.context) mix(static_cast<uint64_t>(id));
  mix(r.continuation.size());
  for (int64_t id : r.continuation) mix(static_cast<uint64_t>(id));
  return static_cast<int64_t>(h >> 2);  // non-negative
}

std::pair<torch::Tensor, torch::Tensor> diffusion_window(const ScoreRequest& r, int64_t L, int64_t pad_id) {
  const int64_t nc = static_cast<int64_t>(r.context.size()), ny = static_cast<int64_t>(r.continuation.size());
  auto x = torch::full({L}, pad_id, torch::kLong);
  auto scored = torch::zeros({L}, torch::kBool);
  auto xa = x.accessor<int64_t, 1>();
  auto sa = scored.accessor<bool, 1>();
  for (int64_t k = 0; k < ny; ++k) {
    xa[L - ny + k] = r.continuation[k];
    sa[L - ny + k] = true;
  }
  const int64_t kept = std::min(nc, L - ny);
  for (int64_t k = 0; k < kept; ++k) xa[L - ny - kept + k] = r.context[nc - kept + k];
  return {x, scored};
}

namespace {

int64_t score_truncated_context(const ScoreRequest& r, int64_t L) {
  return std::max<int64_t>(0, static_cast<int64_t>(r.context.size() + r.continuation.size()) - L);
}

// Exact: log p(continuation | end-of-text, context) and the argmax check, one causal pass.
void score_autoregressive_batch(ScoreModel& model, const std::vector<const ScoreRequest*>& batch,
                                const ScoreOptions& o, torch::Device device, ScoreResult* out) {
  const int64_t B = static_cast<int64_t>(batch.size()), L = o.window;
  std::vector<std::vector<int64_t>> inputs(B), targets(B);
  int64_t width = 1;
  for (int64_t b = 0; b < B; ++b) {
    std::vector<int64_t> s = {o.pad_id};
    s.insert(s.end(), batch[b]->context.begin(), batch[b]->context.end());
    s.insert(s.end(), batch[b]->continuation.begin(), batch[b]->continuation.end());
    if (static_cast<int64_t>(s.size()) > L + 1) s.erase(s.begin(), s.end() - (L + 1));
    inputs[b].assign(s.begin(), s.end() - 1);
    targets[b].assign(s.begin() + 1, s.end());
    width = std::max<int64_t>(width, static_cast<int64_t>(inputs[b].size()));
  }
  auto x = torch::full({B, width}, o.pad_id, torch::kLong);
  std::vector<int64_t> rows, target;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t n = static_cast<int64_t>(inputs[b].size()), ny = static_cast<int64_t>(batch[b]->continuation.size());
    x[b].narrow(0, 0, n).copy_(torch::tensor(inputs[b], torch::kLong));
    for (int64_t k = n - ny; k < n; ++k) rows.push_back(b * width + k), target.push_back(targets[b][k]);
  }
  torch::NoGradGuard ng;
  const auto lopts = torch::TensorOptions().dtype(torch::kLong).device(device);
  model.evaluate(x.to(device), torch::zeros({B}, torch::TensorOptions().dtype(torch::kDouble).device(device)));
  auto r = torch::tensor(rows, torch::kLong).to(lopts);
  auto t = torch::tensor(target, torch::kLong).to(lopts);
  auto logp = model.rows(r).to(torch::kDouble);
  auto picked = logp.gather(1, t.unsqueeze(1)).squeeze(1).cpu();
  auto hit = (logp.argmax(1) == t).cpu();
  auto batch_of = torch::div(r, width, "floor").cpu();
  for (int64_t b = 0; b < B; ++b) out[b] = ScoreResult{0, 0, 1, static_cast<int64_t>(batch[b]->continuation.size()),
                                                        score_truncated_context(*batch[b], L)};
  for (int64_t i = 0; i < picked.size(0); ++i) {
    auto& res = out[batch_of[i].item<int64_t>()];
    res.logprob += picked[i].item<double>();
    if (!hit[i].item<bool>()) res.is_greedy = 0;
  }
}

// Greedy decoding of the fully masked continuation, one position per pass: the most confident
// masked position (largest denoiser probability of its argmax) gets its argmax; a row is greedy
// when every such choice is its own token. sigma follows the masked fraction f of the
// continuation (the absorbing graph masks a position with probability 1 - e^-sigma), capped at
// sigma(1). Returns [B] bool.
torch::Tensor score_greedy_reproduces(const Graph& graph, const Noise& noise, ScoreModel& model, const torch::Tensor& x0,
                                const torch::Tensor& scored, bool clean_beside, torch::Device device) {
  torch::NoGradGuard ng;
  const int64_t B = x0.size(0), L = x0.size(1), N = graph.tokens();
  const auto dopts = torch::TensorOptions().dtype(torch::kDouble).device(device);
  auto x = torch::where(scored, torch::full_like(x0, N), x0);
  auto remaining = scored.clone();
  auto ok = torch::ones({B}, scored.options());
  const auto length = scored.sum(1).to(torch::kDouble);
  const double sigma_max = noise.total(torch::ones({1}, torch::kDouble)).item<double>();
  const int64_t steps = scored.sum(1).max().item<int64_t>();
  for (int64_t s = 0; s < steps; ++s) {
    auto active = remaining.any(1) & ok;
    if (!active.any().item<bool>()) break;
    auto frac = remaining.sum(1).to(torch::kDouble) / length.clamp_min(1);
    auto sigma = (-torch::log1p(-frac.clamp_max(1 - 1e-12))).clamp_max(sigma_max).to(dopts);
    // bd3: the true text in the clean stream, as teacher forcing gives an AR model.
    model.evaluate_point(x, sigma, clean_beside ? x0 : torch::Tensor());
    auto rows = (remaining & active.unsqueeze(1)).reshape({-1}).nonzero().squeeze(1);
    auto logp = torch::log_softmax(model.rows(rows).to(torch::kDouble).narrow(1, 0, N), 1);
    auto [conf, arg] = logp.max(1);
    auto conf_full = torch::full({B * L}, -INFINITY, dopts).index_put_({rows}, conf);
    auto arg_full = torch::full({B * L}, -1, x0.options()).index_put_({rows}, arg);
    auto best = conf_full.view({B, L}).argmax(1);                     // [B]
    auto pick = arg_full.view({B, L}).gather(1, best.unsqueeze(1)).squeeze(1);
    auto truth = x0.gather(1, best.unsqueeze(1)).squeeze(1);
    ok = ok & (~active | (pick == truth));
    auto rows_b = torch::arange(B, x0.options());
    x.index_put_({rows_b, best}, torch::where(active, truth, x.gather(1, best.unsqueeze(1)).squeeze(1)));
    remaining.index_put_({rows_b, best}, remaining.gather(1, best.unsqueeze(1)).squeeze(1) & ~active);
  }
  return ok.cpu();
}

}  // namespace

std::vector<ScoreResult> score_requests(const Graph& graph, const Noise& noise, ScoreModel& model,
                                        const std::vector<const ScoreRequest*>& requests,
                                        const std::vector<int64_t>& keys, const ScoreOptions& o,
                                        torch::Device device) {
  o.validate();
  SEDD_CHECK(keys.size() == requests.size(), "score_requests: one key per request");
  const int64_t n = static_cast<int64_t>(requests.size()), L = o.window;
  const bool exact = o.elbo.model.causal();  // the causal model's one pass
  // Batches of similar lengths: the autoregressive pass is as wide as its longest input.
  auto fit = [&](int64_t i) {
    return std::min<int64_t>(L, static_cast<int64_t>(requests[i]->context.size() + requests[i]->continuation.size()));
  };
  std::vector<int64_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return fit(a) < fit(b); });
  std::vector<ScoreResult> results(n);
  for (int64_t first = 0; first < n; first += o.batch_size) {
    const int64_t B = std::min(o.batch_size, n - first);
    std::vector<const ScoreRequest*> batch;
    std::vector<int64_t> batch_keys;
    for (int64_t k = 0; k < B; ++k) batch.push_back(requests[order[first + k]]), batch_keys.push_back(keys[order[first + k]]);
    std::vector<ScoreResult> part(B);
    if (exact) {
      score_autoregressive_batch(model, batch, o, device, part.data());
    } else {
      std::vector<torch::Tensor> xs, ss;
      for (const auto* r : batch) {
        auto [x, s] = diffusion_window(*r, L, o.pad_id);
        xs.push_back(x);
        ss.push_back(s);
      }
      auto x0 = torch::stack(xs).to(device), scored = torch::stack(ss).to(device);
      auto res = conditional_elbo_batch(graph, noise, model, x0, scored, torch::tensor(batch_keys, torch::kLong), o.elbo,
                                        device);
      torch::Tensor greedy;
      if (!o.uniform_graph)
        greedy = score_greedy_reproduces(graph, noise, model, x0, scored, o.elbo.model.network().block_size > 0, device);
      for (int64_t k = 0; k < B; ++k)
        part[k] = ScoreResult{-res.bound[k].item<double>(), std::sqrt(res.mc_variance[k].item<double>()),
                              o.uniform_graph ? -1 : static_cast<int>(greedy[k].item<bool>()),
                              static_cast<int64_t>(batch[k]->continuation.size()),
                              score_truncated_context(*batch[k], L)};
    }
    for (int64_t k = 0; k < B; ++k) results[order[first + k]] = part[k];
  }
  return results;
}

}  // namespace sedd
