"""Changing a model's internals: ``hooks()`` (``hooks``), edits ``patch`` / ``add`` / ``ablate`` (``edits``; where an
edit lands in a layer's output: ``target``) and ``patching_sweep()`` (``sweep``)."""
