"""Compare evaluated runs as the paper's Tables 2-5: ``python -m train.report``.

    python -m train.report EVAL_DIR_A EVAL_DIR_B ... --out DIR

Each EVAL_DIR holds a ``metrics.json`` written by ``python -m train.evaluate``. Writes
``DIR/report.md``: the runs' settings (the calibrated tau included), one markdown table per
paper table (rows: network and loss; columns: data sets) beside the paper's published
numbers, the tables of the metrics the paper does not have (dead maps, peaks over live
maps, part coverage and entropy), the figures of the runs side by side (copied to
``DIR/figures/``), and the training curves when the run directories are known.
"""
from __future__ import annotations

import argparse
import csv
import json
import re
import shutil
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["PAPER", "load_runs", "tables_markdown", "write_report", "main"]

# The paper's published numbers (arXiv 2207.02179, Tables 2-5), copied from its text.
_NETWORKS = ["VGG13 + Softmax", "VGG13 + ECLoss", "VGG16 + Softmax", "VGG16 + ECLoss",
             "VGG19 + Softmax", "VGG19 + ECLoss"]
PAPER = {
    "pei": dict(
        title="Table 2: part explainability (PEI, higher is better)",
        columns=["LaPa", "AFW", "Helen", "LFPW", "300-W"],
        rows=dict(zip(_NETWORKS, [
            ["0.1642", "0.1612", "0.1646", "0.1625", "0.1554"],
            ["0.1710", "0.1687", "0.1711", "0.1702", "0.1623"],
            ["0.1479", "0.1447", "0.1530", "0.1443", "0.1396"],
            ["0.1632", "0.1490", "0.1566", "0.1431", "0.1443"],
            ["0.0424", "0.0396", "0.0396", "0.0376", "0.0381"],
            ["0.0432", "0.0426", "0.0466", "0.0430", "0.0376"],
        ]))),
    "verification": dict(
        title="Table 3: face verification accuracy (no alignment)",
        columns=["LFW", "CFP-FF", "CALFW"],
        rows=dict(zip(_NETWORKS, [
            ["91.95%", "79.57%", "76.55%"],
            ["92.15%", "79.70%", "77.13%"],
            ["93.20%", "78.59%", "78.10%"],
            ["94.08%", "80.67%", "80.70%"],
            ["90.96%", "75.90%", "70.97%"],
            ["91.75%", "76.16%", "75.98%"],
        ]))),
    "location_consistency": dict(
        title="Table 4: location consistency (higher is better; at most 0.1224)",
        columns=["LaPa", "AFW", "Helen", "LFPW", "300-W"],
        rows=dict(zip(_NETWORKS, [
            ["0.02537", "0.01971", "0.02082", "0.02187", "0.02122"],
            ["0.04029", "0.03654", "0.03661", "0.03796", "0.03770"],
            ["0.02743", "0.03516", "0.03032", "0.04230", "0.02867"],
            ["0.02898", "0.03589", "0.03327", "0.04175", "0.03417"],
            ["0.08075", "0.08307", "0.08767", "0.08217", "0.08450"],
            ["0.09382", "0.09503", "0.09592", "0.09453", "0.09418"],
        ]))),
    "activation_robustness": dict(
        title="Table 5: activation robustness, peaks per map (mean ± standard error; lower is better)",
        columns=["VGGFace", "LFW", "CFP", "AgeDB", "Helen", "LaPa"],
        rows=dict(zip(_NETWORKS, [
            ["3.733 ± 0.094", "3.945 ± 0.022", "3.580 ± 0.205", "3.984 ± 0.147", "4.070 ± 0.164", "3.918 ± 0.236"],
            ["2.596 ± 0.050", "2.784 ± 0.077", "2.495 ± 0.126", "2.718 ± 0.221", "2.816 ± 0.105", "2.889 ± 0.166"],
            ["3.714 ± 0.081", "3.994 ± 0.041", "3.994 ± 0.041", "3.889 ± 0.167", "3.946 ± 0.144", "3.847 ± 0.195"],
            ["3.144 ± 0.086", "3.272 ± 0.013", "3.210 ± 0.078", "3.429 ± 0.165", "3.242 ± 0.151", "3.395 ± 0.186"],
            ["2.987 ± 0.111", "2.965 ± 0.247", "2.646 ± 0.069", "3.053 ± 0.123", "3.083 ± 0.148", "3.068 ± 0.042"],
            ["1.672 ± 0.108", "1.743 ± 0.164", "1.493 ± 0.037", "1.775 ± 0.183", "1.829 ± 0.053", "1.849 ± 0.065"],
        ]))),
}
# Metrics of this project beyond the paper's (docs/design.md): (title, decimals).
EXTRA = {
    "dead_fraction": ("Dead maps: fraction of maps whose maximum is at most 0 (lower is better)", 3),
    "activation_robustness_live": (
        "Activation robustness over live maps only, peaks per map (a dead map has 0 peaks)", 3),
    "part_coverage": ("Part coverage: distinct dominant parts among the channels (of 7; 1 is "
                      "a collapse onto one part)", 2),
    "part_entropy": ("Part entropy: entropy of the channels' dominant parts, nats (log 7 = "
                     "1.946 when spread evenly)", 3),
    "confident_fraction": ("Confident channels: the fraction whose size-fair tracking gain beats "
                           "its image-shuffled null (docs/design.md 7.2; one draw)", 3),
    "confident_parts": ("Confident parts: distinct preferred parts among the confident channels "
                        "(one draw)", 0),
    "mean_normalized_gain": ("Mean normalised tracking gain over channels and parts (1: as a "
                             "perfectly localised channel; 0: a fixed spatial prior; one draw)", 3),
}
# PEI and location consistency are shown beside their two nulls (docs/design.md 7.1).
NULLS = (("null_mismatched", "mismatched masks"), ("null_best_cone", "best fixed cone"))
_FIGURES = [("top_activation", "Figure 6: top-10% activation of the most consistent channels"),
            ("channel_parts", "Per channel: its dominant part and where its peaks land"),
            ("maps_with_peaks", "Figure 5: one face, all its channel maps, counted peaks marked"),
            ("peak_histogram", "Peaks per map"),
            ("part_assignment", "Part assignment A[c, k] (rows: parts; columns: channels)")]


