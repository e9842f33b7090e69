// Fused CPU kernels of ECLoss: row_stats, row_stats_with_grad, column_sums and input_grad of
// the backend contract (ecloss_fast/backends/__init__.py), and row_stats_with_scores and
// input_grad_from_scores for the op's kept-scores route; float32 and float64, and bfloat16 products
// (vdpbf16ps) for precision "bf16" where the CPU has AVX-512 BF16.
//
// Scores s = tau * X T^T are never stored beyond a block of kRowBlock rows x kTemplateBlock
// templates (48 x 128: 24 KB in float32, in L1/L2), except by row_stats_with_scores, which
// also writes them out.
// Per block:
//   1. a GEMM micro-kernel computes 6-row x 2-vector score tiles (6 x 16 floats on AVX2:
//      twelve accumulator registers) with K innermost, reading the templates from a
//      panel-packed copy (K x 2 vectors per panel) and the rows from a packed copy (K x 6),
//      and stores them multiplied by tau;
//   2. a vectorised epilogue turns the block into what the op needs (online softmax state,
//      column sums, the centre of the score gradient under a prior, or the score gradient,
//      ecloss_math.h);
//   3. input_grad and row_stats_with_grad: a second micro-kernel adds weights x templates into
//      per-row accumulators (dx; or U and V, Z), the templates' K axis in the vector lanes.
// Threads own disjoint rows (row_stats, input_grad) or disjoint (channel, template block)
// pairs whose rows they sum in batch order (column_sums), so every result is deterministic
// and independent of the thread count. Every sweep computes each score with the same
// micro-kernel (one copy per process, below), as one FMA chain over k = 0 .. K-1 whatever the
// block a row falls in, then one multiply by tau: the scores of row_stats, column_sums and
// input_grad are bitwise the same, hence so are their p (ecloss_math.h).
//
// The micro-kernels use GCC/Clang vector extensions of the instruction set's native width;
// the hot functions are compiled three times (x86-64 baseline with 16-byte vectors, AVX2+FMA
// with 32, AVX-512 with 64; plus the AVX-512 BF16 products) and picked at run time, the best
// the CPU has unless ECLOSS_FAST_CPU_ISA caps it (set_cpu_isa), so the shipped build stays
// portable without -march=native and every path can be tested on a CPU that has it. (A vector wider than the instruction set's registers compiles to
// stack traffic, hence one width per copy.)
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <mutex>
#include <string>
#include <vector>

#if defined(__x86_64__) && (defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 10))
#include <immintrin.h>
#define ECLOSS_BF16_KERNELS 1
#else
#define ECLOSS_BF16_KERNELS 0
#endif

#include "ecloss_math.h"
#include "ecloss_ops.h"

namespace ecloss {
namespace {

constexpr int64_t kRowTile = 6;          // rows per micro-kernel tile
constexpr int64_t kTileVectors = 2;      // vectors per micro-kernel tile row
constexpr int64_t kRowBlock = 48;        // rows per task, a multiple of kRowTile
constexpr int64_t kTemplateBlock = 128;  // templates per block, a multiple of every tile width
static_assert(kTemplateBlock % (kTileVectors * 64 / sizeof(float)) == 0 &&
                  kRowBlock % kRowTile == 0,
              "blocks must hold whole micro-kernel tiles at every vector width");

constexpr int64_t kCacheLine = 64;  // bytes: what one prefetch fetches

// A vector of kBytes bytes; kTileWidth scalars make one micro-kernel tile row.
template <typename scalar_t, int kBytes>
struct Simd {
  typedef scalar_t Vector __attribute__((vector_size(kBytes)));
  static constexpr int64_t kLanes = kBytes / sizeof(scalar_t);
  static constexpr int64_t kTileWidth = kTileVectors * kLanes;

  static ECLOSS_HOST Vector load(const scalar_t* source) {
    Vector value;
    std::memcpy(&value, source, sizeof value);
    return value;
  }
  static ECLOSS_HOST void store(scalar_t* target, const Vector& value) {
    std::memcpy(target, &value, sizeof value);
  }
};

// Everything one call needs; raw pointers into contiguous tensors.
template <typename scalar_t>
struct Problem {
  const scalar_t* x;  // (B, C, K)
  int64_t batch, channels, pixels, num_templates;
  const scalar_t* panels;  // (ceil(N / W), K, W) with W the tile width: template t, pixel
                           // k at [(t / W) * K + k] * W + t % W, zero past N
  const scalar_t* padded;  // (N, padded_pixels), zero past K; input_grad only
  int64_t padded_pixels;   // K rounded up for the accumulation (padded_pixel_count)
  // bfloat16 products (precision "bf16", float32 only): the same two layouts with the
  // reduction axis in pairs, as vdpbf16ps takes them (pack_templates_bf16).
  const uint16_t* panel_pairs;
  const uint16_t* padded_pairs;
  int64_t pixel_pairs;  // ceil(K / 2)
  scalar_t tau;
  int64_t row_tasks;  // the rows in this many tasks of whole tiles (row_task)
  // row_stats, row_stats_with_grad and input_grad with few rows: the templates split into
  // this many parts, each task one (row task, part), the parts' partial results merged in
  // part order afterwards (template_parts). 1: whole rows per task.
  int64_t template_parts;
  SoftmaxState<scalar_t>* part_states;  // (B*C, parts): row_stats
  // (B*C, parts, 2, padded_pixels): U and V (row_stats_with_grad), U and Z (input_grad
  // under a prior), dx (input_grad without a prior: the first of the two)
  scalar_t* part_sums;
  scalar_t* part_moments;  // (B*C, parts, 2): input_grad under a prior, the mass and c
  const scalar_t* row_max;      // (B, C), input of column_sums and input_grad
  const scalar_t* log_sum;      // (B, C), input of column_sums and input_grad
  const scalar_t* neg_entropy;  // (B, C), input of input_grad
  scalar_t* row_max_out;        // (B, C), outputs of row_stats
  scalar_t* log_sum_out;
  scalar_t* neg_entropy_out;
  scalar_t* neg_entropy_grad_out;  // (B, C, K), output of row_stats_with_grad
  const scalar_t* prior;   // (C, N) or nullptr
  const scalar_t* row_weight;  // (B, C)
  scalar_t* dx;                // (B, C, K)
  scalar_t* column_sums;       // (C, N)
  scalar_t* scores_out;        // (B, C, N), output of row_stats_with_scores
  // input_grad on the kept-scores route: the forward's scores, and under a prior each row's
  // p-mean of a = w log p - prior (kept_prior_mean)
  const scalar_t* kept_scores;  // (B, C, N)
  const scalar_t* prior_means;  // (B, C)
};

// A block of rows: row i is flat row index first + i * stride (b * C + c), i < count.
struct RowBlock {
  int64_t first, stride, count;
};

// Task `task` of `tasks` over `rows` rows: whole tiles of kRowTile rows, spread evenly
// (task i takes tiles i T / tasks .. (i + 1) T / tasks, rounded down, of T = ceil(rows /
// kRowTile)), so that equal runs of tasks hold equal numbers of tiles to within one.
ECLOSS_HOST RowBlock row_task(int64_t rows, int64_t tasks, int64_t task) {
  const int64_t tiles = (rows + kRowTile - 1) / kRowTile;
  const int64_t first = task * tiles / tasks * kRowTile;
  return {first, 1, std::min(rows, (task + 1) * tiles / tasks * kRowTile) - first};
}

template <typename scalar_t>
struct Scratch {
  explicit Scratch(const Problem<scalar_t>& problem)
      : row_panels(kRowBlock * problem.pixels),
        row_pairs(problem.panel_pairs != nullptr ? kRowBlock * 2 * problem.pixel_pairs : 0),
        grad_pairs(problem.panel_pairs != nullptr ? 2 * kRowBlock * kTemplateBlock : 0),
        scores(kRowBlock * kTemplateBlock),
        grads(kRowBlock * kTemplateBlock, scalar_t(0)),
        shifted_grads(kRowBlock * kTemplateBlock, scalar_t(0)),
        dx(kRowBlock * problem.padded_pixels),
        shifted_dx(kRowBlock * problem.padded_pixels),
        states(kRowBlock),
        centres(kRowBlock),
        masses(kRowBlock),
        references(kRowBlock) {}
  std::vector<scalar_t> row_panels;  // (kRowBlock / kRowTile, K, kRowTile)
  std::vector<uint16_t> row_pairs;   // bf16: (kRowBlock, 2 ceil(K/2)), rows in bfloat16
  std::vector<uint16_t> grad_pairs;  // bf16: (2, kRowBlock, kTemplateBlock), grads in bfloat16
  std::vector<scalar_t> scores;      // (kRowBlock, kTemplateBlock), s = tau * <x, T[t]>
  // Weights of the template products of a block, (kRowBlock, kTemplateBlock): the score
  // gradient over the row weight, or e^(s-m) (with a prior: p); shifted_grads: e^(s-m) (s-m)
  // (with a prior: p (z - c)).
  std::vector<scalar_t> grads;
  std::vector<scalar_t> shifted_grads;
  // (kRowBlock, padded_pixels): dx, or U = sum grads T; shifted_dx: sum shifted_grads T.
  std::vector<scalar_t> dx;
  std::vector<scalar_t> shifted_dx;
  std::vector<SoftmaxState<scalar_t>> states;
  std::vector<scalar_t> centres;     // per row: the centre of score_grad, or sum p (z - c)
  std::vector<scalar_t> masses;      // per row: sum_t p, while summing under a prior
  std::vector<scalar_t> references;  // per row, under a prior: c, the running mean of z
};

// float32 -> bfloat16 bits, rounded to nearest even (as torch's .bfloat16()); NaN stays NaN.
ECLOSS_HOST uint16_t bfloat16_bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

// Copies the block's rows into panels of kRowTile rows, pixel-major, zero rows past count;
// for bfloat16 products, into rounded rows with K padded to pairs.
template <typename scalar_t, bool kBf16>
ECLOSS_HOST void pack_rows(const Problem<scalar_t>& problem, const RowBlock& block,
                           Scratch<scalar_t>& scratch) {
  const int64_t pixels = problem.pixels;
  const int64_t padded_count = (block.count + kRowTile - 1) / kRowTile * kRowTile;
  if constexpr (kBf16) {
    const int64_t stride = 2 * problem.pixel_pairs;
    std::fill(scratch.row_pairs.begin(), scratch.row_pairs.begin() + padded_count * stride, 0);
    for (int64_t i = 0; i < block.count; ++i) {
      const scalar_t* row = problem.x + (block.first + i * block.stride) * pixels;
      for (int64_t k = 0; k < pixels; ++k) scratch.row_pairs[i * stride + k] = bfloat16_bits(row[k]);
    }
    return;
  }
  scalar_t* row_panels = scratch.row_panels.data();
  for (int64_t i = 0; i < padded_count; ++i) {
    scalar_t* panel = row_panels + (i / kRowTile) * pixels * kRowTile + i % kRowTile;
    if (i < block.count) {
      const scalar_t* row = problem.x + (block.first + i * block.stride) * pixels;
      for (int64_t k = 0; k < pixels; ++k) panel[k * kRowTile] = row[k];
    } else {
      for (int64_t k = 0; k < pixels; ++k) panel[k * kRowTile] = scalar_t(0);
    }
  }
}

#if ECLOSS_BF16_KERNELS
// The bfloat16 micro-kernels: vdpbf16ps (AVX-512 BF16) adds to each float32 lane the products
// of one pair of bfloat16 operands, so the reduction axis comes in pairs: K for the scores, the
// templates for dx. Tiles of kRowTile rows x 2 vectors of 16 lanes, as the AVX-512 float32
// kernels; products are exact in float32, accumulation in float32. Regular functions with
// their own target (an intrinsic cannot be inlined into code compiled without it); one call
// per block of rows costs nothing next to its arithmetic.
#define ECLOSS_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
constexpr int64_t kBf16Lanes = 16;
constexpr int64_t kBf16TileWidth = kTileVectors * kBf16Lanes;

// The vectors of the bfloat16 micro-kernels: float32 accumulators of kLanes lanes and the
// pairs of bfloat16 operands beside them, 512 bits, or 256 for the half vector that K leaves
// on the accumulation's last slice (accumulate_input_grads_bf16).
template <int kLanes>
struct Bf16Vectors;

template <>
struct Bf16Vectors<16> {
  using Sums = __m512;
  using Pairs = __m512bh;
  static ECLOSS_BF16_TARGET Sums zero() { return _mm512_setzero_ps(); }
  static ECLOSS_BF16_TARGET Pairs load(const uint16_t* pairs) {
    return (__m512bh)_mm512_loadu_si512(pairs);
  }
  static ECLOSS_BF16_TARGET Pairs broadcast(int32_t both) {
    return (__m512bh)_mm512_set1_epi32(both);
  }
  static ECLOSS_BF16_TARGET Sums dot(Sums sums, Pairs first, Pairs second) {
    return _mm512_dpbf16_ps(sums, first, second);
  }
  static ECLOSS_BF16_TARGET void add_to(float* target, Sums sums) {
    _mm512_storeu_ps(target, _mm512_add_ps(_mm512_loadu_ps(target), sums));
  }
};

template <>
struct Bf16Vectors<8> {
  using Sums = __m256;
  using Pairs = __m256bh;
  static ECLOSS_BF16_TARGET Sums zero() { return _mm256_setzero_ps(); }
  static ECLOSS_BF16_TARGET Pairs load(const uint16_t* pairs) {
    return (__m256bh)_mm256_loadu_si256(reinterpret_cast<const __m256i*>(pairs));
  }
  static ECLOSS_BF16_TARGET Pairs broadcast(int32_t both) {
    return (__m256bh)_mm256_set1_epi32(both);
  }
  static ECLOSS_BF16_TARGET Sums dot(Sums sums, Pairs first, Pairs second) {
    return _mm256_dpbf16_ps(sums, first, second);
  }
  static ECLOSS_BF16_TARGET void add_to(float* target, Sums sums) {
    _mm256_storeu_ps(target, _mm256_add_ps(_mm256_loadu_ps(target), sums));
  }
};

// accumulators[s][i][v] += sum over the pairs p of rows[s][i * row_stride + 2p .. +1] . the
// two templates' vector v of pair p (at vectors + p * vector_stride + v * 2 * kLanes), for
// kSets row sets at once: one tile of either micro-kernel below. With `upcoming`, the same
// vectors there (the next template block's) are fetched into L2 as these are read (see
// accumulate_slices).
template <int kSets, int kVectors, int kLanes = kBf16Lanes>
ECLOSS_BF16_TARGET inline __attribute__((always_inline)) void accumulate_bf16_tile(
    typename Bf16Vectors<kLanes>::Sums (&accumulators)[kSets][kRowTile][kVectors],
    const uint16_t* vectors, int64_t vector_stride, const uint16_t* const (&rows)[kSets],
    int64_t row_stride, int64_t pairs, const uint16_t* upcoming) {
  using V = Bf16Vectors<kLanes>;
  for (auto& set : accumulators) {
    for (auto& row : set) for (auto& value : row) value = V::zero();
  }
  for (int64_t pair = 0; pair < pairs; ++pair) {
    typename V::Pairs templates[kVectors];
    for (int64_t v = 0; v < kVectors; ++v) {
      templates[v] = V::load(vectors + pair * vector_stride + v * 2 * kLanes);
      if (upcoming != nullptr) {
        __builtin_prefetch(upcoming + pair * vector_stride + v * 2 * kLanes, 0, 2);
      }
    }
    for (int set = 0; set < kSets; ++set) {
#pragma GCC unroll 6
      for (int64_t i = 0; i < kRowTile; ++i) {
        int32_t both;
        std::memcpy(&both, rows[set] + i * row_stride + 2 * pair, sizeof both);
        const typename V::Pairs value = V::broadcast(both);
        for (int64_t v = 0; v < kVectors; ++v) {
          accumulators[set][i][v] = V::dot(accumulators[set][i][v], value, templates[v]);
        }
      }
    }
  }
}

// scores[i, j] = tau * <x[row i], T[t0 + j]> from bfloat16 rows (row i at rows + i * 2 pairs)
// and panels of kBf16TileWidth templates ((t / 32) pairs 32 2 layout: template t, pixel k at
// [((t / 32) * pairs + k / 2) * 32 + t % 32] * 2 + k % 2). Panel outermost, as score_block.
ECLOSS_BF16_TARGET void score_block_bf16(const uint16_t* rows, int64_t count,
                                         const uint16_t* panels, int64_t pairs, int64_t t0,
                                         int64_t width, int64_t num_templates, float tau,
                                         float* scores) {
  const __m512 scale = _mm512_set1_ps(tau);
  const int64_t panel_size = pairs * 2 * kBf16TileWidth;
  for (int64_t j0 = 0; j0 < width; j0 += kBf16TileWidth) {
    const uint16_t* panel = panels + (t0 + j0) / kBf16TileWidth * panel_size;
    const uint16_t* next = t0 + j0 + kBf16TileWidth < num_templates ? panel + panel_size
                                                                    : nullptr;
    for (int64_t i0 = 0; i0 < count; i0 += kRowTile) {
      __m512 accumulators[1][kRowTile][kTileVectors];
      accumulate_bf16_tile<1, kTileVectors>(accumulators, panel, 2 * kBf16TileWidth,
                                            {rows + i0 * 2 * pairs}, 2 * pairs, pairs,
                                            i0 == 0 ? next : nullptr);
      for (int64_t i = 0; i < kRowTile; ++i) {
        for (int64_t v = 0; v < kTileVectors; ++v) {
          _mm512_storeu_ps(scores + (i0 + i) * kTemplateBlock + j0 + v * kBf16Lanes,
                           _mm512_mul_ps(accumulators[0][i][v], scale));
        }
      }
    }
  }
}

// grads (rows x kTemplateBlock floats, width of them read) rounded to bfloat16 into pairs of
// the same layout, zero past width (so an odd block's last pair adds nothing): vcvtne2ps2bf16,
// round to nearest even as bfloat16_bits (NaN stays NaN; subnormal weights, which bfloat16
// products would lose anyway, become 0).
ECLOSS_BF16_TARGET inline __attribute__((always_inline)) void round_to_bf16(
    const float* grads, int64_t rows, int64_t width, uint16_t* pairs) {
  constexpr int64_t kVectors = kTemplateBlock / kBf16Lanes;
  __mmask16 kept[kVectors];  // the lanes of each vector below width
  for (int64_t v = 0; v < kVectors; ++v) {
    const int64_t lanes = std::clamp<int64_t>(width - v * kBf16Lanes, 0, kBf16Lanes);
    kept[v] = static_cast<__mmask16>((1u << lanes) - 1u);
  }
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t v = 0; v < kVectors; v += 2) {
      const float* first = grads + i * kTemplateBlock + v * kBf16Lanes;
      const __m512 high = _mm512_maskz_loadu_ps(kept[v + 1], first + kBf16Lanes);
      const __m512bh both = _mm512_cvtne2ps_pbh(high, _mm512_maskz_loadu_ps(kept[v], first));
      _mm512_storeu_si512(pairs + i * kTemplateBlock + v * kBf16Lanes, (__m512i)both);
    }
  }
}

