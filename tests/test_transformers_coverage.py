"""Which transformers models attn_implementation="fused_softmax" serves: the ones whose attention
dispatches through AttentionInterface run it, the others are refused where they are built or
switched, and no causal model that builds sees the future.
"""

import inspect
import warnings

import pytest
import torch
import transformers
from transformers import CONFIG_MAPPING, AutoModelForCausalLM
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

import fused_softmax
from fused_softmax.integrations.transformers import NAME, register

register()

# Models that compute attention themselves (GPT-Neo with its own lookup table of implementations,
# which has no entry for ours), and BigBirdPegasus, whose decoder dispatches through the interface
# but calls its self-attention non-causal: vetted for neither SDPA nor flash. (Falcon dispatches
# through the interface since transformers 5.25, and is served there.)
UNSERVED = [
    "bloom",
    "xglm",
    "gpt_neox_japanese",
    "megatron-bert",
    "roformer",
    "mpt",
    "gpt_neo",
    "bigbird_pegasus",
]
REFUSAL = f"does not support an attention implementation through {NAME} yet"

# Tiny versions of any architecture, from the attribute names most configs share; the ones these
# do not fit are skipped, as are those whose defaults still make them large.
TINY = dict(
    vocab_size=64,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=8,
    max_position_embeddings=64,
    n_positions=64,
    d_model=16,
    encoder_layers=1,
    decoder_layers=1,
    encoder_attention_heads=2,
    decoder_attention_heads=2,
    encoder_ffn_dim=32,
    decoder_ffn_dim=32,
    rotary_dim=4,
    is_decoder=True,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
MAX_PARAMETERS = 3_000_000
# MoE layers reorder tokens by expert: eager's earlier logits move by ~1e-8 too. The leak moved them by 5e-3.
MOVED = 1e-6


@pytest.mark.parametrize("model_type", UNSERVED)
def test_models_outside_the_interface_are_refused_when_built(model_type):
    with torch.device("meta"), pytest.raises(ValueError, match=REFUSAL):  # meta: a default config is GBs
        AutoModelForCausalLM.from_config(CONFIG_MAPPING[model_type](), attn_implementation=NAME)


@pytest.mark.parametrize("model_type", UNSERVED)
def test_models_outside_the_interface_are_refused_when_switched(model_type):
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(CONFIG_MAPPING[model_type](), attn_implementation="eager")
    with pytest.raises(ValueError, match=REFUSAL):
        model.set_attn_implementation(NAME)
    assert model.config._attn_implementation == "eager"


def test_models_outside_the_interface_are_refused_when_loaded(tmp_path):
    AutoModelForCausalLM.from_config(CONFIG_MAPPING["bloom"](**TINY)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=REFUSAL):
        AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=NAME)


def tiny_model(model_type, attn_implementation):
    """The tiny random model of ``model_type`` (seeded), in eval mode; skips the test where no
    tiny model can be built from TINY."""
    try:
        config = tiny_config(model_type)
        with torch.device("meta"):
            size = sum(
                p.numel() for p in AutoModelForCausalLM.from_config(config, attn_implementation="eager").parameters()
            )
    except Exception as error:  # configs validate their arguments each in their own way
        pytest.skip(f"no tiny {model_type} from {sorted(TINY)}: {type(error).__name__}")
    if size > MAX_PARAMETERS:
        pytest.skip(f"the tiny {model_type} still has {size:,} parameters")
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(model_type), attn_implementation=attn_implementation)


def tiny_config(model_type):
    """``model_type``'s config from TINY, less the sizes it derives itself (a read-only property,
    such as Falcon's head_dim)."""
    config_class = CONFIG_MAPPING[model_type]
    return config_class(**{name: value for name, value in TINY.items() if not _read_only(config_class, name)})


def _read_only(cls, name):
    attribute = inspect.getattr_static(cls, name, None)
    return isinstance(attribute, property) and attribute.fset is None


def earlier_logits_moved(model, ids):
    """How far the logits before the last position move when only the last token changes."""
    moved = ids.clone()
    moved[:, -1] = (ids[:, -1] + 1) % TINY["vocab_size"]
    with torch.no_grad():
        return (model(ids).logits[:, :-1] - model(moved).logits[:, :-1]).abs().max().item()


@pytest.mark.parametrize("model_type", sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES))
def test_no_causal_model_sees_the_future(model_type, monkeypatch):
    """Every causal LM of transformers, tiny, on the eager fallback, built under eager attention
    and switched to ours: refused, or its earlier logits untouched by the last token wherever
    eager's are, with the fused attention run."""
    ids = torch.randint(3, TINY["vocab_size"], (1, 6), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model = tiny_model(model_type, "eager").eval()
            eager_moved = earlier_logits_moved(model, ids)
        except pytest.skip.Exception:
            raise
        except Exception as error:
            pytest.skip(f"the tiny {model_type} does not run: {type(error).__name__}: {error}")
        if eager_moved > MOVED:
            pytest.skip(f"the tiny {model_type} is not causal (moved by {eager_moved:.1e})")
        try:
            model.set_attn_implementation(NAME)
        except ValueError as error:
            assert REFUSAL in str(error)
            return
        calls = []
        attention = fused_softmax.attention
        monkeypatch.setattr(fused_softmax, "attention", lambda *args, **kw: calls.append(1) or attention(*args, **kw))
        try:
            moved = earlier_logits_moved(model, ids)
        except NotImplementedError as error:  # a feature the fused path lacks, refused when met
            assert NAME in str(error)
            return
    assert moved <= MOVED, f"changing the last token moved earlier logits by {moved:.1e}"
    if not calls:
        assert not any("Attention" in type(module).__name__ for module in model.modules()), "no attention ran"


def test_transformers_version_has_the_checks_register_wraps():
    assert callable(transformers.PreTrainedModel.get_correct_attn_implementation)
    assert transformers.PreTrainedModel.set_attn_implementation.refuses_unserved_models


# An attention layer as Doge's was before transformers 5.25: it derives the mask it dispatches
# from the causal mask transformers gives it, which may be None for "causal".
_DERIVING_LAYER = """
class ToyAttention(nn.Module):
    def forward(self, hidden_states, attention_mask=None, **kwargs):
        attn_mask = self.prepare_dynamic_mask(
            hidden_states,
            attention_mask=attention_mask,
        )
        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager)
        attn_output, attn_weights = attention_interface(self, q, k, v, attention_mask=attn_mask, scaling=1.0)
        return attn_output
"""


@pytest.mark.parametrize(
    "change, refused",
    [
        (lambda source: source, True),
        (lambda source: source + "\nmask = create_causal_mask(config=c, allow_is_causal_skip=False)\n", False),
        (lambda source: source.replace("**kwargs):", "**kwargs):\n        self.is_causal = False"), False),
        (lambda source: source.replace("attention_mask=attn_mask", "attention_mask=attention_mask"), False),
        (lambda source: source.replace("attention_mask=attention_mask,\n", "dt_states,\n"), False),
    ],
    ids=["derived from the causal mask", "mask always built", "not causal", "passed through", "not derived"],
)
def test_a_layer_deriving_its_mask_from_a_skippable_causal_mask_is_refused(change, refused):
    """The source check that refuses Doge under transformers before 5.25 (its tiny model saw the
    future under our attention, and under SDPA): only a causal layer that dispatches a mask derived
    from transformers' causal mask, in a model that lets that mask be None."""
    from fused_softmax.integrations.transformers import _derives_a_skippable_causal_mask

    assert _derives_a_skippable_causal_mask(change(_DERIVING_LAYER)) is refused
