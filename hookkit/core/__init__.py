"""The engine every hookkit function stands on: one place that registers hooks (``engine``, ``handles``, op taps in
``ops``), one reader of layer arguments (``select``), copy-on-write snapshots (``snapshot``), nested outputs
(``tree``), hook counting (``census``), torch-version shims (``compat``), argument checks (``check``), model state
restore (``state``), tensor statistics (``stats``) and atomic file writing (``fs``). Nothing here imports from the
other subpackages."""
