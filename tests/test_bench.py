"""The benchmark suite: the SDPA and compiled-reference routes against the reference, the
FMA microbenchmark against numpy, the cost model against docs/design.md section 6, the
precision ratios of the report, ``python -m bench --grid tiny`` end to end on the CPU, and
the command's errors."""
from __future__ import annotations

import copy
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import bench.peak
import ecloss_fast as ef
from bench import cpu as bench_cpu
from bench.__main__ import main as bench_main
from bench.cost import Workload, gemm_count
from bench.grids import GRIDS, Case
from bench.peak import FmaPeakUnavailable, build_fma_library, fma_rate_tflops, higher_peaks
from bench.report import enrich, markdown
from bench import routes
from bench.routes import REFERENCE_COMPILED, Route, case_backends, make_loss
from bench.runner import run_cases
from bench.sdpa_route import sdpa_ecloss
from bench.summary import summary
from bench.timing import TimingPlan
from ecloss_fast.backends import cpp_cpu
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


@pytest.mark.parametrize("estimator", ["uniform", "marginal"])
def test_compiled_reference_route_matches_the_eager_reference(estimator):
    """Inductor's code for the reference: loss and gradient against the eager reference in
    float64 on fresh maps; as the runner does, a first call compiles, then backwards with
    retain_graph=True (the backward timing) on one forward's graph."""
    case = Case("compiled", 3, 4, 5, 6, 37, "float64", "ieee")
    loss = make_loss(case, Route(REFERENCE_COMPILED, estimator), torch.device("cpu"))
    x = peaked_maps(3, 4, 5, 6, dtype=torch.float64, seed=5).requires_grad_()
    torch.autograd.grad(loss(x), x)
    value = loss(x)
    (grad,) = torch.autograd.grad(value, x, retain_graph=True)
    (again,) = torch.autograd.grad(value, x)

    x_ref = x.detach().requires_grad_()
    expected = ef.ecloss(x_ref, templates=37, estimator=estimator, backend="reference")
    (expected_grad,) = torch.autograd.grad(expected, x_ref)
    assert abs(value.item() - expected.item()) <= 1e-10 * abs(expected.item())
    assert (grad - expected_grad).norm() <= 1e-9 * expected_grad.norm()
    assert torch.equal(grad, again)


def _fma_library():
    try:
        return build_fma_library()
    except FmaPeakUnavailable as why:
        pytest.skip(f"no FMA microbenchmark here: {why}")


def test_fma_microbenchmark_computes_what_it_counts():
    """Every chain of every thread ran the iterations it is charged for: the final
    accumulators against numpy's float32 recurrence (``acc * 0.5 + 0.25`` is exact for
    these few iterations, before it converges to 0.5; bf16 ``acc + 1.5*2 + 1.5*2`` is
    exact), and a positive rate."""
    library = _fma_library()
    kernels = bench.peak._fma_kernels(library)
    assert "float32" in kernels
    threads, iterations = 2, 9
    for operands, kernel in kernels.items():
        if operands == "float32":
            out = library.run(kernel, threads, iterations, 0.5, 0.25)
            expected = np.arange(1, kernel.chains + 1, dtype=np.float32)
            for _ in range(iterations):
                expected = expected * np.float32(0.5) + np.float32(0.25)
        else:
            out = library.run(kernel, threads, iterations, 1.5, 2.0)
            expected = np.arange(1, kernel.chains + 1, dtype=np.float32) + 6 * iterations
        assert out.shape == (threads, kernel.chains, kernel.lanes)
        np.testing.assert_array_equal(out, np.broadcast_to(expected[:, None], out.shape))
        assert fma_rate_tflops(library, kernel, 1, seconds=0.005, repeats=1) > 0


def test_peak_falls_back_to_the_gemm_rates_without_a_compiler(monkeypatch):
    monkeypatch.setattr(bench.peak, "_compiler", lambda: None)
    peaks = bench.peak._cpu_peaks(1, "wall", {"ieee": 0.1, "bf16": 0.3})
    assert peaks["peak_tflops"] == {"ieee": 0.1, "tf32": 0.1, "bf16": 0.3}
    assert "no C compiler" in peaks["fma_peak"]["error"]
    assert all(source.startswith("fallback, no FMA microbenchmark") and "torch.matmul" in source
               for source in peaks["peak_source"].values())
    assert "bfloat16" in peaks["peak_source"]["bf16"]


