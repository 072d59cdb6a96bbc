"""Tiny in-code Qwen models, checkpoint loading, and LoRA / full fine-tuning setup."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .env import dist_version, version_at_least
from .errors import UsageError

if TYPE_CHECKING:
    import torch

QWEN_MODEL_TYPES = ("qwen2", "qwen2_moe", "qwen3", "qwen3_moe")
TINY_MODELS = ("qwen2-tiny", "qwen3-tiny")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TINY_VOCAB = 512


def tiny_config(kind: str, vocab_size: int = TINY_VOCAB) -> Any:
    """A few-hundred-kB random Qwen with the real architecture: GQA (4 heads, 2 KV heads),
    SwiGLU MLP, RMSNorm, RoPE; Qwen3 adds its q/k norms."""
    common: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
        "use_cache": False,
    }
    if kind == "qwen2-tiny":
        from transformers import Qwen2Config

        return Qwen2Config(**common)
    if kind == "qwen3-tiny":
        from transformers import Qwen3Config

        # Qwen3Config defaults head_dim to 128 rather than hidden/heads.
        return Qwen3Config(head_dim=16, **common)
    raise UsageError(f"unknown tiny model {kind!r}, expected one of {', '.join(TINY_MODELS)}")


def torch_dtype(name: str) -> torch.dtype:
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def weight_dtype(method: str, compute_dtype: str) -> str:
    """Dtype the model's weights are stored in.

    LoRA: frozen base weights in the compute dtype (half the memory), adapters in fp32.
    Full: fp32 master weights with autocast doing half-precision compute, because GradScaler
    refuses to unscale fp16 gradients and bf16 AdamW updates round away small steps.
    """
    return compute_dtype if method == "lora" else "fp32"


def build_tiny(kind: str, attn: str, dtype: str, seed: int, vocab_size: int = TINY_VOCAB) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(kind, vocab_size)
    model = AutoModelForCausalLM.from_config(  # type: ignore[no-untyped-call, unused-ignore]
        config, attn_implementation=attn
    )
    return model.to(torch_dtype(dtype))


def checkpoint_config(path: Path) -> dict[str, Any]:
    """`config.json` of a local checkpoint, validated before paying for the transformers import."""
    if not path.exists():
        raise UsageError(f"model path not found: {path}")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise UsageError(f"{path} is not a Hugging Face checkpoint (no config.json)")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UsageError(f"{config_file} is not a valid JSON config") from None
    if not isinstance(config, dict):
        raise UsageError(f"{config_file} is not a valid JSON config")
    return config


def checkpoint_model_type(path: Path) -> str:
    model_type = checkpoint_config(path).get("model_type")
    if model_type not in QWEN_MODEL_TYPES:
        raise UsageError(
            f"{path} is not a Qwen checkpoint (model_type={model_type!r}; "
            f"expected one of {', '.join(QWEN_MODEL_TYPES)})"
        )
    return str(model_type)


def _dtype_kwarg() -> str:
    # transformers 4.56 renamed from_pretrained's `torch_dtype` to `dtype`; images may pin either.
    version = dist_version("transformers") or "0"
    return "dtype" if version_at_least(version, "4.56") else "torch_dtype"


def load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def load_pretrained(
    path: Path,
    attn: str,
    dtype: str,
    device: torch.device,
    *,
    tokenizer: Any = None,
    sharded: bool = False,
) -> tuple[Any, Any]:
    """Model and tokenizer from a local checkpoint. `sharded`: ZeRO-3 is active
    (`ds.hf_zero3_context`), so transformers loads each rank's shard and places it itself."""
    from transformers import AutoModelForCausalLM

    checkpoint_model_type(path)
    if tokenizer is None:
        tokenizer = load_tokenizer(path)
    kwargs: dict[str, Any] = {
        "local_files_only": True,
        "attn_implementation": attn,
        _dtype_kwarg(): torch_dtype(dtype),
    }
    if device.type == "cuda" and not sharded:
        # Straight onto the GPU: a 7B model staged in host RAM first can exceed it.
        kwargs["device_map"] = {"": device.index or 0}
    model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    return model, tokenizer


def prepare(
    model: Any,
    method: str,
    *,
    gradient_checkpointing: bool = False,
    lora_r: int = 16,
    lora_alpha: int = 32,
    lora_dropout: float = 0.0,
) -> Any:
    """Make `model` trainable by `method`; returns the model to train (a PeftModel for LoRA)."""
    import torch

    model.config.use_cache = False  # the KV cache is dead weight during training
    if gradient_checkpointing:
        # Non-reentrant checkpointing works with frozen inputs, so LoRA needs no
        # enable_input_require_grads() hook.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if method == "full":
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        return model
    if method != "lora":
        raise UsageError(f"unknown method {method!r}, expected lora or full")
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora_r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=LORA_TARGETS,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config, autocast_adapter_dtype=True)
    # autocast_adapter_dtype already upcasts adapters on half-precision bases; made explicit
    # because fp16 master weights would underflow and GradScaler cannot unscale fp16 grads.
    for parameter in peft_model.parameters():
        if parameter.requires_grad and parameter.dtype != torch.float32:
            parameter.data = parameter.data.float()
    return peft_model


def param_counts(model: Any) -> tuple[int, int]:
    trainable = total = 0
    for parameter in model.parameters():
        # A ZeRO-3 parameter is an empty placeholder; ds_numel is its full size.
        count = int(getattr(parameter, "ds_numel", parameter.numel()))
        total += count
        if parameter.requires_grad:
            trainable += count
    return trainable, total


def trainable_dtypes(model: Any) -> list[str]:
    return sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.requires_grad})
