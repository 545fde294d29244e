"""Changing a model's internals: ``hooks()`` (``hooks``), edits ``patch`` / ``add`` / ``ablate`` (``edits``) and
``patching_sweep()`` (``sweep``)."""
