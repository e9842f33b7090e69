// The CUDA kernels at ieee precision, for float32, float16 and bfloat16 maps (cuda_sweep.cuh):
// one translation unit per precision, so that the three build in parallel.
#include "cuda_sweep.cuh"

ECLOSS_INSTANTIATE_KERNELS(float, ecloss::Precision::kIeee)
ECLOSS_INSTANTIATE_KERNELS(c10::Half, ecloss::Precision::kIeee)
ECLOSS_INSTANTIATE_KERNELS(c10::BFloat16, ecloss::Precision::kIeee)
