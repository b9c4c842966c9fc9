// sedd-sample: text from a checkpoint with the Euler or analytic sampler; prefix, suffix and
// arbitrary position conditioning; samples split across MPI ranks (sample i depends only on the
// seed and i); JSONL output in sample order. Everything that can be refused (options, output
// paths, the checkpoints, the scorer's fit) is checked on every rank before any sampling.
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "distributed/control.h"
#include "eval/elbo.h"
#include "io/fs.h"
#include "objectives/objective.h"
#include "objectives/sampling.h"
#include "objectives/score.h"
#include "tool_common.h"

namespace po = boost::program_options;
using namespace sedd;

namespace {
// "12=65,13=66" -> positions and token ids
void parse_fixed(const std::string& spec, Constraint& c) {
  std::stringstream ss(spec);
  std::string item;
  while (std::getline(ss, item, ',')) {
    auto eq = item.find('=');
    SEDD_CHECK_OPTION(eq != std::string::npos, "--fix: expected POS=TOKEN_ID, got '{}'", item);
    try {
      c.positions.push_back(std::stoll(item.substr(0, eq)));
      c.tokens.push_back(std::stoll(item.substr(eq + 1)));
    } catch (const std::exception&) {
      fail_option("--fix: expected POS=TOKEN_ID with integers, got '{}'", item);
    }
  }
}

// The scorer of --score-with must read the samples as the sampled model's data: the same
// vocabulary, tokenizer and end-of-text id, and a window that holds a whole sample (an
// autoregressive scorer: any sample up to its window; a diffusion scorer bounds whole windows of
// its training length only). Returns a note when the tokenizers could not be compared.
std::string check_scorer(const tools::LoadedModel& scorer, const tools::LoadedModel& sampled, int64_t length) {
  const ModelConfig &s = scorer.model->cfg, &m = sampled.model->cfg;
  SEDD_CHECK_OPTION(s.tokens == m.tokens, "--score-with {}: the scorer has {} tokens, the sampled model {}",
                    scorer.path, s.tokens, m.tokens);
  const TokenizerMatch match = compare_tokenizers(scorer.info.tokenizer, sampled.info.tokenizer);
  SEDD_CHECK_OPTION(match != TokenizerMatch::Different,
                    "--score-with {}: the scorer was trained with another tokenizer than {} (both store one and they "
                    "differ): its perplexity of these samples would mean nothing",
                    scorer.path, sampled.path);
  SEDD_CHECK_OPTION(s.bos < 0 || m.bos < 0 || s.bos == m.bos,
                    "--score-with {}: the scorer's end-of-text id is {}, the sampled model's {}: other packing rules",
                    scorer.path, s.bos, m.bos);
  if (s.causal())
    SEDD_CHECK_OPTION(length <= s.length,
                      "--score-with {}: the samples have {} tokens, more than the autoregressive scorer's window of {}",
                      scorer.path, length, s.length);
  else
    SEDD_CHECK_OPTION(length == s.length,
                      "--score-with {}: the samples have {} tokens, the {} scorer's window is {}: a diffusion scorer "
                      "bounds whole windows of its training length only (sample --length {}, or score with an "
                      "autoregressive model)",
                      scorer.path, length, s.objective, s.length, s.length);
  if (match == TokenizerMatch::Same) return "";
  return fmt::format("tokenizer check skipped: the scorer's tokenizer is {}, the sampled model's {}",
                     describe_tokenizer(scorer.info.tokenizer), describe_tokenizer(sampled.info.tokenizer));
}

std::string eta(double s) {
  if (!std::isfinite(s) || s < 0) return "?";
  return s >= 60 ? fmt::format("{}m{:02d}s", static_cast<int>(s) / 60, static_cast<int>(s) % 60)
                 : fmt::format("{:.0f}s", s);
}
}  // namespace

