"""torch.nn.functional.softmax's and log_softmax's contract, kept on both backends, and the backend switch."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support import INTERPRETED, TOLERANCES, assert_close, random

import fused_softmax
from fused_softmax import _runtime
from fused_softmax.testing import reference


@pytest.mark.parametrize(
    "shape, dim",
    [
        ((5,), 0),
        ((5, 5), 0),
        ((5, 5), 1),
        ((5, 10, 5), 2),
        ((5, 10, 5), 1),
        ((32, 20), 0),
        ((31, 23), 1),
        ((2, 128, 2, 2), 1),
        ((2, 2, 4, 4), -1),
        ((33, 49), -2),
    ],
)
def test_matches_torch(backend, device, op, shape, dim):
    x = random(shape, device=device, scale=1.0)
    y = op.fused(x, dim=dim)
    assert y.is_contiguous() and y.shape == x.shape
    assert_close(y, op.reference(x, axis=dim))
    if backend == "torch":
        assert torch.equal(y, op.torch(x, dim=dim)), "the fallback must be bit-identical to torch"


@pytest.mark.parametrize(
    "layout",
    ["transposed", "sliced", "misaligned", "expanded", "channels_last"],
)
def test_strided_inputs(backend, device, op, layout):
    base = random((6, 9, 10, 7), device=device, scale=1.0)
    x = {
        "transposed": base[0, 0].t(),
        "sliced": base[:, :, 1:8:2, 1:6],
        "misaligned": base.flatten()[1 : 1 + 9 * 31].view(9, 31),
        "expanded": base[0, 0, 0].expand(5, 7),
        "channels_last": base.contiguous(memory_format=torch.channels_last),
    }[layout]
    for dim in range(x.dim()):
        y = op.fused(x, dim=dim)
        assert y.is_contiguous()
        assert_close(y, op.reference(x, axis=dim))


@pytest.mark.parametrize("dim", [0, 1])
def test_gradient_of_sum_and_noncontiguous_grad(backend, device, op, dim):
    x = random((7, 12), torch.float64, device=device, scale=1.0).requires_grad_()
    op.fused(x, dim=dim).sum().backward()  # stride-0 grad_output
    ones = torch.ones_like(x)
    assert_close(x.grad, op.reference_backward(op.reference(x, axis=dim), ones, axis=dim))
    dy = random((12, 7), torch.float64, device=device, scale=1.0).t()  # non-contiguous grad_output
    (dx,) = torch.autograd.grad(op.fused(x, dim=dim), x, dy)
    assert_close(dx, op.reference_backward(op.reference(x, axis=dim), dy, axis=dim))
    misaligned = random((7 * 12 + 1,), torch.float64, device=device, scale=1.0)[1:].view(7, 12)
    (dx,) = torch.autograd.grad(op.fused(x, dim=dim), x, misaligned)
    assert_close(dx, op.reference_backward(op.reference(x, axis=dim), misaligned, axis=dim))


def test_functions_take_negative_dims(kernels, device):
    x = random((4, 9), torch.float64, device=device, scale=1.0).requires_grad_()
    for function, reference_op in (
        (fused_softmax.SoftmaxFunction, reference.softmax),
        (fused_softmax.LogSoftmaxFunction, reference.log_softmax),
    ):
        for dim in (-1, -2):
            y = function.apply(x, dim)
            assert_close(y, reference_op(x, axis=dim))
            assert torch.autograd.gradcheck(lambda t, f=function, d=dim: f.apply(t, d), (x,))


def test_saves_only_y(kernels, device, op):
    x = random((4, 9), device=device, scale=1.0).requires_grad_()
    y = op.fused(x, dim=-1)
    (saved,) = y.grad_fn.saved_tensors
    assert saved.data_ptr() == y.data_ptr()


@pytest.mark.parametrize("ndim, expected_dim", [(0, 0), (1, 0), (2, 1), (3, 0), (4, 1)])
def test_implicit_dim_warns_and_picks_torchs_dim(backend, device, op, ndim, expected_dim):
    x = random([3] * ndim, device=device, scale=1.0)
    with pytest.warns(UserWarning, match=f"Implicit dimension choice for {op.name} has been deprecated") as record:
        y = op.fused(x)
    assert record[0].filename == __file__, "the warning must point at the caller, as torch's does"
    torch.testing.assert_close(y, op.torch(x, dim=expected_dim))


def test_modules_warn_like_torchs(device, op):
    module = {
        "softmax": (fused_softmax.Softmax, torch.nn.Softmax),
        "log_softmax": (fused_softmax.LogSoftmax, torch.nn.LogSoftmax),
    }
    ours, theirs = module[op.name]
    x = random((2, 3), device=device, scale=1.0)
    with pytest.warns(UserWarning) as expected:
        theirs()(x)
    with pytest.warns(UserWarning) as record:
        ours()(x)
    assert record[0].filename == expected[0].filename


MODULE_ARGUMENTS = {"Softmax": (-1,), "LogSoftmax": (-1,), "CrossEntropyLoss": (), "MultiheadAttention": (8, 2)}


@pytest.mark.parametrize("name", list(MODULE_ARGUMENTS))
def test_torchscript_refuses_the_modules_clearly(name):
    """torch.jit.script compiles torch's module but cannot compile code that launches Triton
    kernels: for ours it says so, naming what to use, instead of failing on whatever line of
    ours it reaches first."""
    arguments = MODULE_ARGUMENTS[name]
    torch.jit.script(getattr(torch.nn, name)(*arguments))
    with pytest.raises(RuntimeError, match=f"torch.jit.script cannot compile fused_softmax.{name}"):
        torch.jit.script(getattr(fused_softmax, name)(*arguments))


def _scripted_softmax(x):
    return fused_softmax.softmax(x, -1)


def _scripted_log_softmax(x):
    return fused_softmax.log_softmax(x, -1)


def _scripted_masked_softmax(x):
    return fused_softmax.masked_softmax(x, causal=True)


def _scripted_attention(x):
    return fused_softmax.attention(x, x, x)


def _scripted_cross_entropy(x):
    return fused_softmax.cross_entropy(x, x.argmax(-1))


def _scripted_linear_cross_entropy(x):
    return fused_softmax.linear_cross_entropy(x, x, x.argmax(-1))


@pytest.mark.parametrize(
    "name, function",
    [
        ("softmax", _scripted_softmax),
        ("log_softmax", _scripted_log_softmax),
        ("masked_softmax", _scripted_masked_softmax),
        ("attention", _scripted_attention),
        ("cross_entropy", _scripted_cross_entropy),
        ("linear_cross_entropy", _scripted_linear_cross_entropy),
    ],
)
def test_torchscript_refuses_code_calling_the_functions_clearly(name, function):
    """Scripting user code that calls a public function says so at script time, by name, instead
    of TorchScript failing on the first line of ours it cannot compile (a ContextVar lookup)."""
    with pytest.raises(RuntimeError, match=f"torch.jit.script cannot compile fused_softmax.{name}, "):
        torch.jit.script(function)


def test_jit_trace_refuses_the_kernels(device):
    """torch.jit.trace records torch ops, not Triton launches: a traced kernel call would replay
    an unwritten output, so tracing one raises; under the torch backend it traces torch's ops."""
    x = random((3, 8), device=device, scale=1.0)
    with fused_softmax.use_backend("triton"), pytest.raises(RuntimeError, match="torch.jit.trace cannot record"):
        torch.jit.trace(lambda t: fused_softmax.softmax(t, -1), x)
    with fused_softmax.use_backend("torch"):
        traced = torch.jit.trace(lambda t: fused_softmax.softmax(t, -1), x)
    assert_close(traced(x + 1), reference.softmax(x + 1))


