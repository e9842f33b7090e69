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
and no RNG state is involved), forward under autocast (the network: train/network.py), CE
in float32, ECLoss on the maps outside autocast (the core picks its own precision; with
``ecloss.tau=auto`` the first step calibrates tau on these maps first: train/ecloss_term.py),
every ``beta.update_every`` steps the two gradient norms at the maps (train/beta.py), every
``train.subset_cosine_every`` steps (off by default) the cosine of the full set's and a
subset's ECLoss gradients at the maps (a diagnostic; it changes nothing), backward
through the (fp16-only) GradScaler, unscale, clip, and skip the update if the gradient is
not finite, or if the BatchNorm statistics the forward pass updated are not: then the
model, the BatchNorm statistics and the optimizer state are exactly as before the step
(train/step_guard.py). SIGINT and SIGTERM finish the current step (in several processes:
the next logged step, where they agree), save ``last.pt`` and return (train/signals.py).

``train.branch_from=RUN_DIR:STEP`` starts a new run from another run's checkpoint of that
step (everything a resume restores: train/resume.py), with this run's own config;
``train.data_order_seed`` seeds the batch order instead of ``train.seed``.

The run directory is locked for the run's life (``.lock``, train/run_dir.py): a second
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
import signal
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from train import distributed
from train.beta import BetaSchedule, gradient_norms
from train.checkpoint import (CHECKPOINT_VERSION, NonFiniteError, resolve_checkpoint,
                              save_run_checkpoint)
from train.config import Config, config_from_dict, config_to_dict
from train.data import (BadDataError, build_dataset, check_same_data, collate_faces, data_identity,
                        random_flips)
from train.data.sampler import GlobalBatchSampler
from train.ecloss_term import build_criterion, calibrate_tau, saved_tau, subset_cosine
from train.logs import (LogInterval, RunLog, console_logger, progress_postfix, record_error,
                        release_console_logger)
from train.network import Recognizer, build_network
from train.optim import build_optimizer, build_scheduler, clip_gradients
from train.partial_fc import head_state_rows, optimizer_state_rows
from train.resume import RESUMABLE_CHANGES, find_start, restore_position
from train.run_dir import open_run_dir
from train.runtime import autocast, global_switches, mix, rng_state, seed_everything
from train.signals import StopSignals
from train.step_guard import StepGuard, diverged
from train.verification import RunVerification

__all__ = ["Recognizer", "Trainer", "fit", "train"]


