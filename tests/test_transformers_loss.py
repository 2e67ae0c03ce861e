"""The fused causal-LM losses in transformers: tiny random Llama and GPT-2 models trained one step
with ``labels=``, against transformers' own loss on the same weights, on both backends: the loss
and every parameter gradient, with and without transformers' ``num_items_in_batch``; the
cross-entropy kernel on the logits, and linear_cross_entropy on the LM head's input."""

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM
from transformers.loss.loss_utils import LOSS_MAPPING

from fused_softmax.integrations.transformers import fused_causal_lm_loss, register, use_linear_cross_entropy

VOCAB, BATCH, LENGTH = 100, 2, 10
CONFIGS = {
    "llama": lambda **kw: transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, **kw
    ),
    "gpt2": lambda **kw: transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32, bos_token_id=0, eos_token_id=0, **kw
    ),
}


def loss_and_grads(model, ids, labels, **kwargs):
    model.zero_grad()
    loss = model(ids, labels=labels, **kwargs).loss
    loss.backward()
    return loss, {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("items", [None, 7], ids=["mean", "num_items_in_batch"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_loss_and_gradients_match_transformers(backend, name, items):
    torch.manual_seed(0)
    eager = AutoModelForCausalLM.from_config(CONFIGS[name](), attn_implementation="eager")
    fused = AutoModelForCausalLM.from_config(CONFIGS[name](), attn_implementation="eager")
    fused.load_state_dict(eager.state_dict())
    eager.eval()  # GPT-2's dropout off: the same function in both models
    fused.eval()
    fused.loss_function = fused_causal_lm_loss
    ids = torch.randint(VOCAB, (BATCH, LENGTH), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :3] = -100  # a prompt left out of the loss
    kwargs = {} if items is None else dict(num_items_in_batch=torch.tensor(items))
    expected_loss, expected_grads = loss_and_grads(eager, ids, labels, **kwargs)
    loss, grads = loss_and_grads(fused, ids, labels, **kwargs)
    torch.testing.assert_close(loss, expected_loss)
    torch.testing.assert_close(grads, expected_grads, rtol=1.3e-6, atol=1e-6)


def test_register_switches_the_causal_lm_loss():
    original = LOSS_MAPPING["ForCausalLM"]
    try:
        register()
        assert LOSS_MAPPING["ForCausalLM"] is original
        register(causal_lm_loss=True)
        register(causal_lm_loss=True)
        assert LOSS_MAPPING["ForCausalLM"] is fused_causal_lm_loss
        model = AutoModelForCausalLM.from_config(CONFIGS["llama"]())
        assert model.loss_function is fused_causal_lm_loss
    finally:
        LOSS_MAPPING["ForCausalLM"] = original


@pytest.mark.parametrize("items", [None, 7], ids=["mean", "num_items_in_batch"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_linear_cross_entropy_from_the_hidden_states(backend, name, items):
    """Training mode (dropout off in the configs): the loss and gradients of transformers' own,
    and no logits; eval mode and calls without labels untouched."""
    torch.manual_seed(0)
    config = dict(attention_dropout=0.0) if name == "llama" else dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    eager = AutoModelForCausalLM.from_config(CONFIGS[name](**config), attn_implementation="eager")
    fused = AutoModelForCausalLM.from_config(CONFIGS[name](**config), attn_implementation="eager")
    fused.load_state_dict(eager.state_dict())
    assert use_linear_cross_entropy(fused) is fused
    eager.train()
    fused.train()
    ids = torch.randint(VOCAB, (BATCH, LENGTH), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[1, :4] = -100
    kwargs = {} if items is None else dict(num_items_in_batch=torch.tensor(items))
    expected_loss, expected_grads = loss_and_grads(eager, ids, labels, **kwargs)
    loss, grads = loss_and_grads(fused, ids, labels, **kwargs)
    torch.testing.assert_close(loss, expected_loss)
    torch.testing.assert_close(grads, expected_grads, rtol=1.3e-6, atol=1e-6)
    assert fused(ids, labels=labels).logits is None
    assert fused.get_output_embeddings().forward.__func__ is torch.nn.Linear.forward  # the head restored
    fused.eval()
    torch.testing.assert_close(fused(ids, labels=labels).logits, eager.eval()(ids, labels=labels).logits)


def test_linear_cross_entropy_refuses_models_it_does_not_know():
    model = AutoModelForCausalLM.from_config(
        transformers.Gemma2Config(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=4,
            head_dim=8,
        )
    )
    with pytest.raises(NotImplementedError, match="gemma2"):
        use_linear_cross_entropy(model)
