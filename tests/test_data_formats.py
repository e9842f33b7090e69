"""Data sources: the synthetic faces, InsightFace RecordIO (written byte by byte), folders."""
import io
import json
import logging
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from train.data import BadDataError, collate_faces
from train.data.__main__ import main as data_main
from train.data.folder import ImageFolderFaces
from train.data.image import denormalize
from train.data.recordio import (MAGIC, RecordIndex, RecordIODataset, RecordIOWriter, pack_record,
                                 read_index, read_record, unpack_record, write_recordio)
from train.data.synthetic import PARTS, SyntheticFaces

# ---------------------------------------------------------------------------- synthetic


@pytest.fixture(scope="module")
def faces():
    return SyntheticFaces(num_identities=5, images_per_identity=4, size=96, seed=3)


def test_synthetic_item_format(faces):
    item = faces[7]
    assert item["image"].shape == (3, 96, 96) and item["image"].dtype == torch.float32
    assert -1 <= item["image"].min() and item["image"].max() <= 1
    assert item["label"] == 1 and faces.num_classes == 5 and len(faces) == 20
    assert item["landmarks"].shape == (68, 2) and item["landmarks"].dtype == torch.float32
    assert item["part_masks"].shape == (len(PARTS), 96, 96)
    assert item["part_masks"].dtype == torch.bool
    assert torch.equal(denormalize(item["image"]), torch.from_numpy(faces.raw_image(7)))


def test_synthetic_is_deterministic_and_varied(faces):
    again = SyntheticFaces(5, 4, size=96, seed=3)
    for index in (0, 13):
        a, b = faces[index], again[index]
        for key in ("image", "landmarks", "part_masks"):
            assert torch.equal(a[key], b[key]), key
    other_seed = SyntheticFaces(5, 4, size=96, seed=4)[0]
    assert not torch.equal(faces[0]["image"], other_seed["image"])
    # Two shots of one identity differ by pose; two identities differ in geometry.
    assert not torch.equal(faces[0]["landmarks"], faces[1]["landmarks"])
    assert faces.identity(0) != faces.identity(1)


@pytest.mark.parametrize("index", range(0, 20, 3))
def test_synthetic_landmarks_and_masks_agree(faces, index):
    item = faces[index]
    points, masks = item["landmarks"].numpy(), item["part_masks"].numpy()
    size = faces.size
    assert (points >= 0).all() and (points <= size - 1).all()
    assert masks.reshape(len(PARTS), -1).any(1).all(), "every part is drawn"
    assert (masks.sum(0) <= 1).all(), "parts are disjoint"
    part = {name: masks[k] for k, name in enumerate(PARTS)}
    skin = part["forehead"] | part["cheek"] | part["jaw"]

    def near(mask, point):  # the 3x3 pixels around the point (landmarks lie on outlines)
        x, y = np.round(point).astype(int)
        return mask[max(y - 1, 0):y + 2, max(x - 1, 0):x + 2].any()

    groups = {"jaw": (range(0, 17), skin), "brows": (range(17, 27), part["brows"]),
              "nose": (range(27, 36), part["nose"]), "eyes": (range(36, 48), part["eyes"]),
              "mouth": (range(48, 68), part["mouth"])}
    for name, (indices, mask) in groups.items():
        for i in indices:
            assert near(mask, points[i]), f"landmark {i} ({name}) outside its part"
    # The iBUG layout: image-left eye (36-41) left of the image-right eye (42-47), eyes
    # above the nose tip (33), the nose tip above the mouth (51, 57), chin (8) lowest.
    assert points[36:42, 0].mean() < points[42:48, 0].mean()
    assert points[36:48, 1].mean() < points[33, 1] < points[[51, 57], 1].mean() < points[8, 1]


def test_synthetic_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_identities"):
        SyntheticFaces(0, 3)
    with pytest.raises(ValueError, match="size"):
        SyntheticFaces(2, 3, size=16)
    with pytest.raises(IndexError):
        SyntheticFaces(2, 3)[6]


# ---------------------------------------------------------------------------- RecordIO

MAGIC_BYTES = struct.pack("<I", MAGIC)


def _png(seed, size=16):
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return pixels, buffer.getvalue()


def _png_with_magic(seed):
    """A PNG followed by trailing bytes (decoders ignore them) that hold the magic number
    at a 4-aligned offset of the record data (24-byte header + one float32 label)."""
    pixels, png = _png(seed)
    tail = b"\xab" * (-(28 + len(png)) % 4) + MAGIC_BYTES + b"tail"
    return pixels, png + tail


def _read_idx(path):
    """The ``key -> offset`` index, parsed here independently of the reader under test."""
    return dict(map(int, line.split("\t")) for line in path.read_text().splitlines())


