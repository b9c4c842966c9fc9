// Small helpers shared by the executables: option parsing with one error style, the model and
// tokenizer from a checkpoint.
#pragma once
#include <boost/program_options.hpp>
#include <cstdio>
#include <iostream>
#include <memory>
#include <string>

#include "data/tokenizer.h"
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
  std::unique_ptr<Tokenizer> tokenizer;  // null when the file has none
};

inline LoadedModel load_checkpoint(const std::string& arg, bool use_ema, torch::Device device) {
  LoadedModel m;
  m.path = resolve_model_file(arg);
  m.model = load_model_file(m.path, use_ema, &m.info);
  m.model->to(device);
  m.model->eval();
  if (!m.info.tokenizer.empty()) m.tokenizer = make_tokenizer(m.info.tokenizer);
  return m;
}

}  // namespace sedd::tools
