"""Recording values: ``capture()``'s ``with`` block (``capture``), the one result type ``Capture`` that it fills and
that ``load`` and ``merge`` return (``recording``), the file (``saved``) and its values (``encode`` / ``decode``),
``merge`` with its one concatenation (``merge``, ``join``: dim 0), the untrusted-manifest checks (``manifest``) and
the safe rebuild of user classes (``classes``). Imports run one way: capture -> recording -> saved -> encode /
decode -> manifest / classes."""