@pytest.mark.parametrize("name", ["torch", "triton"])
def test_bad_dims_raise_torchs_errors(device, op, name):
    """torch's error types and messages: a dim not an int, out of int64's range, out of range."""
    x = random((3, 4), device=device, scale=1.0)
    with fused_softmax.use_backend(name):
        for bad in (1.0, True, "1", torch.tensor([1, 0]), torch.tensor(1.0), 2, -3, 2**70, -(2**63) - 1):
            with pytest.raises(Exception) as expected:
                op.torch(x, dim=bad)
            with pytest.raises(type(expected.value)) as raised:
                op.fused(x, dim=bad)
            assert str(raised.value) == str(expected.value)


@pytest.mark.parametrize("name", ["torch", "triton"])
def test_a_python_type_as_dtype_is_torchs(device, op, name):
    """dtype=float is float64 to torch's argument parser, and so here; int's error is torch's type."""
    x = random((3, 4), device=device, scale=1.0)
    with fused_softmax.use_backend(name):
        y = op.fused(x, 1, dtype=float)
        assert y.dtype == torch.float64
        torch.testing.assert_close(y, op.torch(x, 1, dtype=float))
        with pytest.raises(NotImplementedError):
            op.fused(x, 1, dtype=int)


@pytest.mark.parametrize("name", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64], ids=str)
def test_non_float_input_needs_dtype(device, op, name, dtype):
    x = torch.ones(3, 4, dtype=dtype, device=device)
    with fused_softmax.use_backend(name):
        with pytest.raises(RuntimeError):  # NotImplementedError on CPU, RuntimeError on CUDA
            op.fused(x, dim=1)


