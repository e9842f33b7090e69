"""Public API: validation, Module, precision, autocast, non-finite input, torch.compile."""
import contextlib
import math
import warnings

import pytest
import torch

import ecloss_fast as ef
from ecloss_fast._ops import LossInputs, LossOutputs
from ecloss_fast.testing import peaked_maps, random_maps


BAD_INPUTS = [
    (lambda: [[1.0]], {}, TypeError, "x must be a torch.Tensor"),
    (lambda: torch.rand(2, 3, 4), {}, ValueError, "(B, C, H, W)"),
    (lambda: torch.ones(2, 3, 4, 4, dtype=torch.int64), {}, TypeError, "torch.int64"),
    (lambda: torch.rand(0, 3, 4, 4), {}, ValueError, "must not be empty"),
    (lambda: torch.rand(2, 3, 4, 4), dict(estimator="bayes"), ValueError, "estimator"),
    (lambda: torch.rand(2, 3, 4, 4), dict(reduction="max"), ValueError, "reduction"),
    (lambda: torch.rand(2, 3, 4, 4), dict(backend="fortran"), ValueError, "backend"),
    (lambda: torch.rand(2, 3, 4, 4), dict(precision="fp8"), ValueError, "precision"),
    (lambda: torch.rand(2, 3, 4, 4), dict(tau=0.0), ValueError, "tau"),
    (lambda: torch.rand(2, 3, 4, 4), dict(tau="big"), TypeError, "tau"),
    (lambda: torch.rand(2, 3, 4, 4), dict(radius=float("nan")), ValueError, "radius"),
    (lambda: torch.rand(2, 3, 4, 4), dict(templates="most"), ValueError, "templates"),
    (lambda: torch.rand(2, 3, 4, 4), dict(templates=0), ValueError, "subset size k"),
    (lambda: torch.rand(2, 3, 4, 4), dict(templates=200), ValueError, "num_templates(4, 4) = 137"),
    (lambda: torch.rand(2, 3, 4, 4), dict(templates=1.5), TypeError, "templates"),
    (lambda: torch.rand(2, 3, 4, 4), dict(templates=torch.rand(5, 4, 5)), ValueError, "H x W"),
    (lambda: torch.rand(2, 3, 4, 4), dict(templates=torch.rand(5, 16)), ValueError, "(N, H, W)"),
    (lambda: torch.rand(2, 3, 4, 4), dict(templates=torch.ones(5, 4, 4, dtype=torch.int32)),
     TypeError, "floating"),
    (lambda: torch.rand(2, 3, 4, 4), dict(templates=torch.ones(5, 4, 4, device="meta")),
     ValueError, "templates must hold values"),
    (lambda: torch.rand(2, 3, 4, 4), dict(process_group=object()), TypeError,
     "process_group must be a torch.distributed ProcessGroup"),
    (lambda: torch.rand(2, 3, 4, 4), dict(process_group="WORLD", estimator="marginal"),
     TypeError, "process_group"),
    (lambda: torch.rand(2, 3, 4, 4), dict(diversity=-0.5), ValueError, "diversity"),
    (lambda: torch.rand(2, 3, 4, 4), dict(diversity=float("inf")), ValueError, "diversity"),
    (lambda: torch.rand(2, 3, 4, 4), dict(diversity=float("nan")), ValueError, "diversity"),
    (lambda: torch.rand(2, 3, 4, 4), dict(diversity="some"), TypeError, "diversity"),
    (lambda: torch.rand(2, 3, 4, 4), dict(diversity=True), TypeError, "diversity"),
    (lambda: torch.rand(2, 3, 4, 4), dict(normalize=1), TypeError, "normalize"),
    (lambda: torch.rand(2, 3, 4, 4), dict(normalize="yes"), TypeError, "normalize"),
]


@pytest.mark.parametrize("make_input, kwargs, error, words", BAD_INPUTS)
def test_bad_input_errors(make_input, kwargs, error, words):
    with pytest.raises(error) as info:
        ef.ecloss(make_input(), **kwargs)
    assert words in str(info.value)
    with pytest.raises(error) as info:  # the Module checks on its call, as the function does
        ef.ECLoss(**kwargs)(make_input())
    assert words in str(info.value)