def test_split_record_bytes_match_the_format(tmp_path):
    # Written out by hand from dmlc-core's RecordIOWriter::WriteRecord: the 4-aligned magic
    # number splits the record into a cflag=1 part and a cflag=3 part, its bytes dropped.
    data = b"abcd" + MAGIC_BYTES + b"xyz"
    expected = (MAGIC_BYTES + struct.pack("<I", (1 << 29) | 4) + b"abcd"
                + MAGIC_BYTES + struct.pack("<I", (3 << 29) | 3) + b"xyz\0")
    with RecordIOWriter(tmp_path / "a.rec", tmp_path / "a.idx") as writer:
        writer.write(5, data)
    assert (tmp_path / "a.rec").read_bytes() == expected
    assert (tmp_path / "a.idx").read_text() == "5\t0\n"
    with open(tmp_path / "a.rec", "rb") as handle:
        assert read_record(handle, 0) == data
    # Unaligned magic bytes do not split.
    unaligned = b"ab" + MAGIC_BYTES + b"cd"
    with RecordIOWriter(tmp_path / "b.rec", tmp_path / "b.idx") as writer:
        writer.write(0, unaligned)
    raw = (tmp_path / "b.rec").read_bytes()
    assert raw[:8] == MAGIC_BYTES + struct.pack("<I", len(unaligned)) and len(raw) == 8 + 8


def test_header_packing():
    header, body = unpack_record(pack_record(7, b"img", id=3, id2=4))
    assert (header.flag, header.label, header.id, header.id2, body) == (0, 7.0, 3, 4, b"img")
    header, body = unpack_record(pack_record([2.0, 5.0, 1.5], b"x"))
    assert header.flag == 3 and header.label.tolist() == [2.0, 5.0, 1.5] and body == b"x"
    # The 24-byte 'IfQQ' header, little-endian, then the float32 labels.
    assert pack_record([1.0], b"")[:8] == struct.pack("<If", 1, 0.0)


def test_recordio_round_trip(tmp_path):
    pictures, payloads = [], []
    for i, label in enumerate([0, 0, 1, 2, 2]):
        pixels, payload = _png_with_magic(i) if i == 2 else _png(i)
        pictures.append((pixels, label))
        payloads.append((label, payload))
    write_recordio(tmp_path / "train.rec", tmp_path / "train.idx", payloads)
    raw = (tmp_path / "train.rec").read_bytes()
    index = _read_idx(tmp_path / "train.idx")
    # Record 0 (the header) is written last; image 3 is split in two chunks.
    assert index[0] == max(index.values())
    flags = struct.unpack_from("<II", raw, index[3])
    assert flags[0] == MAGIC and flags[1] >> 29 == 1
    with open(tmp_path / "train.rec", "rb") as handle:
        header, body = unpack_record(read_record(handle, index[0]))
        assert header.flag == 2 and header.label.tolist() == [6.0, 9.0]  # images 1-5, ids 6-8
        header, body = unpack_record(read_record(handle, index[3]))
        assert header.flag == 1 and header.label.tolist() == [1.0] and body == payloads[2][1]
        header, _ = unpack_record(read_record(handle, index[7]))
        assert header.label.tolist() == [3.0, 4.0]  # identity 1 holds image key 3

    dataset = RecordIODataset(tmp_path / "train.rec", size=16)
    assert len(dataset) == 5 and dataset.num_classes == 3
    for i, (pixels, label) in enumerate(pictures):
        item = dataset[i]
        assert item["label"] == label
        assert torch.equal(denormalize(item["image"]), torch.from_numpy(pixels))


def test_recordio_without_header_record_counts_labels(tmp_path):
    with RecordIOWriter(tmp_path / "t.rec", tmp_path / "t.idx") as writer:
        for key, label in [(10, 4), (11, 1)]:
            writer.write(key, pack_record(label, _png(key)[1]))  # scalar labels, flag 0
    dataset = RecordIODataset(tmp_path / "t.rec", tmp_path / "t.idx", size=16)
    assert list(dataset.keys) == [10, 11] and dataset.num_classes == 5
    assert [dataset[i]["label"] for i in range(2)] == [4, 1]
    (tmp_path / "property").write_text("9,16,16\n")
    assert RecordIODataset(tmp_path / "t.rec", size=16).num_classes == 9


def _corrupt(tmp_path, how):
    images = [(i % 2, _png(i)[1]) for i in range(4)]
    write_recordio(tmp_path / "c.rec", tmp_path / "c.idx", images)
    index = _read_idx(tmp_path / "c.idx")
    raw = bytearray((tmp_path / "c.rec").read_bytes())
    if how == "magic":
        raw[index[2]:index[2] + 4] = b"\0\0\0\0"
    else:  # the image payload: after magic, lrec, 24-byte header and one label
        start = index[2] + 8 + 28
        raw[start:start + 40] = b"\x00" * 40
    (tmp_path / "c.rec").write_bytes(bytes(raw))
    return tmp_path / "c.rec"