// accumulate_input_grads_bf16 over the pixel slices k_begin .. k_end of kVectors vectors of
// kLanes each, from the rounded grads of each set (rows[s], kTemplateBlock apart).
template <int kSets, int kVectors, int kLanes = kBf16Lanes>
ECLOSS_BF16_TARGET inline __attribute__((always_inline)) void accumulate_slices_bf16(
    const uint16_t* const (&rounded)[kSets], int64_t count, int64_t pairs,
    const uint16_t* first_pair, const uint16_t* next_block, int64_t padded_pixels,
    int64_t k_begin, int64_t k_end, float* const (&dx)[kSets]) {
  using V = Bf16Vectors<kLanes>;
  for (int64_t k0 = k_begin; k0 < k_end; k0 += kVectors * kLanes) {
    for (int64_t i0 = 0; i0 < count; i0 += kRowTile) {
      const uint16_t* rows[kSets];
      for (int set = 0; set < kSets; ++set) rows[set] = rounded[set] + i0 * kTemplateBlock;
      typename V::Sums accumulators[kSets][kRowTile][kVectors];
      accumulate_bf16_tile<kSets, kVectors, kLanes>(
          accumulators, first_pair + k0 * 2, padded_pixels * 2, rows, kTemplateBlock, pairs,
          i0 == 0 && next_block != nullptr ? next_block + k0 * 2 : nullptr);
      for (int set = 0; set < kSets; ++set) {
        for (int64_t i = 0; i < kRowTile; ++i) {
          for (int64_t v = 0; v < kVectors; ++v) {
            V::add_to(dx[set] + (i0 + i) * padded_pixels + k0 + v * kLanes,
                      accumulators[set][i][v]);
          }
        }
      }
    }
  }
}

// The bfloat16 form of accumulate_input_grads: dx[s][i, :] += sum_j grads[s][i, j] T[t0 + j, :]
// for kSets weight sets in one stream of the templates, the grads rounded to bfloat16 into
// grad_pairs (kSets blocks of kRowBlock x kTemplateBlock), the templates in pairs of rows
// (template t, pixel k at [(t / 2) * padded_pixels + k] * 2 + t % 2). As the float32 form:
// pixel slices outermost, tiles of two vectors, then the vectors and the half vector K leaves
// (padded_pixels is K rounded up to 8, as the float32 AVX-512 path's), the next block's slice
// fetched while the first row tile reads this one's.
template <int kSets>
ECLOSS_BF16_TARGET void accumulate_input_grads_bf16(
    const float* const (&grads)[kSets], int64_t count, int64_t width, uint16_t* grad_pairs,
    const uint16_t* padded_pairs, int64_t padded_pixels, int64_t t0, int64_t num_templates,
    float* const (&dx)[kSets]) {
  const int64_t padded_count = (count + kRowTile - 1) / kRowTile * kRowTile;
  const int64_t pairs = (width + 1) / 2;
  const uint16_t* rounded[kSets];
  for (int set = 0; set < kSets; ++set) {
    uint16_t* target = grad_pairs + set * kRowBlock * kTemplateBlock;
    round_to_bf16(grads[set], padded_count, width, target);
    rounded[set] = target;
  }
  const uint16_t* first_pair = padded_pairs + t0 / 2 * padded_pixels * 2;
  const uint16_t* next_block = t0 + kTemplateBlock < num_templates
                                   ? first_pair + kTemplateBlock / 2 * padded_pixels * 2
                                   : nullptr;
  const int64_t whole = padded_pixels / kBf16TileWidth * kBf16TileWidth;
  const int64_t vectors = padded_pixels / kBf16Lanes * kBf16Lanes;
  accumulate_slices_bf16<kSets, kTileVectors>(rounded, count, pairs, first_pair, next_block,
                                              padded_pixels, 0, whole, dx);
  accumulate_slices_bf16<kSets, 1>(rounded, count, pairs, first_pair, next_block,
                                   padded_pixels, whole, vectors, dx);
  accumulate_slices_bf16<kSets, 1, kBf16Lanes / 2>(rounded, count, pairs, first_pair,
                                                   next_block, padded_pixels, vectors,
                                                   padded_pixels, dx);
}
#else
// Without AVX-512 BF16 in the compiler the bf16 tasks are never selected (select_bf16_tasks).
void score_block_bf16(const uint16_t*, int64_t, const uint16_t*, int64_t, int64_t, int64_t,
                      int64_t, float, float*) {}
template <int kSets>
void accumulate_input_grads_bf16(const float* const (&)[kSets], int64_t, int64_t, uint16_t*,
                                 const uint16_t*, int64_t, int64_t, int64_t,
                                 float* const (&)[kSets]) {}
#endif

