"""The transformers integration: tiny, randomly initialised models built with
attn_implementation="fused_softmax" against the same weights under "eager", on both backends.

Rows of queries that see no key (the positions before the first real token of a left-padded
sequence) are left out of every comparison: eager attends uniformly to all keys there, SDPA and
fused_softmax give zeros, and no real token reads them. Losses are taken over the other rows only,
so the parameter gradients must match everywhere.
"""

import re

import pytest
import torch
import torch.nn.functional as F
import transformers
from transformers import AttentionInterface, AutoModelForCausalLM, AutoModelForSeq2SeqLM
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import fused_softmax
from fused_softmax.integrations.transformers import NAME, UNSUPPORTED, fused_attention_forward, register

register()

VOCAB, BATCH, LENGTH = 100, 2, 10
LLAMA = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
# Each call builds a fresh config: from_config shares it with the model and sets the attention
# implementation on it, so one config object cannot serve two models.
CONFIGS = {
    "llama": lambda **kw: transformers.LlamaConfig(**LLAMA, num_key_value_heads=4, **kw),
    "llama-gqa": lambda **kw: transformers.LlamaConfig(**LLAMA, num_key_value_heads=2, **kw),
    "mistral-sliding-window": lambda **kw: transformers.MistralConfig(
        **LLAMA, num_key_value_heads=2, sliding_window=4, **kw
    ),
    "gpt2": lambda **kw: transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32, bos_token_id=0, eos_token_id=0, **kw
    ),
    # Logit softcapping (50, as every Gemma 2 checkpoint), a sliding window on the first layer.
    "gemma2-softcap": lambda **kw: transformers.Gemma2Config(
        **LLAMA, num_key_value_heads=2, head_dim=8, attn_logit_softcapping=50.0, sliding_window=4, **kw
    ),
    # Attention sinks, a sliding window on the first layer, a mixture of experts.
    "gpt-oss-sinks": lambda **kw: transformers.GptOssConfig(
        **LLAMA, num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2, sliding_window=4, **kw
    ),
}
# Measured through two layers: logits and gradients within 1e-7 of eager's in fp32, 1e-15 in fp64.
TOLERANCES = {torch.float32: dict(rtol=1.3e-6, atol=1e-6), torch.float64: dict(rtol=1e-12, atol=1e-12)}


def twin_models(name, dtype=torch.float32, **config):
    """The model under eager attention and under ours, with the same weights, in eval mode."""
    torch.manual_seed(0)
    eager = AutoModelForCausalLM.from_config(CONFIGS[name](**config), attn_implementation="eager").to(dtype)
    fused = AutoModelForCausalLM.from_config(CONFIGS[name](**config), attn_implementation=NAME).to(dtype)
    fused.load_state_dict(eager.state_dict())
    return eager.eval(), fused.eval()


def batch(padding):
    """Token ids, the 2-D attention mask (None without padding) and the rows where some key is visible."""
    ids = torch.randint(VOCAB, (BATCH, LENGTH), generator=torch.Generator().manual_seed(1))
    if padding is None:
        return ids, None, torch.ones(BATCH, LENGTH, dtype=torch.bool)
    mask = torch.ones(BATCH, LENGTH, dtype=torch.long)
    if padding == "left":
        mask[0, :3] = 0
    else:
        mask[0, -3:] = 0
    return ids, mask, mask.cumsum(-1) > 0


def logits_and_grads(model, ids, mask, visible):
    model.zero_grad()
    logits = model(ids, attention_mask=mask).logits
    targets = torch.arange(ids.numel()).view_as(ids) % VOCAB
    F.cross_entropy(logits[visible], targets[visible]).backward()
    return logits[visible], {name: p.grad for name, p in model.named_parameters()}


def assert_match(eager, fused, ids, mask, visible, dtype=torch.float32):
    eager_logits, eager_grads = logits_and_grads(eager, ids, mask, visible)
    fused_logits, fused_grads = logits_and_grads(fused, ids, mask, visible)
    torch.testing.assert_close(fused_logits, eager_logits, **TOLERANCES[dtype])
    torch.testing.assert_close(fused_grads, eager_grads, **TOLERANCES[dtype])


# No padding: the causal flag, no mask tensor. Left padding: rows that see no key. Right padding: a
# bool mask. Plain multi-head attention is GPT-2's; the sliding window always comes as a mask.
@pytest.mark.parametrize("padding", [None, "left", "right"])
@pytest.mark.parametrize("name", ["llama-gqa", "mistral-sliding-window", "gpt2", "gemma2-softcap", "gpt-oss-sinks"])
def test_logits_and_gradients_match_eager(name, padding, backend, monkeypatch):
    calls = counting_attention(monkeypatch)
    assert_match(*twin_models(name), *batch(padding))
    assert len(calls) == 2, "one call per layer"


def test_float64_matches_eager(backend):
    """GPT-2's eager softmax keeps the input dtype; Llama's rounds to fp32, so it cannot serve here."""
    assert_match(*twin_models("gpt2", torch.float64), *batch("left"), dtype=torch.float64)


