"""``softmax`` and ``log_softmax``, drop-ins for torch.nn.functional's, and their autograd Functions."""

import operator

import torch
import torch.nn.functional as F
from torch.overrides import handle_torch_function, has_torch_function_unary

from . import _jacobian, _launch, ops
from ._backend import is_kernel_dtype, use_kernels
from ._jacobian import backward_product, forward_product
from ._runtime import unscriptable
from ._transforms import (
    bound_quickly,
    legacy_batched,
    needs_autograd,
    refuse_nested_forward_mode,
    save_for_jvp,
    vmapped,
)

# The dtypes torch's argument parser reads Python's number types as.
_PYTHON_DTYPES = {float: torch.float64, int: torch.int64, bool: torch.bool, complex: torch.complex128}


def _python_dtype(name, dtype, ndim):
    """A dtype= that is not a torch.dtype, as torch's argument parser takes it: Python's float
    (float64), int, bool and complex; anything else torch's own error."""
    if isinstance(dtype, type) and dtype in _PYTHON_DTYPES:
        return _PYTHON_DTYPES[dtype]
    _raise_torchs_error(name, ndim, 0, dtype)
    # Reached only if this torch takes a dtype= the table above lacks.
    raise TypeError(f"{name}(): dtype={dtype!r} is taken by this torch but not read by fused_softmax")


def _raise_torchs_error(name, ndim, dim, dtype=None):
    """Raises what torch's own function raises for these arguments, on an empty tensor of ``ndim``
    dims: its argument parser's words, which change between releases (torch 2.11 lists the
    overloads it expected, 2.13 names the argument), rather than a copy of one release's."""
    _TORCH[name](torch.empty((0,) * ndim), dim, dtype=dtype)


def _implicit_dim(name, ndim, stacklevel):
    """torch's dim for dim=None (``F._get_softmax_dim``), with its deprecation warning; under
    torch.compile, which cannot trace a warning (fullgraph would fail), the dim alone."""
    if torch.compiler.is_compiling():
        return 0 if ndim in (0, 1, 3) else 1
    return F._get_softmax_dim(name, ndim, stacklevel + 1)


def _wrap_dim(name, dim, ndim):
    """``dim`` made non-negative; for a dim torch refuses (``_refused_dim``), torch's error."""
    if type(dim) is int and -ndim <= dim < ndim:
        return dim % ndim
    if _refused_dim(dim, ndim):
        _raise_torchs_error(name, ndim, dim)
    return operator.index(dim) % max(ndim, 1)


def _refused_dim(dim, ndim):
    """Whether torch refuses ``dim`` of an ``ndim``-dim tensor: not an index (a bool, a float, a
    tensor of more than one element or of floats) or out of range. Python alone: under
    torch.compile a call that torch refuses goes to torch's op, which raises where dynamo cannot."""
    if isinstance(dim, bool):
        return True
    try:
        dim = operator.index(dim)
    except TypeError:
        return True
    return not -max(ndim, 1) <= dim < max(ndim, 1)


def _setup_context(ctx, inputs, y):
    x, dim = inputs[:2]
    ctx.dim, ctx.input_dtype = dim, x.dtype
    ctx.save_for_backward(y)
    save_for_jvp(ctx, y)


def jacobian_product(y, v, dim, dtype, kind, scale=1.0):
    """``JacobianProductFunction``'s product, through the Function only when it will be
    differentiated (a double backward, forward-mode AD, torch.func): a plain backward launches
    the kernel directly, without a second Function's host time. In torch ops where the older
    vmap of ``is_grads_batched`` builds a graph (create_graph): it drops the graph of a Function
    applied in a backward."""
    batched = legacy_batched(y, v)
    if batched and torch.is_grad_enabled():
        return (_jacobian.product(y, v, dim, kind) * scale).to(dtype)
    if batched or needs_autograd(y, v):
        return JacobianProductFunction.apply(y, v, dim, dtype, kind, scale)
    return _launch.jacobian_product(y, v, dim, dtype, kind, scale)


# Each backward's product, named once (``_jacobian``), looked up rather than asked for per call.
_BACKWARD_PRODUCTS = {log: backward_product(log) for log in (False, True)}


