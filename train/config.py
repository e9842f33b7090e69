"""The trainer's typed configuration: YAML or Python files, ``key=value`` overrides.

Every hyperparameter the trainer reads is a field below; an unknown key or a value of the
wrong type is a ``ValueError`` that names the key. ``python -m train --config FILE
section.key=value ...`` layers the defaults, the file and the overrides in that order, and
the run directory gets the fully resolved result as ``config.yaml``.

A Python config file defines ``config``, a nested ``dict`` (or a :class:`Config`), and may
import a base file to build on, as arcface_torch's configs do.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
import runpy
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Union

import yaml

from ecloss_fast import num_templates
from ecloss_fast._dispatch import BACKENDS, PRECISIONS
from models.vgg import TARGET_STRIDE

__all__ = ["Config", "ModelConfig", "HeadConfig", "ECLossConfig", "BetaConfig", "DataConfig",
           "OptimConfig", "RunConfig", "load_config", "parse_overrides", "config_from_dict",
           "config_to_dict", "config_help", "check_paths", "branch_point"]


def _ruled(default, test, rule: str):
    """A field whose numeric values must pass ``test``; ``rule`` says how in the error
    (``"<section>.<key> <rule>, got <value>"``). ``None`` and words (``tau: auto``) pass."""
    return field(default=default, metadata={"rule": (test, rule)})


def _positive(default):
    return _ruled(default, lambda value: 0 < value < math.inf, "must be positive")


def _non_negative(default):
    return _ruled(default, lambda value: 0 <= value < math.inf, "must be a finite number >= 0")


def _fraction(default):
    return _ruled(default, lambda value: 0 <= value < 1, "must be in [0, 1)")


@dataclass
class ModelConfig:
    """The backbone; see :func:`models.build_model`."""

    arch: Literal["vgg13", "vgg16", "vgg19"] = "vgg16"
    batch_norm: bool = False
    width: float = _positive(1.0)
    input_size: int = _positive(112)  # a multiple of the target maps' stride (see _check)
    embedding_dim: int = _positive(512)
    dropout: float = _fraction(0.0)
    # Without the pool before conv5: 14x14 target maps (19,307 templates) at 112x112 input.
    drop_last_pool: bool = False
    sync_bn: bool = False  # BatchNorm statistics over all processes (CUDA only)

    def target_stride(self) -> int:
        """The stride of the target maps (models/vgg.py)."""
        return TARGET_STRIDE // 2 if self.drop_last_pool else TARGET_STRIDE

    def _check(self) -> None:
        # The models' rule, checked here so that a run fails before it starts.
        stride = self.target_stride()
        if self.input_size % stride:
            raise ValueError(f"model.input_size must be a multiple of {stride} (the stride of the "
                             f"target maps{' without the last pool' if stride != TARGET_STRIDE else ''}),"
                             f" got {self.input_size}")


@dataclass
class HeadConfig:
    """The classification head and its loss weight ``alpha`` (paper: 1)."""

    kind: Literal["softmax", "cosface", "arcface"] = "softmax"
    s: float = _positive(64.0)
    m: Optional[float] = None  # None: 0.4 for CosFace, 0.5 for ArcFace
    alpha: float = _non_negative(1.0)
    partial_fc: bool = False  # class centres sharded over the processes (train/partial_fc.py)
    sample_rate: float = 1.0  # partial_fc: share of each shard's classes scored per step

    def _check(self) -> None:
        if self.sample_rate != 1 and not self.partial_fc:
            raise ValueError("head.sample_rate samples the classes of a partial FC head; "
                             "set head.partial_fc=true or head.sample_rate=1")


@dataclass
class ECLossConfig:
    """Arguments of :func:`ecloss_fast.ecloss` on the last conv's maps.

    ``tau: auto`` calibrates ``tau`` once, on the first batch of the run, with
    :func:`ecloss_fast.calibrate_tau` (``spread=score_spread``, the run's templates and
    normalize): the mean over maps of the scores' standard deviation over templates is then
    ``score_spread``. The value is logged and kept in the checkpoint, so a resumed run goes
    on with it. ``diversity`` and ``normalize`` are the options of docs/design.md's "Beyond
    the paper"; at their defaults the loss is the paper's.
    """

    enabled: bool = True
    templates: Union[Literal["full"], int] = "full"  # "full" or k, the paper's evenly spaced subset (400)
    estimator: Literal["uniform", "marginal"] = "uniform"
    backend: str = "auto"  # "auto" or one of ecloss_fast's backends
    tau: Union[float, Literal["auto"]] = _positive(1e-3)
    # tau=auto: the target mean std of the scores over templates
    score_spread: float = _positive(1.0)
    radius: float = _positive(4.0)
    precision: Optional[str] = None  # one of ecloss_fast's precisions; null: the library's choice
    diversity: float = _non_negative(0.0)  # lambda of the channel diversity term; 0: off
    normalize: bool = False  # score each map divided by its L2 norm

    def _check(self) -> None:
        for key, value in (("ecloss.backend", self.backend), ("ecloss.precision", self.precision)):
            if value not in LIBRARY_CHOICES[key]:
                raise ValueError(f"{key} must be one of "
                                 f"{', '.join(map(_show, LIBRARY_CHOICES[key]))}; got {value!r}")


@dataclass
class BetaConfig:
    """The weight ``beta`` of ECLoss in ``alpha * CE + beta * ECLoss`` (see train/beta.py).

    ``constant``: ``value``. ``warmup``: ``value * min(1, step / warmup_steps)``.
    ``auto``: ``beta`` such that ``beta * |dECL/dz| = grad_ratio * alpha * |dCE/dz|`` at the
    target layer, ``z`` its conv weights (``measure_at="weights"``) or its output maps,
    measured every ``update_every`` steps, raised smoothly (exponential moving average of
    ``log beta`` with factor ``ema``, at most ``max_growth`` times per measurement) and
    lowered at once when twice too strong; it starts from ``value`` (the paper's 1e-5), and
    the ratio ramps linearly from 0 over ``warmup_steps``.
    """

    schedule: Literal["constant", "warmup", "auto"] = "auto"
    value: float = 1e-5  # >= 0; > 0 for auto
    warmup_steps: int = _non_negative(0)
    grad_ratio: float = 0.25  # >= 0
    # A measurement costs one more ECLoss backward and a host sync: every step would add
    # about a third of ECLoss's own cost to each step (docs/design.md: "every few steps").
    update_every: int = _positive(10)
    ema: float = _fraction(0.9)
    # auto: beta grows at most by this factor per measurement
    max_growth: float = _ruled(2.0, lambda value: value > 1, "must be above 1")
    # auto: never above this. Near a uniform template softmax (start of training) the
    # ECLoss gradient is tiny and the matching beta reaches 1e8-1e9, which overflowed the
    # maps once they sharpened (VGG16-BN, 7x7, synthetic faces: docs/demo/report.md);
    # 1e5 trained there, 1e6 let ECLoss dominate.
    max_value: float = _positive(1e5)
    measure_at: Literal["weights", "maps"] = "weights"  # the target conv's weights, or maps

    def _check(self) -> None:
        if self.value < 0 or self.grad_ratio < 0:
            raise ValueError("beta.value and beta.grad_ratio must be non-negative")
        if self.schedule == "auto" and not self.value > 0:
            raise ValueError("beta.value seeds the automatic beta and must be positive")


@dataclass
class DataConfig:
    """Where images come from; ``model.input_size`` sets their size."""

    source: Literal["synthetic", "folder", "recordio"] = "synthetic"
    # folder: the root; recordio: train.rec (train.idx beside it); required for both
    path: Optional[str] = None
    num_identities: int = _positive(100)  # synthetic only
    images_per_identity: int = _positive(40)  # synthetic only
    seed: int = 0  # synthetic only: which faces are drawn
    jitter: bool = False  # synthetic only: the pose spread of unaligned detector crops
    # Where identity lives in the synthetic faces ("parts": brows, eyes, nose, mouth;
    # "outer": everything, the faces of before): those trained on, and with any source the
    # held-out faces the evaluation draws.
    identity: Literal["parts", "outer"] = "parts"
    num_classes: Optional[int] = _positive(None)  # recordio: override the count read from the data
    flip: bool = True  # random horizontal flips
    num_workers: int = _non_negative(2)
    on_bad_data: Literal["skip", "stop"] = "stop"

    def _check(self) -> None:
        if self.jitter and self.source != "synthetic":
            raise ValueError("data.jitter draws the synthetic faces in other poses; "
                             f"data.source={self.source!r} has its own")
        if self.source != "synthetic" and not self.path:
            raise ValueError(f"data.path is required for data.source={self.source!r}")


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule (paper: SGD, lr 0.03, batch 64)."""

    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = _positive(0.03)
    momentum: float = _fraction(0.9)
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = _non_negative(5e-4)
    warmup_epochs: float = _non_negative(0.0)
    decay: Literal["cosine", "step", "none"] = "cosine"
    milestones: tuple[float, ...] = ()  # step decay: epochs at which lr is multiplied by gamma
    gamma: float = _positive(0.1)
    min_lr: float = _non_negative(0.0)
    # max global gradient norm (arcface_torch's); null: off
    grad_clip: Optional[float] = _positive(5.0)


@dataclass
class RunConfig:
    """Everything about the run itself rather than the model."""

    epochs: int = _positive(10)
    batch_size: int = _positive(64)  # per process; the global batch is batch_size * world size
    amp: Literal["none", "bf16", "fp16"] = "none"
    device: str = "auto"  # "auto": cuda:LOCAL_RANK when CUDA is there, else cpu
    dist_backend: Literal["auto", "nccl", "gloo"] = "auto"
    seed: int = 0
    deterministic: bool = False
    output_dir: str = "runs"
    run_name: Optional[str] = None  # None: <arch>-<source>-<date>-<time>
    resume: Optional[str] = None  # a checkpoint file or a run directory
    allow_data_change: bool = False  # resume on a data set other than the checkpoint's
    stop_at_step: Optional[int] = _positive(None)  # save and stop there, as if interrupted
    log_every: int = _positive(10)
    checkpoint_every: int = 500  # >= 0; steps between kept checkpoints; last.pt is also rewritten
    keep_checkpoints: int = 3  # >= 0
    progress: bool = True
    tensorboard: bool = True
    max_nonfinite_steps: int = _positive(50)  # consecutive skipped steps before the run stops
    # InsightFace .bin pair sets scored during training; their file names (the log.csv
    # columns verify_<name>) must differ
    verify: tuple[str, ...] = ()
    verify_every: int = 2000  # with verify, > 0: steps between scores, at the next logged step
    # A diagnostic of ECLoss (docs/design.md 7.3): every this many steps, the cosine between
    # the full set's and the subset_cosine_templates subset's gradients at the batch's maps,
    # logged at the next logged step (log.csv column subset_cosine). 0: never.
    subset_cosine_every: int = _ruled(0, lambda value: value >= 0, "must be >= 0 (0: off)")
    subset_cosine_templates: int = 400  # from 1 to the target maps' templates
    # Start from another run's checkpoint of a given step, "RUN_DIR:STEP" (its
    # checkpoints/step_<STEP>.pt): weights, optimizer, scheduler, scaler, beta, calibrated
    # tau, random states and position, with this run's own config; a new run directory.
    # null: from scratch. A resume (train.resume) of the branch itself takes precedence.
    branch_from: Optional[str] = None
    # The seed of the data order (the batch sampler's shuffles); null: train.seed. A branch
    # with another data order continues the same weights over other batches.
    data_order_seed: Optional[int] = None

    def _check(self) -> None:
        if self.checkpoint_every < 0 or self.keep_checkpoints < 0:
            raise ValueError("train.checkpoint_every and train.keep_checkpoints must be >= 0")
        if self.verify:
            if self.verify_every < 1:
                raise ValueError(f"train.verify_every must be positive, got {self.verify_every}")
            names = [Path(path).stem for path in self.verify]
            if len(set(names)) < len(names):
                raise ValueError(f"train.verify: the sets' file names must differ (they name the "
                                 f"log.csv columns), got {list(self.verify)}")
        if self.branch_from is not None:
            branch_point(self.branch_from)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    ecloss: ECLossConfig = field(default_factory=ECLossConfig)
    beta: BetaConfig = field(default_factory=BetaConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self):
        _validate(self)


# String options whose values are the library's own lists.
LIBRARY_CHOICES = {"ecloss.backend": ("auto", *BACKENDS), "ecloss.precision": (*PRECISIONS, None)}


def _show(value) -> str:
    """``value`` in YAML, as a ``key=value`` override reads it back (``1.0e-05``, ``null``)."""
    text = yaml.safe_dump(list(value) if isinstance(value, tuple) else value,
                          default_flow_style=True)
    return text.strip().removesuffix("...").strip()


def _unknown(key: str, known) -> ValueError:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], list(known), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ValueError(f"unknown config key {key!r}{hint} (known: {', '.join(known)})")


