"""The ``triton`` backend: fused Triton kernels for ECLoss, forward and backward.

Implements the backend contract of docs/design.md section 9 (``availability``, ``supports``,
``row_stats``, ``row_stats_with_grad``, ``column_sums``, ``input_grad``, and ``warm_up`` with
its ``launch_class``, which ``backend="auto"`` runs before a route's first call). The
kernels, one per file, are in ``ecloss_fast.triton_kernels``; this module picks the compiled or the
interpreted copy, the operand precision, the ``K`` chunking and the launch configuration,
and launches them.

Sweeps over the ``M x N`` scores (``M = B*C`` feature maps, ``N`` templates), as counted in
docs/design.md section 6 (Cost model):

* ``row_stats``: 1 (online softmax; one ``2MNK`` product);
* ``row_stats_with_grad``: fused, 1 (the same, plus two ``2MNK`` products for the online
  sums ``U`` and ``V`` of ``neg_entropy_grad``); split, ``row_stats`` + ``input_grad``;
* ``column_sums``: 1 (one product; each program owns all maps of its channels, or
  per-batch-block partials are summed in a fixed order afterwards);
* ``input_grad``: 1 without a prior (two products: recompute, then ``dx += w T``); with
  one, fused, 1 (three products: the per-map offset ``D`` is accumulated alongside, which
  costs the product ``U = sum p T``), split, 2 (``row_prior`` first computes ``D``);
  chunked (``configs.CHUNKED``: above 256 pixels), the same sweeps and products, the
  weights of a chunk of templates written to a scratch by ``score_grad_kernel`` and their
  product with the templates taken by ``template_product_kernel``.

Where a configuration keeps ``dx`` in column slices (``dx_columns``, see
``triton_kernels.configs``) each slice repeats the score product and the exponentials;
``configs.FUSED`` picks fused or split per operand kind and ``K`` from the cost model, and
``configs.CHUNKED`` where the chunked ``input_grad`` replaces the sliced one.

The kernels read the templates prepared once (``_templates.prepared_templates``: operand
type, ``K`` padded to the chunks, rows to whole tiles) and, for half products, the maps
rounded once to the half type.

Nothing of size ``B x C x N`` is allocated: the outputs are ``(B, C)``, ``(C, N)`` (times
the number of batch blocks when ``B`` exceeds one tile) and ``dx``; the chunked
``input_grad`` adds a scratch of at most the prepared template matrix's bytes and ``dx``'s
partial sums (one per split of a chunk's templates, as many as fill the GPU).

CPU tensors run in Triton's interpreter (slow, for tests), CUDA tensors compiled; setting
``TRITON_INTERPRET=1`` interprets CUDA tensors too. ``ECLOSS_TRITON_AUTOTUNE=1`` times
every candidate configuration of ``triton_kernels.configs`` on the first call of each
shape instead of taking the default.
"""
from __future__ import annotations

import math
import os

import torch

from ecloss_fast._dtypes import accumulation_dtype
from ecloss_fast._precision import FP64, HALF_OPERAND_DTYPES, operand_kind, triton_operands

__all__ = ["availability", "supports", "row_stats", "row_stats_with_grad", "column_sums",
           "input_grad", "warm_up", "launch_class", "TAKES"]

_INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TUNED: dict[tuple, object] = {}


def _interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def availability() -> str | None:
    """``None`` when Triton imports and there is a GPU or ``TRITON_INTERPRET=1``; else why not."""
    try:
        import triton  # noqa: F401
    except ImportError as error:
        return (f"the triton backend needs the triton package ({error}); "
                "install it with `pip install triton` (Linux, CUDA GPUs)")
    if not (torch.cuda.is_available() or _interpret_requested()):
        return ("the triton backend needs a CUDA GPU (torch.cuda.is_available() is False); "
                "set TRITON_INTERPRET=1 to run its kernels in Triton's (slow) CPU interpreter")
    return None


