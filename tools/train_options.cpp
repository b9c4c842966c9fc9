// sedd-train's option table; see train_options.h.
#include "train_options.h"

#include <fmt/format.h>

#include <filesystem>
#include <fstream>
#include <map>

#include "io/error.h"
#include "io/fs.h"
#include "train/checkpoint.h"
#include "train/fingerprint.h"

namespace po = boost::program_options;

namespace sedd::tools {

namespace {
template <typename T>
std::string show(const T& v) {
  if constexpr (std::is_same_v<T, bool>) return v ? "true" : "false";
  else return fmt::format("{}", v);
}

template <typename T>
void add(OptionTable& t, const char* name, T* field, const char* help) {
  t.desc.add_options()(name, po::value<T>(field)->default_value(*field, show(*field)), help);
  t.printers.emplace_back(name, [field] { return show(*field); });
}
}  // namespace

void build_train_options(OptionTable& t, TrainingConfig& c) {
  t.config = &c;
  t.desc.add_options()("help,h", po::bool_switch(&t.help), "show this help")(
      "config", po::value(&t.config_file), "INI file with [run] [data] [model] [diffusion] [train] sections")(
      "plan", po::bool_switch(&t.plan), "print the memory plan per rank (plan.* keys) and exit: no training, no run folder");
  add(t, "run.dir", &c.run.dir, "run folder: checkpoints/ and metrics.jsonl");
  add(t, "run.seed", &c.run.seed, "seed of weights, data order and noise draws");
  add(t, "run.device", &c.run.device, "cpu | cuda | auto (GPU = local rank)");
  add(t, "data.train", &c.data.train, "training shards (glob or comma-separated list)");
  add(t, "data.valid", &c.data.valid, "validation shards (optional)");
  add(t, "data.seq_len", &c.data.seq_len, "tokens per training sequence");
  add(t, "data.prefetch", &c.data.prefetch, "batches read ahead per rank (0: none)");
  add(t, "model.hidden_size", &c.model.hidden_size, "transformer width");
  add(t, "model.n_heads", &c.model.n_heads, "attention heads");
  add(t, "model.n_blocks", &c.model.n_blocks, "transformer blocks");
  add(t, "model.cond_dim", &c.model.cond_dim, "width of the sigma conditioning");
  add(t, "model.dropout", &c.model.dropout, "dropout probability");
  add(t, "model.scale_by_sigma", &c.model.scale_by_sigma, "absorbing graph: shift the score by -log(e^sigma - 1)");
  add(t, "model.time_conditioning", &c.model.time_conditioning, "feed sigma to the network (absorbing: may be off)");
  add(t, "diffusion.objective", &c.model.objective, "sedd | mdlm | d3pm | ar | dfm (see docs/training.md, Objectives)");
  add(t, "diffusion.graph", &c.model.graph, "absorb | uniform");
  add(t, "diffusion.noise", &c.model.noise.kind, "loglinear | geometric | cosine");
  add(t, "diffusion.timesteps", &c.model.timesteps, "d3pm: steps T of the discrete chain");
  add(t, "diffusion.lambda_ce", &c.train.lambda_ce, "d3pm: weight of the auxiliary cross entropy");
  add(t, "diffusion.source", &c.model.source, "dfm: mask | uniform (default mask; sets the graph)");
  add(t, "diffusion.kappa_power", &c.model.kappa_power, "dfm: n of the scheduler kappa_t = t^n (default 1)");
  add(t, "diffusion.dfm_loss", &c.model.dfm_loss, "dfm: generalized_kl | cross_entropy (default generalized_kl)");
  add(t, "diffusion.block_size", &c.model.block_size, "bd3: tokens per block L' (divides data.seq_len)");
  add(t, "diffusion.clip", &c.model.clip, "bd3: clipped schedule 'beta,omega' (default 1e-3,1; 1,1 for block_size 1)");
  add(t, "diffusion.clip_search_every", &c.train.clip_search_every,
      "bd3: choose the clipped window again every this many steps (EMA weights, data.valid; 0: never)");
  add(t, "diffusion.eps", &c.model.noise.eps, "log-linear / cosine schedule epsilon");
  add(t, "diffusion.sigma_min", &c.model.noise.sigma_min, "geometric schedule sigma_min");
  add(t, "diffusion.sigma_max", &c.model.noise.sigma_max, "geometric schedule sigma_max");
  add(t, "train.steps", &c.train.steps, "optimizer steps");
  add(t, "train.batch_size", &c.train.batch_size, "global batch (sequences, all ranks together)");
  add(t, "train.micro_batch_size", &c.train.micro_batch_size, "sequences per rank per forward (0: batch_size / ranks)");
  add(t, "train.lr", &c.train.lr, "peak learning rate");
  add(t, "train.warmup", &c.train.warmup, "linear warmup steps");
  add(t, "train.warmup_from_zero", &c.train.warmup_from_zero,
      "warmup step k at lr (k-1)/warmup, the first at 0 (MDLM's schedule), instead of k/warmup");
  add(t, "train.loss_mean", &c.train.loss_mean,
      "sequence | token: the gradient of the batch mean of per-sequence losses (SEDD) or of the token mean (MDLM)");
  add(t, "train.schedule", &c.train.schedule, "constant | cosine (after warmup)");
  add(t, "train.min_lr_ratio", &c.train.min_lr_ratio, "cosine floor as a fraction of lr");
  add(t, "train.weight_decay", &c.train.weight_decay, "decoupled weight decay");
  add(t, "train.beta1", &c.train.beta1, "Adam beta1");
  add(t, "train.beta2", &c.train.beta2, "Adam beta2");
  add(t, "train.adam_eps", &c.train.adam_eps, "Adam epsilon");
  add(t, "train.grad_clip", &c.train.grad_clip, "global gradient-norm clip (<= 0: off)");
  add(t, "train.ema", &c.train.ema, "EMA decay of the weights (0: off)");
  add(t, "train.precision", &c.train.precision, "fp32 | bf16 (CUDA autocast) | fp64 (CPU checks)");
  add(t, "train.log_every", &c.train.log_every, "steps between progress lines / metrics rows");
  add(t, "train.eval_every", &c.train.eval_every, "steps between validation losses (0: never)");
  add(t, "train.eval_batches", &c.train.eval_batches, "global batches per validation");
  add(t, "train.ckpt_every", &c.train.ckpt_every, "steps between checkpoints (0: only at the end; -1: never)");
  add(t, "train.keep_ckpts", &c.train.keep_ckpts, "checkpoints kept");
  add(t, "train.bucket_elems", &c.train.bucket_elems, "gradient bucket (elements) reduced while backward runs");
  add(t, "train.zero_stage", &c.train.zero_stage, "1: optimizer state sharded over ranks; 2: gradients too");
  add(t, "train.zero2_reduce", &c.train.zero2_reduce,
      "stage 2 with accumulation: reduce-scatter every micro_batch (least memory) or once per step");
  add(t, "train.time_sampling", &c.train.time_sampling, "iid | antithetic | stratified diffusion times over the global batch");
  add(t, "train.fused_loss", &c.train.fused_loss, "project only rows with a loss, fused with the loss (false: full logits)");
  add(t, "train.fused_kernels", &c.train.fused_kernels, "GPU: fused CUDA kernels for LayerNorm/modulation, residuals, rotary");
  add(t, "train.loss_chunk_elems", &c.train.loss_chunk_elems, "logits per chunk of the fused loss");
  add(t, "train.peak_tflops", &c.train.peak_tflops, "GPU peak TFLOP/s for MFU (0: from the GPU's name)");
  add(t, "train.init_from", &c.train.init_from, "model.h5 whose raw weights start the run (empty: random init)");
  add(t, "train.activation_checkpointing", &c.train.activation_checkpointing,
      "none | blocks | every:K: blocks that recompute their activations in backward (less memory, more compute)");
  add(t, "plan.memory_gb", &c.plan.memory_gb, "memory per rank the plan fits the micro-batch to (0: the GPU's)");
  add(t, "plan.world_size", &c.plan.world_size, "sedd-train --plan: ranks to plan for (0: the launched world size)");
  add(t, "plan.vocab", &c.plan.vocab, "sedd-train --plan: vocabulary size without data.train at hand (0: the data's)");
  add(t, "resume.allow", &c.resume.allow, "checked settings that may differ from the checkpoint's (comma list)");
  add(t, "dist.timeout_s", &c.dist.timeout_s, "watchdog: a collective without progress this long ends the job (0: off)");
  add(t, "debug.nan_at_step", &c.debug.nan_at_step, "tests only: rank 0's loss is NaN at this step (0: off)");
}

void parse_train_options(OptionTable& t, int argc, char** argv) {
  po::variables_map vm;
  // The command line wins: stored first. No positional options: a stray word is refused.
  po::store(po::command_line_parser(argc, argv).options(t.desc).positional({}).run(), vm);
  for (const auto& [key, value] : vm)
    if (!value.defaulted()) t.command_line.insert(key);
  // --help answers before any check, also where a tool requires an option (sedd-parity record's --out).
  if (vm.count("help") && vm["help"].as<bool>()) {
    t.help = true;
    return;
  }
  if (vm.count("config")) {
    std::string file = vm["config"].as<std::string>();
    std::ifstream in(file);
    if (!in) throw std::runtime_error(file + ": cannot read the config file");
    try {
      po::store(po::parse_config_file(in, t.desc, /*allow_unregistered=*/false), vm);
    } catch (const po::error& e) {
      throw std::runtime_error(file + ": " + e.what() + " (keys are [section] name; see --help)");
    }
  }
  po::notify(vm);
  for (const auto& [key, value] : vm)
    if (!value.defaulted()) t.given.insert(key);
  if (!t.config || t.help) return;
  TrainingConfig& c = *t.config;
  const auto defaulted = apply_objective_defaults(c, t.given);
  for (const auto& key : defaulted) t.origin[key] = c.model.objective + " default";
  if (t.plan || c.run.dir.empty()) return;
  // A run started under other objective defaults resumes with the values it was trained with.
  Checkpointer checkpoints(c.run.dir, c.train.keep_ckpts);
  for (const auto& dir : checkpoints.resume_candidates()) {
    TrainState st;
    std::string saved_config;
    try {
      st = checkpoints.read_state(dir);
      saved_config = nlohmann::json::parse(fs::read_text(dir + "/state.json")).value("config", std::string());
    } catch (const std::exception&) {
      continue;  // the trainer reports an unreadable checkpoint and falls back
    }
    if (st.fingerprint.is_null()) break;
    for (const auto& line : keep_checkpoint_settings(c, st.fingerprint, saved_config, defaulted))
      t.origin[line.substr(0, line.find(' '))] = line.substr(line.find(':') + 2) + " in " + dir;
    break;
  }
}

void validate_settings(const TrainingConfig& c, int world) {
  try {
    c.validate(world);
  } catch (const OptionError&) {
    throw;
  } catch (const Error& e) {
    throw OptionError(e.what());
  }
}

std::string resolved_settings(const OptionTable& t) {
  std::map<std::string, std::vector<std::pair<std::string, std::string>>> sections;
  std::vector<std::string> order;
  for (const auto& [name, printer] : t.printers) {
    std::string n = name, sec = n.substr(0, n.find('.')), key = n.substr(n.find('.') + 1);
    if (!sections.count(sec)) order.push_back(sec);
    sections[sec].push_back({key, printer()});
  }
  std::string out;
  for (const auto& sec : order) {
    out += "[" + sec + "]\n";
    for (const auto& [k, v] : sections[sec]) {
      auto from = t.origin.find(sec + "." + k);
      if (from == t.origin.end()) out += fmt::format("{:<18} = {}\n", k, v);
      else out += fmt::format("{:<18} = {:<12} # {}\n", k, v, from->second);
    }
  }
  return out;
}

}  // namespace sedd::tools
