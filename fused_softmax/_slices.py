"""A row's log-sum-exp, and its cross-entropy, from the statistics of its slices: the shards of a
dim sharded across ranks (``distributed``), the chunks of a vocabulary taken a chunk at a time
(``linear_cross_entropy``), or the chunks of a split row (``cross_entropy`` of few long rows).
The kernels write each slice's statistics fresh; the host combines them with a few torch ops on
[slices, rows] tensors, negligible beside the logits."""

import torch


def exponent_shift(row_max):
    """What exponents are taken against: the max, or 0 where it is −inf (only −inf, or nothing),
    so a sum of exp is 0 there, not exp(−inf − −inf) = NaN; the kernels' ``exponent_shift``."""
    return torch.where(row_max == float("-inf"), 0.0, row_max)


def log_sum_exp_parts(maxes, sums):
    """[..., 2]: each row's log-sum-exp, as (M, log Σ_r s_r·exp(m_r − M)) with M = max_r m_r, from
    every slice's (max m_r, Σ exp(x − m_r) s_r), slices along dim 0. Kept in two parts: x − M is
    exact for the large logits, where rounding the sum first would cost exp(x − lse) its
    precision.

    A slice of only −inf (or nothing) comes with a sum of 0 and adds nothing; one holding a NaN
    (which the GPU's max passes over) with a NaN sum, which makes the row NaN, as torch's. A row
    of −inf in every slice gets −inf, so its softmax is NaN, as torch's.
    """
    row_max = maxes.amax(0)
    terms = sums * torch.exp(maxes - exponent_shift(row_max))
    return torch.stack([row_max, torch.log(terms.sum(0))], -1)


def combined_statistics(stats, widths):
    """Each row's log-sum-exp in two parts [rows, 2] (``log_sum_exp_parts``), x'_t and D = Σ (x' − M)
    over every class, M the row's max, from the slices' [slices, rows, 4] statistics (max m_r,
    Σ exp(x' − m_r), x'_t where the slice holds the target else 0, Σ (x' − m_r)), as
    ``vocab_slice_statistics_kernel`` writes them, and the slices' class counts ``widths``
    [slices]: moving a slice's Σ to M adds widths·(m_r − M), which rounds to the logits' spread,
    not their size (the kernels' ``deviation_step``)."""
    lse = log_sum_exp_parts(stats[..., 0], stats[..., 1])
    moved = widths[:, None] * (exponent_shift(stats[..., 0]) - exponent_shift(lse[:, 0]))
    return lse, stats[..., 2].sum(0), (stats[..., 3] + moved).sum(0)


def probabilities(x, lse):
    """exp(x − lse) along dim 1 of [rows, classes] logits, in lse's dtype, from the log-sum-exp in
    two parts [rows, 2] (``log_sum_exp_parts``): (x − M) − log Σ, exact for large logits where
    exp(x − (M + log Σ)) would cost the rounding of M + log Σ."""
    row_max, log_sum = lse[:, :1], lse[:, 1:]
    return torch.exp((x.to(lse.dtype) - row_max) - log_sum)


def losses_from_statistics(lse, target_logit, smooth_deviation, target, n_classes, options):
    """Each row's loss from its log-sum-exp in two parts ``lse`` [rows, 2] (M, log Σ), x'_t and
    D = Σ (x' − M) over every class, ``options`` being (ignore_index, ε, z, softcap):
    (1 - ε)·(lse - x'_t) + ε/C·(C·lse - Σ x') + z·lse², 0 where ignored, NaN where the target is
    not a class, with lse - x'_t as (M - x'_t) + log Σ and C·lse - Σ x' as C·log Σ - D, exact
    for large logits, as ``cross_entropy_kernel`` computes it."""
    ignore_index, label_smoothing, z_loss, _ = options
    row_max, log_sum = lse.unbind(1)
    full_lse = row_max + log_sum
    loss = (1 - label_smoothing) * ((row_max - target_logit) + log_sum) + z_loss * full_lse * full_lse
    if label_smoothing:
        loss = loss + label_smoothing / n_classes * (n_classes * log_sum - smooth_deviation)
    in_range = (target >= 0) & (target < n_classes)
    return torch.where(target == ignore_index, 0.0, torch.where(in_range, loss, float("nan")))
