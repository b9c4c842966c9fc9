// sedd-parity: our training step against the authors' (SEDD, MDLM, flow_matching; docs/DESIGN.md, "Step parity").
//   sedd-parity record --config FILE [--section.key value ...] --out OURS.h5 [--snapshots 1,2,21]
//       one rank: trains train.steps steps and writes the data, initial weights, every step's
//       batch and draws and our results (the input of tests/data/make_sedd_step_reference.py and,
//       for diffusion.objective = mdlm, make_mdlm_step_reference.py; dfm, make_dfm_step_reference.py)
//   mpirun -np W sedd-parity compare --reference REF.h5 [--fused-loss true|false] [--tolerance 1e-12]
//       [--steps N] [--micro-batch-size M] [--zero-stage 1|2] [--json OUT] replays the reference's steps with our
//       trainer (float64, ZeRO-1 or ZeRO-2 over W ranks) and compares, per step: batches, time and mask draws, loss, gradient norm, clip
//       factor, learning rate, and at the snapshot steps every parameter's gradient, clipped
//       gradient, update, weights and EMA; then each parameter's initialisation law.
// Exit codes: 0 equal within the tolerance, 1 a difference (the first one is named) or another
// failure, 2 bad options or input (tool_common.h).
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>

#include "distributed/communicator.h"
#include "distributed/control.h"
#include "distributed/runtime.h"
#include "io/error.h"
#include "io/hdf5.h"
#include "tool_common.h"
#include "train/parity.h"
#include "train/trainer.h"
#include "train_options.h"

using namespace sedd;
namespace po = boost::program_options;

