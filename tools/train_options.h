// The one table of sedd-train's options: it produces --help, reads INI files ([section] key =
// value is --section.key) and prints the resolved settings. Command line > file > defaults;
// unknown keys are errors.
#pragma once
#include <boost/program_options.hpp>
#include <functional>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "train/config.h"

namespace sedd::tools {

struct OptionTable {
  boost::program_options::options_description desc{"sedd-train options ([section] key = value in --config FILE)"};
  std::vector<std::pair<std::string, std::function<std::string()>>> printers;
  std::string config_file;
  bool help = false;
  bool plan = false;                   // --plan: print the memory plan and exit
  std::set<std::string> given;         // keys set on the command line or in the config file (not defaults)
  std::set<std::string> command_line;  // keys set on the command line
  // Where the value of an objective-dependent key the user did not give came from: "mdlm default"
  // (the objective's paper setting) or the resumed checkpoint's value.
  std::map<std::string, std::string> origin;
  TrainingConfig* config = nullptr;    // the fields the table writes (build_train_options)
};

void build_train_options(OptionTable& t, TrainingConfig& c);
// Parses argv (and --config), then sets the objective's defaults (objective_defaults) for the keys
// not given; when run.dir holds a checkpoint of the same objective, those keys keep the
// checkpoint's values instead (a run resumes with the command line that started it). Throws
// std::exception with a message naming the bad key or file.
void parse_train_options(OptionTable& t, int argc, char** argv);
// TrainingConfig::validate, its errors being settings the user must change (OptionError: exit 2).
void validate_settings(const TrainingConfig& c, int world);
// "[section]\nkey = value\n..." of every resolved setting; a value set by the objective's defaults
// or kept from the checkpoint says so in an INI comment ("  # mdlm default").
std::string resolved_settings(const OptionTable& t);

}  // namespace sedd::tools
