"""G files: the deductive tensors of a PLDR-LLM (per layer A, A_LM, G_LM of one prompt) as a safetensors file.

A G file is what the paper's G-cache experiments need outside a running process: take the G_LM of one prompt (or of
a model), then generate other prompts with it fixed (:func:`cache_with_g`), or load it as the G of a
``custom_G_type="external"`` model (:func:`apply_g_to_model`), i.e. "G-only" inference without the metric learner.
:func:`load_g_only_model` builds that model from a saved learned-G folder and a G file in one call.

Layout: tensors ``layer{i}.A``, ``layer{i}.A_LM``, ``layer{i}.G_LM`` of shape [heads, head_dim, head_dim] (``A``
optional), metadata ``format=pldr-g``, ``num_layers``, ``num_heads``, ``head_dim``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .modeling import CACHE_FIELD, PldrDynamicCache

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
    for name, t in (("A_LM", g.A_LM), ("A", g.A)):
        if t is not None and tuple(t.shape) != want:
            raise ValueError(f"{source}: {name} has shape {tuple(t.shape)} but the model needs {want} like G_LM")


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


# The parameters of a learned-G layer that a fixed-G ("external") model does not have: the LayerNorm on A, the residual
# metric learner and the power law. G-only inference skips exactly these.
METRIC_LEARNER_KEY = re.compile(r"\.mha1\.(layernorm1|reslayerAs|plgatt_layer)\.")
FIXED_G_KEY = "past_G_values"


def load_g_only_model(model_dir: str | os.PathLike, g: GTensors | str | os.PathLike | None = None,
                      custom_G_type: str = "external", dtype: torch.dtype | None = None):
    """A fixed-G ``PldrForCausalLM`` (``custom_G_type="external"``: "G-only" inference, no metric learner) from the
    folder of a learned-G model, with its G from ``g`` (a :class:`GTensors` or the path of a G file; None leaves the
    identity until :func:`apply_g_to_model`).

    ``PldrForCausalLM.from_pretrained(folder, custom_G_type="external")`` gives the same model, but transformers
    reports the metric learner's weights as UNEXPECTED and the fixed G as MISSING; here the checkpoint is matched to
    the G-only model first (the metric learner's tensors left out, the fixed G supplied), so a correct load says
    nothing, while any other mismatch still raises a ValueError that lists it.
    """
    from transformers import GenerationConfig

    from .checks import check_model_dir
    from .convert import check_state_dict, load_port_state_dict, model_class_for, read_port_config

    model_dir = check_model_dir(model_dir)
    config = read_port_config(model_dir)
    if config.custom_G_type is not None:
        raise ValueError(f"{model_dir}: already a fixed-G model (custom_G_type={config.custom_G_type!r}); "
                         "load it with from_pretrained")
    cls = model_class_for(config)
    config.custom_G_type = custom_G_type
    if isinstance(g, (str, os.PathLike)):
        g = load_g_file(g, config)
    state = {k: v for k, v in load_port_state_dict(model_dir).items() if not METRIC_LEARNER_KEY.search(k)}
    with torch.device("meta"):
        reference = cls(config)  # shapes only
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    if dtype is None:
        floats = {v.dtype for v in state.values() if v.is_floating_point()}
        dtype = floats.pop() if len(floats) == 1 else torch.float32
    for k in (k for k in expected if k.split(".")[-1] == FIXED_G_KEY):
        shape = expected[k]  # [A, A_LM, G_LM] per layer: zeros, zeros and the identity until a G is applied
        value = torch.zeros(shape, dtype=dtype)
        value[:, 2] = torch.eye(shape[-1], dtype=dtype)
        state[k] = value
    check_state_dict(reference, state, str(model_dir),
                     built_from=f"its config.json with custom_G_type={custom_G_type!r}")
    model = cls.from_pretrained(None, config=config, state_dict=state, dtype=dtype)
    if (model_dir / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(model_dir)
    if g is not None:
        apply_g_to_model(model, g)
    return model.eval()


def g_from_cache(cache, row: int = 0) -> GTensors:
    """The G-cache of one batch row of a cache that a forward or ``generate`` filled: per layer A, A_LM and G_LM of
    that row's prompt. ``cache`` is the cache, or the output holding it (a forward's, or that of
    ``generate(..., return_dict_in_generate=True)``: ``out.cache`` from transformers 5.24 on, ``out.past_key_values``
    before).

    The cache must hold the G-cache (``use_g_cache=True``, the default)."""
    if not hasattr(cache, "get_deductive") and hasattr(cache, "keys") and CACHE_FIELD in cache.keys():
        cache = cache[CACHE_FIELD]  # (an output: ModelOutput is a dict of the fields that are set)
    get = getattr(cache, "get_deductive", None)
    if get is None:
        raise ValueError(
            f"{type(cache).__name__} holds no PLDR-LLM deductive cache: pass the cache (or the output) that a "
            "PLDR-LLM forward or generate() returned."
        )
    A, A_LM, G_LM = [], [], []
    i = 0
    while True:
        a, a_lm, g_lm = get(i)
        if a is None and a_lm is None and g_lm is None:
            break
        if a_lm is None or g_lm is None:
            raise ValueError(
                f"layer {i} of the cache has no G-cache (A_LM, G_LM): it was filled with use_g_cache=False; "
                "generate with use_g_cache=True to export G."
            )
        batch = g_lm.shape[0]
        if not -batch <= row < batch and batch != 1:
            raise ValueError(f"row {row} is out of range: the cache holds {batch} rows.")
        pick = lambda t: (t[0] if t.shape[0] == 1 else t[row]).float().cpu()  # noqa: E731 (batch 1: shared by all rows)
        A.append(pick(a) if a is not None else None)
        A_LM.append(pick(a_lm))
        G_LM.append(pick(g_lm))
        i += 1
    if i == 0:
        raise ValueError("the cache holds no deductive tensors yet: run a forward or generate() with use_cache=True.")
    return GTensors(A_LM=torch.stack(A_LM), G_LM=torch.stack(G_LM),
                    A=torch.stack(A) if all(a is not None for a in A) else None)


def generate_with_g(model, g: GTensors | str | os.PathLike, input_ids: torch.Tensor | None = None, **generate_kwargs):
    """``model.generate`` with G fixed to ``g`` (a :class:`GTensors` or the path of a G file) for every layer and
    every row, instead of each prompt's own G: the paper's G-cache experiment (G_LM is nearly input-invariant).

    Example: ``generate_with_g(model, "prompt_a.g.safetensors", **tok("prompt b", return_tensors="pt"),
    max_new_tokens=50)``."""
    if not isinstance(g, GTensors):
        g = load_g_file(g, model.config)
    if generate_kwargs.get("past_key_values") is not None or generate_kwargs.get("cache") is not None:
        raise ValueError("generate_with_g makes its own cache (holding g); do not pass one (past_key_values/cache).")
    if generate_kwargs.get("use_cache") is False:
        raise ValueError("generate_with_g needs use_cache=True: the fixed G lives in the cache.")
    if generate_kwargs.get("use_g_cache") is False:
        raise ValueError("generate_with_g needs the G-cache (use_g_cache=True): the fixed G is held there.")
    if getattr(model.config, "custom_G_type", None) is not None:
        raise ValueError(
            f"this model has custom_G_type={model.config.custom_G_type!r} (a fixed G); load g into it with "
            "apply_g_to_model(model, g) and call generate directly."
        )
    return model.generate(input_ids, **{CACHE_FIELD: cache_with_g(model, g)}, **generate_kwargs)
