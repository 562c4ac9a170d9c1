"""The `personavec` command."""

import sys


def main(argv: list[str] | None = None) -> int:
    print("personavec: not yet implemented", file=sys.stderr)
    return 2
