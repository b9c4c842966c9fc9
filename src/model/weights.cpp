// Weight files; see weights.h.
#include "model/weights.h"

#include <filesystem>
#include <set>

#include "io/error.h"
#include "io/fs.h"

namespace sedd {

StateDict state_dict(const torch::nn::Module& m) {
  StateDict sd;
  for (const auto& p : m.named_parameters(/*recurse=*/true)) sd[p.key()] = p.value();
  for (const auto& b : m.named_buffers(/*recurse=*/true)) sd[b.key()] = b.value();
  return sd;
}

torch::Tensor flat_parameters(const torch::nn::Module& m) {
  std::vector<torch::Tensor> flat;
  for (const auto& p : m.parameters()) flat.push_back(p.detach().reshape({-1}));
  return torch::cat(flat).to(torch::kCPU, torch::kDouble);
}

void load_state_dict(torch::nn::Module& m, const StateDict& sd, const std::string& source) {
  StateDict target = state_dict(m);
  std::vector<std::string> missing, extra, misshaped;
  for (const auto& [name, t] : target) {
    auto it = sd.find(name);
    if (it == sd.end()) missing.push_back(name);
    else if (it->second.sizes() != t.sizes())
      misshaped.push_back(fmt::format("{} (file {}, model {})", name, c10::str(it->second.sizes()), c10::str(t.sizes())));
  }
  for (const auto& [name, t] : sd)
    if (!target.count(name)) extra.push_back(name);
  if (!missing.empty() || !extra.empty() || !misshaped.empty()) {
    auto list = [](const std::vector<std::string>& v) {
      std::string s;
      for (size_t i = 0; i < v.size() && i < 8; ++i) s += (i ? ", " : "") + v[i];
      if (v.size() > 8) s += fmt::format(", ... ({} in all)", v.size());
      return s.empty() ? std::string("none") : s;
    };
    fail_input("{}: weights do not fit this model (another model shape?). missing: {}; unexpected: {}; mis-shaped: {}",
               source, list(missing), list(extra), list(misshaped));
  }
  torch::NoGradGuard no_grad;
  for (auto& [name, t] : target) t.copy_(sd.at(name));
}

StateDict read_state_dict(const h5::File& f, const std::string& group) {
  StateDict sd;
  for (const auto& name : f.children(group)) {
    auto dtype = f.stored_dtype(group + "/" + name);
    SEDD_CHECK(dtype == torch::kFloat || dtype == torch::kDouble || dtype == torch::kBFloat16,
               "{}: weight '{}' has dtype {}, expected floating point", f.path(), name, c10::toString(dtype));
    sd[name] = f.read(group + "/" + name, torch::kFloat);
  }
  return sd;
}

void write_state_dict(h5::File& f, const std::string& group, const StateDict& sd) {
  f.create_group(group);
  for (const auto& [name, t] : sd) f.write(group + "/" + name, t.to(torch::kFloat));
}

ModelConfig read_model_config(const h5::File& f, const std::string& obj) {
  ModelConfig c;
  auto need_int = [&](const char* key) {
    SEDD_CHECK_INPUT(f.has_attr(obj, key), "{}: model config attribute '{}' is missing on '{}'", f.path(), key, obj);
    return f.attr_int(obj, key);
  };
  c.tokens = need_int("tokens");
  c.hidden_size = need_int("hidden_size");
  c.n_heads = need_int("n_heads");
  c.n_blocks = need_int("n_blocks");
  c.cond_dim = need_int("cond_dim");
  c.length = f.has_attr(obj, "length") ? f.attr_int(obj, "length") : c.length;
  SEDD_CHECK_INPUT(f.has_attr(obj, "graph"), "{}: model config attribute 'graph' is missing on '{}'", f.path(), obj);
  c.graph = f.attr_string(obj, "graph");
  c.scale_by_sigma = f.has_attr(obj, "scale_by_sigma") ? f.attr_int(obj, "scale_by_sigma") != 0 : c.graph == "absorb";
  c.time_conditioning = f.has_attr(obj, "time_conditioning") ? f.attr_int(obj, "time_conditioning") != 0 : true;
  c.dropout = f.has_attr(obj, "dropout") ? f.attr_double(obj, "dropout") : 0.0;
  if (f.has_attr(obj, "noise")) c.noise.kind = f.attr_string(obj, "noise");
  if (f.has_attr(obj, "eps")) c.noise.eps = f.attr_double(obj, "eps");
  if (f.has_attr(obj, "sigma_min")) c.noise.sigma_min = f.attr_double(obj, "sigma_min");
  if (f.has_attr(obj, "sigma_max")) c.noise.sigma_max = f.attr_double(obj, "sigma_max");
  if (f.has_attr(obj, "objective")) c.objective = f.attr_string(obj, "objective");  // absent: SEDD weights
  if (f.has_attr(obj, "timesteps")) c.timesteps = f.attr_int(obj, "timesteps");
  if (f.has_attr(obj, "bos")) c.bos = f.attr_int(obj, "bos");
  if (f.has_attr(obj, "source")) c.source = f.attr_string(obj, "source");
  if (f.has_attr(obj, "kappa_power")) c.kappa_power = f.attr_double(obj, "kappa_power");
  if (f.has_attr(obj, "dfm_loss")) c.dfm_loss = f.attr_string(obj, "dfm_loss");
  if (f.has_attr(obj, "block_size")) c.block_size = f.attr_int(obj, "block_size");
  if (f.has_attr(obj, "clip")) c.clip = f.attr_string(obj, "clip");
  try {
    c.validate();
  } catch (const Error& e) {
    fail_input("{}: invalid model config: {}", f.path(), e.what());
  }
  return c;
}

void write_model_config(h5::File& f, const std::string& obj, const ModelConfig& c) {
  f.set_attr(obj, "tokens", c.tokens);
  f.set_attr(obj, "graph", c.graph);
  f.set_attr(obj, "hidden_size", c.hidden_size);
  f.set_attr(obj, "n_heads", c.n_heads);
  f.set_attr(obj, "n_blocks", c.n_blocks);
  f.set_attr(obj, "cond_dim", c.cond_dim);
  f.set_attr(obj, "length", c.length);
  f.set_attr(obj, "dropout", c.dropout);
  f.set_attr(obj, "scale_by_sigma", int64_t{c.scale_by_sigma});
  f.set_attr(obj, "time_conditioning", int64_t{c.time_conditioning});
  f.set_attr(obj, "noise", c.noise.kind);
  f.set_attr(obj, "eps", c.noise.eps);
  f.set_attr(obj, "sigma_min", c.noise.sigma_min);
  f.set_attr(obj, "sigma_max", c.noise.sigma_max);
  f.set_attr(obj, "objective", c.objective);
  f.set_attr(obj, "timesteps", c.timesteps);
  f.set_attr(obj, "bos", c.bos);
  if (c.block_size > 0) {  // bd3's settings (the clip window the training chose last)
    f.set_attr(obj, "block_size", c.block_size);
    f.set_attr(obj, "clip", c.clip);
  }
  if (!c.source.empty()) {  // dfm's settings (the other objectives leave them unset)
    f.set_attr(obj, "source", c.source);
    f.set_attr(obj, "kappa_power", c.kappa_power);
    f.set_attr(obj, "dfm_loss", c.dfm_loss);
  }
}

void save_model_file(const std::string& path, const ModelConfig& cfg, const StateDict& weights,
                     const StateDict& ema, const ModelFileInfo& info) {
  std::string tmp = fs::temp_name(path);
  {
    h5::File f(tmp, h5::Mode::Create);
    f.set_attr("/", "format", std::string("sedd-model"));
    f.set_attr("/", "format_version", kModelFormatVersion);
    write_model_config(f, "/", cfg);
    f.set_attr("/", "step", info.step);
    f.set_attr("/", "tokens_seen", info.tokens_seen);
    if (!info.tokenizer.empty()) f.set_attr("/", "tokenizer", info.tokenizer);
    write_state_dict(f, "/model", weights);
    if (!ema.empty()) write_state_dict(f, "/ema", ema);
    f.close();
  }
  fs::commit_file(tmp, path);
}

DDiT load_model_file(const std::string& path, bool use_ema, ModelFileInfo* info) {
  h5::File f(path, h5::Mode::Read);
  SEDD_CHECK_INPUT(f.is_group("/model"), "{}: not a sedd model file (no /model group)", path);
  const int64_t version = f.has_attr("/", "format_version") ? f.attr_int("/", "format_version") : 1;
  if (version < 1 || version > kModelFormatVersion)
    throw OptionError(fmt::format("{}: model file format_version {} is not one this build reads (1..{}); a newer sedd "
                                  "wrote it",
                                  path, version, kModelFormatVersion));
  ModelConfig cfg = read_model_config(f, "/");
  DDiT model(cfg);
  bool has_ema = f.is_group("/ema");
  load_state_dict(*model, read_state_dict(f, use_ema && has_ema ? "/ema" : "/model"), path);
  if (info) {
    info->step = f.has_attr("/", "step") ? f.attr_int("/", "step") : 0;
    info->tokens_seen = f.has_attr("/", "tokens_seen") ? f.attr_int("/", "tokens_seen") : 0;
    info->has_ema = has_ema;
    info->tokenizer = f.has_attr("/", "tokenizer") ? f.attr_string("/", "tokenizer") : "";
  }
  return model;
}

}  // namespace sedd
