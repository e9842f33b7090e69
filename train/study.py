"""The explainability study of docs/study/PLAN.md: ``python -m train.study --out DIR``.

Trains every arm of the plan over its seeds on the same synthetic faces (the parts world:
identity lives in the brows, eyes, nose and mouth only), evaluates each run on jittered
held-out identities drawn anew per seed, scores the gate on the softmax run of the first
seed, and writes ``DIR/report.md`` and ``DIR/records.json``: the plan's questions answered
with paired differences over seeds, 95% t-intervals, paired t-tests and Holm's correction
per family, every metric beside its null, the positive control and the full-vs-400
gradient cosine. Runs and evaluations are kept under ``DIR/runs`` and ``DIR/eval``; the
same command resumes an interrupted study and skips what is done. Runs go in the plan's
order: the primary arms seed by seed, then the secondary arms, so a study cut short has
answered the primary question first.

``--budget study`` (the default) is the plan's; ``--budget tiny``: a smoke test of the whole
flow in a few minutes.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

__all__ = ["Arm", "StudyBudget", "ARMS", "PRIMARY", "SECONDARY", "BUDGETS", "arm_config",
           "study_jobs", "run_study", "render_training_set", "training_set_path", "summarise",
           "paired_difference", "paired_test", "holm", "report_markdown", "figures_markdown",
           "main"]


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


def run_study(budget: StudyBudget, out: Path, arms=ARMS) -> dict:
    """Train and evaluate every arm and seed (resuming what exists); ``{arm: {seed: record}}``.

    After the first primary seed's softmax run, the gate (``train.gate``) is scored on that
    very run, into ``out/gate.json``.
    """
    from train.evaluate import evaluate_checkpoint
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
        metrics_path = eval_dir / "metrics.json"
        seconds_path = eval_dir / "wall_seconds.txt"
        if not metrics_path.is_file():
            start = time.time()
            config = arm_config(budget, arm, seed, out / "runs", rec_path)
            run_dir = _train_or_resume(config)
            if run_dir is None:
                raise SystemExit(f"stopped; run the same command again to resume from {out}")
            evaluate_checkpoint(run_dir, eval_dir, {name: EVAL_DATA[name] for name in budget.eval_data},
                                eval_settings(budget, seed), device)
            # Training and evaluation of this run only (a resumed run: since the resume).
            seconds_path.write_text(f"{time.time() - start:.1f}\n")
        result = json.loads(metrics_path.read_text())
        run_dir = Path(result["run_dir"])
        records[arm.name][seed] = dict(metrics=result["datasets"],
                                       last_step=_last_logged(run_dir),
                                       subset_cosine=_logged_cosines(run_dir),
                                       calibrated_tau=result["run"]["ecloss"].get("calibrated_tau"),
                                       run_dir=str(run_dir), eval_dir=str(eval_dir),
                                       seconds=float(seconds_path.read_text())
                                       if seconds_path.is_file() else math.nan)
        if arm.ecloss is None and seed == budget.primary_seeds[0] and budget.identity == "parts" \
                and not (out / "gate.json").is_file():
            # The study's own softmax run, trained already: run_gate resumes it, finished,
            # and writes out/gate.json.
            run_gate(replace(budget, device=device), out, seed=seed)
    return records


def _values(records, arm, dataset, metric, seeds):
    """The metric of each seed's evaluation; NaN where the evaluation lacks it (written
    before the metric existed, or skipped there)."""
    return np.array([_scalar(records[arm][seed]["metrics"][dataset].get(metric, math.nan))
                     for seed in seeds])


def _nulls_beside(records, arm, dataset, metric, seeds) -> str:
    """`` (nulls: mismatched masks x, best fixed cone y)``, their means over seeds, for PEI
    and location consistency; empty for the other metrics."""
    if metric not in ("pei", "location_consistency"):
        return ""
    means = [f"{name} {summarise(_values(records, arm, dataset, f'{metric}_{key}', seeds))[0]:.4g}"
             for key, name in NULLS]
    return f" (nulls: {', '.join(means)})"


def _t_quantile(degrees: int) -> float:
    from scipy import stats

    return float(stats.t.ppf(0.975, degrees))


def summarise(values: np.ndarray) -> tuple[float, float]:
    """Mean and standard error over seeds (ddof 1)."""
    if len(values) < 2:
        return float(values.mean()), math.nan
    return float(values.mean()), float(values.std(ddof=1) / math.sqrt(len(values)))


def paired_difference(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
    """Mean of ``a - b`` over seeds with its 95% t-interval ``(low, high)``."""
    difference = a - b
    mean, se = summarise(difference)
    if math.isnan(se):
        return mean, math.nan, math.nan
    half = _t_quantile(len(difference) - 1) * se
    return mean, mean - half, mean + half


def _verdict(low: float, high: float, higher_is_better: bool) -> str:
    if math.isnan(low):
        return "one seed: no interval"
    if low == high == 0:
        return "no difference in any seed"
    if low > 0 or high < 0:
        better = (low > 0) == higher_is_better
        return "resolved: " + ("better" if better else "worse")
    return "not resolved (interval spans 0)"


def _diagnostics_cell(record) -> str:
    row = record["last_step"]
    keys = ("mi_over_log_n", "max_p", "score_std")
    if not all(key in row and row[key] not in ("", None) for key in keys):
        return "–"
    cell = " / ".join(f"{float(row[key]):.3g}" for key in keys)
    tau = record.get("calibrated_tau")
    return cell if tau is None else f"{cell} (tau {tau:.3g})"


# The evaluation's figures shown per arm (one seed), with their captions.
FIGURES = (
    ("top_activation", "Each channel's strongest image (Figure 6 of the paper), distinct identities"),
    ("channel_parts", "Per channel: its dominant part and where its peaks land"),
    ("part_assignment", "Which part each channel's peaks fall in"),
    ("peak_histogram", "Peaks per map"),
)


def figures_markdown(records: dict, arms, out: Path, seed: int, dataset: str) -> list[str]:
    """The figures of one seed's evaluation of every arm, copied to ``out/figures`` and shown
    side by side (top activations also pasted into one picture); the training curves."""
    from train.report import side_by_side, training_curves

    figures = out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    lines = [f"## Figures (seed {seed}; maps of the {dataset} held-out faces)", ""]
    runs = [(arm, records[arm.name][seed]) for arm in arms if seed in records[arm.name]]
    if training_curves([(arm.label, Path(record["run_dir"])) for arm, record in runs],
                       figures / "training_curves.png"):
        lines += ["![training curves](figures/training_curves.png)", ""]
    drawn = {arm.name: json.loads((Path(record["eval_dir"]) / "metrics.json").read_text())
             .get("figures", {}) for arm, record in runs}
    for key, caption in FIGURES:
        cells = [(arm, Path(record["eval_dir"]) / drawn[arm.name][key]) for arm, record in runs
                 if key in drawn[arm.name]]
        cells = [(arm, path) for arm, path in cells if path.is_file()]
        if not cells:
            continue
        lines += [f"### {caption}", ""]
        if key == "top_activation" and len(cells) > 1:
            combined = figures / "top_activation_side_by_side.png"
            side_by_side([path for _, path in cells], combined)
            lines += ["Left to right: " + ", ".join(arm.label for arm, _ in cells) + ".", "",
                      f"![top activations](figures/{combined.name})", ""]
            continue
        links = []
        for arm, path in cells:
            shutil.copyfile(path, figures / f"{arm.name}-{path.name}")
            links.append(f"![{arm.label}](figures/{arm.name}-{path.name})")
        lines += ["| " + " | ".join(arm.label for arm, _ in cells) + " |",
                  "|---" * len(cells) + "|", "| " + " | ".join(links) + " |", ""]
    return lines


def report_markdown(budget: StudyBudget, records: dict, arms=ARMS,
                    title: str = "ECLoss explainability study",
                    command: str = "python -m train.study") -> str:
    seeds = list(budget.seeds)
    labels = {arm.name: arm.label for arm in arms}
    seconds = sum(record["seconds"] for arm in arms for record in records[arm.name].values())
    lines = [
        f"# {title}",
        "",
        f"`{command}` on {'a GPU' if torch.cuda.is_available() else 'a CPU'} "
        f"(torch {torch.__version__}), {seconds / 60:.0f} minutes of training and evaluation "
        f"(the sum over the runs; data drawing excluded). {len(arms)} arms x "
        f"{len(seeds)} seeds (training seeds {seeds}); every arm trains the same network on the "
        "same synthetic faces; evaluation is on identities no run saw "
        f"({' and '.join(budget.eval_data)} faces).",
        "Values are the mean ± standard error over seeds (not over images of one model); "
        "differences are paired by seed with a 95% t-interval.",
        "",
        "| setting | value |", "|---|---|",
    ]
    lines += [f"| {key} | {value} |" for key, value in asdict(budget).items() if key != "extra"]
    compared = budget.eval_data[-1]
    for dataset in budget.eval_data:
        lines += ["", f"## Per arm ({dataset} faces)", "",
                  "| arm | " + " | ".join(label for _, label, _, _ in METRICS) + " |",
                  "|---|" + "---|" * len(METRICS)]
        for arm in arms:
            cells = []
            for key, _, scale, _ in METRICS:
                mean, se = summarise(_values(records, arm.name, dataset, key, seeds) * scale)
                cells.append(f"{mean:.4g} ± {se:.2g}" + _nulls_beside(records, arm.name, dataset, key, seeds))
            lines.append(f"| {arm.label} | " + " | ".join(cells) + " |")
    lines += ["", "## Diagnostics at each run's last logged step", "",
              "MI / log N, mean max p, score std (docs/design.md, section 8.4), and the calibrated "
              "tau where the arm calibrates it; '–' where the run logged none.", "",
              "| arm | seed " + " | seed ".join(map(str, seeds)) + " |",
              "|---|" + "---|" * len(seeds)]
    for arm in arms[1:]:
        lines.append(f"| {arm.label} | " + " | ".join(
            _diagnostics_cell(records[arm.name][seed]) for seed in seeds) + " |")
    for baseline, title in (("softmax", "Paired difference from softmax (same seed)"),):
        lines += ["", f"## {title}, {compared} faces", "",
                  "| arm | metric | difference [95% interval] | paper's VGG16 | verdict |",
                  "|---|---|---|---|---|"]
        for arm in arms:
            if arm.name == baseline:
                continue
            for key, label, scale, higher in METRICS:
                mean, low, high = paired_difference(
                    _values(records, arm.name, compared, key, seeds) * scale,
                    _values(records, baseline, compared, key, seeds) * scale)
                paper = PAPER_DIFFERENCES.get(key)
                lines.append(f"| {arm.label} | {label} | {mean:+.4g} [{low:+.3g}, {high:+.3g}] | "
                             f"{'' if paper is None else f'{paper:+g}'} | "
                             f"{_verdict(low, high, higher)} |")
                if key in ("pei", "location_consistency"):
                    mean, low, high = paired_difference(
                        *(_values(records, name, compared, f"{key}_null_mismatched", seeds)
                          for name in (arm.name, baseline)))
                    lines.append(f"| {arm.label} | {label}, null: mismatched masks | {mean:+.4g} "
                                 f"[{low:+.3g}, {high:+.3g}] | | a null: no verdict |")
    asked = [(arm, baseline, question) for arm, baseline, question in COMPARISONS
             if arm in records and baseline in records]
    if asked:
        lines += ["", "## The questions", ""]
    for arm, baseline, question in asked:
        lines += [f"**{question}** ({labels[arm]} minus {labels[baseline]}, {compared} faces)", ""]
        for key, label, scale, higher in METRICS:
            mean, low, high = paired_difference(
                _values(records, arm, compared, key, seeds) * scale,
                _values(records, baseline, compared, key, seeds) * scale)
            lines.append(f"- {label}: {mean:+.4g} [{low:+.3g}, {high:+.3g}]: "
                         f"{_verdict(low, high, higher)}")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m train.study", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/study", help="output directory")
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="study")
    parser.add_argument("--arms", nargs="+", choices=[arm.name for arm in ARMS],
                        help="a subset of the arms (softmax is always included)")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    budget = replace(BUDGETS[args.budget], device=args.device)
    arms = ARMS if not args.arms else tuple(
        arm for arm in ARMS if arm.name == "softmax" or arm.name in args.arms)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = run_study(budget, out, arms)
    path = out / "report.md"
    lines = [report_markdown(budget, records, arms), ""]
    lines += figures_markdown(records, arms, out, budget.seeds[0], budget.eval_data[0])
    path.write_text("\n".join(lines) + "\n")
    (out / "records.json").write_text(json.dumps(records, indent=2, default=str))
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
