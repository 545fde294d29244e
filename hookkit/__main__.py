"""``python -m hookkit``: the same command as the ``hookkit`` console script."""

from hookkit.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
