"""``python -m train --config FILE [--resume RUN_DIR_OR_CHECKPOINT] [section.key=value ...]``.

Under ``torchrun --nproc_per_node=N -m train ...`` the same command trains data-parallel.
With ``--resume`` and no ``--config`` the checkpoint's own config is used; overrides still
apply (e.g. ``train.epochs=20`` to extend a finished run). Exit status 130 or 143 after a
run stopped by SIGINT or SIGTERM (its checkpoint saved).
"""
from __future__ import annotations

import argparse
import sys

from train.checkpoint import load_checkpoint
from train.config import load_config
from train.trainer import fit


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m train", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a VGG face recognition model with ECLoss (see train/trainer.py).",
        epilog="Under torchrun (torchrun --nproc_per_node=N -m train ...) it trains "
               "data-parallel.\nWith --resume and no --config the checkpoint's config is used; "
               "overrides still apply.\nExit status 130/143 when SIGINT/SIGTERM stopped the run "
               "(checkpoint saved).")
    parser.add_argument("--config", help="YAML or Python config file (train/configs/ has examples)")
    parser.add_argument("--resume", help="a run directory or a checkpoint file to continue")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="e.g. model.arch=vgg13 optim.lr=0.1 train.amp=bf16")
    args = parser.parse_args(argv)
    overrides = list(args.overrides)
    base = None
    if args.resume:
        base = load_checkpoint(args.resume)["config"] if args.config is None else None
        overrides.append(f"train.resume={args.resume}")
    config = load_config(args.config, overrides, base=base)
    trainer = fit(config)
    if trainer.ctx.is_main:
        print(trainer.run_dir)
    return 128 + trainer.stopped_by if trainer.stopped_by is not None else 0


if __name__ == "__main__":
    sys.exit(main())
