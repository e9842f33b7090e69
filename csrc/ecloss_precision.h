// The matrix-unit precision of the kernels (docs/design.md section 4): shared by the op checks
// (ecloss_ops.h) and the CUDA kernel translation units, which include no ATen header.
#pragma once

namespace ecloss {

enum class Precision { kIeee, kTf32, kBf16 };

// The names of Precision's values, in its order: what parse_precision accepts and the op
// precisions() lists. ecloss_fast/_precision.py's PRECISIONS must be the same names (the cpu
// backend compares them when it loads the extension).
inline constexpr const char* kPrecisionNames[] = {"ieee", "tf32", "bf16"};

}  // namespace ecloss