class Trainer:
    """One training run in the process group ``ctx``; ``run()`` returns the run directory.

    After ``run()``, ``stopped_by`` is the signal number that interrupted it, or ``None``.
    """

    RESUMABLE_CHANGES = RESUMABLE_CHANGES  # see train/resume.py

    def __init__(self, config: Config, ctx: distributed.Context):
        self.config, self.ctx, self.device = config, ctx, ctx.device
        if config.model.sync_bn:
            distributed.check_sync_batchnorm(ctx)
        self.verification = RunVerification(config.train.verify, config.train.verify_every,
                                            config.model.input_size, read=ctx.is_main)
        self.stopped_by: int | None = None
        # What the run holds until close(): the global switches, the run directory's lock.
        self._held = contextlib.ExitStack()
        self._held.enter_context(global_switches(config.train.deterministic, self.device))
        try:
            self._build()
        except BaseException:
            # Left set, the OpenMP threads' flush switch hung the process at exit.
            self._held.close()
            raise

    def _build(self) -> None:
        """Data, model, optimiser and logs of the run, from the checkpoint when resuming."""
        config, ctx, run = self.config, self.ctx, self.config.train
        seed_everything(mix(run.seed, ctx.rank))

        start = find_start(config)  # train.resume or train.branch_from (train/resume.py)
        resumed = start is not None and not start.branched
        state = start.state if start is not None else None
        # The data before the run directory: a data set that cannot be read leaves none.
        self.dataset = build_dataset(config.data, config.model.input_size)
        self.num_classes = self.dataset.num_classes
        self.data_identity = data_identity(self.dataset)
        self.run_dir, self.config, lock, leftovers = open_run_dir(config, ctx, resumed)
        if lock is not None:  # rank 0's
            self._held.callback(lock.release)
        self.log = console_logger(self.run_dir, ctx.is_main)
        if leftovers:
            self.log.warning("removed %d temporary file(s) of an interrupted checkpoint save: %s",
                             len(leftovers), ", ".join(map(str, leftovers)))
        if start is not None:
            check_same_data(state.get("data"), self.data_identity, run.allow_data_change, self.log)
        self.module, self.network = build_network(config, self.num_classes, ctx, state,
                                                  start and start.origin)
        self.sampler = GlobalBatchSampler(len(self.dataset), run.batch_size,
                                          world_size=ctx.world_size, rank=ctx.rank,
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
        self.calibrated_tau = saved_tau(config.ecloss, state, self.log)
        self.criterion = build_criterion(config.ecloss, self.calibrated_tau, ctx)
        self.beta = BetaSchedule(config.beta, config.head.alpha)
        self.step = self.epoch = self.batch_in_epoch = 0
        self.skipped_images = 0
        self.guard = StepGuard(self.module, run.max_nonfinite_steps, self.log)
        self.signals = StopSignals(self.log, "the next logged step" if ctx.distributed
                                   else "this step")
        # The newest checkpoint written (or resumed from), (path, step): a diverged run names it.
        self._last_checkpoint = ((resolve_checkpoint(start.origin), state["step"])
                                 if start is not None else None)
        self._stop_agreed = False  # a signal seen by some rank, agreed at a logged step
        if start is not None:
            self._restore(state)
        if start is not None and start.branched:
            self.log.info("branched from %s at step %d", start.origin, self.step)
        # train.subset_cosine_every: the last measurement, a device tensor, until logged.
        self._subset_cosine: torch.Tensor | None = None
        self.runlog = RunLog(self.run_dir, enabled=ctx.is_main, tensorboard=run.tensorboard,
                             resume_step=self.step if resumed else None,
                             extra_fields=tuple(f"verify_{Path(p).stem}" for p in run.verify)
                             + (("subset_cosine",) if run.subset_cosine_every else ()))
        self.verification.scored_at = self.step

    @property
    def skipped_steps(self) -> int:
        """Non-finite steps skipped in the run (resumed runs included)."""
        return self.guard.skipped

    def _restore(self, state: dict) -> None:
        """The checkpoint's optimizer, schedules, counters, position and random states."""
        self.optimizer.load_state_dict(optimizer_state_rows(self.module.head, self.optimizer,
                                                            state["optimizer"], "load"))
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.beta.load_state_dict(state["beta"])
        self.guard.skipped, self.skipped_images = state["skipped_steps"], state["skipped_images"]
        self.step, self.epoch, self.batch_in_epoch = restore_position(
            state, self.ctx, self.steps_per_epoch, self.sampler.global_batch,
            self.config.train.seed, self.log)

    def save(self, periodic: bool = False) -> Path:
        """Write ``checkpoints/last.pt`` (and ``step_<n>.pt`` when ``periodic``); all ranks call it.

        A failed write or a non-finite model stops the run (rank 0's error on every rank),
        named in ``train.log``; the previous ``last.pt`` is left as it was.
        """
        rng = self.ctx.all_gather_object(rng_state(self.device))
        head = head_state_rows(self.module.head, self.module.head.state_dict(), "save")
        optimizer = optimizer_state_rows(self.module.head, self.optimizer,
                                         self.optimizer.state_dict(), "save")
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
                keep = self.config.train.keep_checkpoints if periodic else 0
                save_run_checkpoint(state, path, keep)
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

    # -- the loop ----------------------------------------------------------------------

    def run(self) -> Path:
        run = self.config.train
        self.log.info("run directory %s; %d images, %d classes, %d steps per epoch, %d processes",
                      self.run_dir, len(self.dataset), self.num_classes, self.steps_per_epoch,
                      self.ctx.world_size)
        interval = LogInterval(self.device)
        with self.signals.installed():
            while self.epoch < run.epochs:
                self.sampler.set_epoch(self.epoch, self.batch_in_epoch)
                loader = torch.utils.data.DataLoader(
                    self.dataset, batch_sampler=self.sampler, num_workers=self.config.data.num_workers,
                    collate_fn=collate_faces, pin_memory=self.device.type == "cuda",
                    # Its own generator, so creating the loader leaves the global RNG alone.
                    generator=torch.Generator().manual_seed(mix(run.seed, self.epoch)))
                bar = tqdm(total=self.steps_per_epoch, initial=self.batch_in_epoch,
                           desc=f"epoch {self.epoch + 1}/{run.epochs}", unit="step",
                           disable=not (self.ctx.is_main and run.progress), dynamic_ncols=True)
                for batch in loader:
                    self.skipped_images += batch["skipped"]
                    result = self._train_step(batch)
                    self.step += 1
                    self.batch_in_epoch += 1
                    bar.update()
                    interval.add(result)
                    if self.step % run.log_every == 0 or self.batch_in_epoch == self.steps_per_epoch:
                        scores = (self.verification.scores(self.module.backbone, self.step,
                                                           run.batch_size, self.device, self.log)
                                  if self.verification.due(self.step) else {})
                        row = self._log_row(interval, scores)
                        bar.set_postfix(progress_postfix(row))
                        interval = LogInterval(self.device)
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

    def _train_step(self, batch: dict) -> dict:
        """One optimiser step; returns device tensors for the log and whether it was applied."""
        if "image" not in batch:
            raise BadDataError(f"every image of the batch at step {self.step} was bad "
                               f"({batch['skipped']} skipped); check the data")
        e, run = self.config.ecloss, self.config.train
        images = batch["image"].to(self.device, non_blocking=True)
        if self.config.data.flip:  # the coins depend on (seed, step, rank) only
            images = random_flips(images, mix(run.seed, self.step, self.ctx.rank))
        labels = batch["label"].to(self.device, non_blocking=True)
        self.guard.before_forward()
        with autocast(run.amp, self.device):
            logits, out = self.network(images, labels)
            if self.config.head.partial_fc:
                ce, correct = logits  # over the global batch; correct: this rank's rows
            else:
                ce = F.cross_entropy(logits.float(), labels)
                correct = (logits.detach().argmax(1) == labels).sum()
        if self.criterion is None and e.enabled:  # ecloss.tau=auto, on the first batch
            self.calibrated_tau = calibrate_tau(e, out.maps, self.ctx, self.log, self.step + 1)
            self.criterion = build_criterion(e, self.calibrated_tau, self.ctx)
        ecl = (self.criterion(out.maps) if self.criterion is not None
               else torch.zeros((), device=self.device))
        if self.criterion is not None and self.beta.measures_at(self.step):
            self._measure_gradients(ce, ecl, out.maps)
        every = run.subset_cosine_every
        if self.criterion is not None and every and self.step % every == 0:
            self._subset_cosine = subset_cosine(e, self.criterion.tau, run.subset_cosine_templates,
                                                out.maps, self.ctx)
        beta = self.beta.value(self.step) if self.criterion is not None else 0.0
        loss = self.config.head.alpha * ce + beta * ecl
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        grad_norm = clip_gradients(self.module, self.config.optim.grad_clip, self.ctx)
        finite = self.guard.finite(grad_norm)
        if not self.guard.optimizer_step(finite, self.optimizer, self.scaler):
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

    def _measure_gradients(self, ce, ecl, maps) -> None:
        """Give the beta schedule ``|dCE/dz|`` and ``|dECL/dz|`` over all ranks (train/beta.py)."""
        measure_at = self.config.beta.measure_at
        target = self.module.backbone.target_conv.weight if measure_at == "weights" else maps
        self.beta.observe(self.step, *gradient_norms(ce, ecl, target, measure_at, self.ctx,
                                                     self.scaler.scale))

    def _log_row(self, interval: LogInterval, scores: dict) -> dict:
        """The interval's means over every rank with the logged step's ECLoss diagnostics
        (``mi_over_log_n``, ``max_p``, ``score_std``; train/logs.py) and the verification
        ``scores``; written by rank 0."""
        diagnostics = self.criterion.last_diagnostics if self.criterion is not None else {}
        means = interval.means(self.ctx, diagnostics, stop=self.signals.received is not None)
        self._stop_agreed = means.stop
        if means.applied_steps == 0:
            self.log.warning("steps %d-%d: every step of the interval was skipped as non-finite "
                             "(%d in a row); its loss, ce, ecloss and grad_norm are left blank",
                             self.step - interval.steps + 1, self.step, self.guard.streak)
        row = {"step": self.step, "epoch": self.epoch + self.batch_in_epoch / self.steps_per_epoch,
               "lr": self.scheduler.get_last_lr()[0], **means.losses,
               "beta": self.beta.value(self.step - 1), "grad_ratio": self.beta.ratio,
               "accuracy": means.accuracy, "images_per_s": means.images_per_s,
               "amp_scale": self.scaler.get_scale() if self.scaler.is_enabled() else 1.0,
               "skipped_steps": self.skipped_steps, "skipped_images": self.skipped_images,
               **means.diagnostics, **scores}
        if self._subset_cosine is not None:  # the same on every rank: summed over the group
            row["subset_cosine"] = self._subset_cosine.item()
            self._subset_cosine = None
        self.runlog.log(row)
        return row

    # -- stopping ----------------------------------------------------------------------

    def _should_stop(self) -> bool:
        stop_at = self.config.train.stop_at_step
        if stop_at is not None and self.step >= stop_at:
            return True  # the same step on every rank
        # A signal reaches the ranks at different steps: they agree on it in the all-reduce
        # of the next logged step (_log_row), not with a host synchronisation of each step.
        return self._stop_agreed if self.ctx.distributed else self.signals.received is not None

    def _stop(self) -> Path:
        path = self.save()
        self.stopped_by = self.signals.received
        reason = (signal.Signals(self.stopped_by).name if self.stopped_by is not None
                  else f"train.stop_at_step={self.config.train.stop_at_step}")
        self.log.warning("stopped by %s at step %d; saved %s; continue with --resume %s",
                         reason, self.step, path, self.run_dir)
        self.close()
        return self.run_dir

    def close(self) -> None:
        """Close the logs and restore the global switches set for the run (determinism);
        ``run()`` does it at its end, :func:`fit` also on errors."""
        self.runlog.close()
        release_console_logger()
        self._held.close()


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
