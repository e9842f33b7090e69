// The matrix-unit precision of the kernels (docs/design.md section 4): shared by the op checks
// (ecloss_ops.h) and the CUDA kernel translation units, which include no ATen header.
#pragma once

namespace ecloss {

enum class Precision { kIeee, kTf32, kBf16 };

}  // namespace ecloss
