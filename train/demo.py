"""The whole story on embedded data: ``python -m train.demo --out DIR``.

Trains the same small VGG on the synthetic faces twice, with softmax only and with
softmax + ECLoss over the full template set, evaluates both as the paper's section 5
(PEI, location consistency, activation robustness, verification) and writes
``DIR/report.md`` with the tables and figures, beside the paper's numbers.

- ``--budget default`` (the default) finishes in about 15 minutes on a 2-core CPU;
  ``--budget tiny`` is a one-minute smoke test.
- ``--scale paper`` trains the paper's VGG16 at 224 x 224 (14 x 14 maps, 19,307 templates)
  on a GPU, with more identities and epochs.

The training faces are drawn once and stored as a RecordIO file in ``DIR/data`` (drawing
costs far more than decoding). Runs and evaluations are kept under ``DIR/runs`` and
``DIR/eval``: a second call resumes an interrupted run and skips what is done.
"""
from __future__ import annotations

import argparse
import io
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

__all__ = ["Budget", "BUDGETS", "main"]


@dataclass(frozen=True)
class Budget:
    """Everything the demo chooses; it is printed in the report."""

    arch: str
    batch_norm: bool  # BatchNorm after every conv: the map scale is then one gain per channel
    width: float
    input_size: int
    embedding_dim: int
    identities: int
    images_per_identity: int
    epochs: int
    batch_size: int
    lr: float
    beta: float  # the ECLoss weight, reached linearly over beta_warmup_steps
    beta_warmup_steps: int
    grad_clip: float
    eval_images: int
    eval_repeats: int
    eval_pairs: int
    num_workers: int
    device: str = "auto"


BUDGETS = {
    # CI smoke test: seconds of training, 4 x 4 maps (137 templates).
    "tiny": Budget(arch="vgg13", batch_norm=True, width=0.0625, input_size=64, embedding_dim=32, identities=6,
                   images_per_identity=4, epochs=1, batch_size=8, lr=0.01, beta=1e5,
                   beta_warmup_steps=0, grad_clip=5.0, eval_images=8, eval_repeats=2,
                   eval_pairs=20, num_workers=0),
    # 2-core CPU, about 15 minutes: VGG16 at 1/8 width, 112 x 112, 7 x 7 maps (1,226 templates).
    "default": Budget(arch="vgg16", batch_norm=True, width=0.125, input_size=112, embedding_dim=128, identities=60,
                      images_per_identity=16, epochs=6, batch_size=64, lr=0.03, beta=1e5,
                      beta_warmup_steps=30, grad_clip=5.0, eval_images=100, eval_repeats=5,
                      eval_pairs=400, num_workers=1),
    # One GPU: the paper's VGG16 at 224 x 224, 14 x 14 maps (19,307 templates). Not run yet
    # (no GPU was lent): beta and BatchNorm follow the CPU budget's measurements, unverified.
    "paper": Budget(arch="vgg16", batch_norm=True, width=1.0, input_size=224, embedding_dim=512, identities=1000,
                    images_per_identity=40, epochs=20, batch_size=64, lr=0.03, beta=1e5,
                    beta_warmup_steps=500, grad_clip=5.0, eval_images=100, eval_repeats=5,
                    eval_pairs=3000, num_workers=8),
}


def render_training_set(identities: int, images_per_identity: int, size: int, rec_path: Path,
                        jitter: bool = False) -> None:
    """Draw the synthetic training faces once and store them as PNGs in RecordIO."""
    from train.data.recordio import write_recordio
    from train.data.synthetic import SyntheticFaces

    if rec_path.is_file() and rec_path.with_suffix(".idx").is_file():
        return
    faces = SyntheticFaces(identities, images_per_identity, size=size, seed=0, jitter=jitter)

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


