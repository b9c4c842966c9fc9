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

// Flat vector (padded) -> state dict of the model's parameters (buffers from the model).
StateDict unflatten(DDiT& model, const torch::Tensor& flat) {
  StateDict sd = state_dict(*model);
  int64_t off = 0;
  for (const auto& p : model->named_parameters()) {
    sd[p.key()] = flat.narrow(0, off, p.value().numel()).view(p.value().sizes());
    off += p.value().numel();
  }
  return sd;
}

torch::Tensor flatten(DDiT& model, const StateDict& sd, int64_t padded) {
  std::vector<torch::Tensor> parts;
  for (const auto& p : model->named_parameters()) parts.push_back(sd.at(p.key()).reshape({-1}));
  auto flat = torch::cat(parts);
  return torch::cat({flat, torch::zeros({padded - flat.numel()}, flat.options())});
}

// Every rank reports whether its part failed; all throw together so none waits forever.
void agree(Communicator& comm, const std::string& local_error, const std::string& what) {
  torch::Tensor flag = torch::tensor({local_error.empty() ? 0.0f : 1.0f});
  comm.all_reduce(flag, ReduceOp::Max);
  if (!local_error.empty()) fail("{}", local_error);
  if (flag.item<float>() > 0) fail("{} failed on another rank", what);
}

}  // namespace

Checkpointer::Checkpointer(std::string run_dir, int64_t keep) : root_(run_dir + "/checkpoints"), keep_(keep) {}

