// The fused CUDA kernels of ECLoss: row_stats, row_stats_with_grad, column_sums and input_grad of
// the backend contract (docs/design.md section 9) for float32, float16 and bfloat16
// input.
//
// One kernel template, five modes. A block of 4 warps owns kBlockRows = 64 rows (feature
// maps); their pixels sit in shared memory for the whole sweep, padded from K to a multiple
// of 16. The block walks the templates kBlockTemplates = 32 at a time: the tile is copied
// into shared memory once (16-byte cp.async chunks from the operand templates that
// ecloss_fast/backends/cpp_cuda.py prepares: already in the operand type, K padded to the
// same multiple of 16, N to whole tiles with zero rows; bf16 row_stats and column_sums copy
// the next tile while the current one is multiplied) and shared by all 64 rows; each warp
// computes the 16 x 32 scores of its own rows (tensor cores via WMMA: m16n16k8 tf32 or
// m16n16k16 bf16, float32 accumulation; plain float32 FMAs for "ieee"), and lane j of the
// warp folds column j into per-lane online-softmax states (ecloss_math.h), merged across
// lanes by a fixed butterfly at the end. Nothing of size B x C x N exists; the backward pass recomputes the scores.
// Every mode computes a score with the same code (warp_scores, then one __fmul_rn by tau,
// which nvcc never contracts into the FMA of the following shift s - row_max), so the
// scores, and the p = exp((s - row_max) - log_sum) of all sweeps, are bitwise the same.
//   row_stats    one sweep: row_max, log_sum and neg_entropy per row.
//   column_sums  the block's rows are 64 maps of one channel (grid = batch blocks x C);
//                after each tile the 64 probabilities of a column are summed in row order
//                by one thread, so the sums are deterministic; batches above 64 give
//                per-block partials that the host adds in a fixed order.
//   input_grad   a sweep that turns scores into d loss / d s in shared memory and multiplies
//                them by the same template tile on the tensor cores into a per-row dx
//                accumulator in shared memory (with a prior, where kPriorInputGrad is not
//                run: a first sweep for the centre of the score gradient).
//   row_stats_with_grad, and input_grad with a prior (kPriorInputGrad): one sweep with two
//                such accumulators per row, U = sum_t w_t T[t] and a second one relative to
//                a per-row reference that moves during the sweep (the running max; the z of
//                the best template so far), rebased in shared memory when it moves. They
//                cost a second 54 KB accumulator at K = 196, and with it blocks per SM:
//                runs_fused decides, else the two-sweep kernels run. row_stats_with_grad's
//                row_max is row_stats' (the same scores, and a max is exact); its log_sum
//                and neg_entropy add the same terms in another order (every lane's sums
//                share the row's max), so they agree with row_stats' to rounding.
// Flops per sweep: 2 * M * N * K (+ the same again per accumulator); exps: M * N per sweep.
//
// This header holds the device code and the launch rules; each kernel translation unit
// (cuda_kernels_{ieee,tf32,bf16}.cu) instantiates them for one precision
// (ECLOSS_INSTANTIATE_KERNELS), and cuda_ops.cpp calls them through cuda_launch.h.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <algorithm>

#include "cuda_launch.h"
#include "ecloss_math.h"

namespace ecloss::gpu {

namespace wmma = nvcuda::wmma;

// The matrix-unit operand of each precision: its storage type, the WMMA k step, rounding.
template <Precision P>
struct Operand;
template <>
struct Operand<Precision::kIeee> {  // no matrix unit: plain FMAs, one k at a time
  using type = float;
  static __device__ __forceinline__ float from(float value) { return value; }
};
template <>
struct Operand<Precision::kTf32> {
  using type = float;
  static constexpr int kStep = 8;
  static __device__ __forceinline__ float from(float value) { return wmma::__float_to_tf32(value); }
};
template <>
struct Operand<Precision::kBf16> {
  using type = __nv_bfloat16;
  static constexpr int kStep = 16;
  static __device__ __forceinline__ __nv_bfloat16 from(float value) {
    return __float2bfloat16_rn(value);
  }
};

// Template tiles in shared memory: one buffer, or two (the next tile is copied while the
// current one is multiplied). Two cost a tile of shared memory, and with it resident blocks:
// at K = 196 (208 padded) on a Hopper SM (228 KB), bf16 row_stats holds 4 blocks with one
// buffer (50.7 KB each) and 3 with two (64.5 KB), so the paper's 512 row blocks would need a
// second wave; launch() picks two only when they keep every block the grid would place with
// one (small grids, small maps). Only the bf16 row_stats and column_sums kernels have the
// two-buffer variant: input_grad's float32 dx accumulator (54 KB at K = 196) already fills
// the block (a second tile would take its bf16 kernel from 2 blocks per SM to 1, its float32
// ones past an A100's 163 KB per block), the fused modes hold two, and float32 tiles are
// twice the bytes.
constexpr bool has_two_buffer_variant(Precision precision, Mode mode) {
  return precision == Precision::kBf16 && accumulators(mode) == 0;
}

// Shared-memory layout, in elements of each region's type; regions start 128-byte aligned
// (WMMA needs 32). Strides are padded to multiples of 16 bytes (the cp.async chunk): 8
// floats / 8 bf16 for WMMA; 4 floats for the FMA path, whose lanes read one template each as
// float4: a stride of 4 mod 16 floats (212 at K = 196) puts the 8 lanes of each quarter-warp
// on distinct banks. The weights of the dx products (the A operand of warp_input_grad): the
// first sit in the score tile (tf32, ieee: each lane overwrites its own scores) or in a bf16
// tile; a second accumulator's weights have their own tile of the same kind.
template <Precision P>
struct Layout {
  using operand_t = typename Operand<P>::type;
  int x_stride, template_stride, dx_stride;
  size_t x_offset, template_offset, template_buffer_bytes, score_offset, grad_offset,
      second_grad_offset, dx_offset, dx_bytes, bytes;

