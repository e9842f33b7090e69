// The CUDA kernels at tf32 precision, for float32, float16 and bfloat16 maps (cuda_sweep.cuh):
// one translation unit per precision, so that the three build in parallel.
#include "cuda_sweep.cuh"

ECLOSS_INSTANTIATE_KERNELS(float, ecloss::Precision::kTf32)
ECLOSS_INSTANTIATE_KERNELS(c10::Half, ecloss::Precision::kTf32)
ECLOSS_INSTANTIATE_KERNELS(c10::BFloat16, ecloss::Precision::kTf32)
