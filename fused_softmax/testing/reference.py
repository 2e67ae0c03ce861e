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


def masked_softmax(scores, mask=None, scale=1.0, causal_offset=None):
    """softmax(scale * scores + mask) over the last axis, in float64. A bool mask (True = attend) and
    the causal diagonal (key j is seen by query i when j <= i + causal_offset) hide keys; rows
    with every key hidden are zeros."""
    z = _f64(scores) * scale
    keep = np.ones(z.shape, dtype=bool)
    if causal_offset is not None:
        n_queries, n_keys = z.shape[-2:]
        keep &= np.arange(n_keys)[None, :] <= np.arange(n_queries)[:, None] + causal_offset
    if mask is not None:
        is_bool = getattr(mask, "dtype", None) in (bool, np.bool_) or str(getattr(mask, "dtype", "")) == "torch.bool"
        if is_bool:
            keep &= mask.cpu().numpy() if hasattr(mask, "cpu") else np.asarray(mask)
        else:
            z = z + _f64(mask)
    z = np.where(keep, z, -np.inf)
    hidden = np.all(z == -np.inf, axis=-1, keepdims=True)
    return np.where(hidden, 0.0, softmax(np.where(hidden, 0.0, z)))
