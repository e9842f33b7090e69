"""Registers, spills, shared memory and occupancy of every Triton kernel configuration on an H100.

    python -m bench.kernels [--json FILE] [--k 196 784] [--defaults-only]
    python -m bench.kernels --work     # GEMM-equivalents and exponential sweeps per route

No GPU is needed: every kernel is compiled for ``sm_90`` on the CPU (Triton's bundled
``ptxas``) exactly as the runtime JIT would compile the launch the backend makes, for every
route (``ROUTES``: input dtype and precision) and launch (``KERNELS``) a loss call can make.

How a launch is reproduced. The launchers of ``ecloss_fast.backends.triton_fused`` run on
``meta`` tensors of the real shapes (no memory) with that module's functions replaced
(``recorded_launches``): ``_launch`` and ``_compile`` record ``(kernel, grid, args,
kwargs)`` instead of launching or compiling, ``_device_traits`` says sm_90 with 132
multiprocessors (an H100 SXM), and ``_run`` launches the configuration under study (the
others take the default). The recorded call then goes through Triton's
own binder (``triton.runtime.jit.create_function_from_signature`` for a ``GPUTarget("cuda",
90, 32)`` backend, what ``JITFunction.run`` builds per device) and ``JITFunction._pack_args``,
which give the signature, constexprs and the specialisation attributes the runtime applies:
``tt.divisibility = 16`` on a pointer whose address is a multiple of 16 (``meta`` tensors
report address 0; PyTorch's CUDA allocator aligns to 512 bytes) and on an integer argument
that is a multiple of 16 (``rows = 32,768`` is; ``N = 19,307`` is not). ``triton.compile``
of that ``ASTSource`` is the kernel a GPU run would load.

What is read off the cubin. ``cuobjdump --dump-resource-usage`` gives ``REG`` (registers
per thread) and ``STACK`` (bytes of stack frame per thread: the kernels make no calls and
hold no local arrays, so a stack is register spills); ``LOCAL`` is not where spills show.
``ptxas -v`` run on the same PTX with the JIT's flags gives the spill stores and loads;
where there are any, ``cuobjdump -sass`` says whether those local stores and loads lie in a
loop (the template sweep: paid per tile) or outside (paid once per program).
Shared memory is Triton's ``metadata.shared`` (dynamic shared memory per block).

Occupancy (``blocks_per_sm``), for an H100 SM: 65,536 registers allocated per warp in units
of 256, 228 KB of shared memory of which 227 KB per block and 1 KB reserved per block,
2,048 threads, 32 blocks.

Records (``--json``): one per kernel, ``K``, input dtype, operand kind and configuration,
with ``default`` true when ``configs.default`` picks that configuration at the paper's
``B*C = 32,768`` rows on 132 SMs.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import json
import math
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from unittest import mock

import torch

H100 = dict(registers=65536, shared_per_sm=228 * 1024, reserved_shared_per_block=1024,
            threads=2048, blocks=32, multiprocessors=132)
PAPER_ROWS = 64 * 512  # B * C of VGG16's last block
SIDES = {196: 14, 784: 28}  # K -> map side
TAU = 1e-3
# (input dtype, precision): every route ``backend="auto"`` can send to the kernels. The
# precision is the user's (``None`` resolves float16 maps to ``"fp16"``, bfloat16 maps to
# ``"bf16"``, float32 maps to the matmul setting's); float64 maps take float64 products
# whatever it is. Half maps with float32 products load half rows and widen them: their own
# compiles.
ROUTES = (("float32", "ieee"), ("float32", "tf32"), ("float32", "bf16"),
          ("bfloat16", "ieee"), ("bfloat16", "tf32"), ("bfloat16", "bf16"),
          ("float16", "ieee"), ("float16", "tf32"), ("float16", "bf16"), ("float16", "fp16"),
          ("float64", "ieee"))


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One launch a loss call can make: ``configs`` is its table in
    ``triton_kernels.configs``, ``launched`` the ``@triton.jit`` function, ``fused`` the form
    of its training route (``None``: it has one form), ``prior`` whether a prior is passed,
    ``chunked`` whether ``input_grad`` runs in its chunked form (``configs.CHUNKED``)."""
    configs: str
    prior: bool
    launched: str
    fused: bool | None = None
    chunked: bool = False


