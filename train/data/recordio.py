"""InsightFace RecordIO (``train.rec`` + ``train.idx``) in pure Python, without mxnet.

The format is dmlc-core's RecordIO as MXNet's ``MXIndexedRecordIO`` writes it, which is
how Glint360K, MS1M and WebFace are distributed:

- ``.rec``: a sequence of chunks, each ``uint32 magic 0xCED7230A``, ``uint32 lrec`` with
  ``cflag = lrec >> 29`` and ``length = lrec & (2**29 - 1)``, then ``length`` bytes padded
  with zeros to a multiple of 4. The writer splits a record wherever its data holds the
  magic number at a 4-aligned offset and drops those four bytes: ``cflag`` is 0 for a
  whole record, 1 for the first part, 2 for a middle part, 3 for the last; the reader puts
  the magic number back between the parts.
- ``.idx``: text lines ``key<TAB>byte offset``.
- a record's data: the ``IfQQ`` header (``flag``, float ``label``, ``id``, ``id2``, 24 bytes,
  little-endian), then when ``flag > 0`` that many float32 labels, then the payload (an
  encoded image).
- InsightFace's layout: record 0 is a header whose two labels ``(a, b)`` say that image
  keys are ``1 .. a-1`` and identity records ``a .. b-1`` (one per identity, its labels the
  range of its image keys). im2rec writes record 0 last, so it is found through the index.
"""
from __future__ import annotations

import bisect
import hashlib
import io
import math
import operator
import os
import struct
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Iterable, NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from train.data.image import BadDataError, decode_image, handle_bad_data, normalize

__all__ = ["MAGIC", "RecordHeader", "RecordIOWriter", "pack_record", "unpack_record",
           "read_record", "read_index", "RecordIndex", "write_recordio", "RecordIODataset"]

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_LENGTH_BITS = 29
_HEADER = struct.Struct("<IfQQ")


class RecordHeader(NamedTuple):
    """``flag`` is the number of float32 labels after the header (0: ``label`` is the label)."""

    flag: int
    label: float | np.ndarray
    id: int
    id2: int


def pack_record(label, payload: bytes, id: int = 0, id2: int = 0) -> bytes:
    """Record data for ``label`` (a number, or a sequence stored as a ``flag > 0`` array)."""
    if np.ndim(label) == 0:
        return _HEADER.pack(0, float(label), id, id2) + payload
    labels = np.asarray(label, dtype="<f4").ravel()
    return _HEADER.pack(labels.size, 0.0, id, id2) + labels.tobytes() + payload


def unpack_record(data: bytes) -> tuple[RecordHeader, bytes]:
    """Inverse of :func:`pack_record`; raises ``ValueError`` for data too short."""
    if len(data) < _HEADER.size:
        raise ValueError(f"record of {len(data)} bytes is shorter than its {_HEADER.size}-byte header")
    flag, label, id_, id2 = _HEADER.unpack_from(data)
    body = data[_HEADER.size:]
    if flag > 0:
        if len(body) < 4 * flag:
            raise ValueError(f"record header announces {flag} labels but holds {len(body)} bytes")
        label = np.frombuffer(body, dtype="<f4", count=flag).copy()
        body = body[4 * flag:]
    return RecordHeader(flag, label, id_, id2), body


def _chunk(cflag: int, data: bytes) -> bytes:
    padding = b"\0" * (-len(data) % 4)
    return _MAGIC_BYTES + struct.pack("<I", (cflag << _LENGTH_BITS) | len(data)) + data + padding


def _frame(data: bytes) -> bytes:
    """dmlc-core ``RecordIOWriter::WriteRecord``: split at every 4-aligned magic number."""
    if len(data) >= 1 << _LENGTH_BITS:
        raise ValueError(f"a record holds less than 2**29 bytes, got {len(data)}")
    chunks, start = [], 0
    for offset in range(0, len(data) - 3, 4):
        if data[offset:offset + 4] == _MAGIC_BYTES:
            chunks.append(_chunk(1 if start == 0 else 2, data[start:offset]))
            start = offset + 4
    chunks.append(_chunk(3 if start else 0, data[start:]))
    return b"".join(chunks)


