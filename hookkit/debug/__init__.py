"""Debugging a model: ``trace()`` and ``check_finite()`` (``trace``), ``summary()`` (``summary``) and ``graph()``
(``graph``)."""
