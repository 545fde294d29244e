"""Hugging Face ModelOutput (a dict *and* a dataclass) through capture, against the model's own outputs.

Needs the optional `hf` extra (transformers); skipped cleanly without it. The model is built from a small local
config with random weights: nothing is downloaded.
"""

from __future__ import annotations

import copy

import pytest
import torch

import hookkit

from conftest import hook_census

transformers = pytest.importorskip("transformers")


@pytest.fixture
def bert():
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
        max_position_embeddings=64,
    )
    return transformers.BertModel(config).eval()


@pytest.fixture
def batch():
    ids = torch.randint(0, 100, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    return ids, mask


def test_layer_outputs_equal_output_hidden_states(bert, batch):
    ids, mask = batch
    names = ["embeddings", "encoder.layer.0", "encoder.layer.1"]
    # transformers installs forward hooks of its own (to collect hidden states) on the first such call, and keeps
    # them: take the census after that, so it compares hookkit's hooks only.
    bert(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    before = hook_census(bert)
    with hookkit.capture(bert, names) as cap:
        out = bert(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    assert hook_census(bert) == before
    for name, hidden in zip(names, out.hidden_states, strict=True):
        layer_out = cap[name][0] if isinstance(cap[name], tuple) else cap[name]
        torch.testing.assert_close(layer_out, hidden, rtol=0, atol=0)


def test_model_output_keeps_its_type_fields_and_values(bert, batch):
    ids, mask = batch
    with hookkit.capture(bert, ["encoder", ""], clone=True) as cap:
        out = bert(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    whole = cap[""]
    assert type(whole) is type(out)
    assert list(whole.keys()) == list(out.keys())
    torch.testing.assert_close(whole.last_hidden_state, out.last_hidden_state, rtol=0, atol=0)
    torch.testing.assert_close(whole["pooler_output"], out.pooler_output, rtol=0, atol=0)
    assert len(whole.hidden_states) == len(out.hidden_states)
    assert not whole.last_hidden_state.requires_grad
    assert type(cap["encoder"]).__name__.startswith("BaseModelOutput")


def test_keyword_inputs_of_hf_layers_are_recorded(bert, batch):
    ids, mask = batch
    with hookkit.capture(bert, ["encoder.layer.0", ""], inputs=True) as cap:
        bert(input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(cap.kwargs[""]["attention_mask"], mask)
    torch.testing.assert_close(cap.kwargs[""]["input_ids"], ids)
    assert cap.inputs[""] == ()  # BertModel was called with keywords only
    layer_in = cap.inputs["encoder.layer.0"]
    hidden = layer_in[0] if isinstance(layer_in, tuple) else layer_in
    assert hidden.shape == (2, 7, 32)


def test_gradients_of_model_output_equal_autograd_grad(bert, batch):
    """Full backward hooks never fire for dict-like outputs (pytorch issue 87540); hookkit's tensor hooks do."""
    ids, mask = batch
    with hookkit.capture(bert, ["encoder", "encoder.layer.1"], grads=True) as cap:
        out = bert(input_ids=ids, attention_mask=mask)
        out.pooler_output.pow(2).sum().backward()
    ref = copy.deepcopy(bert)
    seen = {}
    h = ref.encoder.register_forward_hook(lambda m, a, o: seen.setdefault("enc", o))
    try:
        loss = ref(input_ids=ids, attention_mask=mask).pooler_output.pow(2).sum()
    finally:
        h.remove()
    (expected,) = torch.autograd.grad(loss, seen["enc"].last_hidden_state)
    grads = cap.grads["encoder"]
    assert type(grads).__name__.startswith("BaseModelOutput")
    torch.testing.assert_close(grads.last_hidden_state, expected)
    layer_grad = cap.grads["encoder.layer.1"]
    layer_grad = layer_grad[0] if isinstance(layer_grad, tuple) else layer_grad
    torch.testing.assert_close(layer_grad, expected)  # the last layer's output *is* the encoder's output


@pytest.mark.filterwarnings("ignore")
def test_generate_with_kv_cache_keeps_one_call_per_step_and_concat_calls_rebuilds_the_sequence():
    config = transformers.GPT2Config(vocab_size=50, n_positions=32, n_embd=16, n_layer=2, n_head=2,
                                     bos_token_id=0, eos_token_id=1)
    model = transformers.GPT2LMHeadModel(config).eval()
    prompt = torch.randint(2, 50, (1, 5))
    before = hook_census(model)
    with hookkit.capture(model, ["transformer.h.0", "transformer.h.1"]) as cap:
        generated = model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0, min_new_tokens=4)
    assert hook_census(model) == before
    steps = cap.calls("transformer.h.1")
    assert len(steps) == 4  # the prompt, then one call per new token (the cache holds the rest)
    first = lambda v: v[0] if isinstance(v, tuple) else v  # noqa: E731
    assert [first(s).shape[1] for s in steps] == [5, 1, 1, 1]
    joined = first(hookkit.concat_calls(cap.calls("transformer.h.0"), dim=1))
    with torch.no_grad():
        full = model(generated[:, :-1], output_hidden_states=True)
    # hidden_states[1] is block 0's output (the last entry has ln_f applied, so it is not a block's output)
    torch.testing.assert_close(joined, full.hidden_states[1], rtol=1e-4, atol=1e-5)


def test_concat_calls_joins_nested_values_and_refuses_mismatches():
    a = (torch.zeros(1, 2, 3), None, {"k": torch.ones(1, 2)})
    b = (torch.ones(1, 1, 3), None, {"k": torch.ones(1, 1)})
    joined = hookkit.concat_calls([a, b], dim=1)
    assert joined[0].shape == (1, 3, 3) and joined[1] is None and joined[2]["k"].shape == (1, 3)
    with pytest.raises(ValueError, match="different numbers"):
        hookkit.concat_calls([a, torch.ones(1)])
    with pytest.raises(ValueError, match="holds no call"):
        hookkit.concat_calls([])


def test_attention_weights_equal_output_attentions_with_eager_attention(batch):
    ids, mask = batch
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=37, attn_implementation="eager")
    model = transformers.BertModel(config).eval()
    names = ["encoder.layer.0.attention.self", "encoder.layer.1.attention.self"]
    with torch.no_grad(), hookkit.capture(model, names) as cap:
        out = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    for name, attentions in zip(names, out.attentions, strict=True):
        context, weights = cap[name]
        torch.testing.assert_close(weights, attentions, rtol=0, atol=0)
        assert context.shape == (2, 7, 32)