# Every launch, by record name. Each training route is compiled in the form its name stands
# for, whichever form configs.FUSED and configs.CHUNKED pick, so that every form fits:
# ``row_stats_grad`` is the fused sweep, ``row_stats_grad_split`` the ``input_grad`` launch
# of the split form (unit row weights, ``dx`` written in float32: for half maps another
# compile than the backward's ``input_grad``, which writes the maps' dtype);
# ``score_grad`` and ``template_product`` are the chunked ``input_grad``'s two kernels (the
# product the same compile with a prior or without, and whatever dtype ``dx`` is written in).
KERNELS = {
    "row_stats": Kernel("row_stats", False, "row_stats_kernel"),
    "row_stats_grad": Kernel("row_stats_grad", False, "row_stats_kernel", True),
    "row_stats_grad_split": Kernel("input_grad", False, "input_grad_kernel", False),
    "column_sums": Kernel("column_sums", False, "column_sums_kernel"),
    "row_prior": Kernel("row_prior", True, "row_prior_kernel", False),
    "input_grad": Kernel("input_grad", False, "input_grad_kernel"),
    "input_grad_prior": Kernel("input_grad_prior", True, "input_grad_kernel", False),
    "input_grad_prior_fused": Kernel("input_grad_prior_fused", True, "input_grad_kernel", True),
    "score_grad": Kernel("score_grad", False, "score_grad_kernel", chunked=True),
    "score_grad_prior": Kernel("score_grad", True, "score_grad_kernel", False, True),
    "template_product": Kernel("template_product", False, "template_product_kernel",
                               chunked=True),
}


def _ptx_spills(ptx: str, arch: str) -> tuple[int, int]:
    """Spill store and load bytes that ``ptxas -v`` reports, with the JIT's flags."""
    from triton import knobs

    with tempfile.TemporaryDirectory() as folder:
        source = os.path.join(folder, "kernel.ptx")
        with open(source, "w") as handle:
            handle.write(ptx)
        log = subprocess.run([knobs.nvidia.ptxas.path, "-lineinfo", "-v", "--regAllocOptLevel=2",
                              f"--gpu-name={arch}", source, "-o", source + ".o"],
                             check=True, capture_output=True, text=True).stderr
    stores = sum(int(value) for value in re.findall(r"(\d+) bytes spill stores", log))
    loads = sum(int(value) for value in re.findall(r"(\d+) bytes spill loads", log))
    return stores, loads


def _cubin_resources(cubin: bytes) -> dict:
    from triton import knobs

    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernel.cubin")
        with open(path, "wb") as handle:
            handle.write(cubin)
        report = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", path],
                                check=True, capture_output=True, text=True).stdout
    fields = dict(re.findall(r"\b(REG|STACK|LOCAL):(\d+)", report))
    if "REG" not in fields or "STACK" not in fields:
        raise RuntimeError(f"cuobjdump printed no REG/STACK fields:\n{report}")
    return {name: int(value) for name, value in fields.items()}


def local_accesses(cubin: bytes) -> tuple[int, int]:
    """Spill stores and loads (``STL``, ``LDL``) in the SASS of ``cubin``: how many lie inside
    a loop (between a backward branch and its target: the template sweep) and outside.
    One outside is paid once per thread and program; one inside, once per template tile."""
    from triton import knobs

    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernel.cubin")
        with open(path, "wb") as handle:
            handle.write(cubin)
        sass = subprocess.run([knobs.nvidia.cuobjdump.path, "-sass", path], check=True,
                              capture_output=True, text=True).stdout
    loops, accesses = [], []
    for line in sass.splitlines():
        address = re.search(r"/\*([0-9a-f]{4,})\*/\s+(.*)", line)
        if address is None:
            continue
        at, instruction = int(address.group(1), 16), address.group(2)
        branch = re.search(r"\bBRA(?:\.\w+)*\s+0x([0-9a-f]+)", instruction)
        if branch and int(branch.group(1), 16) < at:
            loops.append((int(branch.group(1), 16), at))
        if re.search(r"\b(STL|LDL)(\.\w+)*\b", instruction):
            accesses.append(at)
    inside = sum(any(start <= at <= end for start, end in loops) for at in accesses)
    return inside, len(accesses) - inside


