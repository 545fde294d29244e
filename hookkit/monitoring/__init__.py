"""Watching training: ``monitor()`` (``monitor``), its sinks (``sinks``: JSON Lines, TensorBoard, W&B) and plots of
its records (``plot``). Named ``monitoring`` so that it does not hide the function ``hookkit.monitor``."""
