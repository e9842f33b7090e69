"""The benchmark suite: the SDPA route against the reference, the cost model against
docs/design.md section 6, ``python -m bench --grid tiny`` end to end on the CPU, and the
command's errors."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ecloss_fast as ef
from bench.__main__ import main as bench_main
from bench.cost import Workload, gemm_count
from bench.sdpa_route import sdpa_ecloss
from bench.summary import summary
from ecloss_fast.testing import peaked_maps, random_maps

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("maps", [random_maps, peaked_maps], ids=["random", "peaked"])
@pytest.mark.parametrize("shape, subset", [((3, 5, 7, 7), None), ((2, 4, 5, 6), 37)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sdpa_route_matches_reference(maps, shape, subset, dtype):
    """Per-channel loss and the input gradient, with an upstream gradient that is not all ones."""
    batch, channels, height, width = shape
    x = maps(*shape, dtype=dtype, seed=11).requires_grad_()
    templates = ef.make_templates(height, width, subset=subset, dtype=dtype)
    upstream = torch.linspace(0.5, 2.0, channels, dtype=torch.float64)
    loss = sdpa_ecloss(x, templates, reduction="none")
    (grad,) = torch.autograd.grad(loss, x, upstream.to(loss.dtype))

    x_ref = x.detach().double().requires_grad_()
    expected = ef.ecloss(x_ref, templates=templates.double(), backend="reference", reduction="none")
    (expected_grad,) = torch.autograd.grad(expected, x_ref, upstream)

    # docs/design.md, section 4.4: relative to the result on peaked maps; on nearly uniform
    # softmaxes the loss is a small difference of numbers of size log N, so the bound scales
    # with log N.
    tolerance = 1e-10 if dtype == torch.float64 else 1e-5
    scale = expected.abs().max() + (math.log(templates.shape[0]) if maps is random_maps else 0)
    assert loss.shape == (channels,)
    assert (loss.double() - expected).abs().max() <= tolerance * scale
    assert (grad.double() - expected_grad).norm() <= tolerance * 10 * expected_grad.norm()


def test_sdpa_route_reductions_and_errors():
    x = peaked_maps(2, 3, 4, 4, seed=3)
    templates = ef.make_templates(4)
    per_channel = sdpa_ecloss(x, templates, reduction="none")
    torch.testing.assert_close(sdpa_ecloss(x, templates), per_channel.mean())
    torch.testing.assert_close(sdpa_ecloss(x, templates, reduction="sum"), per_channel.sum())
    with pytest.raises(ValueError, match="reduction"):
        sdpa_ecloss(x, templates, reduction="max")
    with pytest.raises(ValueError, match="templates"):
        sdpa_ecloss(x, ef.make_templates(5))
    with pytest.raises(ValueError, match="x must"):
        sdpa_ecloss(x[0], templates)


def test_cost_model_matches_the_paper_setting():
    """docs/design.md, section 6: B=64, C=512, K=196, N=19,307."""
    paper = Workload(batch=64, channels=512, pixels=196, templates=19_307)
    assert paper.rows == 32_768
    assert paper.gemm_flops == pytest.approx(248e9, rel=2e-3)
    assert paper.exponentials("uniform", "forward") == pytest.approx(633e6, rel=1e-3)
    assert paper.score_tensor_bytes() == pytest.approx(2.53e9, rel=1e-3)
    assert paper.flops("uniform", "forward_backward") == pytest.approx(744e9, rel=2e-3)
    assert [gemm_count("marginal", p) for p in ("forward", "backward", "forward_backward")] \
        == [2, 3, 5]
    with pytest.raises(ValueError, match="estimator"):
        gemm_count("bayes", "forward")


def test_tiny_grid_end_to_end(tmp_path):
    """``python -m bench --grid tiny`` on the CPU writes valid JSON, the table and the plot."""
    done = subprocess.run([sys.executable, "-m", "bench", "--grid", "tiny", "--device", "cpu",
                           "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    document = json.loads((tmp_path / "results.json").read_text())

    assert document["meta"]["grid"] == "tiny" and document["meta"]["torch"] == torch.__version__
    assert document["meta"]["matmul_peak_tflops"]["ieee"] > 0
    routes = {(r["backend"], r["estimator"]) for r in document["cases"]}
    expected = {(b, e) for b in ef.available_backends() for e in ("uniform", "marginal")}
    assert routes == expected | {("sdpa", "uniform")}
    skipped = document["meta"]["skipped_routes"]
    flash = "sdpa-flash (float32 on cpu): PyTorch's FlashAttention kernel runs on CUDA only"
    assert flash in skipped
    assert all(f"bench: skipped {line}" in done.stderr for line in skipped)
    for record in document["cases"]:
        assert record["status"] == "ok", record
        for pass_name in ("forward", "backward", "forward_backward"):
            assert record["timings"][pass_name]["median_ms"] > 0
            assert record["tflops"][pass_name] > 0
        assert record["peak_bytes"] >= 0
        if record["backend"] == "reference":
            assert record["speedup_vs_reference"]["forward_backward"] == 1.0
    steps = document["train_step"]
    assert [r["backend"] for r in steps][0] == "none" and len(steps) >= 2
    assert all(r["status"] == "ok" and r["step_ms"] > 0 for r in steps)

    table = (tmp_path / "results.md").read_text()
    for name in {r["case"]["name"] for r in document["cases"]}:
        assert f"### {name}:" in table
    assert "### Training step" in table
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    compact = summary(document)
    assert "ref/u" in compact and "sdpa/u" in compact


def test_gpu_check_script_parses_and_rejects_bad_usage(tmp_path):
    """The GPU script's flow runs only on a GPU (or with --dry-run, ~1 min); here: its syntax
    and its usage errors, which must come before any stage runs."""
    script = ROOT / "bench" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0
    for arguments in ([], [str(tmp_path), "--wet-run"]):
        done = subprocess.run(["bash", str(script), *arguments], capture_output=True, text=True,
                              check=False)
        assert done.returncode == 2 and "usage" in done.stderr


def _bench(*arguments):
    """``python -m bench`` in a fresh process, without Triton's CPU interpreter."""
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "bench", "--grid", "tiny", "--device", "cpu",
                           *arguments], cwd=ROOT, env=environment, capture_output=True,
                          text=True, timeout=300, check=False)