def run_config(budget: Budget, rec_path: Path, runs_dir: Path, name: str, with_ecloss: bool):
    from train.config import config_from_dict

    steps_per_epoch = budget.identities * budget.images_per_identity // budget.batch_size
    return config_from_dict(dict(
        model=dict(arch=budget.arch, batch_norm=budget.batch_norm, width=budget.width, input_size=budget.input_size,
                   embedding_dim=budget.embedding_dim),
        head=dict(kind="softmax"),
        ecloss=dict(enabled=with_ecloss, templates="full", estimator="uniform"),
        # A fixed beta, not the automatic one (measured on the default budget): at
        # initialisation the template softmax is nearly uniform and the ECLoss gradient
        # tiny, so the automatic beta matched to the classification gradient there is ~6e8
        # and blows the maps up once they sharpen (non-finite by step 20). The ECLoss
        # gradient at the maps stays bounded (~1e-5 at any scale), so a fixed beta cannot
        # run away by itself; without BatchNorm the maps still grew multiplicatively through
        # the 13 convs until they overflowed (beta 4e6), hence batch_norm in the budgets.
        # With BatchNorm, beta 1e6 let ECLoss dominate (gradient ratio ~90): classification
        # stalled and most maps died (verification 56%); 1e5 (ratio ~0.5) is the default.
        # The trainer logs the effective gradient ratio.
        beta=dict(schedule="warmup", value=budget.beta, warmup_steps=budget.beta_warmup_steps,
                  update_every=5),
        data=dict(source="recordio", path=str(rec_path), num_workers=budget.num_workers),
        optim=dict(name="sgd", lr=budget.lr, warmup_epochs=min(1.0, budget.epochs / 4),
                   grad_clip=budget.grad_clip),
        train=dict(epochs=budget.epochs, batch_size=budget.batch_size, device=budget.device,
                   output_dir=str(runs_dir), run_name=name, tensorboard=False,
                   log_every=max(1, min(10, steps_per_epoch)),
                   checkpoint_every=max(1, steps_per_epoch)),
    ))


def train_or_resume(config) -> Path | None:
    """Train; when the run directory already holds a checkpoint, resume it instead.

    Returns the run directory, or ``None`` when a signal stopped the run (its checkpoint is
    saved; calling the demo again resumes it).
    """
    from train.trainer import fit

    run_dir = Path(config.train.output_dir) / config.train.run_name
    if (run_dir / "checkpoints" / "last.pt").is_file():
        config.train.resume = str(run_dir)
    trainer = fit(config)
    return None if trainer.stopped_by is not None else Path(trainer.run_dir)


