"""``python -m train`` and ``python -m train.evaluate`` as a user meets them: a user error is
one ``error: ...`` line with exit status 2 and nothing created; ``--help`` lists every config
key; ``--print-config``; a run stopped by ``train.stop_at_step`` resumes to its end."""
import dataclasses
import os
import shutil
import subprocess
import sys
import typing

import pytest
import torch
import yaml

import ecloss_fast as ef
from ecloss_fast._dispatch import BACKENDS, PRECISIONS
from test_train import ROOT, tiny
from train.__main__ import main as train_main
from train.checkpoint import load_checkpoint
from train.config import Config, config_to_dict, load_config
from train.evaluate import main as evaluate_main
from train.trainer import train

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS_PER_EPOCH = 4 * 6 // 4  # tiny(): 4 identities x 6 images, batch 4


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A one-epoch tiny run that ``train.stop_at_step=2`` stopped; tests copy it to change it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(tiny(tmp_path_factory.mktemp("stopped"), "stopped",
                          train={"epochs": 1, "stop_at_step": 2}))
    finally:
        torch.set_num_threads(threads)


def _config_file(tmp_path):
    """tiny()'s config as a file, its runs going to ``tmp_path / "runs"``."""
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny(tmp_path / "runs")))
    return path


def _the_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


def _command(module, *arguments, cwd):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", module, *map(str, arguments)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


# ---------------------------------------------------------------- end to end, as processes


def test_train_command_stops_at_a_missing_data_folder_before_creating_the_run(tmp_path):
    done = _command("train", "--config", _config_file(tmp_path), "data.source=folder",
                    f"data.path={tmp_path / 'faces'}", cwd=tmp_path)
    assert done.returncode == 2
    assert f"data.path={tmp_path / 'faces'}: no such folder" in _the_error_line(done.stderr)
    assert not (tmp_path / "runs").exists()


def test_evaluate_command_checks_every_data_set_before_evaluating_any(stopped_run, tmp_path):
    done = _command("train.evaluate", "--checkpoint", stopped_run, "--out", tmp_path / "eval",
                    "--data", "synthetic", "--data", f"typo={tmp_path / 'lfw.bin'}", cwd=tmp_path)
    assert done.returncode == 2
    assert f"--data typo={tmp_path / 'lfw.bin'}: no such file" in _the_error_line(done.stderr)
    assert not (tmp_path / "eval").exists()


# ---------------------------------------------------------------- python -m train, in-process


TRAIN_ERRORS = [
    (["ecloss.backend=fortran"], "ecloss.backend must be one of auto, reference, torch"),
    (["ecloss.precision=fp16"], "ecloss.precision must be one of ieee, tf32, bf16, null"),
    (["ecloss.templates=0"], "ecloss.templates must be 'full' or an int from 1 to 137 "
                             "(the templates of 4x4 maps)"),
    (["ecloss.templates=138"], "an int from 1 to 137"),
    (["ecloss.templates=most"], "ecloss.templates must be full|int, got 'most'"),
    (["ecloss.tau=-0.001"], "ecloss.tau must be positive"),
    (["ecloss.diversity=-0.1"], "ecloss.diversity must be a finite number >= 0"),
    (["train.batch_size=0"], "train.batch_size must be positive"),
    (["train.epochs=-1"], "train.epochs must be positive"),
    (["optim.lr=0"], "optim.lr must be positive"),
    (["data.num_workers=-1"], "data.num_workers must be a finite number >= 0"),
    (["model.input_size=72"], "model.input_size must be a multiple of 16"),
    (["optim.momentun=0.5"], "unknown config key 'optim.momentun'; did you mean 'momentum'"),
    (["head.kind=sphereface"], "head.kind must be one of"),
    (["epochs=3"], "must look like section.key=value"),
    (["data.source=folder", "data.path={tmp}/faces"], "data.path={tmp}/faces: no such folder"),
    (["data.source=recordio", "data.path={tmp}/absent.rec"], "the .rec file {tmp}/absent.rec not found"),
    (["data.source=recordio", "data.path={tmp}/train.rec"], "its index {tmp}/train.idx not found"),
    (["data.source=recordio", "data.path={tmp}"], "is a folder; data.source=recordio reads the .rec"),
    (["--config", "{tmp}/missing.yaml"], "config file not found: {tmp}/missing.yaml"),
    (["--resume", "{tmp}/runs/none"], "no checkpoint at {tmp}/runs/none"),
    (["--resume", "{tmp}/garbage.pt"], "{tmp}/garbage.pt is not a readable checkpoint"),
    (["train.resume={tmp}/garbage.pt"], "{tmp}/garbage.pt is not a readable checkpoint"),
]


