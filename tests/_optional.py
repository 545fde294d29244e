"""Optional dependencies of the tests: ``torchvision`` is the module or None, ``needs_torchvision`` skips a test
without it, with the reason and what to install.

The core (capture, hooks, trace, check_finite, summary, graph, extract) needs no torchvision; CI's second environment
(torch 2.13, no torchvision) runs every test that does not use it. A file that needs torchvision throughout uses
``pytest.importorskip("torchvision")`` instead.
"""

from __future__ import annotations

import pytest

try:
    import torchvision
except ImportError:  # not installed, or built for another torch
    torchvision = None

TORCHVISION_REASON = "needs torchvision: pip install 'hookkit[torchvision]'"
needs_torchvision = pytest.mark.skipif(torchvision is None, reason=TORCHVISION_REASON)


def importorskip_torchvision():
    """``pytest.importorskip("torchvision")`` with the install hint as the reason."""
    return pytest.importorskip("torchvision", reason=TORCHVISION_REASON)