@pytest.mark.parametrize("name", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128], ids=str)
def test_a_complex_dtype_is_refused_as_torch_refuses_it(device, op, name, dtype):
    """dtype=complex on float input: torch casts, then has no complex softmax (NotImplementedError
    on CPU, RuntimeError on CUDA); the kernels never see a complex output."""
    x = torch.randn(3, 4, device=device)
    with fused_softmax.use_backend(name), pytest.raises(RuntimeError, match="not implemented for"):
        op.fused(x, dim=1, dtype=dtype)


def test_int_input_with_dtype(backend, device, op):
    x = torch.arange(12, device=device).view(3, 4)
    y = op.fused(x, dim=1, dtype=torch.float32)
    assert y.dtype == torch.float32
    assert_close(y, op.reference(x, axis=1))


@pytest.mark.parametrize(
    "in_dtype, out_dtype",
    [
        (torch.float16, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.float64),
        (torch.float32, torch.float16),
        (torch.bfloat16, torch.float16),
        (torch.float64, torch.float32),
    ],
    ids=str,
)
def test_dtype_argument(backend, device, op, in_dtype, out_dtype):
    """As torch: the input is cast to dtype first; the gradient comes back in the input's dtype."""
    x = random((5, 33), in_dtype, device=device, scale=1.0).requires_grad_()
    y = op.fused(x, dim=1, dtype=out_dtype)
    assert y.dtype == out_dtype
    assert_close(y, op.reference(x.to(out_dtype)))
    rtol = 2 * max(TOLERANCES[in_dtype][0], TOLERANCES[out_dtype][0])  # two roundings in the narrower dtype
    torch.testing.assert_close(y, op.torch(x, dim=1, dtype=out_dtype), rtol=rtol, atol=1e-4)
    dy = random((5, 33), out_dtype, device=device, scale=1.0)
    (dx,) = torch.autograd.grad(y, x, dy)
    (torch_dx,) = torch.autograd.grad(op.torch(x, dim=1, dtype=out_dtype), x, dy)
    assert dx.dtype == in_dtype
    torch.testing.assert_close(dx, torch_dx, rtol=rtol, atol=1e-3)


def test_zero_dim(backend, device, op):
    x = torch.tensor(3.0, device=device, requires_grad=True)
    for dim in (0, -1):
        y = op.fused(x, dim=dim)
        assert y.shape == () and y.item() == op.torch(x, dim=0).item()
    y.backward()
    assert x.grad.item() == 0.0
    for special in (float("nan"), float("inf"), -float("inf")):
        assert torch.isnan(op.fused(torch.tensor(special, device=device), dim=0))


@pytest.mark.parametrize("name", ["torch", "triton"])
@pytest.mark.parametrize("shape, dim", [((0, 10), 1), ((10, 0), 1), ((10, 0), 0), ((5, 0, 0), -1)])
def test_empty(device, launches, op, name, shape, dim):
    x = torch.randn(shape, device=device, requires_grad=True)
    with fused_softmax.use_backend(name):
        y = op.fused(x, dim=dim)
        y.backward(torch.ones_like(y))
    assert y.shape == shape and x.grad.shape == shape
    assert len(launches) == 0