// scores[i, j] = s = tau * <x[row i], T[t0 + j]> for the block's rows and templates
// t0 .. t0 + width: the dot product as one FMA chain in pixel order, then one rounded
// multiply by tau. The epilogues read s back from this buffer, so their shift s - max is the
// rounded score minus the rounded max: setup.py's -ffp-contract=fast cannot fuse
// tau * <x, T> - max into one FMA across the store (the FMA's unrounded product differs from
// s by up to half an ulp of s, which passes the range of exp once scores pass 1e9).
template <typename scalar_t, int kBytes, bool kBf16>
ECLOSS_HOST void score_block(const Problem<scalar_t>& problem, const RowBlock& block,
                             const Scratch<scalar_t>& scratch, int64_t t0, int64_t width,
                             scalar_t* scores) {
  if constexpr (kBf16) {
    score_block_bf16(scratch.row_pairs.data(), block.count, problem.panel_pairs,
                     problem.pixel_pairs, t0, width, problem.num_templates, problem.tau,
                     scores);
    return;
  }
  using S = Simd<scalar_t, kBytes>;
  const scalar_t* row_panels = scratch.row_panels.data();
  const int64_t pixels = problem.pixels;
  const scalar_t* panels_end = problem.panels + (problem.num_templates + S::kTileWidth - 1) /
                                                    S::kTileWidth * S::kTileWidth * pixels;
  // Template panel outermost: it stays in L1 while every row tile of the block reads it.
  for (int64_t j0 = 0; j0 < width; j0 += S::kTileWidth) {
    const scalar_t* panel = problem.panels + (t0 + j0) * pixels;
    const scalar_t* next = panel + S::kTileWidth * pixels;
    for (int64_t i0 = 0; i0 < block.count; i0 += kRowTile) {
      const scalar_t* rows = row_panels + i0 * pixels;
      typename S::Vector accumulators[kRowTile][kTileVectors] = {};
      for (int64_t k = 0; k < pixels; ++k) {
        typename S::Vector templates[kTileVectors];
        for (int64_t v = 0; v < kTileVectors; ++v) {
          templates[v] = S::load(panel + k * S::kTileWidth + v * S::kLanes);
        }
        if (i0 == 0 && next < panels_end) {  // the next panel, as the first row tile reads this
          for (int64_t line = 0; line < S::kTileWidth; line += kCacheLine / sizeof(scalar_t)) {
            __builtin_prefetch(next + k * S::kTileWidth + line, 0, 2);
          }
        }
#pragma GCC unroll 6
        for (int64_t i = 0; i < kRowTile; ++i) {
          const scalar_t value = rows[k * kRowTile + i];
          for (int64_t v = 0; v < kTileVectors; ++v) accumulators[i][v] += templates[v] * value;
        }
      }
#pragma GCC unroll 6
      for (int64_t i = 0; i < kRowTile; ++i) {
        for (int64_t v = 0; v < kTileVectors; ++v) {
          S::store(scores + (i0 + i) * kTemplateBlock + j0 + v * S::kLanes,
                   accumulators[i][v] * problem.tau);
        }
      }
    }
  }
}

// Vector registers of the instruction set whose vectors are kBytes wide: 32 zmm with AVX-512,
// 16 ymm (AVX2) or xmm (x86-64's SSE2).
constexpr int64_t vector_registers(int bytes) { return bytes >= 64 ? 32 : 16; }

// Rows per tile of accumulate_input_grads with kSets weight sets and kVectors vectors per
// tile row: the largest divisor of kRowTile whose kSets x rows x kVectors accumulators fit the
// registers beside the kVectors template vectors and the broadcast weight. With two sets and
// two vectors that is 6 rows on AVX-512 (24 + 3 of 32 registers) and 3 on AVX2 (12 + 3 of
// 16): 6 rows there kept 11 of the 24 accumulators on the stack, a load and a store per FMA
// (14x14, B=8, C=64, one thread of an AMD EPYC, AVX2: row_stats_with_grad 230 -> 167 ms,
// input_grad under a prior 230 -> 169).
template <int kBytes, int kSets, int kVectors>
constexpr int64_t accumulate_tile_rows() {
  constexpr int64_t free_registers = vector_registers(kBytes) - kVectors - 1;
  for (int64_t rows = kRowTile; rows > 1; --rows) {
    if (kRowTile % rows == 0 && kSets * rows * kVectors <= free_registers) return rows;
  }
  return 1;
}

// accumulate_input_grads over the pixel slices k_begin .. k_end of kVectors vectors each.
template <typename scalar_t, int kBytes, int kSets, int kVectors>
ECLOSS_HOST void accumulate_slices(const Problem<scalar_t>& problem, const RowBlock& block,
                                   const scalar_t* const (&grads)[kSets], int64_t t0,
                                   int64_t width, scalar_t* const (&dx)[kSets], int64_t k_begin,
                                   int64_t k_end) {
  using S = Simd<scalar_t, kBytes>;
  constexpr int64_t kRows = accumulate_tile_rows<kBytes, kSets, kVectors>();
  constexpr int64_t kSliceWidth = kVectors * S::kLanes;
  const int64_t padded_pixels = problem.padded_pixels;
  // Pixel slice outermost: its templates stay in L1 while every row tile reads them.
  for (int64_t k0 = k_begin; k0 < k_end; k0 += kSliceWidth) {
    for (int64_t i0 = 0; i0 < block.count; i0 += kRows) {
      typename S::Vector accumulators[kSets][kRows][kVectors] = {};
      const scalar_t* templates = problem.padded + t0 * padded_pixels + k0;
      for (int64_t j = 0; j < width; ++j) {
        typename S::Vector row[kVectors];
        for (int64_t v = 0; v < kVectors; ++v) {
          row[v] = S::load(templates + j * padded_pixels + v * S::kLanes);
        }
        // While the first row tile reads a slice, the next block's same slice is fetched
        // into L2: its rows lie padded_pixels scalars apart, a stride across pages that the
        // hardware prefetchers did not follow while the score sweep streamed its panels beside
        // it (B=8, C=64, 14x14, 2 threads, AMD EPYC Zen 4: row_stats_with_grad 73 -> 62 ms on
        // the AVX2 path, 70 -> 65 on AVX-512; input_grad 54 -> 44 and 50 -> 43).
        if (i0 == 0 && t0 + kTemplateBlock + j < problem.num_templates) {
          const scalar_t* next = templates + (kTemplateBlock + j) * padded_pixels;
          for (int64_t line = 0; line < kSliceWidth; line += kCacheLine / sizeof(scalar_t)) {
            __builtin_prefetch(next + line, 0, 2);
          }
        }
        for (int set = 0; set < kSets; ++set) {
#pragma GCC unroll 6
          for (int64_t i = 0; i < kRows; ++i) {
            const scalar_t grad = grads[set][(i0 + i) * kTemplateBlock + j];
            for (int64_t v = 0; v < kVectors; ++v) accumulators[set][i][v] += row[v] * grad;
          }
        }
      }
      for (int set = 0; set < kSets; ++set) {
#pragma GCC unroll 6
        for (int64_t i = 0; i < kRows; ++i) {
          for (int64_t v = 0; v < kVectors; ++v) {
            scalar_t* target = dx[set] + (i0 + i) * padded_pixels + k0 + v * S::kLanes;
            S::store(target, S::load(target) + accumulators[set][i][v]);
          }
        }
      }
    }
  }
}

// dx[s][i, :] += sum_j grads[s][i, j] * T[t0 + j, :] for kSets weight sets at once (one
// stream of the templates for U and V, or U and Z), over the block's rows rounded up to
// whole tiles: rows past count hold stale weights and are never written out. Each
// accumulator adds its block in template order whatever the tile's rows, so the tile
// changes no result. Slices of a whole tile width, then the vectors K leaves past them
// (padded_pixels is K rounded up to a vector, not a tile: 200 of K = 196 on AVX2, where 224
// added 14% to these products on AVX-512), and on AVX-512 the half vector past those
// (rounded up to half a vector there: 200, not 208; a 256-bit FMA takes half a 512-bit
// one's time on an AMD Zen 4: row_stats_with_grad 60.7 -> 59.9 ms at B=8, C=64, 14x14. On
// AVX2 a 128-bit tail gained nothing: the FMA units issue it at a 256-bit one's rate).
template <typename scalar_t, int kBytes, bool kBf16, int kSets>
ECLOSS_HOST void accumulate_input_grads(const Problem<scalar_t>& problem, const RowBlock& block,
                                        Scratch<scalar_t>& scratch,
                                        const scalar_t* const (&grads)[kSets], int64_t t0,
                                        int64_t width, scalar_t* const (&dx)[kSets]) {
  if constexpr (kBf16) {
    accumulate_input_grads_bf16<kSets>(grads, block.count, width, scratch.grad_pairs.data(),
                                       problem.padded_pairs, problem.padded_pixels, t0,
                                       problem.num_templates, dx);
    return;
  }
  using S = Simd<scalar_t, kBytes>;
  const int64_t whole = problem.padded_pixels / S::kTileWidth * S::kTileWidth;
  const int64_t vectors = problem.padded_pixels / S::kLanes * S::kLanes;
  accumulate_slices<scalar_t, kBytes, kSets, kTileVectors>(problem, block, grads, t0, width,
                                                           dx, 0, whole);
  accumulate_slices<scalar_t, kBytes, kSets, 1>(problem, block, grads, t0, width, dx, whole,
                                                vectors);
  if constexpr (kBytes == 64) {  // a half vector past them (padded_pixels)
    accumulate_slices<scalar_t, kBytes / 2, kSets, 1>(problem, block, grads, t0, width, dx,
                                                      vectors, problem.padded_pixels);
  }
}

template <typename scalar_t, int kBytes, bool kBf16>
ECLOSS_HOST void accumulate_input_grad(const Problem<scalar_t>& problem, const RowBlock& block,
                                       Scratch<scalar_t>& scratch, const scalar_t* grads,
                                       int64_t t0, int64_t width, scalar_t* dx) {
  accumulate_input_grads<scalar_t, kBytes, kBf16, 1>(problem, block, scratch, {grads}, t0,
                                                     width, {dx});
}

// The largest score of a block row (a select of values: with std::max(best, scores[j]), a
// reference into the buffer, GCC 12 left this reduction scalar, vmaxss; row_stats 35% slower
// at 14x14).
template <typename scalar_t>
ECLOSS_HOST scalar_t block_max_of(const scalar_t* scores, int64_t width) {
  scalar_t best = -std::numeric_limits<scalar_t>::infinity();
#pragma omp simd reduction(max : best)
  for (int64_t j = 0; j < width; ++j) best = best < scores[j] ? scores[j] : best;
  return best;
}

// The templates of one part of a task (template_parts): whole template blocks,
// so every score is formed in the same tile as without parts.
struct TemplateRange {
  int64_t begin, end;
};

template <typename scalar_t>
ECLOSS_HOST TemplateRange template_range(const Problem<scalar_t>& problem, int64_t part) {
  const int64_t blocks = (problem.num_templates + kTemplateBlock - 1) / kTemplateBlock;
  const int64_t per_part = (blocks + problem.template_parts - 1) / problem.template_parts;
  return {std::min(problem.num_templates, part * per_part * kTemplateBlock),
          std::min(problem.num_templates, (part + 1) * per_part * kTemplateBlock)};
}

// The rows and templates of task `task` of row_stats, row_stats_with_grad or input_grad.
template <typename scalar_t>
ECLOSS_HOST std::pair<RowBlock, TemplateRange> part_task(const Problem<scalar_t>& problem,
                                                         int64_t task) {
  return {row_task(problem.batch * problem.channels, problem.row_tasks,
                   task / problem.template_parts),
          template_range(problem, task % problem.template_parts)};
}

// U and V about a max m moved to m' = m - shift (shift <= 0): V = e^shift (V + shift U),
// U = e^shift U.
template <typename scalar_t>
ECLOSS_HOST void rebase(scalar_t* sum_weighted, scalar_t* sum_shifted, int64_t count,
                        scalar_t shift) {
  const scalar_t decay = host_exp(shift);
#pragma omp simd
  for (int64_t k = 0; k < count; ++k) {
    sum_shifted[k] = decay * (sum_shifted[k] + shift * sum_weighted[k]);
    sum_weighted[k] *= decay;
  }
}

// A row's statistics and d neg_entropy / dx = tau (V - (a/l) U) / l from its final state.
template <typename scalar_t>
ECLOSS_HOST void finish_with_grad(const Problem<scalar_t>& problem, int64_t row,
                                  const SoftmaxState<scalar_t>& state,
                                  const scalar_t* sum_weighted, const scalar_t* sum_shifted) {
  finish(state, problem.row_max_out[row], problem.log_sum_out[row],
         problem.neg_entropy_out[row]);
  const scalar_t mean_shift = state.sum_exp_shift / state.sum_exp;
  const scalar_t scale = problem.tau / state.sum_exp;
  scalar_t* target = problem.neg_entropy_grad_out + row * problem.pixels;
  for (int64_t k = 0; k < problem.pixels; ++k) {
    target[k] = scale * (sum_shifted[k] - mean_shift * sum_weighted[k]);
  }
}

