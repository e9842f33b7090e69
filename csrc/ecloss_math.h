// The per-row math of ECLoss (docs/design.md, sections 2-4), written once for the CPU and
// CUDA kernels.
//
// A row is one feature map x[b, c, :]; its scores are s[t] = tau * <x, T[t]> over the N
// templates. Kernels see the scores a tile at a time, so the softmax is online: a row keeps
//
//     max            m = max_t s[t]                         (over the templates seen so far)
//     sum_exp        l = sum_t exp(s[t] - m)
//     sum_exp_shift  a = sum_t exp(s[t] - m) * (s[t] - m)
//
// and two partial states merge exactly (FlashAttention's rescaling, extended to a). At the
// end a row's statistics are row_max = m, log_sum = log l and neg_entropy = sum_t p (s - m)
// - log l = a / l - log l. Keeping a relative to the running max avoids the cancellation of
// (sum_t p s) - lse when scores are large.
//
// Every later sweep forms p = exp((s - row_max) - log_sum) from the same rounded score and
// the same (row_max, log_sum) pair, and never from lse = row_max + log_sum: once scores
// reach 1e7 or so the ulp of row_max exceeds log_sum, so a rounded lse would give p that do
// not sum to 1 (and marginal losses above 0). The shift s - row_max is a difference of two
// rounded values: the kernels round s before subtracting (no FMA contraction there).
//
// Everything here is branch-free or nearly so, inline, and free of templates' memory layout,
// so the CPU code can call it inside vectorised loops and the CUDA code per thread.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__CUDACC__)
#define ECLOSS_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define ECLOSS_HOST_DEVICE inline __attribute__((always_inline))
#endif
#define ECLOSS_HOST inline __attribute__((always_inline))

