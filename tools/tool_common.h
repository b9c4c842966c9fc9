// Small helpers shared by the executables: option parsing with one error style, exit codes and
// errors printed once whatever the number of ranks, output paths checked before any work, the
// model and tokenizer from a checkpoint.
#pragma once
#include <mpi.h>

#include <boost/program_options.hpp>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <functional>
#include <iostream>
#include <memory>
#include <string>
#include <thread>

#include <unistd.h>

#include "data/tokenizer.h"
#include "objectives/sampling.h"
#include "distributed/runtime.h"
#include "io/error.h"
#include "model/weights.h"
#include "train/checkpoint.h"

namespace sedd::tools {

// Exit codes, the same for every executable and every number of ranks (docs/cli.md, "Exit codes").
constexpr int kExitOk = 0;
constexpr int kExitFailure = 1;    // a failure while running: I/O error, a failed check, a lost rank, MPI_Abort
constexpr int kExitBadInput = 2;   // bad arguments, missing or bad input data, refused settings
constexpr int kExitPreempted = 3;  // sedd-train: stopped by a signal after a checkpoint (requeue)

// kExitBadInput for what the user must change (OptionError, InputError, an option the parser or a
// number conversion refused), kExitFailure for anything else.
inline int exit_code_of(const std::exception& e) {
  if (dynamic_cast<const OptionError*>(&e) || dynamic_cast<const InputError*>(&e) ||
      dynamic_cast<const boost::program_options::error*>(&e) || dynamic_cast<const std::invalid_argument*>(&e) ||
      dynamic_cast<const std::out_of_range*>(&e))
    return kExitBadInput;
  return kExitFailure;
}

inline void print_error(const char* tool, const std::string& message, int rank) {
  if (rank == 0) std::fprintf(stderr, "%s: error: %s\n", tool, message.c_str());
  else std::fprintf(stderr, "%s: error (rank %d): %s\n", tool, rank, message.c_str());
  std::fflush(stderr);
}

// Returns -1 to continue, or the exit code (0 for --help, 2 for bad options), the error printed by
// rank 0 only. `vm` (optional) receives the parsed options (e.g. to ask which were given).
inline int parse_options(const char* tool, const boost::program_options::options_description& desc, int argc,
                         char** argv, bool root, boost::program_options::variables_map* vm = nullptr) {
  namespace po = boost::program_options;
  try {
    po::variables_map parsed;
    // No positional options: a stray word is refused, never ignored.
    po::store(po::command_line_parser(argc, argv).options(desc).positional({}).run(), parsed);
    if (parsed.count("help")) {
      if (root) std::cout << desc << "\n";
      return kExitOk;
    }
    po::notify(parsed);
    if (vm) *vm = std::move(parsed);
  } catch (const std::exception& e) {
    if (root) std::fprintf(stderr, "%s: error: %s (see --help)\n", tool, e.what());
    return kExitBadInput;
  }
  return -1;
}

// Runs `step` on every rank and agrees on the outcome: -1 when every rank succeeded, else the
// exit code of the first failing rank, returned on every rank. Its error is printed once (by that
// rank); another rank prints only an error of its own (another message). For the work before the
// ranks part ways (options, device, output paths, loading, sedd-prepare's shards): `step` must
// make no collective call, since a rank that failed early never joins it.
inline int agree(const Runtime& rt, const char* tool, const std::function<void()>& step) {
  int code = 0;
  std::string message;
  try {
    step();
  } catch (const std::exception& e) {
    code = exit_code_of(e);
    message = e.what();
  }
  int mine = code != 0 ? rt.rank : rt.world, first = rt.world;
  MPI_Allreduce(&mine, &first, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
  if (first == rt.world) return -1;
  std::string first_message = message;
  int head[2] = {code, static_cast<int>(message.size())};
  MPI_Bcast(head, 2, MPI_INT, first, MPI_COMM_WORLD);
  first_message.resize(static_cast<size_t>(head[1]));
  MPI_Bcast(first_message.data(), head[1], MPI_CHAR, first, MPI_COMM_WORLD);
  if (rt.rank == first || (code != 0 && message != first_message)) print_error(tool, message, rt.rank);
  return head[0];
}

// Ends the job after an error met while the ranks work apart (one rank may wait in a collective
// for another that failed): one rank prints and returns the exit code; several end together by
// MPI_Abort with that code (mpirun exits with it). Ranks other than 0 wait a moment first, so an
// error that every rank meets is printed once, by rank 0, not once per rank.
inline int end_job(const Runtime& rt, const char* tool, const std::exception& e) {
  const int code = exit_code_of(e);
  if (rt.world == 1) {
    print_error(tool, e.what(), 0);
    return code;
  }
  if (!rt.is_root()) std::this_thread::sleep_for(std::chrono::seconds(3));
  rt.abort(std::string(tool) + ": " + e.what(), code);
}

// Makes sure files can be made in the folder `path` (created later when it is not there: then in
// its nearest existing parent), before any work. OptionError naming `option` and the path.
inline void check_writable_folder(const std::string& path, const char* option) {
  namespace fs = std::filesystem;
  std::error_code ec;
  SEDD_CHECK_OPTION(!fs::exists(path, ec) || fs::is_directory(path, ec), "{} {}: exists and is not a folder", option,
                    path);
  fs::path dir = fs::absolute(path, ec);
  while (!fs::exists(dir, ec) && dir.has_parent_path() && dir != dir.parent_path()) dir = dir.parent_path();
  SEDD_CHECK_OPTION(fs::is_directory(dir, ec), "{} {}: {} is not a folder", option, path, dir.string());
  std::string probe = (dir / ".sedd-write-test-XXXXXX").string();
  const int fd = mkstemp(probe.data());
  if (fd < 0) fail_option("{} {}: cannot write in {} ({})", option, path, dir.string(), std::strerror(errno));
  ::close(fd);
  fs::remove(probe, ec);
}

// Makes sure `path` (an output file) can be written, before any work is done: opens it for
// appending, which creates it (removed again at once when it was not there), so a missing or
// read-only folder, or a folder in its place, is found now and not after the work. OptionError
// naming `option` and the path.
inline void check_writable(const std::string& path, const char* option) {
  namespace fs = std::filesystem;
  if (path.empty()) return;
  std::error_code ec;
  SEDD_CHECK_OPTION(!fs::is_directory(path, ec), "{} {}: is a folder; give a file name", option, path);
  const bool existed = fs::exists(path, ec);
  std::FILE* f = std::fopen(path.c_str(), "a");
  if (!f) fail_option("{} {}: cannot be written ({})", option, path, std::strerror(errno));
  std::fclose(f);
  if (!existed) fs::remove(path, ec);
}

struct LoadedModel {
  std::string path;
  DDiT model{nullptr};
  ModelFileInfo info;
  // The tokenizer stored with the weights, built on first use (evaluation needs none).
  Tokenizer* tokenizer() {
    if (!tokenizer_ && !info.tokenizer.empty()) tokenizer_ = make_tokenizer(info.tokenizer);
    return tokenizer_.get();
  }

 private:
  std::unique_ptr<Tokenizer> tokenizer_;
};

// --precision: bf16 (GPU only, the default there) or fp32.
inline bool use_bf16(const std::string& precision, const torch::Device& device) {
  SEDD_CHECK_OPTION(precision == "auto" || precision == "bf16" || precision == "fp32",
                    "--precision must be auto, bf16 or fp32, got '{}'", precision);
  SEDD_CHECK_OPTION(!(precision == "bf16" && device.is_cpu()),
                    "--precision bf16 needs a GPU (--device cuda); CPUs run fp32");
  return device.is_cuda() && precision != "fp32";
}

inline LoadedModel load_checkpoint(const std::string& arg, bool use_ema, torch::Device device, bool bf16) {
  LoadedModel m;
  m.path = resolve_model_file(arg);
  m.model = load_model_file(m.path, use_ema, &m.info);
  m.model->to(device);
  m.model->bf16 = bf16;
  m.model->eval();
  return m;
}

}  // namespace sedd::tools