// row_stats: the online-softmax state of each task's rows over its templates. With kWithGrad
// (row_stats_with_grad), from the same exponentials, d neg_entropy / dx = tau (V - (a/l) U) / l
// with U = sum e^(s-m) T and V = sum e^(s-m) (s-m) T about the running max m (ecloss_math.h's
// state holds l and a). Each block first raises m to its own max where that is larger,
// moving l, a (and U, V) to it as merge() does, then adds its weights e^(s-m) and
// e^(s-m)(s-m) about m itself: one exponential per score and none per block, where a state
// per block merged into the running one took two per row and block and, for U and V, a
// second pass over the weights of every block that did not hold the max. With template
// parts, each part's state (and U, V) goes to part_states (part_sums) for
// merge_row_stats_parts. With scores_out (row_stats_with_scores), the scores are written out
// too.
template <typename scalar_t, int kBytes, bool kBf16, bool kWithGrad>
ECLOSS_HOST void online_sweep_tasks(const Problem<scalar_t>& problem, int64_t begin,
                                    int64_t end) {
  Scratch<scalar_t> scratch(problem);
  const int64_t padded_pixels = problem.padded_pixels;
  for (int64_t task = begin; task < end; ++task) {
    const auto [block, range] = part_task(problem, task);
    const int64_t first = block.first, part = task % problem.template_parts;
    pack_rows<scalar_t, kBf16>(problem, block, scratch);
    for (int64_t i = 0; i < block.count; ++i) scratch.states[i] = empty_state<scalar_t>();
    if constexpr (kWithGrad) {
      std::fill(scratch.dx.begin(), scratch.dx.end(), scalar_t(0));
      std::fill(scratch.shifted_dx.begin(), scratch.shifted_dx.end(), scalar_t(0));
    }
    for (int64_t t0 = range.begin; t0 < range.end; t0 += kTemplateBlock) {
      const int64_t width = std::min(kTemplateBlock, range.end - t0);
      score_block<scalar_t, kBytes, kBf16>(problem, block, scratch, t0, width,
                                    scratch.scores.data());
      for (int64_t i = 0; i < block.count; ++i) {
        const scalar_t* scores = scratch.scores.data() + i * kTemplateBlock;
        if (problem.scores_out != nullptr) {  // row_stats_with_scores
          std::copy(scores, scores + width,
                    problem.scores_out + (first + i) * problem.num_templates + t0);
        }
        // The running max m' takes the block's: the sums so far (and U, V) move to it when it
        // rises (rarely after the first blocks), then the block's weights are e^(s-m').
        SoftmaxState<scalar_t>& state = scratch.states[i];
        const scalar_t block_max = block_max_of(scores, width);
        const scalar_t max = state.max < block_max ? block_max : state.max;
        if (state.sum_exp != scalar_t(0) && state.max != max) {
          const scalar_t shift = state.max - max, decay = host_exp(shift);
          state.sum_exp_shift = decay * (state.sum_exp_shift + shift * state.sum_exp);
          state.sum_exp *= decay;
          if constexpr (kWithGrad) {
            rebase(scratch.dx.data() + i * padded_pixels,
                   scratch.shifted_dx.data() + i * padded_pixels, padded_pixels, shift);
          }
        }
        state.max = max;
        scalar_t* weights = scratch.grads.data() + i * kTemplateBlock;
        scalar_t* shifted_weights = scratch.shifted_grads.data() + i * kTemplateBlock;
        scalar_t sum_exp = 0, sum_exp_shift = 0;
#pragma omp simd reduction(+ : sum_exp, sum_exp_shift)
        for (int64_t j = 0; j < width; ++j) {
          const scalar_t shifted = scores[j] - max;
          const scalar_t weight = host_exp(shifted);
          if constexpr (kWithGrad) {
            weights[j] = weight;
            shifted_weights[j] = weight * shifted;
          }
          sum_exp += weight;
          sum_exp_shift += weight * shifted;
        }
        state.sum_exp += sum_exp;
        state.sum_exp_shift += sum_exp_shift;
      }
      if constexpr (kWithGrad) {
        accumulate_input_grads<scalar_t, kBytes, kBf16, 2>(
          problem, block, scratch, {scratch.grads.data(), scratch.shifted_grads.data()}, t0,
            width, {scratch.dx.data(), scratch.shifted_dx.data()});
      }
    }
    for (int64_t i = 0; i < block.count; ++i) {
      const scalar_t* sum_weighted = scratch.dx.data() + i * padded_pixels;
      const scalar_t* sum_shifted = scratch.shifted_dx.data() + i * padded_pixels;
      if (problem.template_parts > 1) {
        const int64_t slot = (first + i) * problem.template_parts + part;
        problem.part_states[slot] = scratch.states[i];
        if constexpr (kWithGrad) {
          scalar_t* sums = problem.part_sums + slot * 2 * padded_pixels;
          std::copy(sum_weighted, sum_weighted + padded_pixels, sums);
          std::copy(sum_shifted, sum_shifted + padded_pixels, sums + padded_pixels);
        }
      } else if constexpr (kWithGrad) {
        finish_with_grad(problem, first + i, scratch.states[i], sum_weighted, sum_shifted);
      } else {
        finish(scratch.states[i], problem.row_max_out[first + i],
               problem.log_sum_out[first + i], problem.neg_entropy_out[first + i]);
      }
    }
  }
}

template <typename scalar_t, int kBytes, bool kBf16>
ECLOSS_HOST void row_stats_tasks(const Problem<scalar_t>& problem, int64_t begin, int64_t end) {
  online_sweep_tasks<scalar_t, kBytes, kBf16, false>(problem, begin, end);
}

template <typename scalar_t, int kBytes, bool kBf16>
ECLOSS_HOST void row_stats_with_grad_tasks(const Problem<scalar_t>& problem, int64_t begin,
                                           int64_t end) {
  online_sweep_tasks<scalar_t, kBytes, kBf16, true>(problem, begin, end);
}

// The parts of row_stats (with_grad: and of its U and V) merged in part order, one row
// each: the states as merge() joins them, U and V moved to the merged max as in the sweep.
template <typename scalar_t>
void merge_row_stats_parts(const Problem<scalar_t>& problem, bool with_grad, int64_t row) {
  const int64_t padded_pixels = problem.padded_pixels;
  std::vector<scalar_t> sum_weighted(with_grad ? padded_pixels : 0);
  std::vector<scalar_t> sum_shifted(with_grad ? padded_pixels : 0);
  SoftmaxState<scalar_t> state = empty_state<scalar_t>();
  for (int64_t part = 0; part < problem.template_parts; ++part) {
    const int64_t slot = row * problem.template_parts + part;
    const SoftmaxState<scalar_t>& next = problem.part_states[slot];
    const SoftmaxState<scalar_t> merged = merge(state, next);
    if (with_grad && next.sum_exp != scalar_t(0)) {
      if (state.sum_exp != scalar_t(0) && state.max != merged.max) {
        rebase(sum_weighted.data(), sum_shifted.data(), padded_pixels, state.max - merged.max);
      }
      const scalar_t shift = next.max - merged.max, decay = host_exp(shift);
      const scalar_t* part_weighted = problem.part_sums + slot * 2 * padded_pixels;
      const scalar_t* part_shifted = part_weighted + padded_pixels;
      for (int64_t k = 0; k < padded_pixels; ++k) {
        sum_shifted[k] += decay * (part_shifted[k] + shift * part_weighted[k]);
        sum_weighted[k] += decay * part_weighted[k];
      }
    }
    state = merged;
  }
  if (with_grad) {
    finish_with_grad(problem, row, state, sum_weighted.data(), sum_shifted.data());
  } else {
    finish(state, problem.row_max_out[row], problem.log_sum_out[row],
           problem.neg_entropy_out[row]);
  }
}


// One task is one template block: its column sums over every row, the rows in blocks of
// kRowBlock in flat order (b * C + c), so each channel's sums are added in batch order and
// each block of the templates is read once per kRowBlock rows (a task per channel would read
// it once per B rows: 8 GB of panels per sweep at 28x28 with C = 8).
template <typename scalar_t, int kBytes, bool kBf16>
ECLOSS_HOST void column_sums_tasks(const Problem<scalar_t>& problem, int64_t begin,
                                   int64_t end) {
  Scratch<scalar_t> scratch(problem);
  const int64_t rows = problem.batch * problem.channels;
  for (int64_t task = begin; task < end; ++task) {
    const int64_t t0 = task * kTemplateBlock;
    const int64_t width = std::min(kTemplateBlock, problem.num_templates - t0);
    for (int64_t channel = 0; channel < problem.channels; ++channel) {
      scalar_t* sums = problem.column_sums + channel * problem.num_templates + t0;
      std::fill(sums, sums + width, scalar_t(0));
    }
    for (int64_t first = 0; first < rows; first += kRowBlock) {
      const RowBlock block{first, 1, std::min(kRowBlock, rows - first)};
      pack_rows<scalar_t, kBf16>(problem, block, scratch);
      score_block<scalar_t, kBytes, kBf16>(problem, block, scratch, t0, width,
                                           scratch.scores.data());
      for (int64_t i = 0; i < block.count; ++i) {
        const int64_t row = first + i;
        const scalar_t row_max = problem.row_max[row], log_sum = problem.log_sum[row];
        const scalar_t* scores = scratch.scores.data() + i * kTemplateBlock;
        scalar_t* sums = problem.column_sums + (row % problem.channels) * problem.num_templates + t0;
#pragma omp simd
        for (int64_t j = 0; j < width; ++j) sums[j] += probability(scores[j] - row_max, log_sum);
      }
    }
  }
}

// dx under a prior in one sweep: sum_k p_k (z_k - D) T[k], z = w log p - prior, D the
// p-mean of z over the recomputed mass (1 in exact arithmetic), as tau (Z - D U) with
// U = sum p T and Z = sum p (z - c) T about a reference c: the mean of z over the templates
// seen so far, moved after every block (c' = c + sum p (z - c) / sum p, Z += (c - c') U,
// which leaves sum p (z - c') = 0). Z then holds only what differs from that mean: no
// large common part cancels between Z and D U at the end (a peaked row's best template,
// once seen, sets c), and the last block leaves D - c small. Over the templates of `range`;
// with template parts, U, Z, the mass and c go to the part's slot for
// merge_input_grad_parts.
template <typename scalar_t, int kBytes, bool kBf16>
ECLOSS_HOST void prior_input_grad_sweep(const Problem<scalar_t>& problem, const RowBlock& block,
                                        const TemplateRange& range, int64_t part,
                                        Scratch<scalar_t>& scratch) {
  const int64_t padded_pixels = problem.padded_pixels;
  std::fill(scratch.shifted_dx.begin(), scratch.shifted_dx.end(), scalar_t(0));
  for (int64_t i = 0; i < block.count; ++i) scratch.masses[i] = scratch.references[i] = 0;
  for (int64_t t0 = range.begin; t0 < range.end; t0 += kTemplateBlock) {
    const int64_t width = std::min(kTemplateBlock, range.end - t0);
    score_block<scalar_t, kBytes, kBf16>(problem, block, scratch, t0, width,
                                  scratch.scores.data());
    for (int64_t i = 0; i < block.count; ++i) {
      const int64_t row = block.first + i * block.stride;
      const scalar_t row_max = problem.row_max[row], log_sum = problem.log_sum[row];
      const scalar_t weight = problem.row_weight[row], reference = scratch.references[i];
      const scalar_t* scores = scratch.scores.data() + i * kTemplateBlock;
      const scalar_t* prior =
          problem.prior + (row % problem.channels) * problem.num_templates + t0;
      scalar_t* probabilities = scratch.grads.data() + i * kTemplateBlock;
      scalar_t* centred = scratch.shifted_grads.data() + i * kTemplateBlock;
      scalar_t sum_centred = 0, mass = 0;
#pragma omp simd reduction(+ : sum_centred, mass)
      for (int64_t j = 0; j < width; ++j) {
        const scalar_t log_p = log_probability(scores[j] - row_max, log_sum);
        const scalar_t p = exp_(log_p);
        probabilities[j] = p;
        centred[j] = p * ((weight * log_p - prior[j]) - reference);
        sum_centred += centred[j];
        mass += p;
      }
      scratch.centres[i] = sum_centred;
      scratch.masses[i] += mass;
    }
    accumulate_input_grads<scalar_t, kBytes, kBf16, 2>(
        problem, block, scratch, {scratch.grads.data(), scratch.shifted_grads.data()}, t0, width,
        {scratch.dx.data(), scratch.shifted_dx.data()});
    for (int64_t i = 0; i < block.count; ++i) {
      // A row whose mass so far underflowed to 0 keeps its reference (and its sums are 0).
      if (!(scratch.masses[i] > scalar_t(0))) continue;
      const scalar_t step = scratch.centres[i] / scratch.masses[i];
      const scalar_t* sum_weighted = scratch.dx.data() + i * padded_pixels;
      scalar_t* sum_centred = scratch.shifted_dx.data() + i * padded_pixels;
#pragma omp simd
      for (int64_t k = 0; k < padded_pixels; ++k) sum_centred[k] -= step * sum_weighted[k];
      scratch.references[i] += step;
    }
  }
  for (int64_t i = 0; i < block.count; ++i) {
    const int64_t row = block.first + i * block.stride;
    const scalar_t* sum_weighted = scratch.dx.data() + i * padded_pixels;
    const scalar_t* sum_centred = scratch.shifted_dx.data() + i * padded_pixels;
    if (problem.template_parts > 1) {
      const int64_t slot = row * problem.template_parts + part;
      scalar_t* sums = problem.part_sums + slot * 2 * padded_pixels;
      std::copy(sum_weighted, sum_weighted + padded_pixels, sums);
      std::copy(sum_centred, sum_centred + padded_pixels, sums + padded_pixels);
      problem.part_moments[2 * slot] = scratch.masses[i];
      problem.part_moments[2 * slot + 1] = scratch.references[i];
      continue;
    }
    scalar_t* target = problem.dx + row * problem.pixels;
    for (int64_t k = 0; k < problem.pixels; ++k) target[k] = problem.tau * sum_centred[k];
  }
}