def load_runs(eval_dirs) -> list[tuple[Path, dict]]:
    """``(directory, metrics.json contents)`` for each evaluation directory."""
    runs = []
    for directory in map(Path, eval_dirs):
        path = directory / "metrics.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: run python -m train.evaluate first")
        runs.append((directory, json.loads(path.read_text())))
    return runs


def _cell(metric: str, entry: dict | None) -> str:
    """A metric of one data set: mean ± standard error over draws (one value for the
    metrics of one draw), with its nulls beside it where the evaluation has them."""
    if entry is None or metric not in entry:
        return "–"
    value = entry[metric]
    if metric == "verification":
        return f"{100 * value['accuracy']:.2f}% ± {100 * value['std']:.2f}"
    digits = EXTRA[metric][1] if metric in EXTRA else 3 if metric == "activation_robustness" else 4
    if not isinstance(value, dict):
        return f"{value:.{digits}f}"
    nulls = [f"{name} {entry[f'{metric}_{key}']['mean']:.{digits}f}" for key, name in NULLS
             if f"{metric}_{key}" in entry]
    cell = f"{value['mean']:.{digits}f} ± {value['se']:.{digits}f}"
    return cell + (f" (nulls: {', '.join(nulls)})" if nulls else "")


def _table(columns, rows) -> list[str]:
    lines = ["| Network | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {label} | " + " | ".join(cells) + " |" for label, cells in rows]
    return lines


def _runs_table(runs) -> list[str]:
    """Each run's loss settings: what tells the arms of a study apart."""
    lines = ["| Run | maps | templates | estimator | tau | diversity | normalize | beta |",
             "|---|---|---|---|---|---|---|---|"]
    for _, results in runs:
        run = results["run"]
        e, beta = run.get("ecloss", {}), run.get("beta", {})
        size = run.get("map_size")
        tau = e.get("tau", "–")
        if tau == "auto":
            calibrated = e.get("calibrated_tau")
            tau = (f"auto: {calibrated:.4g}" if calibrated is not None else "auto") + \
                f" (score std {e.get('score_spread', 1.0):g})"
        cells = [f"{size} x {size}" if size else "–"]
        if e.get("enabled", True):
            cells += [str(e.get("templates", "–")), str(e.get("estimator", "–")), str(tau),
                      f"{e.get('diversity', 0.0):g}", str(e.get("normalize", False))]
        else:
            cells += ["no ECLoss"] + ["–"] * 4
        cells.append(f"{beta.get('schedule', '–')}, ratio {beta.get('grad_ratio', '–')}")
        lines.append(f"| {run['label']} | " + " | ".join(cells) + " |")
    return lines


def _run_rows(runs, metric: str, present: list[str]) -> list[tuple[str, list[str]]]:
    return [(r["run"]["label"], [_cell(metric, r["datasets"].get(d)) for d in present]) for _, r in runs]


