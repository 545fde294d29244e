"""Features of whole datasets on disk: ``extract()`` (``extract``: the loop; ``options``: its checks, shared with the
command line; ``rows``: pooling and token rows), its row stores (``rowstore``: in memory; ``npyfolder``,
``manifest``, ``npy``, ``tokens``: the ``.npy`` folder), sharding across ranks (``shards``), resume fingerprints
(``fingerprint``), the background writer (``writer``) and feature grids (``grid``). Named ``extraction`` so that it
does not hide the function ``hookkit.extract``."""
