// sedd-compare: evaluates several checkpoints (any objective) on the same data and prints the table
// that papers report: objective, parameters, tokens seen, nats/token with its standard error and
// the perplexity (bound); JSON too. Trains nothing; ranks split the sequences. Options, the --json
// path, every checkpoint and the datasets' shards are checked on every rank before any evaluation.
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
  std::vector<std::string> checkpoints, data;
  std::string json_out, device = "auto", precision = "auto";
  int64_t mc = 32, batch = 8, max_sequences = 0, seed = 0;
  ProtocolOptions protocol;
  po::options_description desc("sedd-compare: several checkpoints on the same data, one table");
  desc.add_options()("help,h", "show this help")(
      "checkpoint", po::value(&checkpoints)->composing()->required(), "a run folder, checkpoint or model.h5 (repeat)")(
      "data", po::value(&data)->composing()->required(), "token shards: GLOB or NAME=GLOB (repeat for several)")(
      "mc-samples", po::value(&mc)->default_value(32), "Monte Carlo time samples per sequence (diffusion models)")(
      "batch-size", po::value(&batch)->default_value(8), "sequences per forward pass on each rank")(
      "max-sequences", po::value(&max_sequences)->default_value(0), "at most this many sequences per dataset (0: all)")(
      "seed", po::value(&seed)->default_value(0), "seed of the time and corruption draws (the same for every model)")(
      "protocol", po::value(&protocol.name)->default_value("packed"),
      ("how windows are built: " + protocol_names()).c_str())(
      "protocol-procs", po::value(&protocol.procs)->default_value(8), "sedd, mdlm-wrap: the map processes")(
      "protocol-batch-docs", po::value(&protocol.batch_docs)->default_value(1000),
      "sedd, mdlm-wrap: documents per map batch")(
      "device", po::value(&device)->default_value("auto"), "cpu | cuda | auto")(
      "precision", po::value(&precision)->default_value("auto"), "bf16 | fp32 (auto: bf16 on GPUs)")(
      "json", po::value(&json_out), "write the table as JSON");
  if (int rc = tools::parse_options("sedd-compare", desc, argc, argv, rt.is_root()); rc >= 0) return rc;
  ControlPlane control;  // a collective: made before any rank may fail
  std::vector<tools::LoadedModel> models;
  const int refused = tools::agree(rt, "sedd-compare", [&] {
    if (rt.is_root()) tools::check_writable(json_out, "--json");  // found now, not after the evaluation
    EvalOptions o;
    o.elbo = ElboConfig{mc, "antithetic", static_cast<uint64_t>(seed)};
    o.batch_size = batch;
    o.max_sequences = max_sequences;
    o.protocol = protocol;
    o.validate();
    for (const auto& d : data) expand_shard_list(parse_named_dataset(d).second);  // missing data: refused now
    rt.select_device(device);
    for (const auto& ckpt : checkpoints)
      models.push_back(tools::load_checkpoint(ckpt, true, rt.device, tools::use_bf16(precision, rt.device)));
  });
  if (refused >= 0) return refused;
  try {
    struct Row {
      std::string given, path, objective;  // given: the --checkpoint argument, the table's name
      int64_t params, tokens_seen;
      EvalSummary s;
    };
    std::vector<Row> rows;
    for (size_t i = 0; i < models.size(); ++i) {
      const std::string& ckpt = checkpoints[i];
      auto& m = models[i];
      const auto& cfg = m.model->cfg;
      EvalOptions o;
      o.elbo = ElboConfig{mc, "antithetic", static_cast<uint64_t>(seed)};
      o.elbo.model = cfg;
      o.batch_size = batch;
      o.max_sequences = max_sequences;
      o.model_tokenizer = m.info.tokenizer;
      o.protocol = protocol;
      DDiTScore score(m.model, false);
      for (const auto& d : data) {
        auto [name, glob] = parse_named_dataset(d);
        if (rt.is_root()) std::fprintf(stderr, "[compare] %s on %s\n", m.path.c_str(), name.c_str());
        rows.push_back({ckpt, m.path, objective_of(cfg).describe(cfg),
                        m.model->parameter_count(), m.info.tokens_seen,
                        evaluate_dataset(score, cfg, name, glob, o, rt.device, control)});
      }
    }
    if (rt.is_root()) {
      std::printf("%-40s %-14s %10s %12s %-12s %20s %12s\n", "model", "objective", "params", "tokens seen",
                  "dataset", "nats/token", "perplexity");
      nlohmann::ordered_json j = nlohmann::ordered_json::array();
      for (const auto& r : rows) {
        std::string where = r.given.size() > 40 ? "..." + r.given.substr(r.given.size() - 37) : r.given;
        std::printf("%-40s %-14s %10lld %12lld %-12s %10.4f +- %.4f %s %9.3f\n", where.c_str(), r.objective.c_str(),
                    static_cast<long long>(r.params), static_cast<long long>(r.tokens_seen), r.s.name.c_str(),
                    r.s.nats_per_token, r.s.stderr_total(), r.s.exact ? " =" : "<=", r.s.perplexity());
        nlohmann::ordered_json row = {{"model", r.given},
                                      {"checkpoint", r.path},
                                      {"objective", r.objective},
                                      {"parameters", r.params},
                                      {"tokens_seen", r.tokens_seen}};
        row.update(to_json(r.s));
        j.push_back(row);
      }
      std::printf("diffusion rows: upper bounds (<=) on nats/token; autoregressive rows: exact (=); s.e. combines "
                  "Monte Carlo and data sampling. protocol %s; packing: %s\n",
                  protocol.name.c_str(), describe_protocol(protocol).c_str());
      for (const auto& r : rows)
        if (r.s.tokenizer_check != "same")
          std::printf("%s on %s: tokenizer check %s\n", r.given.c_str(), r.s.name.c_str(), r.s.tokenizer_check.c_str());
      if (!json_out.empty()) {
        std::ofstream f(json_out);
        f << j.dump(2) << "\n";
        f.close();
        SEDD_CHECK(!f.fail(), "{}: cannot write", json_out);
      }
    }
  } catch (const std::exception& e) {
    return tools::end_job(rt, "sedd-compare", e);
  }
  return tools::kExitOk;
}
