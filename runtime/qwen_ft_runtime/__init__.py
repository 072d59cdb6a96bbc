"""Runtime shipped inside every qwen-ft image: `contract`, `smoke` and `train`."""

from __future__ import annotations

import time

__version__ = "0.1.0"

# Taken at package import so `import_to_first_step_s` measures what a user waits for
# after Python starts running our code (torch/transformers imports included).
IMPORT_T0 = time.perf_counter()
