// ControlPlane: agreement between ranks on host values, over MPI, whatever the device.
//
// The rule: decisions and reports (stop requests, error votes, checkpoint votes, sums of scalars
// for logs and evaluation results, gathering samples) go through this class on host memory; the
// data plane (gradients, parameters, EMA, and the device-side scalars that steer device work,
// such as the gradient norm) goes through a Communicator on the rank's device. A GPU job thus never
// hands a host pointer to NCCL, and a control decision never waits for the GPU.
#pragma once
#include <mpi.h>

#include <cstdint>
#include <string>
#include <vector>

#include "distributed/watchdog.h"

namespace sedd {

class ControlPlane {
 public:
  // Uses its own duplicate of MPI_COMM_WORLD; `watchdog` (may be null) watches every call.
  explicit ControlPlane(Watchdog* watchdog = nullptr);
  ~ControlPlane();
  ControlPlane(const ControlPlane&) = delete;
  ControlPlane& operator=(const ControlPlane&) = delete;

  int rank() const { return rank_; }
  int size() const { return size_; }

  double sum(double v, const char* what);
  std::vector<double> sum(std::vector<double> v, const char* what);
  double max(double v, const char* what);
  bool any(bool v, const char* what);
  // Every rank passes its local error ("" when it succeeded); if any rank failed, all throw
  // together (the failing ranks with their own message), so none waits forever for the others.
  void agree(const std::string& local_error, const std::string& what);
  void barrier(const char* what);
  // Rank 0 receives every rank's values, concatenated in rank order (others get an empty vector).
  std::vector<int64_t> gather_to_root(const std::vector<int64_t>& mine, const char* what);

  // A vote started now and read at the next step: no rank blocks on it while computing, and every
  // rank reads the same result at the same step.
  class Vote {
   public:
    explicit Vote(ControlPlane& cp) : cp_(cp) {}
    ~Vote();
    void start(int mine);      // non-blocking all-reduce (max) of `mine`
    int result();              // waits for the vote started last; 0 when none was started
   private:
    ControlPlane& cp_;
    int local_ = 0, global_ = 0;
    MPI_Request req_ = MPI_REQUEST_NULL;
  };

 private:
  void check(int rc, const char* call, const char* what) const;
  MPI_Comm comm_ = MPI_COMM_NULL;
  Watchdog* watchdog_;
  int rank_ = 0, size_ = 1;
};

}  // namespace sedd