def _preamble(budget: Budget, name: str, seconds: float, results: dict, reused: bool) -> str:
    from ecloss_fast import num_templates

    side = budget.input_size // 16
    lines = [
        f"Produced by `python -m train.demo --budget {name}` "
        f"({'GPU' if torch.cuda.is_available() else 'CPU'}, torch {torch.__version__}); "
        + ("this call reused finished runs and evaluations and took "
           if reused else "it took ") + f"{seconds / 60:.1f} minutes.",
        "",
        "Both runs train the same network on the same synthetic faces with the same seed; the only "
        "difference is the ECLoss term. Everything is evaluated on faces of identities neither run "
        "saw (another seed of the synthetic set), with the set's exact drawn part masks.",
        "",
        "| setting | value |", "|---|---|",
        f"| network | {budget.arch.upper()}{' with BatchNorm' if budget.batch_norm else ''}, "
        f"width x{budget.width:g}, input {budget.input_size} x "
        f"{budget.input_size}, embedding {budget.embedding_dim} |",
        f"| target layer | last conv, {side} x {side} maps, {num_templates(side)} templates (full set) |",
        f"| training data | {budget.identities} identities x {budget.images_per_identity} images, "
        "random flips |",
        f"| optimisation | SGD lr {budget.lr}, batch {budget.batch_size}, {budget.epochs} epochs, "
        f"cosine decay, gradient clipping at {budget.grad_clip} |",
        f"| ECLoss | tau 1e-3, r 4, uniform prior (the paper's), beta {budget.beta:g} reached linearly "
        f"over {budget.beta_warmup_steps} steps (see 'gradient ratio' below) |",
        f"| evaluation | {budget.eval_repeats} draws of {budget.eval_images} images; "
        f"{budget.eval_pairs} verification pairs, 10 folds, flip augmentation |",
        "",
    ]
    final = {}
    for label, run in results.items():
        log = Path(run["run_dir"]) / "log.csv"
        if log.is_file():
            last = log.read_text().strip().splitlines()[-1].split(",")
            header = log.read_text().splitlines()[0].split(",")
            final[label] = dict(zip(header, last))
    if final:
        lines += ["Last logged training step:", "", "| run | step | classification loss | ECLoss | beta | "
                  "gradient ratio | training accuracy |", "|---|---|---|---|---|---|---|"]
        for label, row in final.items():
            with_ecloss = results[label]["run"]["ecloss"]["enabled"]
            ecloss_cells = (f"{float(row['ecloss']):.3g} | {float(row['beta']):.3g} | "
                            f"{float(row['grad_ratio']):.3g}") if with_ecloss else "– | – | –"
            lines.append(f"| {label} | {row.get('step')} | {float(row['ce']):.3f} | {ecloss_cells} | "
                         f"{float(row['accuracy']):.3f} |")
        lines.append("")
    lines += [
        "How to read it: the paper's numbers come from VGG13/16/19 at 224 x 224 trained on "
        "Glint360K and evaluated on real face-parsing sets; these come from a much smaller network "
        "trained for minutes on drawn faces, so only the direction of each difference between the "
        "two rows can be compared, not the values. Standard errors are over random draws of images "
        "from one trained model each, not over training runs.",
    ]
    return "\n".join(lines)


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m train.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo", help="output directory (report.md, figures, runs)")
    parser.add_argument("--budget", choices=["tiny", "default"], default="default")
    parser.add_argument("--scale", choices=["cpu", "paper"], default="cpu",
                        help="'paper': VGG16 at 224 x 224 on a GPU (overrides --budget)")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    name = "paper" if args.scale == "paper" else args.budget
    budget = replace(BUDGETS[name], device=args.device)
    if args.scale == "paper" and not torch.cuda.is_available():
        parser.error("--scale paper needs a CUDA GPU (VGG16 at 224 x 224 for hours)")

    from train.checkpoint import load_for_eval
    from train.evaluate import EvalSettings, evaluate_model
    from train.report import write_report

    start = time.time()
    out = Path(args.out)
    rec_path = out / "data" / "train.rec"
    render_training_set(budget.identities, budget.images_per_identity, budget.input_size, rec_path)
    settings = EvalSettings(images=budget.eval_images, repeats=budget.eval_repeats,
                            pairs=budget.eval_pairs, figure_channels=6, figure_faces=6)
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else \
        ("cpu" if args.device == "auto" else args.device)
    results, eval_dirs, reused = {}, [], False
    for run_name, with_ecloss in (("softmax", False), ("ecloss", True)):
        eval_dir = out / "eval" / run_name
        metrics_path = eval_dir / "metrics.json"
        if metrics_path.is_file():
            results[run_name] = json.loads(metrics_path.read_text())
            reused = True
        else:
            config = run_config(budget, rec_path, out / "runs", run_name, with_ecloss)
            print(f"== training {run_name} ({'softmax + ECLoss' if with_ecloss else 'softmax only'})")
            run_dir = train_or_resume(config)
            if run_dir is None:
                print(f"stopped; run the same command again to resume from {out / 'runs' / run_name}")
                raise SystemExit(130)
            model, config = load_for_eval(run_dir, device=device)
            print(f"== evaluating {run_name}")
            results[run_name] = evaluate_model(model, config, eval_dir, {"synthetic": "synthetic"},
                                               settings, device, run_dir=run_dir)
        eval_dirs.append(eval_dir)
    preamble = _preamble(budget, name, time.time() - start,
                         {r["run"]["label"]: r for r in results.values()}, reused)
    path = write_report(eval_dirs, out, title="ECLoss demo: softmax vs softmax + ECLoss on synthetic faces",
                        preamble=preamble)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