int main(int argc, char** argv) {
  Runtime& rt = Runtime::init(&argc, &argv, "cpu");
  std::string checkpoint, predictor = "analytic", prefix, suffix, fixed, out, device = "auto", precision = "auto";
  std::string score_with, stats_json;
  int64_t num_samples = 4, steps = 128, length = 0, seed = 0, batch = 16, block_size = 0, score_mc = 8;
  double temperature = 1.0, top_p = 1.0, stop_entropy = 0;
  bool float64 = false, no_cache = false, raw_weights = false, float32_draws = false, stop_at_eot = false;
  std::string block_sampler = "first-hitting";
  std::string corrector;
  po::options_description desc("sedd-sample: text from a trained SEDD model");
  desc.add_options()("help,h", "show this help")(
      "checkpoint", po::value(&checkpoint)->required(), "run folder, checkpoint folder or model.h5")(
      "num-samples", po::value(&num_samples)->default_value(4), "samples to draw (split across ranks)")(
      "steps", po::value(&steps)->default_value(128), "reverse-process steps")(
      "predictor", po::value(&predictor)->default_value("analytic"), "euler | analytic (score-entropy models)")(
      "temperature", po::value(&temperature)->default_value(1.0), "autoregressive models: logits / temperature")(
      "top-p", po::value(&top_p)->default_value(1.0),
      "autoregressive and block diffusion models: nucleus sampling (1: off)")(
      "block-sampler", po::value(&block_sampler)->default_value("first-hitting"),
      "block diffusion models: first-hitting (one token per network call) | ddpm (--steps per block)")(
      "stop-at-eot", po::bool_switch(&stop_at_eot),
      "block diffusion models: end a sample at its first end-of-text (the rest: end-of-text)")(
      "stop-entropy", po::value(&stop_entropy)->default_value(0),
      "block diffusion models: end a sample when its last 256 tokens have less entropy (nats; 4 as the authors; 0: off)")(
      "length", po::value(&length)->default_value(0),
      "tokens per sample (0: the training length; longer: generated block by block)")(
      "block-size", po::value(&block_size)->default_value(0),
      "beyond the training length: new tokens per block, each conditioned on the previous ones (0: half the window)")(
      "score-with", po::value(&score_with),
      "a second checkpoint (autoregressive: exact; diffusion: its bound) that scores the samples: generative "
      "perplexity and unigram entropy")(
      "score-mc-samples", po::value(&score_mc)->default_value(8), "Monte Carlo draws when the scorer is a diffusion model")(
      "stats", po::value(&stats_json), "write the samples' statistics (generative perplexity, entropy) as JSON")(
      "prefix", po::value(&prefix), "text the samples start with")(
      "suffix", po::value(&suffix), "text the samples end with")(
      "fix", po::value(&fixed), "more fixed positions: POS=TOKEN_ID[,POS=TOKEN_ID...]")(
      "seed", po::value(&seed)->default_value(0), "sample i depends only on (seed, i)")(
      "batch-size", po::value(&batch)->default_value(16), "samples per forward pass on each rank")(
      "device", po::value(&device)->default_value("auto"), "cpu | cuda | auto (GPU = local rank)")(
      "precision", po::value(&precision)->default_value("auto"), "network in bf16 or fp32 (auto: bf16 on GPUs)")(
      "float64", po::bool_switch(&float64), "probabilities and categorical weights in float64")(
      "corrector", po::value(&corrector),
      "flow matching models: divergence-free corrector c(t) = A t^B (1-t)^C, given as A,B,C (e.g. 12,2,0.25)")(
      "float32-draws", po::bool_switch(&float32_draws),
      "flow matching models: categorical draws in float32 (default float64)")(
      "no-cache", po::bool_switch(&no_cache), "disable exact caching (models without time conditioning)")(
      "no-ema", po::bool_switch(&raw_weights), "use the raw weights instead of the EMA")(
      "out", po::value(&out), "JSONL output (default: print to stdout)");
  po::variables_map given;
  if (int rc = tools::parse_options("sedd-sample", desc, argc, argv, rt.is_root(), &given); rc >= 0) return rc;
  auto set = [&](const char* option) { return given.count(option) && !given[option].defaulted(); };
  ControlPlane control;  // a collective: made before any rank may fail
  tools::LoadedModel m, scorer;
  Constraint cons;
  SamplerConfig sc;
  std::string scorer_note;
  const int refused = tools::agree(rt, "sedd-sample", [&] {
    if (rt.is_root()) {  // rank 0 writes the outputs: found unwritable now, not after sampling
      tools::check_writable(out, "--out");
      tools::check_writable(stats_json, "--stats");
    }
    SEDD_CHECK_OPTION(num_samples > 0 && batch > 0, "--num-samples and --batch-size must be positive");
    SEDD_CHECK_OPTION(length >= 0 && block_size >= 0, "--length and --block-size must be >= 0");
    rt.select_device(device);
    m = tools::load_checkpoint(checkpoint, !raw_weights, rt.device, tools::use_bf16(precision, rt.device));
    const auto& cfg = m.model->cfg;
    // Options for another kind of model are refused, never silently ignored.
    std::set<std::string> sampler_options;
    for (const char* opt :
         {"predictor", "temperature", "top-p", "corrector", "float32-draws", "block-sampler", "stop-at-eot", "stop-entropy"})
      if (set(opt)) sampler_options.insert(opt);
    check_sampler_options(cfg, sampler_options, m.path);
    if (length <= 0) length = cfg.length;
    auto encode = [&](const std::string& text, const char* opt) {
      SEDD_CHECK_OPTION(m.tokenizer() != nullptr,
                        "{}: the checkpoint stores no tokenizer, so {} cannot be encoded; use --fix", m.path, opt);
      return m.tokenizer()->encode(text);
    };
    if (!prefix.empty()) {
      auto ids = encode(prefix, "--prefix");
      for (size_t i = 0; i < ids.size(); ++i) cons.positions.push_back(static_cast<int64_t>(i)), cons.tokens.push_back(ids[i]);
    }
    if (!suffix.empty()) {
      auto ids = encode(suffix, "--suffix");
      for (size_t i = 0; i < ids.size(); ++i)
        cons.positions.push_back(length - static_cast<int64_t>(ids.size()) + static_cast<int64_t>(i)), cons.tokens.push_back(ids[i]);
    }
    if (!fixed.empty()) parse_fixed(fixed, cons);
    sc.model = cfg;
    sc.temperature = temperature;
    sc.top_p = top_p;
    sc.predictor = predictor;
    sc.steps = steps;
    sc.float64 = float64;
    sc.float32_draws = float32_draws;
    sc.block_sampler = block_sampler;
    sc.stop_at_eot = stop_at_eot;
    sc.stop_entropy = stop_entropy;
    const bool any_length = objective_of(cfg).samples_any_length();
    SEDD_CHECK_OPTION(!any_length || !set("block-size"),
                      "--block-size: {} is a {} model, which generates in its trained blocks of {} tokens; --block-size "
                      "is for the other models' generation past the window",
                      m.path, cfg.objective, cfg.block_size);
    if (!corrector.empty()) {
      std::vector<double> abc;
      for (const auto& part : fs::split_nonempty(corrector, ',')) {
        char* end = nullptr;
        abc.push_back(std::strtod(part.c_str(), &end));
        SEDD_CHECK_OPTION(end && *end == '\0', "--corrector: '{}' is not a number", part);
      }
      SEDD_CHECK_OPTION(abc.size() == 1 || abc.size() == 3, "--corrector takes A or A,B,C, got '{}'", corrector);
      sc.corrector_a = abc[0];
      if (abc.size() == 3) sc.corrector_b = abc[1], sc.corrector_c = abc[2];
    }
    sc.seed = static_cast<uint64_t>(seed);
    sc.validate();
    cons.validate(length, cfg.tokens);
    if (block_size <= 0) block_size = cfg.length / 2;
    SEDD_CHECK_OPTION(length <= cfg.length || any_length || !(!suffix.empty() || !fixed.empty()),
                      "--suffix and --fix need --length <= the training length ({}): block generation conditions the "
                      "first block only (use --prefix)",
                      cfg.length);
    if (!score_with.empty()) {
      scorer = tools::load_checkpoint(score_with, true, rt.device, m.model->bf16);
      scorer_note = check_scorer(scorer, m, length);
    }
  });
  if (refused >= 0) return refused;
  try {
    const auto& cfg = m.model->cfg;
    // What drew the samples (the rows' "predictor"): a predictor for sedd models only.
    const Objective& objective = objective_of(cfg);
    const std::string sampler = objective.sampler_name(sc);
    if (rt.is_root() && !scorer_note.empty()) std::fprintf(stderr, "[sample] --score-with: %s\n", scorer_note.c_str());
    auto graph = make_graph(cfg.graph, cfg.tokens);
    auto noise = make_noise(cfg.noise);
    auto mine = shard_range(num_samples, rt.world, rt.rank);
    DDiTScore score(m.model, !no_cache);
    const int64_t model_calls = objective.sampler_steps(sc, length);  // a row's "steps"
    if (rt.is_root())
      std::fprintf(stderr, "[sample] %s: %lld samples x %lld tokens, %s, %lld steps, %d ranks on %s (%s)%s\n",
                   m.path.c_str(), static_cast<long long>(num_samples), static_cast<long long>(length),
                   sampler.c_str(), static_cast<long long>(model_calls), rt.world, rt.device_name().c_str(),
                   m.model->bf16 ? "bf16" : "fp32", score.caching() ? ", exact caching" : "");
    const bool tty = isatty(STDERR_FILENO);
    auto start = std::chrono::steady_clock::now();
    double last_print = -1;
    std::vector<int64_t> ids;
    const int64_t my_batches = (mine.size() + batch - 1) / batch;
    for (int64_t b = mine.begin, k = 0; b < mine.end; b += batch, ++k) {
      int64_t n = std::min(batch, mine.end - b);
      auto progress = [&](int64_t s, int64_t total) {
        if (!rt.is_root()) return;
        double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        if (s != total && secs - last_print < (tty ? 0.2 : 5.0)) return;
        last_print = secs;
        double done = (static_cast<double>(k) + static_cast<double>(s) / total) / std::max<int64_t>(1, my_batches);
        double rate = done * mine.size() / std::max(secs, 1e-9);  // rank 0's samples/s
        std::fprintf(stderr, "%s[sample] %3.0f%% | batch %lld/%lld step %lld/%lld | %.2f samples/s per rank | ETA %s%s",
                     tty ? "\r" : "", 100 * done, static_cast<long long>(k + 1), static_cast<long long>(my_batches),
                     static_cast<long long>(s), static_cast<long long>(total), rate, eta(secs / done - secs).c_str(),
                     tty ? "   " : "\n");
      };
      auto sample_ids = torch::arange(b, b + n, torch::kLong);
      auto x = (length > cfg.length && !objective.samples_any_length() ? sample_blocks(*graph, *noise, score, length, cfg.length, block_size, sc, cons,
                                                    sample_ids, rt.device, progress)
                                    : sample(*graph, *noise, score, length, sc, cons, sample_ids, rt.device, progress))
                   .cpu()
                   .contiguous();
      ids.insert(ids.end(), x.data_ptr<int64_t>(), x.data_ptr<int64_t>() + x.numel());
    }
    if (rt.is_root() && tty) std::fprintf(stderr, "\n");
    // Generative perplexity under the scorer and unigram entropy, per sample (each rank its own).
    const int64_t mine_n = mine.size();
    std::vector<double> sample_nll(num_samples, 0.0), sample_entropy(num_samples, 0.0);
    if (!score_with.empty()) {
      const auto& scfg = scorer.model->cfg;
      auto sgraph = make_graph(scfg.graph, scfg.tokens);
      auto snoise = make_noise(scfg.noise);
      DDiTScore sscore(scorer.model, false);
      ElboConfig ec{std::max<int64_t>(2, score_mc + score_mc % 2), "antithetic", static_cast<uint64_t>(seed)};
      ec.model = scfg;
      auto all_mine = torch::tensor(ids, torch::kLong).view({mine_n, length});
      for (int64_t i = 0; i < mine_n; i += batch) {
        auto xb = all_mine.narrow(0, i, std::min(batch, mine_n - i));
        auto r = elbo_batch(*sgraph, *snoise, sscore, xb, mine.begin + i, ec, rt.device);
        for (int64_t k = 0; k < xb.size(0); ++k) sample_nll[mine.begin + i + k] = r.bound[k].item<double>() / length;
      }
    }
    for (int64_t i = 0; i < mine_n; ++i) {
      auto row = torch::tensor(std::vector<int64_t>(ids.begin() + i * length, ids.begin() + (i + 1) * length), torch::kLong);
      auto f = torch::bincount(row).to(torch::kDouble) / static_cast<double>(length);
      sample_entropy[mine.begin + i] = -(f * torch::where(f > 0, f.log(), torch::zeros_like(f))).sum().item<double>();
    }
    sample_nll = control.sum(sample_nll, "sample scores");
    sample_entropy = control.sum(sample_entropy, "sample entropies");
    // Rank order is sample order: each rank drew a contiguous range.
    std::vector<int64_t> all = control.gather_to_root(ids, "gathering samples");
    if (rt.is_root()) {
      double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      std::ofstream file;
      if (!out.empty()) {
        file.open(out);
        SEDD_CHECK(file.good(), "{}: cannot write the output file", out);
      }
      for (int64_t i = 0; i < num_samples; ++i) {
        std::vector<int64_t> row(all.begin() + i * length, all.begin() + (i + 1) * length);
        nlohmann::ordered_json j = {{"index", i}, {"seed", seed}, {"steps", model_calls}, {"predictor", sampler}};
        j["unigram_entropy"] = sample_entropy[i];
        if (!score_with.empty()) j["gen_perplexity"] = std::exp(sample_nll[i]);
        if (m.tokenizer()) j["text"] = m.tokenizer()->decode(row);
        j["ids"] = row;
        std::string line = j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
        if (file.is_open()) file << line << "\n";
        else std::printf("%s\n", line.c_str());
      }
      if (file.is_open()) {
        file.close();
        SEDD_CHECK(!file.fail(), "{}: writing the samples failed (disk full?)", out);
      }
      auto mean_sd = [](const std::vector<double>& v) {
        double m = 0, q = 0;
        for (double x : v) m += x / v.size();
        for (double x : v) q += (x - m) * (x - m) / std::max<size_t>(1, v.size() - 1);
        return std::pair<double, double>{m, std::sqrt(q)};
      };
      std::vector<double> ppl;
      for (double nll : sample_nll) ppl.push_back(std::exp(nll));
      auto [h, h_sd] = mean_sd(sample_entropy);
      auto [nll, nll_sd] = mean_sd(sample_nll);
      auto [p, p_sd] = mean_sd(ppl);
      nlohmann::ordered_json stats = {{"samples", num_samples}, {"length", length},
                                      {"unigram_entropy_mean", h}, {"unigram_entropy_sd", h_sd}};
      if (!score_with.empty()) {
        stats["scorer"] = scorer.path;
        stats["scorer_objective"] = scorer.model->cfg.objective;
        stats["scorer_tokenizer_check"] = scorer_note.empty() ? "same" : scorer_note;
        stats["gen_perplexity"] = std::exp(nll);  // exp of the mean nats/token over all samples' tokens
        stats["gen_perplexity_mean"] = p;
        stats["gen_perplexity_sd"] = p_sd;
        stats["gen_nats_per_token_sd"] = nll_sd;
        std::fprintf(stderr, "[sample] generative perplexity under %s (%s): %.3f (per sample %.3f +- %.3f)\n",
                     scorer.path.c_str(), objective_of(scorer.model->cfg).exact(scorer.model->cfg) ? "exact" : "its bound", std::exp(nll),
                     p, p_sd);
      }
      std::fprintf(stderr, "[sample] unigram entropy per sample: %.3f +- %.3f nats\n", h, h_sd);
      if (!stats_json.empty()) {
        std::ofstream sf(stats_json);
        sf << stats.dump(2) << "\n";
        sf.close();
        SEDD_CHECK(!sf.fail(), "{}: cannot write", stats_json);
      }
      std::fprintf(stderr, "[sample] %lld samples in %.2f s: %.2f samples/s, %.0f tokens/s; rank 0 ran the body %lld "
                   "times (%lld sample rows, %lld reused)%s%s\n",
                   static_cast<long long>(num_samples), secs, num_samples / secs, num_samples * length / secs,
                   static_cast<long long>(score.forwards()), static_cast<long long>(score.rows_evaluated()),
                   static_cast<long long>(score.rows_reused()), out.empty() ? "" : ", written to ", out.c_str());
    }
  } catch (const std::exception& e) {
    return tools::end_job(rt, "sedd-sample", e);
  }
  return tools::kExitOk;
}
