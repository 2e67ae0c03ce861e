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

Models whose attention layers compute attention themselves never call the interface: given the
name, they would run their own attention under it, on masks built by our mask function that
they misread (None for "causal", bool masks added as 0/1). ``register`` therefore makes
transformers refuse them where it checks an attention implementation (a model's construction,
``from_pretrained``, ``set_attn_implementation``), with a ValueError like the one for SDPA.
"""

import functools
import inspect
import re
import sys

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import fused_softmax

NAME = "fused_softmax"

# Keyword arguments some models pass that change the math: the fused path does not implement them.
UNSUPPORTED = {"cache": "paged KV caches (continuous batching)"}


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
    # T5's learned relative position bias [1, H, Lq, Lk] is read beside the mask, never expanded.
    output = fused_softmax.attention(
        query,
        key,
        value,
        attn_mask=attention_mask,
        dropout_p=dropout if module.training else 0.0,
        is_causal=causal,
        scale=scaling,
        enable_gqa=True,
        softcap=kwargs.get("softcap"),
        sinks=kwargs.get("s_aux"),
        bias=kwargs.get("position_bias"),
    )
    return output.transpose(1, 2).contiguous(), None


# transformers' own test of whether a model file's attention can be switched: it defines an
# attention layer and looks its implementation up in ALL_ATTENTION_FUNCTIONS (``[name]`` before 5.0).
_ATTENTION_LAYER = re.compile(r"^class \w*Attention\w*\(nn\.Module\):", re.MULTILINE)
_INTERFACE_LOOKUP = re.compile(r"ALL_ATTENTION_FUNCTIONS(\.get_interface\(|\[)")
# The name of the mask an attention layer hands the interface; a layer not causal; a model that
# makes transformers build its causal mask even where None would mean "causal".
_DISPATCHED_MASK = re.compile(r"attention_interface\((?:[^()]|\([^()]*\))*?attention_mask\s*=\s*(\w+)", re.DOTALL)
_NOT_CAUSAL = re.compile(r"self\.is_causal\s*=\s*False")
_CAUSAL_MASK_BUILT = re.compile(r"""["']?allow_is_causal_skip["']?\s*[=:]\s*False""")


def _statements_assigning(source, name):
    """Each statement of ``source`` that assigns ``name``: its first line and the lines under it."""
    for start in re.finditer(rf"^([ \t]*){name}\s*=[^=]", source, re.MULTILINE):
        first, *rest = source[start.start() :].split("\n")
        statement = [first]
        for line in rest:
            if len(line) - len(line.lstrip()) <= len(start.group(1)) and line.strip() != ")":
                break
            statement.append(line)
        yield "\n".join(statement)


def _derives_a_skippable_causal_mask(source):
    """Whether causal attention layers dispatch a mask they derive from the one transformers gives
    them, where transformers may give None for "causal" (SDPA's convention, our mask function's):
    the derived mask then lacks causality and the model sees the future (Doge before
    transformers 5.25, which since builds its mask with allow_is_causal_skip=False)."""
    if _NOT_CAUSAL.search(source) or _CAUSAL_MASK_BUILT.search(source):
        return False
    derived = set(_DISPATCHED_MASK.findall(source)) - {"attention_mask", "causal_mask", "None"}
    return any("attention_mask" in statement for name in derived for statement in _statements_assigning(source, name))


@functools.cache
def unserved_reason(model_class):
    """Why ``model_class`` cannot run ``NAME``, or None. A model file without an attention layer
    of its own (a composite model) is served: its parts are models of their own, checked when
    they are built. One whose layers compute attention themselves is not; nor is one that
    supports neither SDPA nor flash attention: their convention, which ours follows, is that no
    mask means "causal" when the layer's ``is_causal`` says so, and a model vetted for neither
    may say otherwise (BigBirdPegasus's decoder does, and would see the future)."""
    try:
        source = inspect.getsource(sys.modules[model_class.__module__])
    except (KeyError, OSError, TypeError):
        return "its source cannot be read to check how its attention layers dispatch"
    if not _ATTENTION_LAYER.search(source):
        return None
    if not _INTERFACE_LOOKUP.search(source):
        return "its attention layers do not dispatch through transformers' AttentionInterface, so they would ignore it"
    if not (model_class._supports_sdpa or model_class._supports_flash_attn):
        return "it supports neither SDPA nor flash attention, whose mask conventions it relies on"
    if _derives_a_skippable_causal_mask(source):
        return (
            "its causal attention layers derive the mask they dispatch from transformers' causal mask, which this "
            "transformers version lets be None for 'causal', so the derived mask would let tokens see the future"
        )
    return None


def check_model_class(model_class):
    """Raise the ValueError transformers gives for SDPA when ``model_class`` cannot be served."""
    reason = unserved_reason(model_class)
    if reason is not None:
        raise ValueError(
            f"{model_class.__name__} does not support an attention implementation through {NAME} yet: {reason}. "
            'Load the model with attn_implementation="eager" (or "sdpa" where the model supports it).'
        )


def _install_refusals():
    """Wrap the two places transformers checks a requested implementation so that ``NAME`` is
    refused for a model that would not run it: ``get_correct_attn_implementation``, which every
    check ends in (a model's construction, ``from_pretrained``, the parts of a switched model),
    and ``set_attn_implementation``, which only warns and keeps the old implementation of a
    model it cannot switch, and could switch some parts of a composite model but not others."""
    get_correct_attn_implementation = PreTrainedModel.get_correct_attn_implementation
    set_attn_implementation = PreTrainedModel.set_attn_implementation

    @functools.wraps(get_correct_attn_implementation)
    def checked_get_correct_attn_implementation(self, requested_attention, *args, **kwargs):
        implementation = get_correct_attn_implementation(self, requested_attention, *args, **kwargs)
        if implementation == NAME:
            check_model_class(type(self))
        return implementation

    @functools.wraps(set_attn_implementation)
    def checked_set_attn_implementation(self, attn_implementation, *args, **kwargs):
        if attn_implementation == NAME:
            for module in self.modules():
                if isinstance(module, PreTrainedModel):
                    check_model_class(type(module))
        return set_attn_implementation(self, attn_implementation, *args, **kwargs)

    checked_set_attn_implementation.refuses_unserved_models = True
    PreTrainedModel.get_correct_attn_implementation = checked_get_correct_attn_implementation
    PreTrainedModel.set_attn_implementation = checked_set_attn_implementation


def register(causal_lm_loss=False):
    """Makes ``attn_implementation="fused_softmax"`` available to every transformers model that
    routes attention through ``AttentionInterface``, and refused by the others; with
    ``causal_lm_loss``, also makes ``fused_causal_lm_loss`` the loss of every causal LM. Calling
    it again changes nothing."""
    AttentionInterface.register(NAME, fused_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    if not getattr(PreTrainedModel.set_attn_implementation, "refuses_unserved_models", False):
        _install_refusals()
    if causal_lm_loss:
        from transformers.loss.loss_utils import LOSS_MAPPING

        LOSS_MAPPING["ForCausalLM"] = fused_causal_lm_loss


def fused_causal_lm_loss(
    logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100, shift_labels=None, **kwargs
):
    """transformers' ``ForCausalLMLoss`` on ``fused_softmax.cross_entropy``. The logits keep their
    dtype (the kernel's math is fp32; transformers' copies them to fp32 first). The loss comes
    back in fp32 at least, as transformers', but its value is the kernel's rounded to the logits'
    dtype, as F.cross_entropy's of such logits is: in bf16 within 2^-9 relative of transformers'.
    The gradient is the kernel's fp32 one, rounded once to the logits' dtype, as transformers'."""
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