  __host__ __device__ static size_t align(size_t bytes) { return (bytes + 127) / 128 * 128; }

  __host__ __device__ Layout(int padded_pixels, int accumulators, int buffers) {
    x_stride = padded_pixels + 8;
    template_stride = P == Precision::kIeee ? padded_pixels + 4 : padded_pixels + 8;
    dx_stride = padded_pixels + 4;
    x_offset = 0;
    template_offset = align(x_offset + sizeof(operand_t) * kBlockRows * x_stride);
    template_buffer_bytes = align(sizeof(operand_t) * kBlockTemplates * template_stride);
    score_offset = template_offset + buffers * template_buffer_bytes;
    const size_t score_bytes = align(sizeof(float) * kBlockRows * kScoreStride);
    const size_t bf16_grad_bytes = align(sizeof(__nv_bfloat16) * kBlockRows * kGradStride);
    grad_offset = score_offset + score_bytes;
    second_grad_offset =
        grad_offset + (P == Precision::kBf16 && accumulators > 0 ? bf16_grad_bytes : 0);
    dx_offset = second_grad_offset +
                (accumulators == 2 ? P == Precision::kBf16 ? bf16_grad_bytes : score_bytes : 0);
    dx_bytes = align(sizeof(float) * kBlockRows * dx_stride);
    bytes = dx_offset + accumulators * dx_bytes;
  }
};

// scores[r, j] = <x[row r], T[t0 + j]> (unscaled) for the warp's 16 rows, into its rows of
// the score tile.
template <Precision P>
__device__ __forceinline__ void warp_scores(const typename Operand<P>::type* xs,
                                            const typename Operand<P>::type* ts,
                                            float* scores, const Layout<P>& layout,
                                            int padded_pixels, int warp, int lane) {
  const auto* rows = xs + warp * kWarpRows * layout.x_stride;
  float* out = scores + warp * kWarpRows * kScoreStride;
  if constexpr (P == Precision::kIeee) {
    float accumulators[kWarpRows] = {};
    const float* column = ts + lane * layout.template_stride;
    for (int k0 = 0; k0 < padded_pixels; k0 += 4) {
      const float4 value = *reinterpret_cast<const float4*>(column + k0);
#pragma unroll
      for (int r = 0; r < kWarpRows; ++r) {  // per row, k in increasing order
        const float4 pixel = *reinterpret_cast<const float4*>(rows + r * layout.x_stride + k0);
        accumulators[r] += pixel.x * value.x;
        accumulators[r] += pixel.y * value.y;
        accumulators[r] += pixel.z * value.z;
        accumulators[r] += pixel.w * value.w;
      }
    }
#pragma unroll
    for (int r = 0; r < kWarpRows; ++r) out[r * kScoreStride + lane] = accumulators[r];
  } else {
    constexpr int kStep = Operand<P>::kStep;
    using element_t = std::conditional_t<P == Precision::kTf32, wmma::precision::tf32,
                                         __nv_bfloat16>;
    wmma::fragment<wmma::accumulator, 16, 16, kStep, float> accumulators[2];
    wmma::fill_fragment(accumulators[0], 0.0f);
    wmma::fill_fragment(accumulators[1], 0.0f);
    wmma::fragment<wmma::matrix_a, 16, 16, kStep, element_t, wmma::row_major> a;
    wmma::fragment<wmma::matrix_b, 16, 16, kStep, element_t, wmma::col_major> b;
    for (int k0 = 0; k0 < padded_pixels; k0 += kStep) {
      wmma::load_matrix_sync(a, rows + k0, layout.x_stride);
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        wmma::load_matrix_sync(b, ts + half * 16 * layout.template_stride + k0,
                               layout.template_stride);
        wmma::mma_sync(accumulators[half], a, b, accumulators[half]);
      }
    }
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      wmma::store_matrix_sync(out + half * 16, accumulators[half], kScoreStride,
                              wmma::mem_row_major);
    }
  }
}

