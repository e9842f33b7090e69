"""The trainer: config, schedules, sampler, training, resume, signals, DDP on gloo, bad data."""
import copy
import csv
import math
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
import yaml

from models import build_model
from train.beta import BetaSchedule
from train.checkpoint import load_checkpoint, load_for_eval
from train.config import BetaConfig, Config, OptimConfig, config_from_dict, load_config
from train.data import BadDataError
from train.data.sampler import GlobalBatchSampler
from train.data.synthetic import SyntheticFaces
from train.optim import lr_factor
from train.trainer import Trainer, fit, train

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(tmp_path, name="run", **sections):
    """A VGG13 at 1/16 width on 64x64 synthetic faces (4x4 maps, 137 templates)."""
    config = {
        "model": {"arch": "vgg13", "width": 1 / 16, "input_size": 64, "embedding_dim": 16,
                  "batch_norm": True},
        # The outer world: identity in hair, skin and outline, which 36 steps learn; these
        # tests are of the trainer, not of the parts world (tests/test_gate.py).
        "data": {"num_identities": 4, "images_per_identity": 6, "num_workers": 0,
                 "identity": "outer"},
        "beta": {"update_every": 2},
        "optim": {"lr": 0.05, "warmup_epochs": 0.5},
        "train": {"epochs": 2, "batch_size": 4, "output_dir": str(tmp_path), "run_name": name,
                  "progress": False, "tensorboard": False, "log_every": 1,
                  "deterministic": True},
    }
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    return config


# ---------------------------------------------------------------------------- config


def test_config_rejects_unknown_keys_and_bad_types(tmp_path):
    with pytest.raises(ValueError, match="unknown config key 'optim.momentun'.*did you mean 'momentum'"):
        load_config(overrides=["optim.momentun=0.1"])
    with pytest.raises(ValueError, match="unknown config key 'trainer'"):
        config_from_dict({"trainer": {}})
    with pytest.raises(ValueError, match="train.epochs must be an integer"):
        load_config(overrides=["train.epochs=1.5"])
    with pytest.raises(ValueError, match="head.kind must be one of"):
        load_config(overrides=["head.kind=sphereface"])
    with pytest.raises(ValueError, match="data.path is required"):
        load_config(overrides=["data.source=recordio"])
    with pytest.raises(ValueError, match="section.key=value"):
        load_config(overrides=["epochs=3"])


def test_config_layers_file_and_overrides(tmp_path):
    (tmp_path / "a.yaml").write_text("model: {arch: vgg19, width: 0.5}\noptim: {milestones: [3, 6]}\n")
    config = load_config(tmp_path / "a.yaml", ["model.width=0.25", "ecloss.templates=400",
                                               "head.m=null"])
    assert (config.model.arch, config.model.width, config.optim.milestones) == ("vgg19", 0.25, (3.0, 6.0))
    assert config.ecloss.templates == 400 and config.head.m is None
    assert config.model.input_size == Config().model.input_size  # untouched defaults
    (tmp_path / "b.py").write_text("config = {'head': {'kind': 'arcface'}, 'train': {'amp': 'bf16'}}\n")
    config = load_config(tmp_path / "b.py", ["train.amp=none"])
    assert config.head.kind == "arcface" and config.train.amp == "none"


def test_config_checks_the_constraints_that_the_trainer_checked_before(tmp_path):
    # Once in Trainer, now beside their fields: a bad config is refused when it is read.
    with pytest.raises(ValueError, match="head.partial_fc=true or head.sample_rate=1"):
        load_config(overrides=["head.sample_rate=0.5"])
    sampled = load_config(overrides=["head.sample_rate=0.5", "head.partial_fc=true"])
    assert sampled.head.sample_rate == 0.5
    with pytest.raises(ValueError, match=r"train.verify_every must be positive, got 0"):
        load_config(overrides=["train.verify=[a.bin]", "train.verify_every=0"])
    assert load_config(overrides=["train.verify_every=0"]).train.verify_every == 0  # unused
    with pytest.raises(ValueError, match=r"train.verify: the sets' file names must differ"):
        load_config(overrides=["train.verify=[lfw.bin, other/lfw.bin]"])


@pytest.mark.parametrize("path", sorted((ROOT / "train" / "configs").iterdir()))
def test_shipped_configs_load(path):
    assert isinstance(load_config(path), Config)


# ---------------------------------------------------------------------------- schedules


def test_beta_schedules():
    constant = BetaSchedule(BetaConfig(schedule="constant", value=0.3), alpha=1.0)
    assert constant.value(0) == constant.value(1000) == 0.3
    warmup = BetaSchedule(BetaConfig(schedule="warmup", value=0.4, warmup_steps=10), alpha=1.0)
    assert [warmup.value(s) for s in (0, 5, 10, 20)] == [0.0, 0.2, 0.4, 0.4]
    # The constant schedule only reports the ratio: 0.3 * 2 / (1 * 4).
    constant.observe(0, ce_grad_norm=4.0, ecloss_grad_norm=2.0)
    assert constant.ratio == pytest.approx(0.15) and constant.value(1) == 0.3


