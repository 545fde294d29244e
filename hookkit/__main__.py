"""``python -m hookkit``: the same command as the ``hookkit`` console script."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
