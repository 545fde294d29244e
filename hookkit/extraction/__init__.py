"""Features of whole datasets on disk: ``extract()`` (``extract``), its option checks (``options``), the tensor
functions from a layer's output to rows (``rows``), its row stores (``rowstore``: in memory; ``npyfolder``: the
``.npy`` folder, with its bookkeeping files in ``manifest``) and files (``tokens``, ``npy``), sharding across ranks
(``shards``), resume fingerprints (``fingerprint``), the background writer (``writer``) and feature grids (``grid``).
Named ``extraction`` so that it does not hide the function ``hookkit.extract``."""