@pytest.mark.parametrize("how, reason", [("magic", "bad magic number"), ("image", "cannot decode")])
def test_corrupt_record_is_reported_with_its_key(tmp_path, caplog, how, reason):
    rec = _corrupt(tmp_path, how)
    with pytest.raises(BadDataError, match=f"key 2.*{reason}"):
        RecordIODataset(rec, size=16)[1]
    skipping = RecordIODataset(rec, size=16, on_bad_data="skip")
    with caplog.at_level(logging.WARNING, logger="train.data"):
        items = [skipping[i] for i in range(len(skipping))]
    assert items[1] is None and all(item is not None for i, item in enumerate(items) if i != 1)
    assert "key 2" in caplog.text
    batch = collate_faces(items)
    assert batch["skipped"] == 1 and batch["image"].shape == (3, 3, 16, 16)
    assert batch["label"].tolist() == [0, 0, 1]


def _dict_of(lines):
    """What a ``dict`` filled line by line from an index holds (a repeated key: the last)."""
    pairs = (line.split() for line in lines if line.strip())
    return {int(key): int(offset) for key, offset in pairs}


@pytest.mark.parametrize("layout", ["InsightFace", "shuffled", "gaps", "repeated", "blank lines"])
def test_read_index_holds_what_the_file_says(tmp_path, layout):
    rng = np.random.default_rng(5)
    if layout == "InsightFace":  # keys 1..n, then record 0 last
        keys = [*range(1, 40), 0]
    elif layout == "shuffled":
        keys = rng.permutation(np.arange(3, 43)).tolist()
    elif layout == "gaps":
        keys = rng.choice(10_000, 40, replace=False).tolist()
    else:
        keys = [5, 9, 2, 9, 7, 5, 11]
    lines = [f"{key}\t{offset}" for key, offset in zip(keys, rng.integers(0, 2**40, len(keys)))]
    if layout == "blank lines":
        lines = ["", *lines[:3], "  ", *lines[3:], ""]
    (tmp_path / "t.idx").write_text("\n".join(lines) + "\n")
    index = read_index(tmp_path / "t.idx")
    expected = _dict_of(lines)
    assert len(index) == len(expected) and dict(index) == expected
    assert list(index) == sorted(expected)
    assert all(isinstance(key, int) for key in index)
    for key in expected:
        assert key in index and index[key] == expected[key]
    for absent in sorted(set(range(-2, max(expected) + 3)) - set(expected))[:50] + [2**70, "3"]:
        assert absent not in index and index.get(absent) is None
        with pytest.raises(KeyError):
            index[absent]


@pytest.mark.parametrize("keys", [range(4, 12), [4, 5, 6, 9, 10, 13]], ids=["contiguous", "gaps"])
def test_first_missing_key(keys):
    index = RecordIndex(list(keys), list(range(len(keys))))
    for start in range(0, 16):
        for stop in range(start, 17):
            absent = [k for k in range(start, stop) if k not in set(keys)]
            expected = absent[0] if absent else None
            assert index.first_missing(start, stop) == expected, (start, stop)


def test_malformed_index_lines_are_named(tmp_path):
    for text, line in [("1\t0\n2\t10\n3 x\n", 3), ("1\t0\n\n2\t5\t6\n", 3),
                       ("7\n8\n", 1), ("1\t0\n2\t-4\n", 2)]:
        (tmp_path / "bad.idx").write_text(text)
        with pytest.raises(ValueError, match=f"bad.idx:{line}: expected 'key<TAB>offset'"):
            read_index(tmp_path / "bad.idx")
    (tmp_path / "empty.idx").write_text("")
    assert len(read_index(tmp_path / "empty.idx")) == 0


def test_recordio_with_non_contiguous_keys(tmp_path):
    labels = {12: 2, 3: 0, 7: 1, 40: 0}
    with RecordIOWriter(tmp_path / "g.rec", tmp_path / "g.idx") as writer:
        for key, label in labels.items():
            writer.write(key, pack_record(label, _png(key)[1]))
    dataset = RecordIODataset(tmp_path / "g.rec", size=16)
    assert list(dataset.keys) == [3, 7, 12, 40] and dataset.num_classes == 3
    for i, key in enumerate(sorted(labels)):
        item = dataset[i]
        assert item["label"] == labels[key]
        assert torch.equal(denormalize(item["image"]), torch.from_numpy(_png(key)[0]))
    with pytest.raises(BadDataError, match="key 5: not in the index"):
        dataset.record(5)


