"""Recording values: ``Capture``, the one result type (``recording``), filled by ``capture()``'s ``with`` block
(``capture``), read from a file by ``load()``, joined by ``merge()`` (``merge``) and ``concat_calls()`` (``join``, the
one concatenation); the file itself (``saved``: reading and writing; ``encode`` / ``decode``: the manifest), its
untrusted-manifest checks (``manifest``) and the safe rebuild of user classes (``classes``).

Imports run one way: capture -> recording -> saved -> encode, decode -> manifest, classes; merge -> recording, join.
"""
