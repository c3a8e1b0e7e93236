"""``cm-satellite``: run a sending satellite."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    print("cm-satellite: delivery is not built yet (see the satellite issue); "
          "the master's API works without it.", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
