"""The trainer under faults (issue 23): non-finite steps, checkpoints that cannot be written or
were damaged, two trainers in one run, changed or corrupt data, and user errors that must be
one ``error:`` line with exit status 2."""
import csv
import errno
import io
import math
import os
import re
import signal
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch import nn

import train.checkpoint as checkpoint_module
from test_train import ROOT, tiny
from train import distributed
from train.__main__ import main as train_main
from train.checkpoint import (CheckpointError, NonFiniteError, RunInUseError, load_checkpoint,
                              nonfinite_tensors, save_checkpoint)
from train.config import config_from_dict, load_config
from train.data import BadDataError
from train.data.image import decode_image
from train.data.recordio import RecordIODataset, RecordIOWriter, pack_record, write_recordio
from train.evaluate import main as evaluate_main
from train.logs import progress_postfix
from train.step_guard import StepGuard
from train.trainer import Trainer, fit, train

pytestmark = pytest.mark.usefixtures("one_thread")


def small(tmp_path, name="run", **sections):
    """tiny() at 32x32 (2x2 maps) on 4 identities x 4 images, one epoch of 4 steps."""
    config = tiny(tmp_path, name)
    base = {"model": {"input_size": 32}, "data": {"images_per_identity": 4},
            "train": {"epochs": 1}}
    for values in (base, sections):
        for section, update in values.items():
            config.setdefault(section, {}).update(update)
    return config


def _rows(run_dir):
    with open(run_dir / "log.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def _error_line(stderr: str) -> str:
    """The ``error:`` line a command ended with: the last line, the only one of its kind,
    and no traceback."""
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), stderr
    assert sum(line.startswith("error: ") for line in lines) == 1, stderr
    return lines[-1]


def _png(value, size=32, dtype=np.uint8):
    buffer = io.BytesIO()
    Image.fromarray(np.full((size, size, 3) if dtype == np.uint8 else (size, size), value,
                            dtype=dtype)).save(buffer, format="PNG")
    return buffer.getvalue()


def _image_folder(root, identities=4, images=4):
    for identity in range(identities):
        (root / f"id{identity}").mkdir(parents=True)
        for index in range(images):
            pixels = np.random.default_rng([identity, index]).integers(0, 256, (32, 32, 3), np.uint8)
            Image.fromarray(pixels).save(root / f"id{identity}" / f"{index}.png")
    return root


# ------------------------------------------------------------------- non-finite steps


def _bn_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3))


def _state(model, optimizer):
    """Every tensor a step may change: parameters, BatchNorm buffers, optimizer state."""
    tensors = {f"model.{k}": v.clone() for k, v in model.state_dict().items()}
    for index, state in optimizer.state_dict()["state"].items():
        tensors.update({f"optimizer.{index}.{k}": v.clone() for k, v in state.items()
                        if isinstance(v, torch.Tensor)})
    return tensors