// Whether input_grad's parts are plain sums of dx (without a prior, or with the kept scores'
// prior means) rather than U, Z and moments to join (prior_input_grad_sweep).
template <typename scalar_t>
ECLOSS_HOST bool plain_input_grad(const Problem<scalar_t>& problem) {
  return problem.prior == nullptr || problem.kept_scores != nullptr;
}

// dx = tau * (row weight) * sum_t grads T: the row weight is in the grads under a prior.
template <typename scalar_t>
ECLOSS_HOST scalar_t input_grad_scale(const Problem<scalar_t>& problem, int64_t row) {
  return problem.prior == nullptr ? problem.tau * problem.row_weight[row] : problem.tau;
}

// A row block's plain dx sums (scratch.dx) to the part's slot, or, with the templates whole,
// scaled (input_grad_scale) to dx.
template <typename scalar_t>
ECLOSS_HOST void store_input_grad(const Problem<scalar_t>& problem, const RowBlock& block,
                                  int64_t part, const Scratch<scalar_t>& scratch) {
  const int64_t padded_pixels = problem.padded_pixels;
  for (int64_t i = 0; i < block.count; ++i) {
    const int64_t row = block.first + i;
    const scalar_t* source = scratch.dx.data() + i * padded_pixels;
    if (problem.template_parts > 1) {
      const int64_t slot = row * problem.template_parts + part;
      std::copy(source, source + padded_pixels, problem.part_sums + slot * 2 * padded_pixels);
      continue;
    }
    const scalar_t scale = input_grad_scale(problem, row);
    scalar_t* target = problem.dx + row * problem.pixels;
    for (int64_t k = 0; k < problem.pixels; ++k) target[k] = scale * source[k];
  }
}

// Under a prior on the kept-scores route: D = sum_t p a / sum_t p of one row, a = w log p -
// prior, over the whole row before its sweep, so that the sweep adds p (a - D) T in one
// accumulator (prior_input_grad_sweep, which sees each template once, carries a second).
// A row whose mass underflowed to 0 has p = 0 everywhere: D = 0.
template <typename scalar_t>
ECLOSS_HOST scalar_t kept_prior_mean(const Problem<scalar_t>& problem, int64_t row) {
  const scalar_t row_max = problem.row_max[row], log_sum = problem.log_sum[row];
  const scalar_t weight = problem.row_weight[row];
  const scalar_t* scores = problem.kept_scores + row * problem.num_templates;
  const scalar_t* prior = problem.prior + (row % problem.channels) * problem.num_templates;
  // Summed a template block at a time, the blocks' sums then added: the rounding of a sum
  // over N = 307,721 terms in one chain moved dx by 7e-11 (float64, 28x28, near-uniform p).
  scalar_t weighted = 0, mass = 0;
  for (int64_t t0 = 0; t0 < problem.num_templates; t0 += kTemplateBlock) {
    const int64_t width = std::min(kTemplateBlock, problem.num_templates - t0);
    scalar_t block_weighted = 0, block_mass = 0;
#pragma omp simd reduction(+ : block_weighted, block_mass)
    for (int64_t t = t0; t < t0 + width; ++t) {
      const scalar_t log_p = log_probability(scores[t] - row_max, log_sum);
      const scalar_t p = exp_(log_p);
      block_weighted += p * (weight * log_p - prior[t]);
      block_mass += p;
    }
    weighted += block_weighted;
    mass += block_mass;
  }
  return mass > scalar_t(0) ? weighted / mass : scalar_t(0);
}

// input_grad's tasks. On the kept-scores route (kept_scores) the scores are read, not
// recomputed, and a prior takes the one-accumulator form with the rows' prior_means.
template <typename scalar_t, int kBytes, bool kBf16>
ECLOSS_HOST void input_grad_tasks(const Problem<scalar_t>& problem, int64_t begin, int64_t end) {
  Scratch<scalar_t> scratch(problem);
  const bool kept = problem.kept_scores != nullptr;
  for (int64_t task = begin; task < end; ++task) {
    const auto [block, range] = part_task(problem, task);
    const int64_t first = block.first, part = task % problem.template_parts;
    if (!kept) pack_rows<scalar_t, kBf16>(problem, block, scratch);
    std::fill(scratch.dx.begin(), scratch.dx.end(), scalar_t(0));
    if (!plain_input_grad(problem)) {
      prior_input_grad_sweep<scalar_t, kBytes, kBf16>(problem, block, range, part, scratch);
      continue;
    }
    for (int64_t i = 0; i < block.count; ++i) {  // E = neg_entropy + log_sum, or D
      scratch.centres[i] = problem.prior == nullptr
                               ? problem.neg_entropy[first + i] + problem.log_sum[first + i]
                               : problem.prior_means[first + i];
    }
    for (int64_t t0 = range.begin; t0 < range.end; t0 += kTemplateBlock) {
      const int64_t width = std::min(kTemplateBlock, range.end - t0);
      if (!kept) {
        score_block<scalar_t, kBytes, kBf16>(problem, block, scratch, t0, width,
                                             scratch.scores.data());
      }
      for (int64_t i = 0; i < block.count; ++i) {
        const int64_t row = first + i;
        const scalar_t row_max = problem.row_max[row], log_sum = problem.log_sum[row];
        const scalar_t centre = scratch.centres[i];
        const scalar_t* scores = kept ? problem.kept_scores + row * problem.num_templates + t0
                                      : scratch.scores.data() + i * kTemplateBlock;
        scalar_t* grads = scratch.grads.data() + i * kTemplateBlock;
        if (problem.prior == nullptr) {
#pragma omp simd
          for (int64_t j = 0; j < width; ++j) {
            const scalar_t shifted = scores[j] - row_max;
            grads[j] = score_grad(probability(shifted, log_sum), shifted, centre);
          }
          continue;
        }
        const scalar_t weight = problem.row_weight[row];
        const scalar_t* prior =
            problem.prior + (row % problem.channels) * problem.num_templates + t0;
#pragma omp simd
        for (int64_t j = 0; j < width; ++j) {
          const scalar_t log_p = log_probability(scores[j] - row_max, log_sum);
          grads[j] = exp_(log_p) * ((weight * log_p - prior[j]) - centre);
        }
      }
      accumulate_input_grad<scalar_t, kBytes, kBf16>(problem, block, scratch,
                                                     scratch.grads.data(), t0, width,
                                                     scratch.dx.data());
    }
    store_input_grad(problem, block, part, scratch);
  }
}

// The parts of input_grad merged in part order, one row: plain parts (plain_input_grad)
// summed; under a prior each part's U, Z about its own c and its mass join as the sweep
// joins a block: c' = c + m_P (c_P - c) / (m + m_P), Z += (c - c') U + Z_P + (c_P - c') U_P,
// U += U_P (a part whose mass underflowed to 0 adds nothing).
template <typename scalar_t>
void merge_input_grad_parts(const Problem<scalar_t>& problem, int64_t row) {
  const int64_t padded_pixels = problem.padded_pixels;
  std::vector<scalar_t> sum_weighted(padded_pixels), sum_centred(padded_pixels);
  scalar_t mass = 0, reference = 0;
  for (int64_t part = 0; part < problem.template_parts; ++part) {
    const int64_t slot = row * problem.template_parts + part;
    const scalar_t* part_weighted = problem.part_sums + slot * 2 * padded_pixels;
    if (plain_input_grad(problem)) {
      for (int64_t k = 0; k < padded_pixels; ++k) sum_weighted[k] += part_weighted[k];
      continue;
    }
    const scalar_t part_mass = problem.part_moments[2 * slot];
    const scalar_t part_reference = problem.part_moments[2 * slot + 1];
    if (!(part_mass > scalar_t(0))) continue;
    const scalar_t total = mass + part_mass;
    const scalar_t merged =
        mass > scalar_t(0) ? reference + part_mass * (part_reference - reference) / total
                           : part_reference;
    const scalar_t* part_centred = part_weighted + padded_pixels;
    for (int64_t k = 0; k < padded_pixels; ++k) {
      sum_centred[k] += (reference - merged) * sum_weighted[k] + part_centred[k] +
                        (part_reference - merged) * part_weighted[k];
      sum_weighted[k] += part_weighted[k];
    }
    mass = total;
    reference = merged;
  }
  const scalar_t scale = input_grad_scale(problem, row);
  const scalar_t* source = plain_input_grad(problem) ? sum_weighted.data() : sum_centred.data();
  scalar_t* target = problem.dx + row * problem.pixels;
  for (int64_t k = 0; k < problem.pixels; ++k) target[k] = scale * source[k];
}

// log on the host, for the marginal estimator's floored logarithms (log_floored_rows): x =
// 2^e m with m in [sqrt(1/2), sqrt(2)) read from the bits (musl's reduction), log m =
// 2 atanh(s) = 2 s (1 + s^2/3 + s^4/5 + ...) with s = (m - 1) / (m + 1), |s| <= 0.1716, to
// s^9 for float and s^21 for double (the next term below 2e-9 and 1e-18 of the sum), and
// e ln 2 in two parts (Ln2, as host_exp). For normal x; log_floored floors below them.
template <typename scalar_t>
struct LogConstants;
template <>
struct LogConstants<float> {
  using Bits = uint32_t;
  using SignedBits = int32_t;
  static constexpr Bits kHalfSqrt2 = 0x3f3504f3u;  // the bits of sqrt(1/2)
  static constexpr int kMantissaBits = 23;
  static constexpr int kTerms = 5;  // 1, s^2/3, ..., s^8/9
};
template <>
struct LogConstants<double> {
  using Bits = uint64_t;
  using SignedBits = int64_t;
  static constexpr Bits kHalfSqrt2 = 0x3fe6a09e667f3bcdull;
  static constexpr int kMantissaBits = 52;
  static constexpr int kTerms = 11;  // 1, s^2/3, ..., s^20/21
};

template <typename scalar_t>
ECLOSS_HOST scalar_t host_log(scalar_t x) {
  using L = LogConstants<scalar_t>;
  typename L::Bits bits;
  std::memcpy(&bits, &x, sizeof bits);
  const typename L::Bits offset = bits - L::kHalfSqrt2;
  const auto exponent = static_cast<scalar_t>(
      static_cast<typename L::SignedBits>(offset) >> L::kMantissaBits);
  const typename L::Bits reduced =
      bits - (offset & (~typename L::Bits(0) << L::kMantissaBits));
  scalar_t m;
  std::memcpy(&m, &reduced, sizeof m);
  const scalar_t s = (m - scalar_t(1)) / (m + scalar_t(1)), s2 = s * s;
  scalar_t series = scalar_t(1) / scalar_t(2 * L::kTerms - 1);
  for (int term = L::kTerms - 2; term >= 1; --term) {
    series = series * s2 + scalar_t(1) / scalar_t(2 * term + 1);
  }
  const scalar_t twice = s + s;
  return exponent * Ln2<scalar_t>::kHi +
         (exponent * Ln2<scalar_t>::kLo + (twice + twice * s2 * series));
}