// dx[r, :] += sum_j grads[r, j] * T[t0 + j, :] for the warp's 16 rows.
template <Precision P>
__device__ __forceinline__ void warp_input_grad(const typename Operand<P>::type* ts,
                                                const float* scores,
                                                const __nv_bfloat16* grads_bf16, float* dxs,
                                                const Layout<P>& layout, int padded_pixels,
                                                int warp, int lane) {
  float* dx_rows = dxs + warp * kWarpRows * layout.dx_stride;
  if constexpr (P == Precision::kIeee) {
    const float* grads = scores + warp * kWarpRows * kScoreStride;
    for (int k = lane; k < padded_pixels; k += 32) {
      float accumulators[kWarpRows] = {};
      for (int j = 0; j < kBlockTemplates; ++j) {
        const float value = ts[j * layout.template_stride + k];
#pragma unroll
        for (int r = 0; r < kWarpRows; ++r) accumulators[r] += grads[r * kScoreStride + j] * value;
      }
#pragma unroll
      for (int r = 0; r < kWarpRows; ++r) dx_rows[r * layout.dx_stride + k] += accumulators[r];
    }
  } else {
    constexpr int kStep = Operand<P>::kStep;
    constexpr int kSteps = kBlockTemplates / kStep;
    using element_t = std::conditional_t<P == Precision::kTf32, wmma::precision::tf32,
                                         __nv_bfloat16>;
    wmma::fragment<wmma::matrix_a, 16, 16, kStep, element_t, wmma::row_major> a[kSteps];
#pragma unroll
    for (int step = 0; step < kSteps; ++step) {
      if constexpr (P == Precision::kTf32) {
        wmma::load_matrix_sync(a[step], scores + warp * kWarpRows * kScoreStride + step * kStep,
                               kScoreStride);
      } else {
        wmma::load_matrix_sync(a[step], grads_bf16 + warp * kWarpRows * kGradStride + step * kStep,
                               kGradStride);
      }
    }
    wmma::fragment<wmma::matrix_b, 16, 16, kStep, element_t, wmma::row_major> b;
    wmma::fragment<wmma::accumulator, 16, 16, kStep, float> accumulator;
    for (int n0 = 0; n0 < padded_pixels; n0 += 16) {
      wmma::load_matrix_sync(accumulator, dx_rows + n0, layout.dx_stride, wmma::mem_row_major);
#pragma unroll
      for (int step = 0; step < kSteps; ++step) {
        wmma::load_matrix_sync(b, ts + step * kStep * layout.template_stride + n0,
                               layout.template_stride);
        wmma::mma_sync(accumulator, a[step], b, accumulator);
      }
      wmma::store_matrix_sync(dx_rows + n0, accumulator, layout.dx_stride, wmma::mem_row_major);
    }
  }
}

// Starts copying template tile `tile` (rows 32 tile .. 32 tile + 31 of the operand templates,
// which exist: N is padded to whole tiles) into the shared buffer `ts`. Warp w copies rows
// w, w + 4, ..., lane c the row's 16-byte chunks c, c + 32, ...: the addresses are a few
// multiply-adds of ints, and the 26 (bf16) or 52 (float32) chunks of a K = 208 row are one
// contiguous, coalesced span. cp.async (the L2-only .cg form: a tile is read once per block)
// writes shared memory without registers; callers wait with wait_for_template_tiles. It
// needs sm_80, as do the bf16 and tf32 WMMA fragments: the kernels build for sm_80+ only.
template <typename operand_t>
__device__ __forceinline__ void copy_template_tile(const operand_t* templates, int64_t tile,
                                                   operand_t* ts, int template_stride,
                                                   int padded_pixels, int warp, int lane) {
  constexpr int kChunk = 16 / sizeof(operand_t);  // elements per 16 bytes
  const int chunks_per_row = padded_pixels / kChunk;
  const operand_t* from = templates + (tile * kBlockTemplates + warp) * padded_pixels;
  operand_t* to = ts + warp * template_stride;
  // Not unrolled: unrolled, nvcc keeps the 8 rows' addresses live across the whole sweep,
  // 20-40 registers more per thread in every mode.
#pragma unroll 1
  for (int j = warp; j < kBlockTemplates; j += kWarps) {
    for (int c = lane; c < chunks_per_row; c += 32) {
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(
                       static_cast<unsigned>(__cvta_generic_to_shared(to + c * kChunk))),
                   "l"(from + c * kChunk));
    }
    from += kWarps * padded_pixels;
    to += kWarps * template_stride;
  }
  asm volatile("cp.async.commit_group;\n" ::);
}

