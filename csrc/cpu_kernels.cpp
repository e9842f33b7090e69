// Fused CPU kernels of ECLoss: row_stats, column_sums and input_grad of the backend contract
// (ecloss_fast/backends/__init__.py), float32 and float64.
//
// Scores s = tau * X T^T are never stored beyond a block of kRowBlock rows x kTemplateBlock
// templates (48 x 128: 24 KB in float32, in L1/L2). Per block:
//   1. a GEMM micro-kernel computes 6-row x 2-vector score tiles (6 x 16 floats on AVX2:
//      twelve accumulator registers) with K innermost, reading the templates from a
//      panel-packed copy (K x 2 vectors per panel) and the rows from a packed copy (K x 6),
//      and stores them multiplied by tau;
//   2. a vectorised epilogue turns the block into what the op needs (online softmax state,
//      column sums, the centre of the score gradient under a prior, or the score gradient,
//      ecloss_math.h);
//   3. input_grad only: a second micro-kernel adds gradient x templates into a per-row dx
//      accumulator, the templates' K axis in the vector lanes.
// Threads own disjoint rows (row_stats, input_grad) or disjoint (channel, template block)
// pairs whose rows they sum in batch order (column_sums), so every result is deterministic
// and independent of the thread count. Every sweep computes each score with the same
// micro-kernel (one copy per process, below), as one FMA chain over k = 0 .. K-1 whatever the
// block a row falls in, then one multiply by tau: the scores of row_stats, column_sums and
// input_grad are bitwise the same, hence so are their p (ecloss_math.h).
//
// The micro-kernels use GCC/Clang vector extensions of the instruction set's native width;
// the hot functions are compiled three times (x86-64 baseline with 16-byte vectors, AVX2+FMA
// with 32, AVX-512 with 64) and picked at run time, so the shipped build stays portable
// without -march=native. (A vector wider than the instruction set's registers compiles to
// stack traffic, hence one width per copy.)
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

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
  int64_t padded_pixels;   // K rounded up to the tile width
  scalar_t tau;
  int64_t rows_per_block;  // a multiple of kRowTile, at most kRowBlock
  const scalar_t* row_max;      // (B, C), input of column_sums and input_grad
  const scalar_t* log_sum;      // (B, C), input of column_sums and input_grad
  const scalar_t* neg_entropy;  // (B, C), input of input_grad
  scalar_t* row_max_out;        // (B, C), outputs of row_stats
  scalar_t* log_sum_out;
  scalar_t* neg_entropy_out;
  const scalar_t* prior;   // (C, N) or nullptr
  const scalar_t* row_weight;  // (B, C)
  scalar_t* dx;                // (B, C, K)
  scalar_t* column_sums;       // (C, N)
};

// A block of rows: row i is flat row index first + i * stride (b * C + c), i < count.
struct RowBlock {
  int64_t first, stride, count;
};

template <typename scalar_t>
struct Scratch {
  explicit Scratch(const Problem<scalar_t>& problem)
      : row_panels(kRowBlock * problem.pixels),
        scores(kRowBlock * kTemplateBlock),
        grads(kRowBlock * kTemplateBlock, scalar_t(0)),
        dx(kRowBlock * problem.padded_pixels),
        states(kRowBlock),
        centres(kRowBlock),
        masses(kRowBlock) {}
  std::vector<scalar_t> row_panels;  // (kRowBlock / kRowTile, K, kRowTile)
  std::vector<scalar_t> scores;      // (kRowBlock, kTemplateBlock), s = tau * <x, T[t]>
  std::vector<scalar_t> grads;       // (kRowBlock, kTemplateBlock), d loss / d s / weight
  std::vector<scalar_t> dx;          // (kRowBlock, padded_pixels)
  std::vector<SoftmaxState<scalar_t>> states;
  std::vector<scalar_t> centres;     // per row: the centre of score_grad
  std::vector<scalar_t> masses;      // per row: sum_t p, while summing a centre under a prior
};

