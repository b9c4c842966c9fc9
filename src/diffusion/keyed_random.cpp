// Keyed randomness; see keyed_random.h. CPU loops here, CUDA kernels in keyed_random_kernels.cu;
// both evaluate the same Philox elements, so their uniforms agree bit for bit.
#include "diffusion/keyed_random.h"

#include <ATen/Parallel.h>

#include <atomic>
#include <cmath>

#include "io/error.h"

#ifdef SEDD_HAVE_CUDA_KERNELS
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "diffusion/keyed_random_kernels.h"
#endif

namespace sedd {

namespace {

torch::Tensor offsets_or_zeros(const torch::Tensor& col_offset, const torch::Tensor& rows) {
  if (!col_offset.defined()) return torch::zeros_like(rows);
  SEDD_CHECK(col_offset.sizes() == rows.sizes() && col_offset.scalar_type() == torch::kLong,
             "keyed random: col_offset must be int64 with the shape of rows");
  return col_offset.to(rows.device()).contiguous();
}

void check_rows(const torch::Tensor& rows) {
  SEDD_CHECK(rows.dim() == 1 && rows.scalar_type() == torch::kLong, "keyed random: rows must be int64 [R], got {} {}",
             c10::toString(rows.scalar_type()), c10::str(rows.sizes()));
}

template <typename T>
void uniform_cpu(const philox::Stream& s, const int64_t* rows, const int64_t* offs, int64_t n, int64_t cols, T* out) {
  at::parallel_for(0, n, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const uint64_t row = static_cast<uint64_t>(rows[r]);
      T* o = out + r * cols;
      for (int64_t c = 0; c < cols; ++c) {
        const uint64_t col = static_cast<uint64_t>(offs[r] + c);
        if constexpr (std::is_same_v<T, double>) o[c] = s.uniform_double(row, col);
        else o[c] = s.uniform_float(row, col);
      }
    }
  });
}

// A draw needs a positive, finite total: a row of zeros, a NaN or an infinity has no token to draw,
// and the inverse-CDF search below would quietly return 0 for it.
bool drawable(double total) { return std::isfinite(total) && total > 0; }

[[noreturn]] void undrawable_row(const RandomStream& s, int64_t r, int64_t n, int64_t row, int64_t col, double total) {
  fail("keyed_categorical: the weights of row {} of {} (sample/sequence {}, column offset {}, step {}) sum to {}: "
       "all-zero, NaN or infinite probabilities have no token to draw",
       r, n, row, col, s.step, total);
}

// Returns the first row whose weights cannot be drawn from (n if none).
template <typename T>
int64_t categorical_cpu(const philox::Stream& s, const T* w, const int64_t* rows, const int64_t* offs, int64_t n,
                        int64_t cols, int64_t* out) {
  std::atomic<int64_t> first_bad{n};
  at::parallel_for(0, n, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* wr = w + r * cols;
      double total = 0;
      for (int64_t c = 0; c < cols; ++c) total += static_cast<double>(wr[c]);
      if (!drawable(total)) {
        for (int64_t seen = first_bad.load(); r < seen && !first_bad.compare_exchange_weak(seen, r);) {
        }
        out[r] = 0;
        continue;
      }
      const double threshold = s.uniform_double(static_cast<uint64_t>(rows[r]), static_cast<uint64_t>(offs[r])) * total;
      double run = 0;
      int64_t arg = 0;
      for (int64_t c = 0; c < cols; ++c) {
        run += static_cast<double>(wr[c]);
        if (run > threshold) {
          arg = c;
          break;
        }
      }
      out[r] = arg;
    }
  });
  return first_bad.load();
}

}  // namespace

bool keyed_random_has_cuda_kernels() {
#ifdef SEDD_HAVE_CUDA_KERNELS
  return true;
#else
  return false;
#endif
}