// This thread's copies are in shared memory; a __syncthreads after it makes everyone's visible.
__device__ __forceinline__ void wait_for_template_tiles() {
  asm volatile("cp.async.wait_group 0;\n" ::: "memory");
}

// The largest of the warp's 32 values, on every lane (maxima are exact: any order gives it).
__device__ __forceinline__ float warp_max(float value) {
  for (int offset = 16; offset > 0; offset /= 2) {
    value = fmaxf(value, __shfl_xor_sync(0xffffffffu, value, offset));
  }
  return value;
}

// A row's two accumulators when their reference moves: second = decay (second + shift first),
// then first = decay first; the warp's lanes split the row. decay = 1 leaves first unchanged.
__device__ __forceinline__ void rebase_accumulators(float* first, float* second, float decay,
                                                    float shift, int padded_pixels, int lane) {
  for (int k = lane; k < padded_pixels; k += 32) {
    const float value = first[k];
    second[k] = decay * (second[k] + shift * value);
    first[k] = decay * value;
  }
}

// The sweep of every mode; ecloss_kernel and fused_kernel below are its entry points.
template <typename input_t, Precision P, Mode M, int kBuffers>
__device__ __forceinline__ void sweep(const Arguments& args) {
  using operand_t = typename Operand<P>::type;
  constexpr bool kRowStatistics = M == Mode::kRowStats || M == Mode::kRowStatsWithGrad;
  constexpr bool kFused = accumulators(M) == 2;
  extern __shared__ __align__(128) unsigned char shared[];
  const Layout<P> layout(args.padded_pixels, accumulators(M), kBuffers);
  auto* xs = reinterpret_cast<operand_t*>(shared + layout.x_offset);
  const auto* templates = static_cast<const operand_t*>(args.templates);
  auto tile_buffer = [&](int64_t tile) {
    return reinterpret_cast<operand_t*>(shared + layout.template_offset +
                                        (tile % kBuffers) * layout.template_buffer_bytes);
  };
  auto* scores = reinterpret_cast<float*>(shared + layout.score_offset);
  auto* grads_bf16 = reinterpret_cast<__nv_bfloat16*>(shared + layout.grad_offset);
  // The second accumulator's weights: float32 (tf32, ieee) or bf16, in one region.
  auto* second_scores = reinterpret_cast<float*>(shared + layout.second_grad_offset);
  auto* second_grads_bf16 = reinterpret_cast<__nv_bfloat16*>(shared + layout.second_grad_offset);
  auto* dxs = reinterpret_cast<float*>(shared + layout.dx_offset);
  auto* second_dxs = reinterpret_cast<float*>(shared + layout.dx_offset + layout.dx_bytes);

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t pixels = args.pixels, num_templates = args.num_templates;
  const int padded_pixels = args.padded_pixels;
  const float tau = args.tau;
  const bool grouped = M == Mode::kColumnSums;  // rows are the maps of channel blockIdx.y
  const int64_t rows = grouped ? args.batch : args.batch * args.channels;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kBlockRows;
  // Flat row index (b * C + c) of the block's row i, or -1 past the end.
  auto row_of = [&](int i) -> int64_t {
    const int64_t index = first + i;
    if (index >= rows) return -1;
    return grouped ? index * args.channels + blockIdx.y : index;
  };
  // The warp's row r in an accumulator.
  auto accumulator_row = [&](float* accumulator, int r) {
    return accumulator + (warp * kWarpRows + r) * layout.dx_stride;
  };
  // The weights of template t0 + lane for the warp's row r, as the dx products take them:
  // rounded to bf16, or to the operand (in place of the score for tf32 and ieee).
  auto store_weights = [&](int r, float weight, float second_weight) {
    const int i = warp * kWarpRows + r;
    if constexpr (P == Precision::kBf16) {
      grads_bf16[i * kGradStride + lane] = __float2bfloat16_rn(weight);
      if constexpr (kFused) {
        second_grads_bf16[i * kGradStride + lane] = __float2bfloat16_rn(second_weight);
      }
    } else {
      scores[i * kScoreStride + lane] = Operand<P>::from(weight);
      if constexpr (kFused) second_scores[i * kScoreStride + lane] = Operand<P>::from(second_weight);
    }
  };

  // The block's rows, padded with zeros to 64 x padded_pixels.
  const auto* x = static_cast<const input_t*>(args.x);
  for (int index = threadIdx.x; index < kBlockRows * padded_pixels; index += kThreads) {
    const int i = index / padded_pixels, k = index % padded_pixels;
    const int64_t row = row_of(i);
    const float value = row >= 0 && k < pixels ? static_cast<float>(x[row * pixels + k]) : 0.0f;
    xs[i * layout.x_stride + k] = Operand<P>::from(value);
  }

  // Per-row constants of the warp's rows, held by every lane. centre is score_grad's:
  // neg_entropy + log_sum without a prior, else summed (with the mass) by the first sweep,
  // or (one sweep, kPriorInputGrad) the z of the row's best template so far, whose score is
  // best; divergence is then each lane's part of sum_t p (z - centre).
  const bool has_prior = args.prior != nullptr;
  constexpr bool kGradient = M == Mode::kInputGrad || M == Mode::kPriorInputGrad;
  float row_max[kWarpRows], log_sum[kWarpRows], weight[kWarpRows], centre[kWarpRows],
      mass[kWarpRows], best[kWarpRows], divergence[kWarpRows];
  const float* prior_rows[kWarpRows];
#pragma unroll
  for (int r = 0; r < kWarpRows; ++r) {
    const int64_t row = row_of(warp * kWarpRows + r);
    const bool reads_stats = !kRowStatistics && row >= 0;
    row_max[r] = reads_stats ? args.row_max[row] : 0.0f;
    // A missing row of a column-sum block must add p = exp(0 - log_sum) = 0, hence inf.
    log_sum[r] = reads_stats ? args.log_sum[row] : M == Mode::kColumnSums ? INFINITY : 0.0f;
    weight[r] = kGradient && row >= 0 ? args.row_weight[row] : 0.0f;
    centre[r] = M == Mode::kInputGrad && !has_prior && row >= 0
                    ? args.neg_entropy[row] + log_sum[r]
                    : 0.0f;
    mass[r] = 0.0f;
    best[r] = -INFINITY;
    divergence[r] = 0.0f;
    prior_rows[r] =
        has_prior && row >= 0 ? args.prior + (row % args.channels) * num_templates : nullptr;
  }
  if constexpr (accumulators(M) > 0) {
    for (int index = lane; index < kWarpRows * layout.dx_stride; index += 32) {
      dxs[warp * kWarpRows * layout.dx_stride + index] = 0.0f;
      if constexpr (kFused) second_dxs[warp * kWarpRows * layout.dx_stride + index] = 0.0f;
    }
  }
  SoftmaxState<float> states[kWarpRows];
#pragma unroll
  for (int r = 0; r < kWarpRows; ++r) states[r] = empty_state<float>();

  // Sweep 0 (kInputGrad with a prior only): each lane's part of sum_t p (w log p - prior) and
  // of sum_t p. Last sweep: the mode's work.
  const int first_sweep = M == Mode::kInputGrad && has_prior ? 0 : 1;
  const int64_t tiles = (num_templates + kBlockTemplates - 1) / kBlockTemplates;
  for (int sweep = first_sweep; sweep < 2; ++sweep) {
    const bool centre_sweep = sweep == 0;
    if constexpr (kBuffers == 2) {
      __syncthreads();  // a previous sweep no longer reads buffer 0
      copy_template_tile(templates, 0, tile_buffer(0), layout.template_stride, padded_pixels,
                         warp, lane);
    }
    for (int64_t tile = 0; tile < tiles; ++tile) {
      const int64_t t0 = tile * kBlockTemplates;
      operand_t* ts = tile_buffer(tile);
      if constexpr (kBuffers == 1) {
        __syncthreads();  // the previous tile is no longer read
        copy_template_tile(templates, tile, ts, layout.template_stride, padded_pixels, warp,
                           lane);
      }
      wait_for_template_tiles();
      // The tile is in (and xs is written, at first); with two buffers, every warp is done
      // with the previous tile, whose buffer the next copy overwrites.
      __syncthreads();
      if constexpr (kBuffers == 2) {
        if (tile + 1 < tiles) {
          copy_template_tile(templates, tile + 1, tile_buffer(tile + 1), layout.template_stride,
                             padded_pixels, warp, lane);
        }
      }
      warp_scores<P>(xs, ts, scores, layout, padded_pixels, warp, lane);
      __syncwarp();

      const int64_t t = t0 + lane;
      const bool valid = t < num_templates;
      float* score_rows = scores + warp * kWarpRows * kScoreStride;
#pragma unroll
      for (int r = 0; r < kWarpRows; ++r) {
        const float score = __fmul_rn(tau, score_rows[r * kScoreStride + lane]);
        if constexpr (M == Mode::kRowStats) {
          if (valid) push(states[r], score);
        } else if constexpr (M == Mode::kRowStatsWithGrad) {
          // Every lane's state keeps the row's running max m (warp-uniform), the reference
          // of both accumulators, U = sum e^(s-m) T[t] and V = sum e^(s-m) (s-m) T[t]: one
          // exponential per score weights the state's sums and both products.
          SoftmaxState<float>& state = states[r];
          const float tile_max = warp_max(valid ? score : -INFINITY);
          if (tile_max > state.max) {
            if (state.max > -INFINITY) {  // nothing to rescale before the first tile
              const float shift = state.max - tile_max;  // < 0
              const float decay = exp_(shift);
              state.sum_exp_shift = decay * (state.sum_exp_shift + shift * state.sum_exp);
              state.sum_exp *= decay;
              rebase_accumulators(accumulator_row(dxs, r), accumulator_row(second_dxs, r), decay,
                                  shift, padded_pixels, lane);
            }
            state.max = tile_max;
          }
          const float shifted = score - state.max;
          const float exp_shifted = valid ? exp_(shifted) : 0.0f;
          const float exp_shifted_times_shift = exp_shifted * shifted;
          state.sum_exp += exp_shifted;
          state.sum_exp_shift += exp_shifted_times_shift;
          store_weights(r, exp_shifted, exp_shifted_times_shift);
        } else if constexpr (M == Mode::kColumnSums) {
          score_rows[r * kScoreStride + lane] =
              valid ? probability(score - row_max[r], log_sum[r]) : 0.0f;
        } else {
          const float shifted = score - row_max[r];
          const float log_p = log_probability(shifted, log_sum[r]);
          const float p = exp_(log_p);
          // The z of score_grad: w log p - prior, or s - row_max without a prior.
          const float prior = prior_rows[r] != nullptr && valid ? prior_rows[r][t] : 0.0f;
          const float z = has_prior ? weight[r] * log_p - prior : shifted;
          if constexpr (M == Mode::kPriorInputGrad) {
            // The accumulators are U = sum p T[t] and Z = sum p (z - centre) T[t], centre the
            // z of the row's best template so far (the first lane of the tile's largest
            // score, if it beats the earlier tiles'): a peaked row's top template adds
            // nothing to Z, and D - centre = sum p (z - centre) / sum p is small.
            const float tile_best = warp_max(valid ? score : -INFINITY);
            if (tile_best > best[r]) {
              const unsigned holders = __ballot_sync(0xffffffffu, valid && score == tile_best);
              const float reference = __shfl_sync(0xffffffffu, z, __ffs(holders) - 1);
              if (best[r] > -INFINITY) {  // Z += (c - c') U, sum p (z - c) += (c - c') sum p
                const float shift = centre[r] - reference;
                divergence[r] += shift * mass[r];
                rebase_accumulators(accumulator_row(dxs, r), accumulator_row(second_dxs, r),
                                    1.0f, shift, padded_pixels, lane);
              }
              centre[r] = reference;
              best[r] = tile_best;
            }
            const float mass_term = valid ? p : 0.0f;
            const float grad = valid ? score_grad(p, z, centre[r]) : 0.0f;
            divergence[r] += grad;
            mass[r] += mass_term;
            store_weights(r, mass_term, grad);
          } else if (centre_sweep) {
            if (valid) {
              centre[r] += p * z;
              mass[r] += p;
            }
          } else {
            store_weights(r, valid ? score_grad(p, z, centre[r]) : 0.0f, 0.0f);
          }
        }
      }
      if constexpr (M == Mode::kColumnSums) {
        __syncthreads();  // all 64 rows' probabilities are in the tile
        if (threadIdx.x < kBlockTemplates && valid) {
          float sum = 0.0f;
          for (int i = 0; i < kBlockRows; ++i) sum += scores[i * kScoreStride + threadIdx.x];
          args.column_sums[(static_cast<int64_t>(blockIdx.x) * args.channels + blockIdx.y) *
                               num_templates + t] = sum;
        }
      } else if constexpr (M == Mode::kInputGrad) {
        if (!centre_sweep) {
          __syncwarp();
          warp_input_grad<P>(ts, scores, grads_bf16, dxs, layout, padded_pixels, warp, lane);
        }
      } else if constexpr (kFused) {
        __syncwarp();  // the weights and any rebased accumulator rows are written
        warp_input_grad<P>(ts, scores, grads_bf16, dxs, layout, padded_pixels, warp, lane);
        warp_input_grad<P>(ts, second_scores, second_grads_bf16, second_dxs, layout,
                           padded_pixels, warp, lane);
      }
    }
    if constexpr (M == Mode::kInputGrad) {
      if (centre_sweep) {  // the lanes' parts summed by a fixed butterfly: every lane gets
                           // the same sums (each step adds the same two values)
#pragma unroll
        for (int r = 0; r < kWarpRows; ++r) {
          for (int offset = 16; offset > 0; offset /= 2) {
            centre[r] += __shfl_xor_sync(0xffffffffu, centre[r], offset);
            mass[r] += __shfl_xor_sync(0xffffffffu, mass[r], offset);
          }
          centre[r] /= mass[r];
        }
      }
    }
  }

  if constexpr (kRowStatistics) {
    __syncwarp();  // the last products are in the accumulators
#pragma unroll
    for (int r = 0; r < kWarpRows; ++r) {
      SoftmaxState<float> state = states[r];
      for (int offset = 16; offset > 0; offset /= 2) {
        const SoftmaxState<float> other{__shfl_xor_sync(0xffffffffu, state.max, offset),
                                        __shfl_xor_sync(0xffffffffu, state.sum_exp, offset),
                                        __shfl_xor_sync(0xffffffffu, state.sum_exp_shift, offset)};
        state = merge(state, other);
      }
      const int64_t row = row_of(warp * kWarpRows + r);
      if (lane == 0 && row >= 0) {
        finish(state, args.row_max_out[row], args.log_sum_out[row], args.neg_entropy_out[row]);
      }
      if constexpr (M == Mode::kRowStatsWithGrad) {
        // neg_entropy_grad = tau (V - (a / l) U) / l; the lanes' states share one max, so
        // the merge only added their sums.
        if (row >= 0) {
          const float mean_shift = state.sum_exp_shift / state.sum_exp;
          const float scale = tau / state.sum_exp;
          const float* u = accumulator_row(dxs, r);
          const float* v = accumulator_row(second_dxs, r);
          float* out = args.neg_entropy_grad_out + row * pixels;
          for (int k = lane; k < pixels; k += 32) out[k] = scale * (v[k] - mean_shift * u[k]);
        }
      }
    }
  } else if constexpr (M == Mode::kInputGrad) {
    __syncwarp();
    auto* dx = static_cast<input_t*>(args.dx);
    for (int r = 0; r < kWarpRows; ++r) {
      const int64_t row = row_of(warp * kWarpRows + r);
      if (row < 0) break;
      const float scale = has_prior ? tau : tau * args.row_weight[row];  // a prior carries w
      const float* sums = accumulator_row(dxs, r);
      for (int k = lane; k < pixels; k += 32) {
        dx[row * pixels + k] = static_cast<input_t>(scale * sums[k]);
      }
    }
  } else if constexpr (M == Mode::kPriorInputGrad) {
    __syncwarp();
    auto* dx = static_cast<input_t*>(args.dx);
    // Unrolled, so that the per-row sums stay in registers.
#pragma unroll
    for (int r = 0; r < kWarpRows; ++r) {
      // dx = tau (Z - (D - centre) U), D - centre from the lanes' parts (fixed butterfly).
      float row_divergence = divergence[r], row_mass = mass[r];
      for (int offset = 16; offset > 0; offset /= 2) {
        row_divergence += __shfl_xor_sync(0xffffffffu, row_divergence, offset);
        row_mass += __shfl_xor_sync(0xffffffffu, row_mass, offset);
      }
      const int64_t row = row_of(warp * kWarpRows + r);
      if (row < 0) continue;  // the same on every lane
      const float offset_from_centre = row_divergence / row_mass;
      const float* sums = accumulator_row(dxs, r);
      const float* centred = accumulator_row(second_dxs, r);
      for (int k = lane; k < pixels; k += 32) {
        dx[row * pixels + k] =
            static_cast<input_t>(tau * (centred[k] - offset_from_centre * sums[k]));
      }
    }
  }
}