std::string Checkpointer::save(const TrainState& st, DDiT& model, ShardedAdamW& opt, Communicator& comm,
                               const std::string& config_text) {
  const std::string name = fmt::format("step_{}", st.step);
  const std::string final_dir = root_ + "/" + name, tmp_dir = root_ + "/." + name + ".partial";
  std::string err;
  if (comm.rank() == 0) {
    try {
      stdfs::create_directories(root_);
      stdfs::remove_all(tmp_dir);
      stdfs::create_directories(tmp_dir + "/optim");
    } catch (const std::exception& e) {
      err = fmt::format("{}: cannot create checkpoint folder: {}", tmp_dir, e.what());
    }
  }
  agree(comm, err, "creating " + tmp_dir);
  torch::Tensor ema = opt.gather_ema().to(torch::kCPU);  // collective
  try {
    if (comm.rank() == 0) {
      ModelFileInfo info{st.step, st.tokens_seen, true, st.tokenizer};
      StateDict weights;
      for (auto& [k, v] : state_dict(*model)) weights[k] = v.detach().to(torch::kCPU);
      save_model_file(tmp_dir + "/model.h5", model->cfg, weights, unflatten(model, ema), info);
    }
    std::string path = fmt::format("{}/optim/rank_{}.h5", tmp_dir, comm.rank());
    std::string tmp = fs::temp_name(path);
    {
      h5::File f(tmp, h5::Mode::Create);
      f.write("/exp_avg", opt.exp_avg().to(torch::kCPU));
      f.write("/exp_avg_sq", opt.exp_avg_sq().to(torch::kCPU));
      f.set_attr("/", "range_begin", opt.own_range().begin);
      f.set_attr("/", "range_end", opt.own_range().end);
      f.set_attr("/", "numel", opt.numel());
      f.set_attr("/", "padded_numel", opt.padded_numel());
      f.set_attr("/", "adam_steps", opt.steps_taken());
      f.set_attr("/", "world", static_cast<int64_t>(comm.size()));
    }
    fs::commit_file(tmp, path);
  } catch (const std::exception& e) {
    err = fmt::format("rank {}: writing checkpoint {}: {}", comm.rank(), tmp_dir, e.what());
  }
  agree(comm, err, "writing " + tmp_dir);
  if (comm.rank() == 0) {
    try {
      json state = {{"step", st.step},         {"data_position", st.data_position}, {"tokens_seen", st.tokens_seen},
                    {"world_size", comm.size()}, {"numel", opt.numel()},            {"format_version", 1},
                    {"config", config_text}};
      if (st.stopped_for_requeue) state["stopped_for_requeue"] = true;
      fs::write_text_atomic(tmp_dir + "/state.json", state.dump(2));
      fs::fsync_path(tmp_dir + "/optim");
      stdfs::remove_all(final_dir);
      stdfs::rename(tmp_dir, final_dir);
      fs::fsync_path(root_);
      fs::write_text_atomic(root_ + "/latest", name + "\n");  // the commit point
      prune(st.step);
    } catch (const std::exception& e) {
      err = fmt::format("committing checkpoint {}: {}", final_dir, e.what());
    }
  }
  agree(comm, err, "committing " + final_dir);
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

std::optional<std::string> Checkpointer::latest() const {
  std::string pointer = root_ + "/latest";
  if (!stdfs::exists(pointer)) return std::nullopt;
  std::string name = fs::read_text(pointer);
  while (!name.empty() && (name.back() == '\n' || name.back() == ' ')) name.pop_back();
  std::string dir = root_ + "/" + name;
  SEDD_CHECK(stdfs::exists(dir + "/model.h5") && stdfs::exists(dir + "/state.json"),
             "{}: points to '{}', which is missing or incomplete (damaged run folder?)", pointer, name);
  return dir;
}

TrainState Checkpointer::load(const std::string& dir, DDiT& model, ShardedAdamW& opt, Communicator& comm) {
  TrainState st;
  json state;
  try {
    state = json::parse(fs::read_text(dir + "/state.json"));
  } catch (const json::exception& e) {
    fail("{}/state.json: not valid JSON ({})", dir, e.what());
  }
  st.step = state.at("step").get<int64_t>();
  st.data_position = state.at("data_position").get<int64_t>();
  st.tokens_seen = state.at("tokens_seen").get<int64_t>();
  st.world = state.at("world_size").get<int>();
  st.stopped_for_requeue = state.value("stopped_for_requeue", false);
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
    opt.load_ema(flatten(model, ema, opt.padded_numel()).to(opt.ema_shard().device()));
  }

  // Moments: copy every saved slice that overlaps this rank's range (any old world size).
  auto own = opt.own_range();
  const int64_t n = opt.numel();
  int64_t covered = 0;
  for (int k = 0; k < st.world; ++k) {
    std::string path = fmt::format("{}/optim/rank_{}.h5", dir, k);
    h5::File f(path, h5::Mode::Read);
    int64_t b = f.attr_int("/", "range_begin"), e = std::min(f.attr_int("/", "range_end"), n);
    int64_t lo = std::max(b, own.begin), hi = std::min(e, own.end);
    if (k == comm.rank() || lo < hi) opt.set_steps_taken(f.attr_int("/", "adam_steps"));
    if (lo >= hi) continue;
    auto m = f.read("/exp_avg", opt.exp_avg().scalar_type()), v = f.read("/exp_avg_sq", opt.exp_avg().scalar_type());
    SEDD_CHECK(m.numel() >= e - b && v.numel() >= e - b, "{}: moments are shorter than their range (damaged?)", path);
    torch::NoGradGuard ng;
    opt.exp_avg().narrow(0, lo - own.begin, hi - lo).copy_(m.narrow(0, lo - b, hi - lo));
    opt.exp_avg_sq().narrow(0, lo - own.begin, hi - lo).copy_(v.narrow(0, lo - b, hi - lo));
    covered += hi - lo;
  }
  int64_t want = std::max<int64_t>(0, std::min(own.end, n) - own.begin);
  SEDD_CHECK(covered == want, "{}: optimizer shards cover {} of this rank's {} parameters (missing rank files?)", dir,
             covered, want);
  return st;
}

void mark_stopped_for_requeue(const std::string& dir) {
  const std::string path = dir + "/state.json";
  json state;
  try {
    state = json::parse(fs::read_text(path));
  } catch (const json::exception& e) {
    fail("{}: not valid JSON ({})", path, e.what());
  }
  state["stopped_for_requeue"] = true;
  fs::write_text_atomic(path, state.dump(2));
}

std::string resolve_model_file(const std::string& arg) {
  stdfs::path p(arg);
  SEDD_CHECK(stdfs::exists(p), "{}: no such checkpoint, run folder or model file", arg);
  if (stdfs::is_regular_file(p)) return p.string();
  if (stdfs::exists(p / "model.h5")) return (p / "model.h5").string();
  Checkpointer ck(p.string(), 1);
  auto latest = ck.latest();
  SEDD_CHECK(latest.has_value(), "{}: no model.h5 and no checkpoints/latest inside (is this a run folder?)", arg);
  return *latest + "/model.h5";
}

}  // namespace sedd