def test_backend_is_read_at_call_time(device, launches, monkeypatch):
    x = random((4, 8), device=device, scale=1.0)
    monkeypatch.setenv("FUSED_SOFTMAX_BACKEND", "torch")
    fused_softmax.softmax(x, dim=1)
    assert len(launches) == 0
    monkeypatch.setenv("FUSED_SOFTMAX_BACKEND", "triton")
    fused_softmax.softmax(x, dim=1)
    assert len(launches) == 1
    with fused_softmax.use_backend("torch"):
        with fused_softmax.use_backend("triton"):
            fused_softmax.softmax(x, dim=1)
        fused_softmax.softmax(x, dim=1)
    assert len(launches) == 2


def test_auto_backend(device, launches, monkeypatch):
    monkeypatch.delenv("FUSED_SOFTMAX_BACKEND", raising=False)
    fused_softmax.softmax(random((4, 8), device=device, scale=1.0), dim=1)
    assert len(launches) == (1 if device == "cuda" else 0)
    fused_softmax.softmax(random((4, 8), scale=1.0), dim=1)  # CPU tensors go to eager PyTorch
    assert len(launches) == (1 if device == "cuda" else 0)


def test_unknown_backend_raises(monkeypatch):
    with pytest.raises(ValueError, match="unknown fused_softmax backend"):
        with fused_softmax.use_backend("cuda"):
            pass
    monkeypatch.setenv("FUSED_SOFTMAX_BACKEND", "fast")
    with pytest.raises(ValueError, match="unknown fused_softmax backend"):
        fused_softmax.softmax(random((2, 2), scale=1.0), dim=1)


def test_triton_backend_never_falls_back():
    with fused_softmax.use_backend("triton"):
        with pytest.raises(RuntimeError, match="not on meta"):
            fused_softmax.softmax(torch.empty(2, 3, device="meta"), dim=1)
    # A CPU tensor in a process where triton was imported without the interpreter.
    code = """
import torch, fused_softmax
with fused_softmax.use_backend('triton'):
    try:
        fused_softmax.softmax(torch.randn(2, 3), dim=1)
    except RuntimeError as e:
        assert 'TRITON_INTERPRET=1' in str(e), e
    else:
        raise SystemExit('the triton backend ran a CPU tensor without the interpreter')
"""
    without_interpreter = run_python(code, TRITON_INTERPRET=None, CUDA_VISIBLE_DEVICES="")
    assert without_interpreter.returncode == 0, without_interpreter.stderr


class _StandInProbe:
    """A stand-in for the interpreter's probe kernel: ``fails`` raises as Triton 3.6's interpreter
    does under NumPy 2.4, else it runs and writes nothing."""

    def __init__(self, fails):
        self.fails = fails

    def __getitem__(self, grid):
        return self

    def __call__(self, items, n_items):
        from triton.runtime.errors import InterpreterError

        if self.fails:
            cause = TypeError("only 0-dimensional arrays can be converted to Python scalars")
            raise InterpreterError(repr(cause)) from cause


@pytest.mark.skipif(not INTERPRETED, reason="the probe runs where the kernels are interpreted")
@pytest.mark.parametrize(
    "fails, found", [(True, "TypeError"), (False, "it wrote \\[0, 0, 0\\]")], ids=["raises", "wrong"]
)
def test_an_interpreter_that_cannot_run_the_kernels_is_refused_clearly(monkeypatch, fails, found):
    """The 'triton' backend on CPU tensors first runs a probe of the loop every kernel runs: an
    interpreter that cannot (Triton 3.6's under NumPy 2.4: every launch raised a TypeError from
    inside Triton) is refused with what it found, its versions and the remedy."""
    monkeypatch.setattr(_runtime.kernels(), "persistent_loop_probe_kernel", _StandInProbe(fails))
    _runtime._interpreter_problem.cache_clear()
    try:
        with fused_softmax.use_backend("triton"), pytest.raises(RuntimeError, match=f"NumPy .*: {found}.*numpy<2.4"):
            fused_softmax.softmax(random((2, 3), scale=1.0), dim=1)
    finally:
        _runtime._interpreter_problem.cache_clear()
    monkeypatch.undo()
    assert _runtime.interpreter_problem() is None  # this machine's interpreter runs the real probe


