// The CUDA backend's host side: the ops' CUDA implementations (argument checks, outputs, the
// kernels' arguments, which kernel runs) and their registration. The kernels themselves are
// in cuda_kernels_{ieee,tf32,bf16}.cu (device code: cuda_sweep.cuh), reached through
// cuda_launch.h; the algorithm is described there.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda_launch.h"
#include "ecloss_ops.h"

namespace ecloss::gpu {
namespace {

// Calls body(input tag, precision tag) with the kernels' types for x's dtype and precision.
template <typename Body>
void with_kernel_types(const at::Tensor& x, Precision precision, Body&& body) {
  auto by_precision = [&](auto input_tag) {
    switch (precision) {
      case Precision::kIeee:
        return body(input_tag, std::integral_constant<Precision, Precision::kIeee>{});
      case Precision::kTf32:
        return body(input_tag, std::integral_constant<Precision, Precision::kTf32>{});
      case Precision::kBf16:
        return body(input_tag, std::integral_constant<Precision, Precision::kBf16>{});
    }
  };
  switch (x.scalar_type()) {
    case at::kFloat: return by_precision(float{});
    case at::kHalf: return by_precision(at::Half{});
    case at::kBFloat16: return by_precision(at::BFloat16{});
    default:
      TORCH_CHECK_TYPE(false, "cuda backend: x must be float32, float16 or bfloat16, got ",
                       x.scalar_type(), " (use backend='torch' for float64)");
  }
}

template <Mode M>
void dispatch(const at::Tensor& x, Precision precision, const Arguments& args, dim3 grid) {
  with_kernel_types(x, precision, [&](auto input_tag, auto precision_tag) {
    launch<decltype(input_tag), decltype(precision_tag)::value, M>(args, grid);
  });
}

// Whether the fused kernel of mode M (one sweep, two accumulators) runs instead of the sweeps
// it replaces (row_stats then input_grad, or input_grad's two): where it fits one block's
// shared memory and keeps as many blocks resident as input_grad, or every block of the grid.
// Its second accumulator (54 KB at K = 196) is what costs blocks: at K = 196 on a Hopper SM
// (228 KB) the fused bf16 kernel holds 1 block (165.5 KB) where input_grad holds 2 (107.5 KB),
// so grids of more than one block per SM run the two sweeps; the float32-operand kernels
// (205 KB against 143 KB) hold 1 either way and run fused. Nothing measured: the rule is the
// two-buffer rule's reasoning (launch), to be checked on a GPU.
template <Mode M>
bool runs_fused(const at::Tensor& x, Precision precision, const Arguments& args,
                int64_t blocks) {
  bool fused = false;
  with_kernel_types(x, precision, [&](auto input_tag, auto precision_tag) {
    fused = fused_fits<decltype(input_tag), decltype(precision_tag)::value, M>(args, blocks);
  });
  return fused;
}

// The kernels read `operand_templates`, the copy of `templates` that
// ecloss_fast/backends/cpp_cuda.py prepares: (N rounded up to 32, K rounded up to 16) in the
// operand type (bfloat16 for "bf16", float32 rounded to TF32 for "tf32", float32 for
// "ieee"), zero outside (N, K), 16-byte aligned. `templates` itself is only checked.
Arguments make_arguments(const at::Tensor& x, const at::Tensor& templates,
                         const std::optional<at::Tensor>& operand_templates, Precision precision,
                         double tau) {
  TORCH_CHECK_TYPE(x.scalar_type() != at::kDouble,
                   "cuda backend: x must be float32, float16 or bfloat16, got Double "
                   "(use backend='torch' for float64)");
  TORCH_CHECK_VALUE(operand_templates.has_value(),
                    "cuda backend: the CUDA kernels need operand_templates, the padded operand "
                    "copy of templates that ecloss_fast.backends.cpp_cuda.operand_templates "
                    "makes");
  const at::Tensor& operands = *operand_templates;
  const int64_t padded_templates =
      (templates.size(0) + kBlockTemplates - 1) / kBlockTemplates * kBlockTemplates;
  const int64_t padded_pixels = (x.size(2) + kPixelStep - 1) / kPixelStep * kPixelStep;
  const at::ScalarType operand_type = precision == Precision::kBf16 ? at::kBFloat16 : at::kFloat;
  TORCH_CHECK_VALUE(operands.dim() == 2 && operands.size(0) == padded_templates &&
                        operands.size(1) == padded_pixels,
                    "cuda backend: operand_templates must be (", padded_templates, ", ",
                    padded_pixels, ") (N, K rounded up to ", kBlockTemplates, " and ", kPixelStep, "), got "
                    "shape ", operands.sizes());
  TORCH_CHECK_TYPE(operands.scalar_type() == operand_type, "cuda backend: operand_templates "
                   "must be ", operand_type, " for this precision, got ", operands.scalar_type());
  TORCH_CHECK_VALUE(operands.is_contiguous() && operands.device() == x.device() &&
                        reinterpret_cast<uintptr_t>(operands.data_ptr()) % 16 == 0,
                    "cuda backend: operand_templates must be contiguous, 16-byte aligned and "
                    "on x's device ", x.device());
  Arguments args{};
  args.x = x.data_ptr();
  args.templates = operands.data_ptr();
  args.batch = x.size(0);
  args.channels = x.size(1);
  args.pixels = x.size(2);
  args.num_templates = templates.size(0);
  args.padded_pixels = static_cast<int>(padded_pixels);
  args.tau = static_cast<float>(tau);
  return args;
}

unsigned row_blocks(int64_t rows) {
  return static_cast<unsigned>((rows + kBlockRows - 1) / kBlockRows);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> row_stats_cuda(const at::Tensor& x,
                                                              const at::Tensor& templates,
                                                              double tau,
                                                              c10::string_view precision,
                                                              const std::optional<at::Tensor>&
                                                                  operand_templates) {
  check_arguments("row_stats", x, templates, {}, std::nullopt);
  const Precision resolved = parse_precision(precision);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor row_max = at::empty({x.size(0), x.size(1)}, templates.options());
  at::Tensor log_sum = at::empty_like(row_max);
  at::Tensor neg_entropy = at::empty_like(row_max);
  if (x.numel() == 0) return {row_max, log_sum, neg_entropy};
  Arguments args = make_arguments(x, templates, operand_templates, resolved, tau);
  args.row_max_out = row_max.data_ptr<float>();
  args.log_sum_out = log_sum.data_ptr<float>();
  args.neg_entropy_out = neg_entropy.data_ptr<float>();
  dispatch<Mode::kRowStats>(x, resolved, args, dim3(row_blocks(x.size(0) * x.size(1))));
  return {row_max, log_sum, neg_entropy};
}

at::Tensor column_sums_cuda(const at::Tensor& x, const at::Tensor& templates, double tau,
                            const at::Tensor& row_max, const at::Tensor& log_sum,
                            c10::string_view precision,
                            const std::optional<at::Tensor>& operand_templates) {
  check_arguments("column_sums", x, templates, {&row_max, &log_sum}, std::nullopt);
  const Precision resolved = parse_precision(precision);
  const c10::cuda::CUDAGuard guard(x.device());
  const unsigned batch_blocks = row_blocks(x.size(0));
  at::Tensor partial = at::empty({batch_blocks, x.size(1), templates.size(0)}, templates.options());
  if (x.numel() == 0) return at::zeros({x.size(1), templates.size(0)}, templates.options());
  const at::Tensor row_max_contiguous = row_max.contiguous();
  const at::Tensor log_sum_contiguous = log_sum.contiguous();
  Arguments args = make_arguments(x, templates, operand_templates, resolved, tau);
  args.row_max = row_max_contiguous.data_ptr<float>();
  args.log_sum = log_sum_contiguous.data_ptr<float>();
  args.column_sums = partial.data_ptr<float>();
  dispatch<Mode::kColumnSums>(x, resolved, args,
                              dim3(batch_blocks, static_cast<unsigned>(x.size(1))));
  // A plain reduction over the batch blocks: fixed order, so deterministic.
  return batch_blocks == 1 ? partial[0] : partial.sum(0);
}

at::Tensor input_grad_cuda(const at::Tensor& x, const at::Tensor& templates, double tau,
                           const at::Tensor& row_max, const at::Tensor& log_sum,
                           const at::Tensor& neg_entropy, const std::optional<at::Tensor>& prior,
                           const at::Tensor& row_weight, c10::string_view precision,
                           const std::optional<at::Tensor>& operand_templates) {
  check_arguments("input_grad", x, templates, {&row_max, &log_sum, &neg_entropy, &row_weight},
                  prior);
  const Precision resolved = parse_precision(precision);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor dx = at::empty_like(x);
  if (x.numel() == 0) return dx;
  const at::Tensor row_max_contiguous = row_max.contiguous();
  const at::Tensor log_sum_contiguous = log_sum.contiguous();
  const at::Tensor neg_entropy_contiguous = neg_entropy.contiguous();
  const at::Tensor weight_contiguous = row_weight.contiguous();
  const at::Tensor prior_contiguous = prior.has_value() ? prior->contiguous() : at::Tensor();
  Arguments args = make_arguments(x, templates, operand_templates, resolved, tau);
  args.row_max = row_max_contiguous.data_ptr<float>();
  args.log_sum = log_sum_contiguous.data_ptr<float>();
  args.neg_entropy = neg_entropy_contiguous.data_ptr<float>();
  args.row_weight = weight_contiguous.data_ptr<float>();
  args.prior = prior_contiguous.defined() ? prior_contiguous.data_ptr<float>() : nullptr;
  args.dx = dx.data_ptr();
  const unsigned blocks = row_blocks(x.size(0) * x.size(1));
  if (prior.has_value() && runs_fused<Mode::kPriorInputGrad>(x, resolved, args, blocks)) {
    dispatch<Mode::kPriorInputGrad>(x, resolved, args, dim3(blocks));
  } else {
    dispatch<Mode::kInputGrad>(x, resolved, args, dim3(blocks));
  }
  return dx;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> row_stats_with_grad_cuda(
    const at::Tensor& x, const at::Tensor& templates, double tau, c10::string_view precision,
    const std::optional<at::Tensor>& operand_templates) {
  check_arguments("row_stats_with_grad", x, templates, {}, std::nullopt);
  const Precision resolved = parse_precision(precision);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor row_max = at::empty({x.size(0), x.size(1)}, templates.options());
  at::Tensor log_sum = at::empty_like(row_max);
  at::Tensor neg_entropy = at::empty_like(row_max);
  at::Tensor neg_entropy_grad = at::empty(x.sizes(), templates.options());
  if (x.numel() == 0) return {row_max, log_sum, neg_entropy, neg_entropy_grad};
  Arguments args = make_arguments(x, templates, operand_templates, resolved, tau);
  const unsigned blocks = row_blocks(x.size(0) * x.size(1));
  if (runs_fused<Mode::kRowStatsWithGrad>(x, resolved, args, blocks)) {
    args.row_max_out = row_max.data_ptr<float>();
    args.log_sum_out = log_sum.data_ptr<float>();
    args.neg_entropy_out = neg_entropy.data_ptr<float>();
    args.neg_entropy_grad_out = neg_entropy_grad.data_ptr<float>();
    dispatch<Mode::kRowStatsWithGrad>(x, resolved, args, dim3(blocks));
    return {row_max, log_sum, neg_entropy, neg_entropy_grad};
  }
  // Two sweeps: input_grad's dx with unit row weights is neg_entropy_grad, and from float32
  // maps it comes out in float32 with the same scores (the kernels convert every map to
  // float32, exactly, before rounding it to the operand type).
  std::tie(row_max, log_sum, neg_entropy) =
      row_stats_cuda(x, templates, tau, precision, operand_templates);
  neg_entropy_grad = input_grad_cuda(x.to(at::kFloat), templates, tau, row_max, log_sum,
                                     neg_entropy, std::nullopt, at::ones_like(row_max),
                                     precision, operand_templates);
  return {row_max, log_sum, neg_entropy, neg_entropy_grad};
}

}  // namespace
}  // namespace ecloss::gpu

TORCH_LIBRARY_IMPL(ecloss_fast_C, CUDA, m) {
  m.impl("row_stats", &ecloss::gpu::row_stats_cuda);
  m.impl("row_stats_with_grad", &ecloss::gpu::row_stats_with_grad_cuda);
  m.impl("column_sums", &ecloss::gpu::column_sums_cuda);
  m.impl("input_grad", &ecloss::gpu::input_grad_cuda);
}