def _backward(ctx, dy, log):
    (y,) = ctx.saved_tensors
    return jacobian_product(y, dy, ctx.dim, ctx.input_dtype, _BACKWARD_PRODUCTS[log]), None, None


def _jvp(ctx, tangent, log):
    (y,) = ctx.saved_tensors
    return JacobianProductFunction.apply(y, tangent, ctx.dim, y.dtype, forward_product(log))


@bound_quickly
class SoftmaxFunction(torch.autograd.Function):
    """Softmax along ``dim`` on the Triton kernels, output in ``dtype`` (default: x's), read and
    written in one pass. Saves only y; the backward is one kernel and returns x's dtype, the
    forward-mode tangent is one kernel too. Works under every torch.func transform; a vmapped
    call is one launch."""

    @staticmethod
    def forward(x, dim, dtype=None):
        return _launch.softmax_forward(x, dim, dtype or x.dtype, log=False)

    setup_context = staticmethod(_setup_context)

    @staticmethod
    def backward(ctx, dy):
        return _backward(ctx, dy, log=False)

    @staticmethod
    def jvp(ctx, tangent, *_):
        return _jvp(ctx, tangent, log=False)

    @staticmethod
    def vmap(info, in_dims, x, dim, dtype=None):
        return vmapped(SoftmaxFunction.apply, info, in_dims, (x,), dim, dtype)


@bound_quickly
class LogSoftmaxFunction(torch.autograd.Function):
    """Log-softmax along ``dim`` on the same kernels as ``SoftmaxFunction``."""

    @staticmethod
    def forward(x, dim, dtype=None):
        return _launch.softmax_forward(x, dim, dtype or x.dtype, log=True)

    setup_context = staticmethod(_setup_context)

    @staticmethod
    def backward(ctx, dy):
        return _backward(ctx, dy, log=True)

    @staticmethod
    def jvp(ctx, tangent, *_):
        return _jvp(ctx, tangent, log=True)

    @staticmethod
    def vmap(info, in_dims, x, dim, dtype=None):
        return vmapped(LogSoftmaxFunction.apply, info, in_dims, (x,), dim, dtype)


@bound_quickly
class JacobianProductFunction(torch.autograd.Function):
    """``scale`` times the product ``kind`` (see ``_jacobian``) of v with softmax's Jacobian at y,
    in ``dtype``, on the backward kernel: the backward of softmax, log-softmax and
    masked_softmax (v = dy) and their forward-mode tangents (v = the input's tangent).
    Differentiable in y and v, in both modes, for double backward, hessians and the like."""

    @staticmethod
    def forward(y, v, dim, dtype, kind, scale=1.0):
        if legacy_batched(y, v):
            return ops.jacobian_product(y, v, dim, dtype, kind, scale)
        return _launch.jacobian_product(y, v, dim, dtype, kind, scale)

    @staticmethod
    def setup_context(ctx, inputs, output):
        y, v, dim, dtype, kind, *scale = inputs
        ctx.dim, ctx.dtype, ctx.kind, ctx.scale = dim, dtype, kind, scale[0] if scale else 1.0
        ctx.save_for_backward(y, v)
        save_for_jvp(ctx, y, v)

    @staticmethod
    def backward(ctx, grad):
        y, v = ctx.saved_tensors
        grad_y, grad_v = _jacobian.second_derivatives(y, v, grad * ctx.scale, ctx.dim, ctx.kind)
        return grad_y, grad_v, None, None, None, None

    @staticmethod
    def jvp(ctx, y_tangent, v_tangent, *_):
        y, v = ctx.saved_tensors

        def product(t):
            return JacobianProductFunction.apply(y, t, ctx.dim, ctx.dtype, ctx.kind, ctx.scale)

        return product_tangent(product, y, v, y_tangent, v_tangent, ctx.dim, ctx.kind, ctx.scale).to(ctx.dtype)

    @staticmethod
    def vmap(info, in_dims, y, v, dim, dtype, kind, scale=1.0):
        return vmapped(JacobianProductFunction.apply, info, in_dims, (y, v), dim, dtype, kind, scale)


