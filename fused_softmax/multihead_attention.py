"""``MultiheadAttention``: torch.nn.MultiheadAttention with the scale, the masks and the softmax
of every head fused into one ``masked_softmax`` kernel.

The padding mask and the attention mask are merged into one mask that broadcasts to the scores
[B, heads, L, S], so it is read through strides: a padding mask is [B, 1, 1, S], a 2-D
attn_mask [1, 1, L, S], both together [B, 1, L, S]; nothing is expanded over the heads.
"""

import functools
import math
import warnings

import torch
import torch.nn.functional as F

from ._runtime import Unscriptable
from .attention import masked_softmax


def _check_mask_types(key_padding_mask, attn_mask):
    for name, mask in (("key_padding_mask", key_padding_mask), ("attn_mask", attn_mask)):
        if mask is not None and mask.dtype != torch.bool and not mask.dtype.is_floating_point:
            raise AssertionError(f"only bool and floating types of {name} are supported")
    if key_padding_mask is not None and attn_mask is not None and key_padding_mask.dtype != attn_mask.dtype:
        warnings.warn(
            "Support for mismatched key_padding_mask and attn_mask is deprecated. Use same type for both instead.",
            stacklevel=2,
        )


def _check_dims(query, key, value, key_padding_mask, attn_mask, num_heads):
    """torch's checks of the number of dims, with its AssertionErrors; True for batched (3-D) input."""
    if query.dim() not in (2, 3):
        raise AssertionError(
            f"query should be unbatched 2D or batched 3D tensor but received {query.dim()}-D query tensor"
        )
    is_batched = query.dim() == 3
    kind = "batched (3-D)" if is_batched else "unbatched (2-D)"
    if key.dim() != query.dim() or value.dim() != query.dim():
        raise AssertionError(
            f"For {kind} `query`, expected `key` and `value` to be {query.dim()}-D"
            f" but found {key.dim()}-D and {value.dim()}-D tensors respectively"
        )
    if key_padding_mask is not None and key_padding_mask.dim() != query.dim() - 1:
        raise AssertionError(
            f"For {kind} `query`, expected `key_padding_mask` to be `None` or {query.dim() - 1}-D"
            f" but found {key_padding_mask.dim()}-D tensor instead"
        )
    if attn_mask is not None and attn_mask.dim() not in (2, 3):
        raise AssertionError(
            f"For {kind} `query`, expected `attn_mask` to be `None`, 2-D or 3-D"
            f" but found {attn_mask.dim()}-D tensor instead"
        )
    heads_shape = (num_heads, query.size(0), key.size(0))
    if not is_batched and attn_mask is not None and attn_mask.dim() == 3 and attn_mask.shape != heads_shape:
        raise AssertionError(f"Expected `attn_mask` shape to be {heads_shape} but got {attn_mask.shape}")
    return is_batched


def _merge_masks(masks, dtype):
    """MHA's masks (bool True = ignore, or float added) as one mask in masked_softmax's terms (bool
    True = attend, or float added), broadcasting rather than expanded. All bool: one bool mask, a
    byte per element. With a float one, the bool ones become -inf where they hide a key, as in torch."""
    masks = [mask for mask in masks if mask is not None]
    if not masks:
        return None
    if all(mask.dtype == torch.bool for mask in masks):
        return functools.reduce(torch.logical_or, masks).logical_not()
    additive = [
        torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf")) if mask.dtype == torch.bool else mask
        for mask in masks
    ]
    return functools.reduce(torch.add, additive)