def blocks_per_sm(registers: int, shared: int, num_warps: int) -> int:
    """Resident blocks per H100 SM, limited by threads, registers and shared memory."""
    threads = 32 * num_warps
    registers_per_warp = math.ceil(registers * 32 / 256) * 256
    by_registers = (H100["registers"] // registers_per_warp) // num_warps
    by_shared = H100["shared_per_sm"] // (shared + H100["reserved_shared_per_block"])
    return min(H100["threads"] // threads, by_registers, by_shared, H100["blocks"])


def _bind(kernel, args: tuple, kwargs: dict, target):
    """What ``JITFunction.run`` derives from a launch before compiling it for ``target``:
    ``(backend, kwargs with the runtime's options, bound arguments, specialisation, options)``."""
    from triton import knobs
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    kwargs = dict(kwargs, debug=kwargs.get("debug", kernel.debug) or knobs.runtime.debug)
    if hasattr(knobs.compilation, "instrumentation_mode"):
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    return (backend, kwargs, *binder(*args, **kwargs))


def compile_key(kernel, args: tuple, kwargs: dict, target) -> tuple:
    """The key under which Triton's runtime keeps the compile of this launch (its kernel
    cache's: the function, the specialisation and the options); equal keys, one compile."""
    _, _, _, specialization, options = _bind(kernel, args, kwargs, target)
    return (kernel.fn.__module__, kernel.fn.__qualname__, str(specialization), str(options))


def compile_like_runtime(kernel, args: tuple, kwargs: dict, target):
    """``triton.compile`` of the launch ``kernel[grid](*args, **kwargs)`` as ``JITFunction.run``
    would compile it for ``target``: its binder's specialisation, its ``_pack_args``."""
    import triton
    from triton.compiler import ASTSource

    backend, kwargs, bound_args, specialization, options = _bind(kernel, args, kwargs, target)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args,
                                                              specialization, options)
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                          options=options.__dict__)


def _meta_inputs(k: int, dtype: torch.dtype):
    from ecloss_fast import _templates

    side = SIDES[k]
    count = _templates.num_templates(side, side)
    accumulation = torch.float64 if dtype == torch.float64 else torch.float32
    x = torch.empty(64, 512, k, device="meta", dtype=dtype)
    templates = torch.empty(count, k, device="meta", dtype=accumulation)
    stats = torch.empty(64, 512, device="meta", dtype=accumulation)
    prior = torch.empty(512, count, device="meta", dtype=accumulation)
    return x, templates, stats, prior


@contextlib.contextmanager
def recorded_launches(capability=(9, 0), multiprocessors=H100["multiprocessors"]):
    """Within the block, the Triton backend records its launches and compiles (warm-up) as
    ``(kernel, grid, args, kwargs)`` in the list it yields instead of making them, for a GPU
    of that compute capability and multiprocessor count: its launchers run on ``meta``
    tensors (no memory) and take every decision as they would on that GPU."""
    from ecloss_fast.backends import triton_fused

    launches = []

    def capture(kernel, grid, interpreted, *args, **kwargs):
        launches.append((kernel, grid, args, kwargs))

    with mock.patch.object(triton_fused, "_launch", capture), \
            mock.patch.object(triton_fused, "_compile", capture), \
            mock.patch.object(triton_fused, "_device_traits",
                              lambda device: (capability, multiprocessors)):
        yield launches


def record_launch(kernel_name: str, k: int, dtype: torch.dtype, precision: str, config):
    """The ``(kernel, grid, args, kwargs)`` the backend launches for the launch
    ``KERNELS[kernel_name]`` with ``config`` at the paper's rows (the other kernels of that
    call take the default)."""
    from ecloss_fast.backends import triton_fused

    kernel = KERNELS[kernel_name]
    default = triton_fused._config

    def config_of(name, *args):
        return config if name == kernel.configs else default(name, *args)

    x, templates, stats, prior = _meta_inputs(k, dtype)
    with recorded_launches() as launches, \
            mock.patch.object(triton_fused, "_config", config_of), \
            mock.patch.object(triton_fused, "_fused", lambda *args: bool(kernel.fused)), \
            mock.patch.object(triton_fused, "_chunked", lambda *args: kernel.chunked):
        if kernel_name == "row_stats":
            triton_fused.row_stats(x, templates, TAU, precision)
        elif kernel_name.startswith("row_stats_grad"):
            triton_fused.row_stats_with_grad(x, templates, TAU, precision)
        elif kernel_name == "column_sums":
            triton_fused.column_sums(x, templates, TAU, stats, stats, precision)
        else:
            triton_fused.input_grad(x, templates, TAU, stats, stats, stats,
                                    prior if kernel.prior else None, stats, precision)
    found = [launch for launch in launches if launch[0].__name__ == kernel.launched]
    # The chunked form launches its two kernels once per chunk of templates, with the same
    # constants and specialisation (every integer that varies is a multiple of 16): one
    # compile, the first launch's.
    if len(found) != 1 and not (found and kernel.chunked):
        names = [launch[0].__name__ for launch in launches]
        raise RuntimeError(f"expected one launch of {kernel.launched}, got {names}")
    return found[0]


