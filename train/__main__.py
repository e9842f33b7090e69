"""``python -m train --config FILE [--resume RUN_DIR_OR_CHECKPOINT] [section.key=value ...]``.

Under ``torchrun --nproc_per_node=N -m train ...`` the same command trains data-parallel.
With ``--resume`` and no ``--config`` the checkpoint's own config is used; overrides still
apply (e.g. ``train.epochs=20`` to extend a finished run). A resumed run goes on to its end:
the ``train.stop_at_step`` that stopped it is not taken from the checkpoint, only from this
command line or ``--config``; nor is ``train.allow_data_change`` (``--allow-data-change``:
resume although the data set changed). ``--print-config`` prints the resolved config and
exits.

Exit status: 0 when done; 2 after a user error (bad key or value, missing file or folder,
unreadable or damaged checkpoint, bad data, a run directory in use, a checkpoint that
cannot be saved, a run that diverged), printed as one ``error: ...`` line before the run
directory is created where it can be found then; 130 or 143 after a run stopped by SIGINT
or SIGTERM (its checkpoint saved).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

import yaml

from train.cli import USER_ERRORS, read_checkpoint, report_user_error
from train.config import Config, check_paths, config_help, config_to_dict, load_config
from train.trainer import fit


def _resolve(args) -> Config:
    """The config of the run, checked; the checkpoint to resume is read here, before anything
    is created."""
    base = state = None
    if args.resume:
        state = read_checkpoint(args.resume, resume=True)
        if args.config is None:
            # The stop step stopped the run being resumed, and a data change was allowed
            # once: neither is a setting of the run.
            base = {**state["config"], "train": {**state["config"]["train"], "stop_at_step": None,
                                                 "allow_data_change": False}}
    config = load_config(args.config, args.overrides, base=base)
    if args.resume:
        config = dataclasses.replace(config, train=dataclasses.replace(config.train,
                                                                       resume=str(args.resume)))
    elif config.train.resume:
        state = read_checkpoint(config.train.resume, resume=True)
    if args.allow_data_change:
        config = dataclasses.replace(config, train=dataclasses.replace(config.train,
                                                                       allow_data_change=True))
    stop_at = config.train.stop_at_step
    if state is not None and stop_at is not None and stop_at <= state["step"]:
        raise ValueError(f"train.stop_at_step={stop_at} is not after the checkpoint's step "
                         f"{state['step']}; give a later step, or none to train to the end")
    return config


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m train", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a VGG face recognition model with ECLoss (see train/trainer.py).",
        epilog="Under torchrun (torchrun --nproc_per_node=N -m train ...) it trains "
               "data-parallel.\nWith --resume and no --config the checkpoint's config is used; "
               "overrides still apply.\nA resumed run trains to its end unless "
               "train.stop_at_step is given again.\nExit status 2 after a user error "
               "(printed as 'error: ...'), 130/143 when SIGINT/SIGTERM stopped the run "
               "(checkpoint saved).\n\nconfig keys (section.key=value, values in YAML): "
               "key, default, (type)\n" + config_help())
    parser.add_argument("--config", help="YAML or Python config file (train/configs/ has examples)")
    parser.add_argument("--resume", help="a run directory or a checkpoint file to continue")
    parser.add_argument("--allow-data-change", action="store_true",
                        help="resume although the data set differs from the checkpoint's "
                             "(image count or sample list; the classes must stay)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (defaults, checkpoint, file, overrides) "
                             "as YAML and exit")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="e.g. model.arch=vgg13 optim.lr=0.1 train.amp=bf16")
    args = parser.parse_args(argv)
    try:
        config = _resolve(args)
        if args.print_config:
            print(yaml.safe_dump(config_to_dict(config), sort_keys=False), end="")
            return 0
        check_paths(config)
        trainer = fit(config)
    except USER_ERRORS as error:
        return report_user_error(error)
    if trainer.ctx.is_main:
        print(trainer.run_dir)
    return 128 + trainer.stopped_by if trainer.stopped_by is not None else 0


if __name__ == "__main__":
    sys.exit(main())
