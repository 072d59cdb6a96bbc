from __future__ import annotations

import os
import sys

from .cli import main

if __name__ == "__main__":
    code = main()
    from .dist import in_launched_rank

    if in_launched_rank():
        # A torchrun rank has said everything (its JSON line, its logs): leave without the
        # interpreter's teardown, where gloo's and DeepSpeed's C++ threads can abort the rank
        # ("terminate called without an active exception", exit -6) on a loaded host even
        # after a clean shutdown, and torchrun would report a finished job as failed.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
