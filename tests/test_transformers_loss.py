"""The fused causal-LM loss in transformers: tiny random Llama and GPT-2 models trained one step
with ``labels=``, against transformers' own loss on the same weights, on both backends: the loss
and every parameter gradient, with and without transformers' ``num_items_in_batch``."""

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM
from transformers.loss.loss_utils import LOSS_MAPPING

from fused_softmax.integrations.transformers import fused_causal_lm_loss, register

VOCAB, BATCH, LENGTH = 100, 2, 10
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    ),
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32, bos_token_id=0, eos_token_id=0
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
