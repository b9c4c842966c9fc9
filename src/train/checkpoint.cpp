// Checkpoints; see checkpoint.h.
#include "train/checkpoint.h"

#include <filesystem>
#include <nlohmann/json.hpp>
#include <regex>

#include "io/error.h"
#include "io/fs.h"
#include "io/hdf5.h"

namespace sedd {

namespace stdfs = std::filesystem;
using json = nlohmann::json;

namespace {

// Unpadded, model-ordered parameter vector -> state dict of the model's parameters (buffers from
// the model).
StateDict unflatten(DDiT& model, const torch::Tensor& flat) {
  StateDict sd = state_dict(*model);
  int64_t off = 0;
  for (const auto& p : model->named_parameters()) {
    sd[p.key()] = flat.narrow(0, off, p.value().numel()).view(p.value().sizes());
    off += p.value().numel();
  }
  return sd;
}

torch::Tensor flatten(DDiT& model, const StateDict& sd) {
  std::vector<torch::Tensor> parts;
  for (const auto& p : model->named_parameters()) parts.push_back(sd.at(p.key()).reshape({-1}));
  return torch::cat(parts);
}

constexpr int64_t kOptimFormat = 2;  // 1: one contiguous range per rank; 2: pieces

}  // namespace

Checkpointer::Checkpointer(std::string run_dir, int64_t keep) : root_(run_dir + "/checkpoints"), keep_(keep) {}

std::string Checkpointer::save(const TrainState& st, DDiT& model, ShardedAdamW& opt, ControlPlane& control,
                               const std::string& config_text) {
  const std::string name = fmt::format("step_{}", st.step);
  const std::string final_dir = root_ + "/" + name, tmp_dir = root_ + "/." + name + ".partial";
  std::string err;
  if (control.rank() == 0) {
    try {
      stdfs::create_directories(root_);
      stdfs::remove_all(tmp_dir);
      stdfs::create_directories(tmp_dir + "/optim");
    } catch (const std::exception& e) {
      err = fmt::format("{}: cannot create checkpoint folder: {}", tmp_dir, e.what());
    }
  }
  control.agree(err, "creating " + tmp_dir);
  torch::Tensor ema = opt.gather_ema().to(torch::kCPU);  // collective
  const double adam_steps = opt.steps_taken();
  try {
    if (control.rank() == 0) {
      ModelFileInfo info{st.step, st.tokens_seen, true, st.tokenizer};
      StateDict weights;
      for (auto& [k, v] : state_dict(*model)) weights[k] = v.detach().to(torch::kCPU);
      save_model_file(tmp_dir + "/model.h5", model->cfg, weights, unflatten(model, ema), info);
    }
    std::string path = fmt::format("{}/optim/rank_{}.h5", tmp_dir, control.rank());
    std::string tmp = fs::temp_name(path);
    {
      h5::File f(tmp, h5::Mode::Create);
      f.write("/exp_avg", opt.exp_avg().to(torch::kCPU));
      f.write("/exp_avg_sq", opt.exp_avg_sq().to(torch::kCPU));
      std::vector<int64_t> pieces;
      for (const auto& p : opt.own_pieces()) pieces.insert(pieces.end(), {p.param_index, p.count, p.shard_offset});
      f.write("/pieces", torch::tensor(pieces, torch::kLong).view({-1, 3}));
      f.set_attr("/", "format_version", kOptimFormat);
      f.set_attr("/", "numel", opt.numel());
      f.set_attr("/", "adam_steps", static_cast<int64_t>(std::llround(adam_steps)));
      f.set_attr("/", "world", static_cast<int64_t>(control.size()));
      f.close();
    }
    fs::commit_file(tmp, path);
  } catch (const std::exception& e) {
    err = fmt::format("rank {}: writing checkpoint {}: {}", control.rank(), tmp_dir, e.what());
  }
  control.agree(err, "writing " + tmp_dir);
  if (control.rank() == 0) {
    try {
      json state = {{"format_version", kStateFormatVersion},
                    {"step", st.step},
                    {"data_position", st.data_position},
                    {"tokens_seen", st.tokens_seen},
                    {"elapsed_s", st.elapsed_s},
                    {"world_size", control.size()},
                    {"numel", opt.numel()},
                    {"fingerprint", st.fingerprint},
                    {"config", config_text}};
      if (st.stopped_for_requeue) state["stopped_for_requeue"] = true;
      // The tokenizer travels with the weights: a copy beside model.h5 for other tools.
      if (!st.tokenizer.empty() && st.tokenizer.front() == '{')
        fs::write_text_atomic(tmp_dir + "/tokenizer.json", st.tokenizer);
      fs::write_text_atomic(tmp_dir + "/state.json", state.dump(2));
      fs::fsync_path(tmp_dir + "/optim");
      fs::fsync_path(tmp_dir);
      stdfs::remove_all(final_dir);
      fs::rename_durably(tmp_dir, final_dir);                  // every file inside is already durable
      fs::write_text_atomic(root_ + "/latest", name + "\n");  // the commit point
      prune(st.step);
    } catch (const std::exception& e) {
      err = fmt::format("committing checkpoint {}: {}", final_dir, e.what());
    }
  }
  control.agree(err, "committing " + final_dir);
  return final_dir;
}

void Checkpointer::prune(int64_t newest_step) {
  std::vector<std::pair<int64_t, stdfs::path>> found;
  std::regex pat("step_([0-9]+)");
  std::smatch m;
  for (const auto& e : stdfs::directory_iterator(root_)) {
    std::string n = e.path().filename().string();
    if (std::regex_match(n, m, pat)) found.push_back({std::stoll(m[1]), e.path()});
    else if (n.rfind(".step_", 0) == 0) stdfs::remove_all(e.path());  // leftovers of interrupted saves
  }
  std::sort(found.begin(), found.end());
  int64_t excess = static_cast<int64_t>(found.size()) - keep_;
  for (int64_t i = 0; i < excess; ++i)
    if (found[i].first != newest_step) stdfs::remove_all(found[i].second);
}

namespace {
// step_N folders (committed checkpoints), newest first.
std::vector<std::pair<int64_t, std::string>> committed(const std::string& root) {
  std::vector<std::pair<int64_t, std::string>> found;
  if (!stdfs::is_directory(root)) return found;
  std::regex pat("step_([0-9]+)");
  std::smatch m;
  for (const auto& e : stdfs::directory_iterator(root)) {
    std::string n = e.path().filename().string();
    if (e.is_directory() && std::regex_match(n, m, pat)) found.push_back({std::stoll(m[1]), e.path().string()});
  }
  std::sort(found.rbegin(), found.rend());
  return found;
}

bool looks_complete(const std::string& dir) {
  return stdfs::exists(dir + "/model.h5") && stdfs::exists(dir + "/state.json") && stdfs::is_directory(dir + "/optim");
}
json read_state_json(const std::string& path) {
  try {
    return json::parse(fs::read_text(path));
  } catch (const json::exception& e) {
    fail("{}: not valid JSON ({})", path, e.what());
  }
}

}  // namespace

std::vector<std::string> Checkpointer::resume_candidates(std::string* note) const {
  std::vector<std::string> out;
  std::string pointer = root_ + "/latest", named;
  if (stdfs::exists(pointer)) {
    try {
      named = fs::read_text(pointer);
    } catch (const std::exception& e) {
      if (note) *note = fmt::format("{}: unreadable ({})", pointer, e.what());
    }
    while (!named.empty() && (named.back() == '\n' || named.back() == ' ')) named.pop_back();
    if (!named.empty()) {
      if (looks_complete(root_ + "/" + named)) out.push_back(root_ + "/" + named);
      else if (note) *note = fmt::format("{}: points to '{}', which is missing or incomplete", pointer, named);
    }
  } else if (note && !committed(root_).empty()) {
    *note = fmt::format("{}: missing", pointer);
  }
  for (const auto& [step, dir] : committed(root_))
    if ((out.empty() || dir != out.front()) && looks_complete(dir)) out.push_back(dir);
  return out;
}

std::optional<std::string> Checkpointer::latest() const {
  auto c = resume_candidates();
  if (c.empty()) return std::nullopt;
  return c.front();
}

TrainState Checkpointer::read_state(const std::string& dir) const {
  const std::string path = dir + "/state.json";
  json state = read_state_json(path);
  TrainState st;
  try {
    int64_t version = state.value("format_version", int64_t{1});
    if (version < 1 || version > kStateFormatVersion)
      throw OptionError(fmt::format("{}: format_version {} is not one this build reads (1..{}); a newer sedd wrote it",
                                    path, version, kStateFormatVersion));
    st.step = state.at("step").get<int64_t>();
    st.data_position = state.at("data_position").get<int64_t>();
    st.tokens_seen = state.at("tokens_seen").get<int64_t>();
    st.world = state.at("world_size").get<int>();
    st.elapsed_s = state.value("elapsed_s", 0.0);
    if (state.contains("fingerprint")) st.fingerprint = state["fingerprint"];
    st.stopped_for_requeue = state.value("stopped_for_requeue", false);
  } catch (const json::exception& e) {
    fail("{}: a field is missing or has the wrong type ({})", path, e.what());
  }
  return st;
}

TrainState Checkpointer::load(const std::string& dir, DDiT& model, ShardedAdamW& opt) {
  TrainState st = read_state(dir);
  json state = json::parse(fs::read_text(dir + "/state.json"));
  SEDD_CHECK(state.at("numel").get<int64_t>() == opt.numel(),
             "{}: checkpoint has {} parameters, this model {} (another model shape?)", dir,
             state.at("numel").get<int64_t>(), opt.numel());

  std::string model_path = dir + "/model.h5";
  h5::File mf(model_path, h5::Mode::Read);
  {
    torch::NoGradGuard ng;
    StateDict weights = read_state_dict(mf, "/model");
    load_state_dict(*model, weights, model_path);  // strict; writes through into the flat buffer
    StateDict ema = mf.is_group("/ema") ? read_state_dict(mf, "/ema") : weights;
    opt.load_ema(flatten(model, ema));
  }
  // A schedule the run chose while training (bd3's clipped window) continues as saved.
  if (model->cfg.block_size > 0 && mf.has_attr("/", "clip")) model->cfg.clip = mf.attr_string("/", "clip");

  // Moments: copy every saved piece that overlaps one of this rank's pieces (any old world size).
  const auto& own = opt.own_pieces();
  int64_t covered = 0, want = 0;
  for (const auto& p : own) want += p.count;
  auto m_dst = torch::zeros({opt.shard_numel()}, torch::kDouble), v_dst = torch::zeros_like(m_dst);
  for (int k = 0; k < st.world; ++k) {
    std::string path = fmt::format("{}/optim/rank_{}.h5", dir, k);
    h5::File f(path, h5::Mode::Read);
    int64_t version = f.has_attr("/", "format_version") ? f.attr_int("/", "format_version") : 1;
    if (version != 1 && version != kOptimFormat)
      throw OptionError(fmt::format(
          "{}: optimizer state format_version {} is not one this build reads (1 or {}); a newer sedd wrote it", path,
          version, kOptimFormat));
    std::vector<ShardedAdamW::Piece> saved;
    if (version == 1) {  // one range of the old contiguous layout (= parameter index space)
      int64_t b = f.attr_int("/", "range_begin"), e = std::min(f.attr_int("/", "range_end"), opt.numel());
      if (e > b) saved.push_back({b, e - b, 0});
    } else {
      auto pieces = f.read("/pieces", torch::kLong).view({-1, 3});
      auto acc = pieces.accessor<int64_t, 2>();
      for (int64_t i = 0; i < pieces.size(0); ++i) saved.push_back({acc[i][0], acc[i][1], acc[i][2]});
    }
    if (k == 0) opt.set_steps_taken(static_cast<double>(f.attr_int("/", "adam_steps")));
    torch::Tensor m, v;
    for (const auto& sp : saved)
      for (const auto& op : own) {
        int64_t lo = std::max(sp.param_index, op.param_index);
        int64_t hi = std::min(sp.param_index + sp.count, op.param_index + op.count);
        if (lo >= hi) continue;
        if (!m.defined()) {
          m = f.read("/exp_avg", torch::kDouble);
          v = f.read("/exp_avg_sq", torch::kDouble);
        }
        const int64_t src = sp.shard_offset + (lo - sp.param_index), dst = op.shard_offset + (lo - op.param_index);
        SEDD_CHECK(src + (hi - lo) <= m.numel() && src + (hi - lo) <= v.numel(),
                   "{}: moments are shorter than their pieces (damaged?)", path);
        m_dst.narrow(0, dst, hi - lo).copy_(m.narrow(0, src, hi - lo));
        v_dst.narrow(0, dst, hi - lo).copy_(v.narrow(0, src, hi - lo));
        covered += hi - lo;
      }
  }
  SEDD_CHECK(covered == want, "{}: optimizer shards cover {} of this rank's {} parameters (missing rank files?)", dir,
             covered, want);
  torch::NoGradGuard ng;
  opt.exp_avg().copy_(m_dst);
  opt.exp_avg_sq().copy_(v_dst);
  return st;
}

void mark_stopped_for_requeue(const std::string& dir) {
  const std::string path = dir + "/state.json";
  json state = read_state_json(path);
  state["stopped_for_requeue"] = true;
  fs::write_text_atomic(path, state.dump(2));
}

std::string resolve_model_file(const std::string& arg) {
  stdfs::path p(arg);
  SEDD_CHECK_INPUT(stdfs::exists(p), "{}: no such checkpoint, run folder or model file", arg);
  if (stdfs::is_regular_file(p)) return p.string();
  if (stdfs::exists(p / "model.h5")) return (p / "model.h5").string();
  Checkpointer ck(p.string(), 1);
  auto latest = ck.latest();
  SEDD_CHECK_INPUT(latest.has_value(), "{}: no model.h5 and no checkpoints/latest inside (is this a run folder?)", arg);
  return *latest + "/model.h5";
}

}  // namespace sedd