# What only the maps show to be wrong: a subset k beyond num_templates(H, W), templates of
# another H x W, templates without values (meta).
NEEDS_MAPS = ("num_templates(4, 4) = 137", "H x W", "templates must hold values")


@pytest.mark.parametrize("kwargs, error, words", [
    (kwargs, error, words) for _, kwargs, error, words in BAD_INPUTS
    if kwargs and words not in NEEDS_MAPS])
def test_module_checks_its_arguments_when_built(kwargs, error, words):
    with pytest.raises(error) as info:
        ef.ECLoss(**kwargs)
    assert words in str(info.value)


@pytest.mark.parametrize("make_input, kwargs, error, words", [
    case for case in BAD_INPUTS if case[3] in NEEDS_MAPS])
def test_module_checks_what_depends_on_the_maps_on_its_call(make_input, kwargs, error, words):
    criterion = ef.ECLoss(**kwargs)
    with pytest.raises(error) as info:
        criterion(make_input())
    assert words in str(info.value)


def test_unavailable_backend_says_how_to_get_it(monkeypatch):
    from ecloss_fast import _dispatch
    monkeypatch.setitem(_dispatch._MODULES, "cuda", "ecloss_fast.backends.does_not_exist")
    _dispatch._load.cache_clear()
    try:
        with pytest.raises(ef.BackendUnavailableError, match="'cuda' is not available"):
            ef.ecloss(torch.rand(1, 1, 2, 2), backend="cuda")
        assert "cuda" not in ef.available_backends()
    finally:
        _dispatch._load.cache_clear()


