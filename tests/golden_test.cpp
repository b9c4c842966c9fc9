// Golden reference: our diffusion core against vectors from the authors' implementation.
#include <gtest/gtest.h>

#include <filesystem>

#include "golden.h"
#include <set>
#include "io/hdf5.h"
#include "test_util.h"

using namespace sedd;
using namespace sedd::test;

TEST(GoldenDiffusion, MatchesEveryStoredOutput) {
  auto rep = check_golden_diffusion(golden_path());
  for (const auto& m : rep.mismatches) ADD_FAILURE() << m;
  // The shipped file has 2 noise groups x 2 outputs and 2 graphs x (7 or 6) outputs.
  EXPECT_GE(rep.compared, 4) << "no /noise or /graph outputs were found in " << golden_path();
}

// Every stored output, perturbed by 1% at its largest entry, must be reported.
TEST(GoldenDiffusion, DetectsOnePercentError) {
  TempDir tmp;
  std::string copy = tmp / "golden.h5";
  std::filesystem::copy_file(golden_path(), copy);
  std::vector<std::string> outputs;
  {
    h5::File f(copy, h5::Mode::Read);
    const std::set<std::string> inputs = {"t", "x0", "x", "sigma", "dsigma", "log_score"};
    for (const char* top : {"/noise", "/graph"}) {
      if (!f.is_group(top)) continue;
      for (const auto& g : f.children(top))
        for (const auto& ds : f.children(std::string(top) + "/" + g))
          if (!inputs.count(ds) || (std::string(top) == "/noise" && ds == "sigma"))
            outputs.push_back(std::string(top) + "/" + g + "/" + ds);
    }
  }
  ASSERT_FALSE(outputs.empty());
  for (const auto& ds : outputs) {
    torch::Tensor orig;
    {
      h5::File f(copy, h5::Mode::ReadWrite);
      orig = f.read(ds, torch::kDouble);
      torch::Tensor bad = orig.clone().flatten();
      int64_t at = bad.abs().argmax().item<int64_t>();
      bad[at] = bad[at].item<double>() * 1.01;
      f.overwrite(ds, bad.view(orig.sizes()));
    }
    auto rep = check_golden_diffusion(copy);
    bool named = false;
    for (const auto& m : rep.mismatches) named |= m.rfind(ds + ":", 0) == 0;
    EXPECT_TRUE(named) << "a 1% error in " << ds << " went unnoticed";
    h5::File f(copy, h5::Mode::ReadWrite);
    f.overwrite(ds, orig);
  }
}

TEST(GoldenModel, MatchesLogScoreAndLoss) {
  auto rep = check_golden_models(golden_path());
  for (const auto& m : rep.mismatches) ADD_FAILURE() << m;
  EXPECT_GE(rep.compared, 1) << "no /model groups in " << golden_path();
}

// 2% off at any one stored model output (the largest entry, and a mid-sized one) is caught.
TEST(GoldenModel, DetectsTwoPercentError) {
  TempDir tmp;
  std::string copy = tmp / "golden.h5";
  std::filesystem::copy_file(golden_path(), copy);
  std::vector<std::string> outputs;
  {
    h5::File f(copy, h5::Mode::Read);
    for (const auto& g : f.children("/model"))
      for (const char* ds : {"/output/log_score", "/loss/loss"})
        if (f.exists("/model/" + g + ds)) outputs.push_back("/model/" + g + ds);
  }
  ASSERT_FALSE(outputs.empty());
  for (const auto& ds : outputs) {
    for (bool largest : {true, false}) {
      torch::Tensor orig;
      {
        h5::File f(copy, h5::Mode::ReadWrite);
        orig = f.read(ds, torch::kFloat);
        torch::Tensor bad = orig.clone().flatten();
        auto mag = bad.abs();
        // the largest entry, or the median-sized non-zero one
        int64_t at = largest ? mag.argmax().item<int64_t>()
                             : (mag - mag.masked_select(mag > 0).median()).abs().argmin().item<int64_t>();
        bad[at] = bad[at].item<float>() * 1.02f;
        f.overwrite(ds, bad.view(orig.sizes()));
      }
      auto rep = check_golden_models(copy);
      bool named = false;
      for (const auto& m : rep.mismatches) named |= m.rfind(ds + ":", 0) == 0;
      EXPECT_TRUE(named) << "a 2% error in " << ds << (largest ? " (largest)" : " (median)") << " went unnoticed";
      h5::File f(copy, h5::Mode::ReadWrite);
      f.overwrite(ds, orig);
    }
  }
}
