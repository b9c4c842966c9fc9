// ControlPlane; see control.h.
#include "distributed/control.h"

#include <fmt/format.h>

#include "io/error.h"

namespace sedd {

ControlPlane::ControlPlane(Watchdog* watchdog) : watchdog_(watchdog) {
  MPI_Comm_dup(MPI_COMM_WORLD, &comm_);
  MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN);
  MPI_Comm_rank(comm_, &rank_);
  MPI_Comm_size(comm_, &size_);
}

ControlPlane::~ControlPlane() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized && comm_ != MPI_COMM_NULL) MPI_Comm_free(&comm_);
}

void ControlPlane::check(int rc, const char* call, const char* what) const {
  if (rc == MPI_SUCCESS) return;
  char msg[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(rc, msg, &len);
  fail("rank {}: {} ({}) failed: {}", rank_, call, what, std::string(msg, len));
}

namespace {
Watchdog::Watch watch(Watchdog* dog, const char* call, const char* what) {
  return dog ? dog->watch(fmt::format("{} ({}, control plane)", call, what)) : Watchdog::Watch();
}
}  // namespace

std::vector<double> ControlPlane::sum(std::vector<double> v, const char* what) {
  auto w = watch(watchdog_, "MPI_Allreduce", what);
  check(MPI_Allreduce(MPI_IN_PLACE, v.data(), static_cast<int>(v.size()), MPI_DOUBLE, MPI_SUM, comm_),
        "MPI_Allreduce", what);
  return v;
}

double ControlPlane::sum(double v, const char* what) { return sum(std::vector<double>{v}, what)[0]; }

double ControlPlane::max(double v, const char* what) {
  auto w = watch(watchdog_, "MPI_Allreduce", what);
  check(MPI_Allreduce(MPI_IN_PLACE, &v, 1, MPI_DOUBLE, MPI_MAX, comm_), "MPI_Allreduce", what);
  return v;
}

bool ControlPlane::any(bool v, const char* what) {
  int x = v ? 1 : 0;
  auto w = watch(watchdog_, "MPI_Allreduce", what);
  check(MPI_Allreduce(MPI_IN_PLACE, &x, 1, MPI_INT, MPI_MAX, comm_), "MPI_Allreduce", what);
  return x != 0;
}

void ControlPlane::agree(const std::string& local_error, const std::string& what) {
  bool failed = any(!local_error.empty(), what.c_str());
  if (!local_error.empty()) fail("{}", local_error);
  if (failed) fail("{} failed on another rank (its own message names the cause)", what);
}

void ControlPlane::barrier(const char* what) {
  auto w = watch(watchdog_, "MPI_Barrier", what);
  check(MPI_Barrier(comm_), "MPI_Barrier", what);
}

std::vector<int64_t> ControlPlane::gather_to_root(const std::vector<int64_t>& mine, const char* what) {
  auto w = watch(watchdog_, "MPI_Gatherv", what);
  int n = static_cast<int>(mine.size());
  std::vector<int> counts(size_), displs(size_);
  check(MPI_Gather(&n, 1, MPI_INT, counts.data(), 1, MPI_INT, 0, comm_), "MPI_Gather", what);
  int total = 0;
  for (int r = 0; r < size_; ++r) displs[r] = total, total += counts[r];
  std::vector<int64_t> all(rank_ == 0 ? total : 0);
  check(MPI_Gatherv(mine.data(), n, MPI_INT64_T, all.data(), counts.data(), displs.data(), MPI_INT64_T, 0, comm_),
        "MPI_Gatherv", what);
  return all;
}

ControlPlane::Vote::~Vote() {
  if (req_ != MPI_REQUEST_NULL) MPI_Wait(&req_, MPI_STATUS_IGNORE);
}

void ControlPlane::Vote::start(int mine) {
  if (req_ != MPI_REQUEST_NULL) result();
  local_ = mine;
  cp_.check(MPI_Iallreduce(&local_, &global_, 1, MPI_INT, MPI_MAX, cp_.comm_, &req_), "MPI_Iallreduce", "stop vote");
}

int ControlPlane::Vote::result() {
  if (req_ == MPI_REQUEST_NULL) return 0;
  auto w = watch(cp_.watchdog_, "MPI_Wait", "stop vote");
  cp_.check(MPI_Wait(&req_, MPI_STATUS_IGNORE), "MPI_Wait", "stop vote");
  return global_;
}

}  // namespace sedd
