"""The study's report, docs/study/PLAN.md's "What is reported": ``DIR/report.md``.

Written by ``python -m train.study`` (at the end, or with ``--report-only`` from the runs
evaluated so far) and by ``python -m train.demo``. Sections: how many planned runs are
done; the gate; Q1 with its two co-primary metrics (paired differences over the seeds both
arms have, 95% t-intervals, paired t-tests, Holm over the two) and the plan's answer rule;
the secondary family (Q2-Q4, and Q5 when its rule asked for branches; Holm over all its
tests on the mean normalised gain; the other metrics beside, without tests); per arm the
mean and standard error over its seeds of every metric, PEI and location consistency
beside their two nulls; the positive control; the cosine rule and the 28x28 measurement;
the diagnostics of the template softmax; wall time; figures (train/study_figures.py).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from train.study import (ARMS, BRANCH_SOURCE, BRANCHES, COSINE_THRESHOLD, METRICS, NULLS, PRIMARY,
                         SECONDARY, SECONDARY_METRIC, StudyBudget, _scalar, branches_due,
                         branch_epoch, holm, median_cosine, paired_test, steps_per_epoch, study_jobs,
                         summarise)

__all__ = ["LEVEL", "Contrast", "q1_answer", "report_markdown", "write_report"]

LEVEL = 0.05  # a test is resolved when its Holm-adjusted p is below this (docs/study/PLAN.md)
GATE_RUNS = Path(__file__).resolve().parents[1] / "docs" / "study" / "gate"


# ---------------------------------------------------------------- contrasts


class Contrast:
    """``arm - baseline`` of one metric, paired over the seeds both have a value for."""

    def __init__(self, records: dict, arm: str, baseline: str, metric: str, dataset: str):
        pairs = {seed: (_value(records, arm, seed, dataset, metric),
                        _value(records, baseline, seed, dataset, metric))
                 for seed in sorted(set(records.get(arm, {})) & set(records.get(baseline, {})))}
        self.seeds = [seed for seed, (a, b) in pairs.items() if math.isfinite(a) and math.isfinite(b)]
        self.a = np.array([pairs[seed][0] for seed in self.seeds])
        self.b = np.array([pairs[seed][1] for seed in self.seeds])
        self.mean, self.low, self.high, self.p = paired_test(self.a, self.b)

    def interval(self, digits: int = 3) -> str:
        if math.isnan(self.low):
            return f"{self.mean:+.{digits}g} (one seed: no interval)" if self.seeds else "no seeds yet"
        return f"{self.mean:+.{digits}g} [{self.low:+.{digits}g}, {self.high:+.{digits}g}]"


def _value(records, arm, seed, dataset, metric) -> float:
    """The metric of one run's evaluation; NaN where it lacks it (e.g. tracking skipped)."""
    value = records[arm][seed]["metrics"][dataset].get(metric)
    return math.nan if value is None else _scalar(value)


def _values(records, arm, dataset, metric) -> np.ndarray:
    values = np.array([_value(records, arm, seed, dataset, metric) for seed in sorted(records.get(arm, {}))])
    return values[np.isfinite(values)]


def _resolved(mean: float, adjusted: float) -> str:
    if not adjusted < LEVEL:
        return "not resolved"
    return "resolved: higher" if mean > 0 else "resolved: lower"


def q1_answer(contrasts: list[Contrast], adjusted) -> str:
    """The plan's answer to Q1 from its co-primary contrasts (ECLoss minus softmax, higher
    is better for both) and their Holm-adjusted p-values: ``yes`` if at least one resolves
    in ECLoss's favour and neither against it, ``no, worse`` if one resolves against it,
    otherwise ``not shown``."""
    against = any(p < LEVEL and c.mean < 0 for c, p in zip(contrasts, adjusted))
    favour = any(p < LEVEL and c.mean > 0 for c, p in zip(contrasts, adjusted))
    return "no, worse" if against else "yes" if favour else "not shown"


def _p(value: float) -> str:
    return "–" if math.isnan(value) else f"{value:.3g}"


def _mean_se(values: np.ndarray, digits: int = 4) -> str:
    mean, se = summarise(values)
    if math.isnan(mean):
        return "–"
    return f"{mean:.{digits}g}" + ("" if math.isnan(se) else f" ± {se:.2g}")


# ---------------------------------------------------------------- sections


def _labels(arms) -> dict:
    """How the tables name each arm and branch: its name (the plan's)."""
    return {name: f"`{name}`" for name in [arm.name for arm in arms] + [b.name for b in BRANCHES]}