def test_bench_says_which_routes_it_skips_and_why(tmp_path):
    """Triton on the CPU: without a GPU its backend is unavailable; with one it takes no
    CPU tensors. Alone it leaves nothing to run (exit 2, nothing written); beside torch it
    is reported as skipped and torch runs."""
    alone = _bench("--backends", "triton", "--out", str(tmp_path / "alone"))
    assert alone.returncode == 2 and "Traceback" not in alone.stderr
    assert "error: no route of --backends triton can run the tiny grid on cpu: " in alone.stderr
    assert "triton (float32 on cpu): " in alone.stderr
    assert not (tmp_path / "alone").exists()

    beside = _bench("--backends", "triton", "torch", "--estimators", "uniform", "--no-memory",
                    "--no-train-step", "--out", str(tmp_path / "beside"))
    assert beside.returncode == 0, beside.stderr[-3000:]
    reason = alone.stderr.split("triton (float32 on cpu): ", 1)[1].strip()
    assert f"bench: skipped triton (float32 on cpu): {reason}" in beside.stderr
    document = json.loads((tmp_path / "beside" / "results.json").read_text())
    assert document["meta"]["skipped_routes"] == [f"triton (float32 on cpu): {reason}"]
    assert {(r["backend"], r["estimator"], r["status"]) for r in document["cases"]} \
        == {("torch", "uniform", "ok")}


@pytest.mark.parametrize("arguments, message", [
    (["--out", "{file}"], "--out {file}: exists and is not a folder"),
    (["--out", "{file}/sub"], "--out {file}/sub: {file} is a file, not a folder"),
    (["--time-budget", "0"], "--time-budget must be a positive number of seconds"),
    (["--threads", "0"], "--threads must be at least 1"),
    (["--backends", "fastest"], "--backends: unknown ['fastest']"),
    (["--backends", "sdpa-flash"], "sdpa-flash (float32 on cpu): PyTorch's FlashAttention "
                                   "kernel runs on CUDA only"),
    (["--backends", "sdpa", "--estimators", "marginal"], "sdpa: computes the uniform estimator"),
])
def test_bench_user_errors_exit_2_before_anything_is_written(tmp_path, capsys, arguments,
                                                             message):
    file = tmp_path / "file"
    file.write_text("")
    arguments = [a.format(file=file) for a in arguments]
    if "--out" not in arguments:
        arguments += ["--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as stopped:
        bench_main(["--grid", "tiny", "--device", "cpu", *arguments])
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert "python -m bench: error: " in error and message.format(file=file) in error, error
    assert list(tmp_path.iterdir()) == [file]