class MultiheadAttention(Unscriptable, torch.nn.MultiheadAttention):
    """Drop-in for ``torch.nn.MultiheadAttention`` whose softmax, scale and masks run as one
    ``masked_softmax`` per call.

    A subclass with torch's constructor, parameters and state dict keys, so a torch module's
    state dict loads as it is. ``forward`` has torch's signature and the semantics of
    ``F.multi_head_attention_forward`` (layouts, unbatched input, kdim/vdim, add_bias_kv,
    add_zero_attn, dropout in training from torch's RNG, the masks, the ``is_causal`` hint and
    the returned weights, after dropout as in torch), computed the same way whatever
    ``need_weights`` is. torch's inference fast path has no counterpart: nested tensors are not
    accepted.

    Differs from torch: a query whose keys are all masked gets zero weights, an output of the
    output projection's bias and zero gradients, as torch's ``need_weights=False`` path (SDPA)
    gives in training or with grad enabled; torch's ``need_weights=True`` path, and its
    inference fast path, give NaN there.
    """

    def forward(
        self,
        query,
        key,
        value,
        key_padding_mask=None,
        need_weights=True,
        attn_mask=None,
        average_attn_weights=True,
        is_causal=False,
    ):
        _check_mask_types(key_padding_mask, attn_mask)
        is_batched = _check_dims(query, key, value, key_padding_mask, attn_mask, self.num_heads)
        if is_causal and attn_mask is None:
            raise RuntimeError(
                "Need attn_mask if specifying the is_causal hint. You may use the Transformer module method "
                "`generate_square_subsequent_mask` to create this mask."
            )
        self._check_features(query, key, value)
        q, k, v = (self._split_heads(x, is_batched) for x in self._in_projection(query, key, value))
        batch, _, n_queries, _ = q.shape
        n_keys = k.size(2)
        if k.size(0) != batch:
            raise RuntimeError(f"key and value have a batch of {k.size(0)} but query has {batch}")
        k, v = self._extend_keys(k, v)
        # torch trusts the hint, dropping attn_mask, only with no padding mask to merge and no weights
        # to return; we do the same, so that a wrong hint gives torch's result.
        causal = is_causal and key_padding_mask is None and not need_weights
        mask = None if causal else self._merged_mask(attn_mask, key_padding_mask, batch, n_queries, n_keys, query.dtype)
        heads, weights = self._attention(q, k, v, mask, causal)
        output = self._out_projection(heads, is_batched)
        if not need_weights:
            return output, None
        if average_attn_weights:
            weights = weights.mean(dim=1)
        return output, weights if is_batched else weights.squeeze(0)

    def _check_features(self, query, key, value):
        """torch's checks of the feature sizes and key/value shapes, with its AssertionErrors."""
        if query.size(-1) != self.embed_dim:
            raise AssertionError(f"was expecting embedding dimension of {self.embed_dim}, but got {query.size(-1)}")
        if key.shape[:-1] != value.shape[:-1] or (self._qkv_same_embed_dim and key.shape != value.shape):
            raise AssertionError(f"key shape {key.shape} does not match value shape {value.shape}")
        if not self._qkv_same_embed_dim and (key.size(-1), value.size(-1)) != (self.kdim, self.vdim):
            features = (key.size(-1), value.size(-1))
            raise AssertionError(f"expecting key and value features of {(self.kdim, self.vdim)}, but got {features}")

    def _in_projection(self, query, key, value):
        """q, k, v in the inputs' layout: one matmul on the packed weight for self-attention, else one each."""
        if self._qkv_same_embed_dim and query is key is value:
            return F.linear(query, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        if self._qkv_same_embed_dim:
            weights = self.in_proj_weight.chunk(3)
        else:
            weights = (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)
        biases = (None,) * 3 if self.in_proj_bias is None else self.in_proj_bias.chunk(3)
        return [F.linear(x, weight, bias) for x, weight, bias in zip((query, key, value), weights, biases, strict=True)]

    def _split_heads(self, x, is_batched):
        """[T, E] (unbatched), [T, B, E] or [B, T, E] (batch_first) -> [B, heads, T, head_dim], a view."""
        if not is_batched:
            x = x.unsqueeze(1)
        elif self.batch_first:
            x = x.transpose(0, 1)
        return x.unflatten(-1, (self.num_heads, -1)).permute(1, 2, 0, 3)

    def _extend_keys(self, k, v):
        """add_bias_kv and add_zero_attn: keys and values appended after the source sequence."""
        batch, heads, _, head_dim = k.shape
        keys, values = [k], [v]
        if self.bias_k is not None:
            keys.append(self.bias_k.view(heads, 1, head_dim).expand(batch, -1, -1, -1))
            values.append(self.bias_v.view(heads, 1, head_dim).expand(batch, -1, -1, -1))
        if self.add_zero_attn:
            keys.append(k.new_zeros(batch, heads, 1, head_dim))
            values.append(v.new_zeros(batch, heads, 1, head_dim))
        return torch.cat(keys, dim=2), torch.cat(values, dim=2)

    def _merged_mask(self, attn_mask, key_padding_mask, batch, n_queries, n_keys, dtype):
        """attn_mask and key_padding_mask, checked as torch checks them, as one mask broadcasting to
        the scores [B, heads, L, S'] (S' counts the appended keys, which both masks let through)."""
        if attn_mask is not None:
            if attn_mask.dim() == 2:
                expected = (n_queries, n_keys)
            else:
                expected = (batch * self.num_heads, n_queries, n_keys)
            if attn_mask.shape != expected:
                raise RuntimeError(
                    f"The shape of the {attn_mask.dim()}D attn_mask is {attn_mask.shape}, but should be {expected}."
                )
            heads = 1 if attn_mask.dim() == 2 else self.num_heads
            attn_mask = attn_mask.view(-1, heads, n_queries, n_keys)
        if key_padding_mask is not None:
            key_padding_mask = torch.atleast_2d(key_padding_mask)  # unbatched [S]: a batch of one
            if key_padding_mask.shape != (batch, n_keys):
                raise AssertionError(
                    f"Expected key_padding_mask of shape {(batch, n_keys)}, but got {key_padding_mask.shape}"
                )
            key_padding_mask = key_padding_mask.view(batch, 1, 1, n_keys)
        appended_keys = int(self.bias_k is not None) + int(self.add_zero_attn)
        if appended_keys:
            attn_mask, key_padding_mask = (
                None if mask is None else F.pad(mask, (0, appended_keys)) for mask in (attn_mask, key_padding_mask)
            )
        return _merge_masks((attn_mask, key_padding_mask), dtype)

    def _attention(self, q, k, v, mask, causal):
        """Per-head outputs [B, heads, L, head_dim] and weights [B, heads, L, S'], after dropout."""
        scores = q @ k.transpose(-2, -1)
        weights = masked_softmax(scores, mask, scale=1.0 / math.sqrt(q.size(-1)), causal=causal)
        if self.training and self.dropout > 0.0:
            weights = F.dropout(weights, self.dropout)
        return weights @ v, weights

    def _out_projection(self, heads, is_batched):
        """Heads concatenated and projected, in the inputs' layout with torch's strides."""
        output = F.linear(heads.permute(2, 0, 1, 3).flatten(2), self.out_proj.weight, self.out_proj.bias)
        if not is_batched:
            return output.squeeze(1)
        return output.transpose(0, 1) if self.batch_first else output