def _arms_table(budget: StudyBudget, records: dict, arms) -> list[str]:
    lines = ["| arm | what | seeds planned | evaluated |", "|---|---|---|---|"]
    for arm in arms:
        lines.append(f"| `{arm.name}` | {arm.label} | {', '.join(map(str, budget.seeds(arm)))} | "
                     f"{len(records.get(arm.name, {}))} |")
    for branch in BRANCHES:
        if records.get(branch.name):
            lines.append(f"| `{branch.name}` | Q5's {branch.label}, from `{BRANCH_SOURCE}` after "
                         f"epoch {branch_epoch(budget)} | {', '.join(map(str, budget.secondary_seeds))} "
                         f"| {len(records[branch.name])} |")
    return lines + [""]


def _branches_planned(budget: StudyBudget, records: dict) -> bool:
    """Whether Q5's branches belong to the study: its rule asks for them, or they ran."""
    return (BRANCH_SOURCE in records and branches_due(budget, records)) or any(
        records.get(branch.name) for branch in BRANCHES)


def _progress(budget: StudyBudget, records: dict, arms, branches: bool) -> list[str]:
    planned = [(arm.name, seed) for arm, seed in study_jobs(budget, arms)]
    due = branches and _branches_planned(budget, records)
    if due:
        planned += [(branch.name, seed) for seed in budget.secondary_seeds for branch in BRANCHES]
    done = [(name, seed) for name, seed in planned if seed in records.get(name, {})]
    line = f"**{len(done)} of the {len(planned)} planned runs are evaluated**"
    if len(done) < len(planned):
        missing = [f"{name} seed {seed}" for name, seed in planned if (name, seed) not in done]
        shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
        line += (f" (not yet: {shown}). Every contrast below uses the seeds both of its arms "
                 "have; its answers are provisional until the plan's seeds are all in.")
    else:
        line += "."
    if not branches:
        line += " Q5's branches are not part of this run."
    elif not due:
        line += (" Q5's branches are not among the planned runs: the primary arm's cosine rule "
                 "did not ask for them (see the cosine rule below).")
    return [line, ""]


def _gate(out: Path) -> list[str]:
    from train.gate import summary

    lines = ["## The gate", ""]
    path = out / "gate.json"
    if path.is_file():
        lines += [f"Scored on this study's own softmax seed-0 run (`{path.name}`, criteria fixed in "
                  "`train/gate.py` before it first ran):", "", "```", summary(json.loads(path.read_text())),
                  "```", ""]
    else:
        lines += ["Not scored yet: `gate.json` is written after the softmax seed-0 run.", ""]
    runs = sorted(GATE_RUNS.glob("*.json"))
    if runs:
        lines += ["Before the plan, on the same network (docs/study/gate/, seed 0, 480 held-out shots):",
                  "", "| file | epochs x images per identity | inner parts present, top-1 [95%] | "
                  "erased | gate |", "|---|---|---|---|---|"]
        for run in runs:
            result = json.loads(run.read_text())
            present, erased = result["network"]["present"], result["network"]["erased"]
            lines.append(
                f"| docs/study/gate/{run.name} | {result['budget']['epochs']} x "
                f"{result['budget']['images_per_identity']} | {present['top1']:.3f} "
                f"[{present['interval95'][0]:.3f}, {present['interval95'][1]:.3f}] "
                f"({present['over_chance']:.1f} x chance) | {erased['top1']:.3f} "
                f"[{erased['interval95'][0]:.3f}, {erased['interval95'][1]:.3f}] | "
                f"{'passes' if result['passed']['gate'] else 'fails'} |")
        lines.append("")
    return lines


def _q1(records: dict, dataset: str, labels: dict) -> list[str]:
    arm, baseline, metrics = PRIMARY
    lines = ["## Q1 (primary): does ECLoss make channels track face parts better than softmax?", "",
             f"{labels.get(arm, arm)} minus {labels.get(baseline, baseline)}, paired by seed, "
             f"{dataset} held-out faces; two co-primary metrics, Holm over the two.", ""]
    if arm not in records or baseline not in records:
        return lines + ["Not in this run: it lacks one of the two arms.", ""]
    contrasts = [Contrast(records, arm, baseline, key, dataset) for key, _ in metrics]
    adjusted = holm([c.p for c in contrasts])
    lines += [f"| metric | {labels.get(arm, arm)} | {labels.get(baseline, baseline)} | seeds | "
              "difference [95% interval] | p (paired t) | Holm p | verdict |",
              "|---|---|---|---|---|---|---|---|"]
    for (key, label), c, p in zip(metrics, contrasts, adjusted):
        lines.append(f"| {label} | {_mean_se(c.a)} | {_mean_se(c.b)} | {len(c.seeds)} | "
                     f"{c.interval()} | {_p(c.p)} | {_p(p)} | {_resolved(c.mean, p)} |")
    answer = q1_answer(contrasts, adjusted)
    lines += ["", f"**Answer: {answer}.** The plan's rule: *yes* if at least one metric resolves "
              f"(Holm-adjusted p < {LEVEL}) in ECLoss's favour and neither against it; *no, "
              "worse* if one resolves against it; otherwise *not shown*, and the intervals say "
              "how large an effect the study could have missed.", ""]
    return lines