# The largest K of configs.K_CLASSES (not imported here: that imports triton).
_MAX_PIXELS = 1024
TAKES = ("CUDA tensors (CPU ones under TRITON_INTERPRET=1) of float16, bfloat16, float32 or "
         f"float64 with at most {_MAX_PIXELS} pixels per map (32x32)")


def supports(device: torch.device, dtype: torch.dtype, pixels: int) -> bool:
    """CUDA devices (CPU only under ``TRITON_INTERPRET=1``: Triton's interpreter); float16,
    bfloat16, float32 and float64 maps of at most 1024 pixels (``configs.K_CLASSES``).

    Float64 maps run float64 matrix instructions (``mma.sync`` f64: ``configs`` says
    which shape) with float64 accumulation (docs/design.md section 4.3).
    """
    device = torch.device(device)
    on_device = device.type == "cuda" or (device.type == "cpu" and _interpret_requested())
    return on_device and dtype in _INPUT_DTYPES and pixels <= _MAX_PIXELS


def _interpreted(x: torch.Tensor) -> bool:
    return _interpreted_on(x.device)


def _interpreted_on(device: torch.device) -> bool:
    return device.type == "cpu" or _interpret_requested()


def _operand_maps(x: torch.Tensor, operands: str) -> torch.Tensor:
    """``x`` as the kernels read it. For half products: rounded once to the half type, as the
    kernels' ``to_operand`` would round it (to nearest even); that halves its traffic and
    the registers a thread needs to stage a float32 row tile (which spills at K = 784). For
    float32 products of half maps (``"ieee"``, ``"tf32"``): widened once to float32, which is
    exact, as the kernels would widen each tile; so these routes run float32 maps' kernels,
    where widening a half row tile in registers spilled (bfloat16 ``row_stats`` at ieee, 304
    bytes; ``input_grad`` at tf32, 112; bench/NOTES.md) and would be more compiles."""
    half = HALF_OPERAND_DTYPES.get(operand_kind(operands))
    if half is None and x.dtype in (torch.float16, torch.bfloat16):
        half = torch.float32
    return (x if half is None else x.to(half)).contiguous()


def _operand_templates(templates: torch.Tensor, operands: str, block_n: int) -> torch.Tensor:
    """Templates as the kernels read them (``_templates.prepared_templates``, cached): in the
    operand type (half copies halve the traffic of half products), ``K`` zero-padded to the
    chunks' total and rows to whole ``block_n`` tiles, so template loads need no mask."""
    from ecloss_fast._templates import prepared_templates

    dtype = HALF_OPERAND_DTYPES.get(operands, templates.dtype)  # emulations round in-kernel
    return prepared_templates(templates, dtype, sum(_chunks(templates.shape[-1])), block_n)