# A number as people write it: 3, 0.5, .5, 1e-4, 1.0e6, -2E+3.
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _coerce(value, hint, key: str):
    """``value`` checked against the type ``hint``, with ints accepted for floats."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union:
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option, key)
            except ValueError:
                continue
        raise ValueError(f"{key} must be {_type_name(hint, key)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{key} must be one of {list(args)}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key} must be a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ValueError(f"{key} must have {len(args)} entries, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{key} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads 1e-4 and 1.0e6 as strings
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{key} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"{key} must be a string, got {value!r}")
        return value
    raise TypeError(f"{key}: unsupported config type {hint}")


def _section(cls, values: dict, prefix: str):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in values:
        if key not in names:
            raise _unknown(f"{prefix}.{key}", names)
    return cls(**{key: _coerce(value, hints[key], f"{prefix}.{key}") for key, value in values.items()})


def config_from_dict(values: dict) -> Config:
    """A :class:`Config` from a nested dict; missing keys take their defaults."""
    if not isinstance(values, dict):
        raise ValueError(f"a config must be a mapping of sections, got {type(values).__name__}")
    hints = typing.get_type_hints(Config)
    sections = {}
    for name, body in values.items():
        if name not in hints:
            raise _unknown(name, list(hints))
        if not isinstance(body, dict):
            raise ValueError(f"config section {name!r} must be a mapping, got {body!r}")
        sections[name] = _section(hints[name], body, name)
    return Config(**sections)


def config_to_dict(config: Config) -> dict:
    """Nested plain dict (tuples as lists), the form written to ``config.yaml``."""
    def plain(value):
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value
    return plain(dataclasses.asdict(config))


def _merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def parse_overrides(overrides) -> dict:
    """``["optim.lr=0.1", "model.arch=vgg13"]`` to a nested dict; values parsed as YAML."""
    nested: dict = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or "." not in key:
            raise ValueError(f"override {item!r} must look like section.key=value")
        section, name = key.strip().split(".", 1)
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as error:
            raise ValueError(f"override {item!r}{_yaml_problem(error)}") from error
        nested.setdefault(section, {})[name] = value
    return nested


def _yaml_problem(error: yaml.YAMLError) -> str:
    """``:line:column: not valid YAML: problem`` of a parser error, in one line."""
    mark = getattr(error, "problem_mark", None)
    where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
    problem = getattr(error, "problem", None) or " ".join(str(error).split())
    return f"{where}: not valid YAML: {problem}"


def _read_file(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    if path.suffix == ".py":
        try:
            loaded = runpy.run_path(str(path)).get("config")
        except SyntaxError as error:
            raise ValueError(f"{path}:{error.lineno}: {error.msg}") from error
        except Exception as error:  # the file's own code failed: a user error all the same
            raise ValueError(f"{path}: {type(error).__name__}: {error}") from error
        if loaded is None:
            raise ValueError(f"{path} must define a variable named 'config'")
        return config_to_dict(loaded) if isinstance(loaded, Config) else loaded
    if path.suffix in (".yaml", ".yml"):
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ValueError(f"{path}{_yaml_problem(error)}") from error
        if not isinstance(loaded, dict):
            raise ValueError(f"{path} must hold a mapping of sections")
        return loaded
    raise ValueError(f"config files are .yaml, .yml or .py, got {path}")


def load_config(path: str | Path | None = None, overrides=(), base: dict | None = None) -> Config:
    """Defaults, then ``base`` (e.g. a checkpoint's config), then the file, then ``overrides``."""
    values = base or {}
    if path is not None:
        values = _merge(values, _read_file(Path(path)))
    return config_from_dict(_merge(values, parse_overrides(overrides)))


def _type_name(hint, key: str) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if key in LIBRARY_CHOICES:
        return "|".join(map(_show, LIBRARY_CHOICES[key]))
    if origin is Union:
        return "|".join(_type_name(a, key) if a is not type(None) else "null" for a in args)
    if origin is Literal:
        return "|".join(map(_show, args))
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {_type_name(args[0], key)}"
        return f"[{', '.join(_type_name(a, key) for a in args)}]"
    return "true|false" if hint is bool else hint.__name__


def config_help() -> str:
    """Every config key with its type and default, from the dataclasses above."""
    rows = []
    for section, cls in typing.get_type_hints(Config).items():
        hints, defaults = typing.get_type_hints(cls), cls()
        for item in dataclasses.fields(defaults):
            key = f"{section}.{item.name}"
            rows.append((key, _type_name(hints[item.name], key), _show(getattr(defaults, item.name))))
    width = max(len(key) for key, _, _ in rows)
    return "\n".join(f"  {key:<{width}}  {default}  ({kind})" for key, kind, default in rows)


def check_paths(config: Config) -> None:
    """``FileNotFoundError`` for data files the run would miss, before it creates anything."""
    data = config.data
    path = Path(data.path) if data.path else None
    if data.source == "folder" and not path.is_dir():
        raise FileNotFoundError(f"data.path={data.path}: no such folder (data.source=folder "
                                "reads one sub-folder per identity)")
    if data.source == "recordio":
        if path.is_dir():
            raise FileNotFoundError(f"data.path={data.path} is a folder; data.source=recordio "
                                    f"reads the .rec file itself, e.g. {path / 'train.rec'}")
        for needed, what in ((path, "the .rec file"), (path.with_suffix(".idx"), "its index")):
            if not needed.is_file():
                raise FileNotFoundError(f"data.path={data.path}: {what} {needed} not found")


def branch_point(text: str) -> tuple[Path, int]:
    """``(run directory, step)`` of a ``train.branch_from`` value ``"RUN_DIR:STEP"``;
    ``ValueError`` naming the key unless STEP is an integer >= 1 after the last colon."""
    folder, sep, step = text.rpartition(":")
    if not sep or not folder or not step.strip().isdigit() or int(step) < 1:
        raise ValueError(f"train.branch_from must be RUN_DIR:STEP with STEP an integer >= 1 "
                         f"(a step whose checkpoint the run kept), got {text!r}")
    return Path(folder), int(step)


def _validate(config: Config) -> None:
    """The rules of the fields (:func:`_ruled`) and of each section (its ``_check``), then
    the checks across sections."""
    for name in (item.name for item in dataclasses.fields(config)):
        section = getattr(config, name)
        for item in dataclasses.fields(section):
            value = getattr(section, item.name)
            if "rule" in item.metadata and isinstance(value, (int, float)):
                test, rule = item.metadata["rule"]
                if not test(value):
                    raise ValueError(f"{name}.{item.name} {rule}, got {value}")
        if hasattr(section, "_check"):
            section._check()
    if config.train.subset_cosine_every and not config.ecloss.enabled:
        raise ValueError("train.subset_cosine_every measures ECLoss's gradients; it needs "
                         "ecloss.enabled=true")
    side = config.model.input_size // config.model.target_stride()
    subsets = {"ecloss.templates": (config.ecloss.templates, "'full' or ")}
    if config.train.subset_cosine_every:
        subsets["train.subset_cosine_templates"] = (config.train.subset_cosine_templates, "")
    for key, (templates, full) in subsets.items():
        if isinstance(templates, int) and not 1 <= templates <= num_templates(side):
            raise ValueError(f"{key} must be {full}an int from 1 to {num_templates(side)} (the "
                             f"templates of {side}x{side} maps), got {templates}")
