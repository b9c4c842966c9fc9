// sedd::Error: the one exception type of the library. Messages name the file (or rank) and the
// problem, and end with a hint where one helps; executables print what() and exit non-zero
// (docs/cli.md, "Exit codes": 2 for OptionError and InputError, 1 for any other error).
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

// Missing or bad input data: a data file, shard, checkpoint, model or tokenizer file that is
// absent, damaged or does not fit. Executables exit with code 2 on it, as for bad options; unlike
// OptionError it may be met by some ranks only (a damaged shard read by one rank).
struct InputError : Error {
  using Error::Error;
};

template <typename... Args>
[[noreturn]] void fail(fmt::format_string<Args...> f, Args&&... args) {
  throw Error(fmt::format(f, std::forward<Args>(args)...));
}

template <typename... Args>
[[noreturn]] void fail_option(fmt::format_string<Args...> f, Args&&... args) {
  throw OptionError(fmt::format(f, std::forward<Args>(args)...));
}

template <typename... Args>
[[noreturn]] void fail_input(fmt::format_string<Args...> f, Args&&... args) {
  throw InputError(fmt::format(f, std::forward<Args>(args)...));
}

}  // namespace sedd

#define SEDD_CHECK(cond, ...)                 \
  do {                                        \
    if (!(cond)) ::sedd::fail(__VA_ARGS__);   \
  } while (0)

// A setting the user must change (OptionError); check it alike on every rank.
#define SEDD_CHECK_OPTION(cond, ...)               \
  do {                                             \
    if (!(cond)) ::sedd::fail_option(__VA_ARGS__); \
  } while (0)

// Missing or bad input data (InputError).
#define SEDD_CHECK_INPUT(cond, ...)               \
  do {                                            \
    if (!(cond)) ::sedd::fail_input(__VA_ARGS__); \
  } while (0)
