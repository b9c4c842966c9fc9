// sedd-eval: the likelihood bound (nats/token, bits/token, perplexity, with standard errors) of a
// checkpoint on one or several token datasets, sequences split across MPI ranks; one table and
// JSON. The autoregressive baseline's likelihood is exact. --protocol builds the windows as this
// project does (packed) or as SEDD's or MDLM's code does, token for token (eval/protocol.h).
// Options, the --json path, the checkpoint
// and the datasets' shards are checked on every rank before any evaluation.
#include <algorithm>
#include <boost/program_options.hpp>
#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>

#include "data/shard.h"
#include "distributed/control.h"
#include "eval/evaluate.h"
#include "objectives/objective.h"
#include "objectives/score.h"
#include "tool_common.h"

namespace po = boost::program_options;
using namespace sedd;

int main(int argc, char** argv) {
  Runtime& rt = Runtime::init(&argc, &argv, "cpu");
  std::string checkpoint, json_out, sampling = "antithetic", device = "auto", precision = "auto", suite;
  std::vector<std::string> data;
  int64_t mc = 32, batch = 8, max_sequences = 0, seed = 0;
  ProtocolOptions protocol;
  bool raw_weights = false;
  po::options_description desc("sedd-eval: likelihood bound of a model on token shards");
  desc.add_options()("help,h", "show this help")(
      "checkpoint", po::value(&checkpoint)->required(), "run folder, checkpoint folder or model.h5")(
      "data", po::value(&data)->composing(), "token shards: GLOB, or NAME=GLOB; repeat for several datasets")(
      "suite", po::value(&suite),
      "a file of datasets, one 'NAME GLOB [PROTOCOL]' or 'NAME=GLOB [PROTOCOL]' per line")(
      "protocol", po::value(&protocol.name)->default_value("packed"),
      ("how windows are built: " + protocol_names()).c_str())(
      "protocol-procs", po::value(&protocol.procs)->default_value(8),
      "sedd, mdlm-wrap: the map processes of the authors' pipeline (SEDD: 8; MDLM: the preparing machine's CPUs)")(
      "protocol-batch-docs", po::value(&protocol.batch_docs)->default_value(1000),
      "sedd, mdlm-wrap: documents per map batch (datasets' default 1000)")(
      "mc-samples", po::value(&mc)->default_value(32), "Monte Carlo time samples per sequence")(
      "sampling", po::value(&sampling)->default_value("antithetic"), "iid | antithetic | stratified")(
      "batch-size", po::value(&batch)->default_value(8), "sequences per forward pass on each rank")(
      "max-sequences", po::value(&max_sequences)->default_value(0), "evaluate at most this many sequences (0: all)")(
      "seed", po::value(&seed)->default_value(0), "seed of the time and corruption draws")(
      "device", po::value(&device)->default_value("auto"), "cpu | cuda | auto (GPU = local rank)")(
      "precision", po::value(&precision)->default_value("auto"), "network in bf16 or fp32 (auto: bf16 on GPUs)")(
      "no-ema", po::bool_switch(&raw_weights), "use the raw weights instead of the EMA")(
      "json", po::value(&json_out), "write the results as JSON");
  if (int rc = tools::parse_options("sedd-eval", desc, argc, argv, rt.is_root()); rc >= 0) return rc;
  ControlPlane control;  // a collective: made before any rank may fail
  std::vector<SuiteDataset> datasets;
  tools::LoadedModel m;
  EvalOptions o;
  const int refused = tools::agree(rt, "sedd-eval", [&] {
    if (rt.is_root()) tools::check_writable(json_out, "--json");  // found now, not after the evaluation
    for (const auto& d : data) {
      auto [name, glob] = parse_named_dataset(d);
      datasets.push_back({name, glob, ""});
    }
    if (!suite.empty())
      for (const auto& d : read_dataset_suite(suite)) datasets.push_back(d);
    for (auto& d : datasets) {  // a suite line's protocol overrides --protocol, with the same --protocol-* options
      if (d.protocol.empty()) d.protocol = protocol.name;
      ProtocolOptions p = protocol;
      p.name = d.protocol;
      p.validate();
    }
    SEDD_CHECK_OPTION(!datasets.empty(), "give --data GLOB (or NAME=GLOB, repeated) or --suite FILE");
    o.elbo = ElboConfig{mc, sampling, static_cast<uint64_t>(seed)};
    o.batch_size = batch;
    o.max_sequences = max_sequences;
    o.protocol = protocol;
    o.validate();
    for (const auto& d : datasets) expand_shard_list(d.glob);  // missing data: refused now
    rt.select_device(device);
    m = tools::load_checkpoint(checkpoint, !raw_weights, rt.device, tools::use_bf16(precision, rt.device));
    o.elbo.model = m.model->cfg;
    o.model_tokenizer = m.info.tokenizer;
  });
  if (refused >= 0) return refused;
  try {
    const auto& cfg = m.model->cfg;
    const bool exact = objective_of(cfg).exact(cfg);
    DDiTScore score(m.model, /*cache=*/false);
    const std::string weights = raw_weights || !m.info.has_ema ? "raw" : "EMA";
    if (rt.is_root())
      std::fprintf(stderr, "[eval] %s (%s, %s weights) on %zu dataset(s); %s; %d ranks on %s (%s)\n", m.path.c_str(),
                   cfg.objective.c_str(), weights.c_str(), datasets.size(),
                   exact ? "exact likelihood"
                                         : fmt::format("{} {} draws per sequence", mc, sampling).c_str(),
                   rt.world, rt.device_name().c_str(), m.model->bf16 ? "bf16" : "fp32");
    std::vector<EvalSummary> results;
    for (const auto& d : datasets) {
      const std::string& name = d.name;
      double last = -1;
      auto progress = [&, name = name](int64_t done, int64_t total) {
        if (done * 10 / total != last || done == total)
          std::fprintf(stderr, "[eval] %s: %lld/%lld sequences\n", name.c_str(), static_cast<long long>(done),
                       static_cast<long long>(total));
        last = static_cast<double>(done * 10 / total);
      };
      EvalOptions od = o;
      od.protocol.name = d.protocol;
      results.push_back(evaluate_dataset(score, cfg, name, d.glob, od, rt.device, control, progress));
    }
    if (rt.is_root()) {
      const char* bound = exact ? "=" : "<=";
      std::printf("%-16s %10s %18s %10s %14s %10s %10s\n", "dataset", "tokens", "nats/token", "bits/tok",
                  exact ? "perplexity" : "ppl bound", "s.e. MC", "s.e. data");
      for (const auto& s : results)
        std::printf("%-16s %10lld %10.4f +- %.4f %10.4f %3s %10.3f %10.4f %10.4f\n", s.name.c_str(),
                    static_cast<long long>(s.tokens), s.nats_per_token, s.stderr_total(),
                    s.bits_per_token(), bound, s.perplexity(), s.stderr_mc, s.stderr_data);
      // Each protocol once, with its datasets, then each dataset's windows and scored tokens.
      std::vector<std::string> described;
      for (const auto& s : results) {
        if (std::find(described.begin(), described.end(), s.protocol) != described.end()) continue;
        described.push_back(s.protocol);
        std::string names;
        for (const auto& t : results)
          if (t.protocol == s.protocol) names += (names.empty() ? "" : ", ") + t.name;
        std::printf("protocol %s (%s); packing: %s\n", s.protocol.c_str(), names.c_str(),
                    s.protocol_description.c_str());
      }
      for (const auto& s : results)
        std::printf("%s: %lld windows, %lld scored tokens%s\n", s.name.c_str(), static_cast<long long>(s.sequences),
                    static_cast<long long>(s.tokens),
                    s.documents >= 0 ? fmt::format(" from {} documents", s.documents).c_str() : "");
      for (const auto& s : results)
        if (s.tokenizer_check != "same")
          std::printf("%s: tokenizer check %s\n", s.name.c_str(), s.tokenizer_check.c_str());
      auto row = [&](const EvalSummary& s) {
        auto j = to_json(s);
        // Token evaluations per second: K draws each for a bound, one pass for an exact likelihood.
        j["tokens_x_draws_per_s"] = static_cast<double>(s.tokens) * (s.exact ? 1 : mc) / s.seconds;
        return j;
      };
      if (!json_out.empty()) {
        // One dataset: its figures at the top level (and in "datasets"); several: the list.
        nlohmann::ordered_json j = results.size() == 1 ? row(results[0]) : nlohmann::ordered_json::object();
        j["datasets"] = nlohmann::ordered_json::array();
        for (const auto& s : results) j["datasets"].push_back(row(s));
        j["checkpoint"] = m.path;
        j["objective"] = cfg.objective;
        j["weights"] = weights == "EMA" ? "ema" : "raw";
        j["mc_samples"] = mc;
        j["sampling"] = sampling;
        j["device"] = rt.device_name();
        j["precision"] = m.model->bf16 ? "bf16" : "fp32";
        // Each dataset's row names its protocol (a suite line may override --protocol).
        j["protocol_procs"] = protocol.procs;
        j["protocol_batch_docs"] = protocol.batch_docs;
        std::ofstream f(json_out);
        f << j.dump(2) << "\n";
        f.close();
        SEDD_CHECK(!f.fail(), "{}: cannot write", json_out);
      }
    }
  } catch (const std::exception& e) {
    return tools::end_job(rt, "sedd-eval", e);
  }
  return tools::kExitOk;
}