def test_auto_beta_solves_for_the_gradient_ratio():
    auto = BetaSchedule(BetaConfig(schedule="auto", value=1e-5, grad_ratio=0.5, ema=0.75,
                                   update_every=3, max_growth=4.0), alpha=2.0)
    assert auto.value(0) == pytest.approx(1e-5) and auto.measures_at(0) and not auto.measures_at(1)
    # Target 0.5 * 2 * 8 / 0.001 = 8000: far above, so beta grows by max_growth only. The
    # reported ratio is the one the current beta gave: 1e-5 * 0.001 / (2 * 8).
    auto.observe(0, ce_grad_norm=8.0, ecloss_grad_norm=1e-3)
    assert auto.value(1) == pytest.approx(4e-5)
    assert auto.ratio == pytest.approx(1e-5 * 1e-3 / 16)
    auto.log_beta = math.log(8000.0)
    # Target 0.5 * 2 * 8 / 0.0005 = 16000, close: raised smoothly, a geometric EMA.
    auto.observe(3, ce_grad_norm=8.0, ecloss_grad_norm=5e-4)
    smoothed = 8000 ** 0.75 * 16000 ** 0.25
    assert auto.value(4) == pytest.approx(smoothed)
    assert auto.ratio == pytest.approx(8000 * 5e-4 / 16)
    # Third: target 0.5 * 2 * 8 / 0.1 = 80, far below half of beta: taken at once.
    auto.observe(6, ce_grad_norm=8.0, ecloss_grad_norm=0.1)
    assert auto.value(7) == pytest.approx(80.0)
    assert auto.ratio == pytest.approx(smoothed * 0.1 / 16)
    before = auto.state_dict()
    auto.observe(9, ce_grad_norm=0.0, ecloss_grad_norm=1.0)  # unusable: ignored
    auto.observe(9, ce_grad_norm=math.nan, ecloss_grad_norm=1.0)
    assert auto.state_dict() == before
    # Target 0.5 * 2 * 8 / 1e-9 = 8e9: beta = 8e4 may double to 1.6e5; max_value holds 1e5.
    capped = BetaSchedule(BetaConfig(schedule="auto", value=8e4, grad_ratio=0.5, ema=0.0,
                                     max_growth=2.0, max_value=1e5), alpha=2.0)
    capped.observe(0, ce_grad_norm=8.0, ecloss_grad_norm=1e-9)
    assert capped.value(1) == pytest.approx(1e5)