namespace ecloss {

template <typename scalar_t>
struct SoftmaxState {
  scalar_t max;
  scalar_t sum_exp;
  scalar_t sum_exp_shift;
};

// exp on the host: Cody-Waite range reduction x = n ln2 + r, |r| <= ln2/2 (n rounded to
// nearest), a Taylor polynomial for exp(r) (degree 7 for float, 12 for double: truncation
// below half an ulp) and 2^n built in the exponent bits. Written without calls or branches so
// that the CPU loops that use it vectorise (libm's expf does not, without -ffast-math). NaN
// propagates through r. The kernels pass only arguments <= 0 (a score minus its row's max,
// minus log_sum); results below the normal range flush to 0, so a template whose weight
// underflows adds nothing to any sum (a floor at the smallest normal would add
// p * (s - max), a multiple of the score's size, to neg_entropy). The upper clamp keeps 2^n
// inside the exponent field whatever the argument.
// ln 2 in two parts for the exponent reductions of host_exp and the CPU's host_log: the high
// part has few enough bits that n * kHi is exact for every exponent n they meet.
template <typename scalar_t>
struct Ln2;
template <>
struct Ln2<float> {
  static constexpr float kHi = 0.693359375f;  // exact in 9 bits
  static constexpr float kLo = -2.12194440e-4f;
};
template <>
struct Ln2<double> {
  static constexpr double kHi = 6.93147180369123816490e-01;
  static constexpr double kLo = 1.90821492927058770002e-10;
};

ECLOSS_HOST float host_exp(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLowest = -87.3f;  // exp(kLowest) is just above the smallest normal
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23
  float clamped = x < kLowest ? kLowest : x;
  clamped = clamped > 88.3f ? 88.3f : clamped;
  // Adding 1.5 * 2^23 rounds to the nearest integer n without a libm call, and leaves n in
  // the low bits of the sum, whence 2^n without a float-to-int conversion (NaN needs none).
  const float rounded = clamped * kLog2e + kRound;
  const float n = rounded - kRound;
  const float r = (clamped - n * Ln2<float>::kHi) - n * Ln2<float>::kLo;
  float poly = 1.0f / 5040.0f;
  poly = poly * r + 1.0f / 720.0f;
  poly = poly * r + 1.0f / 120.0f;
  poly = poly * r + 1.0f / 24.0f;
  poly = poly * r + 1.0f / 6.0f;
  poly = poly * r + 0.5f;
  poly = poly * r + 1.0f;
  poly = poly * r + 1.0f;
  uint32_t bits;  // 1.5 * 2^23 + n: its bits past the 23rd leave in the shift
  std::memcpy(&bits, &rounded, sizeof bits);
  bits = (bits + 127u) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return x < kLowest ? 0.0f : poly * scale;
}

ECLOSS_HOST double host_exp(double x) {
  constexpr double kLog2e = 1.4426950408889634074;
  constexpr double kLowest = -708.0;  // exp(kLowest) is just above the smallest normal
  constexpr double kRound = 6755399441055744.0;  // 1.5 * 2^52
  double clamped = x < kLowest ? kLowest : x;
  clamped = clamped > 709.0 ? 709.0 : clamped;
  const double rounded = clamped * kLog2e + kRound;
  const double n = rounded - kRound;
  const double r = (clamped - n * Ln2<double>::kHi) - n * Ln2<double>::kLo;
  double poly = 1.0 / 479001600.0;  // 1/12!
  constexpr double kInverseFactorials[12] = {
      1.0 / 39916800.0, 1.0 / 3628800.0, 1.0 / 362880.0, 1.0 / 40320.0,
      1.0 / 5040.0,     1.0 / 720.0,     1.0 / 120.0,    1.0 / 24.0,
      1.0 / 6.0,        0.5,             1.0,            1.0};
  for (double coefficient : kInverseFactorials) poly = poly * r + coefficient;
  uint64_t bits;
  std::memcpy(&bits, &rounded, sizeof bits);
  bits = (bits + 1023u) << 52;
  double scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return x < kLowest ? 0.0 : poly * scale;
}

// exp used by the shared functions below: the device's exp2 unit on a GPU, host_exp on a CPU.
ECLOSS_HOST_DEVICE float exp_(float x) {
#if defined(__CUDA_ARCH__)
  return exp2f(x * 1.44269504088896341f);
#else
  return host_exp(x);
#endif
}

ECLOSS_HOST_DEVICE double exp_(double x) {
#if defined(__CUDA_ARCH__)
  return ::exp(x);
#else
  return host_exp(x);
#endif
}

template <typename scalar_t>
ECLOSS_HOST_DEVICE SoftmaxState<scalar_t> empty_state() {
  return {-std::numeric_limits<scalar_t>::infinity(), scalar_t(0), scalar_t(0)};
}

// The state of the union of two disjoint template sets. A state with nothing in it
// (sum_exp == 0) is the identity; that test also keeps (-inf) * 0 out of the sums. A NaN
// anywhere reaches sum_exp, so non-finite input never gives a finite loss.
template <typename scalar_t>
ECLOSS_HOST_DEVICE SoftmaxState<scalar_t> merge(const SoftmaxState<scalar_t>& first,
                                                const SoftmaxState<scalar_t>& second) {
  if (second.sum_exp == scalar_t(0)) return first;
  if (first.sum_exp == scalar_t(0)) return second;
  const scalar_t max = first.max > second.max ? first.max : second.max;
  const scalar_t shift_first = first.max - max;
  const scalar_t shift_second = second.max - max;
  const scalar_t scale_first = exp_(shift_first);
  const scalar_t scale_second = exp_(shift_second);
  return {max, scale_first * first.sum_exp + scale_second * second.sum_exp,
          scale_first * (first.sum_exp_shift + shift_first * first.sum_exp) +
              scale_second * (second.sum_exp_shift + shift_second * second.sum_exp)};
}

// Adds one score; rescales only when the maximum moves, so one exp per score in the common case.
template <typename scalar_t>
ECLOSS_HOST_DEVICE void push(SoftmaxState<scalar_t>& state, scalar_t score) {
  if (score > state.max) {
    const scalar_t shift = state.max - score;  // < 0
    const scalar_t scale = exp_(shift);
    state.sum_exp_shift = state.sum_exp > scalar_t(0)
                              ? scale * (state.sum_exp_shift + shift * state.sum_exp)
                              : scalar_t(0);
    state.sum_exp *= scale;
    state.max = score;
  }
  const scalar_t shifted = score - state.max;
  const scalar_t weight = exp_(shifted);
  state.sum_exp += weight;
  state.sum_exp_shift += weight * shifted;
}

// The row's statistics: row_max = m, log_sum = log l, neg_entropy = a / l - log l.
template <typename scalar_t>
ECLOSS_HOST_DEVICE void finish(const SoftmaxState<scalar_t>& state, scalar_t& row_max,
                               scalar_t& log_sum, scalar_t& neg_entropy) {
  row_max = state.max;
  log_sum = std::log(state.sum_exp);
  neg_entropy = state.sum_exp_shift / state.sum_exp - log_sum;
}

// log p[t] = (s[t] - row_max) - log_sum and p[t] = exp(log p[t]), from the shift
// s[t] - row_max of the rounded score: the one way every sweep forms p, so the p of the
// later sweeps are the forward's p.
template <typename scalar_t>
ECLOSS_HOST_DEVICE scalar_t log_probability(scalar_t shifted, scalar_t log_sum) {
  return shifted - log_sum;
}

template <typename scalar_t>
ECLOSS_HOST_DEVICE scalar_t probability(scalar_t shifted, scalar_t log_sum) {
  return exp_(log_probability(shifted, log_sum));
}

// d loss / ds[t] of the backend contract (docs/design.md sections 3 and 8.1) is
// p[t] * (z[t] - centre), centre the p-mean of z:
//     no prior (uniform estimator):  z = s - row_max,  centre = E = neg_entropy + log_sum,
//                                    times the row weight w
//     a prior[c, t] (it carries w):  z = w log p - prior,  centre = D = sum_t p z / sum_t p
// (the marginal estimator passes prior = w log q). The grouping is what float32 needs on
// peaked rows, where the top template has p near 1 and z - centre is small: s - row_max is
// exact for every score within a factor 2 of the max (Sterbenz), and a centre summed over
// the same z, over the same recomputed mass, cancels the top template's rounding of z (its
// weight in the mean is p, near 1). Measured on the CPU kernels with
// ecloss_fast.testing.peaked_maps (4x6 to 14x14 maps, float32 dx against a float64
// evaluation): relative error 3e-7 .. 3e-6, float32 autograd 4e-7 .. 4e-6; the marginal
// estimator with the centre E - r of two separately rounded sums gave 6e-6 .. 1.3e-5.
template <typename scalar_t>
ECLOSS_HOST_DEVICE scalar_t score_grad(scalar_t p, scalar_t z, scalar_t centre) {
  return p * (z - centre);
}

}  // namespace ecloss
