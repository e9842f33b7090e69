"""Does identity live in the parts? The gate of the synthetic world: ``python -m train.gate``.

    python -m train.gate --out DIR [--budget study] [--epochs N] [--images-per-identity N]

Trains the study's softmax network (its architecture, training faces and budget,
``train.study.BUDGETS``) on the faces of ``identity="parts"`` and identifies held-out shots
of the training identities (images it never saw, drawn like the training ones): once as
drawn, once with the inner parts (brows, eyes, nose, mouth) erased, i.e. not drawn, so the
skin beneath shows and nothing else in the image changes. The gate passes when the drawn
shots are identified at least ``PRESENT_MIN_OVER_CHANCE`` times as often as chance, with
the 95% interval above chance, and the erased ones at chance (the 95% interval reaches
down to chance): the network needs the inner parts, and nothing else tells who it is.

Beside the network: leave-one-out 1-nearest-neighbour on hand-made features of the same
held-out shots (``OUTER_FEATURES``: hair and skin colour, hair and face area, face aspect;
``INNER_FEATURES``: the colours of brows, eyes and mouth and the nose's shade), which need
no training and show where identity is. ``DIR/gate.json`` holds every number, chance, the
criteria and the training run's wall time; the run is kept under ``DIR/runs`` and a second
call resumes it.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

__all__ = ["PRESENT_MIN_OVER_CHANCE", "OUTER_FEATURES", "INNER_FEATURES", "outer_features",
           "inner_features", "nearest_neighbour_accuracy", "wilson_interval", "run_gate", "main"]

# The criteria, fixed before the gate was first run.
PRESENT_MIN_OVER_CHANCE = 10.0  # drawn shots: top-1 at least this many times chance
HELD_OUT_SHOTS = 8  # per identity

OUTER_FEATURES = ("hair R", "hair G", "hair B", "skin R", "skin G", "skin B", "hair area",
                  "face area", "face aspect")
INNER_FEATURES = ("brows R", "brows G", "brows B", "eyes R", "eyes G", "eyes B", "mouth R",
                  "mouth G", "mouth B", "nose / skin R", "nose / skin G", "nose / skin B")


def _part_means(image: np.ndarray, masks: dict, name: str) -> np.ndarray:
    mask = masks[name]
    return image[mask].mean(0) if mask.any() else np.zeros(3)


def _named_masks(masks: np.ndarray) -> dict:
    from train.data.synthetic import PARTS

    named = dict(zip(PARTS, masks))
    named["skin"] = named["forehead"] | named["cheek"] | named["jaw"]
    named["face"] = named["skin"] | named["brows"] | named["eyes"] | named["nose"] | named["mouth"]
    return named


def outer_features(image: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """``OUTER_FEATURES`` of one ``uint8 (S, S, 3)`` face and its ``(8, S, S)`` part masks."""
    image, named = image.astype(np.float64), _named_masks(masks)
    rows, columns = np.nonzero(named["face"])
    aspect = (np.ptp(rows) + 1) / (np.ptp(columns) + 1)
    return np.concatenate([_part_means(image, named, "hair"), _part_means(image, named, "skin"),
                           [named["hair"].sum(), named["face"].sum(), aspect]])


def inner_features(image: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """``INNER_FEATURES``: mean colours of brows, eyes and mouth, and the nose's colour over
    the skin's (the shade, free of the lighting and the skin tone)."""
    image, named = image.astype(np.float64), _named_masks(masks)
    skin = np.maximum(_part_means(image, named, "skin"), 1.0)
    return np.concatenate([_part_means(image, named, part) for part in ("brows", "eyes", "mouth")]
                          + [_part_means(image, named, "nose") / skin])


def nearest_neighbour_accuracy(features: np.ndarray, labels: np.ndarray) -> float:
    """Leave-one-out 1-nearest-neighbour accuracy, Euclidean on features standardised to
    unit variance (a constant feature is left as it is); ties go to the lower index."""
    features = np.asarray(features, np.float64)
    spread = features.std(0)
    scaled = (features - features.mean(0)) / np.where(spread > 0, spread, 1.0)
    distance = ((scaled[:, None] - scaled[None]) ** 2).sum(-1)
    np.fill_diagonal(distance, np.inf)
    return float((labels[distance.argmin(1)] == labels).mean())