@pytest.mark.parametrize("padding", [None, "left"])
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_decoding_with_a_cache_matches_eager(cache, padding, backend):
    """Prefill, then one query that sees every cached key (no mask) or the non-padded ones. At
    prefill the top-left causal diagonal hides a static cache's unfilled slots."""
    ids, mask, visible = batch(padding)
    next_ids = torch.tensor([[7], [8]])
    step_mask = None if mask is None else F.pad(mask, (0, 1), value=1)
    logits = []
    for model in twin_models("llama-gqa"):
        if cache == "static":  # transformers 4.x needs max_batch_size; 5.x ignores it
            past = transformers.StaticCache(config=model.config, max_batch_size=BATCH, max_cache_len=2 * LENGTH)
        else:
            past = transformers.DynamicCache()
        prefill = model(ids, attention_mask=mask, past_key_values=past).logits[visible]
        logits.append((prefill, model(next_ids, attention_mask=step_mask, past_key_values=past).logits))
    torch.testing.assert_close(logits[1], logits[0], **TOLERANCES[torch.float32])


@pytest.mark.parametrize("name", ["gemma2-softcap", "gpt-oss-sinks"])
def test_greedy_generation_matches_eager(name, backend):
    """Left-padded prompts, then decoding with a cache: softcapped or sunk scores at every step."""
    ids, mask, _ = batch("left")
    eager, fused = twin_models(name)
    generated = [
        model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False) for model in (eager, fused)
    ]
    assert torch.equal(generated[1], generated[0])


def test_attention_dropout_only_in_training(backend):
    eager, fused = twin_models("llama", attention_dropout=0.5)
    ids, _, _ = batch(None)
    with torch.no_grad():
        eval_logits = fused(ids).logits
        torch.testing.assert_close(eval_logits, eager(ids).logits, **TOLERANCES[torch.float32])
        eager.train()
        fused.train()
        torch.manual_seed(2)
        eager_logits = eager(ids).logits
        torch.manual_seed(2)
        fused_logits = fused(ids).logits
    assert not torch.allclose(fused_logits, eval_logits)
    # The same RNG draws on probabilities of the same shape: the same units dropped as eager's.
    torch.testing.assert_close(fused_logits, eager_logits, **TOLERANCES[torch.float32])


T5 = dict(
    vocab_size=VOCAB,
    d_model=32,
    d_kv=8,
    d_ff=64,
    num_layers=2,
    num_decoder_layers=2,
    num_heads=4,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=16,
    decoder_start_token_id=0,
    pad_token_id=0,
    eos_token_id=1,
)


def twin_t5():
    """A tiny T5 (encoder-decoder: relative position bias in the self-attention of both stacks, a
    zero bias in the cross-attention) under eager attention and under ours, in eval mode."""
    torch.manual_seed(0)
    eager = AutoModelForSeq2SeqLM.from_config(transformers.T5Config(**T5), attn_implementation="eager")
    fused = AutoModelForSeq2SeqLM.from_config(transformers.T5Config(**T5), attn_implementation=NAME)
    fused.load_state_dict(eager.state_dict())
    return eager.eval(), fused.eval()


def counting_attention(monkeypatch):
    """Calls of fused_softmax.attention from here on, one list entry each."""
    calls = []
    attention = fused_softmax.attention
    monkeypatch.setattr(fused_softmax, "attention", lambda *args, **kw: calls.append(1) or attention(*args, **kw))
    return calls


# Every encoder row sees some key, whatever the padding: no row to leave out.
@pytest.mark.parametrize("padding", [None, "left", "right"])
def test_t5_matches_eager(padding, backend, monkeypatch):
    ids, mask, _ = batch(padding)
    decoder_ids = ids.flip(-1)[:, :6]
    calls = counting_attention(monkeypatch)
    results = []
    for model in twin_t5():
        model.zero_grad()
        logits = model(ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
        F.cross_entropy(logits.flatten(0, 1), decoder_ids.flatten()).backward()
        results.append((logits, {name: p.grad for name, p in model.named_parameters()}))
    assert len(calls) == 6, "two encoder layers, two decoder layers with self- and cross-attention"
    torch.testing.assert_close(results[1], results[0], **TOLERANCES[torch.float32])
    assert results[1][1]["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].abs().sum() > 0


def test_t5_greedy_generation_matches_eager(backend):
    ids, mask, _ = batch("left")
    eager, fused = twin_t5()
    generated = [
        model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False) for model in (eager, fused)
    ]
    assert torch.equal(generated[1], generated[0])


@pytest.mark.parametrize("feature", UNSUPPORTED)
def test_unsupported_features_raise(feature):
    query = torch.randn(1, 2, 3, 4)
    with pytest.raises(NotImplementedError, match=re.escape(UNSUPPORTED[feature])):
        fused_attention_forward(torch.nn.Module(), query, query, query, None, **{feature: 1.0})


def test_attention_weights_are_not_returned():
    query = torch.randn(1, 2, 3, 4)
    output, weights = fused_attention_forward(torch.nn.Module(), query, query, query, None)
    assert output.shape == (1, 3, 2, 4) and output.is_contiguous() and weights is None
    with pytest.raises(NotImplementedError, match="attention weights"):
        fused_attention_forward(torch.nn.Module(), query, query, query, None, output_attentions=True)


def test_register_is_idempotent():
    register()
    register()
    assert AttentionInterface()[NAME] is fused_attention_forward
    assert AttentionMaskInterface()[NAME] is sdpa_mask
