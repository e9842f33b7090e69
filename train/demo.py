"""The study's primary contrast, small: ``python -m train.demo --out DIR`` (``make demo``).

Softmax against the plan's ECLoss configuration (``ecloss-s3``: full template set, tau
calibrated to score spread 3), trained and evaluated by the study's own runner
(``train.study``, docs/study/PLAN.md): the same network (VGG16-BN at 1/8 width, 112 x 112
input, 14 x 14 maps, 19,307 templates), the same parts world (identity in the brows, eyes,
nose and mouth only), the same evaluation on jittered held-out identities drawn anew per
seed. To fit about 20 minutes on 2 CPU cores (``DEMO_CHANGES``) it trains two seeds
instead of ten, for half the study's epochs (4 of 8: 120 steps); the evaluation is the
study's. ``DIR/report.md`` is the study's kind of report: the gate (scored on the
demo's shorter training), Q1's two co-primary metrics with their paired intervals and
tests (two seeds: wide), every metric beside its nulls, the positive control, the
full-vs-400 cosine, figures. It illustrates the study; the study (docs/study/report.md)
is the evidence.

- ``--budget tiny``: a one-minute smoke test of the same flow.
- ``--scale paper``: the paper's VGG16 at 224 x 224 on a GPU, more identities and epochs.

Runs and evaluations are kept under ``DIR/runs`` and ``DIR/eval``: a second call resumes
an interrupted run and skips what is done.
"""
from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import torch

from train.study import ARMS, BUDGETS as STUDY_BUDGETS, StudyBudget, run_study

__all__ = ["DEMO_ARMS", "DEMO_CHANGES", "BUDGETS", "main"]

_BY_NAME = {arm.name: arm for arm in ARMS}
DEMO_ARMS = (_BY_NAME["softmax"], _BY_NAME["ecloss-s3"])

# What the demo changes in the study's budget, and nothing else.
DEMO_CHANGES = dict(primary_seeds=(0, 1), secondary_seeds=(), epochs=4)

BUDGETS = {
    "default": replace(STUDY_BUDGETS["study"], **DEMO_CHANGES),
    "tiny": replace(STUDY_BUDGETS["tiny"], secondary_seeds=()),
    # One GPU: the paper's VGG16 at 224 x 224 (14 x 14 maps). Not run yet: it needs a GPU.
    "paper": StudyBudget(arch="vgg16", width=1.0, input_size=224, drop_last_pool=False,
                         embedding_dim=512, identities=1000, images_per_identity=40, epochs=20,
                         primary_seeds=(0, 1), secondary_seeds=(), eval_pairs=3000, num_workers=8),
}


def _changes(budget: StudyBudget) -> str:
    study = STUDY_BUDGETS["study"]
    changed = [f"{key} {getattr(budget, key)} (the study: {getattr(study, key)})"
               for key in ("primary_seeds", "epochs", "images_per_identity", "eval_images",
                           "eval_repeats", "eval_pairs", "permutations")
               if getattr(budget, key) != getattr(study, key)]
    return "; ".join(changed)


def notes(budget: StudyBudget) -> list[str]:
    """What the reader of the demo's report must know before its numbers."""
    changes = _changes(budget)
    return [f"**A demo, not the study.** It runs the study's primary contrast with the study's "
            f"network, faces, arms and evaluation, on a smaller budget: {changes or 'none'}. The "
            "gate below is scored on this shorter training, Q1's intervals come from two seeds, "
            "and Q5's branches and the secondary arms are not run: the numbers illustrate what "
            "the study measures; docs/study/report.md (ten seeds, the full budget) is the "
            "evidence."]


def main(argv=None) -> Path:
    from train.study_report import write_report

    parser = argparse.ArgumentParser(prog="python -m train.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo", help="output directory (report.md, figures, runs)")
    parser.add_argument("--budget", choices=["tiny", "default"], default="default")
    parser.add_argument("--scale", choices=["cpu", "paper"], default="cpu",
                        help="'paper': VGG16 at 224 x 224 on a GPU (overrides --budget)")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    if args.scale == "paper" and not torch.cuda.is_available():
        parser.error("--scale paper needs a CUDA GPU (VGG16 at 224 x 224 for hours)")
    name = "paper" if args.scale == "paper" else args.budget
    budget = replace(BUDGETS[name], device=args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = run_study(budget, out, DEMO_ARMS, branches=False)
    path = write_report(budget, out, records, DEMO_ARMS, branches=False, notes=notes(budget),
                        title="ECLoss demo: softmax against the study's ECLoss configuration",
                        command=f"python -m train.demo --budget {name}")
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
