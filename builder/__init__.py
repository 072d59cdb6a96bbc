"""qwen-ft-images: one YAML matrix of GPU x CUDA x torch x flash-attn into correct per-GPU images."""

__version__ = "0.1.0"