def wilson_interval(successes: int, trials: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The 95% Wilson score interval of a binomial proportion."""
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return centre - half, centre + half


def _classifier(run_dir: Path, device: str):
    """The trained backbone and softmax head of a run's last checkpoint, in eval mode."""
    from models import build_head
    from train.checkpoint import load_checkpoint, model_from_state, resolve_checkpoint

    state = load_checkpoint(resolve_checkpoint(run_dir), map_location=device)
    model, config = model_from_state(state, device)
    classes = next(iter(state["head"].values())).shape[0]
    head = build_head(config.head.kind, config.model.embedding_dim, classes)
    head.load_state_dict(state["head"])
    return model, head.to(device).eval()


@torch.no_grad()
def _identified(model, head, faces, indices, device: str, batch_size: int, desc: str) -> int:
    """How many of the items ``indices`` the network gives their own label as its top-1."""
    correct = 0
    for start in tqdm(range(0, len(indices), batch_size), desc=desc, leave=False):
        items = [faces[i] for i in indices[start:start + batch_size]]
        images = torch.stack([item["image"] for item in items]).to(device)
        labels = torch.tensor([item["label"] for item in items], device=device)
        logits = head(model(images).embedding)
        correct += int((logits.argmax(1) == labels).sum())
    return correct


def _features(faces, indices) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    outer, inner, labels = [], [], []
    for index in tqdm(indices, desc="hand-made features", leave=False):
        image, label, _, masks = faces._render(index)
        outer.append(outer_features(image, masks))
        inner.append(inner_features(image, masks))
        labels.append(label)
    return np.array(outer), np.array(inner), np.array(labels)


def _score(correct: int, total: int, chance: float) -> dict:
    low, high = wilson_interval(correct, total)
    return dict(top1=correct / total, correct=correct, images=total, interval95=[low, high],
                over_chance=correct / total / chance)


def run_gate(budget, out: Path, seed: int = 0, held_out: int = HELD_OUT_SHOTS) -> dict:
    """Train (or resume) the study's softmax arm on ``budget`` and score the gate; the
    result is also written to ``out/gate.json``."""
    from bench.__main__ import _device_name
    from train.data.synthetic import INNER_PARTS, SyntheticFaces
    from train.study import ARMS, _train_or_resume, arm_config, render_training_set, training_set_path

    if budget.identity != "parts":
        raise ValueError(f"the gate asks whether identity lives in the parts; budget.identity "
                         f"must be 'parts', got {budget.identity!r}")
    device = budget.device if budget.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    out.mkdir(parents=True, exist_ok=True)
    rec_path = training_set_path(budget, out)
    render_training_set(budget.identities, budget.images_per_identity, budget.input_size, rec_path,
                        jitter=budget.jitter, identity=budget.identity)
    softmax = next(arm for arm in ARMS if arm.ecloss is None)
    config = arm_config(budget, softmax, seed, out / "runs", rec_path)
    start = time.time()
    run_dir = _train_or_resume(config)
    train_seconds = time.time() - start
    if run_dir is None:
        raise SystemExit(f"stopped; run the same command again to resume from {out}")

    # Shots past images_per_identity: the training identities in images no run saw.
    per = budget.images_per_identity + held_out
    indices = [label * per + shot for label in range(budget.identities)
               for shot in range(budget.images_per_identity, per)]
    drawn = dict(num_identities=budget.identities, images_per_identity=per, size=budget.input_size,
                 seed=0, jitter=budget.jitter, identity=budget.identity)
    present, erased = SyntheticFaces(**drawn), SyntheticFaces(**drawn, erase=INNER_PARTS)
    model, head = _classifier(run_dir, device)
    chance = 1 / budget.identities
    scores = {name: _score(_identified(model, head, faces, indices, device, budget.batch_size,
                                       f"identify ({name})"), len(indices), chance)
              for name, faces in (("present", present), ("erased", erased))}
    outer, inner, labels = _features(present, indices)
    result = dict(
        chance=chance, held_out_shots_per_identity=held_out, seed=seed,
        network=scores,
        nearest_neighbour={"outer features": nearest_neighbour_accuracy(outer, labels),
                           "inner-part features": nearest_neighbour_accuracy(inner, labels)},
        criteria=dict(present=f"top-1 >= {PRESENT_MIN_OVER_CHANCE:g} x chance and the 95% "
                              "interval above chance",
                      erased="the 95% interval reaches down to chance"),
        passed=dict(present=scores["present"]["top1"] >= PRESENT_MIN_OVER_CHANCE * chance
                    and scores["present"]["interval95"][0] > chance,
                    erased=scores["erased"]["interval95"][0] <= chance),
        train_seconds=train_seconds, resumed=bool(config.train.resume),
        machine=dict(device=_device_name(torch.device(device)), cores=os.cpu_count(),
                     torch_threads=torch.get_num_threads()),
        run_dir=str(run_dir), budget=asdict(budget))
    result["passed"]["gate"] = result["passed"]["present"] and result["passed"]["erased"]
    (out / "gate.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    return result


def summary(result: dict) -> str:
    """The gate's numbers in a few lines."""
    lines = [f"chance {result['chance']:.4f} ({result['budget']['identities']} identities); "
             f"{result['network']['present']['images']} held-out shots"]
    for name, score in result["network"].items():
        low, high = score["interval95"]
        lines.append(f"network, inner parts {name}: top-1 {score['top1']:.3f} [{low:.3f}, {high:.3f}] "
                     f"({score['over_chance']:.1f} x chance)")
    for name, accuracy in result["nearest_neighbour"].items():
        lines.append(f"1-NN on {name}: {accuracy:.3f}")
    verdict = "passed" if result["passed"]["gate"] else "FAILED"
    lines.append(f"gate {verdict} (present: {result['passed']['present']}, erased: "
                 f"{result['passed']['erased']}); training {result['train_seconds']:.0f} s"
                 f"{' since the resume' if result['resumed'] else ''}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    from train.study import BUDGETS

    parser = argparse.ArgumentParser(prog="python -m train.gate", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/gate",
                        help="output directory (one per budget: a second call resumes its run)")
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="study")
    parser.add_argument("--epochs", type=int, help="override the budget's epochs")
    parser.add_argument("--images-per-identity", type=int,
                        help="override the budget's training images per identity")
    parser.add_argument("--seed", type=int, default=0, help="training seed")
    parser.add_argument("--held-out", type=int, default=HELD_OUT_SHOTS,
                        help="held-out shots per identity")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    overrides = dict(epochs=args.epochs, images_per_identity=args.images_per_identity)
    for name, value in [*overrides.items(), ("held_out", args.held_out)]:
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    budget = replace(BUDGETS[args.budget], device=args.device, identity="parts",
                     **{name: value for name, value in overrides.items() if value is not None})
    result = run_gate(budget, Path(args.out), seed=args.seed, held_out=args.held_out)
    print(summary(result))
    return result


if __name__ == "__main__":
    main()
