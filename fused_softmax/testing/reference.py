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


def masked_softmax(scores, mask=None, scale=1.0, causal_offset=None, softcap=None, sinks=None, bias=None):
    """softmax(scale * scores + mask) over the last axis, in float64. A bool mask (True = attend) and
    the causal diagonal (key j is seen by query i when j <= i + causal_offset) hide keys; rows
    with every key hidden are zeros. ``softcap`` caps the scaled scores, softcap * tanh(z / softcap),
    before the mask; ``sinks`` [H] (for scores [..., H, Lq, Lk]) join each row's normalisation;
    ``bias`` is added as an additive mask is."""
    z = _f64(scores) * scale
    if softcap is not None:
        z = softcap * np.tanh(z / softcap)
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
    if bias is not None:
        z = z + _f64(bias)
    z = np.where(keep, z, -np.inf)
    if sinks is not None:
        sink_column = np.broadcast_to(_f64(sinks)[:, None, None], (*z.shape[:-1], 1))
        return softmax(np.concatenate([z, sink_column], axis=-1))[..., :-1]
    hidden = np.all(z == -np.inf, axis=-1, keepdims=True)
    return np.where(hidden, 0.0, softmax(np.where(hidden, 0.0, z)))


def masked_softmax_backward(scores, y, dy, scale=1.0, softcap=None, sinks=None):
    """(d scores, d sinks or None) of ``masked_softmax`` from its y and dy, in float64: the softmax's
    gradient through the cap (1 - tanh²) and the scale; a sink's is -Σ p_sink · Σ dy·y over its rows."""
    y, dy = _f64(y), _f64(dy)
    row_sums = np.sum(dy * y, axis=-1, keepdims=True)
    dz = y * (dy - row_sums)
    if softcap is not None:
        dz = dz * (1 - np.tanh(_f64(scores) * scale / softcap) ** 2)
    if sinks is None:
        return scale * dz, None
    sink_probability = 1 - np.sum(y, axis=-1, keepdims=True)
    per_row = -(sink_probability * row_sums)[..., 0]
    return scale * dz, per_row.sum(-1).reshape(-1, len(sinks)).sum(0)