template <typename input_t, Precision P, Mode M, int kBuffers>
__global__ void __launch_bounds__(kThreads) ecloss_kernel(const Arguments args) {
  sweep<input_t, P, M, kBuffers>(args);
}

// The fused modes with a minimum of one block per SM, which lets ptxas use up to 255
// registers: without it, it held the ieee row_stats_with_grad kernel to 128 and spilled
// (sm_90, CUDA 13.0), and the fused kernels hold one or two blocks per SM anyway (shared
// memory). The other modes keep ptxas's choice: given the minimum, it takes row_stats
// from 128 registers to 166, below the 4 blocks per SM that its shared memory allows.
template <typename input_t, Precision P, Mode M, int kBuffers>
__global__ void __launch_bounds__(kThreads, 1) fused_kernel(const Arguments args) {
  sweep<input_t, P, M, kBuffers>(args);
}

template <typename input_t, Precision P, Mode M, int kBuffers>
constexpr auto kernel_of() {
  if constexpr (accumulators(M) == 2) {
    return &fused_kernel<input_t, P, M, kBuffers>;
  } else {
    return &ecloss_kernel<input_t, P, M, kBuffers>;
  }
}

template <Precision P, Mode M, int kBuffers>
size_t shared_bytes(const Arguments& args) {
  return Layout<P>(args.padded_pixels, accumulators(M), kBuffers).bytes;
}

