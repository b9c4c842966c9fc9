// The test helpers' own rules that a GPU node relies on: which python the interop tests run, the
// skip of tests whose modules are missing, and the exclusive-compute-mode skip of the tests that
// start GPU work in child processes (tests/test_util.h).
#include <gtest/gtest.h>

#include <cstdlib>
#include <fstream>

#include "test_util.h"

using namespace sedd::test;

namespace {
// Sets an environment variable for one scope and restores it.
struct ScopedEnv {
  ScopedEnv(const char* name, const std::string& value) : name_(name) {
    if (const char* old = std::getenv(name)) old_ = old, had_ = true;
    setenv(name, value.c_str(), 1);
  }
  ~ScopedEnv() { had_ ? setenv(name_, old_.c_str(), 1) : unsetenv(name_); }
  const char* name_;
  std::string old_;
  bool had_ = false;
};
}  // namespace

// $SEDD_PYTHON wins (a relocated build's compiled-in virtualenv does not exist on a GPU node);
// without it, the configured python when it exists, else python3.
TEST(TestHelpers, PythonComesFromTheEnvironmentFirst) {
  {
    ScopedEnv env("SEDD_PYTHON", "/opt/elsewhere/bin/python");
    EXPECT_EQ(python(), "/opt/elsewhere/bin/python");
  }
  ScopedEnv empty("SEDD_PYTHON", "");
  const std::string configured = SEDD_PYTHON;
  EXPECT_EQ(python(), !configured.empty() && std::ifstream(configured).good() ? configured : "python3");
}

// A missing module is named (the test then skips saying so); present ones are not.
TEST(TestHelpers, PythonLacksNamesTheMissingModules) {
  const std::string why = python_lacks({"sys", "no_such_module_for_sedd_tests"});
  EXPECT_NE(why.find("lacks no_such_module_for_sedd_tests"), std::string::npos) << why;
  EXPECT_EQ(why.find("sys"), std::string::npos) << why;
  EXPECT_EQ(python_lacks({"sys", "os"}), "");
}

// Exclusive-process compute mode (read from nvidia-smi) is a skip reason; the default mode is not.
TEST(TestHelpers, ExclusiveComputeModeIsASkipReason) {
  TempDir tmp;
  auto fake_smi = [&](const std::string& mode) {
    std::ofstream(tmp / "nvidia-smi") << "#!/bin/sh\necho '" << mode << "'\n";
    run("chmod +x " + (tmp / "nvidia-smi"));
  };
  ScopedEnv path("PATH", tmp.path + ":" + std::getenv("PATH"));
  fake_smi("Exclusive_Process");
  EXPECT_NE(exclusive_compute_mode().find("exclusive-process compute mode"), std::string::npos);
  fake_smi("Default");
  EXPECT_EQ(exclusive_compute_mode(), "");
}
