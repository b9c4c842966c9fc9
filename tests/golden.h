// Golden-file checks: walks any file of the reference schema (DESIGN.md §4) and compares every
// stored output with ours. Returns one line per mismatch (empty = all good) so a test can also
// check that a damaged copy of the file is caught.
#pragma once
#include <string>
#include <vector>

namespace sedd::test {

struct GoldenReport {
  std::vector<std::string> mismatches;  // "<dataset>: max rel err X > tol"
  int compared = 0;                     // datasets compared
};

// /noise/* and /graph/*; float64, relative tolerance `rtol`.
GoldenReport check_golden_diffusion(const std::string& path, double rtol = 1e-9);

}  // namespace sedd::test
