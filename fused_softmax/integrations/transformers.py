"""fused_softmax as a transformers attention implementation, ``attn_implementation="fused_softmax"``:

    from fused_softmax.integrations import transformers as fused_transformers

    fused_transformers.register()
    model = AutoModelForCausalLM.from_config(config, attn_implementation="fused_softmax")

Attention runs on ``fused_softmax.attention``: torch matmuls around the fused masked softmax, on the
backend fused_softmax selects (Triton kernels for CUDA tensors, eager PyTorch on CPU by default).

Masks. transformers builds no mask at all for an implementation without a mask function, so
``register`` also registers SDPA's under the same name. It gives None when causality is the only
constraint (no padding, one sequence): the kernel then compares key and query indices, with no
mask tensor. Otherwise it gives a bool mask [B, 1, Lq, Lk], True = attend, holding the padding,
sliding window, chunks or packed sequences; the kernel broadcasts it across the heads.
Queries that see no key (the ones before the first real token of a left-padded sequence) get
zeros, as with SDPA, where eager attends uniformly to every key: no real token attends to them.

Attention weights are not returned (None, as with SDPA): the fused path keeps them internal.
Features the fused path lacks raise NotImplementedError rather than being silently dropped.

The loss. ``fused_causal_lm_loss`` is transformers' causal-LM loss (``ForCausalLM``: labels
shifted by one, ignore_index, the ``num_items_in_batch`` normalisation) on
``fused_softmax.cross_entropy``: one pass over the logits, their gradient written in it, and no
fp32 copy of bf16 logits. Per model, ``model.loss_function = fused_causal_lm_loss``; for every
model, ``register(causal_lm_loss=True)``, the switch, which installs it as transformers'
``ForCausalLM`` loss (off by default: the registration leaves the loss alone). And
``use_linear_cross_entropy(model)`` goes further in training: the loss comes from the LM head's
input through ``fused_softmax.linear_cross_entropy``, and the logits are never built.
"""

import functools

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import fused_softmax

NAME = "fused_softmax"

# Keyword arguments some models pass that change the math: the fused path does not implement them.
UNSUPPORTED = {
    "softcap": "logit softcapping",
    "s_aux": "attention sinks",
    "position_bias": "position biases",
    "cache": "paged KV caches (continuous batching)",
}


def fused_attention_forward(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, is_causal=None, **kwargs
):
    """transformers' attention contract: query [B, Hq, Lq, D], key and value [B, Hkv, Lk, D] and the
    mask from ``sdpa_mask`` give (output [B, Lq, Hq, D] contiguous, None). Key/value heads are
    shared by Hq / Hkv query heads without being repeated."""
    for name, feature in UNSUPPORTED.items():
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"attn_implementation={NAME!r} does not support {feature} ({name}=); use 'eager'")
    if kwargs.get("output_attentions"):
        raise NotImplementedError(f"attn_implementation={NAME!r} does not return attention weights; use 'eager'")
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    # As with SDPA: a missing mask stands for the causal one, except for a single query (decoding
    # with a cache), which sees every key. The diagonal is top-left, which also hides the unfilled
    # slots of a static cache at prefill.
    causal = is_causal and attention_mask is None and query.shape[2] > 1
    output = fused_softmax.attention(
        query,
        key,
        value,
        attn_mask=attention_mask,
        dropout_p=dropout if module.training else 0.0,
        is_causal=causal,
        scale=scaling,
        enable_gqa=True,
    )
    return output.transpose(1, 2).contiguous(), None


def register(causal_lm_loss=False):
    """Makes ``attn_implementation="fused_softmax"`` available to every transformers model that
    routes attention through ``AttentionInterface``; with ``causal_lm_loss``, also makes
    ``fused_causal_lm_loss`` the loss of every causal LM. Calling it again changes nothing."""
    AttentionInterface.register(NAME, fused_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    if causal_lm_loss:
        from transformers.loss.loss_utils import LOSS_MAPPING

        LOSS_MAPPING["ForCausalLM"] = fused_causal_lm_loss


def fused_causal_lm_loss(
    logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100, shift_labels=None, **kwargs
):
    """transformers' ``ForCausalLMLoss`` on ``fused_softmax.cross_entropy``. The logits keep their
    dtype (the kernel's math is fp32); the loss comes back in fp32 at least, as transformers'."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    logits = logits.reshape(-1, vocab_size)
    shift_labels = shift_labels.reshape(-1).to(logits.device)
    reduction = "sum" if num_items_in_batch is not None else "mean"
    loss = fused_softmax.cross_entropy(logits, shift_labels, ignore_index=ignore_index, reduction=reduction)
    loss = loss.to(torch.promote_types(loss.dtype, torch.float32))
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss


# Causal LMs whose forward applies nothing between the LM head and the loss (no logit scaling or
# softcapping): the head's input can go to linear_cross_entropy in its place.
LINEAR_LOSS_MODEL_TYPES = ("llama", "mistral", "qwen2", "gpt2")


def use_linear_cross_entropy(model):
    """Make ``model(input_ids, labels=labels)`` in training compute its loss with
    ``fused_softmax.linear_cross_entropy`` from the LM head's input, so the full logits are never
    built (the output's ``logits`` is None then). In eval mode, or without labels, the model runs
    as before. For the model types in ``LINEAR_LOSS_MODEL_TYPES``; returns ``model``."""
    if model.config.model_type not in LINEAR_LOSS_MODEL_TYPES:
        raise NotImplementedError(
            f"use_linear_cross_entropy: {model.config.model_type!r} models are not among {LINEAR_LOSS_MODEL_TYPES}"
        )
    head, original = model.get_output_embeddings(), model.forward

    def loss_from_hidden_states(logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100, **kwargs):
        shift_labels = kwargs.get("shift_labels")
        if shift_labels is None:
            shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        reduction = "sum" if num_items_in_batch is not None else "mean"
        loss = fused_softmax.linear_cross_entropy(
            logits,
            head.weight,
            shift_labels.to(logits.device),
            head.bias,
            ignore_index=ignore_index,
            reduction=reduction,
        )
        loss = loss.to(torch.promote_types(loss.dtype, torch.float32))
        if num_items_in_batch is not None:
            if torch.is_tensor(num_items_in_batch):
                num_items_in_batch = num_items_in_batch.to(loss.device)
            loss = loss / num_items_in_batch
        return loss

    @functools.wraps(original)
    def forward(*args, labels=None, **kwargs):
        if labels is None or not model.training:
            return original(*args, labels=labels, **kwargs)
        own_loss = model.__dict__.get("_loss_function")
        head.forward, model.loss_function = (lambda hidden: hidden), loss_from_hidden_states
        try:
            output = original(*args, labels=labels, **kwargs)
        finally:
            del head.forward
            if own_loss is None:
                del model._loss_function
            else:
                model.loss_function = own_loss
        output.logits = None
        return output

    model.forward = forward
    return model
