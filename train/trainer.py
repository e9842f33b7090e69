"""The training loop: ``alpha * CE(head(embedding)) + beta * ECLoss(maps)``.

``train(config)`` runs in-process and returns the run directory; ``python -m train`` is
the command line around it, with or without ``torchrun``. The run directory holds::

    config.yaml            the full resolved config
    log.csv                one row per ``train.log_every`` steps (see train/logs.py); with
                           ``train.verify``, each set's pair accuracy every
                           ``train.verify_every`` steps (at the next logged step); with
                           ``train.subset_cosine_every``, ``subset_cosine`` likewise
    train.log              the console messages
    tensorboard/           TensorBoard events
    checkpoints/last.pt    rewritten every checkpoint; step_<n>.pt kept periodically

What the loop does per step, in order: move the batch, mirror each image with probability
1/2 (a generator seeded by seed, step and rank, so a resumed run replays the same flips
and no RNG state is involved), forward under autocast, CE in float32,
ECLoss on the maps outside autocast (the core picks its own precision; with
``ecloss.tau=auto`` the first step calibrates tau on these maps first), every
``beta.update_every`` steps the two gradient norms at the maps (train/beta.py), every
``train.subset_cosine_every`` steps (off by default) the cosine of the full set's and a
subset's ECLoss gradients at the maps (a diagnostic; it changes nothing), backward
through the (fp16-only) GradScaler, unscale, clip, and skip the update if the gradient is
not finite, or if the BatchNorm statistics the forward pass updated are not: then the
model, the BatchNorm statistics and the optimizer state are exactly as before the step
(train/step_guard.py). SIGINT and SIGTERM finish the current step (in several processes:
the next logged step, where they agree), save ``last.pt`` and return.

``train.branch_from=RUN_DIR:STEP`` starts a new run from another run's checkpoint of that
step (everything a resume restores), with this run's own config; ``train.data_order_seed``
seeds the batch order instead of ``train.seed``.

The run directory is locked for the run's life (``.lock``, train/checkpoint.py): a second
trainer or resume there stops with "in use by process N". A resumed run checks that the
data set is the one it was trained on (image and class counts, a hash of the sample list)
unless ``train.allow_data_change``.

Host synchronisation: one per step, the step's finite flag, read before the optimizer step
(train/step_guard.py), and one per logged step (the row's all-reduce, read with
``tolist``). Beyond them: the automatic beta's measurement every ``beta.update_every``
steps, the subset cosine read at the logged step after a measurement, and PyTorch's fp16
GradScaler, which reads its found-inf flag every step.
"""
from __future__ import annotations

import contextlib
import functools
import os
import random
import signal
import threading
import time
import warnings
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from tqdm import tqdm

import ecloss_fast
from ecloss_fast import metrics
from models import build_head, build_model
from train import distributed
from train.beta import BetaSchedule
from train.checkpoint import (CHECKPOINT_VERSION, NonFiniteError, RunLock, check_writable,
                              load_checkpoint, load_weights, remove_temporaries,
                              resolve_checkpoint, save_checkpoint, step_checkpoint)
from train.config import Config, branch_point, config_from_dict, config_to_dict
from train.data import BadDataError, build_dataset, check_same_data, collate_faces, data_identity
from train.data.sampler import GlobalBatchSampler
from train.logs import (RunLog, console_logger, interval_means, progress_postfix, record_error,
                        release_console_logger)
from train.optim import build_optimizer, build_scheduler
from train.partial_fc import PartialFC
from train.step_guard import StepGuard, diverged
from train.verification import VerificationPairs, pair_accuracy, read_bin

__all__ = ["Recognizer", "Trainer", "fit", "train"]