// Copies the block's rows into panels of kRowTile rows, pixel-major, zero rows past count.
template <typename scalar_t>
ECLOSS_HOST void pack_rows(const Problem<scalar_t>& problem, const RowBlock& block,
                           scalar_t* row_panels) {
  const int64_t pixels = problem.pixels;
  const int64_t padded_count = (block.count + kRowTile - 1) / kRowTile * kRowTile;
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

// scores[i, j] = s = tau * <x[row i], T[t0 + j]> for the block's rows and templates
// t0 .. t0 + width: the dot product as one FMA chain in pixel order, then one rounded
// multiply by tau. The epilogues read s back from this buffer, so their shift s - max is the
// rounded score minus the rounded max: setup.py's -ffp-contract=fast cannot fuse
// tau * <x, T> - max into one FMA across the store (the FMA's unrounded product differs from
// s by up to half an ulp of s, which passes the range of exp once scores pass 1e9).
template <typename scalar_t, int kBytes>
ECLOSS_HOST void score_block(const Problem<scalar_t>& problem, const RowBlock& block,
                             const scalar_t* row_panels, int64_t t0, int64_t width,
                             scalar_t* scores) {
  using S = Simd<scalar_t, kBytes>;
  const int64_t pixels = problem.pixels;
  for (int64_t i0 = 0; i0 < block.count; i0 += kRowTile) {
    const scalar_t* rows = row_panels + i0 * pixels;
    for (int64_t j0 = 0; j0 < width; j0 += S::kTileWidth) {
      const scalar_t* panel = problem.panels + (t0 + j0) * pixels;
      typename S::Vector accumulators[kRowTile][kTileVectors] = {};
      for (int64_t k = 0; k < pixels; ++k) {
        typename S::Vector templates[kTileVectors];
        for (int64_t v = 0; v < kTileVectors; ++v) {
          templates[v] = S::load(panel + k * S::kTileWidth + v * S::kLanes);
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

// dx[i, :] += sum_j grads[i, j] * T[t0 + j, :] over the block's rows (rounded up to whole
// tiles: rows past count hold stale gradients and are never written out).
template <typename scalar_t, int kBytes>
ECLOSS_HOST void accumulate_input_grad(const Problem<scalar_t>& problem, const RowBlock& block,
                                       const scalar_t* grads, int64_t t0, int64_t width,
                                       scalar_t* dx) {
  using S = Simd<scalar_t, kBytes>;
  const int64_t padded_pixels = problem.padded_pixels;
  for (int64_t i0 = 0; i0 < block.count; i0 += kRowTile) {
    for (int64_t k0 = 0; k0 < padded_pixels; k0 += S::kTileWidth) {
      typename S::Vector accumulators[kRowTile][kTileVectors] = {};
      const scalar_t* templates = problem.padded + t0 * padded_pixels + k0;
      for (int64_t j = 0; j < width; ++j) {
        typename S::Vector row[kTileVectors];
        for (int64_t v = 0; v < kTileVectors; ++v) {
          row[v] = S::load(templates + j * padded_pixels + v * S::kLanes);
        }
#pragma GCC unroll 6
        for (int64_t i = 0; i < kRowTile; ++i) {
          const scalar_t grad = grads[(i0 + i) * kTemplateBlock + j];
          for (int64_t v = 0; v < kTileVectors; ++v) accumulators[i][v] += row[v] * grad;
        }
      }
#pragma GCC unroll 6
      for (int64_t i = 0; i < kRowTile; ++i) {
        for (int64_t v = 0; v < kTileVectors; ++v) {
          scalar_t* target = dx + (i0 + i) * padded_pixels + k0 + v * S::kLanes;
          S::store(target, S::load(target) + accumulators[i][v]);
        }
      }
    }
  }
}

// Online-softmax state of the block's rows, merged over all templates.
template <typename scalar_t, int kBytes>
ECLOSS_HOST void sweep_row_states(const Problem<scalar_t>& problem, const RowBlock& block,
                                  Scratch<scalar_t>& scratch) {
  for (int64_t i = 0; i < block.count; ++i) scratch.states[i] = empty_state<scalar_t>();
  for (int64_t t0 = 0; t0 < problem.num_templates; t0 += kTemplateBlock) {
    const int64_t width = std::min(kTemplateBlock, problem.num_templates - t0);
    score_block<scalar_t, kBytes>(problem, block, scratch.row_panels.data(), t0, width,
                                  scratch.scores.data());
    for (int64_t i = 0; i < block.count; ++i) {
      const scalar_t* scores = scratch.scores.data() + i * kTemplateBlock;
      scalar_t block_max = -std::numeric_limits<scalar_t>::infinity();
      // A select of values: with std::max(block_max, scores[j]), a reference into the
      // buffer, GCC 12 left this reduction scalar (vmaxss; row_stats 35% slower at 14x14).
#pragma omp simd reduction(max : block_max)
      for (int64_t j = 0; j < width; ++j) {
        block_max = block_max < scores[j] ? scores[j] : block_max;
      }
      scalar_t sum_exp = 0, sum_exp_shift = 0;
#pragma omp simd reduction(+ : sum_exp, sum_exp_shift)
      for (int64_t j = 0; j < width; ++j) {
        const scalar_t shifted = scores[j] - block_max;
        const scalar_t weight = host_exp(shifted);
        sum_exp += weight;
        sum_exp_shift += weight * shifted;
      }
      scratch.states[i] = merge(scratch.states[i], {block_max, sum_exp, sum_exp_shift});
    }
  }
}

// The centre of score_grad under a prior, D = sum_t p z / sum_t p with z = w log p - prior
// (over the recomputed mass, 1 in exact arithmetic), into scratch.centres.
template <typename scalar_t, int kBytes>
ECLOSS_HOST void sweep_prior_centres(const Problem<scalar_t>& problem, const RowBlock& block,
                                     Scratch<scalar_t>& scratch) {
  for (int64_t i = 0; i < block.count; ++i) scratch.centres[i] = scratch.masses[i] = 0;
  for (int64_t t0 = 0; t0 < problem.num_templates; t0 += kTemplateBlock) {
    const int64_t width = std::min(kTemplateBlock, problem.num_templates - t0);
    score_block<scalar_t, kBytes>(problem, block, scratch.row_panels.data(), t0, width,
                                  scratch.scores.data());
    for (int64_t i = 0; i < block.count; ++i) {
      const int64_t row = block.first + i * block.stride;
      const scalar_t row_max = problem.row_max[row], log_sum = problem.log_sum[row];
      const scalar_t weight = problem.row_weight[row];
      const scalar_t* scores = scratch.scores.data() + i * kTemplateBlock;
      const scalar_t* prior =
          problem.prior + (row % problem.channels) * problem.num_templates + t0;
      scalar_t weighted = 0, mass = 0;
#pragma omp simd reduction(+ : weighted, mass)
      for (int64_t j = 0; j < width; ++j) {
        const scalar_t log_p = log_probability(scores[j] - row_max, log_sum);
        const scalar_t p = exp_(log_p);
        weighted += p * (weight * log_p - prior[j]);
        mass += p;
      }
      scratch.centres[i] += weighted;
      scratch.masses[i] += mass;
    }
  }
  for (int64_t i = 0; i < block.count; ++i) scratch.centres[i] /= scratch.masses[i];
}

template <typename scalar_t, int kBytes>
ECLOSS_HOST void row_stats_tasks(const Problem<scalar_t>& problem, int64_t begin, int64_t end) {
  Scratch<scalar_t> scratch(problem);
  const int64_t rows = problem.batch * problem.channels;
  for (int64_t task = begin; task < end; ++task) {
    const int64_t first = task * problem.rows_per_block;
    const RowBlock block{first, 1, std::min(problem.rows_per_block, rows - first)};
    pack_rows(problem, block, scratch.row_panels.data());
    sweep_row_states<scalar_t, kBytes>(problem, block, scratch);
    for (int64_t i = 0; i < block.count; ++i) {
      finish(scratch.states[i], problem.row_max_out[first + i], problem.log_sum_out[first + i],
             problem.neg_entropy_out[first + i]);
    }
  }
}

// One task is one (channel, template block): the column sums of that block over the
// channel's B rows, added in batch order.
template <typename scalar_t, int kBytes>
ECLOSS_HOST void column_sums_tasks(const Problem<scalar_t>& problem, int64_t begin,
                                   int64_t end) {
  Scratch<scalar_t> scratch(problem);
  const int64_t template_blocks = (problem.num_templates + kTemplateBlock - 1) / kTemplateBlock;
  for (int64_t task = begin; task < end; ++task) {
    const int64_t channel = task / template_blocks;
    const int64_t t0 = (task % template_blocks) * kTemplateBlock;
    const int64_t width = std::min(kTemplateBlock, problem.num_templates - t0);
    scalar_t* sums = problem.column_sums + channel * problem.num_templates + t0;
    std::fill(sums, sums + width, scalar_t(0));
    for (int64_t b0 = 0; b0 < problem.batch; b0 += kRowBlock) {
      const RowBlock block{b0 * problem.channels + channel, problem.channels,
                           std::min(kRowBlock, problem.batch - b0)};
      pack_rows(problem, block, scratch.row_panels.data());
      score_block<scalar_t, kBytes>(problem, block, scratch.row_panels.data(), t0, width,
                                  scratch.scores.data());
      for (int64_t i = 0; i < block.count; ++i) {
        const int64_t row = block.first + i * block.stride;
        const scalar_t row_max = problem.row_max[row], log_sum = problem.log_sum[row];
        const scalar_t* scores = scratch.scores.data() + i * kTemplateBlock;
#pragma omp simd
        for (int64_t j = 0; j < width; ++j) sums[j] += probability(scores[j] - row_max, log_sum);
      }
    }
  }
}

template <typename scalar_t, int kBytes>
ECLOSS_HOST void input_grad_tasks(const Problem<scalar_t>& problem, int64_t begin, int64_t end) {
  Scratch<scalar_t> scratch(problem);
  const int64_t rows = problem.batch * problem.channels;
  const int64_t padded_pixels = problem.padded_pixels;
  const scalar_t tau = problem.tau;
  for (int64_t task = begin; task < end; ++task) {
    const int64_t first = task * problem.rows_per_block;
    const RowBlock block{first, 1, std::min(problem.rows_per_block, rows - first)};
    pack_rows(problem, block, scratch.row_panels.data());
    if (problem.prior != nullptr) {
      sweep_prior_centres<scalar_t, kBytes>(problem, block, scratch);
    } else {
      for (int64_t i = 0; i < block.count; ++i) {  // E = neg_entropy + log_sum
        scratch.centres[i] = problem.neg_entropy[first + i] + problem.log_sum[first + i];
      }
    }
    std::fill(scratch.dx.begin(), scratch.dx.end(), scalar_t(0));
    for (int64_t t0 = 0; t0 < problem.num_templates; t0 += kTemplateBlock) {
      const int64_t width = std::min(kTemplateBlock, problem.num_templates - t0);
      score_block<scalar_t, kBytes>(problem, block, scratch.row_panels.data(), t0, width,
                                  scratch.scores.data());
      for (int64_t i = 0; i < block.count; ++i) {
        const int64_t row = first + i;
        const scalar_t row_max = problem.row_max[row], log_sum = problem.log_sum[row];
        const scalar_t centre = scratch.centres[i];
        const scalar_t* scores = scratch.scores.data() + i * kTemplateBlock;
        scalar_t* grads = scratch.grads.data() + i * kTemplateBlock;
        if (problem.prior != nullptr) {
          const scalar_t weight = problem.row_weight[row];
          const scalar_t* prior =
              problem.prior + (row % problem.channels) * problem.num_templates + t0;
#pragma omp simd
          for (int64_t j = 0; j < width; ++j) {
            const scalar_t log_p = log_probability(scores[j] - row_max, log_sum);
            grads[j] = score_grad(exp_(log_p), weight * log_p - prior[j], centre);
          }
        } else {
#pragma omp simd
          for (int64_t j = 0; j < width; ++j) {
            const scalar_t shifted = scores[j] - row_max;
            grads[j] = score_grad(probability(shifted, log_sum), shifted, centre);
          }
        }
      }
      accumulate_input_grad<scalar_t, kBytes>(problem, block, scratch.grads.data(), t0, width,
                                              scratch.dx.data());
    }
    for (int64_t i = 0; i < block.count; ++i) {  // a prior carries the row weight already
      const scalar_t scale = problem.prior != nullptr ? tau : tau * problem.row_weight[first + i];
      const scalar_t* source = scratch.dx.data() + i * padded_pixels;
      scalar_t* target = problem.dx + (first + i) * problem.pixels;
      for (int64_t k = 0; k < problem.pixels; ++k) target[k] = scale * source[k];
    }
  }
}

// The task loops compiled once per instruction set. `flatten` inlines every helper above
// into each copy, so the micro-kernels and epilogues take the copy's vector width.
template <typename scalar_t>
struct Tasks {
  int64_t tile_width;  // scalars per micro-kernel tile row: the layout pack_templates writes
  void (*row_stats)(const Problem<scalar_t>&, int64_t, int64_t);
  void (*column_sums)(const Problem<scalar_t>&, int64_t, int64_t);
  void (*input_grad)(const Problem<scalar_t>&, int64_t, int64_t);
};

#define ECLOSS_DEFINE_TASKS(NAME, BYTES, TARGET)                                            \
  template <typename scalar_t>                                                              \
  TARGET __attribute__((flatten)) void row_stats_##NAME(const Problem<scalar_t>& problem,   \
                                                        int64_t begin, int64_t end) {       \
    row_stats_tasks<scalar_t, BYTES>(problem, begin, end);                                  \
  }                                                                                         \
  template <typename scalar_t>                                                              \
  TARGET __attribute__((flatten)) void column_sums_##NAME(const Problem<scalar_t>& problem,  \
                                                          int64_t begin, int64_t end) {     \
    column_sums_tasks<scalar_t, BYTES>(problem, begin, end);                                \
  }                                                                                         \
  template <typename scalar_t>                                                              \
  TARGET __attribute__((flatten)) void input_grad_##NAME(const Problem<scalar_t>& problem,  \
                                                         int64_t begin, int64_t end) {      \
    input_grad_tasks<scalar_t, BYTES>(problem, begin, end);                                 \
  }                                                                                         \
  template <typename scalar_t>                                                              \
  Tasks<scalar_t> tasks_##NAME() {                                                          \
    return {Simd<scalar_t, BYTES>::kTileWidth, &row_stats_##NAME<scalar_t>,                 \
            &column_sums_##NAME<scalar_t>, &input_grad_##NAME<scalar_t>};                   \
  }

ECLOSS_DEFINE_TASKS(baseline, 16, )
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
ECLOSS_DEFINE_TASKS(avx2, 32, __attribute__((target("avx2,fma"))))
ECLOSS_DEFINE_TASKS(avx512, 64, __attribute__((target("avx512f,avx512vl,avx512dq,avx2,fma"))))
#endif
#undef ECLOSS_DEFINE_TASKS

template <typename scalar_t>
Tasks<scalar_t> select_tasks() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq")) {
    return tasks_avx512<scalar_t>();
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    return tasks_avx2<scalar_t>();
  }
#endif
  return tasks_baseline<scalar_t>();
}

template <typename scalar_t>
const Tasks<scalar_t>& tasks() {
  static const Tasks<scalar_t> selected = select_tasks<scalar_t>();
  return selected;
}

// The template matrix in the two layouts the micro-kernels read (see Problem), for tiles
// `tile_width` scalars wide.
template <typename scalar_t>
void pack_templates(const at::Tensor& templates, int64_t tile_width, bool with_padded,
                    at::Tensor& panels, at::Tensor& padded) {
  const int64_t count = templates.size(0), pixels = templates.size(1);
  const int64_t panel_count = (count + tile_width - 1) / tile_width;
  const int64_t padded_pixels = (pixels + tile_width - 1) / tile_width * tile_width;
  panels = at::empty({panel_count, pixels, tile_width}, templates.options());
  if (with_padded) padded = at::zeros({count, padded_pixels}, templates.options());
  const scalar_t* source = templates.data_ptr<scalar_t>();
  scalar_t* panel_data = panels.data_ptr<scalar_t>();
  scalar_t* padded_data = with_padded ? padded.data_ptr<scalar_t>() : nullptr;
  at::parallel_for(0, panel_count, 16, [&](int64_t begin, int64_t end) {
    for (int64_t panel = begin; panel < end; ++panel) {
      scalar_t* target = panel_data + panel * pixels * tile_width;
      for (int64_t lane = 0; lane < tile_width; ++lane) {
        const int64_t t = panel * tile_width + lane;
        if (t < count) {
          const scalar_t* row = source + t * pixels;
          for (int64_t k = 0; k < pixels; ++k) target[k * tile_width + lane] = row[k];
          if (padded_data != nullptr) {
            std::copy(row, row + pixels, padded_data + t * padded_pixels);
          }
        } else {
          for (int64_t k = 0; k < pixels; ++k) target[k * tile_width + lane] = scalar_t(0);
        }
      }
    }
  });
}

// Rows per task: kRowBlock, or fewer (a multiple of kRowTile) so that every thread gets
// several tasks when there are few rows.
int64_t rows_per_block(int64_t rows) {
  const int64_t wanted_tasks = 4 * at::get_num_threads();
  const int64_t even_split = (rows + wanted_tasks - 1) / wanted_tasks;
  const int64_t rounded = (even_split + kRowTile - 1) / kRowTile * kRowTile;
  return std::max(kRowTile, std::min(kRowBlock, rounded));
}

template <typename scalar_t>
Problem<scalar_t> make_problem(const at::Tensor& x, const at::Tensor& templates, double tau,
                               const at::Tensor& panels, const at::Tensor& padded) {
  Problem<scalar_t> problem{};
  problem.x = x.data_ptr<scalar_t>();
  problem.batch = x.size(0);
  problem.channels = x.size(1);
  problem.pixels = x.size(2);
  problem.num_templates = templates.size(0);
  problem.panels = panels.data_ptr<scalar_t>();
  problem.padded = padded.defined() ? padded.data_ptr<scalar_t>() : nullptr;
  problem.padded_pixels = padded.defined() ? padded.size(1) : 0;
  problem.tau = static_cast<scalar_t>(tau);
  problem.rows_per_block = rows_per_block(problem.batch * problem.channels);
  return problem;
}

// float16 and bfloat16 inputs run in float32 (their accumulation dtype).
at::Tensor in_accumulation_type(const at::Tensor& x) {
  return x.to(accumulation_type(x.scalar_type()));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> row_stats_cpu(const at::Tensor& x_input,
                                                             const at::Tensor& templates,
                                                             double tau,
                                                             c10::string_view precision,
                                                             const std::optional<at::Tensor>&) {
  check_arguments("row_stats", x_input, templates, {}, std::nullopt);
  parse_precision(precision);  // the CPU always computes in full precision
  const at::Tensor x = in_accumulation_type(x_input);
  at::Tensor row_max = at::empty({x.size(0), x.size(1)}, templates.options());
  at::Tensor log_sum = at::empty_like(row_max);
  at::Tensor neg_entropy = at::empty_like(row_max);
  if (x.numel() == 0) return {row_max, log_sum, neg_entropy};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ecloss_row_stats_cpu", [&] {
    at::Tensor panels, padded;
    pack_templates<scalar_t>(templates, tasks<scalar_t>().tile_width, false, panels, padded);
    Problem<scalar_t> problem = make_problem<scalar_t>(x, templates, tau, panels, padded);
    problem.row_max_out = row_max.data_ptr<scalar_t>();
    problem.log_sum_out = log_sum.data_ptr<scalar_t>();
    problem.neg_entropy_out = neg_entropy.data_ptr<scalar_t>();
    const int64_t rows = problem.batch * problem.channels;
    const int64_t count = (rows + problem.rows_per_block - 1) / problem.rows_per_block;
    at::parallel_for(0, count, 1, [&](int64_t begin, int64_t end) {
      tasks<scalar_t>().row_stats(problem, begin, end);
    });
  });
  return {row_max, log_sum, neg_entropy};
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
    at::Tensor panels, padded;
    pack_templates<scalar_t>(templates, tasks<scalar_t>().tile_width, false, panels, padded);
    Problem<scalar_t> problem = make_problem<scalar_t>(x, templates, tau, panels, padded);
    problem.row_max = row_max.data_ptr<scalar_t>();
    problem.log_sum = log_sum.data_ptr<scalar_t>();
    problem.column_sums = sums.data_ptr<scalar_t>();
    const int64_t template_blocks = (problem.num_templates + kTemplateBlock - 1) / kTemplateBlock;
    at::parallel_for(0, problem.channels * template_blocks, 1, [&](int64_t begin, int64_t end) {
      tasks<scalar_t>().column_sums(problem, begin, end);
    });
  });
  return sums;
}