def cases(ks=(196, 784), defaults_only=False, routes=ROUTES):
    """``(kernel, K, input dtype, precision, operands, config, default)`` to compile."""
    from ecloss_fast._precision import triton_operands
    from ecloss_fast.triton_kernels import configs

    for k in ks:
        for dtype_name, precision in routes:
            operands = triton_operands(getattr(torch, dtype_name), precision, False)
            for name, kernel in KERNELS.items():
                chosen = configs.default(kernel.configs, operands, (9, 0), PAPER_ROWS,
                                         H100["multiprocessors"], k)
                for config in configs.candidates(kernel.configs, operands, (9, 0), k):
                    if defaults_only and config != chosen:
                        continue
                    yield name, k, dtype_name, precision, operands, config, config == chosen


def parse_case(text: str) -> tuple:
    """A case of ``cases`` from ``KERNEL:K:INPUT:PRECISION:MxNwWsS[dD]`` (``default`` false):
    ``M x N`` tile, ``W`` warps, ``S`` stages, ``D`` the ``dx`` slice width."""
    from ecloss_fast._precision import triton_operands
    from ecloss_fast.triton_kernels import configs

    match = re.fullmatch(r"(\w+):(\d+):(\w+):(\w+):(\d+)x(\d+)w(\d+)s(\d+)(?:d(\d+))?",
                         text)
    if match is None:
        raise argparse.ArgumentTypeError(f"expected KERNEL:K:INPUT:PRECISION:MxNwWsS[dD], "
                                         f"got {text!r}")
    kernel, k, dtype_name, precision, *tiles = match.groups()
    if kernel not in KERNELS or int(k) not in SIDES:
        raise argparse.ArgumentTypeError(f"unknown kernel or K in {text!r}")
    tiles = [int(tile or 0) for tile in tiles]
    operands = triton_operands(getattr(torch, dtype_name), precision, False)
    return kernel, int(k), dtype_name, precision, operands, configs.LaunchConfig(*tiles), False