def run_python(code, **env):
    """Run ``code`` in a fresh Python, with ``env`` changing the environment (None: unset)."""
    env = {k: v for k, v in (os.environ | env).items() if v is not None}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)


def test_import_is_lazy_and_works_without_triton():
    code = """
import sys, fused_softmax
assert 'triton' not in sys.modules, 'imported triton'
tool_packages = ('fused_softmax.bench', 'fused_softmax.testing', 'fused_softmax.kernels')
tools = [m for m in sys.modules if m.startswith(tool_packages)]
assert not tools, tools
"""
    lazy = run_python(code)
    assert lazy.returncode == 0, lazy.stderr
    code = """
import sys
sys.modules['triton'] = None  # as if triton were not installed
import torch, fused_softmax
x = torch.randn(3, 5)
assert torch.equal(fused_softmax.softmax(x, dim=1), torch.softmax(x, dim=1))
with fused_softmax.use_backend('triton'):
    try:
        fused_softmax.softmax(x, dim=1)
    except RuntimeError as e:
        assert 'needs the triton package' in str(e), e
    else:
        raise SystemExit('the triton backend ran without triton')
"""
    without = run_python(code)
    assert without.returncode == 0, without.stderr


@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
def test_output_dtype_is_input_dtype(backend, device, op, dtype):
    x = random((3, 70), dtype, device=device, scale=1.0)
    y = op.fused(x, dim=-1)
    assert y.dtype == dtype
    assert_close(y, op.reference(x))


def test_the_device_code_refuses_to_pose_as_pypis_kernels():
    """A checkout's root on sys.path puts its kernels/ where PyPI's ``kernels`` (which
    transformers imports) is looked for: that import says why, instead of failing later on a
    missing name; the package itself still imports as fused_softmax.kernels."""
    root = Path(__file__).resolve().parents[1]
    code = f"""
import sys
sys.path.insert(0, {str(root)!r})
try:
    import kernels
except ImportError as e:
    assert 'PYTHONSAFEPATH' in str(e), e
else:
    raise SystemExit(f'imported {{kernels.__file__}} as the top-level kernels')
import fused_softmax.kernels
"""
    shadowed = run_python(code)
    assert shadowed.returncode == 0, shadowed.stderr


def _package_imports():
    """{module: the package's modules it imports}, from the source: module-level imports and
    those inside functions alike, ``kernels/`` as ``fused_softmax.kernels``."""
    root = Path(__file__).resolve().parents[1]
    files = {}
    for package, folder in (("fused_softmax", root / "fused_softmax"), ("fused_softmax.kernels", root / "kernels")):
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            name = ".".join((package, *parts)).removesuffix(".__init__")
            files[name] = (path, path.name == "__init__.py")
    imports = {}
    for name, (path, is_package) in files.items():
        here = name if is_package else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = here.rsplit(".", node.level - 1)[0] if node.level > 1 else here
                    base = f"{anchor}.{base}".rstrip(".")
                targets = [f"{base}.{alias.name}" for alias in node.names]
                found |= {t if t in files else base for t in targets}
            elif isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
        imports[name] = {m for m in found if m in files and m != name}
    return imports


def test_imports_flow_one_way():
    """No module of the package imports another in a cycle, whether at module level or inside a
    function (where an import hidden to dodge a cycle would sit)."""
    imports = _package_imports()
    assert "fused_softmax._launch" in imports["fused_softmax.functional"]
    done, on_path = set(), []

    def visit(module):
        if module in on_path:
            raise AssertionError(" -> ".join(on_path[on_path.index(module) :] + [module]))
        if module not in done:
            on_path.append(module)
            for imported in sorted(imports[module]):
                visit(imported)
            on_path.pop()
            done.add(module)

    for module in sorted(imports):
        visit(module)
