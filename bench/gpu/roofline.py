"""The decode roofline: one decode step reads every weight once (and the KV cache of every
sequence in the batch), so bytes read / memory bandwidth bounds the step time from below."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def measure_bandwidth(device: str) -> float | None:
    """Device memory bandwidth in bytes/s from a large device-to-device copy (read + write
    counted), or None off CUDA."""
    if device != "cuda":
        return None
    import torch

    n = 1 << 30  # 1 GiB per tensor
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    iters = 20
    start.record()
    for _ in range(iters):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    seconds = float(start.elapsed_time(end)) / 1000
    del src, dst
    torch.cuda.empty_cache()
    return 2 * n * iters / seconds


def model_shape(model_dir: Path) -> dict[str, Any]:
    """What the roofline needs from config.json: parameter count and KV bytes per token."""
    cfg = json.loads((model_dir / "config.json").read_text())
    h, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    heads = cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or h // heads
    vocab = cfg["vocab_size"]
    per_layer = h * heads * head_dim * 2 + h * kv_heads * head_dim * 2 + 3 * h * inter + 2 * h
    params = vocab * h * (1 if cfg.get("tie_word_embeddings") else 2) + layers * per_layer + h
    return {"parameters": params, "kv_values_per_token": 2 * layers * kv_heads * head_dim}


def roofline(
    weight_bytes: int, kv_bytes_per_token: int, context: float, bandwidth: float | None, b: int
) -> dict[str, float | None]:
    if bandwidth is None:
        return {"roof_step_ms": None, "roof_tok_s": None, "roof_kv_tok_s": None}
    step = weight_bytes / bandwidth
    step_kv = (weight_bytes + b * context * kv_bytes_per_token) / bandwidth
    return {"roof_step_ms": step * 1000, "roof_tok_s": b / step, "roof_kv_tok_s": b / step_kv}
