"""Features of whole datasets on disk: ``extract()`` (``extract``: the loop; ``options``: its checks, shared with the
command line; ``rows``: pooling and token rows), its row stores (``rowstore``: in memory; ``npyfolder``,
``manifest``, ``npy``, ``tokens``: the ``.npy`` folder; ``dtypes``: bfloat16 as its raw bits), sharding across ranks
(``shards``), resume fingerprints (``fingerprint``), the background writer (``writer``), ``load_features()``
(``load``: a finished folder without the model) and feature grids (``grid``). Named ``extraction`` so that it
does not hide the function ``hookkit.extract``."""