class RecordIOWriter:
    """Writes records and the index; ``with RecordIOWriter(rec, idx) as w: w.write(key, data)``."""

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike):
        self._rec = open(rec_path, "wb")
        self._idx = open(idx_path, "w")

    def write(self, key: int, data: bytes) -> None:
        self._idx.write(f"{key}\t{self._rec.tell()}\n")
        self._rec.write(_frame(data))

    def close(self) -> None:
        self._rec.close()
        self._idx.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write_recordio(rec_path, idx_path, images: Iterable[tuple[int, bytes]]) -> None:
    """Write ``(label, encoded image)`` pairs in InsightFace's layout.

    Images get keys ``1..n`` (labels stored as ``flag > 0`` one-element arrays, as
    InsightFace's tools do), then one record per identity, then the header record 0, last
    in the file as im2rec writes it.
    """
    images = list(images)
    ranges: dict[int, list[int]] = {}
    with RecordIOWriter(rec_path, idx_path) as writer:
        for key, (label, payload) in enumerate(images, start=1):
            writer.write(key, pack_record([float(label)], payload))
            ranges.setdefault(int(label), []).append(key)
        first_identity = len(images) + 1
        for offset, label in enumerate(sorted(ranges)):
            keys = ranges[label]
            writer.write(first_identity + offset, pack_record([keys[0], keys[-1] + 1], b""))
        writer.write(0, pack_record([first_identity, first_identity + len(ranges)], b""))


def _place_by_key(positions: np.ndarray, offsets: np.ndarray) -> np.ndarray | None:
    """``offsets`` reordered so that entry ``i`` is the one at position ``i``, when the
    positions are a permutation of ``0 .. n-1`` (InsightFace's keys, record 0 written last);
    else ``None``. A scatter, without the memory and time of a sort."""
    if positions.size and int(positions.max()) != positions.size - 1:
        return None
    filled = np.zeros(positions.size, dtype=bool)
    filled[positions] = True
    if not filled.all():  # n positions in n slots leave one empty only if one repeats
        return None
    placed = np.empty(positions.size, dtype=np.int64)
    placed[positions] = offsets
    return placed


