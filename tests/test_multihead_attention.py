"""MultiheadAttention against torch.nn.MultiheadAttention with the same state dict: outputs,
returned weights and the gradients of inputs, float masks and every parameter."""

import pytest
import torch
from support import random

from fused_softmax import multihead_attention
from fused_softmax.multihead_attention import MultiheadAttention

EMBED, HEADS, BATCH, N_QUERIES, N_KEYS = 8, 2, 2, 5, 4  # L != S, so a transposed mask or score shows
INF = float("inf")


def modules(device, dtype=torch.float64, **options):
    """torch's module with random parameters (biases too: torch starts them at zero) and ours loaded from it."""
    torch.manual_seed(0)
    reference = torch.nn.MultiheadAttention(EMBED, HEADS, device=device, dtype=dtype, **options)
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.uniform_(-1.0, 1.0)
    ours = MultiheadAttention(EMBED, HEADS, device=device, dtype=dtype, **options)
    ours.load_state_dict(reference.state_dict())
    return reference, ours


def sequences(device, dtype=torch.float64, options=None, *, batched=True):
    """query, key, value of distinct random values, laid out as a module with ``options`` expects."""
    options = options or {}

    def layout(length, features, seed):
        if not batched:
            return random((length, features), dtype, device=device, seed=seed, scale=1.0)
        shape = (BATCH, length, features) if options.get("batch_first") else (length, BATCH, features)
        return random(shape, dtype, device=device, seed=seed, scale=1.0)

    kdim, vdim = options.get("kdim", EMBED), options.get("vdim", EMBED)
    return layout(N_QUERIES, EMBED, 1), layout(N_KEYS, kdim, 2), layout(N_KEYS, vdim, 3)


def key_padding_mask(kind, device, dtype=torch.float64):
    """[B, S], True = padding: batch 0 unpadded, batch 1 with its last two keys padded. Float: random
    additive values, -inf on the padding."""
    padded = torch.tensor([[False] * N_KEYS, [False] * (N_KEYS - 2) + [True] * 2], device=device)
    if kind == "bool":
        return padded
    additive = torch.rand(padded.shape, generator=torch.Generator().manual_seed(4), dtype=dtype).to(device) * -2
    return additive.masked_fill(padded, -INF)


def attn_mask(kind, device, dtype=torch.float64, *, dims=2, heads_and_batch=HEADS * BATCH):
    """[L, S] or [B * heads, L, S], True = hidden, different per head and batch; key 0 is never
    hidden, so no row is fully masked. Float: random additive values, -inf where hidden."""
    shape = (N_QUERIES, N_KEYS) if dims == 2 else (heads_and_batch, N_QUERIES, N_KEYS)
    generator = torch.Generator().manual_seed(5)
    hidden = torch.rand(shape, generator=generator) < 0.4
    hidden[..., 0] = False
    if kind == "bool":
        return hidden.to(device)
    return torch.randn(shape, generator=generator, dtype=dtype).masked_fill(hidden, -INF).to(device)


def causal_mask(device):
    """SDPA's is_causal (top left) in MHA's terms: True above the diagonal."""
    return torch.ones(N_QUERIES, N_KEYS, dtype=torch.bool, device=device).triu(1)


def run(module, seed=6, weights_in_loss=True, **arguments):
    """Forward and backward with a random upstream gradient for the output and (unless told not
    to) the weights.

    Floating-point tensors are cloned into fresh leaves (one per distinct tensor, so self-attention
    stays query is key is value). Returns output, weights and the gradients by name."""
    leaves = {}

    def leaf(x):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            return x
        return leaves.setdefault(id(x), x.detach().clone().requires_grad_())

    arguments = {name: leaf(x) for name, x in arguments.items()}
    output, weights = module(**arguments)
    generator = torch.Generator().manual_seed(seed)

    def weighted_sum(x):
        return (x * torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)).sum()

    loss = weighted_sum(output)
    if weights is not None and weights_in_loss:
        loss = loss + weighted_sum(weights)
    loss.backward()
    grads = {name: x.grad for name, x in arguments.items() if isinstance(x, torch.Tensor) and x.requires_grad}
    grads.update((name, parameter.grad) for name, parameter in module.named_parameters())
    return output, weights, grads


def assert_matches(actual, expected):
    (output, weights, grads), (expected_output, expected_weights, expected_grads) = actual, expected
    torch.testing.assert_close(output, expected_output)
    if expected_weights is None:
        assert weights is None
    else:
        torch.testing.assert_close(weights, expected_weights)
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        assert grad is not None, name
        torch.testing.assert_close(
            grad, expected_grads[name], msg=lambda message, name=name: f"gradient of {name}: {message}"
        )


