// One copy of the CUDA runtime and NCCL per process: the ones LibTorch itself loads; the C++
// standard library's own functions, not copies that a torch wheel exports.
#include <dlfcn.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <set>

#include "distributed/communicator.h"

namespace {
std::set<std::string> mapped_libraries(const std::string& needle) {
  std::ifstream maps("/proc/self/maps");
  std::set<std::string> paths;
  std::string line;
  while (std::getline(maps, line)) {
    auto slash = line.find('/');
    if (slash == std::string::npos) continue;
    std::string path = line.substr(slash);
    auto base = path.substr(path.rfind('/') + 1);
    if (base.rfind(needle, 0) == 0) paths.insert(path);
  }
  return paths;
}
}  // namespace

TEST(Libraries, OneCudaRuntimeAndOneNcclFromTheTorchWheel) {
  torch::Tensor warm = torch::ones({2});  // make sure torch's libraries are loaded
  auto torch_libs = mapped_libraries("libtorch_cpu.so");
  ASSERT_EQ(torch_libs.size(), 1u);
  std::string torch_dir = *torch_libs.begin();
  std::string site = torch_dir.substr(0, torch_dir.find("/torch/lib/"));
  for (const char* lib : {"libcudart.so", "libnccl.so"}) {
    auto found = mapped_libraries(lib);
#ifdef SEDD_HAVE_CUDA
    ASSERT_EQ(found.size(), 1u) << lib << " is mapped " << found.size() << " times";
#else  // a CPU-only build may still sit on a CUDA wheel, whose libtorch pulls these in
    ASSERT_LE(found.size(), 1u) << lib << " is mapped " << found.size() << " times";
#endif
    if (!found.empty())
      EXPECT_EQ(found.begin()->rfind(site, 0), 0u) << lib << " comes from " << *found.begin()
                                                   << ", not from the torch wheel in " << site;
  }
#ifdef SEDD_HAVE_CUDA
  EXPECT_EQ(sedd::nccl_available(), torch::cuda::is_available());
#else
  EXPECT_FALSE(sedd::nccl_available());
#endif
}

// torch 2.11's libtorch.so exports copies of std::filesystem functions that crash when called from
// our code; the link order (cmake/SeddTorch.cmake) must make libstdc++'s definitions the ones bound.
TEST(Libraries, StdFilesystemIsBoundToLibstdcxx) {
  using RemoveAll = std::uintmax_t (*)(const std::filesystem::path&, std::error_code&);
  RemoveAll remove_all = &std::filesystem::remove_all;
  Dl_info info{};
  ASSERT_NE(dladdr(reinterpret_cast<void*>(remove_all), &info), 0);
  ASSERT_NE(info.dli_fname, nullptr);
  EXPECT_NE(std::string(info.dli_fname).find("libstdc++"), std::string::npos)
      << "std::filesystem::remove_all is bound to " << info.dli_fname;
  // a fresh folder of our own: another run of this test may be using any fixed name
  std::string pattern = (std::filesystem::temp_directory_path() / "sedd-libraries-XXXXXX").string();
  ASSERT_NE(mkdtemp(pattern.data()), nullptr) << pattern;
  const std::filesystem::path dir = pattern;
  std::filesystem::create_directories(dir / "a");
  std::error_code ec;
  EXPECT_EQ(std::filesystem::remove_all(dir, ec), 2u);
  EXPECT_FALSE(ec);
}
