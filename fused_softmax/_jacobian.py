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


def product(y, v, dim, kind):
    """The product ``kind`` of v with the Jacobian at y, in torch ops."""
    y, v = widened(y, v)
    if kind == "softmax":
        return y * (v - (v * y).sum(dim, keepdim=True))
    if kind == "log_softmax_vjp":
        return v - y.exp() * v.sum(dim, keepdim=True)
    return v - (y.exp() * v).sum(dim, keepdim=True)


def y_tangent(y, v, ty, dim, kind):
    """The product's derivative along y in the direction ``ty`` (v held fixed)."""
    y, v, ty = widened(y, v, ty)
    if kind == "softmax":
        return ty * (v - (v * y).sum(dim, keepdim=True)) - y * (v * ty).sum(dim, keepdim=True)
    if kind == "log_softmax_vjp":
        return -y.exp() * ty * v.sum(dim, keepdim=True)
    return -(y.exp() * ty * v).sum(dim, keepdim=True)


def second_derivatives(y, v, grad, dim, kind):
    """The gradients of <grad, product(y, v)> for y and for v, in y's and v's dtypes."""
    wide_y, wide_v, wide_grad = widened(y, v, grad)
    if kind == "softmax":
        grad_y = wide_grad * (wide_v - (wide_v * wide_y).sum(dim, keepdim=True)) - wide_v * (wide_grad * wide_y).sum(
            dim, keepdim=True
        )
    elif kind == "log_softmax_vjp":
        grad_y = -wide_grad * wide_y.exp() * wide_v.sum(dim, keepdim=True)
    else:
        grad_y = -wide_grad.sum(dim, keepdim=True) * wide_y.exp() * wide_v
    return grad_y.to(y.dtype), product(wide_y, wide_grad, dim, TRANSPOSED[kind]).to(v.dtype)
