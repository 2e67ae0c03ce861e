"""NumPy float64 reference: the ground truth of the tests."""

import numpy as np


def _f64(a):
    if hasattr(a, "detach"):
        a = a.detach().cpu().double().numpy()
    return np.asarray(a, dtype=np.float64)


def log_softmax(x, axis=-1):
    """x - max - log(sum(exp(x - max))) along ``axis``, in float64."""
    x = _f64(x)
    if not x.size:
        return x
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        shifted = x - np.max(x, axis=axis, keepdims=True)
        return shifted - np.log(np.sum(np.exp(shifted), axis=axis, keepdims=True))


def softmax(x, axis=-1):
    """exp(x - max) / sum(exp(x - max)) along ``axis``, in float64."""
    x = _f64(x)
    if not x.size:
        return x
    with np.errstate(invalid="ignore", over="ignore"):
        e = np.exp(x - np.max(x, axis=axis, keepdims=True))
        return e / np.sum(e, axis=axis, keepdims=True)


def softmax_backward(y, dy, axis=-1):
    """dx = y * (dy - sum(dy * y)) along ``axis``, in float64."""
    y, dy = _f64(y), _f64(dy)
    return y * (dy - np.sum(dy * y, axis=axis, keepdims=True))


def log_softmax_backward(y, dy, axis=-1):
    """dx = dy - exp(y) * sum(dy) along ``axis``, for y = log_softmax(x), in float64."""
    y, dy = _f64(y), _f64(dy)
    return dy - np.exp(y) * np.sum(dy, axis=axis, keepdims=True)
