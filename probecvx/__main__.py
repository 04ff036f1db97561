"""Start the command line, for ``python -m probecvx`` and the ``probecvx`` script."""

from __future__ import annotations

import sys

from probecvx.errors import INTERRUPTED_EXIT_CODE


def run() -> None:
    """Import the command line and run it.

    The import takes seconds, because the commands import torch and
    matplotlib, and the command line's own Ctrl-C handling starts after it.
    An interrupt during the import exits 130 with one line, as later ones do.
    """
    try:
        from probecvx.cli import main
    except KeyboardInterrupt:
        sys.stderr.write("Interrupted before the command started.\n")
        raise SystemExit(INTERRUPTED_EXIT_CODE) from None
    main()


if __name__ == "__main__":
    run()
