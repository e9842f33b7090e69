"""A small run of every cuda-backend kernel, for compute-sanitizer (bench/gpu_check.sh):

    compute-sanitizer --tool memcheck python csrc/memcheck_case.py

Shapes are awkward on purpose (K = 35 is padded to 48, N = 631 leaves a partial tile, B = 70
gives two batch blocks and a partial one) and cover every dtype, precision and estimator.
Exits non-zero if a result is not finite.
"""
import torch

import ecloss_fast as ef
from ecloss_fast.backends import cpp_cuda


def main() -> None:
    why_not = cpp_cuda.availability()
    if why_not is not None:
        raise SystemExit(f"cuda backend unavailable: {why_not}")
    generator = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for precision in ("ieee", "tf32", "bf16"):
            for estimator in ("uniform", "marginal"):
                x = (torch.rand(70, 3, 5, 7, generator=generator) * 200).to("cuda", dtype)
                x.requires_grad_()
                loss = ef.ecloss(x, backend="cuda", estimator=estimator, precision=precision)
                loss.backward()
                torch.cuda.synchronize()
                if not (torch.isfinite(loss) and torch.isfinite(x.grad).all()):
                    raise SystemExit(f"non-finite result: {dtype} {precision} {estimator}")
    print("memcheck case done")


if __name__ == "__main__":
    main()