@pytest.mark.parametrize("dropped", [1, 3, 5])
def test_image_key_missing_from_the_index_is_named(tmp_path, dropped):
    """Record 0 announces image keys 1..5; the index lacks one (first, middle, last)."""
    write_recordio(tmp_path / "m.rec", tmp_path / "m.idx", [(i % 2, _png(i)[1]) for i in range(5)])
    lines = (tmp_path / "m.idx").read_text().splitlines()
    (tmp_path / "m.idx").write_text("".join(f"{line}\n" for line in lines
                                            if int(line.split()[0]) != dropped))
    with pytest.raises(BadDataError, match=f"image key {dropped} announced by record 0 is not in"):
        RecordIODataset(tmp_path / "m.rec", size=16)


# ---------------------------------------------------------------------------- python -m train.data


@pytest.fixture
def rec_folder(tmp_path):
    pictures = [_png(i) for i in range(3)]
    write_recordio(tmp_path / "train.rec", tmp_path / "train.idx",
                   [(label, png) for label, (_, png) in zip([0, 1, 1], pictures)])
    return tmp_path, [pixels for pixels, _ in pictures]


def test_data_cli_info_and_get(rec_folder, capsys):
    folder, pixels = rec_folder
    assert data_main(["info", str(folder)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["format"], info["images"], info["identities"]) == ("recordio", 3, 2)
    out = folder / "face.png"
    assert data_main(["get", str(folder / "train.rec"), "-1", "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out) == dict(index=2, key=3, label=1, out=str(out))
    assert np.array_equal(np.asarray(Image.open(out)), pixels[2])


@pytest.mark.parametrize("arguments, message", [
    (["info", "{folder}/absent.rec"], "absent.rec: no such file or folder"),
    (["info", "{folder}/train.idx"], "not a .rec file, a .bin file or an image folder"),
    (["get", "{folder}", "0", "--out", "{folder}/no/face.png"], "the folder .* does not exist"),
    (["get", "{folder}", "0", "--out", "{folder}/face.txt"], ".txt is not an image format"),
    (["get", "{folder}", "0", "--out", "{folder}"], "is a folder; give an image file name"),
    (["get", "{folder}", "3", "--out", "{folder}/face.png"], "index 3 out of range for 3 images"),
    (["get", "{folder}", "5", "--out", "{folder}/face.png"], "index 5 out of range"),
])
def test_data_cli_user_errors(rec_folder, capsys, arguments, message):
    folder, _ = rec_folder
    before = sorted(folder.rglob("*"))
    assert data_main([a.format(folder=folder) for a in arguments]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\n") == 1
    assert re.search(message, error), error
    assert sorted(folder.rglob("*")) == before  # nothing written


def test_data_cli_corrupt_record_and_no_traceback(tmp_path):
    rec = _corrupt(tmp_path, "magic")
    (tmp_path / "train.idx").write_text((tmp_path / "c.idx").read_text())
    done = subprocess.run([sys.executable, "-m", "train.data", "get", str(rec), "1", "--out",
                           str(tmp_path / "face.png")], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], timeout=120, check=False)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.startswith("error: ") and "key 2 (byte" in done.stderr
    assert "bad magic number" in done.stderr and not (tmp_path / "face.png").exists()


# ---------------------------------------------------------------------------- folders


def test_image_folder(tmp_path, caplog):
    expected = {}
    for name, label in (("bob", 1), ("alice", 0)):
        (tmp_path / name / "sub").mkdir(parents=True)
        for i in range(2):
            pixels, png = _png(10 * label + i)
            path = tmp_path / name / ("sub" if i else "") / f"{i}.png"
            path.write_bytes(png)
            expected[str(path)] = (pixels, label)
    (tmp_path / "bob" / "notes.txt").write_text("not an image")
    dataset = ImageFolderFaces(tmp_path, size=16)
    assert dataset.classes == ["alice", "bob"] and dataset.num_classes == 2 and len(dataset) == 4
    for i, (path, label) in enumerate(dataset.samples):
        item = dataset[i]
        assert item["label"] == label == expected[path][1]
        assert torch.equal(denormalize(item["image"]), torch.from_numpy(expected[path][0]))

    bad = tmp_path / "alice" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    stopping = ImageFolderFaces(tmp_path, size=16)
    broken = [path for path, _ in stopping.samples].index(str(bad))
    with pytest.raises(BadDataError, match="broken.jpg"):
        stopping[broken]
    with caplog.at_level(logging.WARNING, logger="train.data"):
        assert ImageFolderFaces(tmp_path, size=16, on_bad_data="skip")[broken] is None
    assert "broken.jpg" in caplog.text


def test_image_folder_resizes_and_rejects_empty(tmp_path):
    (tmp_path / "a").mkdir()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "a" / "x.jpg")
    assert ImageFolderFaces(tmp_path, size=16)[0]["image"].shape == (3, 16, 16)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        ImageFolderFaces(tmp_path / "empty", size=16)
