"""The engine every hookkit function stands on: one place that registers hooks (``engine``, with its ``Call`` records
in ``calls``, its listener base class in ``listener``, its default hook in ``fastpath``, its gradient taps in
``gradtaps``; ``handles``; op taps in ``ops``, their names in ``opnames``), one answer to "which call is this" under
activation checkpointing (``checkpointing``), one reader of layer arguments (``select``), copy-on-write snapshots
(``snapshot``), nested outputs (``tree``), hook counting (``census``), torch-version shims (``compat``), argument
checks (``check``), model state restore (``state``), tensor statistics (``stats``) and atomic file writing (``fs``).
Nothing here imports from the other subpackages."""
