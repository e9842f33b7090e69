"""Inspect face data: ``python -m train.data info PATH`` and ``get PATH INDEX --out FILE.png``.

PATH is an InsightFace RecordIO file (``train.rec``, its ``.idx`` beside it, or the folder
holding them), an image folder with one sub-folder per identity, or an InsightFace
verification ``.bin`` file. ``info`` prints the format and the numbers of images and
identities as JSON; ``get`` writes image INDEX as stored (no resizing) and prints its label.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

from PIL import Image

from train.data.folder import ImageFolderFaces
from train.data.image import BadDataError
from train.data.recordio import RecordIODataset
from train.verification import load_bin


def _open(path: Path):
    """``(format, reader)`` for PATH; the reader has ``info()`` and ``get(index)``."""
    if path.is_dir() and (path / "train.rec").is_file():
        path = path / "train.rec"
    if path.suffix == ".rec":
        return _RecordIO(path)
    if path.suffix == ".bin":
        return _Bin(path)
    if path.is_dir():
        return _Folder(path)
    raise ValueError(f"{path}: not a .rec file, a .bin file or an image folder")


def _check_paths(args) -> None:
    """User errors in the paths, found before any data is read or file written."""
    if not args.path.exists():
        raise FileNotFoundError(f"{args.path}: no such file or folder")
    if args.command != "get":
        return
    out = args.out
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; give an image file name such as face.png")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"--out {out}: the folder {out.parent} does not exist")
    if out.suffix.lower() not in Image.registered_extensions():
        raise ValueError(f"--out {out}: {out.suffix or 'no suffix'} is not an image format "
                         "Pillow writes; use .png or .jpg")


class _RecordIO:
    format = "recordio"

    def __init__(self, path: Path):
        self.data = RecordIODataset(path)

    def info(self) -> dict:
        return dict(images=len(self.data), identities=self.data.num_classes)

    def get(self, index: int) -> tuple[bytes, dict]:
        key = int(self.data.keys[index])
        header, payload = self.data.record(key)
        label = header.label if header.flag == 0 else header.label[0]
        return payload, dict(index=index, key=key, label=int(label))


class _Folder:
    format = "image-folder"

    def __init__(self, path: Path):
        self.data = ImageFolderFaces(path)

    def info(self) -> dict:
        return dict(images=len(self.data), identities=self.data.num_classes)

    def get(self, index: int) -> tuple[bytes, dict]:
        path, label = self.data.samples[index]
        return Path(path).read_bytes(), dict(index=index, label=label,
                                             identity=self.data.classes[label], path=path)


class _Bin:
    format = "insightface-bin"

    def __init__(self, path: Path):
        self.bins, self.issame = load_bin(path)

    def info(self) -> dict:
        return dict(images=len(self.bins), identities=None, pairs=len(self.issame),
                    same_pairs=int(self.issame.sum()))

    def get(self, index: int) -> tuple[bytes, dict]:
        return self.bins[index], dict(index=index, pair=index // 2, issame=bool(self.issame[index // 2]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.data", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser("info", help="format, number of images and identities (JSON)")
    info.add_argument("path", type=Path)
    get = commands.add_parser("get", help="write one image and print its label")
    get.add_argument("path", type=Path)
    get.add_argument("index", type=int)
    get.add_argument("--out", type=Path, required=True, help="image file to write (.png, .jpg)")
    args = parser.parse_args(argv)
    try:
        _check_paths(args)
        reader = _open(args.path)
        if args.command == "info":
            print(json.dumps(dict(format=reader.format, path=str(args.path), **reader.info())))
            return 0
        size = reader.info()["images"]
        if not -size <= args.index < size:
            raise IndexError(f"index {args.index} out of range for {size} images")
        data, label = reader.get(args.index % size)
        try:
            with Image.open(io.BytesIO(data)) as image:
                picture = image.convert("RGB")
        except (OSError, ValueError) as error:
            raise BadDataError(f"{args.path} image {args.index}: its {len(data)} bytes do not "
                               f"decode as an image ({type(error).__name__})") from error
        picture.save(args.out)
        print(json.dumps(dict(label, out=str(args.out))))
        return 0
    except (ValueError, IndexError, OSError, BadDataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
