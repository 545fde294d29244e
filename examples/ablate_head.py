"""Ablate one attention head: zero head 2 of layer 0 in a small BERT with a forward hook, see what changes.

``BertSelfAttention`` (transformers 5.x, eager attention) returns a tuple ``(context, attn_weights)``: ``context`` is
[batch, tokens, hidden], the heads' outputs side by side along the last dimension (head h in columns
h*d:(h+1)*d, d = hidden / heads), and ``attn_weights`` is [batch, heads, tokens, tokens]. Older versions returned
a 1-tuple or ``(context, probs)``; ``zero_head`` below handles a bare tensor or any tuple whose first element is the
context. A forward hook that returns a value replaces the module's output, as in torch; ``hookkit.hooks`` removes
it when the block ends. The model is built from a config with random weights: nothing is downloaded.

    python examples/ablate_head.py

tests/test_interventions.py runs it and checks the ablation against a raw torch hook.
"""

from __future__ import annotations

import torch
import transformers

import hookkit

LAYER = "encoder.layer.0.attention.self"


def zero_head(head: int):
    """A forward hook for a self-attention module that zeroes ``head``'s columns of the context output."""

    def hook(module, args, output):
        context = output[0] if isinstance(output, tuple) else output
        d = context.shape[-1] // module.num_attention_heads  # columns per head
        context = context.clone()  # out of place: the original output stays as it was
        context[..., head * d:(head + 1) * d] = 0
        return (context, *output[1:]) if isinstance(output, tuple) else context

    return hook


def hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def main() -> None:
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=37, attn_implementation="eager")
    model = transformers.BertModel(config).eval()
    ids = torch.randint(0, 100, (2, 7))

    census = hookkit.hook_census(model)  # every hook and flag on the model, to compare after the block
    with torch.no_grad():
        before = model(input_ids=ids).last_hidden_state
        with hookkit.hooks(model, forward={LAYER: zero_head(2)}) as h:
            print(f"inside the block: {h!r}, {hook_count(model)} forward hook(s) on the model")
            ablated = model(input_ids=ids).last_hidden_state
        after = model(input_ids=ids).last_hidden_state

    change = (ablated - before).norm() / before.norm()
    print(f"head 2 of layer 0 zeroed: final hidden state changes by {change:.1%} "
          f"(relative L2), max |diff| {(ablated - before).abs().max():.4f}")
    print(f"after the block: {hook_count(model)} forward hook(s); outputs equal the original again: "
          f"{torch.equal(after, before)}")
    assert hookkit.hook_census(model) == census and torch.equal(after, before)


if __name__ == "__main__":
    main()
