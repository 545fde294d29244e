"""Watching training: ``monitor()`` (``monitor``), its engine listeners (``collect``), what changes under
``torch.distributed`` (``ranks``), the record's schema and JSON Lines form (``records``), its sinks (``sinks``: JSON
Lines, TensorBoard, W&B) and plots of its records (``plot``). Named ``monitoring`` so that it does not hide the
function ``hookkit.monitor``."""
