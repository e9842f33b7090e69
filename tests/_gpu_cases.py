"""The GPU cases of tests/test_triton.py, apart so that bench/gpu_plan.py (the GPU check's plan)
compiles their kernels before the tests run: maps ``(height, width, batch, channels)`` and the
(input dtype, precision) routes, every prior kind each. No pytest here: the plan loads this file.
"""
import torch

TAU = 1e-3
PRIORS = ("uniform", "marginal", "general")
GPU_CASES = [(14, 14, 4, 8), (7, 7, 130, 3), (3, 5, 1, 5)]
GPU_PRECISIONS = [(torch.float32, "ieee"), (torch.float32, "tf32"), (torch.float32, "bf16"),
                  (torch.bfloat16, "ieee"), (torch.bfloat16, "tf32"), (torch.bfloat16, "bf16"),
                  (torch.float16, "fp16")]
# test_gpu_ecloss_matches_reference: ecloss(backend="triton", precision="ieee") of these maps.
GPU_ECLOSS_CASE = (14, 14, 4, 8)
# test_gpu_auto_warm_up_compiles_every_kernel_the_loss_launches: auto's routes for these maps
# dtypes (precision=None), both estimators, at a tau no other test uses.
GPU_AUTO_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
GPU_AUTO_TAU = 1.2345e-3
