"""Recording values: ``capture()`` and its result (``capture``), saving, loading and merging captures (``saved``), the
untrusted-manifest checks (``manifest``) and the safe rebuild of user classes (``classes``)."""