template <typename input_t, Precision P, Mode M, int kBuffers>
void start(const Arguments& args, dim3 grid) {
  const size_t bytes = shared_bytes<P, M, kBuffers>(args);
  auto* kernel = kernel_of<input_t, P, M, kBuffers>();
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(bytes)));
  kernel<<<grid, kThreads, bytes, c10::cuda::getCurrentCUDAStream()>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Blocks of the kernel that this GPU holds at once, over all its SMs.
template <typename input_t, Precision P, Mode M, int kBuffers>
int64_t resident_blocks(const Arguments& args, int processors) {
  const size_t bytes = shared_bytes<P, M, kBuffers>(args);
  auto* kernel = kernel_of<input_t, P, M, kBuffers>();
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(bytes)));
  int per_processor = 0;
  C10_CUDA_CHECK(
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_processor, kernel, kThreads, bytes));
  return static_cast<int64_t>(per_processor) * processors;
}

// The current GPU's shared memory per block (opt-in maximum) and multiprocessor count.
struct DeviceLimits {
  int shared_bytes, processors;
};
inline DeviceLimits device_limits() {
  int device = 0;
  DeviceLimits limits{};
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&limits.shared_bytes,
                                        cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  C10_CUDA_CHECK(
      cudaDeviceGetAttribute(&limits.processors, cudaDevAttrMultiProcessorCount, device));
  return limits;
}

