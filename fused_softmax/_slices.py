"""A row's log-sum-exp from the statistics of its slices: the shards of a dim sharded across
ranks (``distributed``), or the chunks of a vocabulary taken a chunk at a time
(``linear_cross_entropy``). The kernels write each slice's statistics fresh; the host combines
them with a few torch ops on [slices, rows] tensors, negligible beside the logits."""

import torch


def log_sum_exp_parts(maxes, sums):
    """[..., 2]: each row's log-sum-exp, as (M, log Σ_r s_r·exp(m_r − M)) with M = max_r m_r, from
    every slice's (max m_r, Σ exp(x − m_r) s_r), slices along dim 0. Kept in two parts: x − M is
    exact for the large logits, where rounding the sum first would cost exp(x − lse) its
    precision.

    Slices with m_r = −inf (only −inf, or nothing) add nothing, whatever their sum; a row of −inf
    in every slice gets −inf, so its softmax is NaN, as torch's.
    """
    row_max = maxes.amax(0)
    terms = torch.where(maxes == float("-inf"), 0.0, sums * torch.exp(maxes - row_max))
    return torch.stack([row_max, torch.log(terms.sum(0))], -1)