class Recognizer(nn.Module):
    """Backbone and head in one module, so that one DDP wrapper synchronises both."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, images, labels):
        """Returns ``(logits (B, classes), FaceOutput(embedding, maps))``."""
        out = self.backbone(images)
        return self.head(out.embedding, labels), out


def _rng_state(device: torch.device) -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def _set_rng_state(state: dict, device: torch.device) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _mix(*numbers: int) -> int:
    """A 63-bit seed from several integers (numpy's SeedSequence hashing)."""
    words = np.random.SeedSequence(list(numbers)).generate_state(2, np.uint32)
    return int(words.view(np.uint64)[0] >> 1)


class Trainer:
    """One training run in the process group ``ctx``; ``run()`` returns the run directory.

    After ``run()``, ``stopped_by`` is the signal number that interrupted it, or ``None``.
    """

    def __init__(self, config: Config, ctx: distributed.Context):
        self.config, self.ctx, self.device = config, ctx, ctx.device
        if config.model.sync_bn:
            distributed.check_sync_batchnorm(ctx)
        if config.head.sample_rate != 1 and not config.head.partial_fc:
            raise ValueError("head.sample_rate samples the classes of a partial FC head; "
                             "set head.partial_fc=true or head.sample_rate=1")
        self.verification = self._verification_sets()
        self.stopped_by: int | None = None
        self._stop_signal: int | None = None
        run = config.train
        self._global_switches = (torch.are_deterministic_algorithms_enabled(),
                                 torch.backends.cudnn.benchmark)
        if run.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = not run.deterministic
        # ECLoss's gradient carries tau / (B*C) * beta: on the CPU it turns into subnormal
        # floats in the backbone's backward, which made a step 50x slower (bench/NOTES.md).
        # In every intra-op thread: set_flush_denormal alone reaches the calling thread only.
        self._cpu_switches = contextlib.ExitStack()
        self._cpu_switches.enter_context(ecloss_fast.flush_subnormals(self.device.type == "cpu"))
        self._lock: RunLock | None = None
        try:
            self._build()
        except BaseException:
            # Left set, the OpenMP threads' flush switch hung the process at exit.
            self._restore_switches()
            self._release_lock()
            raise

    def _build(self) -> None:
        """Data, model, optimiser and logs of the run, from the checkpoint when resuming."""
        config, ctx, run = self.config, self.ctx, self.config.train
        _seed_everything(_mix(run.seed, self.ctx.rank))

        state = load_checkpoint(run.resume, resume=True) if run.resume else None
        # train.branch_from: another run's checkpoint to start from, into a new run directory
        # (resuming the branch itself reads its own checkpoint instead).
        self._branch = (None if state is not None or run.branch_from is None
                        else step_checkpoint(*branch_point(run.branch_from)))
        start = state if self._branch is None else load_checkpoint(self._branch, resume=True)
        if start is not None:
            self._check_compatible(start, "resume" if self._branch is None else "branch")
        # The data before the run directory: a data set that cannot be read leaves none.
        self.dataset = build_dataset(config.data, config.model.input_size)
        self.num_classes = self.dataset.num_classes
        self.data_identity = data_identity(self.dataset)
        self.run_dir = self._run_dir(state)
        self.log = console_logger(self.run_dir, self.ctx.is_main)
        if getattr(self, "_leftovers", None):
            self.log.warning("removed %d temporary file(s) of an interrupted checkpoint save: %s",
                             len(self._leftovers), ", ".join(map(str, self._leftovers)))
        if start is not None:
            check_same_data(start.get("data"), self.data_identity, run.allow_data_change, self.log)
        m, h = config.model, config.head
        backbone = build_model(m.arch, batch_norm=m.batch_norm, width=m.width,
                               input_size=m.input_size, embedding_dim=m.embedding_dim,
                               dropout=m.dropout, drop_last_pool=m.drop_last_pool)
        if h.partial_fc:
            head = PartialFC(h.kind, m.embedding_dim, self.num_classes, s=h.s, m=h.m,
                             sample_rate=h.sample_rate, max_batch=run.batch_size,
                             rank=ctx.rank, world_size=ctx.world_size, group=ctx.group)
        else:
            head = build_head(h.kind, m.embedding_dim, self.num_classes, s=h.s, m=h.m)
        if m.sync_bn:
            backbone = distributed.sync_batchnorm(backbone, ctx)
        self.module = Recognizer(backbone, head).to(self.device)
        origin = run.resume if self._branch is None else self._branch
        if start is not None:
            load_weights(self.module.backbone, start["model"], origin, "model")
            load_weights(self.module.head, self._head_rows(start["head"], "load"), origin, "head")
        self.network = self.module  # what the forward pass calls: DDP-wrapped when distributed
        if self.ctx.distributed:
            ddp = functools.partial(nn.parallel.DistributedDataParallel,
                                    device_ids=[self.device] if self.device.type == "cuda" else None)
            # A sharded head differs between the ranks: DDP must not average it.
            self.network = (Recognizer(ddp(self.module.backbone), head) if h.partial_fc
                            else ddp(self.module))

        self.sampler = GlobalBatchSampler(len(self.dataset), run.batch_size,
                                          world_size=self.ctx.world_size, rank=self.ctx.rank,
                                          seed=run.seed if run.data_order_seed is None
                                          else run.data_order_seed)
        self.steps_per_epoch = self.sampler.batches_per_epoch
        self.total_steps = run.epochs * self.steps_per_epoch
        self.optimizer = build_optimizer(self.module.parameters(), config.optim)
        self.scheduler = build_scheduler(self.optimizer, config.optim, self.steps_per_epoch,
                                         self.total_steps)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=run.amp == "fp16")
        # ecloss.tau=auto: the tau calibrated on the run's first batch (None until then; a
        # resumed run takes it from the checkpoint). None for a configured tau.
        self.calibrated_tau = self._saved_tau(start)
        self.criterion = self._criterion()
        self.beta = BetaSchedule(config.beta, h.alpha)
        self.step = self.epoch = self.batch_in_epoch = 0
        self.skipped_images = 0
        self.guard = StepGuard(self.module, run.max_nonfinite_steps, self.log)
        # The newest checkpoint written (or resumed from), (path, step): a diverged run names it.
        self._last_checkpoint = (resolve_checkpoint(origin), start["step"]) if start else None
        self._stop_agreed = False  # a signal seen by some rank, agreed at a logged step
        if start is not None:
            self._restore(start)
        if self._branch is not None:
            self.log.info("branched from %s at step %d", self._branch, self.step)
        # train.subset_cosine_every: the last measurement, a device tensor, until logged.
        self._subset_cosine: torch.Tensor | None = None
        self.runlog = RunLog(self.run_dir, enabled=self.ctx.is_main, tensorboard=run.tensorboard,
                             resume_step=self.step if state is not None else None,
                             extra_fields=tuple(f"verify_{Path(p).stem}" for p in run.verify)
                             + (("subset_cosine",) if run.subset_cosine_every else ()))
        self._verified_at = self.step  # the step of the last verification (or the start)

    @property
    def skipped_steps(self) -> int:
        """Non-finite steps skipped in the run (resumed runs included)."""
        return self.guard.skipped

    # -- setup -------------------------------------------------------------------------

    def _verification_sets(self) -> list[VerificationPairs]:
        """The ``train.verify`` sets, checked on every rank and read on rank 0, the one that
        scores them (:meth:`_verify`), before the run starts."""
        run = self.config.train
        if not run.verify:
            return []
        if run.verify_every < 1:
            raise ValueError(f"train.verify_every must be positive, got {run.verify_every}")
        missing = [path for path in run.verify if not Path(path).is_file()]
        if missing:
            raise FileNotFoundError(f"train.verify: no file at {', '.join(missing)}")
        names = [Path(path).stem for path in run.verify]
        if len(set(names)) < len(names):
            raise ValueError(f"train.verify: the sets' file names must differ (they name the "
                             f"log.csv columns), got {list(run.verify)}")
        if not self.ctx.is_main:
            return []
        sets = [read_bin(path, self.config.model.input_size) for path in run.verify]
        for path, pairs in zip(run.verify, sets):
            if len(pairs) < 10:
                raise ValueError(f"train.verify: {path} holds {len(pairs)} pairs; the 10-fold "
                                 "protocol needs at least 10")
        return sets

    def _verify(self) -> dict:
        """``{"verify_<name>": accuracy}`` of the backbone on each ``train.verify`` set,
        scored on rank 0 (the backbone is the same on every rank; the others go on to the
        next collective and wait there)."""
        self._verified_at = self.step
        if not self.verification:
            return {}
        backbone = self.module.backbone
        try:
            scores = {f"verify_{pairs.name}":
                      pair_accuracy(backbone, pairs, batch_size=self.config.train.batch_size,
                                    device=self.device)["accuracy"]
                      for pairs in self.verification}
        finally:
            backbone.train()
        self.log.info("step %d: verification accuracy %s", self.step,
                      ", ".join(f"{name[7:]} {value:.4f}" for name, value in scores.items()))
        return scores

    def _run_dir(self, state: dict | None) -> Path:
        run = self.config.train
        if state is not None:
            checkpoint = resolve_checkpoint(run.resume)
            run_dir = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" \
                else checkpoint.parent
        else:
            name = run.run_name or self.ctx.broadcast_object(
                f"{self.config.model.arch}-{self.config.data.source}-"
                f"{datetime.now().strftime('%Y%m%d-%H%M%S')}")
            run_dir = Path(run.output_dir) / name
        resolved = config_to_dict(self.config)
        resolved["train"]["run_name"] = run_dir.name
        self.config = config_from_dict(resolved)
        error = None
        if self.ctx.is_main:
            try:
                self._claim(run_dir, fresh=state is None)
                (run_dir / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
            except OSError as problem:
                error = problem
        error = self.ctx.broadcast_object(error)  # every rank stops on rank 0's error
        if error is not None:
            raise error
        return run_dir

    def _claim(self, run_dir: Path, fresh: bool) -> None:
        """Lock ``run_dir`` for this run (rank 0), then check it: a new run's must not hold
        one, and its checkpoint folder must take a file; leftovers of a save that was
        killed are removed (under the lock, so never a live run's)."""
        checkpoints = run_dir / "checkpoints"
        checkpoints.mkdir(parents=True, exist_ok=True)
        self._lock = RunLock(run_dir)
        if fresh and (checkpoints / "last.pt").exists():
            raise FileExistsError(f"{run_dir} already holds a run: resume it with "
                                  f"--resume {run_dir} or choose another train.run_name")
        check_writable(checkpoints)
        self._leftovers = remove_temporaries(checkpoints)

    # Keys of the model, head and data sections that a resumed run may change; the others
    # define the parameters and the samples and must match the checkpoint.
    RESUMABLE_CHANGES = frozenset({"head.alpha", "head.sample_rate", "data.num_workers",
                                   "data.on_bad_data"})

    def _check_compatible(self, state: dict, verb: str = "resume") -> None:
        # Through Config, so that keys added after the checkpoint take their defaults.
        saved = config_to_dict(config_from_dict(state["config"]))
        current = config_to_dict(self.config)
        for section in ("model", "head", "data"):
            for key, value in current[section].items():
                name = f"{section}.{key}"
                before = saved[section].get(key)
                # One file named two ways (a relative path from where the run started, an
                # absolute one now) is the same data; check_same_data checks its content.
                same_file = (name == "data.path" and value is not None and before is not None
                             and Path(value).resolve() == Path(before).resolve())
                if name not in self.RESUMABLE_CHANGES and before != value and not same_file:
                    raise ValueError(f"cannot {verb}: {name} is {value!r} but the checkpoint "
                                     f"was trained with {before!r}")

    def _saved_tau(self, state: dict | None) -> float | None:
        if self.config.ecloss.tau != "auto" or state is None:
            return None
        tau = state.get("calibrated_tau")  # absent from checkpoints of a configured tau
        if tau is not None:
            self.log.info("ecloss.tau=auto: tau = %.6g, calibrated at the start of the run "
                          "this one continues", tau)
        return tau

    def _criterion(self):
        """ECLoss as configured; ``None`` when disabled, and while ``tau=auto`` waits for
        the first batch (see :meth:`_calibrate_tau`)."""
        e = self.config.ecloss
        tau = self.calibrated_tau if e.tau == "auto" else e.tau
        if not e.enabled or tau is None:
            return None
        # The batch marginal pbar (marginal estimator, diversity) is over the global batch.
        group = self.ctx.group if e.estimator == "marginal" or e.diversity > 0 else None
        return ecloss_fast.ECLoss(tau=tau, radius=e.radius, templates=e.templates,
                                  estimator=e.estimator, reduction="mean", backend=e.backend,
                                  precision=e.precision, process_group=group,
                                  diversity=e.diversity, normalize=e.normalize)

    def _calibrate_tau(self, maps: torch.Tensor) -> None:
        """``ecloss.tau=auto``: calibrate on these maps (the first batch, every rank's)."""
        e = self.config.ecloss
        self.calibrated_tau = ecloss_fast.calibrate_tau(
            maps, radius=e.radius, templates=e.templates, spread=e.score_spread,
            normalize=e.normalize, process_group=self.ctx.group)
        self.log.info("ecloss.tau=auto: tau = %.6g, calibrated on the maps of step %d: the "
                      "mean std of their scores over the templates is %g", self.calibrated_tau,
                      self.step + 1, e.score_spread)
        self.criterion = self._criterion()

    def _head_rows(self, head_state: dict, direction: str, optimizer_state: dict | None = None):
        """A partial FC head's state (and its optimizer state) gathered from its shards for
        a checkpoint (``direction="save"``, a collective) or this rank's rows of a
        checkpoint's (``"load"``); the unchanged state for a replicated head.

        Checkpoints hold the full classifier, so a run resumes on any number of processes
        and ``load_for_eval`` needs nothing else.
        """
        head = self.module.head
        if not isinstance(head, PartialFC):
            return head_state if optimizer_state is None else (head_state, optimizer_state)
        rows, convert = ((head.num_local, head.gather_rows) if direction == "save"
                         else (head.num_classes, lambda full: head.shard_rows(full).clone()))

        def by_rows(value):
            if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == rows:
                return convert(value)
            return value

        head_state = {key: by_rows(value) for key, value in head_state.items()}
        if optimizer_state is None:
            return head_state
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        sharded = {id(p) for p in head.parameters()}
        states = dict(optimizer_state["state"])
        for index in sorted(i for i, p in enumerate(params) if id(p) in sharded and i in states):
            states[index] = {key: by_rows(value) for key, value in states[index].items()}
        return head_state, {**optimizer_state, "state": states}

    def _restore(self, state: dict) -> None:
        _, optimizer = self._head_rows({}, "load", state["optimizer"])
        self.optimizer.load_state_dict(optimizer)
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.beta.load_state_dict(state["beta"])
        self.step, self.epoch = state["step"], state["epoch"]
        self.guard.skipped, self.skipped_images = state["skipped_steps"], state["skipped_images"]
        if state["world_size"] == self.ctx.world_size:
            self.batch_in_epoch = state["batch_in_epoch"]
            _set_rng_state(state["rng"][self.ctx.rank], self.device)
        else:
            # Same samples seen (the order is global); the per-rank RNG streams cannot be
            # continued, so they restart from (seed, rank, step).
            seen = state["batch_in_epoch"] * state["world_size"]
            self.batch_in_epoch = seen // self.ctx.world_size
            _seed_everything(_mix(self.config.train.seed, self.ctx.rank, self.step))
            self.log.warning(
                "resuming with %d processes instead of %d: the global batch is now %d, the "
                "data order is kept, random streams are reseeded, and steps and the learning "
                "rate schedule count the new batches", self.ctx.world_size,
                state["world_size"], self.sampler.global_batch)
        if self.batch_in_epoch >= self.steps_per_epoch:
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        self.log.info("resumed at step %d (epoch %d, batch %d)", self.step, self.epoch + 1,
                      self.batch_in_epoch)

    # -- checkpoints and signals -------------------------------------------------------

    def save(self, periodic: bool = False) -> Path:
        """Write ``checkpoints/last.pt`` (and ``step_<n>.pt`` when ``periodic``); all ranks call it.

        A failed write or a non-finite model stops the run (rank 0's error on every rank),
        named in ``train.log``; the previous ``last.pt`` is left as it was.
        """
        rng = self.ctx.all_gather_object(_rng_state(self.device))
        head, optimizer = self._head_rows(self.module.head.state_dict(), "save",
                                          self.optimizer.state_dict())
        path = self.run_dir / "checkpoints" / "last.pt"
        error = None
        if self.ctx.is_main:
            state = {"version": CHECKPOINT_VERSION, "step": self.step, "epoch": self.epoch,
                     "batch_in_epoch": self.batch_in_epoch, "world_size": self.ctx.world_size,
                     "config": config_to_dict(self.config),
                     "model": self.module.backbone.state_dict(),
                     "head": head, "optimizer": optimizer,
                     "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                     "beta": self.beta.state_dict(), "calibrated_tau": self.calibrated_tau,
                     "rng": rng, "data": self.data_identity,
                     "skipped_steps": self.skipped_steps, "skipped_images": self.skipped_images}
            try:
                self._write(state, path, periodic)
            except NonFiniteError as problem:
                error = diverged(str(problem), self._last_checkpoint)
            except OSError as problem:
                error = problem
        error = self.ctx.broadcast_object(error if self.ctx.is_main else None)
        if error is not None:
            if self.ctx.is_main:
                record_error(self.log, error)
            raise error
        self._last_checkpoint = (path, self.step)
        return path

    def _write(self, state: dict, path: Path, periodic: bool) -> None:
        save_checkpoint(state, path)
        if periodic and self.config.train.keep_checkpoints > 0:
            save_checkpoint(state, path.with_name(f"step_{self.step:09d}.pt"))
            kept = sorted(path.parent.glob("step_*.pt"))
            for old in kept[:-self.config.train.keep_checkpoints]:
                old.unlink()

    def _on_signal(self, signum, frame):
        if os.getpid() != self._handler_pid:
            return  # a DataLoader worker (forked with the handler): the main process decides
        if self._stop_signal is not None:  # a second signal: stop now, without saving
            raise KeyboardInterrupt
        self._stop_signal = signum
        self.log.warning("%s received: saving a checkpoint after %s (again to abort)",
                         signal.Signals(signum).name,
                         "the next logged step" if self.ctx.distributed else "this step")

    @contextlib.contextmanager
    def _signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield  # signal handlers can only be installed from the main thread
            return
        self._handler_pid = os.getpid()
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _should_stop(self) -> bool:
        stop_at = self.config.train.stop_at_step
        if stop_at is not None and self.step >= stop_at:
            return True  # the same step on every rank
        # A signal reaches the ranks at different steps: they agree on it in the all-reduce
        # of the next logged step (_log_row), not with a host synchronisation of each step.
        return self._stop_agreed if self.ctx.distributed else self._stop_signal is not None

    # -- the loop ----------------------------------------------------------------------

    def _autocast(self):
        amp = self.config.train.amp
        if amp == "none":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if amp == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def _flip(self, images: torch.Tensor) -> torch.Tensor:
        """Mirror each image with probability 1/2; the coins depend on (seed, step, rank) only."""
        if not self.config.data.flip:
            return images
        generator = torch.Generator().manual_seed(_mix(self.config.train.seed, self.step, self.ctx.rank))
        flip = (torch.rand(images.shape[0], generator=generator) < 0.5).to(images.device)
        return torch.where(flip[:, None, None, None], images.flip(-1), images)

    def _train_step(self, batch: dict) -> dict:
        """One optimiser step; returns device tensors for the log and whether it was applied."""
        if "image" not in batch:
            raise BadDataError(f"every image of the batch at step {self.step} was bad "
                               f"({batch['skipped']} skipped); check the data")
        images = self._flip(batch["image"].to(self.device, non_blocking=True))
        labels = batch["label"].to(self.device, non_blocking=True)
        self.guard.before_forward()
        with self._autocast():
            logits, out = self.network(images, labels)
            if self.config.head.partial_fc:
                ce, correct = logits  # over the global batch; correct: this rank's rows
            else:
                ce = F.cross_entropy(logits.float(), labels)
                correct = (logits.detach().argmax(1) == labels).sum()
        if self.criterion is None and self.config.ecloss.enabled:
            self._calibrate_tau(out.maps)
        ecl = (self.criterion(out.maps) if self.criterion is not None
               else torch.zeros((), device=self.device))
        if self.criterion is not None and self.beta.measures_at(self.step):
            self._measure_gradients(ce, ecl, out.maps)
        every = self.config.train.subset_cosine_every
        if self.criterion is not None and every and self.step % every == 0:
            self._subset_cosine = self._measure_subset_cosine(out.maps)
        beta = self.beta.value(self.step) if self.criterion is not None else 0.0
        loss = self.config.head.alpha * ce + beta * ecl
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        grad_norm = self._clip_gradients()
        finite = self.guard.finite(grad_norm)
        if self.scaler.is_enabled():
            # The scaler updates its scale from the found-inf flags of unscale_.
            applied = self.guard.step(finite, lambda: self.scaler.step(self.optimizer))
            self.scaler.update()
        else:
            applied = self.guard.step(finite, self.optimizer.step)
        if not applied:
            # Every rank skips the same steps (the norm is over the averaged gradient).
            values = self.ctx.all_reduce_sum(torch.stack([loss, ce, ecl]).detach().double())
            self.guard.report(self.step + 1, (values / self.ctx.world_size).tolist(),
                              self.scaler.get_scale() if self.scaler.is_enabled() else None,
                              self._last_checkpoint)
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            # The schedule follows the data position, skipped updates included; PyTorch warns
            # when the first update was skipped (fp16 scale search), which is intended here.
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
            self.scheduler.step()
        return {"loss": loss.detach(), "ce": ce.detach(), "ecloss": ecl.detach(), "beta": beta,
                "correct": correct, "images": labels.numel(),
                "grad_norm": grad_norm.detach(), "finite": finite}

    def _clip_gradients(self) -> torch.Tensor:
        """Clip to ``optim.grad_clip`` by the global norm; returns the norm before clipping.

        A partial FC shard's squared norm is summed over the ranks; the rest of the
        gradient is the same on every rank after DDP's average.
        """
        parameters = [p for p in self.module.parameters() if p.grad is not None]
        if isinstance(self.module.head, PartialFC) and self.ctx.distributed:
            shard = [p.grad for p in self.module.head.parameters() if p.grad is not None]
            replicated = [p.grad for p in self.module.backbone.parameters() if p.grad is not None]
            squares = self.ctx.all_reduce_sum(nn.utils.get_total_norm(shard).square())
            norm = (nn.utils.get_total_norm(replicated).square() + squares).sqrt()
        else:
            norm = nn.utils.get_total_norm([p.grad for p in parameters])
        if self.config.optim.grad_clip is not None:
            nn.utils.clip_grads_with_norm_(parameters, self.config.optim.grad_clip, norm)
        return norm

    def _measure_gradients(self, ce, ecl, maps) -> None:
        """Give the beta schedule ``|dCE/dz|`` and ``|dECL/dz|`` over all ranks (train/beta.py).

        ``z`` is the target conv's weight or its output maps. Both losses are scaled as the
        backward pass scales them (fp16 would underflow otherwise); the ratio of the norms
        does not depend on the scale. ``autograd.grad`` leaves ``.grad`` and DDP alone.
        """
        target = (self.module.backbone.target_conv.weight
                  if self.config.beta.measure_at == "weights" else maps)
        grad_ce, = torch.autograd.grad(self.scaler.scale(ce), target, retain_graph=True)
        grad_ecl, = torch.autograd.grad(self.scaler.scale(ecl), target, retain_graph=True)
        if self.config.beta.measure_at == "weights":
            # The gradient DDP will apply is the mean over ranks: average, then the norms.
            both = self.ctx.all_reduce_sum(torch.stack([grad_ce.float(), grad_ecl.float()]))
            norms = both.flatten(1).norm(dim=1) / self.ctx.world_size
        else:  # maps are per sample: the global norm sums the squares of every rank
            squares = torch.stack([grad_ce.float().square().sum(), grad_ecl.float().square().sum()])
            norms = self.ctx.all_reduce_sum(squares).sqrt()
        ce_norm, ecl_norm = norms.tolist()
        self.beta.observe(self.step, ce_norm, ecl_norm)

    def _measure_subset_cosine(self, maps: torch.Tensor) -> torch.Tensor:
        """The cosine between the full set's and the ``train.subset_cosine_templates``
        subset's ECLoss gradients at the batch's maps (docs/design.md 7.3), with the run's
        tau and loss options, over the global batch: a diagnostic on detached maps, so the
        step is the same with it or without."""
        e = self.config.ecloss
        return metrics.subset_gradient_cosine(
            maps, tau=self.criterion.tau, subset=self.config.train.subset_cosine_templates,
            estimator=e.estimator, radius=e.radius, normalize=e.normalize, diversity=e.diversity,
            backend=e.backend, precision=e.precision, process_group=self.ctx.group)

    def run(self) -> Path:
        run = self.config.train
        self.log.info("run directory %s; %d images, %d classes, %d steps per epoch, %d processes",
                      self.run_dir, len(self.dataset), self.num_classes, self.steps_per_epoch,
                      self.ctx.world_size)
        totals = self._empty_totals()
        with self._signals():
            while self.epoch < run.epochs:
                self.sampler.set_epoch(self.epoch, self.batch_in_epoch)
                loader = torch.utils.data.DataLoader(
                    self.dataset, batch_sampler=self.sampler, num_workers=self.config.data.num_workers,
                    collate_fn=collate_faces, pin_memory=self.device.type == "cuda",
                    # Its own generator, so creating the loader leaves the global RNG alone.
                    generator=torch.Generator().manual_seed(_mix(run.seed, self.epoch)))
                bar = tqdm(total=self.steps_per_epoch, initial=self.batch_in_epoch,
                           desc=f"epoch {self.epoch + 1}/{run.epochs}", unit="step",
                           disable=not (self.ctx.is_main and run.progress), dynamic_ncols=True)
                for batch in loader:
                    self.skipped_images += batch["skipped"]
                    result = self._train_step(batch)
                    self.step += 1
                    self.batch_in_epoch += 1
                    bar.update()
                    self._accumulate(totals, result)
                    if self.step % run.log_every == 0 or self.batch_in_epoch == self.steps_per_epoch:
                        every = run.verify_every
                        due = run.verify and self.step // every > self._verified_at // every
                        row = self._log_row(totals, self._verify() if due else {})
                        bar.set_postfix(progress_postfix(row))
                        totals = self._empty_totals()
                    if run.checkpoint_every and self.step % run.checkpoint_every == 0:
                        self.save(periodic=True)
                    if self._should_stop():
                        bar.close()
                        return self._stop()
                bar.close()
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                self.save()
        skipped = f", {self.skipped_steps} of them skipped as non-finite" if self.skipped_steps else ""
        (self.log.warning if skipped else self.log.info)(
            "finished %d steps%s; checkpoint %s", self.step, skipped,
            self.run_dir / "checkpoints" / "last.pt")
        self.close()
        return self.run_dir

    def close(self) -> None:
        """Close the logs and restore the global switches set for the run (determinism);
        ``run()`` does it at its end, :func:`fit` also on errors."""
        self.runlog.close()
        release_console_logger()
        self._restore_switches()
        self._release_lock()

    def _release_lock(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _restore_switches(self) -> None:
        deterministic, benchmark = self._global_switches
        torch.use_deterministic_algorithms(deterministic)
        torch.backends.cudnn.benchmark = benchmark
        self._cpu_switches.close()

    def _stop(self) -> Path:
        path = self.save()
        self.stopped_by = self._stop_signal
        reason = (signal.Signals(self._stop_signal).name if self._stop_signal is not None
                  else f"train.stop_at_step={self.config.train.stop_at_step}")
        self.log.warning("stopped by %s at step %d; saved %s; continue with --resume %s",
                         reason, self.step, path, self.run_dir)
        self.close()
        return self.run_dir

    def _empty_totals(self) -> dict:
        zero = torch.zeros((), device=self.device, dtype=torch.float64)
        return {"loss": zero.clone(), "ce": zero.clone(), "ecloss": zero.clone(),
                "correct": zero.clone(), "grad_norm": zero.clone(), "images": 0, "steps": 0,
                "finite_steps": zero.clone(), "start": time.perf_counter()}

    def _accumulate(self, totals: dict, result: dict) -> None:
        """Add a step to the interval's sums, on the device (see :meth:`_log_row`)."""
        finite = result["finite"]
        totals["steps"] += 1
        totals["images"] += result["images"]
        totals["correct"] += result["correct"]
        totals["finite_steps"] += finite
        for key in ("loss", "ce", "ecloss", "grad_norm"):
            totals[key] += torch.where(finite, result[key].double(), 0.0)

    def _log_row(self, totals: dict, scores: dict) -> dict:
        """Means over the interval, over every rank, and ``scores`` (:meth:`_verify`);
        written by rank 0.

        The ECLoss diagnostics (``mi_over_log_n``, ``max_p``, ``score_std``) are those of
        the logged step's call, read here, in the all-reduce the row takes anyway: no host
        synchronisation of their own. Each rank holds its maps' share, weighted as its
        loss is, so their mean over the ranks is the global batch's value.
        """
        diagnostics = self.criterion.last_diagnostics if self.criterion is not None else {}
        local = torch.stack([totals["loss"], totals["ce"], totals["ecloss"], totals["correct"],
                             totals["grad_norm"], totals["finite_steps"],
                             *diagnostics.values()]).to(torch.float64)
        host = torch.tensor([totals["images"], float(self._stop_signal is not None)],
                            dtype=torch.float64, device=self.device)
        # The one host synchronisation of the interval.
        summed = self.ctx.all_reduce_sum(torch.cat([local, host])).tolist()
        loss, ce, ecl, correct, grad_norm, finite_steps = summed[:6]
        count = len(diagnostics)
        shares, (images, stops) = summed[6:6 + count], summed[6 + count:8 + count]
        self._stop_agreed = stops > 0
        if finite_steps == 0:
            self.log.warning("steps %d-%d: every step of the interval was skipped as non-finite "
                             "(%d in a row); its loss, ce, ecloss and grad_norm are left blank",
                             self.step - totals["steps"] + 1, self.step, self.guard.streak)
        elapsed = time.perf_counter() - totals["start"]
        row = {"step": self.step, "epoch": self.epoch + self.batch_in_epoch / self.steps_per_epoch,
               "lr": self.scheduler.get_last_lr()[0],
               **interval_means({"loss": loss, "ce": ce, "ecloss": ecl, "grad_norm": grad_norm},
                                finite_steps),
               "beta": self.beta.value(self.step - 1),
               "grad_ratio": self.beta.ratio, "accuracy": correct / max(images, 1),
               "images_per_s": images / max(elapsed, 1e-9),
               "amp_scale": self.scaler.get_scale() if self.scaler.is_enabled() else 1.0,
               "skipped_steps": self.skipped_steps, "skipped_images": self.skipped_images}
        row.update({name: share / self.ctx.world_size
                    for name, share in zip(diagnostics, shares)})
        row.update(scores)
        if self._subset_cosine is not None:  # the same on every rank: summed over the group
            row["subset_cosine"] = self._subset_cosine.item()
            self._subset_cosine = None
        self.runlog.log(row)
        return row


def fit(config: Config | dict) -> Trainer:
    """Set up the processes, train, tear down; returns the finished :class:`Trainer`."""
    if isinstance(config, dict):
        config = config_from_dict(config)
    ctx = distributed.setup(config.train.device, config.train.dist_backend)
    try:
        trainer = Trainer(config, ctx)
        try:
            trainer.run()
        finally:
            trainer.close()
        return trainer
    finally:
        release_console_logger()  # also when the Trainer could not be built
        distributed.teardown(ctx)


def train(config: Config | dict) -> Path:
    """Train as ``config`` says (a :class:`Config` or a nested dict); returns the run directory.

    Works in one process or under ``torchrun`` (see train/distributed.py); a process group
    that this call created is destroyed before it returns. A run stopped by SIGINT/SIGTERM
    or ``train.stop_at_step`` returns too, after saving ``checkpoints/last.pt``.
    """
    return fit(config).run_dir
