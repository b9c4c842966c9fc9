// sedd::Error: the one exception type of the library. Messages name the file (or rank) and the
// problem, and end with a hint where one helps; executables print what() and exit non-zero.
#pragma once
#include <fmt/format.h>
#include <stdexcept>
#include <string>

namespace sedd {

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// A setting the user must change (executables exit with code 2, as for bad options). Thrown the
// same way on every rank, so no rank waits for another.
struct OptionError : Error {
  using Error::Error;
};

template <typename... Args>
[[noreturn]] void fail(fmt::format_string<Args...> f, Args&&... args) {
  throw Error(fmt::format(f, std::forward<Args>(args)...));
}

}  // namespace sedd

#define SEDD_CHECK(cond, ...)                 \
  do {                                        \
    if (!(cond)) ::sedd::fail(__VA_ARGS__);   \
  } while (0)
