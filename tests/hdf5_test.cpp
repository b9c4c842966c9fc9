// HDF5 layer: round trips of tensors/attributes and clear errors on bad files.
#include <gtest/gtest.h>

#include <fstream>
#include <functional>

#include "io/error.h"
#include "io/hdf5.h"
#include "test_util.h"

using namespace sedd;
using namespace sedd::test;

TEST(Hdf5, RoundTripsTensorsAndAttributes) {
  TempDir tmp;
  std::string path = tmp / "a.h5";
  {
    h5::File f(path, h5::Mode::Create);
    f.write("/g/h/floats", torch::arange(12, torch::kFloat).view({3, 4}));
    f.write("/tokens", torch::arange(1000, torch::kInt32).to(torch::kUInt16), 128);
    f.set_attr("/", "vocab_size", int64_t{257});
    f.set_attr("/g", "lr", 3e-4);
    f.set_attr("/g", "name", std::string("héllo"));
  }
  h5::File f(path, h5::Mode::Read);
  EXPECT_TRUE(torch::equal(f.read("/g/h/floats"), torch::arange(12, torch::kFloat).view({3, 4})));
  EXPECT_EQ(f.stored_dtype("/tokens"), torch::kUInt16);
  EXPECT_TRUE(torch::equal(f.read("/tokens"), torch::arange(1000, torch::kLong)));
  torch::Tensor part = torch::empty({10}, torch::kInt32);
  f.read_range("/tokens", 500, 10, part);
  EXPECT_TRUE(torch::equal(part, torch::arange(500, 510, torch::kInt32)));
  EXPECT_EQ(f.attr_int("/", "vocab_size"), 257);
  EXPECT_DOUBLE_EQ(f.attr_double("/g", "lr"), 3e-4);
  EXPECT_EQ(f.attr_string("/g", "name"), "héllo");
  EXPECT_EQ(f.children("/g"), std::vector<std::string>{"h"});
  EXPECT_TRUE(f.exists("/g/h/floats"));
  EXPECT_FALSE(f.exists("/g/x/floats"));
}

TEST(Hdf5, ErrorsNameTheFileAndTheProblem) {
  TempDir tmp;
  auto expect_error = [](const std::function<void()>& fn, const std::string& needle1, const std::string& needle2) {
    try {
      fn();
      ADD_FAILURE() << "no error for " << needle2;
    } catch (const sedd::Error& e) {
      std::string msg = e.what();
      EXPECT_NE(msg.find(needle1), std::string::npos) << msg;
      EXPECT_NE(msg.find(needle2), std::string::npos) << msg;
    }
  };
  std::string missing = tmp / "missing.h5";
  expect_error([&] { h5::File f(missing, h5::Mode::Read); }, missing, "no such file");
  std::string text = tmp / "text.h5";
  std::ofstream(text) << "this is not hdf5";
  expect_error([&] { h5::File f(text, h5::Mode::Read); }, text, "not an HDF5 file");
  std::string good = tmp / "good.h5";
  {
    h5::File f(good, h5::Mode::Create);
    f.write("/tokens", torch::arange(100000, torch::kInt32));
  }
  expect_error([&] { h5::File(good, h5::Mode::Read).read("/nope"); }, good, "missing dataset '/nope'");
  // Truncate the file to half its size: it must be refused, not read as garbage.
  std::string cut = tmp / "cut.h5";
  {
    std::ifstream in(good, std::ios::binary);
    std::string bytes((std::istreambuf_iterator<char>(in)), {});
    std::ofstream(cut, std::ios::binary).write(bytes.data(), bytes.size() / 2);
  }
  expect_error([&] { h5::File(cut, h5::Mode::Read).read("/tokens"); }, cut, "truncated");
}