namespace {

std::vector<int64_t> parse_steps(const std::string& list) {
  std::vector<int64_t> out;
  std::stringstream ss(list);
  std::string item;
  while (std::getline(ss, item, ',')) {
    size_t used = 0;
    int64_t v = std::stoll(item, &used);
    if (used != item.size() || v <= 0) throw std::runtime_error("--snapshots: '" + item + "' is not a positive step");
    out.push_back(v);
  }
  return out;
}

std::string make_temp_dir() {
  std::string pattern = (std::filesystem::temp_directory_path() / "sedd-parity.XXXXXX").string();
  if (!mkdtemp(pattern.data())) throw std::runtime_error("cannot create a temporary folder under /tmp");
  return pattern;
}

int record(int argc, char** argv) {
  TrainingConfig cfg;
  tools::OptionTable opts;
  tools::build_train_options(opts, cfg);
  std::string out, snapshots = "1";
  opts.desc.add_options()("out", po::value(&out)->required(), "parity file to write")(
      "snapshots", po::value(&snapshots)->default_value(snapshots), "steps whose full vectors are kept (comma list)");
  std::vector<int64_t> snaps;
  Runtime& rt = Runtime::init(&argc, &argv, "cpu");  // MPI first: usage errors are printed by rank 0 only
  try {
    tools::parse_train_options(opts, argc, argv);
    if (opts.help) {
      if (rt.is_root()) std::cout << opts.desc << "\n";
      return tools::kExitOk;
    }
    snaps = parse_steps(snapshots);
    if (rt.world != 1) throw OptionError(fmt::format("records run on one rank (got {})", rt.world));
    tools::check_writable(out, "--out");
  } catch (const std::exception& e) {
    if (rt.is_root()) std::fprintf(stderr, "sedd-parity record: error: %s\n", e.what());
    return tools::kExitBadInput;
  }
  try {
    cfg.train.ckpt_every = -1;
    std::string settings = tools::resolved_settings(opts);
    ControlPlane control;
    auto comm = make_mpi_communicator();
    Trainer trainer(cfg, rt, *comm, control, settings);
    ParityRecorder rec(out, trainer, cfg, settings, snaps);
    trainer.run(nullptr);
    rec.finish();
    std::printf("sedd-parity: %lld steps recorded in %s\n", static_cast<long long>(trainer.step()), out.c_str());
  } catch (const std::exception& e) {
    return tools::end_job(rt, "sedd-parity record", e);
  }
  return tools::kExitOk;
}

int compare(int argc, char** argv) {
  std::string reference, json_out, fused_loss = "true";
  double tolerance = 1e-12;
  int64_t steps = 0, micro_batch = 0, zero_stage = 1;
  po::options_description desc("sedd-parity compare options");
  desc.add_options()("help,h", "show this help")(
      "reference", po::value(&reference)->required(), "parity reference file (with /authors)")(
      "fused-loss", po::value(&fused_loss)->default_value(fused_loss), "masked-rows fused loss (true) or full logits")(
      "tolerance", po::value(&tolerance)->default_value(tolerance), "largest relative error accepted")(
      "steps", po::value(&steps)->default_value(steps), "compare the first N steps (0: all the reference holds)")(
      "micro-batch-size", po::value(&micro_batch)->default_value(micro_batch),
      "sequences per rank per forward: gradient accumulation (0: the whole rank's rows at once)")(
      "zero-stage", po::value(&zero_stage)->default_value(zero_stage),
      "1: optimizer state sharded over the ranks; 2: the gradient too (train.zero_stage)")(
      "json", po::value(&json_out), "write the report as JSON");
  std::string settings;
  TrainingConfig cfg;
  tools::OptionTable opts;
  tools::build_train_options(opts, cfg);
  Runtime& rt = Runtime::init(&argc, &argv, "cpu");  // MPI first: usage errors are printed by rank 0 only
  if (int rc = tools::parse_options("sedd-parity compare", desc, argc, argv, rt.is_root()); rc >= 0) return rc;
  std::string work = make_temp_dir();
  try {
    if (fused_loss != "true" && fused_loss != "false") throw std::runtime_error("--fused-loss takes true or false");
    settings = parity_settings(reference);
    std::ofstream(work + "/settings.ini") << settings;
    std::vector<std::string> args = {"sedd-parity",       "--config",          work + "/settings.ini",
                                     "--data.train",      work + "/train-00000.h5", "--data.valid", "",
                                     "--train.init_from", work + "/init.h5",   "--run.dir",     work + "/run",
                                     "--train.ckpt_every", "-1",               "--train.log_every", "1000000",
                                     "--train.fused_loss", fused_loss,          "--run.device",   "cpu"};
    if (steps < 0) throw std::runtime_error("--steps must be >= 0");
    if (rt.is_root()) tools::check_writable(json_out, "--json");
    if (steps > 0) args.insert(args.end(), {"--train.steps", std::to_string(steps)});
    if (micro_batch < 0) throw std::runtime_error("--micro-batch-size must be >= 0");
    if (micro_batch > 0) args.insert(args.end(), {"--train.micro_batch_size", std::to_string(micro_batch)});
    if (zero_stage != 1 && zero_stage != 2) throw std::runtime_error("--zero-stage takes 1 or 2");
    args.insert(args.end(), {"--train.zero_stage", std::to_string(zero_stage)});
    std::vector<char*> av;
    for (auto& a : args) av.push_back(a.data());
    tools::parse_train_options(opts, static_cast<int>(av.size()), av.data());
  } catch (const std::exception& e) {
    if (rt.is_root()) std::fprintf(stderr, "sedd-parity compare: error: %s\n", e.what());
    std::filesystem::remove_all(work);
    return tools::kExitBadInput;
  }
  int rc = 0;
  try {
    h5::File ref(reference, h5::Mode::Read);
    ModelConfig model = cfg.model;
    model.tokens = ref.attr_int("/data", "vocab_size");
    model.length = cfg.data.seq_len;
    model.bos = ref.attr_int("/data", "eot_id");
    unpack_parity_inputs(reference, work, model);  // each rank its own copy: no shared folder needed
    ControlPlane control;
    auto comm = make_mpi_communicator();
    Trainer trainer(cfg, rt, *comm, control, tools::resolved_settings(opts));
    ParityCheck check(reference, trainer, control, tolerance);
    trainer.run(nullptr);
    ParityReport report = check.finish();
    std::string laws, bad = compare_init_laws(reference, model, &laws);
    if (rt.is_root()) {
      std::printf("sedd-parity: %s, %lld steps on %d rank(s) (ZeRO-%lld), %s loss, float64\n", reference.c_str(),
                  static_cast<long long>(trainer.step()), rt.world, static_cast<long long>(zero_stage),
                  fused_loss == "true" ? "fused masked-rows" : "full-logits");
      std::printf("%s", report.table().c_str());
      std::printf("initialisation laws (ours vs the reference trainer's):\n%s", laws.c_str());
      if (!bad.empty()) std::printf("INITIALISATION LAW DIFFERS:%s\n", bad.c_str());
      if (!json_out.empty()) {
        auto j = report.to_json();
        j["world"] = rt.world;
        j["zero_stage"] = zero_stage;
        j["fused_loss"] = fused_loss == "true";
        j["steps"] = trainer.step();
        j["init_laws_differ"] = bad;
        std::ofstream(json_out) << j.dump(1) << "\n";
      }
    }
    rc = report.ok() && bad.empty() ? 0 : 1;
  } catch (const std::exception& e) {
    std::filesystem::remove_all(work);
    return tools::end_job(rt, "sedd-parity compare", e);
  }
  std::filesystem::remove_all(work);
  return rc;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string usage = "usage: sedd-parity record|compare [options] (--help after the command)";
  const bool root = Runtime::init(&argc, &argv, "cpu").is_root();  // the commands reuse it
  if (argc < 2) {
    if (root) std::fprintf(stderr, "%s\n", usage.c_str());
    return tools::kExitBadInput;
  }
  const std::string cmd = argv[1];
  if (cmd == "record") return record(argc - 1, argv + 1);
  if (cmd == "compare") return compare(argc - 1, argv + 1);
  if (root) std::fprintf(stderr, "sedd-parity: unknown command '%s'\n%s\n", cmd.c_str(), usage.c_str());
  return tools::kExitBadInput;
}