def _secondary_tests(budget: StudyBudget, records: dict, branches: bool) -> list[tuple[str, str, str]]:
    """``(question, arm, baseline)`` of the secondary family: Q2-Q4, and Q5's A - B when
    the cosine rule asks for the branches (and ``branches``)."""
    tests = [(question, arm, baseline) for arm, baseline, question in SECONDARY]
    if branches and _branches_planned(budget, records):
        tests.append(("Q5: the full set instead of the 400 (A - B)", BRANCH_SOURCE, BRANCHES[0].name))
    return tests


def _secondary(budget: StudyBudget, records: dict, dataset: str, labels: dict,
               branches: bool) -> list[str]:
    key, label = SECONDARY_METRIC
    tests = _secondary_tests(budget, records, branches)
    present = [t for t in tests if records.get(t[1]) and records.get(t[2])]
    lines = ["## The secondary family (Q2-Q5)", ""]
    if not present:
        return lines + ["Not in this run: none of its arms.", ""]
    contrasts = [Contrast(records, arm, baseline, key, dataset) for _, arm, baseline in tests]
    adjusted = holm([c.p if t in present else math.nan for t, c in zip(tests, contrasts)])
    lines += [f"Metric: {label}; Holm over all {len(tests)} tests of the family (a test whose "
              "arms are not in yet counts in the family as the least significant). Paired by "
              f"seed, {dataset} held-out faces.", "",
              "| question | contrast | seeds | difference [95% interval] | p (paired t) | Holm p | verdict |",
              "|---|---|---|---|---|---|---|"]
    for (question, arm, baseline), c, p in zip(tests, contrasts, adjusted):
        lines.append(f"| {question} | {labels.get(arm, arm)} minus {labels.get(baseline, baseline)} | "
                     f"{len(c.seeds)} | {c.interval()} | {_p(c.p)} | {_p(p)} | {_resolved(c.mean, p)} |")
    if BRANCHES[1].name in records:
        floor = Contrast(records, BRANCH_SOURCE, BRANCHES[1].name, key, dataset)
        lines += ["", f"Q5's noise floor, beside its test (no test): A minus A' ({labels[BRANCHES[1].name]}), "
                  f"{len(floor.seeds)} seeds: {floor.interval()}."]
    lines += ["", "The other metrics of the same contrasts, reported beside without tests "
              "(difference [95% interval]):", "",
              "| contrast | " + " | ".join(label for k, label, _, _ in METRICS if k != key) + " |",
              "|---|" + "---|" * (len(METRICS) - 1)]
    for question, arm, baseline in present:
        cells = [Contrast(records, arm, baseline, k, dataset).interval() for k, _, _, _ in METRICS if k != key]
        lines.append(f"| {question.split(':')[0]}: {labels.get(arm, arm)} minus "
                     f"{labels.get(baseline, baseline)} | " + " | ".join(cells) + " |")
    return lines + [""]


def _nulls_beside(records, arm, dataset, metric) -> str:
    if metric not in ("pei", "location_consistency"):
        return ""
    means = [f"{name} {_mean_se(_values(records, arm, dataset, f'{metric}_{key}'))}" for key, name in NULLS]
    return f" (nulls: {'; '.join(means)})"


def _per_arm(records: dict, dataset: str, labels: dict, names) -> list[str]:
    lines = [f"## Per arm ({dataset} held-out faces)", "",
             "Mean ± standard error over the arm's evaluated seeds (not over images of one model). "
             "PEI and location consistency beside their two nulls (docs/design.md 7.1): the maps "
             "against another identity's part masks, and the best fixed cone.", "",
             "| arm | seeds | " + " | ".join(label for _, label, _, _ in METRICS) + " |",
             "|---|---|" + "---|" * len(METRICS)]
    for name in names:
        cells = [_mean_se(_values(records, name, dataset, key) * scale) + _nulls_beside(records, name, dataset, key)
                 for key, _, scale, _ in METRICS]
        lines.append(f"| {labels.get(name, name)} | {len(records[name])} | " + " | ".join(cells) + " |")
    return lines + [""]