def test_missing_cuda_device_message_says_how_to_get_one(monkeypatch):
    from ecloss_fast import _dispatch
    from ecloss_fast.backends import cpp_cuda
    if cpp_cuda.extension_error is not None:
        pytest.skip(f"the extension does not load here: {cpp_cuda.extension_error}")
    monkeypatch.setattr(cpp_cuda, "_has_cuda_kernels", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _dispatch._load.cache_clear()
    try:
        with pytest.raises(ef.BackendUnavailableError) as info:
            ef.ecloss(torch.rand(1, 1, 2, 2), backend="cuda")
    finally:
        _dispatch._load.cache_clear()
    message = str(info.value)
    assert "no CUDA device" in message                     # why
    assert "nvidia-smi" in message and "backend='cpu'" in message  # how


def test_templates_are_constants():
    x = peaked_maps(2, 3, 4, 4, seed=2).requires_grad_()
    templates = ef.make_templates(4).requires_grad_()
    loss = ef.ecloss(x, templates=templates, estimator="marginal", backend="torch")
    loss.backward()
    assert templates.grad is None and x.grad is not None
    torch.testing.assert_close(loss, ef.ecloss(x.detach(), estimator="marginal", backend="torch"))
    for doc in (ef.ecloss.__doc__, ef.ECLoss.__doc__):
        assert "templates are constants" in doc


def test_available_backends_lists_reference_and_torch():
    names = ef.available_backends()
    assert names[:2] == ["reference", "torch"]
    assert set(names) <= {"reference", "torch", "triton", "cuda", "cpu"}


def test_module_equals_functional_and_reductions():
    x = peaked_maps(3, 4, 5, 5, seed=1)
    per_channel = ef.ecloss(x, reduction="none", estimator="marginal")
    assert per_channel.shape == (4,)
    torch.testing.assert_close(ef.ECLoss(estimator="marginal", reduction="sum")(x), per_channel.sum())
    torch.testing.assert_close(ef.ECLoss(estimator="marginal")(x), per_channel.mean())
    assert "marginal" in repr(ef.ECLoss(estimator="marginal"))
    assert torch.all(per_channel <= 1e-6) and torch.all(per_channel >= -math.log(ef.num_templates(5)))


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_gives_non_finite_loss(backend, bad):
    x = random_maps(2, 2, 3, 3)
    x[1, 0, 1, 1] = bad
    for estimator in ("uniform", "marginal"):
        loss = ef.ecloss(x, backend=backend, estimator=estimator)
        assert not torch.isfinite(loss)


def test_precision_none_follows_matmul_precision():
    x = peaked_maps(2, 3, 6, 6, seed=4)
    ieee = ef.ecloss(x, backend="torch", precision="ieee")
    bf16 = ef.ecloss(x, backend="torch", precision="bf16")
    assert ieee != bf16  # operands rounded to bfloat16 change the scores
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        assert ef.ecloss(x, backend="torch") == bf16
        torch.set_float32_matmul_precision("highest")
        assert ef.ecloss(x, backend="torch") == ieee
    finally:
        torch.set_float32_matmul_precision(previous)
    reference = ef.ecloss(x.double(), backend="reference")
    assert abs(bf16.item() - reference.item()) <= 3e-2 * abs(reference.item())


@pytest.mark.parametrize("setting", ["highest", "medium"])
def test_precision_none_gives_half_maps_half_products(setting):
    """docs/design.md section 4: bfloat16 maps take bfloat16 products and float16 maps
    float16 products (templates rounded to the maps' type), whatever the float32 setting."""
    torch.set_float32_matmul_precision(setting)
    x = peaked_maps(2, 3, 6, 6, seed=4)
    upstream = torch.linspace(0.5, 2.0, 3)
    for dtype in (torch.bfloat16, torch.float16):
        maps = x.to(dtype)
        # The same products by hand: templates rounded to the maps' type, multiplied exactly.
        rounded = ef.make_templates(6).to(dtype)
        runs = []
        for kwargs in ({}, dict(templates=rounded, precision="ieee")):
            leaf = maps.clone().requires_grad_()
            loss = ef.ecloss(leaf, backend="torch", reduction="none", estimator="marginal",
                             **kwargs)
            (grad,) = torch.autograd.grad(loss, leaf, upstream)
            runs.append((loss, grad))
        torch.testing.assert_close(runs[0][0], runs[1][0], rtol=0, atol=0)
        # The bfloat16 gradient product also rounds its weights (as the matrix units do).
        if dtype == torch.float16:
            torch.testing.assert_close(runs[0][1], runs[1][1], rtol=0, atol=0)
        full = ef.ecloss(maps, backend="torch", estimator="marginal", precision="ieee")
        assert runs[0][0].mean() != full  # not the float32 path
    from ecloss_fast._dispatch import resolve_precision
    assert resolve_precision("", torch.float64) == "ieee"
    assert resolve_precision("tf32", torch.bfloat16) == "tf32"  # an explicit choice wins


def test_autocast_bfloat16_input():
    layer = torch.nn.Conv2d(3, 4, 3, padding=1)
    images = torch.rand(2, 3, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        maps = torch.relu(layer(images))
        assert maps.dtype == torch.bfloat16
        loss = ef.ecloss(maps, backend="torch")
        reference = ef.ecloss(maps, backend="reference")
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-5 * math.log(ef.num_templates(6)))
    loss.backward()
    assert layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all()


def test_custom_ops_pass_opcheck():
    x = peaked_maps(2, 3, 4, 3, seed=9).requires_grad_()
    for marginal, diversity, diagnostics, with_grad in (
            (False, 0.0, False, True), (False, 0.0, True, False), (True, 0.0, True, True),
            (False, 0.5, True, True), (True, 0.5, False, False)):
        torch.library.opcheck(torch.ops.ecloss_fast.channel_loss.default, tuple(LossInputs(
            x=x, templates=None, radius=4.0, subset=0, tau=1e-3, marginal=marginal,
            diversity=diversity, diagnostics=diagnostics, precision="ieee", backend="torch",
            group="", with_grad=with_grad)))
    row_max, log_sum, neg_entropy = torch.zeros(2, 3), torch.full((2, 3), math.log(7)), torch.zeros(2, 3)
    for prior in (None, torch.full((3, 7), -math.log(7))):
        torch.library.opcheck(torch.ops.ecloss_fast.input_grad.default,
                              (x.detach(), None, 4.0, 7, 1e-3, row_max, log_sum, neg_entropy,
                               prior, torch.ones(2, 3), "ieee", "torch"))


@pytest.mark.skipif("cpu" not in ef.available_backends(), reason="the C++ extension is not built")
@pytest.mark.parametrize("marginal, diversity", [(False, 0.0), (True, 0.0), (False, 0.5)])
def test_custom_ops_pass_opcheck_with_kept_scores(marginal, diversity):
    # The cpu backend keeps the scores for 6 rows of 12 pixels and not for 14 rows: the fake
    # kernel must give the same outputs as the op on both routes.
    for batch in (2, 7):
        x = peaked_maps(batch, 3, 4, 3, seed=9).requires_grad_()
        inputs = LossInputs(x=x, templates=None, radius=4.0, subset=0, tau=1e-3,
                            marginal=marginal, diversity=diversity, diagnostics=False,
                            precision="ieee", backend="cpu", group="",
                            with_grad=not (marginal or diversity))
        torch.library.opcheck(torch.ops.ecloss_fast.channel_loss.default, tuple(inputs))
        outputs = LossOutputs(*torch.ops.ecloss_fast.channel_loss(*inputs))
        assert (outputs.scores.numel() > 0) == (batch == 2)
    n = ef.num_templates(4, 3)
    prior = torch.full((3, n), -math.log(n)) if marginal else None
    stats = torch.zeros(2, 3), torch.full((2, 3), math.log(n)), torch.zeros(2, 3)
    torch.library.opcheck(torch.ops.ecloss_fast.input_grad_from_scores.default,
                          (x.detach()[:2], None, 4.0, 0, 1e-3, *stats, prior, torch.ones(2, 3),
                           "ieee", "cpu", torch.randn(2, 3, n)))
    for op, arguments in ((torch.ops.ecloss_fast_C.row_stats_with_scores,
                           (x.detach()[:2].flatten(2), ef.make_templates(4, 3).flatten(1),
                            1e-3, "ieee")),
                          (torch.ops.ecloss_fast_C.input_grad_from_scores,
                           (torch.randn(2, 3, n), ef.make_templates(4, 3).flatten(1), 1e-3,
                            *stats, prior, torch.ones(2, 3), "ieee"))):
        torch.library.opcheck(op.default, arguments)


def test_the_loss_op_takes_and_returns_the_named_fields():
    """The schema derived from ``LossInputs`` and ``LossOutputs``: their fields, in order."""
    schema = torch.ops.ecloss_fast.channel_loss.default._schema
    assert [argument.name for argument in schema.arguments] == list(LossInputs._fields)
    assert [str(argument.type) for argument in schema.arguments[:5]] == [
        "Tensor", "Optional[Tensor]", "float", "int", "float"]
    assert [str(result.type) for result in schema.returns] == ["Tensor"] * len(LossOutputs._fields)


def test_torch_compile_fullgraph_equals_eager():
    conv = torch.nn.Conv2d(2, 3, 3, padding=1)

    def step(images):
        maps = torch.relu(conv(images))
        return ef.ecloss(maps, estimator="marginal", backend="torch") + maps.mean()

    images = torch.rand(2, 2, 5, 5)
    eager = step(images)
    (eager_grad,) = torch.autograd.grad(eager, conv.weight)
    compiled = torch.compile(step, fullgraph=True)(images)
    (compiled_grad,) = torch.autograd.grad(compiled, conv.weight)
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(compiled_grad, eager_grad)


@pytest.mark.skipif("cpu" not in ef.available_backends(), reason="the C++ extension is not built")
@pytest.mark.parametrize("batch", [2, 9])  # 2 x 3 rows of 25 pixels keep the scores, 9 x 3 not
def test_torch_compile_fullgraph_equals_eager_on_both_cpu_routes(batch):
    conv = torch.nn.Conv2d(2, 3, 3, padding=1)

    def step(images):
        maps = torch.relu(conv(images))
        return ef.ecloss(maps, estimator="marginal", backend="cpu") + maps.mean()

    images = torch.rand(batch, 2, 5, 5)
    eager = step(images)
    (eager_grad,) = torch.autograd.grad(eager, conv.weight)
    compiled = torch.compile(step, fullgraph=True)(images)
    (compiled_grad,) = torch.autograd.grad(compiled, conv.weight)
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(compiled_grad, eager_grad)


# ---- backend="auto" is safe by construction (ecloss_fast._dispatch) ----
# Triton runs here in its interpreter (TRITON_INTERPRET=1), tried first for CPU tensors, and
# its warm-up's compile step (triton_fused._compile, which compiles and loads a launch
# without running it) is replaced by a fake that fails as a GPU can: a compile error,
# more shared memory than the GPU has, or a ValueError for maps it does not take.


@pytest.fixture
def triton_first(monkeypatch):
    """auto tries triton, then torch, for CPU tensors; verdicts and module caches fresh."""
    pytest.importorskip("triton")
    from ecloss_fast import _dispatch

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setitem(_dispatch._AUTO_ORDER, "cpu", ("triton", "torch"))
    _dispatch._load.cache_clear()
    _dispatch._VERDICTS.clear()
    yield
    _dispatch._load.cache_clear()
    _dispatch._VERDICTS.clear()


def _failure(kind):
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources

    from ecloss_fast.triton_kernels import configs
    if kind == "compile error":
        return CompilationError(None, None, "fake: ptxas exited with an error")
    if kind == "out of resources":
        return OutOfResources(233472, 232448, "shared memory")
    try:
        configs.k_class(2000)
    except ValueError as error:
        return error
    raise AssertionError("configs.k_class(2000) did not raise")


class _FailingCompiles:
    """A fake ``triton_fused._compile``: raises ``error`` for launches of ``kernel_name``."""

    def __init__(self, kernel_name, error):
        self.kernel_name, self.error, self.calls = kernel_name, error, 0

    def __call__(self, kernel, grid, interpreted, *args, **kwargs):
        self.calls += 1
        if kernel.__name__ == self.kernel_name:
            raise self.error


@contextlib.contextmanager
def _no_auto_warning():
    """Fails if ecloss_fast warns inside the block (others, such as numpy's warnings in
    Triton's interpreter, pass)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    assert not [w for w in caught if "ecloss_fast" in str(w.message)], \
        [str(w.message) for w in caught]


def _loss_and_grad(x, **kwargs):
    leaf = x.clone().requires_grad_()
    loss = ef.ecloss(leaf, **kwargs)
    loss.backward()
    return loss.detach(), leaf.grad


@pytest.mark.parametrize("kind", ["compile error", "out of resources", "unsupported K"])
@pytest.mark.parametrize("estimator, kernel_name", [
    ("uniform", "row_stats_kernel"),     # the forward's kernel
    ("marginal", "input_grad_kernel"),   # the backward's only: the forward falls back too
])
def test_auto_falls_back_for_the_whole_loss_when_a_route_fails(
        triton_first, monkeypatch, kind, estimator, kernel_name):
    from ecloss_fast.backends import streaming, triton_fused

    fake = _FailingCompiles(kernel_name, _failure(kind))
    monkeypatch.setattr(triton_fused, "_compile", fake)
    ran = []  # the triton launches that ran (interpreted): none may
    monkeypatch.setattr(triton_fused, "_launch", lambda kernel, *args, **kwargs:
                        ran.append(kernel.__name__))
    streamed = []
    for name in ("row_stats", "row_stats_with_grad", "column_sums", "input_grad"):
        function = getattr(streaming, name)
        monkeypatch.setattr(streaming, name, lambda *args, _f=function, _n=name, **kwargs:
                            streamed.append(_n) or _f(*args, **kwargs))
    x = peaked_maps(2, 3, 3, 4, seed=5)
    with pytest.warns(RuntimeWarning, match=r"runs 'torch' .*'triton' failed: "
                      + {"compile error": "CompilationError", "out of resources":
                         "OutOfResources", "unsupported K": "ValueError"}[kind]):
        loss, grad = _loss_and_grad(x, estimator=estimator, precision="ieee")
    assert ran == [] and fake.calls >= 1
    backward = "input_grad" if estimator == "marginal" else "row_stats_with_grad"
    assert backward in streamed and streamed[0].startswith("row_stats")
    truth_loss, truth_grad = _loss_and_grad(x, estimator=estimator, precision="ieee",
                                            backend="torch")
    assert torch.equal(loss, truth_loss) and torch.equal(grad, truth_grad)

    # The verdict is kept: the next call of the route neither compiles nor warns.
    calls = fake.calls
    with _no_auto_warning():
        again = _loss_and_grad(x, estimator=estimator, precision="ieee")
    assert fake.calls == calls and ran == []
    assert torch.equal(again[0], truth_loss) and torch.equal(again[1], truth_grad)


def test_auto_runs_a_route_whose_warm_up_passes(triton_first, monkeypatch):
    from ecloss_fast.backends import triton_fused

    fake = _FailingCompiles("no such kernel", None)
    monkeypatch.setattr(triton_fused, "_compile", fake)
    launched = []
    launch = triton_fused._launch
    monkeypatch.setattr(triton_fused, "_launch", lambda kernel, *args, **kwargs:
                        launched.append(kernel.__name__) or launch(kernel, *args, **kwargs))
    x = peaked_maps(2, 3, 3, 4, seed=5)
    with _no_auto_warning():
        loss, grad = _loss_and_grad(x, estimator="marginal", precision="ieee")
    # The warm-up compiled every launch of the call (forward and backward) beforehand.
    assert fake.calls >= len(set(launched)) >= 3 and "input_grad_kernel" in launched
    truth_loss, truth_grad = _loss_and_grad(x, estimator="marginal", precision="ieee",
                                            backend="reference")
    torch.testing.assert_close(loss, truth_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, truth_grad, rtol=1e-4, atol=1e-8)


def test_maps_a_backend_does_not_take_go_to_the_next_without_a_word(triton_first,
                                                                      monkeypatch):
    from ecloss_fast.backends import triton_fused

    fake = _FailingCompiles("no such kernel", None)
    monkeypatch.setattr(triton_fused, "_compile", fake)
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(1, 2, 1, 1100, generator=generator) * 5  # K = 1100 > 1024, triton's largest
    templates = torch.rand(6, 1, 1100, generator=generator)
    with _no_auto_warning():
        loss, grad = _loss_and_grad(x, templates=templates)
    assert fake.calls == 0
    truth_loss, truth_grad = _loss_and_grad(x, templates=templates, backend="torch")
    assert torch.equal(loss, truth_loss) and torch.equal(grad, truth_grad)
    # Named explicitly, the backend says what it takes.
    with pytest.raises(ValueError, match=r"'triton' does not take .* K = 1100 .* at most 1024"):
        ef.ecloss(x, templates=templates, backend="triton")


def test_a_backend_named_explicitly_raises_its_own_error(triton_first, monkeypatch):
    from triton.runtime.errors import OutOfResources

    from ecloss_fast.backends import triton_fused

    def out_of_resources(*args, **kwargs):
        raise OutOfResources(233472, 232448, "shared memory")

    monkeypatch.setattr(triton_fused, "_compile", out_of_resources)
    monkeypatch.setattr(triton_fused, "_launch", out_of_resources)
    with pytest.raises(OutOfResources):
        ef.ecloss(peaked_maps(2, 3, 3, 4, seed=5), backend="triton")


def test_backends_say_which_maps_they_take():
    from ecloss_fast.backends import cpp_cuda, streaming

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    # The CUDA kernels keep 64 maps in shared memory: 16x16 at most, no float64.
    assert cpp_cuda.supports(cuda, torch.float16, 256)
    assert not cpp_cuda.supports(cuda, torch.float16, 784)
    assert not cpp_cuda.supports(cuda, torch.float64, 196)
    assert not cpp_cuda.supports(cpu, torch.float32, 196)
    assert streaming.supports(cpu, torch.float64, 10 ** 6)
    assert streaming.supports(cuda, torch.float16, 784)
    for module in (cpp_cuda, streaming):
        assert isinstance(module.TAKES, str) and module.TAKES
