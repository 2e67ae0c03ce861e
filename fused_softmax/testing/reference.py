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
        z = np.concatenate([z, np.broadcast_to(_f64(sinks)[:, None, None], (*z.shape[:-1], 1))], axis=-1)
    hidden = np.all(z == -np.inf, axis=-1, keepdims=True)  # with sinks, only where a sink is -inf too
    y = np.where(hidden, 0.0, softmax(np.where(hidden, 0.0, z)))
    return y if sinks is None else y[..., :-1]


def _numpy(a):
    """A tensor as NumPy, floating point ones (bf16 too) as float64."""
    if hasattr(a, "detach"):
        a = a.detach().cpu()
        a = (a.double() if a.is_floating_point() else a).numpy()
    return np.asarray(a)


def _cross_entropy_terms(logits, target, weight, ignore_index, label_smoothing, softcap):
    """In float64: the capped logits x, the class axis, each row's lse, p = exp(x - lse), the
    target distribution d with the class weights folded in (so a row's loss is Σ d·(lse - x)),
    the rows counted (not ignored) and a mean's divisor."""
    x = _f64(logits)
    axis = 1 if x.ndim >= 2 else 0
    if softcap is not None:
        x = softcap * np.tanh(x / softcap)
    n_classes = x.shape[axis]
    shape = [1] * x.ndim
    shape[axis] = n_classes
    w = np.ones(n_classes) if weight is None else _f64(weight)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        row_max = np.max(x, axis=axis, keepdims=True)
        lse = row_max + np.log(np.sum(np.exp(x - row_max), axis=axis, keepdims=True))
        p = np.exp(x - lse)
    eps = label_smoothing
    t = _numpy(target)
    if np.issubdtype(t.dtype, np.floating):
        d = w.reshape(shape) * ((1 - eps) * t.astype(np.float64) + eps / n_classes)
        counted = np.ones(lse.shape, dtype=bool)
        divisor = lse.size
    else:
        t = np.expand_dims(t, axis).astype(np.int64)
        counted = t != ignore_index
        safe = np.where(counted, t, 0)
        onehot = np.arange(n_classes).reshape(shape) == safe
        d = np.where(counted, (1 - eps) * w[safe] * onehot + eps / n_classes * w.reshape(shape), 0.0)
        divisor = np.sum(np.where(counted, w[safe], 0.0))
    return x, axis, lse, p, d, counted, divisor


def cross_entropy(
    logits, target, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0, softcap=None
):
    """F.cross_entropy in float64, for class-index or class-probability targets (classes along
    axis 1, or 0 for a single row), with z_loss·lse² added to each counted row after the logits
    are capped to softcap·tanh(x / softcap). A mean divides by Σ w_t over the counted targets
    (their count without weights), or by the rows for probability targets; NaN when that is 0."""
    x, axis, lse, p, d, counted, divisor = _cross_entropy_terms(
        logits, target, weight, ignore_index, label_smoothing, softcap
    )
    probabilities = np.issubdtype(_numpy(target).dtype, np.floating)
    with np.errstate(invalid="ignore", divide="ignore"):
        # Index targets take only their classes' terms (torch's nll_loss reads one logit a row);
        # probability targets every class's, as torch's -(logp · d).sum() does.
        terms = d * (lse - x) if probabilities else np.where(d != 0, d * (lse - x), 0.0)
        losses = np.sum(terms, axis=axis, keepdims=True) + z_loss * lse**2
        losses = np.where(counted, losses, 0.0).squeeze(axis)
        if reduction == "none":
            return losses
        return np.sum(losses) if reduction == "sum" else np.sum(losses) / divisor


def cross_entropy_backward(
    logits,
    target,
    grad_loss,
    weight=None,
    ignore_index=-100,
    reduction="mean",
    label_smoothing=0.0,
    z_loss=0.0,
    softcap=None,
):
    """The logits' gradient of ``cross_entropy`` for the upstream ``grad_loss``, in float64:
    (p·Σd - d + 2z·lse·p)·(1 - (x/softcap)²) on counted rows, over the divisor for a mean."""
    x, axis, lse, p, d, counted, divisor = _cross_entropy_terms(
        logits, target, weight, ignore_index, label_smoothing, softcap
    )
    upstream = _f64(grad_loss)
    with np.errstate(invalid="ignore", divide="ignore"):
        if reduction == "none":
            upstream = np.expand_dims(upstream, axis)
        elif reduction == "mean":
            upstream = upstream / divisor
        g = p * np.sum(d, axis=axis, keepdims=True) - d + 2 * z_loss * lse * p
        if softcap is not None:
            g = g * (1 - (x / softcap) ** 2)
        return np.where(counted, g * upstream, 0.0)


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