def measure(kernel_name, k, dtype_name, precision, operands, config, default) -> dict:
    """One record: what the compiled kernel of that launch needs of an H100 SM."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import sm_arch_from_capability

    kernel, grid, args, kwargs = record_launch(kernel_name, k, getattr(torch, dtype_name),
                                               precision, config)
    compiled = _compiled(kernel, args, kwargs, GPUTarget("cuda", 90, 32))
    resources = _cubin_resources(compiled.asm["cubin"])
    stores, loads = _ptx_spills(compiled.asm["ptx"], sm_arch_from_capability(90))
    in_loops, outside_loops = (local_accesses(compiled.asm["cubin"])
                               if resources["STACK"] or stores else (0, 0))
    shared = compiled.metadata.shared
    return dict(kernel=kernel_name, prior=KERNELS[kernel_name].prior, K=k, input=dtype_name,
                precision=precision, operands=operands, config=dataclasses.asdict(config),
                default=default, registers=resources["REG"], spill_bytes=resources["STACK"],
                local_bytes=resources.get("LOCAL", 0), spill_stores=stores, spill_loads=loads,
                spills_in_loops=in_loops, spills_outside_loops=outside_loops,
                shared_bytes=shared,
                blocks_per_sm=blocks_per_sm(resources["REG"], shared, config.num_warps),
                grid=list(grid) if isinstance(grid, tuple) else grid,
                matrix_instruction=bool(re.search(r"\b(wgmma|mma)\.", compiled.asm["ptx"])),
                triton=triton.__version__)


_COMPILED: dict[tuple, object] = {}


def _compiled(kernel, args, kwargs, target):
    """``compile_like_runtime``, once per distinct compile (``compile_key``): routes that
    launch the same kernel (float32 and bfloat16 maps at bf16 products share most) share it."""
    key = compile_key(kernel, args, kwargs, target)
    if key not in _COMPILED:
        _COMPILED[key] = compile_like_runtime(kernel, args, kwargs, target)
    return _COMPILED[key]


def _measure_or_error(case) -> dict:
    try:
        return measure(*case)
    except Exception as error:  # noqa: BLE001 -- reported per case
        kernel, k, dtype_name, precision, operands, config, default = case
        return dict(kernel=kernel, prior=KERNELS[kernel].prior, K=k, input=dtype_name,
                    precision=precision, operands=operands, config=dataclasses.asdict(config),
                    default=default, error=f"{type(error).__name__}: {error}")


def _measure_group(cases) -> list[dict]:
    return [_measure_or_error(case) for case in cases]


def measure_all(cases, jobs: int = 1, on_record=None) -> list[dict]:
    """``measure`` of every case, in their order; with ``jobs > 1`` in that many processes,
    the cases that share a compile (``compile_key``) in one of them, so each compile and its
    ``ptxas``/``cuobjdump`` runs happen once. ``on_record(record)`` as each one is ready."""
    from triton.backends.compiler import GPUTarget

    cases = list(cases)
    target = GPUTarget("cuda", 90, 32)
    groups: dict[tuple, list[int]] = {}
    for index, (name, k, dtype_name, precision, _, config, _) in enumerate(cases):
        kernel, _, args, kwargs = record_launch(name, k, getattr(torch, dtype_name), precision,
                                                config)
        groups.setdefault(compile_key(kernel, args, kwargs, target), []).append(index)
    records: list[dict | None] = [None] * len(cases)

    def done(indices, group_records):
        for index, record in zip(indices, group_records):
            records[index] = record
            if on_record is not None:
                on_record(record)

    if jobs <= 1:
        for indices in groups.values():
            done(indices, _measure_group([cases[i] for i in indices]))
        return records
    context = multiprocessing.get_context("spawn")  # fresh processes, no inherited threads
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context) as pool:
        futures = {pool.submit(_measure_group, [cases[i] for i in indices]): indices
                   for indices in groups.values()}
        for future in concurrent.futures.as_completed(futures):
            done(futures[future], future.result())
    return records


# The [rows, K] accumulators each kernel keeps besides the scores: dx, or two of them in the
# fused forms (U and V, U and Z); the others reduce over the templates only.
_ACCUMULATORS = {"input_grad": 1, "input_grad_prior": 1, "row_stats_grad": 2,
                 "input_grad_prior_fused": 2}


def kernel_work(kernel: str, operands: str, k: int, rows: int = PAPER_ROWS) -> tuple[int, int]:
    """``(GEMM-equivalents, exponential sweeps)`` of one default launch at ``rows`` rows: a
    score product ``K`` deep and a sweep of exponentials per ``dx`` slice, plus the
    accumulators' products (all slices together cover ``K`` columns once per accumulator).
    Units of one ``rows x N x K`` product; the chunks' zero padding is not counted."""
    from ecloss_fast.triton_kernels import configs

    if kernel == "template_product":  # the chunked backward's plain product, no scores
        return 1, 0
    config = configs.default(kernel, operands, (9, 0), rows, H100["multiprocessors"], k)
    accumulators = _ACCUMULATORS.get(kernel, 0)
    slices = math.ceil(k / config.dx_columns) if accumulators and config.dx_columns else 1
    return slices + accumulators, slices


def route_work(operands: str, k: int, prior: bool, rows: int = PAPER_ROWS) -> dict:
    """The kernels one training step's loss runs on the GPU (forward and backward, the forms
    ``configs.FUSED`` picks) and their total ``(GEMM-equivalents, exponential sweeps)``."""
    from ecloss_fast.triton_kernels import configs

    chunked = ["score_grad", "template_product"] if configs.chunked(operands, k) else None
    if not prior:
        launches = (["row_stats_grad"] if configs.fused("row_stats_grad", operands, k)
                    else ["row_stats", *(chunked or ["input_grad"])])
    else:
        launches = ["row_stats", "column_sums"] + (
            ["input_grad_prior_fused"] if configs.fused("input_grad_prior", operands, k)
            else ["row_prior", *(chunked or ["input_grad_prior"])])
    work = [kernel_work(kernel, operands, k, rows) for kernel in launches]
    return dict(kernels=launches, gemms=sum(g for g, _ in work), sweeps=sum(e for _, e in work))