// log max(q, tiny), tiny the smallest normal: finite for q = 0, so that a term with q = 0
// and weight 0 adds 0 (docs/design.md section 4); NaN and +inf come back as they are.
template <typename scalar_t>
ECLOSS_HOST scalar_t log_floored(scalar_t q) {
  const scalar_t floored = q < std::numeric_limits<scalar_t>::min()
                               ? std::numeric_limits<scalar_t>::min() : q;
  const scalar_t log = host_log(floored);
  return floored < std::numeric_limits<scalar_t>::infinity() ? log : floored;
}

// out[r, t] = scale[r] log max(q[r, t], tiny) (scale nullptr: 1) for the rows begin .. end
// of `columns` each: the marginal's prior w log pbar (the backward's, ecloss_fast/_ops.py).
template <typename scalar_t>
ECLOSS_HOST void log_floored_rows(const scalar_t* q, const scalar_t* scale, scalar_t* out,
                                  int64_t columns, int64_t begin, int64_t end) {
  for (int64_t row = begin; row < end; ++row) {
    const scalar_t factor = scale != nullptr ? scale[row] : scalar_t(1);
    const scalar_t* source = q + row * columns;
    scalar_t* target = out + row * columns;
#pragma omp simd
    for (int64_t t = 0; t < columns; ++t) target[t] = factor * log_floored(source[t]);
  }
}

// sums[r] = sum_t weights[r, t] log max(q[r, t], tiny) for the rows begin .. end, in float64
// with Neumaier's compensation in each vector lane: the forward's sum_t (sum_b p) log pbar,
// whose N terms of size log N cancel against the entropies to the loss. (Plainly summed,
// float64 maps of zeros at 4x4, N = 137, gave marginal losses of -1.2e-14 where torch's
// vecdot gave -8.9e-16: 12 ulps of the sum.)
template <typename scalar_t>
ECLOSS_HOST void weighted_log_sums_rows(const scalar_t* weights, const scalar_t* q,
                                        scalar_t* sums, int64_t columns, int64_t begin,
                                        int64_t end) {
  for (int64_t row = begin; row < end; ++row) {
    const scalar_t* weight = weights + row * columns;
    const scalar_t* source = q + row * columns;
    double total = 0, compensation = 0;
#pragma omp simd reduction(+ : total, compensation)
    for (int64_t t = 0; t < columns; ++t) {
      const double term = static_cast<double>(weight[t] * log_floored(source[t]));
      const double next = total + term;
      compensation += std::abs(total) >= std::abs(term) ? (total - next) + term
                                                         : (term - next) + total;
      total = next;
    }
    sums[row] = static_cast<scalar_t>(total + compensation);
  }
}

// The task loops compiled once per instruction set. `flatten` inlines every helper above
// into each copy, so the micro-kernels and epilogues take the copy's vector width.
template <typename scalar_t>
struct Tasks {
  int64_t tile_width;  // scalars per micro-kernel tile row: the layout pack_templates writes
  bool bf16;           // bfloat16 products (pack_templates_bf16's layouts)
  void (*row_stats)(const Problem<scalar_t>&, int64_t, int64_t);
  void (*row_stats_with_grad)(const Problem<scalar_t>&, int64_t, int64_t);
  void (*column_sums)(const Problem<scalar_t>&, int64_t, int64_t);
  void (*input_grad)(const Problem<scalar_t>&, int64_t, int64_t);
  void (*log_floored)(const scalar_t*, const scalar_t*, scalar_t*, int64_t, int64_t, int64_t);
  void (*weighted_log_sums)(const scalar_t*, const scalar_t*, scalar_t*, int64_t, int64_t,
                            int64_t);
};

#define ECLOSS_DEFINE_TASKS(NAME, BYTES, TARGET)                                            \
  template <typename scalar_t>                                                              \
  TARGET __attribute__((flatten)) void row_stats_##NAME(const Problem<scalar_t>& problem,   \
                                                        int64_t begin, int64_t end) {       \
    row_stats_tasks<scalar_t, BYTES, false>(problem, begin, end);                                  \
  }                                                                                         \
  template <typename scalar_t>                                                              \
  TARGET __attribute__((flatten)) void row_stats_with_grad_##NAME(                          \
      const Problem<scalar_t>& problem, int64_t begin, int64_t end) {                       \
    row_stats_with_grad_tasks<scalar_t, BYTES, false>(problem, begin, end);                        \
  }                                                                                         \
  template <typename scalar_t>                                                              \
  TARGET __attribute__((flatten)) void column_sums_##NAME(const Problem<scalar_t>& problem,  \
                                                          int64_t begin, int64_t end) {     \
    column_sums_tasks<scalar_t, BYTES, false>(problem, begin, end);                                \
  }                                                                                         \
  template <typename scalar_t>                                                              \
  TARGET __attribute__((flatten)) void input_grad_##NAME(const Problem<scalar_t>& problem,  \
                                                         int64_t begin, int64_t end) {      \
    input_grad_tasks<scalar_t, BYTES, false>(problem, begin, end);                                 \
  }                                                                                         \
  template <typename scalar_t>                                                              \
  TARGET __attribute__((flatten)) void log_floored_##NAME(                                  \
      const scalar_t* q, const scalar_t* scale, scalar_t* out, int64_t columns,             \
      int64_t begin, int64_t end) {                                                         \
    log_floored_rows(q, scale, out, columns, begin, end);                                   \
  }                                                                                         \
  template <typename scalar_t>                                                              \
  TARGET __attribute__((flatten)) void weighted_log_sums_##NAME(                            \
      const scalar_t* weights, const scalar_t* q, scalar_t* sums, int64_t columns,          \
      int64_t begin, int64_t end) {                                                         \
    weighted_log_sums_rows(weights, q, sums, columns, begin, end);                          \
  }                                                                                         \
  template <typename scalar_t>                                                              \
  Tasks<scalar_t> tasks_##NAME() {                                                          \
    return {Simd<scalar_t, BYTES>::kTileWidth, false, &row_stats_##NAME<scalar_t>,          \
            &row_stats_with_grad_##NAME<scalar_t>, &column_sums_##NAME<scalar_t>,           \
            &input_grad_##NAME<scalar_t>, &log_floored_##NAME<scalar_t>,                    \
            &weighted_log_sums_##NAME<scalar_t>};                                           \
  }

ECLOSS_DEFINE_TASKS(baseline, 16, )
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
ECLOSS_DEFINE_TASKS(avx2, 32, __attribute__((target("avx2,fma"))))
ECLOSS_DEFINE_TASKS(avx512, 64, __attribute__((target("avx512f,avx512vl,avx512dq,avx2,fma"))))
#endif
#undef ECLOSS_DEFINE_TASKS

// The instruction-set paths, lowest first (names as ECLOSS_FAST_CPU_ISA spells them). The
// kernels run the path that the ceiling allows (set_cpu_isa; the best this CPU has unless
// told otherwise), so that every path can be run and tested on a CPU that has it.
enum class Isa : int { kBaseline, kAvx2, kAvx512, kAvx512Bf16 };
constexpr const char* kIsaNames[] = {"baseline", "avx2", "avx512", "avx512_bf16"};
constexpr int kIsaCount = 4;

// The highest path this CPU and this build have.
Isa best_isa() {
  static const Isa best = [] {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512dq")) {
#if ECLOSS_BF16_KERNELS
      if (__builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512bf16")) {
        return Isa::kAvx512Bf16;
      }
#endif
      return Isa::kAvx512;
    }
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
    return Isa::kBaseline;
  }();
  return best;
}

// The path in use: set_cpu_isa's choice, -1 until then (the best).
std::atomic<int> isa_choice{-1};

Isa isa_in_use() {
  const int chosen = isa_choice.load(std::memory_order_relaxed);
  return chosen < 0 ? best_isa() : static_cast<Isa>(chosen);
}

template <typename scalar_t>
const Tasks<scalar_t>& tasks_at(Isa isa) {
  static const Tasks<scalar_t> baseline = tasks_baseline<scalar_t>();
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  static const Tasks<scalar_t> avx2 = tasks_avx2<scalar_t>();
  static const Tasks<scalar_t> avx512 = tasks_avx512<scalar_t>();
  if (isa >= Isa::kAvx512) return avx512;
  if (isa == Isa::kAvx2) return avx2;
#endif
  return baseline;
}

#if ECLOSS_BF16_KERNELS
#define ECLOSS_DEFINE_BF16_TASK(OP)                                                         \
  __attribute__((target("avx512f,avx512vl,avx512dq,avx512bw,avx512bf16,avx2,fma"), flatten)) \
  void OP##_bf16(const Problem<float>& problem, int64_t begin, int64_t end) {               \
    OP##_tasks<float, 64, true>(problem, begin, end);                                       \
  }
ECLOSS_DEFINE_BF16_TASK(row_stats)
ECLOSS_DEFINE_BF16_TASK(row_stats_with_grad)
ECLOSS_DEFINE_BF16_TASK(column_sums)
ECLOSS_DEFINE_BF16_TASK(input_grad)
#undef ECLOSS_DEFINE_BF16_TASK
#endif

// The tasks of one call on the path in use: bfloat16 products for precision "bf16" on float32
// maps on the avx512_bf16 path, else full precision (float64 maps always compute in float64).
template <typename scalar_t>
const Tasks<scalar_t>& tasks_for(c10::string_view precision) {
  const Isa isa = isa_in_use();
#if ECLOSS_BF16_KERNELS
  if constexpr (std::is_same_v<scalar_t, float>) {
    static const Tasks<float> bf16_tasks{kBf16TileWidth,
                                         true,
                                         &row_stats_bf16,
                                         &row_stats_with_grad_bf16,
                                         &column_sums_bf16,
                                         &input_grad_bf16,
                                         &log_floored_avx512<float>,
                                         &weighted_log_sums_avx512<float>};
    if (isa == Isa::kAvx512Bf16 && parse_precision(precision) == Precision::kBf16) {
      return bf16_tasks;
    }
  }
#endif
  return tasks_at<scalar_t>(isa);
}

// K rounded up for the accumulation's layout of vectors of `lanes` scalars of `bytes` each:
// to a whole vector, or to half of a 512-bit one, whose last half the accumulation takes in
// 256-bit instructions (accumulate_input_grads, accumulate_input_grads_bf16).
int64_t padded_pixel_count(int64_t pixels, int64_t lanes, int64_t bytes) {
  const int64_t step = lanes * bytes == 64 ? lanes / 2 : lanes;
  return (pixels + step - 1) / step * step;
}

// The template matrix in the two layouts the micro-kernels read (see Problem), for tiles
// `tile_width` scalars wide.
template <typename scalar_t>
void pack_templates(const at::Tensor& templates, int64_t tile_width, at::Tensor& panels,
                    at::Tensor& padded) {
  const int64_t count = templates.size(0), pixels = templates.size(1);
  const int64_t panel_count = (count + tile_width - 1) / tile_width;
  const int64_t padded_pixels =
      padded_pixel_count(pixels, tile_width / kTileVectors, sizeof(scalar_t));
  panels = at::empty({panel_count, pixels, tile_width}, templates.options());
  padded = at::zeros({count, padded_pixels}, templates.options());
  const scalar_t* source = templates.data_ptr<scalar_t>();
  scalar_t* panel_data = panels.data_ptr<scalar_t>();
  scalar_t* padded_data = padded.data_ptr<scalar_t>();
  at::parallel_for(0, panel_count, 16, [&](int64_t begin, int64_t end) {
    for (int64_t panel = begin; panel < end; ++panel) {
      scalar_t* target = panel_data + panel * pixels * tile_width;
      for (int64_t lane = 0; lane < tile_width; ++lane) {
        const int64_t t = panel * tile_width + lane;
        if (t < count) {
          const scalar_t* row = source + t * pixels;
          for (int64_t k = 0; k < pixels; ++k) target[k * tile_width + lane] = row[k];
          std::copy(row, row + pixels, padded_data + t * padded_pixels);
        } else {
          for (int64_t k = 0; k < pixels; ++k) target[k * tile_width + lane] = scalar_t(0);
        }
      }
    }
  });
}

