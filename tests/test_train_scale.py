"""The trainer at scale: SyncBatchNorm, host synchronisations per step, verification sets."""
import csv
import io
import math
import pickle

import pytest
import torch
from PIL import Image

from models import build_model
from test_train import tiny
from train import distributed
from train.checkpoint import load_for_eval
from train.config import config_from_dict
from train.data.synthetic import SyntheticFaces
from train.logs import LogInterval
from train.trainer import Trainer
from train.verification import pair_accuracy, read_bin, synthetic_pairs

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------- SyncBatchNorm


def _batchnorms(module, kind):
    return [m for m in module.modules() if isinstance(m, kind)]


def test_sync_bn_converts_every_batchnorm_for_cuda_processes():
    model = build_model("vgg13", batch_norm=True, width=1 / 16, input_size=64, embedding_dim=8)
    count = len(_batchnorms(model, torch.nn.modules.batchnorm._BatchNorm))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # Converting touches no device and no process group; training with it needs CUDA.
    cuda_pair = distributed.Context(rank=0, world_size=2, local_rank=0, device=torch.device("cuda"))
    converted = distributed.sync_batchnorm(model, cuda_pair)
    assert count > 0 and len(_batchnorms(converted, torch.nn.SyncBatchNorm)) == count
    after = converted.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    alone = distributed.Context(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    plain = build_model("vgg13", batch_norm=True, width=1 / 16, input_size=64, embedding_dim=8)
    assert distributed.sync_batchnorm(plain, alone) is plain and not _batchnorms(plain, torch.nn.SyncBatchNorm)


def test_sync_bn_on_cpu_processes_is_a_clear_error_before_the_run(tmp_path):
    cpu_pair = distributed.Context(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"))
    model = build_model("vgg13", batch_norm=True, width=1 / 16, input_size=64, embedding_dim=8)
    with pytest.raises(ValueError, match="model.sync_bn needs CUDA"):
        distributed.sync_batchnorm(model, cpu_pair)
    # The Trainer refuses before it touches the (here absent) process group or the disk.
    config = config_from_dict(tiny(tmp_path, model={"sync_bn": True}))
    with pytest.raises(ValueError, match="model.sync_bn needs CUDA"):
        Trainer(config, cpu_pair)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------- host synchronisations

# Tensor methods that copy a value to the host and so wait for the device.
HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


def _count_host_reads(monkeypatch, methods, excluded):
    """Counts, per name, the HOST_READS calls made inside ``methods`` but outside the
    ``excluded`` ones, each an ``(object, attribute name)`` (a class's: every instance's)."""
    counts, inside = {name: 0 for name in HOST_READS}, [0]
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            counts[_name] += inside[0] > 0
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    for owner, method in methods:
        original = getattr(owner, method)

        def inside_method(*args, _original=original, **kwargs):
            inside[0] += 1
            try:
                return _original(*args, **kwargs)
            finally:
                inside[0] -= 1

        monkeypatch.setattr(owner, method, inside_method)
    for owner, method in excluded:
        original = getattr(owner, method)

        def outside(*args, _original=original, **kwargs):
            depth, inside[0] = inside[0], 0
            try:
                return _original(*args, **kwargs)
            finally:
                inside[0] = depth

        monkeypatch.setattr(owner, method, outside)
    return counts


@pytest.mark.parametrize("head", [{}, {"kind": "arcface", "partial_fc": True, "sample_rate": 0.5}])
def test_training_steps_read_one_flag_on_the_host(tmp_path, monkeypatch, head):
    # A step (_train_step) reads one thing on the host: its finite flag, before the
    # optimizer step (train/step_guard.py). Everything else it does, adds to the log
    # interval (LogInterval.add) and asks before the next (_should_stop) stays on the
    # device; the logged step's row (_log_row) reads the interval once. Measured on the
    # CPU, where a host read costs nothing, by counting the calls that would wait for a
    # GPU. Not counted: the gradient norms that beta measures every beta.update_every
    # steps (by design a read; here at the first step only).
    config = config_from_dict(tiny(tmp_path, head=head, beta={"update_every": 1000},
                                   data={"num_identities": 40, "images_per_identity": 1},
                                   train={"epochs": 1, "log_every": 100}))
    trainer = Trainer(config, distributed.setup("cpu"))
    if head:
        assert trainer.module.head.num_sample < trainer.module.head.num_local  # sampling on
    step_reads = _count_host_reads(
        monkeypatch, [(trainer, "_train_step"), (LogInterval, "add"), (trainer, "_should_stop")],
        excluded=[(trainer, "_measure_gradients")])
    log_reads = _count_host_reads(monkeypatch, [(trainer, "_log_row")], excluded=[])
    trainer.run()
    assert trainer.step == 10
    assert step_reads == {name: 10 * (name == "__bool__") for name in HOST_READS}
    # The one logged step (the epoch's last) read its row once.
    assert log_reads == {name: int(name == "tolist") for name in HOST_READS}


def test_nonfinite_streak_stops_the_run_at_the_step_that_reaches_the_limit(tmp_path):
    # Each step's flag is read before its optimizer step, so the run stops at the step that
    # makes the limit (step 3), not at the next logged step (here the epoch's last, 6).
    config = config_from_dict(tiny(tmp_path, train={"epochs": 1, "log_every": 100,
                                                    "max_nonfinite_steps": 3}))
    trainer = Trainer(config, distributed.setup("cpu"))
    initial = [p.detach().clone() for p in trainer.module.parameters()]
    forward = trainer.criterion.forward
    trainer.criterion.forward = lambda maps: forward(maps) * math.nan
    with pytest.raises(FloatingPointError, match="3 consecutive non-finite steps up to step 3"):
        trainer.run()
    trainer.close()
    assert trainer.step == 2 and trainer.skipped_steps == 3  # stopped inside step 3
    assert all(torch.equal(a, b) for a, b in zip(initial, trainer.module.parameters()))


def test_sample_rate_without_partial_fc_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="head.partial_fc=true"):
        config_from_dict(tiny(tmp_path, head={"sample_rate": 0.5}))
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ verification sets


def _write_bin(path, pairs):
    """An InsightFace .bin (pickled PNG bytes and issame) of a VerificationPairs."""
    encoded = []
    for image in pairs.images:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    path.write_bytes(pickle.dumps((encoded, pairs.issame.tolist())))
    return path


def test_verification_sets_are_scored_during_training_and_logged(tmp_path):
    faces = SyntheticFaces(4, 6, size=64, seed=3)
    bin_path = _write_bin(tmp_path / "pairs.bin", synthetic_pairs(faces, 12, seed=1))
    missing = tiny(tmp_path, "missing", train={"verify": [str(tmp_path / "absent.bin")]})
    with pytest.raises(FileNotFoundError, match="absent.bin"):
        Trainer(config_from_dict(missing), distributed.setup("cpu"))
    assert not (tmp_path / "missing").exists()  # refused before the run started
    other_rank = distributed.Context(rank=1, world_size=2, local_rank=1, device=torch.device("cpu"))
    with pytest.raises(FileNotFoundError, match="train.verify: no file at .*absent.bin"):
        Trainer(config_from_dict(missing), other_rank)  # ranks that read nothing check too

    config = tiny(tmp_path, train={"epochs": 1, "log_every": 2, "verify_every": 3,
                                   "verify": [str(bin_path)], "tensorboard": True})
    trainer = Trainer(config_from_dict(config), distributed.setup("cpu"))
    trainer.run()
    assert trainer.module.backbone.training  # scoring put it in eval mode and back
    with open(trainer.run_dir / "log.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    # Logged at 2, 4, 6; due after steps 3 and 6: scored at the logged steps 4 and 6.
    assert [row["step"] for row in rows] == ["2", "4", "6"]
    assert rows[0]["verify_pairs"] == "" and rows[1]["verify_pairs"] != ""
    # The last score is the saved model's accuracy on the set, evaluated afresh.
    model, _ = load_for_eval(trainer.run_dir)
    expected = pair_accuracy(model, read_bin(bin_path, 64))["accuracy"]
    assert float(rows[2]["verify_pairs"]) == pytest.approx(expected, abs=1e-9)
    assert "verification accuracy pairs" in (trainer.run_dir / "train.log").read_text()
    tensorboard = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    events = tensorboard.EventAccumulator(str(trainer.run_dir / "tensorboard"))
    events.Reload()
    assert [event.step for event in events.Scalars("verify/pairs")] == [4, 6]
