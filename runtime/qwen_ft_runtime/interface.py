"""The names host and image agree on, defined once: the builder imports them from here.

Stdlib only and import-free, so the builder can read it without torch and the image
can read it without the builder.
"""

from __future__ import annotations

# Field -> ENV variable the image sets (its plan). The builder renders exactly these, in
# this order, and a host process that runs the runtime natively must not inherit them.
ENV_VARS: dict[str, str] = {
    "target": "QWEN_FT_TARGET",
    "alias": "QWEN_FT_ALIAS",
    "sm": "QWEN_FT_SM",
    "dtype": "QWEN_FT_DTYPE",
    "attn": "QWEN_FT_ATTN",
    "torch": "QWEN_FT_TORCH",
    "cuda": "QWEN_FT_CUDA",
    "flash_attn": "QWEN_FT_FLASH_ATTN",
    "triton": "QWEN_FT_TRITON",
    # DeepSpeed's release (or `none`), and the ops prebuilt into it as comma-separated DeepSpeed
    # op names (`fused_adam,cpu_adam`) or `none`.
    "deepspeed": "QWEN_FT_DEEPSPEED",
    "ds_ops": "QWEN_FT_DS_OPS",
}

# The console script every image installs, and the module that serves it.
ENTRY_POINT = "qwen-ft-runtime"
MODULE = "qwen_ft_runtime"

NONE = "none"