at::Tensor input_grad_cpu(const at::Tensor& x_input, const at::Tensor& templates, double tau,
                          const at::Tensor& row_max_input, const at::Tensor& log_sum_input,
                          const at::Tensor& neg_entropy_input,
                          const std::optional<at::Tensor>& prior_input,
                          const at::Tensor& row_weight_input, c10::string_view precision,
                          const std::optional<at::Tensor>&) {
  check_arguments("input_grad", x_input, templates,
                  {&row_max_input, &log_sum_input, &neg_entropy_input, &row_weight_input},
                  prior_input);
  parse_precision(precision);
  const at::Tensor x = in_accumulation_type(x_input);
  const at::Tensor row_max = row_max_input.contiguous();
  const at::Tensor log_sum = log_sum_input.contiguous();
  const at::Tensor neg_entropy = neg_entropy_input.contiguous();
  const at::Tensor row_weight = row_weight_input.contiguous();
  const at::Tensor prior = prior_input.has_value() ? prior_input->contiguous() : at::Tensor();
  at::Tensor dx = at::empty_like(x);
  if (x.numel() == 0) return dx.to(x_input.scalar_type());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ecloss_input_grad_cpu", [&] {
    at::Tensor panels, padded;
    pack_templates<scalar_t>(templates, tasks<scalar_t>().tile_width, true, panels, padded);
    Problem<scalar_t> problem = make_problem<scalar_t>(x, templates, tau, panels, padded);
    problem.row_max = row_max.data_ptr<scalar_t>();
    problem.log_sum = log_sum.data_ptr<scalar_t>();
    problem.neg_entropy = neg_entropy.data_ptr<scalar_t>();
    problem.prior = prior.defined() ? prior.data_ptr<scalar_t>() : nullptr;
    problem.row_weight = row_weight.data_ptr<scalar_t>();
    problem.dx = dx.data_ptr<scalar_t>();
    const int64_t rows = problem.batch * problem.channels;
    const int64_t count = (rows + problem.rows_per_block - 1) / problem.rows_per_block;
    at::parallel_for(0, count, 1, [&](int64_t begin, int64_t end) {
      tasks<scalar_t>().input_grad(problem, begin, end);
    });
  });
  return dx.to(x_input.scalar_type());
}

}  // namespace
}  // namespace ecloss

TORCH_LIBRARY_IMPL(ecloss_fast_C, CPU, m) {
  m.impl("row_stats", &ecloss::row_stats_cpu);
  m.impl("column_sums", &ecloss::column_sums_cpu);
  m.impl("input_grad", &ecloss::input_grad_cpu);
}