// The same two layouts in bfloat16 with the reduction axis in pairs (see score_block_bf16 and
// accumulate_input_grad_bf16), zero past N and K; bits in int16 tensors.
void pack_templates_bf16(const at::Tensor& templates, int64_t tile_width, at::Tensor& panels,
                         at::Tensor& padded) {
  const int64_t count = templates.size(0), pixels = templates.size(1);
  const int64_t pairs = (pixels + 1) / 2;
  const int64_t panel_count = (count + tile_width - 1) / tile_width;
  const int64_t padded_pixels = padded_pixel_count(pixels, tile_width / kTileVectors,
                                                   sizeof(float));
  const auto options = templates.options().dtype(at::kShort);
  panels = at::zeros({panel_count, pairs, tile_width, 2}, options);
  padded = at::zeros({(count + 1) / 2, padded_pixels, 2}, options);
  const float* source = templates.data_ptr<float>();
  auto* panel_data = reinterpret_cast<uint16_t*>(panels.data_ptr<int16_t>());
  auto* padded_data = reinterpret_cast<uint16_t*>(padded.data_ptr<int16_t>());
  at::parallel_for(0, count, 256, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t k = 0; k < pixels; ++k) {
        const uint16_t bits = bfloat16_bits(source[t * pixels + k]);
        panel_data[(((t / tile_width) * pairs + k / 2) * tile_width + t % tile_width) * 2 +
                   k % 2] = bits;
        padded_data[((t / 2) * padded_pixels + k) * 2 + t % 2] = bits;
      }
    }
  });
}

// Packed copies of the last few template matrices, reused while a matrix lives unchanged (same
// tensor, same version): packing reads the matrix and writes two copies of it per call
// otherwise (15 MB each at 14x14 in float32, 1 GB at 28x28). An entry holds its matrix weakly
// and goes when the matrix does.
class PackedTemplatesCache {
 public:
  std::pair<at::Tensor, at::Tensor> get(const at::Tensor& templates, int64_t tile_width,
                                        bool bf16) {
    std::lock_guard<std::mutex> lock(mutex_);
    entries_.erase(std::remove_if(entries_.begin(), entries_.end(),
                                  [](const Entry& entry) { return entry.source.expired(); }),
                   entries_.end());
    for (const Entry& entry : entries_) {
      if (entry.source.lock().get() == templates.unsafeGetTensorImpl() &&
          entry.version == templates._version() && entry.tile_width == tile_width &&
          entry.bf16 == bf16) {
        return {entry.panels, entry.padded};
      }
    }
    at::Tensor panels, padded;
    if (bf16) {
      pack_templates_bf16(templates, tile_width, panels, padded);
    } else {
      AT_DISPATCH_FLOATING_TYPES(templates.scalar_type(), "ecloss_pack_templates", [&] {
        pack_templates<scalar_t>(templates, tile_width, panels, padded);
      });
    }
    if (entries_.size() >= kEntries) entries_.erase(entries_.begin());
    entries_.push_back({Weak(templates.getIntrusivePtr()), templates._version(), tile_width,
                        bf16, panels, padded});
    return {panels, padded};
  }

 private:
  using Weak = c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>;
  struct Entry {
    Weak source;
    int64_t version;
    int64_t tile_width;
    bool bf16;
    at::Tensor panels, padded;
  };
  static constexpr size_t kEntries = 4;
  std::mutex mutex_;
  std::vector<Entry> entries_;
};

template <typename scalar_t>
std::pair<at::Tensor, at::Tensor> packed_templates(const at::Tensor& templates,
                                                   const Tasks<scalar_t>& chosen) {
  static PackedTemplatesCache cache;
  return cache.get(templates, chosen.tile_width, chosen.bf16);
}

// Tasks over `rows` rows (Problem::row_tasks): at most kRowBlock rows each and, with
// `balanced`, as few as that allows rounded up to a multiple of the thread count:
// at::parallel_for hands each thread an equal run of tasks and row_task spreads the tiles
// evenly over them, so the threads get the same number of tiles to within one per task.
// (ceil(rows / kRowBlock) tasks of kRowBlock rows, 11 for 512 rows, gave one of two
// threads 288 rows and the other 224: 11% of the time lost waiting.) With template parts
// the parts spread the work, and the fewest tasks read the templates the fewest times.
int64_t row_tasks(int64_t rows, bool balanced) {
  constexpr int64_t kTilesPerTask = kRowBlock / kRowTile;
  const int64_t tiles = (rows + kRowTile - 1) / kRowTile;
  const int64_t fewest = (tiles + kTilesPerTask - 1) / kTilesPerTask;
  if (!balanced) return fewest;
  const int64_t threads = at::get_num_threads();
  return std::min(tiles, (fewest + threads - 1) / threads * threads);
}

// Template parts of a row sweep (Problem::template_parts) for `rows` rows: with few row
// tasks there are too few tasks for the threads, and each task streams every template once
// for at most kRowBlock rows (at 28x28, B*C = 16, a 965 MB panel per 6-row task). Parts give
// every thread work and every task up to kRowBlock rows. Chosen from the shape alone, so the
// results do not depend on the number of threads.
int64_t template_parts(int64_t rows, int64_t num_templates) {
  constexpr int64_t kWantedTasks = 8, kMinBlocksPerPart = 4;
  const int64_t row_blocks = (rows + kRowBlock - 1) / kRowBlock;
  if (2 * row_blocks >= kWantedTasks) return 1;
  const int64_t template_blocks = (num_templates + kTemplateBlock - 1) / kTemplateBlock;
  return std::max<int64_t>(1, std::min((kWantedTasks + row_blocks - 1) / row_blocks,
                                       template_blocks / kMinBlocksPerPart));
}

// What a row sweep's parts keep for the merge, per row and part (see Problem).
struct PartResults {
  bool states, sums, moments;
};

// Splits a row sweep (row_stats, row_stats_with_grad, input_grad) into row tasks and
// template parts, and allocates the parts' partial results; the tensors keep them alive.
template <typename scalar_t>
std::vector<at::Tensor> plan_row_sweep(Problem<scalar_t>& problem, PartResults results) {
  const int64_t rows = problem.batch * problem.channels;
  problem.template_parts = template_parts(rows, problem.num_templates);
  problem.row_tasks = row_tasks(rows, problem.template_parts == 1);
  std::vector<at::Tensor> buffers;
  if (problem.template_parts == 1) return buffers;
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<scalar_t>::value);
  const int64_t slots = rows * problem.template_parts;
  if (results.states) {
    buffers.push_back(at::empty({slots, 3}, options));
    problem.part_states = reinterpret_cast<SoftmaxState<scalar_t>*>(buffers.back().data_ptr());
  }
  if (results.sums) {
    buffers.push_back(at::empty({slots, 2, problem.padded_pixels}, options));
    problem.part_sums = buffers.back().data_ptr<scalar_t>();
  }
  if (results.moments) {
    buffers.push_back(at::empty({slots, 2}, options));
    problem.part_moments = buffers.back().data_ptr<scalar_t>();
  }
  return buffers;
}

// Runs a planned row sweep's tasks (`run`), then with template parts `merge` on every row.
template <typename scalar_t, typename Merge>
void run_row_sweep(const Problem<scalar_t>& problem,
                   void (*run)(const Problem<scalar_t>&, int64_t, int64_t), Merge merge) {
  at::parallel_for(0, problem.row_tasks * problem.template_parts, 1,
                   [&](int64_t begin, int64_t end) { run(problem, begin, end); });
  if (problem.template_parts == 1) return;
  at::parallel_for(0, problem.batch * problem.channels, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) merge(row);
  });
}

template <typename scalar_t>
Problem<scalar_t> make_problem(const at::Tensor& x, const at::Tensor& templates, double tau,
                               const Tasks<scalar_t>& chosen) {
  at::Tensor panels, padded;
  std::tie(panels, padded) = packed_templates<scalar_t>(templates, chosen);
  Problem<scalar_t> problem{};
  problem.x = x.data_ptr<scalar_t>();
  problem.batch = x.size(0);
  problem.channels = x.size(1);
  problem.pixels = x.size(2);
  problem.num_templates = templates.size(0);
  if (chosen.bf16) {
    problem.panel_pairs = reinterpret_cast<const uint16_t*>(panels.data_ptr<int16_t>());
    problem.padded_pairs = reinterpret_cast<const uint16_t*>(padded.data_ptr<int16_t>());
    problem.pixel_pairs = (problem.pixels + 1) / 2;
  } else {
    problem.panels = panels.data_ptr<scalar_t>();
    problem.padded = padded.data_ptr<scalar_t>();
  }
  problem.padded_pixels = padded.size(1);
  problem.tau = static_cast<scalar_t>(tau);
  problem.row_tasks = row_tasks(problem.batch * problem.channels, true);
  problem.template_parts = 1;
  return problem;
}

// float16 and bfloat16 inputs run in float32 (their accumulation dtype).
at::Tensor in_accumulation_type(const at::Tensor& x) {
  return x.to(accumulation_type(x.scalar_type()));
}

// row_stats, and with `scores` given, the (B, C, N) scores written into a new tensor there.
void row_stats_into(const char* op, const at::Tensor& x_input, const at::Tensor& templates,
                    double tau, c10::string_view precision, at::Tensor& row_max,
                    at::Tensor& log_sum, at::Tensor& neg_entropy, at::Tensor* scores) {
  check_arguments(op, x_input, templates, {}, std::nullopt);
  parse_precision(precision);
  const at::Tensor x = in_accumulation_type(x_input);
  row_max = at::empty({x.size(0), x.size(1)}, templates.options());
  log_sum = at::empty_like(row_max);
  neg_entropy = at::empty_like(row_max);
  if (scores != nullptr) {
    *scores = at::empty({x.size(0), x.size(1), templates.size(0)}, templates.options());
  }
  if (x.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ecloss_row_stats_cpu", [&] {
    const Tasks<scalar_t>& chosen = tasks_for<scalar_t>(precision);
    Problem<scalar_t> problem = make_problem<scalar_t>(x, templates, tau, chosen);
    problem.row_max_out = row_max.data_ptr<scalar_t>();
    problem.log_sum_out = log_sum.data_ptr<scalar_t>();
    problem.neg_entropy_out = neg_entropy.data_ptr<scalar_t>();
    problem.scores_out = scores != nullptr ? scores->data_ptr<scalar_t>() : nullptr;
    const auto parts = plan_row_sweep(problem, {true, false, false});
    run_row_sweep(problem, chosen.row_stats,
                  [&](int64_t row) { merge_row_stats_parts(problem, false, row); });
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> row_stats_cpu(const at::Tensor& x,
                                                             const at::Tensor& templates,
                                                             double tau,
                                                             c10::string_view precision,
                                                             const std::optional<at::Tensor>&) {
  at::Tensor row_max, log_sum, neg_entropy;
  row_stats_into("row_stats", x, templates, tau, precision, row_max, log_sum, neg_entropy,
                 nullptr);
  return {row_max, log_sum, neg_entropy};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> row_stats_with_scores_cpu(
    const at::Tensor& x, const at::Tensor& templates, double tau, c10::string_view precision,
    const std::optional<at::Tensor>&) {
  at::Tensor row_max, log_sum, neg_entropy, scores;
  row_stats_into("row_stats_with_scores", x, templates, tau, precision, row_max, log_sum,
                 neg_entropy, &scores);
  return {row_max, log_sum, neg_entropy, scores};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> row_stats_with_grad_cpu(
    const at::Tensor& x_input, const at::Tensor& templates, double tau,
    c10::string_view precision, const std::optional<at::Tensor>&) {
  check_arguments("row_stats_with_grad", x_input, templates, {}, std::nullopt);
  parse_precision(precision);
  const at::Tensor x = in_accumulation_type(x_input);
  at::Tensor row_max = at::empty({x.size(0), x.size(1)}, templates.options());
  at::Tensor log_sum = at::empty_like(row_max);
  at::Tensor neg_entropy = at::empty_like(row_max);
  at::Tensor neg_entropy_grad = at::empty(x.sizes(), templates.options());
  if (x.numel() == 0) return {row_max, log_sum, neg_entropy, neg_entropy_grad};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ecloss_row_stats_with_grad_cpu", [&] {
    const Tasks<scalar_t>& chosen = tasks_for<scalar_t>(precision);
    Problem<scalar_t> problem = make_problem<scalar_t>(x, templates, tau, chosen);
    problem.row_max_out = row_max.data_ptr<scalar_t>();
    problem.log_sum_out = log_sum.data_ptr<scalar_t>();
    problem.neg_entropy_out = neg_entropy.data_ptr<scalar_t>();
    problem.neg_entropy_grad_out = neg_entropy_grad.data_ptr<scalar_t>();
    const auto parts = plan_row_sweep(problem, {true, true, false});
    run_row_sweep(problem, chosen.row_stats_with_grad,
                  [&](int64_t row) { merge_row_stats_parts(problem, true, row); });
  });
  return {row_max, log_sum, neg_entropy, neg_entropy_grad};
}

at::Tensor column_sums_cpu(const at::Tensor& x_input, const at::Tensor& templates, double tau,
                           const at::Tensor& row_max_input, const at::Tensor& log_sum_input,
                           c10::string_view precision, const std::optional<at::Tensor>&) {
  check_arguments("column_sums", x_input, templates, {&row_max_input, &log_sum_input},
                  std::nullopt);
  parse_precision(precision);
  const at::Tensor x = in_accumulation_type(x_input);
  const at::Tensor row_max = row_max_input.contiguous();
  const at::Tensor log_sum = log_sum_input.contiguous();
  at::Tensor sums = at::zeros({x.size(1), templates.size(0)}, templates.options());
  if (x.numel() == 0) return sums;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ecloss_column_sums_cpu", [&] {
    const Tasks<scalar_t>& chosen = tasks_for<scalar_t>(precision);
    Problem<scalar_t> problem = make_problem<scalar_t>(x, templates, tau, chosen);
    problem.row_max = row_max.data_ptr<scalar_t>();
    problem.log_sum = log_sum.data_ptr<scalar_t>();
    problem.column_sums = sums.data_ptr<scalar_t>();
    const int64_t template_blocks = (problem.num_templates + kTemplateBlock - 1) / kTemplateBlock;
    at::parallel_for(0, template_blocks, 1, [&](int64_t begin, int64_t end) {
      chosen.column_sums(problem, begin, end);
    });
  });
  return sums;
}