def _positive_control(records: dict, dataset: str, labels: dict, names) -> list[str]:
    lines = ["## Positive control", "",
             "Per run, eight oracle channels (each part's mask area-pooled to the maps' size, the "
             "perfectly localised channel) scored by the same procedure as the run's channels, "
             "on the same faces: the measurement could say a channel tracks a part only where "
             "these are confident on their own part. The oracle depends on the faces (the seed), "
             "not on the network.", ""]
    rows, parts = [], None
    for name in names:
        oracles = [record["metrics"][dataset].get("oracle") for record in records[name].values()]
        oracles = [o for o in oracles if o]
        if not oracles:
            continue
        parts = parts or oracles[0]["parts"]
        own = np.array([o["confident_on_own_part"] for o in oracles], dtype=float)  # (runs, K)
        rows.append(f"| {labels.get(name, name)} | {len(oracles)} | {_mean_se(own.mean(1), 3)} | "
                    + " | ".join(f"{int(own[:, k].sum())}/{len(oracles)}" for k in range(own.shape[1])) + " |")
    if not rows:
        return lines + ["No evaluation with the oracle channels yet.", ""]
    lines += ["| arm | runs | fraction of oracle channels confident on their own part | "
              + " | ".join(parts) + " |", "|---|---|---|" + "---|" * len(parts)]
    return lines + rows + ["", "Per part: the runs in which that part's oracle channel was confident "
                                "on it.", ""]


def _cosine(budget: StudyBudget, records: dict, out: Path, labels: dict, arms, branches: bool) -> list[str]:
    total = budget.epochs * steps_per_epoch(budget)
    lines = ["## Full set against the paper's 400: the cosine rule (Q5)", "",
             f"Per ECLoss arm, the median of the logged cosine between the full set's and the "
             f"400 subset's ECLoss gradients at the batch's maps over the second half of "
             f"training (the measurements of steps {total // 2 + 1}-{total}, every "
             f"{budget.subset_cosine_every} steps) and over the arm's seeds. At least "
             f"{COSINE_THRESHOLD}: the two sets are interchangeable at that spread and no seeds "
             "are spent.", "",
             "| arm | seeds | values | median cosine | verdict |", "|---|---|---|---|---|"]
    for arm in arms:
        if arm.ecloss is None or arm.name not in records:
            continue
        median, count, seeds = median_cosine(budget, records, arm.name)
        if math.isnan(median):
            verdict = "no cosine logged yet"
        elif median >= COSINE_THRESHOLD:
            verdict = "interchangeable at this spread"
        else:
            verdict = "below: the sets may differ" + (
                " (the primary arm: Q5's branches run)" if arm.name == BRANCH_SOURCE else "")
        lines.append(f"| {labels[arm.name]} | {seeds} | {count} | "
                     f"{'–' if math.isnan(median) else f'{median:.4f}'} | {verdict} |")
    lines += ["", "### At 28x28 maps (a measurement, no training)", ""]
    path = out / "cosine28.json"
    if not branches:
        return lines + ["Not part of this run: the study measures it (`python -m train.study "
                        "--cosine-28`, docs/study/report.md).", ""]
    if not path.is_file():
        return lines + [f"Not measured yet: `python -m train.study --out {out} --cosine-28` "
                        "(a few minutes) writes `cosine28.json`.", ""]
    result = json.loads(path.read_text())
    runs = result["runs"]
    lines += [f"The final {result['arm']} models of seeds {', '.join(runs)}, each on "
              f"{result['images_per_seed']} of its own held-out faces (distinct identities of the "
              f"evaluation's first draw; {len(runs) * result['images_per_seed']} faces, "
              f"{sum(r['maps'] for r in runs.values())} maps in all: a modest sample, chosen to keep "
              f"the measurement to minutes), maps upsampled bilinearly to {result['size']}x"
              f"{result['size']}, tau calibrated there on each seed's maps; the cosine between "
              f"the full set's and the {result['subset']} subset's gradients "
              f"({result['seconds']:.0f} s on {result['machine']['device']}). No "
              f"{result['size']}x{result['size']} model is in the budget: a cosine below "
              f"{COSINE_THRESHOLD} is a place where the sets may differ, untested.", "",
              "| score spread | " + " | ".join(f"seed {seed}" for seed in runs) + " | median | verdict |",
              "|---|" + "---|" * (len(runs) + 2)]
    for spread in (f"{s:g}" for s in result["spreads"]):
        values = [runs[seed]["by_spread"][spread]["cosine"] for seed in runs]
        median = float(np.median(values)) if values else math.nan
        verdict = ("–" if math.isnan(median) else "interchangeable" if median >= COSINE_THRESHOLD
                   else "the sets may differ (untested)")
        lines.append(f"| {spread} | " + " | ".join(f"{v:.4f}" for v in values)
                     + f" | {'–' if math.isnan(median) else f'{median:.4f}'} | {verdict} |")
    return lines + [""]