def tables_markdown(runs) -> list[str]:
    """The runs' settings; the paper's four tables, this project's runs beside the paper's
    numbers; then the metrics that the paper does not report."""
    lines = ["### Runs", ""] + _runs_table(runs) + [""]
    datasets = list(dict.fromkeys(name for _, results in runs for name in results["datasets"]))

    def present(metric):
        return [d for d in datasets if any(metric in r["datasets"].get(d, {}) for _, r in runs)]

    for metric, paper in PAPER.items():
        columns = present(metric)
        lines.append(f"### {paper['title']}")
        lines.append("")
        if columns:
            nulls = (" Beside each value, its two nulls (docs/design.md 7.1): the maps against the "
                     "part masks of another identity's image, and the best fixed cone, a channel "
                     "the same in every image.") if metric in ("pei", "location_consistency") else ""
            lines.append("This project's runs (mean ± standard error over random draws; "
                         "verification: mean ± std over 10 folds)." + nulls)
            lines.append("")
            lines += _table(columns, _run_rows(runs, metric, columns))
        else:
            lines.append("No data set of these runs has this metric.")
        lines += ["", "The paper's numbers (VGG at 224 x 224, Glint360K training):", ""]
        lines += _table(paper["columns"], list(paper["rows"].items()))
        lines.append("")
    for metric, (title, _) in EXTRA.items():
        columns = present(metric)
        if columns:
            lines += [f"### {title}", "", "Not in the paper; mean ± standard error over random draws "
                      "(or the one draw's value):", ""]
            lines += _table(columns, _run_rows(runs, metric, columns)) + [""]
    return lines


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def training_curves(run_dirs: list[tuple[str, Path]], path: Path) -> bool:
    """Classification loss, ECLoss and accuracy over steps from each run's ``log.csv``."""
    logs = [(label, d / "log.csv") for label, d in run_dirs if (d / "log.csv").is_file()]
    if not logs:
        return False
    fig, axes = plt.subplots(1, 3, figsize=(11, 3))
    for label, log in logs:
        with open(log) as handle:
            rows = list(csv.DictReader(handle))
        steps = [int(r["step"]) for r in rows]
        for ax, key in zip(axes, ["ce", "ecloss", "accuracy"]):
            ax.plot(steps, [float(r[key]) for r in rows], label=label)
    for ax, title in zip(axes, ["classification loss", "ECLoss (-MI, nats)", "training accuracy"]):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True


def side_by_side(pictures: list[Path], path: Path) -> None:
    """Paste pictures left to right on white (for a README: one file for all runs)."""
    from PIL import Image

    images = [Image.open(p).convert("RGB") for p in pictures]
    canvas = Image.new("RGB", (sum(i.width for i in images), max(i.height for i in images)), "white")
    x = 0
    for image in images:
        canvas.paste(image, (x, 0))
        x += image.width
    canvas.quantize(256).save(path, optimize=True)


def write_report(eval_dirs, out, title: str = "ECLoss evaluation", preamble: str = "") -> Path:
    """Write ``out/report.md`` (and copy the figures); returns its path."""
    out = Path(out)
    runs = load_runs(eval_dirs)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    lines = [f"# {title}", ""]
    if preamble:
        lines += [preamble.rstrip(), ""]
    lines += ["## Tables", ""] + tables_markdown(runs)
    run_dirs = [(r["run"]["label"], Path(r["run_dir"])) for _, r in runs if r.get("run_dir")]
    if training_curves(run_dirs, out / "figures" / "training_curves.png"):
        lines += ["## Training", "", "![training curves](figures/training_curves.png)", ""]
    lines += ["## Figures", ""]
    for key, caption in _FIGURES:
        cells = []
        for directory, results in runs:
            name = results.get("figures", {}).get(key)
            if name and (directory / name).is_file():
                target = out / "figures" / f"{_slug(results['run']['label'])}-{name}"
                if (directory / name).resolve() != target.resolve():
                    shutil.copyfile(directory / name, target)
                cells.append((results["run"]["label"], f"figures/{target.name}"))
        if len(cells) > 1 and key == "top_activation":
            side_by_side([out / link for _, link in cells], out / "figures" / "top_activation_side_by_side.png")
        if cells:
            lines += [f"### {caption}", "", "| " + " | ".join(label for label, _ in cells) + " |",
                      "|---" * len(cells) + "|",
                      "| " + " | ".join(f"![{label}]({link})" for label, link in cells) + " |", ""]
            if len(cells) > 1 and key == "top_activation":
                lines += ["All runs in one picture: `figures/top_activation_side_by_side.png`.", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m train.report", description=__doc__.splitlines()[0])
    parser.add_argument("eval_dirs", nargs="+", help="directories written by python -m train.evaluate")
    parser.add_argument("--out", required=True)
    parser.add_argument("--title", default="ECLoss evaluation")
    args = parser.parse_args(argv)
    path = write_report(args.eval_dirs, args.out, args.title)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
