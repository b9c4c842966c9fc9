// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11): a
// counter-based generator. A draw is a pure function of (key, counter), so any element of any
// stream can be computed independently, on the host or in a CUDA kernel, with identical bits.
// Plain C++ (no torch), so CUDA kernels include it too.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define SEDD_HD __host__ __device__ __forceinline__
#else
#define SEDD_HD inline
#endif

namespace sedd::philox {

struct Words {
  uint32_t w[4];
};

SEDD_HD void mulhilo(uint32_t a, uint32_t b, uint32_t* hi, uint32_t* lo) {
  uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(p >> 32);
  *lo = static_cast<uint32_t>(p);
}

// counter c[4], key k[2] -> four independent 32-bit words.
SEDD_HD Words philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  constexpr uint32_t M0 = 0xD2511F53u, M1 = 0xCD9E8D57u, W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo(M0, c0, &hi0, &lo0);
    mulhilo(M1, c2, &hi1, &lo1);
    uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += W0;
    k1 += W1;
  }
  return Words{{c0, c1, c2, c3}};
}

SEDD_HD uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// [0, 1) with 24 random bits (exactly representable in float32).
SEDD_HD float to_float(uint32_t x) { return static_cast<float>(x >> 8) * (1.0f / 16777216.0f); }
// [0, 1) with 53 random bits from two words.
SEDD_HD double to_double(uint32_t hi, uint32_t lo) {
  uint64_t bits = ((static_cast<uint64_t>(hi) << 32) | lo) >> 11;
  return static_cast<double>(bits) * (1.0 / 9007199254740992.0);
}

// (0, 1) with 53 random bits: never 0, so -log(u) is a finite Exp(1) draw.
SEDD_HD double to_double_open(uint32_t hi, uint32_t lo) {
  uint64_t bits = ((static_cast<uint64_t>(hi) << 32) | lo) >> 11;
  return (static_cast<double>(bits) + 0.5) * (1.0 / 9007199254740992.0);
}

// The keyed stream of one purpose at one step: element (row, col) of it is
//   counter = (col block, row, step low, step high), key = the stream's 64-bit key.
// A block of four words gives four float32 draws or two float64 draws.
struct Stream {
  uint32_t k0, k1;        // key: splitmix of (seed, purpose)
  uint32_t step_lo, step_hi;

  SEDD_HD Words block(uint64_t row, uint64_t col_block) const {
    return philox4x32_10(static_cast<uint32_t>(col_block), static_cast<uint32_t>(row), step_lo, step_hi, k0, k1);
  }
  SEDD_HD float uniform_float(uint64_t row, uint64_t col) const {
    Words w = block(row, col >> 2);
    return to_float(w.w[col & 3]);
  }
  SEDD_HD double uniform_double(uint64_t row, uint64_t col) const {
    Words w = block(row, col >> 1);
    return (col & 1) ? to_double(w.w[2], w.w[3]) : to_double(w.w[0], w.w[1]);
  }
  SEDD_HD double uniform_open_double(uint64_t row, uint64_t col) const {
    Words w = block(row, col >> 1);
    return (col & 1) ? to_double_open(w.w[2], w.w[3]) : to_double_open(w.w[0], w.w[1]);
  }
};

SEDD_HD Stream make_stream(uint64_t seed, uint64_t purpose, uint64_t step) {
  uint64_t key = splitmix64(seed ^ splitmix64(purpose + 0x5EDD));
  return Stream{static_cast<uint32_t>(key), static_cast<uint32_t>(key >> 32), static_cast<uint32_t>(step),
                static_cast<uint32_t>(step >> 32)};
}

}  // namespace sedd::philox