_DIAGNOSTICS = (("mi_over_log_n", "MI / log N"), ("max_p", "mean max p"), ("score_std", "score std"))


def _diagnostics(records: dict, labels: dict, names) -> list[str]:
    lines = ["## Diagnostics of the template softmax at each run's last logged step", "",
             "docs/design.md 8.4; mean ± standard error over the arm's seeds; tau is the one "
             "calibrated on each run's first batch.", "",
             "| arm | " + " | ".join(label for _, label in _DIAGNOSTICS) + " | tau |",
             "|---|" + "---|" * (len(_DIAGNOSTICS) + 1)]
    for name in names:
        runs = records[name].values()

        def column(key):
            return np.array([float(r["last_step"][key]) for r in runs
                             if r["last_step"].get(key) not in (None, "")])

        taus = np.array([r["calibrated_tau"] for r in runs if r.get("calibrated_tau") is not None])
        if not any(len(column(key)) for key, _ in _DIAGNOSTICS):
            continue
        lines.append(f"| {labels.get(name, name)} | " + " | ".join(_mean_se(column(key), 3)
                                                                  for key, _ in _DIAGNOSTICS)
                     + f" | {_mean_se(taus, 3)} |")
    return lines + [""]


def _wall_time(records: dict, labels: dict, names) -> list[str]:
    lines = ["## Wall time", "", "Training and evaluation of each run (a resumed run: since the "
             "resume; drawing the training faces excluded).", "",
             "| arm | runs | minutes in all | minutes per run |", "|---|---|---|---|"]
    total = 0.0
    for name in names:
        seconds = np.array([r["seconds"] for r in records[name].values()])
        seconds = seconds[np.isfinite(seconds)]
        total += seconds.sum()
        lines.append(f"| {labels.get(name, name)} | {len(seconds)} | {seconds.sum() / 60:.0f} | "
                     f"{seconds.mean() / 60 if len(seconds) else math.nan:.1f} |")
    return lines + ["", f"In all: {total / 3600:.1f} hours ({total / 60:.0f} minutes).", ""]


def report_markdown(budget: StudyBudget, out: Path, records: dict, arms=ARMS, *,
                    title: str = "ECLoss explainability study (docs/study/PLAN.md v2)",
                    command: str = "python -m train.study", notes=(), branches: bool = True) -> list[str]:
    """The report's lines, figures excluded (:func:`write_report` adds them); without
    ``branches`` Q5's branches are neither planned nor tested (the demo)."""
    labels = _labels(arms)
    names = [arm.name for arm in arms if records.get(arm.name)]
    names += [branch.name for branch in BRANCHES if records.get(branch.name)]
    dataset = budget.eval_data[-1]
    device = "a GPU" if torch.cuda.is_available() else "a CPU"
    lines = [f"# {title}", "",
             f"`{command}` on {device} (torch {torch.__version__}). Every arm trains the same "
             "network on the same synthetic faces (identity in the brows, eyes, nose and mouth "
             "only); every run is evaluated on identities no run saw, drawn anew per seed.", ""]
    lines += list(notes) + ([""] if notes else [])
    lines += _progress(budget, records, arms, branches)
    lines += _arms_table(budget, records, arms)
    lines += ["| setting | value |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in asdict(budget).items() if key != "extra"]
    lines += [""]
    lines += _gate(out)
    lines += _q1(records, dataset, labels)
    lines += _secondary(budget, records, dataset, labels, branches)
    if names:
        lines += _per_arm(records, dataset, labels, names)
        lines += _positive_control(records, dataset, labels, names)
        lines += _cosine(budget, records, out, labels, arms, branches)
        lines += _diagnostics(records, labels, names)
        lines += _wall_time(records, labels, names)
    return lines


def write_report(budget: StudyBudget, out: Path, records: dict, arms=ARMS, *, figures: bool = True,
                 **options) -> Path:
    """Write ``out/report.md`` (with the figures in ``out/figures``) and ``out/records.json``;
    ``options`` go to :func:`report_markdown`. Returns the report's path."""
    from train.study_figures import figures_markdown

    out = Path(out)
    lines = report_markdown(budget, out, records, arms, **options)
    if figures:
        lines += figures_markdown(budget, records, arms, out)
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    (out / "records.json").write_text(json.dumps(records, indent=2, default=str) + "\n")
    return path