template <typename input_t, Precision P, Mode M>
void launch(const Arguments& args, dim3 grid) {
  const DeviceLimits device = device_limits();
  const size_t bytes = shared_bytes<P, M, 1>(args);
  TORCH_CHECK_VALUE(bytes <= static_cast<size_t>(device.shared_bytes),
                    "cuda backend: maps of K = ", args.pixels, " pixels need ", bytes,
                    " bytes of shared memory per block, more than this GPU's ",
                    device.shared_bytes, "; use backend='triton' or 'torch' for maps this large");
  if constexpr (has_two_buffer_variant(P, M)) {
    const int64_t blocks = static_cast<int64_t>(grid.x) * grid.y * grid.z;
    if (shared_bytes<P, M, 2>(args) <= static_cast<size_t>(device.shared_bytes) &&
        resident_blocks<input_t, P, M, 2>(args, device.processors) >=
            std::min(resident_blocks<input_t, P, M, 1>(args, device.processors), blocks)) {
      return start<input_t, P, M, 2>(args, grid);
    }
  }
  start<input_t, P, M, 1>(args, grid);
}

// Whether the fused kernel of mode M (one sweep, two accumulators) runs instead of the sweeps
// it replaces (row_stats then input_grad, or input_grad's two): where it fits one block's
// shared memory and keeps as many blocks resident as input_grad, or every block of the grid.
// Its second accumulator (54 KB at K = 196) is what costs blocks: at K = 196 on a Hopper SM
// (228 KB) the fused bf16 kernel holds 1 block (165.5 KB) where input_grad holds 2 (107.5 KB),
// so grids of more than one block per SM run the two sweeps; the float32-operand kernels
// (205 KB against 143 KB) hold 1 either way and run fused. Nothing measured: the rule is the
// two-buffer rule's reasoning (launch), to be checked on a GPU.
template <typename input_t, Precision P, Mode M>
bool fused_fits(const Arguments& args, int64_t blocks) {
  const DeviceLimits device = device_limits();
  if (shared_bytes<P, M, 1>(args) > static_cast<size_t>(device.shared_bytes)) return false;
  return resident_blocks<input_t, P, M, 1>(args, device.processors) >=
         std::min(resident_blocks<input_t, P, Mode::kInputGrad, 1>(args, device.processors),
                  blocks);
}

}  // namespace ecloss::gpu