def _sort_by_key(keys: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Keys increasing and their offsets; a key listed twice keeps its last offset."""
    if keys.size > 1 and not (keys[1:] > keys[:-1]).all():
        order = np.argsort(keys, kind="stable")  # a repeated key's entries stay in file order
        keys, offsets = keys[order], offsets[order]
        last_of_run = np.append(keys[1:] != keys[:-1], True)
        if not last_of_run.all():
            keys, offsets = keys[last_of_run], offsets[last_of_run]
    return np.ascontiguousarray(keys), np.ascontiguousarray(offsets)


class RecordIndex(Mapping):
    """The ``key -> byte offset`` table of an ``.idx`` file, as NumPy arrays.

    A ``dict`` of Python ints costs ~140 bytes per record (2.3 GiB for Glint360K's 17.45M
    records), and a forked DataLoader worker copies every page of it that it reads, because
    reading an object writes its reference count. Here the offsets are one int64 array in
    key order (8 bytes per record, pages shared with the workers) and the keys are either
    implied, when they are ``first .. first + n - 1`` as InsightFace's are, or a second
    sorted int64 array searched with ``np.searchsorted``. Iteration is in increasing key
    order; a key listed twice keeps its last offset, as a ``dict`` built from the file would.
    """

    def __init__(self, keys, offsets):
        keys = np.asarray(keys, dtype=np.int64)  # a column of the parsed table: no copy
        offsets = np.asarray(offsets, dtype=np.int64)
        if keys.ndim != 1 or keys.shape != offsets.shape:
            raise ValueError(f"keys and offsets must be 1-D and of one length; got shapes "
                             f"{keys.shape} and {offsets.shape}")
        self._first = int(keys.min()) if keys.size else 0
        by_key = _place_by_key(keys - self._first, offsets)
        if by_key is not None:
            self._offsets, self._keys = by_key, None
        else:
            keys, self._offsets = _sort_by_key(keys, offsets)
            contiguous = int(keys[-1]) - self._first == keys.size - 1  # once repeats are gone
            self._keys = None if contiguous else keys
            keys.flags.writeable = False
        self._offsets.flags.writeable = False

    def _position(self, key) -> int | None:
        try:
            key = operator.index(key)
        except TypeError:
            return None
        if not _INT64.min <= key <= _INT64.max:
            return None
        if self._keys is None:
            position = key - self._first
            return position if 0 <= position < self._offsets.size else None
        position = int(np.searchsorted(self._keys, key))
        found = position < self._keys.size and int(self._keys[position]) == key
        return position if found else None

    def __getitem__(self, key) -> int:
        position = self._position(key)
        if position is None:
            raise KeyError(key)
        return int(self._offsets[position])

    def __contains__(self, key) -> bool:
        return self._position(key) is not None

    def __len__(self) -> int:
        return self._offsets.size

    def __iter__(self):
        return map(int, self.sorted_keys())

    def sorted_keys(self) -> range | np.ndarray:
        """Every key, increasing: a ``range`` when they are contiguous, else a read-only
        int64 array (no copy either way)."""
        if self._keys is None:
            return range(self._first, self._first + self._offsets.size)
        return self._keys

    def sha256(self) -> str:
        """SHA-256 of the table: its keys and their offsets, in key order."""
        keys = self.sorted_keys()
        digest = hashlib.sha256(repr(keys).encode() if isinstance(keys, range) else keys.tobytes())
        digest.update(self._offsets.tobytes())
        return digest.hexdigest()

    def first_missing(self, start: int, stop: int) -> int | None:
        """The smallest key of ``start .. stop - 1`` that the index lacks, or ``None``."""
        if stop <= start:
            return None
        if self._keys is None:
            end = self._first + self._offsets.size
            if start < self._first:
                return start
            return max(start, end) if stop > end else None
        low, high = np.searchsorted(self._keys, [start, stop])
        if high - low == stop - start:
            return None  # unique keys: as many in the range as it holds, so all of them
        present = self._keys[low:high]
        gaps = np.flatnonzero(present != np.arange(start, start + present.size))
        return start + int(gaps[0]) if gaps.size else start + present.size


_INT64 = np.iinfo(np.int64)


def _first_malformed_line(idx_path) -> str | None:
    """``"path:line: ..."`` for the first line of ``idx_path`` that is not two integers
    in ``0 .. 2**63 - 1``, or ``None``."""
    with open(idx_path) as handle:
        for number, line in enumerate(handle, start=1):
            fields = line.split()
            if not fields:
                continue
            try:
                if len(fields) == 2 and all(0 <= int(f) <= _INT64.max for f in fields):
                    continue
            except ValueError:
                pass
            return (f"{idx_path}:{number}: expected 'key<TAB>offset', two non-negative "
                    f"integers, got {line!r}")
    return None


def read_index(idx_path: str | os.PathLike) -> RecordIndex:
    """``key -> byte offset`` from an ``.idx`` file (lines ``key<TAB>offset``; blank lines
    are ignored); a malformed line raises ``ValueError`` naming it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="loadtxt: input contained no data")
        try:
            table = np.loadtxt(idx_path, dtype=np.int64, ndmin=2, comments=None)
        except ValueError as error:
            table, problem = None, f"{idx_path}: {error}"
    if table is None or (table.size and (table.shape[1] != 2 or table.min() < 0)):
        # NumPy counts data rows, not file lines: find the line to name.
        raise ValueError(_first_malformed_line(idx_path) or problem)
    if not table.size:
        return RecordIndex(np.empty(0, np.int64), np.empty(0, np.int64))
    return RecordIndex(table[:, 0], table[:, 1])