def test_lr_schedule():
    cosine = OptimConfig(lr=0.1, warmup_epochs=1, decay="cosine", min_lr=0.01)
    factors = [lr_factor(s, cosine, steps_per_epoch=4, total_steps=12) for s in range(12)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[8] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    step = OptimConfig(lr=0.1, decay="step", milestones=(1, 2), gamma=0.1)
    assert [lr_factor(s, step, 4, 12) for s in (0, 3, 4, 8, 11)] == pytest.approx(
        [1, 1, 0.1, 0.01, 0.01])


def test_global_batch_sampler_is_rank_independent():
    whole = GlobalBatchSampler(22, 6, world_size=1, seed=5)
    halves = [GlobalBatchSampler(22, 3, world_size=2, rank=r, seed=5) for r in range(2)]
    for s in [whole, *halves]:
        s.set_epoch(2)
    one = list(whole)
    two = [a + b for a, b in zip(*halves)]
    assert one == two and len(one) == 3 and sorted(sum(one, [])) == sorted(set(sum(one, [])))
    whole.set_epoch(2, start_batch=2)
    assert list(whole) == one[2:]
    whole.set_epoch(3)
    assert list(whole) != one
    with pytest.raises(ValueError, match="fewer than one global batch"):
        GlobalBatchSampler(5, 3, world_size=2, rank=0)


# ---------------------------------------------------------------------------- training


def test_training_reduces_the_loss_and_writes_the_run(tmp_path):
    config = tiny(tmp_path, train={"epochs": 6, "checkpoint_every": 4, "keep_checkpoints": 2,
                                   "tensorboard": True, "log_every": 6},
                  optim={"lr": 0.1})
    run_dir = train(config)
    rows = (run_dir / "log.csv").read_text().splitlines()
    header, rows = rows[0].split(","), [dict(zip(rows[0].split(","), r.split(","))) for r in rows[1:]]
    assert [int(r["step"]) for r in rows] == [6, 12, 18, 24, 30, 36]
    ce = [float(r["ce"]) for r in rows]
    assert ce[-1] < 0.8 * ce[0] and ce[-1] < math.log(4), ce  # below chance level
    assert all(math.isfinite(float(r["grad_ratio"])) and float(r["beta"]) > 0 for r in rows[1:])
    assert {"ecloss", "accuracy", "images_per_s", "lr"} <= set(header)
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config_from_dict(saved).model.arch == "vgg13" and saved["train"]["run_name"] == "run"
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert checkpoints == ["last.pt", "step_000000032.pt", "step_000000036.pt"]
    assert any((run_dir / "tensorboard").iterdir())
    with pytest.raises(FileExistsError, match="--resume"):
        train(config)

    model, loaded = load_for_eval(run_dir)
    assert not model.training and loaded.model.width == 1 / 16
    state = load_checkpoint(run_dir)
    assert state["step"] == 36 and state["world_size"] == 1 and len(state["rng"]) == 1
    faces = SyntheticFaces(4, 6, size=64)
    with torch.no_grad():
        embedding = model(torch.stack([faces[i]["image"] for i in range(4)])).embedding
    assert embedding.shape == (4, 16) and torch.isfinite(embedding).all()


def _assert_same_state(a, b):
    for part in ("model", "head"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key}"
    for key, value in a["optimizer"]["state"].items():
        assert torch.equal(value["momentum_buffer"], b["optimizer"]["state"][key]["momentum_buffer"])
    assert a["beta"] == b["beta"] and a["step"] == b["step"]


def test_resume_mid_epoch_equals_the_uninterrupted_run(tmp_path):
    # Dropout and flips draw random numbers, so the RNG states must come back too.
    sections = dict(model={"dropout": 0.3}, train={"epochs": 2})
    straight = train(tiny(tmp_path, "straight", **sections))
    stopped = train(tiny(tmp_path, "stopped", **copy.deepcopy(sections) | {
        "train": {"epochs": 2, "stop_at_step": 4}}))
    assert load_checkpoint(stopped)["step"] == 4 and load_checkpoint(stopped)["batch_in_epoch"] == 4
    with pytest.raises(ValueError, match="model.width is 0.125"):
        train(tiny(tmp_path, "stopped", model={"dropout": 0.3, "width": 0.125},
                   train={"epochs": 2, "resume": str(stopped)}))
    resumed = train(tiny(tmp_path, "stopped", **copy.deepcopy(sections) | {
        "train": {"epochs": 2, "resume": str(stopped)}}))
    assert resumed == stopped
    _assert_same_state(load_checkpoint(straight), load_checkpoint(resumed))
    # The log of the resumed run continues where the stopped one ended.
    steps = [line.split(",")[0] for line in (resumed / "log.csv").read_text().splitlines()[1:]]
    assert steps == [str(s) for s in range(1, 13)]


def _plain_seed(*numbers):
    """The trainer's documented seed of several integers: SeedSequence's first 63 bits."""
    words = np.random.SeedSequence(list(numbers)).generate_state(2, np.uint32)
    return int(words.view(np.uint64)[0] >> 1)


def _plain_loop(config):
    """The documented training loop written out straight, without train/: ``(model, head,
    optimizer, per-step (lr, loss, ce, ecloss))`` of one process's run of ``config``."""
    import ecloss_fast
    from models import build_head

    m, h, e, o, run = config.model, config.head, config.ecloss, config.optim, config.train
    seed = _plain_seed(run.seed, 0)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    faces = SyntheticFaces(config.data.num_identities, config.data.images_per_identity,
                           size=m.input_size, seed=config.data.seed, identity=config.data.identity)
    model = build_model(m.arch, batch_norm=m.batch_norm, width=m.width, input_size=m.input_size,
                        embedding_dim=m.embedding_dim, dropout=m.dropout)
    head = build_head(h.kind, m.embedding_dim, config.data.num_identities, s=h.s, m=h.m)
    parameters = [p for p in [*model.parameters(), *head.parameters()] if p.requires_grad]
    optimizer = torch.optim.SGD(parameters, lr=o.lr, momentum=o.momentum,
                                weight_decay=o.weight_decay)
    steps_per_epoch = len(faces) // run.batch_size
    warmup, total = round(o.warmup_epochs * steps_per_epoch), run.epochs * steps_per_epoch

    def factor(step):  # linear warm-up, then cosine to 0
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / (total - warmup))))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    criterion = ecloss_fast.ECLoss(tau=e.tau, radius=e.radius, templates=e.templates)
    history, step = [], 0
    with ecloss_fast.flush_subnormals(True):  # as the trainer does on the CPU
        for epoch in range(run.epochs):
            order = torch.randperm(len(faces), generator=torch.Generator().manual_seed(
                run.seed * 1_000_003 + epoch))
            for batch in order[:steps_per_epoch * run.batch_size].view(-1, run.batch_size):
                images = torch.stack([faces[int(i)]["image"] for i in batch])
                labels = torch.tensor([faces[int(i)]["label"] for i in batch])
                coins = torch.rand(len(batch), generator=torch.Generator().manual_seed(
                    _plain_seed(run.seed, step, 0)))
                images = torch.where((coins < 0.5)[:, None, None, None], images.flip(-1), images)
                out = model(images)
                ce = F.cross_entropy(head(out.embedding, labels).float(), labels)
                ecl = criterion(out.maps)
                loss = h.alpha * ce + config.beta.value * ecl
                loss.backward()
                torch.nn.utils.clip_grad_norm_(parameters, o.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                history.append((scheduler.get_last_lr()[0], *(t.double().item() for t in (loss, ce, ecl))))
                step += 1
    return model, head, optimizer, history


def test_the_trainer_is_the_plain_training_loop_bit_for_bit(tmp_path):
    # The trainer's step, written out straight from its documentation (module docstrings of
    # train/trainer.py, train/data/sampler.py, train/optim.py): seeds, model and head
    # initialisation, data order, flips, dropout, CE + beta * ECLoss, clipping, SGD and its
    # schedule. Its weights, momentum and logged losses must be the trainer's exactly, so
    # a reorganisation of train/ that changes what a step computes, or the order of its
    # random numbers, fails here.
    sections = dict(model={"dropout": 0.3}, beta={"schedule": "constant", "value": 1e-3},
                    ecloss={"templates": 50},
                    train={"epochs": 2, "deterministic": False, "checkpoint_every": 0})
    run_dir = train(tiny(tmp_path, **sections))
    model, head, optimizer, history = _plain_loop(config_from_dict(tiny(tmp_path, **sections)))
    state = load_checkpoint(run_dir)
    for part, module in (("model", model), ("head", head)):
        for key, value in module.state_dict().items():
            assert torch.equal(state[part][key], value), f"{part}.{key}"
    parameters = optimizer.param_groups[0]["params"]
    momenta = {i: optimizer.state[p]["momentum_buffer"] for i, p in enumerate(parameters)}
    saved = state["optimizer"]["state"]
    assert momenta.keys() == saved.keys()
    assert all(torch.equal(value, saved[i]["momentum_buffer"]) for i, value in momenta.items())
    with open(run_dir / "log.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(float(r["lr"]), float(r["loss"]), float(r["ce"]), float(r["ecloss"])) for r in rows] == history


def test_nonfinite_step_is_skipped_and_reported(tmp_path):
    config = config_from_dict(tiny(tmp_path, train={"epochs": 1}))
    from train import distributed
    trainer = Trainer(config, distributed.setup("cpu"))
    criterion = trainer.criterion

    forward = criterion.forward

    def poisoned(maps):  # a NaN ECLoss at step 2 only
        loss = forward(maps)
        return loss * math.nan if trainer.step == 2 else loss

    criterion.forward = poisoned
    snapshots = {}
    step = trainer._train_step

    def recording(batch):
        snapshots[trainer.step] = [p.detach().clone() for p in trainer.module.parameters()]
        return step(batch)

    trainer._train_step = recording
    trainer.run()
    assert trainer.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(snapshots[2], snapshots[3]))
    assert not all(torch.equal(a, b) for a, b in zip(snapshots[3], snapshots[4]))
    # Steps are numbered as in log.csv: the third one.
    assert "step 3: non-finite gradient" in (trainer.run_dir / "train.log").read_text()
    with open(trainer.run_dir / "log.csv", newline="") as handle:
        assert list(csv.DictReader(handle))[-1]["skipped_steps"] == "1"


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_on_cpu(tmp_path, amp):
    trainer = fit(tiny(tmp_path, train={"epochs": 1, "amp": amp, "stop_at_step": 2}))
    state = load_checkpoint(trainer.run_dir)
    assert state["step"] == 2
    if amp == "fp16":
        assert state["scaler"]["scale"] > 0  # the GradScaler state is checkpointed
    with open(trainer.run_dir / "log.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    # One step per row: a skipped step (fp16's first scales overflow) leaves its row blank.
    skipped = [int(row["skipped_steps"]) for row in rows]
    assert rows and skipped[-1] == state["skipped_steps"]
    for row, now, before in zip(rows, skipped, [0] + skipped):
        assert row["ce"] == "" if now > before else math.isfinite(float(row["ce"]))


def test_head_kinds_and_full_template_set(tmp_path):
    # ArcFace with the marginal estimator; CosFace with the paper's subset of templates.
    # The second also measures the gradient ratio at the maps instead of the weights.
    for name, head, ecloss, measure_at in (("arc", "arcface", {"estimator": "marginal"}, "weights"),
                                           ("cos", "cosface", {"templates": 50}, "maps")):
        run_dir = train(tiny(tmp_path, name, head={"kind": head}, ecloss=ecloss,
                             beta={"measure_at": measure_at, "value": 1e12, "update_every": 1,
                                   "max_value": 1e12},  # tiny models need beta > 1e5
                             train={"epochs": 1, "stop_at_step": 2}))
        state = load_checkpoint(run_dir)
        assert state["step"] == 2 and state["skipped_steps"] == 0
        assert 0.05 < state["beta"]["ratio"] < 1  # measured after beta fell to its target


def test_tau_auto_calibrates_once_and_a_resumed_run_keeps_it(tmp_path, monkeypatch):
    import ecloss_fast

    calls = []
    calibrate = ecloss_fast.calibrate_tau

    def recording(maps, **kwargs):
        calls.append((maps.detach().clone(), kwargs))
        return calibrate(maps, **kwargs)

    monkeypatch.setattr(ecloss_fast, "calibrate_tau", recording)
    ecloss = {"tau": "auto", "score_spread": 2.5, "templates": 50}
    first = fit(tiny(tmp_path, "auto", ecloss=ecloss, train={"epochs": 1, "stop_at_step": 2}))
    assert len(calls) == 1
    maps, kwargs = calls[0]
    assert maps.shape == (4, 32, 4, 4)  # the first batch's target maps
    assert kwargs == dict(radius=4.0, templates=50, spread=2.5, normalize=False, process_group=None)
    # The value, from the recorded maps in float64: spread / mean_{b,c} std_t of the scores.
    templates = ecloss_fast.make_templates(4, subset=50, dtype=torch.float64).flatten(1)
    scores = maps.double().flatten(2) @ templates.T
    expected = 2.5 / scores.std(-1, unbiased=False).mean().item()
    state = load_checkpoint(first.run_dir)
    assert state["calibrated_tau"] == pytest.approx(expected, rel=1e-5)
    assert first.criterion.tau == state["calibrated_tau"]
    assert f"tau = {state['calibrated_tau']:.6g}" in (first.run_dir / "train.log").read_text()

    # A checkpoint written before a config key existed resumes with the key's default
    # (such a checkpoint predates the checksum and the data set's identity too).
    for key in ("drop_last_pool",):
        del state["config"]["model"][key]
    del state["sha256"], state["data"]
    torch.save(state, first.run_dir / "checkpoints" / "last.pt")
    resumed = fit(tiny(tmp_path, "auto", ecloss=ecloss,
                       train={"epochs": 1, "stop_at_step": 4, "resume": str(first.run_dir)}))
    assert len(calls) == 1, "a resumed run must not calibrate again"
    assert resumed.criterion.tau == state["calibrated_tau"]
    assert load_checkpoint(resumed.run_dir)["calibrated_tau"] == state["calibrated_tau"]
    # A configured tau is used as it is and nothing is calibrated.
    fixed = fit(tiny(tmp_path, "fixed", train={"epochs": 1, "stop_at_step": 1}))
    assert len(calls) == 1 and fixed.criterion.tau == 1e-3
    assert load_checkpoint(fixed.run_dir)["calibrated_tau"] is None


def test_loss_options_reach_ecloss(tmp_path, monkeypatch):
    import ecloss_fast
    from train import distributed

    built = []

    class Recorder(ecloss_fast.ECLoss):
        def __init__(self, **kwargs):
            built.append(kwargs)
            super().__init__(**kwargs)

    monkeypatch.setattr(ecloss_fast, "ECLoss", Recorder)
    for ecloss, options in (({}, {"diversity": 0.0, "normalize": False}),
                            ({"diversity": 0.5}, {"diversity": 0.5, "normalize": False}),
                            ({"normalize": True}, {"diversity": 0.0, "normalize": True})):
        trainer = Trainer(config_from_dict(tiny(tmp_path, f"options{len(built)}", ecloss=ecloss)),
                          distributed.setup("cpu"))
        trainer.close()
        assert {k: v for k, v in built[-1].items() if k in ("diversity", "normalize")} == options
        assert built[-1]["process_group"] is None  # one process


def test_diversity_and_normalize_train_and_log_the_diagnostics(tmp_path):
    """A tiny run with both options: log.csv and TensorBoard hold the ECLoss diagnostics of
    every logged step, each the value of that step's call."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    names = ("mi_over_log_n", "max_p", "score_std")
    trainer = fit(tiny(tmp_path, "diag", ecloss={"diversity": 0.5, "normalize": True, "tau": 5.0},
                       train={"epochs": 1, "stop_at_step": 3, "tensorboard": True}))
    with open(trainer.run_dir / "log.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(row["step"]) for row in rows] == [1, 2, 3]
    for row in rows:
        mi, max_p, spread = (float(row[name]) for name in names)
        assert 0 <= mi <= 1 and 1 / 137 <= max_p <= 1 and spread > 0, row
    # The last row is the last call's diagnostics, as the criterion kept them.
    for name in names:
        assert float(rows[-1][name]) == pytest.approx(
            trainer.criterion.last_diagnostics[name].item(), rel=1e-6)
    events = EventAccumulator(str(trainer.run_dir / "tensorboard"))
    events.Reload()
    for name in names:
        logged = events.Scalars(f"train/{name}")
        assert [event.step for event in logged] == [1, 2, 3]
        assert logged[-1].value == pytest.approx(float(rows[-1][name]), rel=1e-6)
    assert load_checkpoint(trainer.run_dir)["skipped_steps"] == 0


@pytest.mark.parametrize("override, message", [
    ("ecloss.tau=fast", "ecloss.tau"), ("ecloss.tau=-0.5", "ecloss.tau must be positive"),
    ("ecloss.score_spread=0", "ecloss.score_spread must be positive"),
    ("ecloss.diversity=-1", "ecloss.diversity"), ("ecloss.normalize=1", "ecloss.normalize"),
    ("model.drop_last_pool=maybe", "model.drop_last_pool"), ("data.jitter=0.5", "data.jitter")])
def test_config_rejects_bad_new_options(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(overrides=[override])


def test_config_new_options():
    with pytest.raises(ValueError, match="data.jitter"):
        load_config(overrides=["data.jitter=true", "data.source=folder", "data.path=faces"])
    config = load_config(overrides=["ecloss.tau=auto", "model.drop_last_pool=true", "data.jitter=true"])
    assert config.ecloss.tau == "auto" and config.model.drop_last_pool and config.data.jitter
    defaults = Config()
    assert (defaults.ecloss.tau, defaults.ecloss.score_spread, defaults.ecloss.diversity,
            defaults.ecloss.normalize, defaults.model.drop_last_pool, defaults.data.jitter) == \
        (1e-3, 1.0, 0.0, False, False, False)


def test_drop_last_pool_trains_on_twice_the_map_side(tmp_path):
    run_dir = train(tiny(tmp_path, "pool", model={"drop_last_pool": True},
                         train={"epochs": 1, "stop_at_step": 1}))
    model, config = load_for_eval(run_dir)
    assert config.model.drop_last_pool and model.map_size == 8  # 64 / 8
    assert load_checkpoint(run_dir)["step"] == 1


def test_sigint_saves_a_checkpoint_and_exits(tmp_path):
    overrides = [f"{k}={v}" for k, v in {
        "model.arch": "vgg13", "model.width": 0.0625, "model.input_size": 64,
        "model.embedding_dim": 16, "data.num_identities": 4, "data.images_per_identity": 6,
        "data.num_workers": 1, "train.batch_size": 4, "train.epochs": 500,
        "train.output_dir": str(tmp_path), "train.run_name": "sig", "train.log_every": 1,
        "train.tensorboard": "false"}.items()]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    # Its own process group, signalled as a whole as a terminal's Ctrl-C does: the DataLoader
    # worker gets SIGINT too and must leave the decision to the main process.
    process = subprocess.Popen([sys.executable, "-m", "train", *overrides], cwd=tmp_path, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    log = tmp_path / "sig" / "log.csv"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if log.is_file() and len(log.read_text().splitlines()) > 2:
            break
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGINT, stderr
    assert "stopped by SIGINT" in stderr and stderr.count("SIGINT received") == 1
    state = load_checkpoint(tmp_path / "sig")
    assert 2 <= state["step"] < 500 * 6
    # The command line resumes from the checkpoint's own config, overrides on top.
    from train.__main__ import main
    assert main(["--resume", str(tmp_path / "sig"), f"train.stop_at_step={state['step'] + 1}",
                 "train.progress=false"]) == 0
    assert load_checkpoint(tmp_path / "sig")["step"] == state["step"] + 1


# ---------------------------------------------------------------------------- DDP on gloo


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _without_batchnorm(monkeypatch=None):
    """Build models whose embedding-head BatchNorms are identities.

    BatchNorm statistics are per process (SyncBatchNorm needs a GPU), so only a model
    without them has a DDP gradient equal to the one-process gradient of the global batch.
    """
    import train.network

    def build(*args, **kwargs):
        model = build_model(*args, **kwargs)
        model.bn_maps, model.bn_embedding = torch.nn.Identity(), torch.nn.Identity()
        return model

    if monkeypatch is None:
        train.network.build_model = build
    else:
        monkeypatch.setattr(train.network, "build_model", build)


def _ddp_worker(rank, world_size, port, config):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world_size),
                      RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    _without_batchnorm()
    train(config)


def test_two_process_gloo_equals_one_process_with_the_global_batch(tmp_path, monkeypatch):
    # No BatchNorm, dropout or flips: then DDP's averaged gradient, with the marginal
    # estimator's pbar over the global batch, is the one-process gradient of batch 2 x 4.
    # Without BatchNorm, a small lr keeps the maps from running away (see train/beta.py).
    _without_batchnorm(monkeypatch)
    # A seed far above the automatic beta: it drops to its target at the first measurement,
    # so that ECLoss weighs in from the first step.
    sections = dict(model={"batch_norm": False}, data={"flip": False}, optim={"lr": 0.01},
                    ecloss={"estimator": "marginal"}, beta={"value": 1e12, "update_every": 1, "max_value": 1e12},
                    train={"epochs": 1, "deterministic": False})
    one = train(tiny(tmp_path, "one", **copy.deepcopy(sections) | {
        "train": {"epochs": 1, "batch_size": 8}}))
    config = tiny(tmp_path, "two", **copy.deepcopy(sections) | {"train": {"epochs": 1, "batch_size": 4}})
    mp.spawn(_ddp_worker, args=(2, _free_port(), config), nprocs=2, join=True)
    a, b = load_checkpoint(one), load_checkpoint(tmp_path / "two")
    assert b["world_size"] == 2 and len(b["rng"]) == 2 and a["step"] == b["step"] == 3
    from train import distributed
    start = Trainer(config_from_dict(tiny(tmp_path, "init", **sections)), distributed.setup("cpu"))
    initial = torch.cat([p.detach().flatten() for p in start.module.parameters()])
    start.close()

    def flat(state):
        return torch.cat([state[part][k].flatten() for part in ("model", "head")
                          for k, _ in getattr(start.module, "backbone" if part == "model" else part)
                          .named_parameters()])

    # Near a uniform softmax the ECLoss gradient is a small difference of float32 numbers,
    # so summation order matters at the 1e-3 level; a wrong pbar or average is O(1).
    update_one, update_two = flat(a) - initial, flat(b) - initial
    assert (update_two - update_one).norm() < 1e-2 * update_one.norm()
    assert b["beta"]["log_beta"] == pytest.approx(a["beta"]["log_beta"], rel=1e-4)
    assert a["skipped_steps"] == b["skipped_steps"] == 0
    assert 0.1 < a["beta"]["ratio"] < 1  # ECLoss did shape the update


# ---------------------------------------------------------------------------- bad data


def test_training_on_recordio_reports_a_corrupt_record(tmp_path):
    import io

    import numpy as np
    from PIL import Image

    from train.data.recordio import write_recordio
    images = []
    for i in range(12):
        buffer = io.BytesIO()
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
            buffer, format="PNG")
        images.append((i % 3, buffer.getvalue()))
    images[4] = (1, b"\x89PNG broken")  # image key 5
    write_recordio(tmp_path / "train.rec", tmp_path / "train.idx", images)
    data = {"source": "recordio", "path": str(tmp_path / "train.rec"), "flip": True}
    with pytest.raises(BadDataError, match="key 5"):
        train(tiny(tmp_path, "stop", data=data, train={"epochs": 1}))
    run_dir = train(tiny(tmp_path, "skip", data=data | {"on_bad_data": "skip"}, train={"epochs": 1}))
    state = load_checkpoint(run_dir)
    assert state["step"] == 3 and state["skipped_images"] == 1
    assert "skipping bad data" in (run_dir / "train.log").read_text()  # with the path and key
    assert "train.rec key 5" in (run_dir / "train.log").read_text()


def test_synthetic_jitter_reaches_the_training_set():
    from train.config import config_from_dict
    from train.data import build_dataset

    for jitter in (False, True):
        config = config_from_dict({"data": {"num_identities": 2, "images_per_identity": 2,
                                            "jitter": jitter}})
        assert build_dataset(config.data, 32).jitter is jitter


def _log_rows(run_dir) -> list[dict]:
    with open(run_dir / "log.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_subset_cosine_is_logged_and_changes_nothing(tmp_path, monkeypatch):
    """train.subset_cosine_every=2 measures at steps 0 and 2 and logs each in the next row
    (steps 1 and 3), the cosine of that step's maps as float64 NumPy computes it; the run
    is otherwise the same as without the diagnostic."""
    import numpy as np

    from _numpy_ecloss import _templates, loss_and_grad
    from ecloss_fast import metrics

    measured = []
    real = metrics.subset_gradient_cosine

    def spy(maps, **options):
        measured.append((maps.detach().double().numpy().copy(), options))
        return real(maps, **options)

    monkeypatch.setattr(metrics, "subset_gradient_cosine", spy)
    train_options = {"epochs": 1, "stop_at_step": 4}
    with_cosine = fit(tiny(tmp_path, "cosine", ecloss={"tau": 5.0}, train={
        **train_options, "subset_cosine_every": 2, "subset_cosine_templates": 20}))
    without = fit(tiny(tmp_path, "plain", ecloss={"tau": 5.0}, train=train_options))
    rows, plain = _log_rows(with_cosine.run_dir), _log_rows(without.run_dir)
    assert [row["step"] for row in rows] == ["1", "2", "3", "4"]
    assert [row["subset_cosine"] == "" for row in rows] == [False, True, False, True]
    assert "subset_cosine" not in plain[0]
    assert len(measured) == 2 and all(options["tau"] == 5.0 and options["subset"] == 20
                                      for _, options in measured)
    full = _templates(4, 4)
    subset = full[np.round(np.linspace(0, len(full) - 1, 20)).astype(int)]
    for (maps, _), row in zip(measured, rows[::2]):
        _, grad_full = loss_and_grad(maps, tau=5.0)
        _, grad_subset = loss_and_grad(maps, tau=5.0, templates=subset)
        cosine = (grad_full * grad_subset).sum() / np.linalg.norm(grad_full) / np.linalg.norm(grad_subset)
        assert float(row["subset_cosine"]) == pytest.approx(cosine, rel=1e-4)
    for row, other in zip(rows, plain):
        for key in ("loss", "ce", "ecloss", "beta", "grad_norm", "mi_over_log_n"):
            assert row[key] == other[key], key
    _assert_same_state(load_checkpoint(with_cosine.run_dir), load_checkpoint(without.run_dir))


@pytest.mark.parametrize("overrides, message", [
    ({"train": {"subset_cosine_every": -1, "subset_cosine_templates": 20}},
     "train.subset_cosine_every must be >= 0"),
    ({"train": {"subset_cosine_every": 5, "subset_cosine_templates": 20}, "ecloss": {"enabled": False}},
     "needs ecloss.enabled"),
    ({"train": {"subset_cosine_every": 5, "subset_cosine_templates": 138}},
     r"train.subset_cosine_templates must be an int from 1 to 137 \(the templates of 4x4 maps\)")])
def test_config_rejects_a_bad_subset_cosine(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        config_from_dict(tiny(tmp_path, **overrides))


# ---------------------------------------------------------------------------- branches


def _branch_sections(**train_options):
    """ECLoss with tau calibrated on the first batch, dropout (random numbers every step)
    and every checkpoint kept, as the study's runs keep theirs."""
    return dict(model={"dropout": 0.3}, ecloss={"tau": "auto", "score_spread": 3.0},
                train={"epochs": 2, "checkpoint_every": 3, "keep_checkpoints": 10, **train_options})


_ROW_KEYS = ("loss", "ce", "ecloss", "beta", "grad_norm", "accuracy", "lr", "mi_over_log_n", "max_p")


@pytest.mark.parametrize("step", [3, 6])  # mid-epoch, and an epoch's end as in the study
def test_a_branch_with_the_same_config_and_data_order_is_the_run(tmp_path, step, monkeypatch):
    import ecloss_fast

    straight = fit(tiny(tmp_path, "straight", **_branch_sections()))
    calls = []
    real = ecloss_fast.calibrate_tau
    monkeypatch.setattr(ecloss_fast, "calibrate_tau", lambda *a, **k: calls.append(1) or real(*a, **k))
    source = f"{straight.run_dir}:{step}"
    branch = fit(tiny(tmp_path, "branch", **_branch_sections(branch_from=source)))
    assert branch.run_dir != straight.run_dir and not calls, "a branch keeps the run's tau"
    assert branch.calibrated_tau == straight.calibrated_tau
    _assert_same_state(load_checkpoint(straight.run_dir), load_checkpoint(branch.run_dir))
    # The branch's log starts after the step it branched at, row for row the run's.
    rows, original = _log_rows(branch.run_dir), _log_rows(straight.run_dir)[step:]
    assert [row["step"] for row in rows] == [row["step"] for row in original]
    for row, other in zip(rows, original):
        assert all(row[key] == other[key] for key in _ROW_KEYS), row["step"]
    assert load_checkpoint(branch.run_dir)["config"]["train"]["branch_from"] == source
    # Stopped, the branch resumes from its own checkpoint (train.branch_from left as it was).
    stopped = fit(tiny(tmp_path, "stopped", **_branch_sections(branch_from=source, stop_at_step=9)))
    assert load_checkpoint(stopped.run_dir)["step"] == 9
    resumed = fit(tiny(tmp_path, "stopped", **_branch_sections(branch_from=source,
                                                              resume=str(stopped.run_dir))))
    assert "resumed at step 9 " in (resumed.run_dir / "train.log").read_text()
    _assert_same_state(load_checkpoint(straight.run_dir), load_checkpoint(resumed.run_dir))


def test_a_branch_takes_its_own_templates_and_data_order(tmp_path):
    straight = fit(tiny(tmp_path, "straight", **_branch_sections()))
    source = f"{straight.run_dir}:6"
    subset = fit(tiny(tmp_path, "subset", ecloss={"tau": "auto", "score_spread": 3.0, "templates": 20},
                      **{key: value for key, value in _branch_sections(branch_from=source).items()
                         if key != "ecloss"}))
    assert subset.criterion.templates == 20 and subset.calibrated_tau == straight.calibrated_tau
    reordered = fit(tiny(tmp_path, "reordered", **_branch_sections(branch_from=source,
                                                                  data_order_seed=100)))
    # The sampler's epochs after the branch: another order of the same images.
    order = GlobalBatchSampler(24, 4, seed=0)
    other = GlobalBatchSampler(24, 4, seed=100)
    order.set_epoch(1), other.set_epoch(1)
    assert [list(b) for b in reordered.sampler] == [list(b) for b in other]
    assert [list(b) for b in subset.sampler] == [list(b) for b in order] != list(other)
    final = load_checkpoint(straight.run_dir)["model"]
    for trainer in (subset, reordered):
        state = load_checkpoint(trainer.run_dir)
        assert state["step"] == 12
        assert not all(torch.equal(final[key], state["model"][key]) for key in final)
    # data_order_seed equal to the seed is the run without it.
    same = fit(tiny(tmp_path, "same", **_branch_sections(data_order_seed=0)))
    _assert_same_state(load_checkpoint(straight.run_dir), load_checkpoint(same.run_dir))


def test_branch_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="train.branch_from must be RUN_DIR:STEP"):
        config_from_dict(tiny(tmp_path, train={"branch_from": str(tmp_path)}))
    with pytest.raises(ValueError, match="train.branch_from must be RUN_DIR:STEP"):
        config_from_dict(tiny(tmp_path, train={"branch_from": f"{tmp_path}:0"}))
    straight = fit(tiny(tmp_path, "straight", train={"epochs": 1, "checkpoint_every": 3}))
    with pytest.raises(FileNotFoundError, match=r"no checkpoint of step 4 .* \(kept steps: 3, 6\)"):
        fit(tiny(tmp_path, "branch", train={"epochs": 1, "branch_from": f"{straight.run_dir}:4"}))
    with pytest.raises(ValueError, match="cannot branch: model.width is 0.125"):
        fit(tiny(tmp_path, "wide", model={"width": 0.125},
                 train={"epochs": 1, "branch_from": f"{straight.run_dir}:3"}))


def test_a_branch_finds_the_runs_data_under_another_name_of_the_same_file(tmp_path, monkeypatch):
    """The study's runs name their data relative to where they started; a branch started
    there may name the same file absolutely. Another file is still refused."""
    from train.study import render_training_set

    render_training_set(4, 6, 64, tmp_path / "data" / "train.rec", identity="outer")
    monkeypatch.chdir(tmp_path)
    data = {"source": "recordio", "path": "data/train.rec"}
    first = fit(tiny(tmp_path, "first", data=data, train={"epochs": 1, "checkpoint_every": 3}))
    absolute = {"source": "recordio", "path": str(tmp_path / "data" / "train.rec")}
    branch = fit(tiny(tmp_path, "branch", data=absolute,
                      train={"epochs": 1, "branch_from": f"{first.run_dir}:3"}))
    _assert_same_state(load_checkpoint(first.run_dir), load_checkpoint(branch.run_dir))
    for suffix in (".rec", ".idx"):
        (tmp_path / f"copy{suffix}").write_bytes((tmp_path / "data" / f"train{suffix}").read_bytes())
    with pytest.raises(ValueError, match="cannot branch: data.path is"):
        fit(tiny(tmp_path, "other", data={"source": "recordio", "path": str(tmp_path / "copy.rec")},
                 train={"epochs": 1, "branch_from": f"{first.run_dir}:3"}))
