"""qwen-ft-images: one YAML matrix of GPU x CUDA x torch x flash-attn into correct per-GPU images."""

__version__ = "0.1.0"

# The matrix file, and the option and variable that name another: declared here because the
# no-op path (builder/uptodate.py) reads them before the CLI and builder/options.py exist.
MATRIX_FILE = "matrix.yaml"
MATRIX_ENV = "QWEN_FT_MATRIX"
MATRIX_FLAGS = ("-f", "--matrix")
