// sedd-score: the conditional log-likelihood of (context, continuation) requests from a JSONL file
// (exact for autoregressive models, a Monte Carlo lower bound for diffusion models), requests split
// across MPI ranks and gathered on rank 0, JSONL rows in request order. A bad request gets an error
// row naming its line; the others are still scored (exit 2 when any was refused).
#include <chrono>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>

#include "distributed/control.h"
#include "eval/conditional.h"
#include "objectives/objective.h"
#include "objectives/score.h"
#include "tool_common.h"

namespace po = boost::program_options;
using namespace sedd;

namespace {
int64_t score_bits_of(double v) {
  int64_t b;
  std::memcpy(&b, &v, sizeof b);
  return b;
}
double score_double_of(int64_t b) {
  double v;
  std::memcpy(&v, &b, sizeof v);
  return v;
}
constexpr int64_t kScoreFields = 6;  // position, logprob bits, stderr bits, is_greedy, tokens, truncated context
}  // namespace

int main(int argc, char** argv) {
  Runtime& rt = Runtime::init(&argc, &argv, "cpu");
  std::string checkpoint, requests_path, out, sampling = "antithetic", device = "auto", precision = "auto";
  int64_t mc = 32, batch = 8, seed = 0;
  bool raw_weights = false;
  po::options_description desc("sedd-score: conditional log-likelihood of (context, continuation) requests");
  desc.add_options()("help,h", "show this help")(
      "checkpoint", po::value(&checkpoint)->required(), "run folder, checkpoint folder or model.h5")(
      "requests", po::value(&requests_path)->required(),
      "JSONL: {\"id\", \"context\", \"continuation\"} (text) or \"context_ids\" / \"continuation_ids\"")(
      "out", po::value(&out)->required(), "JSONL output: {\"id\", \"logprob\", \"is_greedy\", \"tokens\", \"stderr\"}")(
      "mc-samples", po::value(&mc)->default_value(32), "diffusion models: Monte Carlo draws per request")(
      "sampling", po::value(&sampling)->default_value("antithetic"), "iid | antithetic | stratified")(
      "batch-size", po::value(&batch)->default_value(8), "requests per forward pass on each rank")(
      "seed", po::value(&seed)->default_value(0), "seed of the draws (a request's depend only on the seed and its tokens)")(
      "device", po::value(&device)->default_value("auto"), "cpu | cuda | auto (GPU = local rank)")(
      "precision", po::value(&precision)->default_value("auto"), "network in bf16 or fp32 (auto: bf16 on GPUs)")(
      "no-ema", po::bool_switch(&raw_weights), "use the raw weights instead of the EMA");
  if (int rc = tools::parse_options("sedd-score", desc, argc, argv, rt.is_root()); rc >= 0) return rc;
  ControlPlane control;  // a collective: made before any rank may fail
  tools::LoadedModel m;
  ScoreOptions o;
  std::vector<ScoreRequest> requests;
  const int refused = tools::agree(rt, "sedd-score", [&] {
    if (rt.is_root()) tools::check_writable(out, "--out");
    rt.select_device(device);
    m = tools::load_checkpoint(checkpoint, !raw_weights, rt.device, tools::use_bf16(precision, rt.device));
    const auto& cfg = m.model->cfg;
    o.elbo = ElboConfig{mc, sampling, static_cast<uint64_t>(seed)};
    o.elbo.model = cfg;
    o.batch_size = batch;
    o.window = cfg.length;
    o.pad_id = cfg.bos >= 0 ? cfg.bos : m.tokenizer() ? m.tokenizer()->eot_id() : -1;
    o.uniform_graph = !cfg.network().mask_state && !cfg.causal();
    o.validate();
    requests = read_score_requests(requests_path, m.tokenizer(), cfg.tokens, cfg.length);
  });
  if (refused >= 0) return refused;
  int64_t bad = 0;
  try {
    const auto& cfg = m.model->cfg;
    auto graph = make_graph(cfg.graph, cfg.tokens);
    auto noise = make_noise(cfg.noise);
    DDiTScore score(m.model, /*cache=*/false);
    // Every rank read the whole file: the valid requests, sorted by length, split in contiguous
    // ranges (similar lengths batch together); a request's draws are keyed by its ids (request_key).
    std::vector<int64_t> valid;
    for (int64_t i = 0; i < static_cast<int64_t>(requests.size()); ++i) {
      if (requests[i].error.empty()) valid.push_back(i);
      else {
        ++bad;
        if (rt.is_root()) std::fprintf(stderr, "sedd-score: %s\n", requests[i].error.c_str());
      }
    }
    auto fit = [&](int64_t i) { return requests[i].context.size() + requests[i].continuation.size(); };
    std::stable_sort(valid.begin(), valid.end(), [&](int64_t a, int64_t b) { return fit(a) < fit(b); });
    auto mine = shard_range(static_cast<int64_t>(valid.size()), rt.world, rt.rank);
    std::vector<const ScoreRequest*> my_requests;
    std::vector<int64_t> keys, positions;
    for (int64_t k = mine.begin; k < mine.end; ++k) {
      my_requests.push_back(&requests[valid[k]]);
      keys.push_back(request_key(requests[valid[k]]));
      positions.push_back(valid[k]);
    }
    if (rt.is_root())
      std::fprintf(stderr, "[score] %s (%s): %zu requests (%lld refused); %s; %d ranks on %s (%s)\n", m.path.c_str(),
                   cfg.objective.c_str(), requests.size(), static_cast<long long>(bad),
                   cfg.causal() ? "exact likelihood"
                                         : fmt::format("bound, {} {} draws per request", mc, sampling).c_str(),
                   rt.world, rt.device_name().c_str(), m.model->bf16 ? "bf16" : "fp32");
    auto start = std::chrono::steady_clock::now();
    auto results = score_requests(*graph, *noise, score, my_requests, keys, o, rt.device);
    std::vector<int64_t> packed;
    for (size_t k = 0; k < results.size(); ++k) {
      const auto& r = results[k];
      packed.insert(packed.end(), {positions[k], score_bits_of(r.logprob), score_bits_of(r.stderr_mc), r.is_greedy, r.tokens,
                                   r.truncated_context});
    }
    auto all = control.gather_to_root(packed, "gathering scores");
    if (rt.is_root()) {
      const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      std::vector<nlohmann::ordered_json> rows(requests.size());
      for (size_t i = 0; i < requests.size(); ++i)
        if (!requests[i].error.empty())
          rows[i] = {{"id", requests[i].id}, {"line", requests[i].line}, {"error", requests[i].error}};
      for (size_t k = 0; k + kScoreFields <= all.size(); k += kScoreFields) {
        const auto& req = requests[all[k]];
        nlohmann::ordered_json j = {{"id", req.id},
                                    {"logprob", score_double_of(all[k + 1])},
                                    {"is_greedy", nullptr},
                                    {"tokens", all[k + 4]},
                                    {"stderr", score_double_of(all[k + 2])}};
        if (all[k + 3] >= 0) j["is_greedy"] = all[k + 3] == 1;
        if (all[k + 5] > 0) j["truncated_context"] = all[k + 5];
        rows[all[k]] = std::move(j);
      }
      std::ofstream file(out);
      SEDD_CHECK(file.good(), "{}: cannot write the output file", out);
      for (const auto& j : rows) file << j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) << "\n";
      file.close();
      SEDD_CHECK(!file.fail(), "{}: writing the scores failed (disk full?)", out);
      const double scored = static_cast<double>(valid.size());
      std::fprintf(stderr, "[score] %lld requests scored in %.2f s: %.2f requests/s; written to %s\n",
                   static_cast<long long>(valid.size()), secs, scored / std::max(secs, 1e-9), out.c_str());
    }
  } catch (const std::exception& e) {
    return tools::end_job(rt, "sedd-score", e);
  }
  return bad > 0 ? tools::kExitBadInput : tools::kExitOk;
}