def product_tangent(product, y, v, y_tangent, v_tangent, dim, kind, scale=1.0, row_sum=None):
    """The forward-mode tangent of a Jacobian product (``JacobianProductFunction``'s, the sharded
    one's): along v the product itself (``product``, a Function, differentiable further), along y
    ``_jacobian``'s torch ops (``row_sum`` as there), which torch runs with forward AD off, so a
    third forward-mode level would lose its tangents there: it raises."""
    tangent = 0
    if v_tangent is not None:
        tangent = product(v_tangent)
    if y_tangent is not None:
        refuse_nested_forward_mode("softmax", "a third forward-mode level (jacfwd(jacfwd(jacfwd(f))))")
        tangent = tangent + _jacobian.y_tangent(y, v, y_tangent, dim, kind, row_sum) * scale
    return tangent


def _fusable(input_dtype, dtype):
    """dtype= is fused into the kernel when it widens: reading the narrower input and casting it
    in registers equals torch's cast-first. A narrowing cast must round the input first, and a
    cast to a dtype the kernels do not write (complex) is torch's, then refused as torch refuses it."""
    return is_kernel_dtype(input_dtype) and torch.promote_types(input_dtype, dtype) == dtype and is_kernel_dtype(dtype)


# Captured at import, before any patch() can replace them: the eager fallback.
_TORCH = {"softmax": F.softmax, "log_softmax": F.log_softmax}


def _dispatch(name, input, dim, stacklevel, dtype):
    if dim is None:
        dim = _implicit_dim(name, input.dim(), stacklevel + 1)
    if not use_kernels(input, input.dtype if dtype is None else dtype):
        return _TORCH[name](input, dim, dtype=dtype)
    if torch.compiler.is_compiling():
        return _compiled(name, input, dim, dtype)
    dim = _wrap_dim(name, dim, input.dim())
    if dtype is not None:
        input, dtype = _kernel_input(name, input, dtype)
    if not is_kernel_dtype(input.dtype):
        raise NotImplementedError(f'"{name}" not implemented for {input.dtype}')
    if not needs_autograd(input):
        return _launch.softmax_forward(input, dim, dtype or input.dtype, name == "log_softmax")
    return _FUNCTIONS[name].apply_eagerly(input, dim, dtype)


_FUNCTIONS = {"softmax": SoftmaxFunction, "log_softmax": LogSoftmaxFunction}


def _kernel_input(name, input, dtype):
    """(input, dtype) as the kernels take them: dtype= read as torch's parser reads it, and
    cast first where the kernels cannot fuse the cast (``_fusable``; the dtype then None)."""
    if dtype is not None and not isinstance(dtype, torch.dtype):
        dtype = _python_dtype(name, dtype, input.dim())
    if dtype is not None and not _fusable(input.dtype, dtype):
        return input.to(dtype), None
    return input, dtype


def _compiled(name, input, dim, dtype):
    """The call under torch.compile: the custom op; or torch's own function where torch
    refuses the call (a bad dim, a dtype the kernels do not take), so that torch raises its own
    error: dynamo cannot trace a raise under fullgraph."""
    input, dtype = _kernel_input(name, input, dtype)
    if _refused_dim(dim, input.dim()) or not is_kernel_dtype(input.dtype):
        return _TORCH[name](input, dim, dtype=dtype)
    return getattr(ops, name)(input, _wrap_dim(name, dim, input.dim()), dtype)


@unscriptable
def softmax(input, dim=None, _stacklevel=3, dtype=None):
    """Drop-in for ``torch.nn.functional.softmax``: same signature, results, warnings and errors.

    CUDA tensors run on the fused Triton kernels; the rest runs eager PyTorch unless the
    backend says otherwise (see ``use_backend``). Under torch.compile it is one custom op.
    """
    if has_torch_function_unary(input):
        return handle_torch_function(softmax, (input,), input, dim=dim, _stacklevel=_stacklevel, dtype=dtype)
    return _dispatch("softmax", input, dim, _stacklevel, dtype)


@unscriptable
def log_softmax(input, dim=None, _stacklevel=3, dtype=None):
    """Drop-in for ``torch.nn.functional.log_softmax``, on the same kernels as ``softmax``."""
    if has_torch_function_unary(input):
        return handle_torch_function(log_softmax, (input,), input, dim=dim, _stacklevel=_stacklevel, dtype=dtype)
    return _dispatch("log_softmax", input, dim, _stacklevel, dtype)