def read_record(handle: io.BufferedIOBase, offset: int) -> bytes:
    """The record data starting at byte ``offset``, its parts joined; ``ValueError`` if corrupt."""
    handle.seek(offset)
    parts, expected = [], (0, 1)  # a record starts whole or with its first part
    while True:
        head = handle.read(8)
        if len(head) < 8:
            raise ValueError(f"file ends inside a record header at byte {handle.tell()}")
        magic, lrec = struct.unpack("<II", head)
        if magic != MAGIC:
            raise ValueError(f"bad magic number {magic:#010x} at byte {handle.tell() - 8}")
        cflag, length = lrec >> _LENGTH_BITS, lrec & ((1 << _LENGTH_BITS) - 1)
        if cflag not in expected:
            raise ValueError(f"unexpected chunk flag {cflag} at byte {handle.tell() - 8}")
        data = handle.read(length + (-length % 4))
        if len(data) < length:
            raise ValueError(f"file ends inside a record of {length} bytes")
        parts.append(data[:length])
        if cflag in (0, 3):
            return _MAGIC_BYTES.join(parts)
        expected = (2, 3)


class RecordIODataset(torch.utils.data.Dataset):
    """Images of an InsightFace ``.rec``/``.idx`` pair; item -> ``dict(image, label)``.

    ``idx_path`` defaults to the ``.rec`` path with ``.idx``. ``keys`` (a ``range``, or an
    int64 array when the index has gaps) are the image keys: those the header record 0
    announces (``1 .. a-1``, each checked to be in the index) or, without one, every key of
    the index but 0, increasing. ``index`` is the file's :class:`RecordIndex`. The number
    of classes is, in this order: ``num_classes``, the first field of a ``property`` file
    beside the ``.rec`` (InsightFace's), the identity-record range of record 0, or the
    largest label read from every record (with a progress bar). A corrupt record, or a
    label that is not an integer from 0 to ``num_classes - 1``, raises
    :class:`BadDataError` naming its key and offset, or is reported and skipped
    (``on_bad_data="skip"``); so does a record 0 whose ranges disagree with the identity
    records or the index (skipped: reported, and its image keys are used).
    """

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike | None = None,
                 size: int = 112, on_bad_data: str = "stop", num_classes: int | None = None):
        if on_bad_data not in ("skip", "stop"):
            raise ValueError(f"on_bad_data must be 'skip' or 'stop', got {on_bad_data!r}")
        self.rec_path = Path(rec_path)
        self.idx_path = Path(idx_path) if idx_path is not None else self.rec_path.with_suffix(".idx")
        for path in (self.rec_path, self.idx_path):
            if not path.is_file():
                raise FileNotFoundError(f"RecordIO file not found: {path}")
        self.size, self.on_bad_data = size, on_bad_data
        self.index = read_index(self.idx_path)
        self._handle, self._pid = None, None
        identity_classes = None
        self.keys = self.index.sorted_keys()
        if 0 in self.index:
            header, _ = self.record(0)
            if header.flag > 0:
                first_identity, end = int(header.label[0]), int(header.label[1])
                self.keys = range(1, first_identity)
                identity_classes = end - first_identity
                missing = self.index.first_missing(1, first_identity)
                if missing is not None:
                    raise BadDataError(f"{self.idx_path}: image key {missing} announced by "
                                       "record 0 is not in the index")
                problem = self._header_problem(first_identity, end)
                if problem is not None:
                    handle_bad_data(BadDataError(f"{self.rec_path} record 0: {problem}"),
                                    on_bad_data)
            else:
                self.keys = self.keys[1:]  # keys are non-negative: 0 is the first
        self.num_classes = (num_classes or self._property_classes() or identity_classes
                            or self._scan_classes())

    def _file(self):
        # One handle per process: DataLoader workers are forked and must not share offsets.
        if self._handle is None or self._pid != os.getpid():
            self._handle, self._pid = open(self.rec_path, "rb"), os.getpid()
        return self._handle

    def record(self, key: int) -> tuple[RecordHeader, bytes]:
        """The header and payload of record ``key``; :class:`BadDataError` naming the key
        (and byte offset) when it is not in the index or does not parse."""
        offset = self.index.get(key)
        if offset is None:
            raise BadDataError(f"{self.rec_path} key {key}: not in the index {self.idx_path}")
        try:
            return unpack_record(read_record(self._file(), offset))
        except ValueError as error:
            raise BadDataError(f"{self.rec_path} key {key} (byte {offset}): {error}") from error

    def _header_problem(self, first_identity: int, end: int) -> str | None:
        """Why record 0's ranges (image keys ``1 .. first_identity - 1``, identity records
        ``first_identity .. end - 1``) do not describe the file, or ``None``: the first
        identity record must start at image key 1, the last one end at ``first_identity``,
        and the index must hold no key past ``end - 1``."""
        announced = (f"it announces image keys 1..{first_identity - 1} and identity records "
                     f"{first_identity}..{end - 1}")
        keys = self.index.sorted_keys()
        beyond = len(keys) - bisect.bisect_left(keys, end)
        if beyond:
            return f"{announced}, but the index holds {beyond} more keys after them"
        if end <= first_identity:
            return None  # no identity records to compare with
        for key, position, expected in ((first_identity, 0, 1), (end - 1, 1, first_identity)):
            header, _ = self.record(key)
            found = header.label[position] if header.flag >= 2 else None
            if found != expected:
                what = "start" if position == 0 else "end"
                return (f"{announced}, but record {key} is not an identity record whose images "
                        f"{what} at key {expected} (its labels: {header.label})")
        return None

    def _label(self, header: RecordHeader, key: int) -> int:
        """The class of a record: its (first) label, which must be an integer from 0 to
        ``num_classes - 1`` (any integer >= 0 while the classes are being counted);
        :class:`BadDataError` naming the key otherwise."""
        value = float(header.label if header.flag == 0 else header.label[0])
        limit = getattr(self, "num_classes", math.inf)
        if math.isfinite(value) and value.is_integer() and 0 <= value < limit:
            return int(value)
        classes = f"0 to {limit - 1}" if limit < math.inf else "0 or more"
        raise BadDataError(f"{self.rec_path} key {key}: label {value!r} is not a class "
                           f"(an integer from {classes})")

    def _property_classes(self) -> int | None:
        path = self.rec_path.parent / "property"
        if path.is_file():
            return int(path.read_text().split(",")[0])
        return None

    def _scan_classes(self) -> int:
        largest = -1
        for key in tqdm(self.keys, desc=f"counting classes in {self.rec_path.name}", leave=False):
            header, _ = self.record(key)
            largest = max(largest, self._label(header, key))
        return largest + 1

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int):
        key = self.keys[index]
        try:
            header, payload = self.record(key)
            label = self._label(header, key)
            image = decode_image(payload, self.size, f"{self.rec_path} key {key}")
        except BadDataError as error:
            return handle_bad_data(error, self.on_bad_data)
        return dict(image=normalize(image), label=label)

    def sample_digest(self) -> str:
        """SHA-256 of the sample list: the image keys and the index (keys and offsets)."""
        keys = self.keys
        digest = hashlib.sha256(repr(keys).encode() if isinstance(keys, range) else keys.tobytes())
        digest.update(self.index.sha256().encode())
        return digest.hexdigest()

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handle"], state["_pid"] = None, None  # open file handles do not pickle
        return state
