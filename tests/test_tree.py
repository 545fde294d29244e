"""The one walker of nested values, tested on containers directly (hypothesis-generated nestings)."""

from __future__ import annotations

from collections import OrderedDict, defaultdict, namedtuple
from dataclasses import dataclass, field
from typing import Any

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hookkit.core import tree as _tree

Point = namedtuple("Point", ["x", "y"])


@dataclass
class Box:
    a: Any
    b: Any = None
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Frozen:
    a: Any


atoms = st.one_of(
    st.none(), st.integers(-3, 3), st.text(max_size=3),
    st.builds(lambda n: torch.arange(float(n)), st.integers(0, 4)),
)


def containers(children):
    return st.one_of(
        st.lists(children, max_size=3),
        st.lists(children, max_size=3).map(tuple),
        st.dictionaries(st.text(max_size=2), children, max_size=3),
        st.dictionaries(st.text(max_size=2), children, max_size=3).map(OrderedDict),
        st.tuples(children, children).map(lambda t: Point(*t)),
        st.tuples(children, children).map(lambda t: Box(t[0], t[1])),
        children.map(Frozen),
    )


nested = st.recursive(atoms, containers, max_leaves=12)


def same_shape(a, b) -> bool:
    """Same container types and non-tensor values; tensors only need to be tensors in both."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor)
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(same_shape(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_shape(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, (Box, Frozen)):
        return same_shape(vars(a), vars(b))
    return a == b


@settings(max_examples=200, deadline=None)
@given(nested)
def test_map_leaves_keeps_structure_and_applies_fn_to_every_tensor(value):
    doubled = _tree.map_leaves(lambda t: t * 2, value)
    assert same_shape(value, doubled)
    before, after = _tree.leaves(value), _tree.leaves(doubled)
    assert len(before) == len(after)
    for x, y in zip(before, after, strict=True):
        torch.testing.assert_close(y, x * 2)


@settings(max_examples=200, deadline=None)
@given(nested)
def test_skeleton_holds_no_tensor_and_fill_round_trips(value):
    skel = _tree.skeleton(value)
    assert _tree.leaves(skel) == []
    tensors = _tree.leaves(value)
    rebuilt = _tree.fill(skel, tensors)
    assert same_shape(value, rebuilt)
    assert all(a is b for a, b in zip(_tree.leaves(rebuilt), tensors, strict=True))


def test_defaultdict_and_tuple_subclass_with_odd_constructor():
    d = defaultdict(list, {"a": torch.ones(1)})
    out = _tree.map_leaves(lambda t: t + 1, d)
    assert type(out) is defaultdict and out.default_factory is list
    torch.testing.assert_close(out["a"], torch.full((1,), 2.0))

    class Odd(tuple):
        def __new__(cls, a, b):
            return super().__new__(cls, (a, b))

    odd = Odd(torch.ones(1), 3)
    mapped = _tree.map_leaves(lambda t: t * 5, odd)
    assert type(mapped) is tuple  # no way to call Odd with one iterable: a plain tuple of the same items
    assert mapped[1] == 3 and float(mapped[0]) == 5.0


def test_unknown_objects_pass_through_untouched():
    class Opaque:
        def __init__(self):
            self.t = torch.ones(1)

    o = Opaque()
    assert _tree.map_leaves(lambda t: t * 0, o) is o
    assert _tree.leaves(o) == []