def _record(name, precision, backend, estimator, ms, speedup=None):
    record = {"case": {"name": name, "batch": 8, "channels": 64, "height": 14, "width": 14,
                       "templates": "full", "dtype": "float32", "precision": precision,
                       "sweep": False},
              "num_templates": 19_307, "backend": backend, "estimator": estimator,
              "status": "ok", "peak_bytes": 1 << 20,
              "timings": {p: {"median_ms": ms, "q1_ms": ms, "q3_ms": ms, "repeats": 3}
                          for p in ("forward", "backward", "forward_backward")}}
    return record


def test_report_pairs_precisions_and_prints_the_headline():
    """bf16 against ieee for the same backend, estimator and problem; the reference's times
    set the speedups. Hand-picked times: 60/80 = 0.75, 100/80 = 1.25, 120/160 = 0.75."""
    cases = [_record("full", "ieee", "reference", "uniform", 100.0),
             _record("full", "ieee", "reference", "marginal", 120.0),
             _record("full", "ieee", "cpu", "uniform", 80.0),
             _record("full", "ieee", "cpu", "marginal", 160.0),
             _record("full-bf16", "bf16", "cpu", "uniform", 60.0),
             _record("full-bf16", "bf16", "cpu", "marginal", 120.0)]
    cases[-1]["case"]["batch"] = 4  # another problem: no partner at ieee
    document = enrich({"meta": {"grid": "cpu", "device_name": "cpu", "date": "d", "torch": "t",
                                "triton": None, "python": "p", "threads": 2, "clock": "wall",
                                "peak_tflops": {"ieee": 0.2, "bf16": 0.4}},
                       "cases": copy.deepcopy(cases), "train_step": []})
    ratios = document["precision_ratios"]
    assert [(r["case"], r["versus"], r["backend"], r["estimator"]) for r in ratios] \
        == [("full-bf16", "full", "cpu", "uniform")]
    assert ratios[0]["time_ratio"]["forward_backward"] == pytest.approx(0.75)
    table = markdown(document)
    assert "- fwd+bwd time, bf16 over ieee (full-bf16 / full): cpu/uniform 0.75" in table
    assert "- fwd+bwd speedup over the reference at ieee (full): cpu/uniform 1.25x" in table
    fraction = document["cases"][2]["peak_fraction"]["forward_backward"]
    assert fraction == pytest.approx(3 * 2 * 512 * 19_307 * 196 / 80e-3 / 0.2e12)
    # The floor: 3 GEMMs of 2*512*19,307*196 flops at 0.2 TFLOP/s = 38.75 ms; 80 ms over it.
    floor_ms = 3 * 2 * 512 * 19_307 * 196 / 0.2e12 * 1e3
    over = document["cases"][2]["over_floor"]["forward_backward"]
    assert over == pytest.approx(80.0 / floor_ms)
    assert f"| {80.0 / floor_ms:.2f}x |" in table


def test_grids_carry_the_baselines_the_bf16_pair_and_28x28_maps():
    available = [*ef.available_backends(), "sdpa", "sdpa-flash", "reference-compiled", "auto"]
    for name in ("cpu", "gpu", "paper", "tiny"):
        assert any(REFERENCE_COMPILED in case_backends(case, available)
                   for case in GRIDS[name].cases), name
    cpu = {case.name: case for case in GRIDS["cpu"].cases}
    full, bf16 = cpu["small-N19307"], cpu["small-N19307-bf16"]
    assert (bf16.batch, bf16.channels, bf16.height, bf16.templates, bf16.dtype) \
        == (full.batch, full.channels, full.height, full.templates, full.dtype) \
        == (8, 64, 14, "full", "float32")
    assert (full.precision, bf16.precision) == ("ieee", "bf16") and bf16.backends == ("cpu",)
    for grid, backends in (("cpu", {"auto", "cpu", "torch"}), ("gpu", {"auto", "triton"})):
        (moonshot,) = [c for c in GRIDS[grid].cases if (c.height, c.width) == (28, 28)
                       and c.dtype != "float16"]
        assert moonshot.num_templates == 307_721 and backends <= set(moonshot.backends)
    assert [c for c in GRIDS["gpu"].cases if c.height == 28][0].batch == 64
    # float16 maps with their own products, at the paper shape and at 28x28 (issue 22's
    # shared-memory failure), early in the grid.
    half = [c for c in GRIDS["gpu"].cases[:5] if c.dtype == "float16"]
    assert {(c.height, c.precision) for c in half} == {(14, "fp16"), (28, "fp16")}


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