def work_markdown(ks=tuple(sorted(SIDES)), routes=ROUTES) -> str:
    """Per training route: its kernels, GEMM-equivalents and exponential sweeps, against
    the 3 GEMM-equivalents (uniform) and 5 (with a prior) that the work itself needs
    (docs/design.md section 6)."""
    from ecloss_fast._precision import triton_operands

    lines = ["| K | operands | prior | kernels | GEMM-equivalents | exponential sweeps |",
             "|---:|---|:-:|---|---:|---:|"]
    kinds = sorted({triton_operands(getattr(torch, dtype), precision, False)
                    for dtype, precision in routes})
    for k in ks:
        for operands in kinds:
            for prior in (False, True):
                work = route_work(operands, k, prior)
                lines.append(f"| {k} | {operands} | {'yes' if prior else ''} | "
                             f"{' + '.join(work['kernels'])} | {work['gemms']} | "
                             f"{work['sweeps']} |")
    return "\n".join(lines)


def markdown(records) -> str:
    lines = ["| kernel | K | input | operands | tile (m x n, warps, stages, dx slice) | default "
             "| regs | spill B (stack / ptxas stores; local accesses in loops) | shared KB "
             "| blocks/SM |",
             "|---|---:|---|---|---|:-:|---:|---:|---:|---:|"]
    for r in records:
        if "error" in r:
            lines.append(f"| {r['kernel']} | {r['K']} | {r['input']} | {r['operands']} | "
                         f"{r['config']} | | error: {r['error'].splitlines()[-1][:60]} | | | |")
            continue
        c = r["config"]
        slice_ = f", dx {c['dx_columns']}" if c.get("dx_columns") else ""
        spills = f"{r['spill_bytes']} / {r['spill_stores']}"
        if r["spill_bytes"] or r["spill_stores"]:
            spills += f"; {r.get('spills_in_loops', '?')} in loops"
        lines.append(
            f"| {r['kernel']} | {r['K']} | {r['input']} | {r['operands']} | "
            f"{c['block_m']}x{c['block_n']}, {c['num_warps']}, {c['num_stages']}{slice_} | "
            f"{'yes' if r['default'] else ''} | {r['registers']} | "
            f"{spills} | {r['shared_bytes'] / 1024:.1f} | "
            f"{r['blocks_per_sm']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.kernels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the records to this file")
    parser.add_argument("--k", type=int, nargs="+", default=sorted(SIDES), choices=sorted(SIDES))
    parser.add_argument("--inputs", nargs="+", choices=sorted({d for d, _ in ROUTES}),
                        default=sorted({d for d, _ in ROUTES}),
                        help="the routes of these input dtypes only (default: all)")
    parser.add_argument("--defaults-only", action="store_true",
                        help="only the configurations auto picks at the paper's rows")
    parser.add_argument("--jobs", type=int, default=1,
                        help="compiling processes (default 1; the cases that share a compile "
                             "go to one of them)")
    parser.add_argument("--config", action="append", default=[], type=parse_case,
                        metavar="KERNEL:K:INPUT:PRECISION:MxNwWsS[dD]",
                        help="also compile this configuration, candidate or not, e.g. "
                             "input_grad_prior:196:float32:bf16:128x64w8s2 (repeatable)")
    parser.add_argument("--work", action="store_true",
                        help="print each training route's GEMM-equivalents and exponential "
                             "sweeps and exit (nothing is compiled)")
    options = parser.parse_args(argv)
    if options.work:
        print(work_markdown(tuple(options.k)))
        return 0
    from triton import knobs

    if knobs.runtime.interpret:
        parser.error("TRITON_INTERPRET is set: interpreted kernels do not compile; unset it")
    routes = tuple(route for route in ROUTES if route[0] in options.inputs)
    records = measure_all(
        [*cases(tuple(options.k), options.defaults_only, routes), *options.config],
        options.jobs, lambda record: print(markdown([record]).splitlines()[-1],
                                           file=sys.stderr, flush=True))
    if options.json:
        with open(options.json, "w") as handle:
            json.dump(records, handle, indent=1)
    print(markdown(records))
    return 1 if any("error" in record for record in records) else 0


if __name__ == "__main__":
    sys.exit(main())
