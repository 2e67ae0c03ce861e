"""Products of a vector v with softmax's Jacobian J at the output y, and their derivatives.

The backward kernel computes three such products, named as its PRODUCT constexpr:

- 'softmax': y * (v - sum(v * y)). J is symmetric, so this is the backward (Jᵀv) and the
  forward-mode tangent (Jv) alike;
- 'log_softmax_vjp': v - exp(y) * sum(v), log-softmax's backward (y holds log-probabilities);
- 'log_softmax_jvp': v - sum(exp(y) * v), log-softmax's forward-mode tangent.

A product is linear in v, so its derivative along v is the product itself (a kernel launch),
and its gradient for v is the transposed product. What depends on y is written here in torch
ops, differentiable in turn, in fp32 at least: half-precision row sums would lose digits torch
keeps.
"""

import functools

import torch

TRANSPOSED = {"softmax": "softmax", "log_softmax_vjp": "log_softmax_jvp", "log_softmax_jvp": "log_softmax_vjp"}


def backward_product(log):
    """The PRODUCT of softmax's (or log-softmax's) backward."""
    return "log_softmax_vjp" if log else "softmax"


def forward_product(log):
    """The PRODUCT of softmax's (or log-softmax's) forward-mode derivative."""
    return "log_softmax_jvp" if log else "softmax"


def widened(*tensors):
    """The tensors in their common dtype, fp32 at least."""
    dtype = functools.reduce(torch.promote_types, (t.dtype for t in tensors), torch.float32)
    return [t.to(dtype) for t in tensors]


def local_sum(dim):
    """Row sums along ``dim``, kept as a dim of size 1: over the tensor itself (see ``distributed``
    for rows sharded across processes)."""
    return lambda t: t.sum(dim, keepdim=True)


def product(y, v, dim, kind, row_sum=None):
    """The product ``kind`` of v with the Jacobian at y, in torch ops; ``row_sum`` sums a row
    (default: ``local_sum(dim)``)."""
    row_sum = row_sum or local_sum(dim)
    y, v = widened(y, v)
    if kind == "softmax":
        return y * (v - row_sum(v * y))
    if kind == "log_softmax_vjp":
        return v - y.exp() * row_sum(v)
    return v - row_sum(y.exp() * v)


def y_tangent(y, v, ty, dim, kind, row_sum=None):
    """The product's derivative along y in the direction ``ty`` (v held fixed)."""
    row_sum = row_sum or local_sum(dim)
    y, v, ty = widened(y, v, ty)
    if kind == "softmax":
        return ty * (v - row_sum(v * y)) - y * row_sum(v * ty)
    if kind == "log_softmax_vjp":
        return -y.exp() * ty * row_sum(v)
    return -row_sum(y.exp() * ty * v)


def second_derivatives(y, v, grad, dim, kind, row_sum=None):
    """The gradients of <grad, product(y, v)> for y and for v, in y's and v's dtypes."""
    row_sum = row_sum or local_sum(dim)
    wide_y, wide_v, wide_grad = widened(y, v, grad)
    if kind == "softmax":
        grad_y = wide_grad * (wide_v - row_sum(wide_v * wide_y)) - wide_v * row_sum(wide_grad * wide_y)
    elif kind == "log_softmax_vjp":
        grad_y = -wide_grad * wide_y.exp() * row_sum(wide_v)
    else:
        grad_y = -row_sum(wide_grad) * wide_y.exp() * wide_v
    return grad_y.to(y.dtype), product(wide_y, wide_grad, dim, TRANSPOSED[kind], row_sum).to(v.dtype)
