// Declarations shared by the op schema (ops.cpp) and the per-device kernels: the argument
// checks of the backend contract (docs/design.md section 9), done once in C++ so
// both devices reject the same malformed calls with the same messages.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <optional>

#include "ecloss_precision.h"

namespace ecloss {

// "ieee", "tf32" or "bf16" (already resolved from precision=None by the Python side).
Precision parse_precision(c10::string_view precision);

// The accumulation dtype of docs/design.md section 4: float64 for float64 input, else float32.
at::ScalarType accumulation_type(at::ScalarType input_type);

// x (B, C, K) contiguous floating; templates (N, K) contiguous in the accumulation dtype on
// x's device; each of `row_tensors` (B, C) in the accumulation dtype; prior (C, N) if given.
void check_arguments(const char* op, const at::Tensor& x, const at::Tensor& templates,
                     std::initializer_list<const at::Tensor*> row_tensors,
                     const std::optional<at::Tensor>& prior);

// input_grad_from_scores' checks (scores (B, C, N) in the dtype of templates (N, K), on
// their device; the per-row tensors, prior and precision as input_grad's), and its empty
// dx (B, C, K) in the accumulation dtype.
at::Tensor checked_input_grad_from_scores(const at::Tensor& scores, const at::Tensor& templates,
                                          std::initializer_list<const at::Tensor*> row_tensors,
                                          const std::optional<at::Tensor>& prior,
                                          c10::string_view precision);

}  // namespace ecloss
