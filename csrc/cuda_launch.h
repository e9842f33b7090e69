// What the host side of the CUDA backend (cuda_ops.cpp: argument checks, tensors, the choice
// of kernel) calls in the kernel translation units (cuda_kernels_{ieee,tf32,bf16}.cu, one per
// precision, built in parallel; their code is cuda_sweep.cuh): the block shape, the modes,
// the kernels' arguments and two entry points per input type, precision and mode. Includes no
// ATen header (c10's Half and BFloat16 only), so that the kernel units compile in seconds of
// host code, not the minute that ATen's headers cost nvcc.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <vector_types.h>  // dim3

#include <cstdint>

#include "ecloss_layout.h"
#include "ecloss_precision.h"

namespace ecloss::gpu {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kWarpRows = 16;                     // rows per warp: one WMMA tile high
constexpr int kBlockRows = kWarps * kWarpRows;    // 64
constexpr int kBlockTemplates = kTemplateTile;    // templates per tile: one per lane
constexpr int kScoreStride = kBlockTemplates + 4;  // floats; a multiple of 4 for WMMA
constexpr int kGradStride = kBlockTemplates + 8;   // bf16 gradients; a multiple of 8

enum class Mode { kRowStats, kRowStatsWithGrad, kColumnSums, kInputGrad, kPriorInputGrad };

// Per-row float32 vectors of K (dx accumulators in shared memory) that a mode sums templates
// into: input_grad one (dx); the fused modes two, U = sum_t p T[t] and a second sum
// relative to a reference that moves during the sweep (see the kernel).
constexpr int accumulators(Mode mode) {
  return mode == Mode::kInputGrad ? 1
         : mode == Mode::kRowStatsWithGrad || mode == Mode::kPriorInputGrad ? 2
                                                                            : 0;
}

struct Arguments {
  const void* x;            // (B, C, K), input dtype
  const void* templates;    // (N rounded up to 32, K rounded up to 16), the operand type
  int64_t batch, channels, pixels, num_templates;
  int padded_pixels;        // K rounded up to 16: the row length of templates
  float tau;
  const float* row_max;     // (B, C), column_sums and input_grad
  const float* log_sum;     // (B, C), column_sums and input_grad
  const float* neg_entropy; // (B, C), input_grad
  const float* prior;       // (C, N) or nullptr, input_grad
  const float* row_weight;  // (B, C), input_grad
  float* row_max_out;       // (B, C), row_stats
  float* log_sum_out;       // (B, C), row_stats
  float* neg_entropy_out;   // (B, C), row_stats
  float* neg_entropy_grad_out;  // (B, C, K), row_stats_with_grad
  void* dx;                 // (B, C, K), input dtype, input_grad
  float* column_sums;       // (ceil(B / 64), C, N), column_sums
};

// Launches the kernel of mode M on the current stream for `grid` blocks of kThreads (one or
// two template buffers, whichever keeps more blocks resident); raises a ValueError when the
// maps need more shared memory per block than the GPU has.
template <typename input_t, Precision P, Mode M>
void launch(const Arguments& args, dim3 grid);

// Whether the fused kernel of mode M (one sweep, two accumulators) should run instead of the
// sweeps it replaces for a grid of `blocks` blocks: see cuda_sweep.cuh.
template <typename input_t, Precision P, Mode M>
bool fused_fits(const Arguments& args, int64_t blocks);

}  // namespace ecloss::gpu