def _chunks(k: int) -> tuple[int, int, int]:
    """Up to three power-of-two widths (at least 16) covering ``k``: 196 -> (128, 64, 16).

    ``k`` is rounded up to a multiple of 16 and split into its two highest powers of two;
    what remains, if anything, is rounded up to a power of two (so 240 -> 128, 64, 64).
    """
    padded = -(-k // 16) * 16
    first = 1 << (padded.bit_length() - 1)
    rest = padded - first
    second = 1 << (rest.bit_length() - 1) if rest else 0
    rest -= second
    third = 1 << (rest - 1).bit_length() if rest else 0
    return first, second, third


def _common_constants(x: torch.Tensor, tau: float, precision: str):
    import triton.language as tl

    interpreted = _interpreted(x)
    operands = triton_operands(x.dtype, precision, interpreted)
    chunks = _chunks(x.shape[-1])
    return interpreted, operands, dict(
        TAU=float(tau), K=x.shape[-1], K0=chunks[0], K1=chunks[1], K2=chunks[2],
        OPERANDS=operands, ACC=tl.float64 if operands == FP64 else tl.float32,
        INTERPRETED=interpreted)


def _device_traits(device: torch.device) -> tuple[tuple[int, int], int]:
    """The compute capability and multiprocessor count of a CUDA device: what the launch
    configurations depend on."""
    properties = torch.cuda.get_device_properties(device)
    return (properties.major, properties.minor), properties.multi_processor_count


def _launch(kernel, grid, interpreted: bool, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``, interpreted or on the device of ``args[0]`` (x)."""
    if interpreted:
        from ecloss_fast.triton_kernels import run_interpreted

        run_interpreted(kernel, grid, *args, **kwargs)
        return
    with torch.cuda.device(args[0].device):
        kernel[grid](*args, **kwargs)


def _compile(kernel, grid, interpreted: bool, *args, **kwargs) -> None:
    """Compile the launch ``kernel[grid](*args, **kwargs)`` without running it, and load it on
    the device as its first launch would: a compile error, or ``OutOfResources`` for more
    shared memory or threads than the device has, is raised here. Nothing to compile in
    the interpreter."""
    if interpreted:
        return
    with torch.cuda.device(args[0].device):
        kernel.warmup(*args, grid=grid, **kwargs)._init_handles()


def _launcher(compile_only: bool):
    # Looked up at call time, so that bench.kernels can record launches in place of both.
    return _compile if compile_only else _launch


def _config(kernel_name: str, x: torch.Tensor, operands: str, interpreted: bool, rows: int,
            templates: int):
    """The configuration of a launch without tuning: the interpreter's or the default."""
    from ecloss_fast.triton_kernels import configs

    k = x.shape[-1]
    if interpreted:
        return configs.interpreter(kernel_name, rows, templates, k)
    capability, multiprocessors = _device_traits(x.device)
    return configs.default(kernel_name, operands, capability, rows, multiprocessors, k)


def _run(kernel_name: str, x: torch.Tensor, operands: str, interpreted: bool, rows: int,
         templates: int, launch, compile_only: bool = False) -> None:
    """Launch ``launch(config)`` with the default, interpreter or tuned configuration (a
    compile-only call takes the default: ``warm_up``)."""
    from ecloss_fast.triton_kernels import configs

    if interpreted or compile_only or os.environ.get("ECLOSS_TRITON_AUTOTUNE", "0") != "1":
        launch(_config(kernel_name, x, operands, interpreted, rows, templates))
        return
    import triton.testing

    k = x.shape[-1]
    capability, multiprocessors = _device_traits(x.device)

    # Rows bucketed by powers of two: the best tile depends on how many programs fill
    # the chip, not on the exact batch.
    key = (kernel_name, operands, capability, 1 << max(rows - 1, 0).bit_length(),
           templates, k, x.dtype)
    if key not in _TUNED:
        timings = {}
        for config in configs.candidates(kernel_name, operands, capability, k):
            try:
                timings[config] = triton.testing.do_bench(lambda config=config: launch(config))
            except Exception:  # noqa: BLE001 -- a candidate that does not fit is not timed
                continue
        if not timings:  # none fits: the default's own error, as without tuning
            launch(_config(kernel_name, x, operands, interpreted, rows, templates))
            return
        _TUNED[key] = min(timings, key=timings.get)
    launch(_TUNED[key])


def _fused(route: str, x: torch.Tensor, operands: str, interpreted: bool) -> bool:
    """Whether a training route runs as one fused sweep (``configs.fused``); the interpreter
    takes the fused sweeps, whose code the split routes' kernels share, except where the
    split form's ``input_grad`` is chunked (``_chunked``), so that the chunked kernels run."""
    from ecloss_fast.triton_kernels import configs

    if interpreted:
        return not _chunked(x, operands)
    return configs.fused(route, operands, x.shape[-1])


def _chunked(x: torch.Tensor, operands: str) -> bool:
    """Whether ``input_grad`` runs chunked (``configs.chunked``): ``score_grad_kernel`` and
    ``template_product_kernel`` instead of ``input_grad_kernel``."""
    from ecloss_fast.triton_kernels import configs

    return configs.chunked(operands, x.shape[-1])


def row_stats(x: torch.Tensor, templates: torch.Tensor, tau: float,
              precision: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """docs/design.md section 9: one online-softmax sweep (``row_stats_kernel``)."""
    return _row_stats(x, templates, tau, precision, False)


def row_stats_with_grad(x: torch.Tensor, templates: torch.Tensor, tau: float, precision: str
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """docs/design.md section 9: ``row_stats_kernel`` with ``WITH_GRAD`` (the online sums
    ``U`` and ``V``; the statistics bitwise ``row_stats``'). Where a configuration keeps the
    gradient in column slices (``dx_columns``), each slice repeats the score product and
    the exponentials; where that is predicted slower (``configs.FUSED``) the gradient is
    ``input_grad`` with unit row weights after ``row_stats``, written in the accumulation
    dtype: the same values, from two sweeps with one accumulator.
    """
    return _row_stats_with_grad(x, templates, tau, precision)


def _row_stats_with_grad(x, templates, tau, precision, compile_only=False):
    interpreted = _interpreted(x)
    if _fused("row_stats_grad", x, triton_operands(x.dtype, precision, interpreted), interpreted):
        return _row_stats(x, templates, tau, precision, True, compile_only)
    row_max, log_sum, neg_entropy = _row_stats(x, templates, tau, precision, False,
                                               compile_only)
    grad = _input_grad(x, templates, tau, row_max, log_sum, neg_entropy, None,
                       torch.ones_like(row_max), precision, row_max.dtype, compile_only)
    return row_max, log_sum, neg_entropy, grad


def _row_stats(x, templates, tau, precision, with_grad, compile_only=False):
    from ecloss_fast.triton_kernels.row_stats import row_stats_kernel

    interpreted, operands, constants = _common_constants(x, tau, precision)
    batch, channels, pixels = x.shape
    rows, count = batch * channels, templates.shape[0]
    x = _operand_maps(x, operands)
    accumulation = accumulation_dtype(x.dtype)
    row_max = torch.empty(batch, channels, device=x.device, dtype=accumulation)
    log_sum, neg_entropy = torch.empty_like(row_max), torch.empty_like(row_max)
    # An unread placeholder pointer for inference.
    grad = (torch.empty(batch, channels, pixels, device=x.device, dtype=accumulation)
            if with_grad else row_max)

    def launch(config):
        dx_columns = config.dx_columns if with_grad else 0
        slices = math.ceil(pixels / dx_columns) if dx_columns else 1
        _launcher(compile_only)(
            row_stats_kernel, (math.ceil(rows / config.block_m), slices), interpreted,
            x, _operand_templates(templates, operands, config.block_n), row_max, log_sum,
            neg_entropy, grad, rows, count, **constants, WITH_GRAD=with_grad,
            BLOCK_M=config.block_m, BLOCK_N=config.block_n, DX_COLUMNS=dx_columns,
            num_warps=config.num_warps, num_stages=config.num_stages)

    _run("row_stats_grad" if with_grad else "row_stats", x, operands, interpreted, rows, count,
         launch, compile_only)
    if with_grad:
        return row_max, log_sum, neg_entropy, grad
    return row_max, log_sum, neg_entropy


def column_sums(x: torch.Tensor, templates: torch.Tensor, tau: float, row_max: torch.Tensor,
                log_sum: torch.Tensor, precision: str) -> torch.Tensor:
    """docs/design.md section 9 (``column_sums_kernel``).

    Deterministic: a program owns ``channels x block_b`` maps and a range of templates;
    when ``B`` spans several batch blocks their partial sums are added by ``torch.sum``
    over the block axis, a fixed order. No atomics.
    """
    return _column_sums(x, templates, tau, row_max, log_sum, precision)


def _column_sums(x, templates, tau, row_max, log_sum, precision, compile_only=False):
    from ecloss_fast.triton_kernels.column_sums import column_sums_kernel

    interpreted, operands, constants = _common_constants(x, tau, precision)
    batch, channels, _ = x.shape
    count = templates.shape[0]
    x = _operand_maps(x, operands)
    row_max, log_sum = row_max.contiguous(), log_sum.contiguous()
    result = {}

    def launch(config):
        block_b = min(1 << max(batch - 1, 0).bit_length(), config.block_m)
        per_program = config.block_m // block_b
        grid_channels = math.ceil(channels / per_program)
        batch_blocks = math.ceil(batch / block_b)
        tiles = math.ceil(count / config.block_n)
        splits = 1
        if not interpreted:
            # Split the templates so that the grid has two programs per multiprocessor.
            splits = min(tiles, math.ceil(2 * _device_traits(x.device)[1]
                                          / (grid_channels * batch_blocks)))
        tiles_per_program = math.ceil(tiles / splits)
        splits = math.ceil(tiles / tiles_per_program)
        partial = torch.empty(batch_blocks, channels, count, device=x.device,
                              dtype=accumulation_dtype(x.dtype))
        _launcher(compile_only)(
            column_sums_kernel, (grid_channels, batch_blocks, splits), interpreted,
            x, _operand_templates(templates, operands, config.block_n), row_max, log_sum,
            partial, batch, channels, count, tiles_per_program,
            **constants, CHANNELS=per_program, BLOCK_B=block_b, BLOCK_N=config.block_n,
            num_warps=config.num_warps, num_stages=config.num_stages)
        result["partial"] = partial

    _run("column_sums", x, operands, interpreted, batch * channels, count, launch,
         compile_only)
    partial = result["partial"]
    return partial[0] if partial.shape[0] == 1 else partial.sum(dim=0)


def input_grad(x: torch.Tensor, templates: torch.Tensor, tau: float, row_max: torch.Tensor,
               log_sum: torch.Tensor, neg_entropy: torch.Tensor, prior: torch.Tensor | None,
               row_weight: torch.Tensor, precision: str) -> torch.Tensor:
    """docs/design.md section 9 (``input_grad_kernel``, scores recomputed). With a prior
    ``D`` is accumulated in the gradient sweep (one sweep, a second accumulator) or, where
    ``configs.FUSED`` predicts that slower, taken by a sweep of its own
    (``row_prior_kernel``) first.
    """
    return _input_grad(x, templates, tau, row_max, log_sum, neg_entropy, prior, row_weight,
                       precision, x.dtype)


def _input_grad(x, templates, tau, row_max, log_sum, neg_entropy, prior, row_weight, precision,
                output_dtype, compile_only=False):
    from ecloss_fast.triton_kernels.input_grad import input_grad_kernel
    from ecloss_fast.triton_kernels.row_prior import row_prior_kernel

    interpreted, operands, constants = _common_constants(x, tau, precision)
    batch, channels, _ = x.shape
    rows, count = batch * channels, templates.shape[0]
    accumulation = accumulation_dtype(x.dtype)
    dx = torch.empty(x.shape, device=x.device, dtype=output_dtype)
    x = _operand_maps(x, operands)
    row_max, log_sum = row_max.contiguous(), log_sum.contiguous()
    neg_entropy = neg_entropy.contiguous()
    row_weight = row_weight.to(accumulation).contiguous()
    has_prior = prior is not None
    chunked = _chunked(x, operands)
    fused = has_prior and not chunked and _fused("input_grad_prior", x, operands, interpreted)
    offset = row_max  # an unread placeholder pointer without a row_prior sweep
    if has_prior:
        prior = prior.to(accumulation).contiguous()
    if has_prior and not fused:
        offset = torch.empty_like(row_max)

        def launch_prior(config):
            _launcher(compile_only)(
                row_prior_kernel, (math.ceil(rows / config.block_m),), interpreted,
                x, _operand_templates(templates, operands, config.block_n), row_max, log_sum,
                prior, row_weight, offset, batch, channels,
                count, **constants, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
                num_warps=config.num_warps, num_stages=config.num_stages)

        _run("row_prior", x, operands, interpreted, rows, count, launch_prior, compile_only)
    if chunked:
        if not has_prior:
            offset = neg_entropy + log_sum  # E, as input_grad_kernel forms it
        sums = _chunked_template_sums(x, templates, row_max, log_sum, offset, prior, row_weight,
                                      operands, interpreted, constants, compile_only)
        scale = tau if has_prior else tau * row_weight[..., None]
        return dx.copy_(sums * scale)

    def launch(config):
        slices = math.ceil(x.shape[-1] / config.dx_columns) if config.dx_columns else 1
        _launcher(compile_only)(
            input_grad_kernel, (math.ceil(rows / config.block_m), slices), interpreted,
            x, _operand_templates(templates, operands, config.block_n), row_max, log_sum,
            neg_entropy, prior if has_prior else row_max, offset,
            row_weight, dx, batch, channels, count, **constants, HAS_PRIOR=has_prior,
            FUSED_PRIOR=fused,
            BLOCK_M=config.block_m, BLOCK_N=config.block_n, DX_COLUMNS=config.dx_columns,
            num_warps=config.num_warps, num_stages=config.num_stages)

    name = "input_grad_prior_fused" if fused else "input_grad_prior" if has_prior else "input_grad"
    _run(name, x, operands, interpreted, rows, count, launch, compile_only)
    return dx


def _chunked_template_sums(x, templates, row_max, log_sum, offset, prior, row_weight, operands,
                           interpreted, constants, compile_only):
    """``sum_t weight_t T_t`` of every row, ``(B, C, K)`` in the accumulation dtype, with the
    weights of ``_tiles.template_weights`` (``dx`` before its scale ``tau w``, or ``tau``
    with a prior), chunk by chunk of templates: ``score_grad_kernel`` writes a chunk's
    weights to a scratch, ``template_product_kernel`` adds their product with the chunk's
    templates into per-split partial sums, summed in a fixed order at the end.

    ``x`` as the kernels read it (``_operand_maps``). The scratch holds the weights of
    ``B*C x chunk`` templates in the type the product reads (bfloat16 for bfloat16
    products, else the accumulation dtype), with the chunk sized so that the scratch is at
    most the prepared template matrix's bytes (at least one tile of templates; in the
    interpreter two tiles, so that several chunks and a last partial one run). Each kernel
    takes as many programs as fill the GPU twice over, splitting the chunk's templates
    between them (in the interpreter two splits). Not tuned by ``ECLOSS_TRITON_AUTOTUNE``:
    its launches accumulate.
    """
    from ecloss_fast.triton_kernels.score_grad import score_grad_kernel
    from ecloss_fast.triton_kernels.template_product import template_product_kernel

    batch, channels, pixels = x.shape
    rows, count = batch * channels, templates.shape[0]
    accumulation = row_max.dtype
    has_prior = prior is not None
    score = _config("score_grad", x, operands, interpreted, rows, count)
    product = _config("template_product", x, operands, interpreted, rows, count)
    prepared = _operand_templates(templates, operands, score.block_n)
    padded_count = prepared.shape[0]
    grad_dtype = torch.bfloat16 if operands == "bf16" else accumulation
    tile = max(score.block_n, product.block_n)
    if interpreted:
        width = 2 * tile
    else:
        width = (prepared.numel() * prepared.element_size()
                 // (rows * grad_dtype.itemsize))
    width = min(max(tile, width // tile * tile), math.ceil(padded_count / tile) * tile)
    multiprocessors = None if interpreted else _device_traits(x.device)[1]

    def span(block_n, programs):
        """Templates per program, whole tiles: the chunk split so that ``programs`` per split
        make twice as many programs as multiprocessors (2 splits in the interpreter)."""
        tiles = math.ceil(width / block_n)
        wanted = 2 if interpreted else math.ceil(2 * multiprocessors / programs)
        return math.ceil(tiles / min(tiles, wanted)) * block_n

    row_tiles = math.ceil(rows / score.block_m)
    score_span = span(score.block_n, row_tiles)
    product_grid = (math.ceil(rows / product.block_m), math.ceil(pixels / product.dx_columns))
    product_span = span(product.block_n, product_grid[0] * product_grid[1])
    splits = math.ceil(width / product_span)
    # compile_only (warm_up) compiles both kernels: nothing is read, so stand-ins suffice.
    grad = torch.empty(16 if compile_only else rows * width, device=x.device, dtype=grad_dtype)
    partial = torch.zeros(16 if compile_only else splits * rows * pixels, device=x.device,
                          dtype=accumulation)
    weights = row_weight if has_prior else row_max  # an unread placeholder without a prior
    for start in range(0, padded_count, width):
        end = min(start + width, padded_count)
        _launcher(compile_only)(
            score_grad_kernel, (row_tiles, math.ceil((end - start) / score_span)), interpreted,
            x, prepared, row_max, log_sum, offset, prior if has_prior else row_max, weights,
            grad, batch, channels, count, start, end, score_span, width, **constants,
            HAS_PRIOR=has_prior, BLOCK_M=score.block_m, BLOCK_N=score.block_n,
            num_warps=score.num_warps, num_stages=score.num_stages)
        _launcher(compile_only)(
            template_product_kernel, (*product_grid, math.ceil((end - start) / product_span)),
            interpreted, grad, prepared, partial, rows, start, end, product_span, width,
            K=pixels, PADDED_K=prepared.shape[1], OPERANDS=constants["OPERANDS"],
            ACC=constants["ACC"], BLOCK_M=product.block_m, BLOCK_N=product.block_n,
            BLOCK_K=product.dx_columns, num_warps=product.num_warps,
            num_stages=product.num_stages)
        if compile_only:
            break
    if compile_only:
        return torch.empty(x.shape, device=x.device, dtype=accumulation)
    return partial.view(splits, batch, channels, pixels).sum(dim=0)


def warm_up(x: torch.Tensor, templates: torch.Tensor, tau: float, precision: str,
            prior: bool) -> None:
    """Compile, without running, every kernel that loss calls on maps like ``x`` launch, and
    load each on ``x``'s device: raises what their first launch would raise.

    ``x`` and ``templates`` as for ``row_stats`` (only their shapes, dtypes, devices and
    alignment matter: nothing is read). The kernels are those of the forward without and
    with the gradient, and of the backward: ``row_stats``, then ``row_stats_with_grad``
    (uniform, ``prior`` false) or ``column_sums`` and ``input_grad`` with a prior (the
    marginal estimator or the diversity term), each in the form ``configs.FUSED`` picks, at
    the default configuration for ``x``'s rows. The real calls then find them compiled.
    The backward without a prior of a forward that kept no gradient (``input_grad`` with
    ``prior=None``, writing ``x``'s dtype) is not among them: ``ecloss`` never runs it.
    """
    _row_stats(x, templates, tau, precision, False, compile_only=True)
    if not prior:
        _row_stats_with_grad(x, templates, tau, precision, compile_only=True)
        return
    stats = torch.empty(x.shape[:2], device=x.device, dtype=accumulation_dtype(x.dtype))
    _column_sums(x, templates, tau, stats, stats, precision, compile_only=True)
    prior_terms = torch.empty(x.shape[1], templates.shape[0], device=x.device,
                              dtype=stats.dtype)
    _input_grad(x, templates, tau, stats, stats, stats, prior_terms, stats, precision, x.dtype,
                compile_only=True)


def launch_class(device: torch.device, dtype: torch.dtype, rows: int, pixels: int,
                 precision: str):
    """What, besides the device, dtype, ``K``, precision and prior, decides which kernels a
    call compiles: the default configuration of each kernel at ``rows`` (``configs.default``
    switches row tiles at one program per multiprocessor). ``None`` in the interpreter."""
    from ecloss_fast.triton_kernels import configs

    device = torch.device(device)
    if _interpreted_on(device):
        return None
    operands = triton_operands(dtype, precision, False)
    capability, multiprocessors = _device_traits(device)
    return tuple(configs.default(name, operands, capability, rows, multiprocessors, pixels)
                 for name in configs.KERNELS)
