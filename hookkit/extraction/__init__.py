"""Features of whole datasets on disk: ``extract()`` (``extract``), its row stores and files (``rowstore``, ``tokens``,
``npy``), sharding across ranks (``shards``), resume fingerprints (``fingerprint``), the background writer
(``writer``) and feature grids (``grid``). Named ``extraction`` so that it does not hide the function
``hookkit.extract``."""
