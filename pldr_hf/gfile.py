"""G files: the deductive tensors of a PLDR-LLM (per layer A, A_LM, G_LM of one prompt) as a safetensors file.

A G file is what the paper's G-cache experiments need outside a running process: take the G_LM of one prompt (or of
a model), then generate other prompts with it fixed (:func:`cache_with_g`), or load it as the G of a
``custom_G_type="external"`` model (:func:`apply_g_to_model`), i.e. "G-only" inference without the metric learner.

Layout: tensors ``layer{i}.A``, ``layer{i}.A_LM``, ``layer{i}.G_LM`` of shape [heads, head_dim, head_dim] (``A``
optional), metadata ``format=pldr-g``, ``num_layers``, ``num_heads``, ``head_dim``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .modeling import PldrDynamicCache

G_FORMAT = "pldr-g"


@dataclass
class GTensors:
    """Per layer deductive tensors, each [num_layers, heads, head_dim, head_dim] (A may be None)."""

    A_LM: torch.Tensor
    G_LM: torch.Tensor
    A: torch.Tensor | None = None

    @property
    def num_layers(self) -> int:
        return self.G_LM.shape[0]


@torch.no_grad()
def extract_g(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, row: int = 0) -> GTensors:
    """Runs one prompt through a learned-G model and returns its A, A_LM and G_LM (batch row ``row``)."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, output_pldr_attentions=True)
    layers = out.pldr_attentions
    pick = lambda t: (t[row] if t.shape[0] > row else t[0]).float().cpu()
    return GTensors(
        A=torch.stack([pick(d.A) for d in layers]),
        A_LM=torch.stack([pick(d.A_LM) for d in layers]),
        G_LM=torch.stack([pick(d.G_LM) for d in layers]),
    )


def save_g_file(path: str | os.PathLike, g: GTensors, extra_metadata: dict | None = None) -> Path:
    """Writes a G file (safetensors)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    L, H, d, _ = g.G_LM.shape
    tensors = {}
    for i in range(L):
        tensors[f"layer{i}.A_LM"] = g.A_LM[i].contiguous()
        tensors[f"layer{i}.G_LM"] = g.G_LM[i].contiguous()
        if g.A is not None:
            tensors[f"layer{i}.A"] = g.A[i].contiguous()
    meta = {"format": G_FORMAT, "num_layers": str(L), "num_heads": str(H), "head_dim": str(d)}
    meta.update({k: str(v) for k, v in (extra_metadata or {}).items()})
    save_file(tensors, str(path), metadata=meta)
    return path


def load_g_file(path: str | os.PathLike, config=None) -> GTensors:
    """Reads a G file, checking its layout (and, given a config, that it fits that model). Raises ValueError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"G file not found: {path}")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable safetensors G file ({e})") from e
    layers = sorted({int(k.split(".")[0][5:]) for k in tensors if k.startswith("layer") and "." in k
                     and k.split(".")[0][5:].isdigit()})
    if not layers or layers != list(range(len(layers))):
        raise ValueError(f"{path}: expected tensors layer0.G_LM ... layerN.G_LM, found {sorted(tensors)[:6]}")
    stacks = {}
    for name in ("A_LM", "G_LM", "A"):
        found = [tensors.get(f"layer{i}.{name}") for i in layers]
        if all(t is None for t in found) and name == "A":
            stacks[name] = None
            continue
        if any(t is None for t in found):
            missing = [f"layer{i}.{name}" for i, t in zip(layers, found) if t is None]
            raise ValueError(f"{path}: missing tensors {missing}")
        shapes = {tuple(t.shape) for t in found}
        if len(shapes) != 1 or len(next(iter(shapes))) != 3 or next(iter(shapes))[1] != next(iter(shapes))[2]:
            raise ValueError(f"{path}: {name} tensors must all be [heads, head_dim, head_dim], got {sorted(shapes)}")
        stacks[name] = torch.stack(found).float()
    g = GTensors(A_LM=stacks["A_LM"], G_LM=stacks["G_LM"], A=stacks["A"])
    if config is not None:
        check_g_fits(g, config, str(path))
    return g


def check_g_fits(g: GTensors, config, source: str = "G") -> None:
    want = (config.num_hidden_layers, config.num_attention_heads, config.head_dim, config.head_dim)
    if tuple(g.G_LM.shape) != want:
        raise ValueError(
            f"{source}: G_LM has shape {tuple(g.G_LM.shape)} (layers, heads, head_dim, head_dim) but the model needs "
            f"{want}"
        )


def cache_with_g(model, g: GTensors) -> PldrDynamicCache:
    """An empty cache whose G-cache holds ``g``: ``model.generate(..., past_key_values=cache_with_g(model, g))``
    generates with that G fixed instead of the prompt's own (the metric learner is skipped)."""
    check_g_fits(g, model.config)
    cache = PldrDynamicCache(config=model.config)
    device, dtype = model.device, torch.float32
    for i in range(g.num_layers):
        A = g.A[i][None].to(device, dtype) if g.A is not None else None
        cache.set_deductive(i, A, g.A_LM[i][None].to(device, dtype), g.G_LM[i][None].to(device, dtype))
    return cache


def apply_g_to_model(model, g: GTensors) -> None:
    """Loads ``g`` as the fixed G of a ``custom_G_type`` model (e.g. "external")."""
    check_g_fits(g, model.config)
    base = getattr(model, model.base_model_prefix, model)
    base.set_fixed_G(g.G_LM, g.A_LM)
