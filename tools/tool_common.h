// Small helpers shared by the executables: option parsing with one error style, the model and
// tokenizer from a checkpoint.
#pragma once
#include <boost/program_options.hpp>
#include <cstdio>
#include <iostream>
#include <memory>
#include <string>

#include "data/tokenizer.h"
#include "diffusion/sampler.h"
#include "distributed/runtime.h"
#include "io/error.h"
#include "model/weights.h"
#include "train/checkpoint.h"

namespace sedd::tools {

// Returns -1 to continue, or the exit code (0 for --help, 2 for bad options).
inline int parse_options(const char* tool, const boost::program_options::options_description& desc, int argc,
                         char** argv, bool root) {
  namespace po = boost::program_options;
  try {
    po::variables_map vm;
    po::store(po::parse_command_line(argc, argv, desc), vm);
    if (vm.count("help")) {
      if (root) std::cout << desc << "\n";
      return 0;
    }
    po::notify(vm);
  } catch (const std::exception& e) {
    if (root) std::fprintf(stderr, "%s: error: %s (see --help)\n", tool, e.what());
    return 2;
  }
  return -1;
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
  SEDD_CHECK(precision == "auto" || precision == "bf16" || precision == "fp32",
             "--precision must be auto, bf16 or fp32, got '{}'", precision);
  SEDD_CHECK(!(precision == "bf16" && device.is_cpu()), "--precision bf16 needs a GPU (--device cuda); CPUs run fp32");
  return device.is_cuda() && precision != "fp32";
}

inline ObjectiveSpec objective_of(const ModelConfig& c) { return ObjectiveSpec{c.objective, c.timesteps, c.bos}; }

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
