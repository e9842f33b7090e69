"""One training step of a VGG face model, with and without ECLoss, per backend.

The step is what the trainer does: forward the backbone (under bfloat16 autocast on
CUDA), a softmax head and cross-entropy, plus ``beta * ecloss(maps)`` on the full
template set, backward, and an SGD update. The issue's target: the full-set ECLoss adds
at most 10% to the step with the fastest backend.
"""
from __future__ import annotations

import contextlib
import gc
import time

import torch
import torch.nn.functional as F

import ecloss_fast as ef
from bench.routes import BASELINES, ON_REQUEST, runs_on
from bench.timing import TimingPlan, measure

__all__ = ["run_train_steps", "NO_ECLOSS"]

NO_ECLOSS = "none"
# The paper's initial ECLoss weight; the value does not change the work done.
_BETA = 1e-5
# CASIA-WebFace's identities, the paper's training set.
_CLASSES = 10_572


def _step_function(model, head, optimizer, images, labels, backend, config):
    autocast = (torch.autocast(images.device.type, dtype=getattr(torch, config["autocast"]))
                if config.get("autocast") else contextlib.nullcontext())

    def step(_):
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            output = model(images)
            loss = F.cross_entropy(head(output.embedding, labels).float(), labels)
            if backend != NO_ECLOSS:
                loss = loss + _BETA * ef.ecloss(output.maps, templates="full", backend=backend,
                                                precision=config["precision"])
        loss.backward()
        optimizer.step()

    return step


def _pixels(config: dict) -> int:
    """Pixels per map of the model's last conv block: VGG's is a sixteenth of the input side."""
    return (config["input_size"] // 16) ** 2


def run_train_steps(config: dict, device: torch.device, backends, *, deadline: float,
                    on_record) -> None:
    """Time one step without ECLoss, then with it for each backend that runs on ``device``.

    ``config``: ``arch``, ``batch``, ``input_size``, ``steps`` (timed repeats), optional
    ``warmup`` (untimed steps first, default 2), ``autocast``
    (a dtype name or None), ``precision`` (ECLoss's), optional ``width`` and ``classes``.
    ``on_record(dict)`` gets one record per variant; ``overhead`` is relative to no ECLoss.
    """
    from models import build_head, build_model  # the trainer's models; absent in older trees

    model = build_model(config["arch"], width=config.get("width", 1.0),
                        input_size=config["input_size"]).to(device)
    classes = config.get("classes", _CLASSES)
    head = build_head("softmax", 512, classes).to(device)
    optimizer = torch.optim.SGD([*model.parameters(), *head.parameters()], lr=1e-3, momentum=0.9)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(config["batch"], 3, config["input_size"], config["input_size"],
                         generator=generator).to(device)
    labels = torch.randint(0, classes, (config["batch"],), generator=generator).to(device)
    maps_dtype = getattr(torch, config["autocast"]) if config.get("autocast") else torch.float32
    # ECLoss's gradient at the maps is tiny (a factor tau / (B*C), times beta); through the
    # backbone's backward it reaches subnormal floats, which a CPU handles 10-50x slower
    # (measured: 2 s instead of 40 ms per tiny step). GPUs do not slow down on them. The
    # trainer's automatic beta keeps the gradient far from that range. set_flush_denormal
    # alone would reach the calling thread only, not PyTorch's other intra-op threads.
    with contextlib.ExitStack() as stack:
        flush_denormal = device.type == "cpu" and stack.enter_context(ef.flush_subnormals())
        plan = TimingPlan(warmup=config.get("warmup", 2), min_repeats=config["steps"],
                          max_repeats=config["steps"], budget_s=0.0)
        base = {"arch": config["arch"], "batch": config["batch"],
                "input_size": config["input_size"], "width": config.get("width", 1.0),
                "flush_denormal": flush_denormal}
        without = None
        variants = [NO_ECLOSS] + [b for b in backends
                                  if b not in (*BASELINES, *ON_REQUEST)
                                  and runs_on(b, device, maps_dtype, _pixels(config))]
        for backend in variants:
            record = {**base, "backend": backend, "status": "ok"}
            if time.monotonic() > deadline:
                on_record({**record, "status": "skipped: time budget"})
                continue
            step = _step_function(model, head, optimizer, images, labels, backend, config)
            try:
                timing = measure(step, 1, device, plan)
            except Exception as error:  # noqa: BLE001 -- recorded; the other backends still run
                is_oom = isinstance(error, torch.cuda.OutOfMemoryError)
                on_record({**record, "status": "oom" if is_oom else
                           f"error: {type(error).__name__}: {error}"})
                continue
            finally:
                if device.type == "cuda":
                    gc.collect()  # an exception's traceback can hold the failed step's tensors
                    torch.cuda.empty_cache()
            record["step_ms"] = timing.median_ms
            record["timing"] = timing.as_dict()
            if backend == NO_ECLOSS:
                without = timing.median_ms
            elif without:
                record["overhead"] = timing.median_ms / without - 1
            on_record(record)
