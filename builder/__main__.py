"""The console script (`qwen-ft-images`) and `python -m builder`.

An up-to-date `build` is answered by builder.uptodate before the CLI is even imported, so
that an up-to-date `make images` costs what `make` costs; everything else is builder.cli's.
"""

from __future__ import annotations

import sys


def main() -> None:
    from builder import uptodate

    try:
        if uptodate.replay(sys.argv[1:]):
            return
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(130)
    from builder.cli import main as cli

    cli()


if __name__ == "__main__":
    main()
