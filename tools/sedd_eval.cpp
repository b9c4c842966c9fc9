// sedd-eval: the likelihood bound (nats/token, bits/token, perplexity, with its Monte Carlo
// standard error) of a checkpoint on a token dataset, sequences split across MPI ranks.
#include <chrono>
#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>

#include "data/token_stream.h"
#include "distributed/control.h"
#include "eval/elbo.h"
#include "model/score.h"
#include "tool_common.h"

namespace po = boost::program_options;
using namespace sedd;

int main(int argc, char** argv) {
  Runtime& rt = Runtime::init(&argc, &argv, "cpu");
  std::string checkpoint, data, json_out, sampling = "antithetic", device = "auto", precision = "auto";
  int64_t mc = 32, batch = 8, max_sequences = 0, seed = 0;
  bool raw_weights = false;
  po::options_description desc("sedd-eval: likelihood bound of a SEDD model on token shards");
  desc.add_options()("help,h", "show this help")(
      "checkpoint", po::value(&checkpoint)->required(), "run folder, checkpoint folder or model.h5")(
      "data", po::value(&data)->required(), "token shards (glob or comma-separated list)")(
      "mc-samples", po::value(&mc)->default_value(32), "Monte Carlo time samples per sequence")(
      "sampling", po::value(&sampling)->default_value("antithetic"), "iid | antithetic | stratified")(
      "batch-size", po::value(&batch)->default_value(8), "sequences per forward pass on each rank")(
      "max-sequences", po::value(&max_sequences)->default_value(0), "evaluate at most this many sequences (0: all)")(
      "seed", po::value(&seed)->default_value(0), "seed of the time and corruption draws")(
      "device", po::value(&device)->default_value("auto"), "cpu | cuda | auto (GPU = local rank)")(
      "precision", po::value(&precision)->default_value("auto"), "network in bf16 or fp32 (auto: bf16 on GPUs)")(
      "no-ema", po::bool_switch(&raw_weights), "use the raw weights instead of the EMA")(
      "json", po::value(&json_out), "write the result as JSON");
  if (int rc = tools::parse_options("sedd-eval", desc, argc, argv, rt.is_root()); rc >= 0) return rc;
  try {
    rt.select_device(device);
    ControlPlane control;
    auto m = tools::load_checkpoint(checkpoint, !raw_weights, rt.device, tools::use_bf16(precision, rt.device));
    const auto& cfg = m.model->cfg;
    ElboConfig ec{mc, sampling, static_cast<uint64_t>(seed)};
    ec.objective = tools::objective_of(cfg);
    ec.validate();
    SEDD_CHECK(batch > 0, "--batch-size must be positive");
    TokenStreamConfig tc;
    tc.data = data;
    tc.seq_len = cfg.length;
    tc.global_batch = batch * rt.world;
    tc.rank = rt.rank;
    tc.world = rt.world;
    tc.shuffle = false;
    TokenStream stream(tc);
    SEDD_CHECK(stream.vocab_size() == cfg.tokens, "{}: the data has vocab_size {}, the model {} tokens ({})", data,
               stream.vocab_size(), cfg.tokens, m.path);
    int64_t n = stream.windows_per_epoch();
    if (max_sequences > 0) n = std::min(n, max_sequences);
    auto graph = make_graph(cfg.graph, cfg.tokens);
    auto noise = make_noise(cfg.noise);
    DDiTScore score(m.model, /*cache=*/false);
    if (rt.is_root())
      std::fprintf(stderr, "[eval] %s (%s weights) on %lld sequences x %lld tokens; %lld %s draws each; %d ranks on %s (%s)\n",
                   m.path.c_str(), raw_weights || !m.info.has_ema ? "raw" : "EMA", static_cast<long long>(n),
                   static_cast<long long>(cfg.length), static_cast<long long>(mc), sampling.c_str(), rt.world,
                   rt.device_name().c_str(), m.model->bf16 ? "bf16" : "fp32");
    auto start = std::chrono::steady_clock::now();
    double sums[3] = {0, 0, 0};  // bound nats, MC variance, sequences
    double prior = 0;
    for (int64_t first = 0; first < n; first += batch * rt.world) {
      auto x0 = stream.next();
      int64_t row0 = first + rt.rank * batch;
      int64_t rows = std::clamp<int64_t>(n - row0, 0, batch);
      if (rows > 0) {
        auto r = elbo_batch(*graph, *noise, score, x0.narrow(0, 0, rows), row0, ec, rt.device);
        sums[0] += r.bound.sum().item<double>();
        sums[1] += r.mc_variance.sum().item<double>();
        sums[2] += static_cast<double>(rows);
        prior = r.prior_nats;
      }
      const int64_t stride = batch * rt.world, every = std::max<int64_t>(1, (n + stride - 1) / stride / 10);
      if (rt.is_root() && ((first / stride) % every == every - 1 || first + stride >= n))
        std::fprintf(stderr, "[eval] %lld/%lld sequences\n", static_cast<long long>(std::min(n, first + batch * rt.world)),
                     static_cast<long long>(n));
    }
    auto total = control.sum(std::vector<double>(sums, sums + 3), "evaluation sums");
    std::copy(total.begin(), total.end(), sums);
    if (rt.is_root()) {
      double tokens = sums[2] * static_cast<double>(cfg.length);
      double nats = sums[0] / tokens, se = std::sqrt(sums[1]) / tokens;
      double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      nlohmann::json j = {{"nats_per_token", nats},
                          {"bits_per_token", nats / std::log(2.0)},
                          {"perplexity", std::exp(nats)},
                          {"stderr_nats_per_token", se},
                          {"tokens", static_cast<int64_t>(tokens)},
                          {"sequences", static_cast<int64_t>(sums[2])},
                          {"mc_samples", mc},
                          {"sampling", sampling},
                          {"prior_nats_per_token", prior / static_cast<double>(cfg.length)},
                          {"weights", raw_weights || !m.info.has_ema ? "raw" : "ema"},
                          {"checkpoint", m.path},
                          {"device", rt.device_name()},
                          {"precision", m.model->bf16 ? "bf16" : "fp32"},
                          {"seconds", secs},
                          {"tokens_x_draws_per_s", tokens * static_cast<double>(mc) / secs}};
      std::printf("nats/token %.4f +- %.4f (1 s.e., Monte Carlo) | bits/token %.4f | perplexity <= %.3f | %lld tokens\n",
                  nats, se, nats / std::log(2.0), std::exp(nats), static_cast<long long>(tokens));
      if (!json_out.empty()) {
        std::ofstream f(json_out);
        SEDD_CHECK(f.good(), "{}: cannot write", json_out);
        f << j.dump(2) << "\n";
      }
    }
  } catch (const std::exception& e) {
    rt.abort(std::string("sedd-eval: ") + e.what());
  }
  return 0;
}