// The kernels of one input type and precision: launch for every mode, fused_fits for the
// fused ones.
#define ECLOSS_INSTANTIATE_KERNELS(input_t, P)                                                 \
  template void ecloss::gpu::launch<input_t, P, ecloss::gpu::Mode::kRowStats>(                 \
      const ecloss::gpu::Arguments&, dim3);                                                    \
  template void ecloss::gpu::launch<input_t, P, ecloss::gpu::Mode::kRowStatsWithGrad>(         \
      const ecloss::gpu::Arguments&, dim3);                                                    \
  template void ecloss::gpu::launch<input_t, P, ecloss::gpu::Mode::kColumnSums>(               \
      const ecloss::gpu::Arguments&, dim3);                                                    \
  template void ecloss::gpu::launch<input_t, P, ecloss::gpu::Mode::kInputGrad>(                \
      const ecloss::gpu::Arguments&, dim3);                                                    \
  template void ecloss::gpu::launch<input_t, P, ecloss::gpu::Mode::kPriorInputGrad>(           \
      const ecloss::gpu::Arguments&, dim3);                                                    \
  template bool ecloss::gpu::fused_fits<input_t, P, ecloss::gpu::Mode::kRowStatsWithGrad>(     \
      const ecloss::gpu::Arguments&, int64_t);                                                 \
  template bool ecloss::gpu::fused_fits<input_t, P, ecloss::gpu::Mode::kPriorInputGrad>(       \
      const ecloss::gpu::Arguments&, int64_t);
