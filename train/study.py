"""The explainability study of docs/study/PLAN.md: ``python -m train.study --out DIR``.

Trains every arm of the plan over its seeds on the same synthetic faces (the parts world:
identity lives in the brows, eyes, nose and mouth only), evaluates each run on jittered
held-out identities drawn anew per seed, scores the gate on the softmax run of the first
seed, runs Q5's full-vs-400 branches when the logged gradient cosine asks for them,
measures the cosine at 28x28 maps (train/study_cosine.py), and writes ``DIR/report.md``,
``DIR/records.json`` and ``DIR/figures/`` (train/study_report.py): the plan's questions
answered with paired differences over seeds, 95% t-intervals, paired t-tests and Holm's
correction per family, every metric beside its null, the positive control and the cosines.
Runs and evaluations are kept under ``DIR/runs`` and ``DIR/eval``; the same command
resumes an interrupted study and skips what is done. Runs go in the plan's order: the
primary arms seed by seed, then the secondary arms, so a study cut short has answered the
primary question first.

``--report-only`` writes the report from the runs evaluated so far (a study still running
reports where it stands); ``--cosine-28`` measures the 28x28 cosine into
``DIR/cosine28.json`` and reports, training nothing. ``--budget study`` (the default) is
the plan's; ``--budget tiny``: a smoke test of the whole flow in a few minutes.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

__all__ = ["Arm", "Branch", "StudyBudget", "ARMS", "BRANCHES", "BRANCH_SOURCE", "PRIMARY",
           "SECONDARY", "METRICS", "BUDGETS", "arm_config", "branch_config", "branch_epoch",
           "steps_per_epoch", "study_jobs", "eval_settings", "run_study", "collect_records",
           "render_training_set", "training_set_path", "second_half_cosines", "median_cosine",
           "branches_due", "summarise", "paired_test", "holm", "main"]


@dataclass(frozen=True)
class Arm:
    """One training configuration: ``ecloss`` is ``None`` (softmax only) or the overrides of
    the config's ``ecloss`` section; ``primary`` arms run the budget's primary seeds, the
    others its secondary seeds (docs/study/PLAN.md)."""

    name: str
    label: str
    ecloss: dict | None
    primary: bool = False


_S3 = dict(tau="auto", templates="full", estimator="uniform", score_spread=3.0)

# docs/study/PLAN.md, "Arms": the primary contrast first, then the secondary arms.
ARMS = (
    Arm("softmax", "softmax", None, primary=True),
    Arm("ecloss-s3", "ECLoss, full set, score spread 3", _S3, primary=True),
    Arm("ecloss-s1", "ECLoss, score spread 1", {**_S3, "score_spread": 1.0}),
    Arm("ecloss-s10", "ECLoss, score spread 10", {**_S3, "score_spread": 10.0}),
    Arm("ecloss-s3-diversity", "ECLoss, spread 3, diversity 1", {**_S3, "diversity": 1.0}),
    Arm("ecloss-s3-marginal", "ECLoss, spread 3, marginal estimator", {**_S3, "estimator": "marginal"}),
)

# (metric key in metrics.json, label): Q1's co-primary metrics, Holm over the two.
PRIMARY = ("ecloss-s3", "softmax", (("confident_parts", "distinct confident parts"),
                                    ("mean_normalized_gain", "mean normalised gain")))
# (arm, baseline, question): the secondary family, Holm over these tests (and Q5's, when
# the cosine rule asks for it), on the mean normalised gain.
SECONDARY = (
    ("ecloss-s1", "ecloss-s3", "Q2: score spread 1 instead of 3"),
    ("ecloss-s10", "ecloss-s3", "Q2: score spread 10 instead of 3"),
    ("ecloss-s3-diversity", "ecloss-s3", "Q3: the diversity term (lambda = 1)"),
    ("ecloss-s3-marginal", "ecloss-s3", "Q4: the marginal estimator instead of the uniform one"),
)
SECONDARY_METRIC = ("mean_normalized_gain", "mean normalised gain")
# Q5's rule: the two template sets are interchangeable where the median logged cosine over
# the second half of training is at least this.
COSINE_THRESHOLD = 0.95

# (key in metrics.json, label, scale for display, higher is better?)
METRICS = (
    # Size-fair tracking (docs/design.md 7.2), on the first draw of each evaluation.
    ("confident_parts", "confident parts (of 8)", 1.0, True),
    ("mean_normalized_gain", "mean normalised gain", 1.0, True),
    ("confident_fraction", "confident channels", 1.0, True),
    ("erasure_drop_confident", "erasure drop, confident", 1.0, True),
    ("pei", "PEI", 1.0, True),
    ("location_consistency", "location consistency", 1.0, True),
    ("activation_robustness", "peaks per map", 1.0, False),
    ("dead_fraction", "dead maps", 1.0, False),
    ("verification", "verification (%)", 100.0, True),
)
# PEI and location consistency are shown beside their nulls (docs/design.md 7.1): per arm
# both; in the paired differences the mismatched masks only (the best fixed cone does not
# depend on the network, so its paired difference is 0).
NULLS = (("null_mismatched", "mismatched masks"), ("null_best_cone", "best fixed cone"))


@dataclass(frozen=True)
class StudyBudget:
    """Everything the study fixes for every arm; printed in the report."""

    arch: str = "vgg16"
    width: float = 0.125
    input_size: int = 112
    drop_last_pool: bool = True  # 14 x 14 target maps at 112 x 112 input
    embedding_dim: int = 128
    identities: int = 60
    images_per_identity: int = 32
    jitter: bool = True  # pose-jittered training faces: the paper trains without alignment
    identity: str = "parts"  # where identity lives in the faces (train.data.synthetic)
    epochs: int = 8
    batch_size: int = 64
    lr: float = 0.03
    grad_ratio: float = 0.25  # ECLoss gradient / classification gradient at the target conv
    subset_cosine_every: int = 10  # steps between full-vs-400 gradient cosines (ECLoss arms)
    primary_seeds: tuple[int, ...] = tuple(range(10))
    secondary_seeds: tuple[int, ...] = tuple(range(5))
    faces_seed_offset: int = 1000  # held-out faces of training seed s: seed offset + s
    eval_images: int = 100
    eval_repeats: int = 5
    eval_pairs: int = 1000
    permutations: int = 200
    # Held-out faces evaluated (EVAL_DATA's names); the figures come from the first, the
    # paired differences from the last.
    eval_data: tuple[str, ...] = ("jittered",)
    num_workers: int = 1
    device: str = "auto"
    extra: dict = field(default_factory=dict)

    def seeds(self, arm: Arm) -> tuple[int, ...]:
        return self.primary_seeds if arm.primary else self.secondary_seeds


# The evaluation's data sets: held-out identities of the synthetic faces, as drawn (aligned)
# and with the pose jitter of unaligned detector crops.
EVAL_DATA = {"aligned": "synthetic", "jittered": "synthetic_jitter"}

BUDGETS = {
    "study": StudyBudget(),
    "tiny": StudyBudget(arch="vgg13", width=0.0625, input_size=64, drop_last_pool=True,
                        embedding_dim=32, identities=6, images_per_identity=4, epochs=1,
                        batch_size=8, subset_cosine_every=1, primary_seeds=(0, 1),
                        secondary_seeds=(0, 1), eval_images=12, eval_repeats=2,
                        eval_pairs=40, permutations=20, num_workers=0),
}


def arm_config(budget: StudyBudget, arm: Arm, seed: int, runs_dir: Path, rec_path: Path):
    """The trainer's config of one arm and seed, training on the faces stored at ``rec_path``."""
    from train.config import config_from_dict

    steps_per_epoch = max(1, budget.identities * budget.images_per_identity // budget.batch_size)
    ecloss = dict(enabled=arm.ecloss is not None, templates="full", estimator="uniform")
    ecloss.update(arm.ecloss or {})
    # ECLoss arms log the full-vs-400 gradient cosine (a diagnostic: training is the same
    # without it), docs/study/PLAN.md's Q5 rule.
    cosine_every = budget.subset_cosine_every if arm.ecloss is not None else 0
    return config_from_dict(dict(
        model=dict(arch=budget.arch, batch_norm=True, width=budget.width,
                   input_size=budget.input_size, drop_last_pool=budget.drop_last_pool,
                   embedding_dim=budget.embedding_dim),
        head=dict(kind="softmax"),
        ecloss=ecloss,
        # The same rule for every arm: beta keeps the ECLoss gradient at the target conv at
        # grad_ratio times the classification gradient, so arms differ in direction only.
        # It starts at 1 rather than the paper's 1e-5 and adapts fast (every 5 steps, at most
        # 10x per measurement, half-way in log space), or a run of ~75 steps would end before
        # beta got anywhere near its target.
        beta=dict(schedule="auto", grad_ratio=budget.grad_ratio, value=1.0, update_every=5,
                  ema=0.5, max_growth=10.0),
        # identity: the world of the held-out faces the evaluation draws.
        data=dict(source="recordio", path=str(rec_path), num_workers=budget.num_workers,
                  identity=budget.identity),
        optim=dict(name="sgd", lr=budget.lr, warmup_epochs=min(1.0, budget.epochs / 4)),
        train=dict(epochs=budget.epochs, batch_size=budget.batch_size, device=budget.device,
                   seed=seed, output_dir=str(runs_dir), run_name=f"{arm.name}-seed{seed}",
                   tensorboard=False, progress=False, log_every=max(1, min(10, steps_per_epoch)),
                   # Every epoch's checkpoint is kept: Q5's branches start from one.
                   checkpoint_every=steps_per_epoch, keep_checkpoints=budget.epochs,
                   subset_cosine_every=cosine_every),
        **budget.extra,
    ))


def _train_or_resume(config) -> Path | None:
    from train.trainer import fit

    run_dir = Path(config.train.output_dir) / config.train.run_name
    if (run_dir / "checkpoints" / "last.pt").is_file():
        config.train.resume = str(run_dir)
    trainer = fit(config)
    return None if trainer.stopped_by is not None else Path(trainer.run_dir)


def _scalar(value) -> float:
    """A metric of metrics.json as one number: its mean when it comes with an error."""
    if isinstance(value, dict):
        return float(value["mean"] if "mean" in value else value["accuracy"])
    return float(value)


def _last_logged(run_dir: Path) -> dict:
    import csv

    with open(run_dir / "log.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    return rows[-1] if rows else {}


def render_training_set(identities: int, images_per_identity: int, size: int, rec_path: Path,
                        jitter: bool = False, identity: str = "parts") -> None:
    """Draw the synthetic training faces once and store them as PNGs in RecordIO."""
    from train.data.recordio import write_recordio
    from train.data.synthetic import SyntheticFaces

    if rec_path.is_file() and rec_path.with_suffix(".idx").is_file():
        return
    faces = SyntheticFaces(identities, images_per_identity, size=size, seed=0, jitter=jitter,
                           identity=identity)

    def encoded():
        for index in tqdm(range(len(faces)), desc="draw training faces"):
            buffer = io.BytesIO()
            Image.fromarray(faces.raw_image(index)).save(buffer, format="PNG")
            yield faces.label(index), buffer.getvalue()

    rec_path.parent.mkdir(parents=True, exist_ok=True)
    partial = rec_path.with_name(rec_path.stem + ".partial.rec")
    write_recordio(partial, partial.with_suffix(".idx"), encoded())
    partial.with_suffix(".idx").replace(rec_path.with_suffix(".idx"))
    partial.replace(rec_path)


def training_set_path(budget: StudyBudget, out: Path) -> Path:
    """Where the training faces of ``budget`` are stored under ``out``: named by their
    world, so that a study of one world never trains on the faces of another."""
    return out / "data" / f"train-{budget.identity}.rec"


def study_jobs(budget: StudyBudget, arms=ARMS) -> list[tuple[Arm, int]]:
    """The runs in the plan's order: the primary arms seed by seed, then the secondary ones."""
    primary = [(arm, seed) for seed in budget.primary_seeds for arm in arms if arm.primary]
    secondary = [(arm, seed) for seed in budget.secondary_seeds for arm in arms
                 if not arm.primary]
    return primary + secondary


def eval_settings(budget: StudyBudget, seed: int):
    """The evaluation of a run of training seed ``seed``: its own draw of held-out faces
    (``faces_seed_offset + seed``) and of images and shuffles (``seed``)."""
    from train.evaluate import EvalSettings

    return EvalSettings(images=budget.eval_images, repeats=budget.eval_repeats,
                        pairs=budget.eval_pairs, permutations=budget.permutations, seed=seed,
                        faces_seed=budget.faces_seed_offset + seed, figure_channels=6,
                        figure_faces=6)


def _logged_cosines(run_dir: Path) -> list[tuple[int, float]]:
    """``(step, subset_cosine)`` of every logged row that has one."""
    import csv

    with open(run_dir / "log.csv", newline="") as handle:
        return [(int(row["step"]), float(row["subset_cosine"])) for row in csv.DictReader(handle)
                if row.get("subset_cosine") not in (None, "")]


# ---------------------------------------------------------------- Q5's branches


@dataclass(frozen=True)
class Branch:
    """A continuation of the ``BRANCH_SOURCE`` run of a seed from its checkpoint after
    ``branch_epoch(budget)`` epochs (docs/study/PLAN.md, Q5): with ``templates``, and the
    data order of seed ``seed + data_order_offset`` (0: the run's own order)."""

    name: str
    label: str
    templates: str | int
    data_order_offset: int


BRANCH_SOURCE = "ecloss-s3"
# B, the one tested against the run itself (A); A', the noise floor A - A' beside it.
BRANCHES = (
    Branch("ecloss-s3-branch400", "B: 400 templates, the same data order", 400, 0),
    Branch("ecloss-s3-reordered", "A': full set, data order seed + 100", "full", 100),
)


def steps_per_epoch(budget: StudyBudget) -> int:
    """Optimiser steps per epoch of every run of ``budget`` (one process)."""
    return max(1, budget.identities * budget.images_per_identity // budget.batch_size)


def branch_epoch(budget: StudyBudget) -> int:
    """The epoch after which Q5's branches start: half of training (epoch 4 of 8)."""
    return budget.epochs // 2


def branch_config(budget: StudyBudget, branch: Branch, seed: int, runs_dir: Path, rec_path: Path):
    """The trainer's config of ``branch`` for ``seed``: the source arm's own config with the
    branch's templates and data order, started from the source run's checkpoint."""
    from train.config import config_from_dict, config_to_dict

    source = next(arm for arm in ARMS if arm.name == BRANCH_SOURCE)
    values = config_to_dict(arm_config(budget, source, seed, runs_dir, rec_path))
    step = branch_epoch(budget) * steps_per_epoch(budget)
    if step < 1:
        raise ValueError(f"Q5's branches start after epoch {branch_epoch(budget)} of "
                         f"{budget.epochs}: the budget needs at least 2 epochs")
    values["ecloss"]["templates"] = branch.templates
    values["train"].update(run_name=f"{branch.name}-seed{seed}",
                           branch_from=f"{runs_dir / f'{BRANCH_SOURCE}-seed{seed}'}:{step}")
    if branch.data_order_offset:
        values["train"]["data_order_seed"] = seed + branch.data_order_offset
    return config_from_dict(values)


def second_half_cosines(budget: StudyBudget, record: dict) -> list[float]:
    """The run's logged ``subset_cosine`` values measured in the second half of training.

    The trainer measures on the batch of every ``subset_cosine_every``-th step (steps 1,
    11, 21, ... counted from 1) and logs it in the next row (steps 10, 20, 30, ...), so
    the rows of steps ``total/2 + 1 .. total`` (121-240 of 240) hold exactly the
    measurements taken in the second half (steps 121, 131, ..., 231): Q5's rule."""
    total = budget.epochs * steps_per_epoch(budget)
    return [value for step, value in record["subset_cosine"] if total // 2 < step <= total]


def median_cosine(budget: StudyBudget, records: dict, arm: str) -> tuple[float, int, int]:
    """Q5's rule statistic of ``arm``: the median of its second-half cosines over all its
    seeds, with the number of values and of seeds; NaN when it has none."""
    runs = records.get(arm, {})
    values = [v for record in runs.values() for v in second_half_cosines(budget, record)]
    return (float(np.median(values)) if values else math.nan), len(values), len(runs)


def branches_due(budget: StudyBudget, records: dict) -> bool:
    """Q5's trigger: the primary ECLoss arm's median cosine below ``COSINE_THRESHOLD``."""
    median, _, _ = median_cosine(budget, records, BRANCH_SOURCE)
    return median < COSINE_THRESHOLD


# ---------------------------------------------------------------- runs and records


def _record(eval_dir: Path) -> dict:
    """What the report needs of one evaluated run, read from its evaluation and its log."""
    result = json.loads((eval_dir / "metrics.json").read_text())
    # The run beside its evaluation (the same name under DIR/runs), wherever the study ran
    # from: metrics.json holds the path as the runner was given it, maybe relative.
    run_dir = eval_dir.parent.parent / "runs" / eval_dir.name
    run_dir = run_dir if run_dir.is_dir() else Path(result["run_dir"])
    seconds_path = eval_dir / "wall_seconds.txt"
    return dict(metrics=result["datasets"], last_step=_last_logged(run_dir),
                subset_cosine=_logged_cosines(run_dir),
                calibrated_tau=result["run"]["ecloss"].get("calibrated_tau"),
                run_dir=str(run_dir), eval_dir=str(eval_dir),
                seconds=float(seconds_path.read_text()) if seconds_path.is_file() else math.nan)


def _train_and_evaluate(budget: StudyBudget, config, seed: int, eval_dir: Path, device: str) -> None:
    """Train (or resume) one run and evaluate it into ``eval_dir``, with its wall time."""
    from train.evaluate import evaluate_checkpoint

    start = time.time()
    run_dir = _train_or_resume(config)
    if run_dir is None:
        raise SystemExit(f"stopped; run the same command again to resume from {eval_dir.parent.parent}")
    evaluate_checkpoint(run_dir, eval_dir, {name: EVAL_DATA[name] for name in budget.eval_data},
                        eval_settings(budget, seed), device)
    # Training and evaluation of this run only (a resumed run: since the resume).
    (eval_dir / "wall_seconds.txt").write_text(f"{time.time() - start:.1f}\n")


def _branch_jobs(budget: StudyBudget) -> list[tuple[Branch, int]]:
    return [(branch, seed) for seed in budget.secondary_seeds for branch in BRANCHES]


def collect_records(budget: StudyBudget, out: Path, arms=ARMS) -> dict:
    """``{arm or branch: {seed: record}}`` of every run of the plan evaluated under ``out``
    so far, without training anything (a study still running reports where it stands)."""
    records: dict = {arm.name: {} for arm in arms}
    jobs = [(arm.name, seed) for arm, seed in study_jobs(budget, arms)]
    jobs += [(branch.name, seed) for branch, seed in _branch_jobs(budget)]
    for name, seed in jobs:
        eval_dir = out / "eval" / f"{name}-seed{seed}"
        if (eval_dir / "metrics.json").is_file():
            records.setdefault(name, {})[seed] = _record(eval_dir)
    return records


def run_study(budget: StudyBudget, out: Path, arms=ARMS, branches: bool = True) -> dict:
    """Train and evaluate every arm and seed (resuming what exists); ``{arm: {seed: record}}``.

    After the first primary seed's softmax run, the gate (``train.gate``) is scored on that
    very run, into ``out/gate.json``. With ``branches``, after every planned run, Q5's
    branches (``BRANCHES``, secondary seeds) when the primary ECLoss arm's median cosine
    asks for them (:func:`branches_due`); their records are under the branches' names.
    """
    from train.gate import run_gate

    device = budget.device if budget.device != "auto" else (
        "cuda" if torch.cuda.is_available() else "cpu")
    # Drawn once (drawing a face costs far more than decoding it), the same for every run.
    rec_path = training_set_path(budget, out)
    render_training_set(budget.identities, budget.images_per_identity, budget.input_size,
                        rec_path, jitter=budget.jitter, identity=budget.identity)
    records: dict = {arm.name: {} for arm in arms}
    for arm, seed in tqdm(study_jobs(budget, arms), desc="study runs", unit="run"):
        eval_dir = out / "eval" / f"{arm.name}-seed{seed}"
        if not (eval_dir / "metrics.json").is_file():
            _train_and_evaluate(budget, arm_config(budget, arm, seed, out / "runs", rec_path),
                                seed, eval_dir, device)
        records[arm.name][seed] = _record(eval_dir)
        if arm.ecloss is None and seed == budget.primary_seeds[0] and budget.identity == "parts" \
                and not (out / "gate.json").is_file():
            # The study's own softmax run, trained already: run_gate resumes it, finished,
            # and writes out/gate.json.
            run_gate(replace(budget, device=device), out, seed=seed)
    if branches and BRANCH_SOURCE in records and branches_due(budget, records):
        for branch, seed in tqdm(_branch_jobs(budget), desc="Q5 branches", unit="run"):
            eval_dir = out / "eval" / f"{branch.name}-seed{seed}"
            if not (eval_dir / "metrics.json").is_file():
                _train_and_evaluate(budget, branch_config(budget, branch, seed, out / "runs", rec_path),
                                    seed, eval_dir, device)
            records.setdefault(branch.name, {})[seed] = _record(eval_dir)
    return records


# ---------------------------------------------------------------- statistics


def summarise(values: np.ndarray) -> tuple[float, float]:
    """Mean and standard error over seeds (ddof 1); the error is NaN for one seed."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        return (float(values.mean()) if len(values) else math.nan), math.nan
    return float(values.mean()), float(values.std(ddof=1) / math.sqrt(len(values)))


def paired_test(a, b) -> tuple[float, float, float, float]:
    """``(mean, low, high, p)``: the mean of ``a - b`` over seeds, its 95% t-interval and
    the two-sided paired t-test's p-value (``scipy.stats.ttest_rel``).

    Fewer than two seeds: the mean alone (NaN elsewhere). Every difference equal: the
    interval is that value and p is 1 when it is 0 (no seed differs), 0 otherwise.
    """
    from scipy import stats

    difference = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    mean, se = summarise(difference)
    if math.isnan(se):
        return mean, math.nan, math.nan, math.nan
    if se == 0:
        return mean, mean, mean, 1.0 if mean == 0 else 0.0
    degrees = len(difference) - 1
    half = float(stats.t.ppf(0.975, degrees)) * se
    p = 2 * float(stats.t.sf(abs(mean / se), degrees))
    return mean, mean - half, mean + half, p


def holm(pvalues) -> np.ndarray:
    """Holm's step-down adjusted p-values, in the order given.

    Sorted ascending, the ``i``-th (from 0) of ``m`` becomes ``(m - i) p``, made
    non-decreasing along the order and capped at 1; a test is resolved at family-wise
    level ``alpha`` when its adjusted p is below ``alpha``. A NaN p (a test that could not
    be made yet) stays NaN and still counts in ``m``, so the others are adjusted as if it
    were the largest.
    """
    p = np.asarray(pvalues, dtype=np.float64)
    if p.ndim != 1:
        raise ValueError(f"pvalues must be one-dimensional, got shape {p.shape}")
    finite = ~np.isnan(p)
    if ((p[finite] < 0) | (p[finite] > 1)).any():
        raise ValueError(f"p-values must lie in [0, 1], got {p.tolist()}")
    adjusted = np.full(len(p), math.nan)
    order = np.flatnonzero(finite)[np.argsort(p[finite], kind="stable")]
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (len(p) - rank) * p[index]))
        adjusted[index] = running
    return adjusted


# ---------------------------------------------------------------- the command


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m train.study", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/study", help="output directory")
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="study")
    parser.add_argument("--arms", nargs="+", choices=[arm.name for arm in ARMS],
                        help="a subset of the arms (softmax is always included)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--report-only", action="store_true",
                        help="write the report from the runs evaluated so far; train nothing")
    parser.add_argument("--cosine-28", action="store_true",
                        help="measure Q5's 28x28 cosine (DIR/cosine28.json) and report; train nothing")
    parser.add_argument("--cosine-images", type=int, default=None,
                        help="held-out faces per seed of the 28x28 measurement (default: "
                             "train.study_cosine.IMAGES)")
    args = parser.parse_args(argv)
    budget = replace(BUDGETS[args.budget], device=args.device)
    arms = ARMS if not args.arms else tuple(
        arm for arm in ARMS if arm.name == "softmax" or arm.name in args.arms)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.cosine_28:
        from train.study_cosine import IMAGES, measure_cosine28

        images = IMAGES if args.cosine_images is None else args.cosine_images
        if images < 1:
            parser.error(f"--cosine-images must be at least 1, got {images}")
        measure_cosine28(budget, out, images=images)
    if args.report_only or args.cosine_28:
        records = collect_records(budget, out, arms)
    else:
        records = run_study(budget, out, arms)
        from train.study_cosine import measure_cosine28, measured_seeds

        evaluated = [seed for seed in budget.secondary_seeds if seed in records.get(BRANCH_SOURCE, {})]
        if evaluated and measured_seeds(out) != evaluated:
            measure_cosine28(budget, out)
    from train.study_report import write_report

    path = write_report(budget, out, records, arms, command=f"python -m train.study --budget {args.budget}")
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