def _guarded_step(model, optimizer, guard, inputs):
    guard.before_forward()
    model(inputs).square().mean().backward()
    norm = nn.utils.get_total_norm([p.grad for p in model.parameters()])
    applied = guard.step(guard.finite(norm), optimizer.step)
    optimizer.zero_grad(set_to_none=True)
    return applied


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_a_finite_step_is_the_plain_optimizer_step_and_a_nonfinite_one_changes_nothing(name):
    make = {"sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=5e-4),
            "adamw": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=5e-4)}[name]
    guarded, plain = _bn_model(), _bn_model()
    guarded_opt, plain_opt = make(guarded.parameters()), make(plain.parameters())
    guard = StepGuard(guarded, limit=10, log=None)
    batches = [torch.randn(8, 6, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    for step, inputs in enumerate(batches):
        if step == 2:  # a NaN batch: poisons the gradient and the running statistics
            before = _state(guarded, guarded_opt)
            assert not _guarded_step(guarded, guarded_opt, guard, inputs * math.nan)
            after = _state(guarded, guarded_opt)
            assert before.keys() == after.keys()
            assert all(torch.equal(before[k], after[k]) for k in before), "the skip changed the model"
        assert _guarded_step(guarded, guarded_opt, guard, inputs)
        plain(inputs).square().mean().backward()  # the same steps without the guard
        plain_opt.step()
        plain_opt.zero_grad(set_to_none=True)
    mine, theirs = _state(guarded, guarded_opt), _state(plain, plain_opt)
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs), "finite steps must be bitwise plain"
    assert (guard.skipped, guard.streak) == (1, 0)


def test_the_trainer_with_its_guard_equals_the_trainer_with_plain_optimizer_steps(tmp_path):
    # The same finite run twice: once as it is, once with the guard replaced by a plain
    # optimizer step; the checkpoints must match bitwise and log.csv but for the timing.
    guarded = fit(small(tmp_path, "guarded", model={"dropout": 0.3}))
    config = config_from_dict(small(tmp_path, "plain", model={"dropout": 0.3}))
    trainer = Trainer(config, distributed.setup("cpu"))
    trainer.guard.before_forward = lambda: None
    trainer.guard.finite = lambda grad_norm: torch.isfinite(grad_norm)
    trainer.guard.step = lambda finite, apply: apply() or True
    try:
        trainer.run()
    finally:
        trainer.close()
    a, b = load_checkpoint(guarded.run_dir), load_checkpoint(trainer.run_dir)
    for part in ("model", "head"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    for index, state in a["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], b["optimizer"]["state"][index]["momentum_buffer"])
    drop = lambda rows: [{k: v for k, v in r.items() if k != "images_per_s"} for r in rows]  # noqa: E731
    assert drop(_rows(guarded.run_dir)) == drop(_rows(trainer.run_dir))


def test_a_skipped_step_leaves_every_tensor_of_the_model_as_it_was(tmp_path):
    config = config_from_dict(small(tmp_path))
    trainer = Trainer(config, distributed.setup("cpu"))
    forward = trainer.criterion.forward
    trainer.criterion.forward = lambda maps: forward(maps) * (math.nan if trainer.step == 1 else 1)
    snapshots, step = {}, trainer._train_step

    def recording(batch):
        snapshots[trainer.step] = {k: v.clone() for k, v in trainer.module.state_dict().items()}
        return step(batch)

    trainer._train_step = recording
    trainer.run()
    assert trainer.skipped_steps == 1
    # Step 2 (index 1) was skipped: parameters and BatchNorm statistics as before it.
    changed = [k for k in snapshots[1] if not torch.equal(snapshots[1][k], snapshots[2][k])]
    assert changed == []
    assert any("running_var" in k and not torch.equal(snapshots[2][k], snapshots[3][k])
               for k in snapshots[2])


def test_the_nan_reproduction_keeps_finite_checkpoints_and_logs_the_skipped_steps(tmp_path):
    # The command at 32x32: lr 1e6 blows up after a few steps; every later step is
    # skipped and its forward pass's inf running_var is put back.
    run_dir = train(small(tmp_path, optim={"lr": 1e6, "warmup_epochs": 0}, model={"width": 1 / 16},
                          train={"epochs": 2, "log_every": 2, "checkpoint_every": 4}))
    state = load_checkpoint(run_dir)  # refuses non-finite checkpoints
    assert state["skipped_steps"] > 0 and nonfinite_tensors(state) == []
    rows = _rows(run_dir)
    blank = [row for row in rows if row["loss"] == ""]
    assert blank and all(row[key] == "" for row in blank for key in ("ce", "ecloss", "grad_norm"))
    assert all(float(row["loss"]) != 0.0 for row in rows if row not in blank)
    log = (run_dir / "train.log").read_text()
    assert "every step of the interval was skipped as non-finite" in log
    assert f"{state['skipped_steps']} of them skipped as non-finite" in log


def test_the_progress_bar_says_when_every_step_of_an_interval_was_skipped():
    row = {"loss": None, "ce": None, "ecloss": None, "grad_norm": None, "accuracy": 0.25,
           "images_per_s": 10.0, "skipped_steps": 7}
    postfix = progress_postfix(row)
    assert postfix["skipped"] == "all steps since the last row, 7 in the run" and "loss" not in postfix
    postfix = progress_postfix(row | {"loss": 1.5, "ce": 1.25, "ecloss": -0.5})
    assert (postfix["loss"], postfix["ce"], postfix["ecl"]) == ("1.500", "1.250", "-0.5")


def test_a_diverged_run_stops_naming_a_finite_checkpoint(tmp_path):
    config = small(tmp_path, optim={"lr": 1e6, "warmup_epochs": 0},
                   train={"epochs": 3, "checkpoint_every": 2, "max_nonfinite_steps": 3})
    with pytest.raises(NonFiniteError, match=r"consecutive non-finite steps .*; the last checkpoint, "
                                             r".*last.pt \(step (\d+)\), holds finite values") as stop:
        train(config)
    named = int(stop.value.args[0].split("(step ")[1].split(")")[0])
    assert load_checkpoint(tmp_path / "run")["step"] == named  # and it loads: finite
    assert str(stop.value) in (tmp_path / "run" / "train.log").read_text()


def test_a_nonfinite_model_is_never_saved(tmp_path):
    trainer = Trainer(config_from_dict(small(tmp_path, train={"stop_at_step": 2})),
                      distributed.setup("cpu"))
    trainer.run()
    saved = (tmp_path / "run" / "checkpoints" / "last.pt").read_bytes()
    with torch.no_grad():
        next(trainer.module.backbone.parameters())[0] = math.inf
    with pytest.raises(NonFiniteError, match=r"not saving .*last.pt: non-finite values in "
                                             r"model.features.0.weight.*last checkpoint.*step 2"):
        trainer.save()
    trainer.close()
    assert (tmp_path / "run" / "checkpoints" / "last.pt").read_bytes() == saved


def test_evaluate_refuses_a_checkpoint_with_nonfinite_statistics(tmp_path, capsys):
    run_dir = train(small(tmp_path, train={"stop_at_step": 1}))
    path = run_dir / "checkpoints" / "last.pt"
    state = torch.load(path, weights_only=False)
    del state["sha256"]  # as the trainer before the fix wrote them: poisoned, no checksum
    state["model"]["features.4.running_var"].fill_(math.inf)
    torch.save(state, path)
    with pytest.raises(SystemExit) as exit_:
        evaluate_main(["--checkpoint", str(run_dir), "--out", str(tmp_path / "eval"),
                       "--device", "cpu", "--data", "synthetic"])
    assert exit_.value.code == 2
    assert "holds non-finite values in model.features.4.running_var" in _error_line(
        capsys.readouterr().err)
    assert not (tmp_path / "eval").exists()


# ------------------------------------------------------------------------ checkpoints


def _flip_inside_the_largest_tensor(path: Path, count: int = 64) -> None:
    with zipfile.ZipFile(path) as archive:
        info = max((i for i in archive.infolist() if "/data/" in i.filename),
                   key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    name_length, extra_length = struct.unpack_from("<HH", data, info.header_offset + 26)
    start = info.header_offset + 30 + name_length + extra_length + info.file_size // 2
    for offset in range(start, start + count):
        data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_bit_flipped_checkpoint_is_refused_on_resume_and_evaluate(tmp_path, capsys):
    run_dir = train(small(tmp_path, train={"stop_at_step": 2}))
    path = run_dir / "checkpoints" / "last.pt"
    assert load_checkpoint(path)["sha256"]
    _flip_inside_the_largest_tensor(path)
    with pytest.raises(ValueError, match="is damaged"):
        load_checkpoint(path)
    assert train_main(["--resume", str(run_dir)]) == 2
    assert f"error: {path} is damaged" in _error_line(capsys.readouterr().err)
    with pytest.raises(SystemExit) as exit_:
        evaluate_main(["--checkpoint", str(path), "--out", str(tmp_path / "eval"), "--device", "cpu"])
    assert exit_.value.code == 2
    assert f"error: {path} is damaged" in _error_line(capsys.readouterr().err)


class _FullDisk:
    """A checkpoint file on a disk that fills up after ``room`` bytes."""

    def __init__(self, handle, room):
        self.handle, self.room = handle, room

    def write(self, data):
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.handle.write(data)

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.close()


def test_a_full_disk_is_one_error_line_naming_the_file_the_step_and_the_cause(tmp_path, monkeypatch,
                                                                               capsys):
    opened, fdopen = [], os.fdopen

    def filling(descriptor, *args, **kwargs):  # the second checkpoint finds the disk full
        opened.append(descriptor)
        handle = fdopen(descriptor, *args, **kwargs)
        return _FullDisk(handle, room=4096) if len(opened) == 2 else handle

    monkeypatch.setattr(checkpoint_module.os, "fdopen", filling)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(small(tmp_path, train={"checkpoint_every": 2,
                                                            "keep_checkpoints": 0})))
    assert train_main(["--config", str(config)]) == 2
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    message = f"cannot save {last} at step 4: No space left on device (errno 28)"
    assert _error_line(capsys.readouterr().err) == f"error: {message}"
    assert message in (tmp_path / "run" / "train.log").read_text()
    assert load_checkpoint(last)["step"] == 2  # the previous checkpoint, whole
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.pt"]  # no temporary left


def test_an_unwritable_checkpoint_folder_stops_the_run_before_its_first_step(tmp_path, monkeypatch):
    mkstemp = checkpoint_module.tempfile.mkstemp

    def refusing(*args, dir=None, **kwargs):
        if dir is not None and Path(dir).name == "checkpoints":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(dir))
        return mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(checkpoint_module.tempfile, "mkstemp", refusing)
    with pytest.raises(CheckpointError, match=r"cannot write checkpoints in .*checkpoints: "
                                              r"Permission denied \(errno 13\)"):
        Trainer(config_from_dict(small(tmp_path)), distributed.setup("cpu"))
    assert not (tmp_path / "run" / "log.csv").exists()  # not a step trained


# A training process whose second checkpoint write hangs once the temporary file is written.
_HANGING_SAVE = """
import pathlib, sys, time, torch, yaml
save, calls = torch.save, []
def hanging(*args, **kwargs):
    save(*args, **kwargs)
    calls.append(1)
    if len(calls) == 2:
        pathlib.Path(sys.argv[2]).write_text("writing")
        time.sleep(600)
torch.save = hanging
from train.trainer import train
train(yaml.safe_load(open(sys.argv[1])))
"""


def test_kill_during_a_write_then_a_second_trainer_then_resume(tmp_path):
    config = small(tmp_path, train={"checkpoint_every": 2, "keep_checkpoints": 0})
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    marker = tmp_path / "writing"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    child = subprocess.Popen([sys.executable, "-c", _HANGING_SAVE, str(tmp_path / "run.yaml"),
                              str(marker)], env=env, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert child.poll() is None and time.monotonic() < deadline, "the child did not save"
            time.sleep(0.1)
        # A second trainer in the run directory while the first is alive.
        in_use = f"{re.escape(str(tmp_path / 'run'))} is in use by process {child.pid}"
        with pytest.raises(RunInUseError, match=in_use):
            Trainer(config_from_dict(config), distributed.setup("cpu"))
        with pytest.raises(RunInUseError, match=f"in use by process {child.pid}"):
            train(small(tmp_path, train={"resume": str(tmp_path / "run")}))
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    checkpoints = tmp_path / "run" / "checkpoints"
    leftovers = sorted(p.name for p in checkpoints.glob(".last.pt.*.tmp"))
    assert len(leftovers) == 1 and load_checkpoint(checkpoints / "last.pt")["step"] == 2
    resumed = train(small(tmp_path, train={"resume": str(tmp_path / "run")}))
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.pt"]
    assert load_checkpoint(resumed)["step"] == 4
    assert f"removed 1 temporary file(s) of an interrupted checkpoint save: {checkpoints / leftovers[0]}" \
        in (resumed / "train.log").read_text()


def test_a_second_trainer_in_a_locked_run_is_one_error_line(tmp_path, capsys):
    first = Trainer(config_from_dict(small(tmp_path)), distributed.setup("cpu"))
    try:
        config = tmp_path / "run.yaml"
        config.write_text(yaml.safe_dump(small(tmp_path)))
        assert train_main(["--config", str(config)]) == 2
        assert _error_line(capsys.readouterr().err) == \
            f"error: {tmp_path / 'run'} is in use by process {os.getpid()}"
    finally:
        first.close()
    Trainer(config_from_dict(small(tmp_path)), distributed.setup("cpu")).close()  # released


def test_checkpoints_missing_keys_are_one_error_line(tmp_path, capsys):
    run_dir = train(small(tmp_path, train={"stop_at_step": 1}))
    path = run_dir / "checkpoints" / "last.pt"
    state = load_checkpoint(path)
    del state["optimizer"]
    save_checkpoint(state, path)
    assert train_main(["--resume", str(run_dir)]) == 2
    assert _error_line(capsys.readouterr().err) == \
        f"error: {path} is not a complete checkpoint: it lacks optimizer (needed to resume)"
    del state["model"]
    save_checkpoint(state, path)
    with pytest.raises(SystemExit) as exit_:
        evaluate_main(["--checkpoint", str(path), "--out", str(tmp_path / "eval"), "--device", "cpu"])
    assert exit_.value.code == 2
    assert "it lacks model" in _error_line(capsys.readouterr().err)


# ------------------------------------------------------------------------------- data


def test_resume_refuses_a_changed_data_set_unless_allowed(tmp_path, capsys):
    folder = _image_folder(tmp_path / "faces")
    data = {"source": "folder", "path": str(folder)}
    run_dir = train(small(tmp_path, data=data, train={"stop_at_step": 2}))
    (folder / "id1" / "2.png").unlink()
    assert train_main(["--resume", str(run_dir)]) == 2
    assert _error_line(capsys.readouterr().err) == (
        "error: cannot resume: the data set changed since the checkpoint (16 images then, 15 now), "
        "so the samples and their order would differ; give --allow-data-change "
        "(train.allow_data_change=true) to go on with it")
    Image.open(folder / "id1" / "1.png").save(folder / "id1" / "2b.png")  # as many, other files
    with pytest.raises(ValueError, match=r"16 images then, 16 now, another sample list"):
        train(small(tmp_path, data=data, train={"resume": str(run_dir)}))
    assert train_main(["--resume", str(run_dir), "--allow-data-change"]) == 0
    assert "going on with the new data" in (run_dir / "train.log").read_text()
    assert load_checkpoint(run_dir)["config"]["train"]["allow_data_change"] is True
    # An added identity: the classifier's rows cannot follow, allowed or not.
    _image_folder(tmp_path / "more", identities=1)
    (tmp_path / "more" / "id0").rename(folder / "id9")
    with pytest.raises(ValueError, match="the data set has 5 classes, the checkpoint's classifier 4"):
        train(small(tmp_path, data=data, train={"resume": str(run_dir), "allow_data_change": True}))


def _recordio(tmp_path, labels, name="train"):
    write_recordio(tmp_path / f"{name}.rec", tmp_path / f"{name}.idx",
                   [(label, _png(i * 10)) for i, label in enumerate(labels)])
    return tmp_path / f"{name}.rec"


@pytest.mark.parametrize("bad", [1e9, -3.0, math.nan, 2.7])
def test_a_label_outside_the_classes_is_bad_data_naming_its_record(tmp_path, bad):
    rec = _recordio(tmp_path, [0, 1, 2, 3, 0, 1, 2, 3])
    # Rewrite image key 3's label (its header's float labels) in place.
    data = bytearray(rec.read_bytes())
    record = pack_record([2.0], _png(20))
    start = bytes(data).index(record[24:])  # the label and payload of key 3, after its header
    struct.pack_into("<f", data, start, bad)
    rec.write_bytes(bytes(data))
    stop = RecordIODataset(rec, size=32, num_classes=4)
    read = float(np.float32(bad))  # as the record stores it
    with pytest.raises(BadDataError, match=rf"train.rec key 3: label {read!r} is not a class "
                                           r"\(an integer from 0 to 3\)"):
        stop[2]
    assert RecordIODataset(rec, size=32, on_bad_data="skip", num_classes=4)[2] is None
    assert RecordIODataset(rec, size=32, on_bad_data="skip", num_classes=4)[3]["label"] == 3


def test_training_skips_a_record_with_a_label_past_the_classes(tmp_path):
    rec = _recordio(tmp_path, [0, 1, 2, 3] * 4)
    data = bytearray(rec.read_bytes())
    start = bytes(data).index(pack_record([1.0], _png(10))[24:])  # key 2's label
    struct.pack_into("<f", data, start, 1e9)
    rec.write_bytes(bytes(data))
    run_dir = train(small(tmp_path, data={"source": "recordio", "path": str(rec),
                                          "on_bad_data": "skip"}))
    assert load_checkpoint(run_dir)["skipped_images"] == 1
    assert "train.rec key 2: label 1000000000.0 is not a class" in (run_dir / "train.log").read_text()


def test_a_record_0_that_announces_fewer_images_is_reported(tmp_path, caplog):
    images = [(i % 2, _png(i)) for i in range(6)]  # keys 1-6, identity records 7-8
    with RecordIOWriter(tmp_path / "train.rec", tmp_path / "train.idx") as writer:
        for key, (label, payload) in enumerate(images, start=1):
            writer.write(key, pack_record([float(label)], payload))
        writer.write(7, pack_record([1, 6], b""))
        writer.write(8, pack_record([2, 7], b""))
        writer.write(0, pack_record([5, 9], b""))  # says images 1-4, identity records 5-8
    with pytest.raises(BadDataError, match=r"record 0: it announces image keys 1..4 and identity "
                                           r"records 5..8, but record 5 is not an identity record"):
        RecordIODataset(tmp_path / "train.rec", size=32)
    skipping = RecordIODataset(tmp_path / "train.rec", size=32, on_bad_data="skip")
    assert len(skipping) == 4 and "record 5 is not an identity record" in caplog.text


def test_a_16_bit_png_is_scaled_not_clipped():
    levels = np.array([[0, 257, 32896, 65535]], dtype=np.uint16).repeat(4, 0)
    buffer = io.BytesIO()
    Image.fromarray(levels).save(buffer, format="PNG")
    decoded = decode_image(buffer.getvalue(), 4, "grey16.png")
    assert decoded.dtype == np.uint8 and decoded.shape == (4, 4, 3)
    assert decoded[0, :, 0].tolist() == [0, 1, 128, 255]


def test_bad_data_in_a_worker_is_one_error_line(tmp_path, capsys):
    folder = _image_folder(tmp_path / "faces")
    (folder / "id2" / "1.png").write_bytes(b"\x89PNG broken")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(small(tmp_path, data={"source": "folder", "path": str(folder),
                                                           "num_workers": 1, "flip": False})))
    assert train_main(["--config", str(config)]) == 2
    line = _error_line(capsys.readouterr().err)
    assert line.startswith(f"error: {folder / 'id2' / '1.png'}: cannot decode image")
    assert line.endswith("(in DataLoader worker 0)")


def test_an_empty_image_folder_leaves_no_run_directory(tmp_path, capsys):
    (tmp_path / "faces" / "id0").mkdir(parents=True)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(small(tmp_path / "runs", data={"source": "folder",
                                                                     "path": str(tmp_path / "faces")})))
    assert train_main(["--config", str(config)]) == 2
    assert "no images" in _error_line(capsys.readouterr().err)
    assert not (tmp_path / "runs").exists()


def test_a_partial_last_log_line_is_dropped_with_a_warning(tmp_path):
    run_dir = train(small(tmp_path, train={"stop_at_step": 2}))
    with open(run_dir / "log.csv", "a") as handle:
        handle.write("3,0.75,0.05,1.3")  # a killed run's unfinished row
    resumed = train(small(tmp_path, train={"resume": str(run_dir)}))
    assert [row["step"] for row in _rows(resumed)] == ["1", "2", "3", "4"]
    assert "dropped its unfinished last line '3,0.75,0.05,1.3'" in (resumed / "train.log").read_text()


# ----------------------------------------------------------------------------- config


def test_numbers_are_read_as_people_write_them(tmp_path):
    config = load_config(overrides=["optim.lr=1e-4", "optim.grad_clip=1.0e6", "ecloss.tau=2E-3",
                                    "optim.milestones=[1e1, 2]"])
    assert (config.optim.lr, config.optim.grad_clip, config.ecloss.tau) == (1e-4, 1e6, 2e-3)
    assert config.optim.milestones == (10.0, 2.0)
    (tmp_path / "a.yaml").write_text("optim:\n  lr: 1e-4\n")
    assert load_config(tmp_path / "a.yaml").optim.lr == 1e-4
    with pytest.raises(ValueError, match="optim.lr must be a number, got 'fast'"):
        load_config(overrides=["optim.lr=fast"])
    with pytest.raises(ValueError, match="train.epochs must be an integer"):
        load_config(overrides=["train.epochs=1e2"])


@pytest.mark.parametrize("name, text, message", [
    ("bad.yaml", "model:\n  arch: [vgg13\ntrain: {}\n",
     "bad.yaml:3:6: not valid YAML: expected ',' or ']', but got ':'"),
    ("bad.py", "config = {'model': {'arch': 'vgg13'}\n", "bad.py:1: '{' was never closed"),
    ("raises.py", "config = undefined_name\n", "raises.py: NameError: name 'undefined_name'"),
])
def test_config_file_errors_are_one_error_line(tmp_path, capsys, name, text, message):
    (tmp_path / name).write_text(text)
    assert train_main(["--config", str(tmp_path / name)]) == 2
    assert message in _error_line(capsys.readouterr().err)