@pytest.mark.parametrize("arguments, message", TRAIN_ERRORS,
                         ids=[" ".join(arguments) for arguments, _ in TRAIN_ERRORS])
def test_train_user_errors_are_one_line_and_create_nothing(tmp_path, capsys, arguments, message):
    (tmp_path / "train.rec").write_bytes(b"")  # a .rec without its .idx
    (tmp_path / "garbage.pt").write_text("not a checkpoint\n")
    arguments = [a.format(tmp=tmp_path) for a in arguments]
    assert train_main(["--config", str(_config_file(tmp_path)), *arguments]) == 2
    assert message.format(tmp=tmp_path) in _the_error_line(capsys.readouterr().err)
    assert not (tmp_path / "runs").exists()


def test_config_choices_are_the_librarys():
    """ecloss.backend and ecloss.precision take exactly what ef.ecloss takes."""
    maps = torch.rand(2, 3, 2, 2)
    for name in ("auto", *BACKENDS):
        assert load_config(overrides=[f"ecloss.backend={name}"]).ecloss.backend == name
    for call in (lambda: ef.ecloss(maps, backend="fortran"),
                 lambda: load_config(overrides=["ecloss.backend=fortran"])):
        with pytest.raises(ValueError, match="backend"):
            call()
    for precision in (*PRECISIONS, None, "fp16", "fp32"):
        try:
            ef.ecloss(maps, backend="reference", precision=precision)
            library_accepts = True
        except ValueError:
            library_accepts = False
        override = f"ecloss.precision={'null' if precision is None else precision}"
        try:
            config_accepts = load_config(overrides=[override]).ecloss.precision == precision
        except ValueError:
            config_accepts = False
        assert config_accepts == library_accepts, precision


def test_resume_errors_of_the_trainer_are_one_line(stopped_run, tmp_path, capsys):
    run = shutil.copytree(stopped_run, tmp_path / "stopped")
    assert train_main(["--resume", str(run), "model.width=0.125"]) == 2
    assert "cannot resume: model.width is 0.125" in _the_error_line(capsys.readouterr().err)
    assert train_main(["--resume", str(run), "train.stop_at_step=2"]) == 2
    assert "train.stop_at_step=2 is not after the checkpoint's step 2" in _the_error_line(
        capsys.readouterr().err)
    assert load_checkpoint(run)["step"] == 2


# ---------------------------------------------------------------- --help and --print-config


def test_help_lists_every_config_key_with_its_default_and_type(capsys):
    with pytest.raises(SystemExit) as exit_:
        train_main(["--help"])
    assert exit_.value.code == 0
    lines = {line.split()[0]: line.split(maxsplit=1)[1] for line in capsys.readouterr().out.splitlines()
             if line.startswith("  ") and "." in line.split()[0]}
    defaults = config_to_dict(Config())
    for section, cls in typing.get_type_hints(Config).items():
        for item in dataclasses.fields(cls):
            rest = lines[f"{section}.{item.name}"]
            default, kind = rest.rsplit("  (", 1)
            # What the help shows reads back, as an override, to the default itself.
            assert yaml.safe_load(default) == defaults[section][item.name], item.name
            assert kind.endswith(")")
    assert lines["model.arch"].endswith("(vgg13|vgg16|vgg19)")
    assert all(name in lines["ecloss.backend"] for name in BACKENDS)
    assert lines["head.m"].endswith("(float|null)") and lines["ecloss.templates"].endswith("(full|int)")


