"""A small run of every kernel of one GPU backend, for compute-sanitizer (bench/gpu_check.sh):

    compute-sanitizer --tool memcheck python -m bench.memcheck_case --backend cuda
    compute-sanitizer --tool memcheck python -m bench.memcheck_case --backend triton

Shapes are awkward on purpose (K = 35 is padded to 48, N = 631 leaves a partial tile, B = 70
gives two batch blocks and a partial one) and cover every dtype, precision (float16 maps also
with ``precision=None``: float16 products) and estimator.
Exits non-zero if the backend is unavailable or a result is not finite.
"""
import argparse
import sys

import torch

import ecloss_fast as ef
from bench.gpu_smoke import api_precision

SHAPE = (70, 3, 5, 7)
# (maps dtype, the kernels' precision, estimator); "fp16" is float16 maps with precision=None.
CASES = [(dtype, precision, estimator)
         for dtype in (torch.float32, torch.float16, torch.bfloat16)
         for precision in ("ieee", "tf32", "bf16") + (("fp16",) if dtype == torch.float16 else ())
         for estimator in ("uniform", "marginal")]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.memcheck_case", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=("cuda", "triton"), required=True)
    backend = parser.parse_args(argv).backend
    if backend not in ef.available_backends():
        print(f"error: backend {backend!r} is not available here", file=sys.stderr)
        return 2
    generator = torch.Generator().manual_seed(0)
    for dtype, precision, estimator in CASES:
        x = (torch.rand(*SHAPE, generator=generator) * 200).to("cuda", dtype)
        x.requires_grad_()
        loss = ef.ecloss(x, backend=backend, estimator=estimator,
                         precision=api_precision(precision))
        loss.backward()
        torch.cuda.synchronize()
        if not (torch.isfinite(loss) and torch.isfinite(x.grad).all()):
            print(f"error: non-finite result: {dtype} {precision} {estimator}", file=sys.stderr)
            return 1
    print(f"memcheck case of backend {backend!r} done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
