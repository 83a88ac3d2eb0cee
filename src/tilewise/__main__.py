"""``python -m tilewise``: the same as the ``tilewise`` command."""

from tilewise.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