torch::Tensor keyed_uniform(const RandomStream& s, const torch::Tensor& rows_in, int64_t cols, torch::ScalarType dtype,
                            const torch::Tensor& col_offset) {
  check_rows(rows_in);
  SEDD_CHECK(dtype == torch::kFloat || dtype == torch::kDouble, "keyed_uniform: dtype must be float32 or float64");
  torch::Tensor rows = rows_in.contiguous(), offs = offsets_or_zeros(col_offset, rows);
  const int64_t n = rows.size(0);
  torch::Tensor out = torch::empty({n, cols}, rows.options().dtype(dtype));
  if (n == 0 || cols == 0) return out;
  const philox::Stream ps = s.philox();
  if (rows.is_cuda()) {
#ifdef SEDD_HAVE_CUDA_KERNELS
    c10::cuda::CUDAGuard guard(rows.device());
    cuda::keyed_uniform(ps, rows.data_ptr<int64_t>(), offs.data_ptr<int64_t>(), n, cols, out.data_ptr(),
                        dtype == torch::kDouble, c10::cuda::getCurrentCUDAStream().stream());
    return out;
#else
    return keyed_uniform(s, rows.cpu(), cols, dtype, offs.cpu()).to(rows.device());
#endif
  }
  if (dtype == torch::kDouble) uniform_cpu(ps, rows.data_ptr<int64_t>(), offs.data_ptr<int64_t>(), n, cols, out.data_ptr<double>());
  else uniform_cpu(ps, rows.data_ptr<int64_t>(), offs.data_ptr<int64_t>(), n, cols, out.data_ptr<float>());
  return out;
}

torch::Tensor keyed_categorical(const torch::Tensor& weights_in, const RandomStream& s, const torch::Tensor& rows_in,
                                const torch::Tensor& col_offset) {
  check_rows(rows_in);
  SEDD_CHECK(weights_in.dim() == 2 && weights_in.size(0) == rows_in.size(0),
             "keyed_categorical: weights must be [R, K] with R = rows, got {}", c10::str(weights_in.sizes()));
  torch::Tensor w = weights_in;
  if (w.scalar_type() != torch::kDouble && w.scalar_type() != torch::kFloat) w = w.to(torch::kFloat);
  w = w.contiguous();
  torch::Tensor rows = rows_in.to(w.device()).contiguous(), offs = offsets_or_zeros(col_offset, rows);
  const int64_t n = w.size(0), cols = w.size(1);
  torch::Tensor out = torch::zeros({n}, rows.options());
  if (n == 0 || cols == 0) return out;
  if (w.is_cuda()) {
    // Device: the same inverse-CDF rule with a cumulative sum and a sorted search, in row chunks so
    // the float64 sums stay below 512 MB. Undrawable rows are flagged on the device and read back
    // once per call, after every chunk is queued.
    auto u = keyed_uniform(s, rows, 1, torch::kDouble, offs);  // [n, 1]
    auto bad = torch::empty({n}, rows.options().dtype(torch::kBool));
    const int64_t chunk = std::max<int64_t>(1, (int64_t{1} << 26) / cols);
    for (int64_t i = 0; i < n; i += chunk) {
      const int64_t m = std::min(chunk, n - i);
      auto cum = w.narrow(0, i, m).to(torch::kDouble).cumsum(1);
      auto total = cum.narrow(1, cols - 1, 1);
      auto threshold = u.narrow(0, i, m) * total;
      auto idx = torch::searchsorted(cum, threshold, /*out_int32=*/false, /*right=*/true).squeeze(1);
      auto ok = (total.squeeze(1) > 0).logical_and_(torch::isfinite(total.squeeze(1)));
      bad.narrow(0, i, m).copy_(ok.logical_not());
      out.narrow(0, i, m).copy_(torch::where(ok, idx.clamp_max(cols - 1), torch::zeros_like(idx)));
    }
    if (bad.any().item<bool>()) {  // the one host sync of the call
      const int64_t r = bad.nonzero().min().item<int64_t>();
      undrawable_row(s, r, n, rows[r].item<int64_t>(), offs[r].item<int64_t>(),
                     w[r].to(torch::kDouble).sum().item<double>());
    }
    return out;
  }
  const philox::Stream ps = s.philox();
  int64_t r = 0;
  if (w.scalar_type() == torch::kDouble)
    r = categorical_cpu(ps, w.data_ptr<double>(), rows.data_ptr<int64_t>(), offs.data_ptr<int64_t>(), n, cols, out.data_ptr<int64_t>());
  else
    r = categorical_cpu(ps, w.data_ptr<float>(), rows.data_ptr<int64_t>(), offs.data_ptr<int64_t>(), n, cols, out.data_ptr<int64_t>());
  if (r < n)
    undrawable_row(s, r, n, rows[r].item<int64_t>(), offs[r].item<int64_t>(),
                   w[r].to(torch::kDouble).sum().item<double>());
  return out;
}

}  // namespace sedd
