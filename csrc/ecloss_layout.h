// The layout of the operand templates that the CUDA kernels read: ecloss_fast/backends/cpp_cuda.py
// makes them (its TEMPLATE_TILE and PIXEL_MULTIPLE, checked against the op operand_layout(),
// which ops.cpp registers from these). Shared by the op registration and the CUDA translation
// units, which include no ATen header.
#pragma once

namespace ecloss {

constexpr int kTemplateTile = 32;  // templates per tile: one per lane of a warp
constexpr int kPixelStep = 16;     // K is padded to a multiple of the WMMA k step (bf16: 16)

}  // namespace ecloss
