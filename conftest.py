"""Doctests that draw on torchvision, or save and load captures (safetensors), are skipped, with the reason, where
that optional package is not installed.

torchvision is optional for hookkit (``pip install 'hookkit[torchvision]'``): CI's second environment (torch 2.13,
no torchvision) runs every doctest that does not need it. A doctest needs it when its examples name torchvision,
or when it lives in a module that draws with torchvision (feature grids).
"""

from __future__ import annotations

import pytest

try:
    import torchvision  # noqa: F401
except ImportError:  # not installed, or built for another torch
    _TORCHVISION_MISSING = True
else:
    _TORCHVISION_MISSING = False
_MODULES_THAT_NEED_TORCHVISION = ("hookkit.extraction.grid",)
try:
    import safetensors  # noqa: F401
except ImportError:  # the optional `save` extra is not installed
    _SAFETENSORS_MISSING = True
else:
    _SAFETENSORS_MISSING = False




def _needs_torchvision(item: pytest.DoctestItem) -> bool:
    test = item.dtest
    if test is None:
        return False
    if any(test.name.startswith(m + ".") for m in _MODULES_THAT_NEED_TORCHVISION):
        return True
    return any("torchvision" in example.source or "PIL" in example.source for example in test.examples)


def _needs_safetensors(item: pytest.DoctestItem) -> bool:
    test = item.dtest
    return test is not None and any("cap.save(" in example.source or "save(cap" in example.source
                                    or "hookkit.load(" in example.source for example in test.examples)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_torchvision = pytest.mark.skip(reason="needs torchvision: pip install 'hookkit[torchvision]'")
    skip_safetensors = pytest.mark.skip(reason="needs safetensors: pip install 'hookkit[save]'")
    for item in items:
        if not isinstance(item, pytest.DoctestItem):
            continue
        if _TORCHVISION_MISSING and _needs_torchvision(item):
            item.add_marker(skip_torchvision)
        if _SAFETENSORS_MISSING and _needs_safetensors(item):
            item.add_marker(skip_safetensors)