def compare(device, dtype=torch.float64, options=None, **arguments):
    reference, ours = modules(device, dtype, **(options or {}))
    assert_matches(run(ours, **arguments), run(reference, **arguments))


def test_is_a_torch_module_with_its_state_dict(device):
    reference, ours = modules(device, kdim=6, vdim=3, add_bias_kv=True)
    assert isinstance(ours, torch.nn.MultiheadAttention)
    assert ours.state_dict().keys() == reference.state_dict().keys()
    for name, tensor in reference.state_dict().items():
        assert torch.equal(ours.state_dict()[name], tensor), name


OPTIONS = {
    "seq_first": {},
    "batch_first": {"batch_first": True},
    "kdim_vdim": {"kdim": 6, "vdim": 3},
    "no_bias": {"bias": False},
    "add_bias_kv": {"add_bias_kv": True},
    "add_zero_attn": {"add_zero_attn": True},
    "all": {"batch_first": True, "kdim": 6, "vdim": 3, "add_bias_kv": True, "add_zero_attn": True},
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_options_match_torch(backend, device, options, dtype):
    query, key, value = sequences(device, dtype, options)
    compare(device, dtype, options, query=query, key=key, value=value, average_attn_weights=False)


@pytest.mark.parametrize("batch_first", [False, True])
def test_self_attention_matches_torch(backend, device, batch_first):
    x = random(
        (BATCH, N_QUERIES, EMBED) if batch_first else (N_QUERIES, BATCH, EMBED), torch.float64, device=device, scale=1.0
    )
    compare(device, options={"batch_first": batch_first}, query=x, key=x, value=x)


@pytest.mark.parametrize("options", [{}, {"kdim": 6, "vdim": 3, "add_bias_kv": True}], ids=["plain", "kdim_vdim_kv"])
def test_unbatched_matches_torch(backend, device, options):
    query, key, value = sequences(device, options=options, batched=False)
    compare(
        device,
        options=options,
        query=query,
        key=key,
        value=value,
        average_attn_weights=False,
        key_padding_mask=key_padding_mask("float", device)[1],
        attn_mask=attn_mask("float", device, dims=3, heads_and_batch=HEADS),
    )


MASKS = {
    "padding_bool": ("bool", None, None),
    "padding_float": ("float", None, None),
    "attn_2d_bool": (None, "bool", 2),
    "attn_2d_float": (None, "float", 2),
    "attn_3d_bool": (None, "bool", 3),
    "attn_3d_float": (None, "float", 3),
    "both_bool": ("bool", "bool", 2),
    "both_float_3d": ("float", "float", 3),
    "padding_float_attn_bool": ("float", "bool", 2),
    "padding_bool_attn_float_3d": ("bool", "float", 3),
}


@pytest.mark.filterwarnings("ignore:Support for mismatched")
@pytest.mark.parametrize("options", [{}, {"add_bias_kv": True, "add_zero_attn": True}], ids=["plain", "appended_keys"])
@pytest.mark.parametrize("masks", MASKS.values(), ids=MASKS.keys())
def test_masks_match_torch(backend, device, masks, options):
    """Float masks are leaves too: their gradients must match torch's."""
    padding, attention, dims = masks
    query, key, value = sequences(device)
    compare(
        device,
        options=options,
        query=query,
        key=key,
        value=value,
        average_attn_weights=False,
        key_padding_mask=None if padding is None else key_padding_mask(padding, device),
        attn_mask=None if attention is None else attn_mask(attention, device, dims=dims),
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("need_weights, average", [(True, True), (True, False), (False, True)])
def test_returned_weights_match_torch(backend, device, need_weights, average, dtype):
    query, key, value = sequences(device, dtype)
    compare(
        device,
        dtype,
        query=query,
        key=key,
        value=value,
        need_weights=need_weights,
        average_attn_weights=average,
        key_padding_mask=key_padding_mask("bool", device),
        attn_mask=attn_mask("bool", device),
    )


@pytest.mark.parametrize(
    "mask, padding, need_weights, options",
    [
        ("causal", False, False, {}),  # the hint alone: the kernel's causal diagonal, no mask tensor
        ("causal", False, False, {"add_bias_kv": True}),  # over the appended key too, as SDPA's top-left causal
        ("random", False, False, {}),  # a wrong hint: torch trusts it and drops the mask, so must we
        ("random", False, True, {}),  # weights wanted: torch uses the mask and ignores the hint
        ("random", True, False, {}),  # a padding mask to merge: the same
    ],
    ids=["hint", "hint_appended_keys", "wrong_hint", "need_weights_ignore_hint", "padding_ignores_hint"],
)
def test_is_causal_hint_matches_torch(backend, device, mask, padding, need_weights, options):
    query, key, value = sequences(device)
    compare(
        device,
        options=options,
        query=query,
        key=key,
        value=value,
        is_causal=True,
        need_weights=need_weights,
        attn_mask=causal_mask(device) if mask == "causal" else attn_mask("bool", device),
        key_padding_mask=key_padding_mask("bool", device) if padding else None,
    )


@pytest.mark.parametrize("need_weights", [True, False])
def test_dropout_draws_as_torch(backend, device, need_weights):
    """Same RNG state, same draws: torch drops from the [B * heads, L, S] weights, we from the same
    elements in the same order, so outputs, weights (after dropout) and gradients match."""
    query, key, value = sequences(device)
    reference, ours = modules(device, dropout=0.5)
    arguments = dict(
        query=query,
        key=key,
        value=value,
        need_weights=need_weights,
        average_attn_weights=False,
        key_padding_mask=key_padding_mask("bool", device),
    )
    torch.manual_seed(7)
    expected = run(reference, **arguments)
    torch.manual_seed(7)
    actual = run(ours, **arguments)
    assert_matches(actual, expected)
    if need_weights:
        dropped = (actual[1] == 0) & (key_padding_mask("bool", device)[:, None, None, :] == 0)
        assert dropped.any(), "no weight was dropped: dropout did not run"
    ours.eval()
    reference.eval()
    assert_matches(run(ours, **arguments), run(reference, **arguments))  # eval: no dropout


@pytest.mark.filterwarnings("ignore:Support for mismatched")
@pytest.mark.parametrize("padding_kind", ["bool", "float"])  # float: the bool attn_mask becomes -inf
@pytest.mark.parametrize("need_weights", [True, False])
def test_fully_masked_rows_give_zeros(backend, device, need_weights, padding_kind):
    """Batch 1 hides every key, and query 0 of batch 0 every key too. torch's need_weights=False
    path (SDPA) gives zeros there, as we do, outputs and gradients; its need_weights=True path gives
    NaN in those rows (and in every parameter gradient), so there only the other rows compare."""
    query, key, value = sequences(device)
    padding = torch.tensor([[False] * N_KEYS, [True] * N_KEYS], device=device)
    if padding_kind == "float":
        padding = random((BATCH, N_KEYS), torch.float64, device=device, seed=8, scale=1.0).masked_fill(padding, -INF)
    hidden = torch.zeros(N_QUERIES, N_KEYS, dtype=torch.bool, device=device)
    hidden[0] = True
    arguments = dict(
        query=query, key=key, value=value, key_padding_mask=padding, attn_mask=hidden, average_attn_weights=False
    )
    reference, ours = modules(device)
    output, weights, grads = run(ours, need_weights=need_weights, weights_in_loss=False, **arguments)
    assert_matches((output, None, grads), run(reference, need_weights=False, **arguments))
    masked_rows = torch.zeros(N_QUERIES, BATCH, dtype=torch.bool, device=device)  # [L, B], the output's layout
    masked_rows[:, 1] = True
    masked_rows[0] = True
    torch.testing.assert_close(output[masked_rows], ours.out_proj.bias.detach().expand(int(masked_rows.sum()), -1))
    if need_weights:
        expected_output, expected_weights, _ = run(reference, need_weights=True, **arguments)
        assert expected_output[masked_rows].isnan().all()
        torch.testing.assert_close(output[~masked_rows], expected_output[~masked_rows])
        weights_masked = masked_rows.t()[:, None, :, None].expand_as(weights)  # [B, heads, L, S]
        assert (weights[weights_masked] == 0).all()
        torch.testing.assert_close(weights[~weights_masked], expected_weights[~weights_masked])


@pytest.fixture
def softmax_calls(monkeypatch):
    """The (mask, causal) of every masked_softmax call the module makes."""
    calls = []
    masked_softmax = multihead_attention.masked_softmax

    def recorded(scores, mask=None, **kwargs):
        calls.append((mask, kwargs.get("causal", False)))
        return masked_softmax(scores, mask, **kwargs)

    monkeypatch.setattr(multihead_attention, "masked_softmax", recorded)
    return calls


@pytest.mark.parametrize(
    "padding, attention, dims, expected",
    [
        ("bool", None, 2, ((BATCH, 1, 1, N_KEYS), torch.bool)),
        (None, "bool", 2, ((1, 1, N_QUERIES, N_KEYS), torch.bool)),
        ("bool", "bool", 2, ((BATCH, 1, N_QUERIES, N_KEYS), torch.bool)),
        ("float", "bool", 2, ((BATCH, 1, N_QUERIES, N_KEYS), torch.float64)),
        ("bool", "float", 3, ((BATCH, HEADS, N_QUERIES, N_KEYS), torch.float64)),
    ],
    ids=["padding", "attn_2d", "both_bool", "padding_float", "attn_3d"],
)
@pytest.mark.filterwarnings("ignore:Support for mismatched")
def test_masks_are_merged_without_expanding_over_heads(device, softmax_calls, padding, attention, dims, expected):
    query, key, value = sequences(device)
    _, ours = modules(device)
    ours(
        query,
        key,
        value,
        key_padding_mask=None if padding is None else key_padding_mask(padding, device),
        attn_mask=None if attention is None else attn_mask(attention, device, dims=dims),
    )
    ((mask, causal),) = softmax_calls
    assert (tuple(mask.shape), mask.dtype, causal) == (*expected, False)
    assert mask.untyped_storage().nbytes() == mask.numel() * mask.element_size(), "a view of a larger mask"


def test_causal_hint_needs_no_mask_tensor(device, softmax_calls):
    query, key, value = sequences(device)
    _, ours = modules(device)
    ours(query, key, value, attn_mask=causal_mask(device), is_causal=True, need_weights=False)
    assert softmax_calls == [(None, True)]


def test_mismatched_mask_types_warn_as_torch(device):
    query, key, value = sequences(device)
    _, ours = modules(device)
    with pytest.warns(UserWarning, match="Support for mismatched key_padding_mask and attn_mask is deprecated"):
        ours(query, key, value, key_padding_mask=key_padding_mask("float", device), attn_mask=attn_mask("bool", device))


def bad_calls(device):
    """Inputs torch rejects, by name: (module options, arguments)."""
    query, key, value = sequences(device)
    q6, k6, v3 = sequences(device, options={"kdim": 6, "vdim": 3})
    mask = lambda *shape, dtype=torch.bool: torch.zeros(shape, dtype=dtype, device=device)  # noqa: E731
    return {
        "query_features": (
            {},
            dict(
                query=random((N_QUERIES, BATCH, EMBED + 1), torch.float64, device=device, scale=1.0),
                key=key,
                value=value,
            ),
        ),
        "key_value_lengths": ({}, dict(query=query, key=key, value=value[:-1])),
        "packed_key_features": ({}, dict(query=query, key=k6, value=k6)),
        "separate_key_features": ({"kdim": 6, "vdim": 3}, dict(query=q6, key=value, value=v3)),
        "query_4d": ({}, dict(query=query[None], key=key, value=value)),
        "key_2d": ({}, dict(query=query, key=key[:, 0], value=value[:, 0])),
        "key_batch": ({}, dict(query=query, key=key[:, :1], value=value[:, :1])),
        "padding_shape": ({}, dict(query=query, key=key, value=value, key_padding_mask=mask(BATCH, N_KEYS + 1))),
        "padding_3d": ({}, dict(query=query, key=key, value=value, key_padding_mask=mask(BATCH, 1, N_KEYS))),
        "attn_2d_shape": ({}, dict(query=query, key=key, value=value, attn_mask=mask(N_KEYS, N_QUERIES))),
        "attn_3d_shape": ({}, dict(query=query, key=key, value=value, attn_mask=mask(HEADS, N_QUERIES, N_KEYS))),
        "attn_3d_unbatched": (
            {},
            dict(query=query[:, 0], key=key[:, 0], value=value[:, 0], attn_mask=mask(1, N_QUERIES, N_KEYS)),
        ),
        "attn_4d": ({}, dict(query=query, key=key, value=value, attn_mask=mask(1, 1, N_QUERIES, N_KEYS))),
        "int_mask": ({}, dict(query=query, key=key, value=value, attn_mask=mask(N_QUERIES, N_KEYS, dtype=torch.int64))),
        "causal_without_mask": ({}, dict(query=query, key=key, value=value, is_causal=True)),
    }


@pytest.mark.parametrize("case", bad_calls("cpu"))
def test_bad_inputs_raise_as_torch(device, case):
    options, arguments = bad_calls(device)[case]
    reference, ours = modules(device, **options)
    with pytest.raises(Exception) as expected:
        reference(**arguments)
    with pytest.raises(Exception) as actual:
        ours(**arguments)
    assert type(actual.value) is type(expected.value), f"torch raised {expected.value!r}, we raised {actual.value!r}"