// input_grad's sweep into dx (B, C, K) in the accumulation dtype, from the rows x or, with
// kept_scores defined (input_grad_from_scores), from those scores (x then only gives the
// shape: dx itself).
void input_grad_into(const at::Tensor& x, const at::Tensor& templates, double tau,
                     const at::Tensor& row_max_input, const at::Tensor& log_sum_input,
                     const at::Tensor& neg_entropy_input,
                     const std::optional<at::Tensor>& prior_input,
                     const at::Tensor& row_weight_input, c10::string_view precision,
                     const at::Tensor& kept_scores, at::Tensor& dx) {
  const at::Tensor row_max = row_max_input.contiguous();
  const at::Tensor log_sum = log_sum_input.contiguous();
  const at::Tensor neg_entropy = neg_entropy_input.contiguous();
  const at::Tensor row_weight = row_weight_input.contiguous();
  const at::Tensor prior = prior_input.has_value() ? prior_input->contiguous() : at::Tensor();
  if (x.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ecloss_input_grad_cpu", [&] {
    const Tasks<scalar_t>& chosen = tasks_for<scalar_t>(precision);
    Problem<scalar_t> problem = make_problem<scalar_t>(x, templates, tau, chosen);
    problem.row_max = row_max.data_ptr<scalar_t>();
    problem.log_sum = log_sum.data_ptr<scalar_t>();
    problem.neg_entropy = neg_entropy.data_ptr<scalar_t>();
    problem.prior = prior.defined() ? prior.data_ptr<scalar_t>() : nullptr;
    problem.row_weight = row_weight.data_ptr<scalar_t>();
    problem.dx = dx.data_ptr<scalar_t>();
    at::Tensor prior_means;
    if (kept_scores.defined()) {
      problem.kept_scores = kept_scores.data_ptr<scalar_t>();
      if (problem.prior != nullptr) {
        prior_means = at::empty_like(row_max);
        scalar_t* means = prior_means.data_ptr<scalar_t>();
        at::parallel_for(0, row_max.numel(), 1, [&](int64_t begin, int64_t end) {
          for (int64_t row = begin; row < end; ++row) means[row] = kept_prior_mean(problem, row);
        });
        problem.prior_means = means;
      }
    }
    const auto parts = plan_row_sweep(problem, {false, true, !plain_input_grad(problem)});
    run_row_sweep(problem, chosen.input_grad,
                  [&](int64_t row) { merge_input_grad_parts(problem, row); });
  });
}

at::Tensor input_grad_cpu(const at::Tensor& x_input, const at::Tensor& templates, double tau,
                          const at::Tensor& row_max, const at::Tensor& log_sum,
                          const at::Tensor& neg_entropy, const std::optional<at::Tensor>& prior,
                          const at::Tensor& row_weight, c10::string_view precision,
                          const std::optional<at::Tensor>&) {
  check_arguments("input_grad", x_input, templates, {&row_max, &log_sum, &neg_entropy, &row_weight},
                  prior);
  parse_precision(precision);
  const at::Tensor x = in_accumulation_type(x_input);
  at::Tensor dx = at::empty_like(x);
  input_grad_into(x, templates, tau, row_max, log_sum, neg_entropy, prior, row_weight,
                  precision, {}, dx);
  return dx.to(x_input.scalar_type());
}

at::Tensor input_grad_from_scores_cpu(const at::Tensor& scores_input,
                                      const at::Tensor& templates, double tau,
                                      const at::Tensor& row_max, const at::Tensor& log_sum,
                                      const at::Tensor& neg_entropy,
                                      const std::optional<at::Tensor>& prior,
                                      const at::Tensor& row_weight, c10::string_view precision,
                                      const std::optional<at::Tensor>&) {
  at::Tensor dx = checked_input_grad_from_scores(
      scores_input, templates, {&row_max, &log_sum, &neg_entropy, &row_weight}, prior, precision);
  const at::Tensor scores = scores_input.contiguous();
  input_grad_into(dx, templates, tau, row_max, log_sum, neg_entropy, prior, row_weight,
                  precision, scores, dx);
  return dx;
}

}  // namespace
}  // namespace ecloss

namespace ecloss {
namespace {

std::vector<std::string> cpu_isa_paths() {
  return std::vector<std::string>(kIsaNames, kIsaNames + static_cast<int>(best_isa()) + 1);
}

std::string cpu_isa() { return kIsaNames[static_cast<int>(isa_in_use())]; }

void set_cpu_isa(c10::string_view name) {
  const auto found = std::find(kIsaNames, kIsaNames + kIsaCount, name);
  TORCH_CHECK_VALUE(found != kIsaNames + kIsaCount, "unknown instruction-set path '", name,
                    "'; the paths are baseline, avx2, avx512, avx512_bf16");
  const int chosen = static_cast<int>(found - kIsaNames);
  TORCH_CHECK_VALUE(chosen <= static_cast<int>(best_isa()), "this CPU has no '", name,
                    "' path; it has: ", c10::Join(", ", cpu_isa_paths()));
  isa_choice.store(chosen, std::memory_order_relaxed);
}

// The marginal estimator's logarithms (ecloss_fast/_ops.py): torch's float32 clamp and log
// took 0.74 ms for a (64, 19307) pbar on 2 threads of an AMD EPYC Zen 4 (0.6 ns an element),
// log_floored 0.19; a marginal step at B=8, C=64, 14x14 lost 2-2.5 ms to them. q (R, N)
// contiguous float32 or float64 on the CPU; scale (R,) or none, weights (R, N) in q's dtype.
// Rows split over the threads, whole rows per task.
void check_log_arguments(const char* op, const at::Tensor& q, const at::Tensor* other,
                         int64_t other_dim) {
  TORCH_CHECK(q.dim() == 2 && q.device().is_cpu() && q.is_contiguous() &&
                  (q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble),
              op, ": probabilities must be a contiguous (R, N) float32 or float64 CPU tensor; got ",
              q.sizes(), " ", q.scalar_type(), " on ", q.device());
  if (other == nullptr) return;
  const bool shaped = other_dim == 1 ? other->dim() == 1 && other->size(0) == q.size(0)
                                     : other->sizes() == q.sizes();
  TORCH_CHECK(shaped && other->is_contiguous() && other->device().is_cpu() &&
                  other->scalar_type() == q.scalar_type(),
              op, ": the ", other_dim == 1 ? "scale must be (R,)" : "weights must be (R, N)",
              " contiguous in the dtype of probabilities ", q.sizes(), " ", q.scalar_type(),
              "; got ", other->sizes(), " ", other->scalar_type(), " on ", other->device());
}

int64_t rows_per_task(int64_t columns) {
  constexpr int64_t kElementsPerTask = 1 << 15;
  return std::max<int64_t>(1, kElementsPerTask / std::max<int64_t>(1, columns));
}

at::Tensor log_floored_cpu(const at::Tensor& probabilities,
                           const std::optional<at::Tensor>& scale) {
  check_log_arguments("log_floored", probabilities, scale ? &*scale : nullptr, 1);
  at::Tensor out = at::empty_like(probabilities);
  const int64_t rows = probabilities.size(0), columns = probabilities.size(1);
  AT_DISPATCH_FLOATING_TYPES(probabilities.scalar_type(), "ecloss_log_floored_cpu", [&] {
    const auto function = tasks_at<scalar_t>(isa_in_use()).log_floored;
    const scalar_t* q = probabilities.data_ptr<scalar_t>();
    const scalar_t* factors = scale ? scale->data_ptr<scalar_t>() : nullptr;
    scalar_t* target = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, rows_per_task(columns), [&](int64_t begin, int64_t end) {
      function(q, factors, target, columns, begin, end);
    });
  });
  return out;
}

at::Tensor weighted_log_sums_cpu(const at::Tensor& weights, const at::Tensor& probabilities) {
  check_log_arguments("weighted_log_sums", probabilities, &weights, 2);
  at::Tensor sums = at::empty({probabilities.size(0)}, probabilities.options());
  const int64_t rows = probabilities.size(0), columns = probabilities.size(1);
  AT_DISPATCH_FLOATING_TYPES(probabilities.scalar_type(), "ecloss_weighted_log_sums_cpu", [&] {
    const auto function = tasks_at<scalar_t>(isa_in_use()).weighted_log_sums;
    const scalar_t* weight = weights.data_ptr<scalar_t>();
    const scalar_t* q = probabilities.data_ptr<scalar_t>();
    scalar_t* target = sums.data_ptr<scalar_t>();
    at::parallel_for(0, rows, rows_per_task(columns), [&](int64_t begin, int64_t end) {
      function(weight, q, target, columns, begin, end);
    });
  });
  return sums;
}

at::Tensor log_floored_meta(const at::Tensor& probabilities, const std::optional<at::Tensor>&) {
  return at::empty_like(probabilities);
}

at::Tensor weighted_log_sums_meta(const at::Tensor&, const at::Tensor& probabilities) {
  return at::empty({probabilities.size(0)}, probabilities.options());
}

}  // namespace
}  // namespace ecloss

// The instruction-set path of the CPU kernels (ecloss_fast/backends/cpp_cpu.py sets it from
// ECLOSS_FAST_CPU_ISA): process-wide, no tensor arguments, so registered for every key.
TORCH_LIBRARY_FRAGMENT(ecloss_fast_C, m) {
  m.def("cpu_isa_paths() -> str[]", &ecloss::cpu_isa_paths);
  m.def("cpu_isa() -> str", &ecloss::cpu_isa);
  m.def("set_cpu_isa(str isa) -> ()", &ecloss::set_cpu_isa);
  m.def("log_floored(Tensor probabilities, Tensor? scale) -> Tensor");
  m.def("weighted_log_sums(Tensor weights, Tensor probabilities) -> Tensor");
}

// A fake (meta) kernel too: the marginal's backward, which calls log_floored, is traced by
// torch.compile.
TORCH_LIBRARY_IMPL(ecloss_fast_C, Meta, m) {
  m.impl("log_floored", &ecloss::log_floored_meta);
  m.impl("weighted_log_sums", &ecloss::weighted_log_sums_meta);
}

TORCH_LIBRARY_IMPL(ecloss_fast_C, CPU, m) {
  m.impl("row_stats", &ecloss::row_stats_cpu);
  m.impl("row_stats_with_grad", &ecloss::row_stats_with_grad_cpu);
  m.impl("column_sums", &ecloss::column_sums_cpu);
  m.impl("input_grad", &ecloss::input_grad_cpu);
  m.impl("input_grad_from_scores", &ecloss::input_grad_from_scores_cpu);
  m.impl("row_stats_with_scores", &ecloss::row_stats_with_scores_cpu);
  m.impl("log_floored", &ecloss::log_floored_cpu);
  m.impl("weighted_log_sums", &ecloss::weighted_log_sums_cpu);
}