def test_cost_model_keeps_the_scores_where_the_rows_are_no_more_than_the_pixels():
    """docs/design.md, section 6: at 28x28 with B*C = 16 the scores (16 x 307,721) are kept,
    1 GEMM each way; one row more than the pixels and the fused counts hold."""
    kept = Workload(batch=2, channels=8, pixels=784, templates=307_721)
    assert kept.keeps_scores
    assert kept.flops("marginal", "forward_backward") == 2 * kept.gemm_flops
    assert kept.flops("uniform", "backward") == kept.gemm_flops
    assert kept.exponentials("marginal", "forward_backward") == 4 * 16 * 307_721
    streamed = Workload(batch=785, channels=1, pixels=784, templates=307_721)
    assert not streamed.keeps_scores
    assert streamed.flops("marginal", "forward_backward") == 5 * streamed.gemm_flops


def test_tiny_grid_end_to_end(tmp_path):
    """``python -m bench --grid tiny`` on the CPU writes valid JSON, the table and the plot."""
    done = subprocess.run([sys.executable, "-m", "bench", "--grid", "tiny", "--device", "cpu",
                           "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    document = json.loads((tmp_path / "results.json").read_text())

    meta = document["meta"]
    assert meta["grid"] == "tiny" and meta["torch"] == torch.__version__
    assert meta["matmul_peak_tflops"]["ieee"] > 0
    # torch's bfloat16 GEMM is measured only where the CPU multiplies bfloat16 in hardware.
    bf16_rate = meta["matmul_peak_tflops"]["bf16"]
    assert bf16_rate > 0 if bench_cpu.has_bf16_arithmetic() else bf16_rate is None
    assert meta["cpu"]["model"] == bench_cpu.cpu_model()
    assert set(meta["cpu"]["flags"]) == set(bench_cpu.KERNEL_FLAGS) & bench_cpu.cpu_flags()
    assert meta["cpu"]["cpu_backend_path"] == (cpp_cpu.isa_paths()[-1]
                                               if cpp_cpu.availability() is None else None)
    assert f"CPU: {bench_cpu.cpu_model()}; flags: " in (tmp_path / "results.md").read_text()
    assert all(meta["peak_tflops"][p] > 0 for p in ("ieee", "tf32", "bf16"))
    if "error" in meta["fma_peak"]:  # no compiler: the GEMM rates, said so
        assert meta["peak_source"]["ieee"].startswith("fallback")
    else:
        assert meta["fma_peak_tflops"]["float32"] == meta["peak_tflops"]["ieee"] > 0
        assert meta["peak_source"]["ieee"].startswith("FMA microbenchmark")
    routes = {(r["backend"], r["estimator"]) for r in document["cases"]}
    expected = {(b, e) for b in [*ef.available_backends(), "reference-compiled"]
                for e in ("uniform", "marginal")}
    assert routes == expected | {("sdpa", "uniform"), ("auto", "uniform"), ("auto", "marginal")}
    on_request = {r["case"]["name"] for r in document["cases"]
                  if r["backend"] in ("auto", "reference-compiled")}
    assert on_request == {"tiny-N1226"}
    assert {r["resolved_backend"] for r in document["cases"] if r["backend"] == "auto"} \
        <= set(ef.available_backends())
    skipped = document["meta"]["skipped_routes"]
    flash = "sdpa-flash (float32 on cpu): PyTorch's FlashAttention kernel runs on CUDA only"
    assert flash in skipped
    assert all(f"bench: skipped {line}" in done.stderr for line in skipped)
    for record in document["cases"]:
        assert record["status"] == "ok", record
        for pass_name in ("forward", "backward", "forward_backward"):
            assert record["timings"][pass_name]["median_ms"] > 0
            assert record["tflops"][pass_name] > 0
        assert record["peak_bytes"] >= 0 and record["first_call_s"] > 0
        if record["backend"] == "reference":
            assert record["speedup_vs_reference"]["forward_backward"] == 1.0
    steps = document["train_step"]
    assert [r["backend"] for r in steps][0] == "none" and len(steps) >= 2
    assert all(r["status"] == "ok" and r["step_ms"] > 0 for r in steps)

    table = (tmp_path / "results.md").read_text()
    for name in {r["case"]["name"] for r in document["cases"]}:
        assert f"### {name}:" in table
    rows = [line for line in table.splitlines() if line.startswith("| reference-compiled/")
            or line.startswith("| auto (")]
    assert len(rows) == 4
    memory_column = [line.split("|")[8].strip() for line in table.splitlines()
                     if line.startswith("| ") and "/" in line.split("|")[1]]
    assert len(memory_column) == len(document["cases"]) and "-" not in memory_column
    assert "### Training step" in table
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    compact = summary(document)
    assert "ref/u" in compact and "sdpa/u" in compact and "refc/m" in compact


def test_gpu_check_script_parses_and_rejects_bad_usage(tmp_path):
    """The GPU script's flow runs only on a GPU; here: its syntax and its usage errors, which
    must come before any stage runs (its --dry-run: the next test)."""
    script = ROOT / "bench" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0
    for arguments in ([], [str(tmp_path), "--wet-run"]):
        done = subprocess.run(["bash", str(script), *arguments], capture_output=True, text=True,
                              check=False)
        assert done.returncode == 2 and "usage" in done.stderr


def _paper_compiles() -> int:
    """The distinct Triton compiles of the paper grid's routes, counted from the routes and
    configs.FUSED alone: per (dtype, precision), the uniform estimator's training forward is
    the fused row_stats sweep, or row_stats and input_grad; the marginal one's is row_stats
    and column_sums, and its backward the fused input_grad with a prior, or row_prior and
    input_grad with a prior."""
    from ecloss_fast.triton_kernels import configs

    total = 0
    for case in GRIDS["paper"].cases:
        if case.backends is not None and "triton" not in case.backends:
            continue
        k = case.height * case.width
        uniform = ({"row_stats_grad"} if configs.fused("row_stats_grad", case.precision, k)
                   else {"row_stats", "input_grad"})
        marginal = {"row_stats", "column_sums"} | (
            {"input_grad_prior_fused"} if configs.fused("input_grad_prior", case.precision, k)
            else {"row_prior", "input_grad_prior"})
        total += len(uniform | marginal)
    return total


def test_gpu_check_dry_run_prints_a_plan_that_fits_the_budget(tmp_path):
    """``--dry-run`` prints bench/gpu_plan.py's plan: every stage the script runs, with its
    cap, predicted time and distinct Triton compiles, and ``total: N s`` within 540 s. The
    counts follow the routes: prepare compiles every stage's (the sum of what each adds), and
    the paper stage's equal a count from its routes alone (``_paper_compiles``)."""
    from bench import gpu_plan

    script = ROOT / "bench" / "gpu_check.sh"
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    environment["PYTHON"] = sys.executable
    done = subprocess.run(["bash", str(script), str(tmp_path / "out"), "--dry-run"],
                          capture_output=True, text=True, env=environment, timeout=600,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    total = re.fullmatch(r"total: (\d+) s", lines[-1])
    assert total and int(total.group(1)) == sum(s.cap for s in gpu_plan.STAGES) <= 540
    rows = {}
    for line in lines[1:]:
        match = re.match(r"(\w+)\s+(\d+)\+?\s+(\d+)-(\d+)\s+(\d+)\s+(\d+)\s", line)
        if match:
            name, cap, low, high, compiles, new = match.groups()
            rows[name] = tuple(map(int, (cap, low, high, compiles, new)))
    assert list(rows) == [stage.name for stage in gpu_plan.STAGES]
    # The script runs exactly the plan's stages, under the plan's caps.
    assert re.findall(r"^\s*stage (\w+) ", script.read_text(), re.MULTILINE) == list(rows)
    for stage in gpu_plan.STAGES:
        cap, low, high, _, _ = rows[stage.name]
        assert cap == stage.cap and low <= high <= cap, stage
    assert rows["prepare"][3] == sum(row[4] for row in rows.values()) > 0
    assert rows["paper"][3] == _paper_compiles()
    assert (tmp_path / "out" / "summary.txt").read_text() == done.stdout


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


@pytest.mark.parametrize("operands, k, prior, kernels, gemms, sweeps", [
    # 14x14 bf16, uniform: the split form (FUSED), dx whole: scores, then scores + dx.
    ("bf16", 196, False, ["row_stats", "input_grad"], 1 + (1 + 1), 1 + 1),
    # 14x14 bf16 with a prior: two forward sweeps, row_prior, then dx in two 128-column
    # slices, each recomputing the scores, and the accumulator once over K.
    ("bf16", 196, True, ["row_stats", "column_sums", "row_prior", "input_grad_prior"],
     1 + 1 + 1 + (2 + 1), 1 + 1 + 1 + 2),
    # 28x28 bf16, uniform: the split form with the chunked input_grad (CHUNKED): the
    # scores and their weights once, then the plain product.
    ("bf16", 784, False, ["row_stats", "score_grad", "template_product"], 1 + 1 + 1, 1 + 1),
    # 28x28 float64 with a prior: two forward sweeps, row_prior, the chunked pair.
    ("fp64", 784, True, ["row_stats", "column_sums", "row_prior", "score_grad",
                         "template_product"], 1 + 1 + 1 + 1 + 1, 1 + 1 + 1 + 1),
])
def test_kernel_report_counts_each_routes_gemms_and_exponential_sweeps(operands, k, prior,
                                                                       kernels, gemms, sweeps):
    pytest.importorskip("triton")
    from bench.kernels import route_work, work_markdown

    assert route_work(operands, k, prior) == dict(kernels=kernels, gemms=gemms, sweeps=sweeps)
    row = f"| {k} | {operands} | {'yes' if prior else ''} | {' + '.join(kernels)} | {gemms} | {sweeps} |"
    assert row in work_markdown().splitlines()


def test_cpu_path_routes_run_their_path_and_meet_their_own_floor(monkeypatch):
    """A ``cpu@<path>`` route runs the cpu backend on that path (``ECLOSS_FAST_CPU_ISA`` set
    while it is measured, then as before) and its floor is that path's FMA rate; the best
    path is the plain cpu route's. Whatever this CPU has: its lowest path (baseline on any
    x86-64 CPU with more than one)."""
    if cpp_cpu.availability() is not None:
        pytest.skip(cpp_cpu.availability())
    paths, cpu = cpp_cpu.isa_paths(), torch.device("cpu")
    assert routes.why_not("cpu@" + paths[-1], cpu, torch.float32, 49).endswith(
        "which the cpu route runs")
    assert routes.cpu_path_routes() == ["cpu@" + path for path in paths[:-1]]
    if "avx512" not in paths:
        assert "has no avx512 path" in routes.why_not("cpu@avx512", cpu, torch.float32, 49)
    if len(paths) == 1:
        return
    monkeypatch.setenv(cpp_cpu.ISA_VARIABLE, paths[-1])
    case = Case("paths", 8, 8, 7, 7, 100, "float32", "ieee",
                backends=("cpu", "cpu@" + paths[0]))
    seen = []
    run_cases([case], TimingPlan(warmup=0, min_repeats=1, max_repeats=1, budget_s=0.0), cpu,
              ["cpu", "cpu@" + paths[0]], ["uniform"], clock="wall", memory=False,
              deadline=float("inf"), on_record=seen.append)
    assert [(r["backend"], r["cpu_path"], r["status"]) for r in seen] \
        == [("cpu", paths[-1], "ok"), ("cpu@" + paths[0], paths[0], "ok")]
    assert os.environ[cpp_cpu.ISA_VARIABLE] == paths[-1]
    # The floors: 3 GEMMs of 2*64*100*49 flops, at each path's rate (hand-picked rates).
    meta = {"peak_tflops": {"ieee": 1.0}, "path_peak_tflops": {
        paths[0]: {"float32": 0.25}, paths[-1]: {"float32": 0.5, "bf16": 2.0}}}
    for record in seen:
        record["timings"] = {"forward_backward": {"median_ms": 1.0}}
    enrich({"meta": meta, "cases": seen})
    gemm_ms = 2 * 64 * 100 * 49 / 1e9
    assert [r["over_floor"]["forward_backward"] for r in seen] \
        == pytest.approx([1.0 / (3 * gemm_ms / 0.5), 1.0 / (3 * gemm_ms / 0.25)])


def test_the_floors_take_the_higher_of_two_peak_measurements():
    """Every rate the higher of the two (hand-made measurements), None and text kept."""
    first = {"matmul_peak_tflops": {"ieee": 0.15, "bf16": None}, "peak_tflops": {"ieee": 0.23},
             "fma_peak_tflops": {"float32": 0.23, "bf16": 0.234},
             "path_peak_tflops": {"avx2": {"float32": 0.2}, "avx512_bf16": {"bf16": 0.234}},
             "peak_source": {"ieee": "FMA microbenchmark"}}
    second = {"matmul_peak_tflops": {"ieee": 0.14, "bf16": None}, "peak_tflops": {"ieee": 0.21},
              "fma_peak_tflops": {"float32": 0.21, "bf16": 0.467},
              "path_peak_tflops": {"avx2": {"float32": 0.233}, "avx512_bf16": {"bf16": 0.467}},
              "peak_source": {"ieee": "another"}}
    assert higher_peaks(first, second) == {
        "matmul_peak_tflops": {"ieee": 0.15, "bf16": None}, "peak_tflops": {"ieee": 0.23},
        "fma_peak_tflops": {"float32": 0.23, "bf16": 0.467},
        "path_peak_tflops": {"avx2": {"float32": 0.233}, "avx512_bf16": {"bf16": 0.467}},
        "peak_source": {"ieee": "FMA microbenchmark"}}