def test_print_config_prints_the_resolved_config_and_creates_nothing(tmp_path, capsys):
    file = _config_file(tmp_path)
    assert train_main(["--config", str(file), "optim.lr=0.2", "ecloss.templates=40",
                       "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["optim"]["lr"] == 0.2 and printed["ecloss"]["templates"] == 40
    assert printed["model"]["width"] == 1 / 16 and printed["head"]["s"] == 64.0  # file, default
    # It is a config file itself: read back, the same config.
    (tmp_path / "printed.yaml").write_text(yaml.safe_dump(printed))
    assert load_config(tmp_path / "printed.yaml") == load_config(
        file, ["optim.lr=0.2", "ecloss.templates=40"])
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------- resume


def test_a_run_stopped_by_stop_at_step_resumes_to_its_end(stopped_run, tmp_path, capsys):
    run = shutil.copytree(stopped_run, tmp_path / "stopped")
    assert load_checkpoint(run)["config"]["train"]["stop_at_step"] == 2
    # A stop step given again on the resume command line is honoured ...
    assert train_main(["--resume", str(run), "train.stop_at_step=3"]) == 0
    assert load_checkpoint(run)["step"] == 3
    capsys.readouterr()
    assert train_main(["--resume", str(run), "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["train"]["stop_at_step"] is None
    # ... and without one the run trains to its last step.
    assert train_main(["--resume", str(run)]) == 0
    state = load_checkpoint(run)
    assert state["step"] == STEPS_PER_EPOCH and state["epoch"] == 1


# ---------------------------------------------------------------- python -m train.evaluate, in-process


EVALUATE_ERRORS = [
    (["--data", "synthetic", "--data", "typo={tmp}/helen"], "--data typo={tmp}/helen: no such file"),
    (["--data", "pairs={tmp}/pairs.txt@{tmp}"], "the pair list {tmp}/pairs.txt not found"),
    (["--data", "pairs={tmp}/notes.txt@{tmp}/lfw"], "the image root {tmp}/lfw is not a folder"),
    (["--data", "vgg={tmp}/recordio"], "{tmp}/recordio/train.idx, the index of"),
    (["--data", "odd={tmp}/notes.txt"], "--data odd={tmp}/notes.txt: not 'synthetic'"),
    (["--data", "a=synthetic", "--data", "a=synthetic_jitter"], "the name a is given more than once"),
    (["--images", "0"], "--images must be at least 1"),
    (["--fraction", "1.5"], "--fraction must be in (0, 1]"),
    (["--out", "{tmp}/notes.txt"], "--out {tmp}/notes.txt is a file"),
    (["--checkpoint", "{tmp}/notes.txt"], "{tmp}/notes.txt is not a readable checkpoint"),
    (["--checkpoint", "{tmp}/none"], "no checkpoint at {tmp}/none"),
]


@pytest.mark.parametrize("arguments, message", EVALUATE_ERRORS,
                         ids=[" ".join(arguments) for arguments, _ in EVALUATE_ERRORS])
def test_evaluate_user_errors_are_one_line_and_write_nothing(stopped_run, tmp_path, capsys,
                                                            arguments, message):
    (tmp_path / "notes.txt").write_text("a text file\n")
    (tmp_path / "recordio").mkdir()
    (tmp_path / "recordio" / "train.rec").write_bytes(b"")
    arguments = [a.format(tmp=tmp_path) for a in arguments]
    with pytest.raises(SystemExit) as exit_:
        evaluate_main(["--checkpoint", str(stopped_run), "--out", str(tmp_path / "eval"),
                       "--device", "cpu", *arguments])
    assert exit_.value.code == 2
    assert message.format(tmp=tmp_path) in _the_error_line(capsys.readouterr().err)
    assert not (tmp_path / "eval").exists()


def test_a_trainer_that_fails_to_build_exits_and_leaves_no_switch_set(tmp_path):
    """The subnormal flush is set in every OpenMP thread when the Trainer starts; a Trainer
    whose data cannot be read (an empty image folder, found only when it is opened) must
    undo it then, or the process hangs at exit. Two OpenMP threads, as a user's run has."""
    empty = tmp_path / "faces"
    empty.mkdir()
    script = (
        "import torch\n"
        "from test_train import tiny\n"
        "from train.trainer import fit\n"
        f"config = tiny({str(tmp_path / 'runs')!r}, 'empty', data={{'source': 'folder', "
        f"'path': {str(empty)!r}}})\n"
        "torch.set_num_threads(2)\n"
        "fit(config)\n")  # the error propagates to the interpreter's exit, as a user's does
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    env.pop("OMP_NUM_THREADS", None)
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" in done.stderr, done.stderr


@pytest.mark.parametrize("path", sorted((ROOT / "train" / "configs").glob("*.*")),
                         ids=lambda path: path.name)
def test_the_shipped_configs_read_and_validate(path):
    config = load_config(str(path), [])
    assert config_to_dict(load_config(None, [], base=config_to_dict(config))) == \
        config_to_dict(config)
