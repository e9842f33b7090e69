"""Q5's 28x28 measurement (docs/study/PLAN.md): ``python -m train.study --out DIR --cosine-28``.

No 28x28 model is in the study's budget, so where the full template set and the paper's
400 could differ at 28x28 maps comes from a measurement, not training: the final
``ecloss-s3`` models of the secondary seeds (0-4), each on ``images`` of its own held-out
faces (the first faces of distinct identities in the evaluation's first draw, jittered,
``EvalSettings.faces_seed = 1000 + seed``), their 14x14 maps upsampled bilinearly to
28x28 (N = 307,721 templates), tau calibrated there (:func:`ecloss_fast.calibrate_tau`,
on the seed's maps) to each score spread of ``SPREADS``, and the cosine between the
full set's and the 400 subset's ECLoss gradients at those maps
(:func:`ecloss_fast.metrics.subset_gradient_cosine`, backend auto) with the run's
estimator and options. Written to ``DIR/cosine28.json``; the report reads it.

Cost: the full set scores every map against every template, ``N x K = 307,721 x 784 =
2.4e8`` multiply-adds per map for the loss and as many for its gradient, about 1e9
floating-point operations per map (the 400 subset and the calibration, which uses the
templates' ``K x K`` covariance, are small beside it; building that covariance once per
process takes ~30 s). One seed and spread is ``images x 64`` maps: with ``IMAGES = 4``,
256 maps, 2.5e11 operations; 5 seeds x 3 spreads, 3.8e12. Measured on the 2-core AMD EPYC
(AVX2), one torch thread: 0.055 s per map at load ~3 (about 4 minutes for 5 seeds); the
study's seed-0 model took 150 s for its three spreads, the 30 s covariance included, at
load 6-7 under ``nice -n 10`` (about 10 minutes for 5 seeds on a machine that busy).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

__all__ = ["IMAGES", "SIZE", "SPREADS", "SUBSET", "distinct_identities", "cosine_at", "measured_seeds",
           "measure_cosine28"]

IMAGES = 4  # held-out faces per seed
SIZE = 28  # the side of the maps measured
SPREADS = (1.0, 3.0, 10.0)  # the score spreads tau is calibrated to
SUBSET = 400  # the paper's evenly spaced subset


def distinct_identities(labels, count: int) -> list[int]:
    """Positions of the first image of each identity in ``labels``, in order, up to ``count``."""
    seen, chosen = set(), []
    for position, label in enumerate(np.asarray(labels).tolist()):
        if label not in seen and len(chosen) < count:
            seen.add(label)
            chosen.append(position)
    return chosen


def cosine_at(maps: torch.Tensor, size: int, spread: float, ecloss_config) -> tuple[float, float]:
    """``(tau, cosine)``: ``maps`` upsampled bilinearly to ``size x size``, tau calibrated
    there to ``spread`` over the full set, and the full-vs-``SUBSET`` gradient cosine with
    the loss options of ``ecloss_config`` (a :class:`train.config.ECLossConfig`)."""
    import ecloss_fast
    from ecloss_fast import metrics

    e = ecloss_config
    up = F.interpolate(maps.float(), size=(size, size), mode="bilinear", align_corners=False)
    tau = ecloss_fast.calibrate_tau(up, radius=e.radius, templates="full", spread=spread,
                                    normalize=e.normalize)
    cosine = metrics.subset_gradient_cosine(up, tau=tau, subset=SUBSET, estimator=e.estimator,
                                            radius=e.radius, normalize=e.normalize,
                                            diversity=e.diversity, backend="auto")
    return tau, float(cosine)


def measured_seeds(out: Path) -> list[int] | None:
    """The seeds ``out/cosine28.json`` measured; ``None`` when there is none."""
    path = out / "cosine28.json"
    return json.loads(path.read_text())["seeds"] if path.is_file() else None


def measure_cosine28(budget, out: Path, images: int = IMAGES, size: int = SIZE,
                     spreads=SPREADS) -> dict:
    """Measure for every secondary seed whose ``ecloss-s3`` run is evaluated under ``out``;
    writes and returns ``out/cosine28.json``."""
    from bench.__main__ import _device_name
    from train.checkpoint import load_for_eval
    from train.evaluate import first_draw
    from train.study import BRANCH_SOURCE, eval_settings

    if images < 1:
        raise ValueError(f"images must be at least 1, got {images}")
    device = budget.device if budget.device != "auto" else (
        "cuda" if torch.cuda.is_available() else "cpu")
    seeds = [seed for seed in budget.secondary_seeds
             if (out / "eval" / f"{BRANCH_SOURCE}-seed{seed}" / "metrics.json").is_file()]
    result = dict(arm=BRANCH_SOURCE, size=size, subset=SUBSET, images_per_seed=images,
                  spreads=list(spreads), seeds=seeds, runs={})
    start = time.time()
    bar = tqdm(total=len(seeds) * len(spreads), desc=f"cosine at {size}x{size}", unit="measurement")
    for seed in seeds:
        model, config = load_for_eval(out / "runs" / f"{BRANCH_SOURCE}-seed{seed}", device)
        drawn = first_draw(model, config, eval_settings(budget, seed), device=device)
        chosen = distinct_identities(drawn["label"], images)
        maps = drawn["maps"][chosen].to(device)
        run = dict(faces=[int(drawn["indices"][i]) for i in chosen], maps=int(maps.shape[0] * maps.shape[1]),
                   by_spread={})
        for spread in spreads:
            tau, cosine = cosine_at(maps, size, spread, config.ecloss)
            run["by_spread"][f"{spread:g}"] = dict(tau=tau, cosine=cosine)
            bar.update()
        result["runs"][str(seed)] = run
    bar.close()
    result.update(seconds=time.time() - start,
                  machine=dict(device=_device_name(torch.device(device)), cores=os.cpu_count(),
                               torch_threads=torch.get_num_threads()))
    (out / "cosine28.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
