"""Import checkpoints of the original PLDR-LLM implementation into a transformers model folder.

The original saves ``torch.save({"model_state_dict", "optimizer_state_dict", "loss", "accuracy"})`` and pickles its
hyperparameters to ``<name>_hparams.pkl``. The checkpoint is read with ``torch.load(weights_only=True)``; the pickle is
read by a restricted unpickler that builds plain data only (and the one function the original stores,
``torch.nn.functional.silu``): anything else is refused before it can run.
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
from pathlib import Path

import torch

from .checks import check_model_dir, check_safetensors, has_tokenizer, read_json  # noqa: F401  (re-exported)
from .modeling import PldrConfig, PldrForCausalLM

_PLAIN_BUILTINS = {"set", "frozenset", "complex", "bytearray", "slice", "range"}
# The only callables the original's hparams may carry, stored by reference and mapped to transformers activation names.
_ALLOWED_FUNCTIONS = {
    ("torch.nn.functional", "silu"): "silu",
    ("torch.nn.functional", "gelu"): "gelu",
    ("torch.nn.functional", "relu"): "relu",
}


class _Activation(str):
    """Stands for an activation function referenced by the pickle (nothing is imported)."""


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that builds plain Python data and nothing else."""

    def __init__(self, file, source: str):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED_FUNCTIONS:
            return _Activation(_ALLOWED_FUNCTIONS[(module, name)])
        if module == "builtins" and name in _PLAIN_BUILTINS:
            return getattr(__import__("builtins"), name)
        raise pickle.UnpicklingError(
            f"{self.source}: refusing to load '{module}.{name}' from the hyperparameter pickle: only plain data and "
            "torch.nn.functional.silu are allowed (a pickle can run arbitrary code). Pass a JSON file with the same "
            "keys instead if this file is not the original's."
        )

    def persistent_load(self, pid):
        raise pickle.UnpicklingError(f"{self.source}: persistent references are not allowed in a hyperparameter pickle.")


def load_hparams(path: str | os.PathLike) -> dict:
    """Reads the original's hyperparameters from its ``_hparams.pkl`` (restricted) or from a JSON file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"hyperparameter file not found: {path}")
    data = path.read_bytes()
    if path.suffix.lower() == ".json" or data[:1] in (b"{", b" ", b"\n"):
        try:
            hparams = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
    else:
        try:
            hparams = RestrictedUnpickler(io.BytesIO(data), str(path)).load()
        except pickle.UnpicklingError:
            raise
        except Exception as e:  # truncated or corrupt pickle
            raise ValueError(f"{path}: cannot read the hyperparameter pickle ({type(e).__name__}: {e})") from e
    if not isinstance(hparams, dict):
        raise ValueError(f"{path}: expected a dict of hyperparameters, got {type(hparams).__name__}")
    return hparams


def _first(hparams: dict, keys: tuple[str, ...], default=None, required: bool = False, source: str = ""):
    for k in keys:
        if k in hparams and hparams[k] is not None:
            return hparams[k]
    if required:
        raise ValueError(f"{source}: missing hyperparameter '{keys[0]}'")
    return default


def config_from_hparams(hparams: dict, state_dict: dict | None = None, source: str = "hparams") -> PldrConfig:
    """Maps the original's hyperparameter names onto :class:`PldrConfig` keys.

    Bias options are read off the state dict when one is given (a checkpoint without biases sets them to False).
    """
    d_model = int(_first(hparams, ("d_model",), required=True, source=source))
    num_heads = int(_first(hparams, ("num_heads",), required=True, source=source))
    if num_heads <= 0 or d_model % num_heads:
        raise ValueError(f"{source}: d_model ({d_model}) is not a multiple of num_heads ({num_heads})")
    activation = str(_first(hparams, ("activation",), default="silu"))
    activation = activation.rsplit(".", 1)[-1]
    kwargs = dict(
        vocab_size=int(_first(hparams, ("input_vocab_size", "target_vocab_size", "vocab_size"), required=True, source=source)),
        hidden_size=d_model,
        num_attention_heads=num_heads,
        head_dim=d_model // num_heads,
        num_hidden_layers=int(_first(hparams, ("num_layers",), required=True, source=source)),
        intermediate_size=int(_first(hparams, ("dff",), default=math.floor(d_model * 4 * 2 / 3))),
        num_reslayerA=int(_first(hparams, ("num_reslayerA",), required=True, source=source)),
        num_denseA=int(_first(hparams, ("num_denseA",), required=True, source=source)),
        A_dff=int(_first(hparams, ("A_dff",), required=True, source=source)),
        max_position_embeddings=int(_first(hparams, ("max_seq_len", "max_position_embeddings"), default=1024)),
        rope_theta=float(_first(hparams, ("rope_base", "rope_theta", "base"), default=10000.0)),
        layer_norm_eps=float(_first(hparams, ("layernorm_eps", "layer_norm_eps", "epsilon"), default=1e-6)),
        hidden_act=activation,
        reference_rope=True,
    )
    if state_dict is not None:
        kwargs["attention_bias"] = "decoder.dec_layers.0.mha1.wq.bias" in state_dict
        kwargs["glu_bias"] = "decoder.dec_layers.0.ffn.gluw1.bias" in state_dict
        kwargs["final_bias"] = "final_layer.bias" in state_dict
    return PldrConfig(**kwargs)


def load_original_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Loads the model weights of an original checkpoint (``weights_only=True``: no code is unpickled)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: cannot be read as a PyTorch checkpoint with weights_only=True ({e})") from e
    state = ckpt.get("model_state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a dict with 'model_state_dict' of tensors (the original's checkpoint layout)")
    # Prefixes added by torch.compile or DDP wrappers around the original model.
    clean = {}
    for k, v in state.items():
        for prefix in ("_orig_mod.", "module."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        clean[k] = v
    return clean


def check_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str,
                     built_from: str = "its hyperparameters") -> None:
    """Raises one ValueError listing every missing, unexpected and mis-shaped tensor."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(state) & set(expected)
        if tuple(state[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or misshaped:
        lines = [f"{source} does not match the PLDR-LLM built from {built_from}:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
            if items:
                lines.append(f"  {title} ({len(items)}): " + ", ".join(items))
        raise ValueError("\n".join(lines))


def convert_original(checkpoint: str | os.PathLike, hparams: str | os.PathLike, out_dir: str | os.PathLike,
                     dtype: torch.dtype = torch.float32) -> PldrForCausalLM:
    """Converts an original PLDR-LLM checkpoint + hyperparameters into a transformers folder (config + safetensors)."""
    state = load_original_state_dict(checkpoint)
    config = config_from_hparams(load_hparams(hparams), state, source=str(hparams))
    model = PldrForCausalLM(config)
    check_state_dict(model, state, str(checkpoint))
    model.load_state_dict(state, strict=True)
    model = model.to(dtype).eval()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.generation_config.pad_token_id = config.pad_token_id
    model.generation_config.bos_token_id = config.bos_token_id
    model.generation_config.eos_token_id = config.eos_token_id
    model.save_pretrained(out_dir)
    return model


# ----------------------------------------------------------------------------------------------------------------------
# Port-format checkpoints (the transformers port: model_type "pldrllm", classes Pldrllm*; the published PLDR-LLM-v51)
# ----------------------------------------------------------------------------------------------------------------------
# The port's parameter names are the ones this project's model uses (decoder.embedding, decoder.dec_layers.{i}.mha1...,
# decoder.layernorm1, final_layer; score / qa_outputs for the task heads), so its tensors map one to one. The only
# difference: with custom_G_type the port also saves the boolean buffer ``decoder.past_G_values_status`` [num_layers]
# (always all True for a fixed G), which carries no information here and is dropped.
PORT_IGNORED_SUFFIXES = ("past_G_values_status",)

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "spiece.model", "chat_template.jinja", "chat_template.json",
)


def _port_architectures():
    from .modeling import (PldrForQuestionAnswering, PldrForSequenceClassification, PldrForTokenClassification,
                           PldrModel)

    classes = {"ForCausalLM": PldrForCausalLM, "ForSequenceClassification": PldrForSequenceClassification,
               "ForTokenClassification": PldrForTokenClassification, "ForQuestionAnswering": PldrForQuestionAnswering,
               "Model": PldrModel}
    out = {}
    for suffix, cls in classes.items():
        out[f"Pldrllm{suffix}"] = cls  # the port
        out[f"Pldr{suffix}"] = cls  # this project
    return out


def model_class_for(config: PldrConfig):
    """The PLDR class for ``config.architectures[0]`` (port or project name); PldrForCausalLM when none is given."""
    archs = getattr(config, "architectures", None) or ["PldrForCausalLM"]
    table = _port_architectures()
    if archs[0] not in table:
        raise ValueError(f"config.json: unknown architecture {archs[0]!r}; expected one of {sorted(table)}")
    return table[archs[0]]


def read_port_config(path: str | os.PathLike) -> PldrConfig:
    """Reads a port-format ``config.json`` (model_type "pldrllm") into a :class:`PldrConfig`."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not path.is_dir():
        raise FileNotFoundError(f"model folder not found: {path}")
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path}: no config.json (a port-format PLDR-LLM folder has config.json + weights)")
    raw = read_json(cfg_file)
    if raw.get("model_type") != PldrConfig.model_type:
        raise ValueError(f"{cfg_file}: model_type is {raw.get('model_type')!r}, expected 'pldrllm' (a PLDR-LLM folder)")
    raw.pop("auto_map", None)  # remote code of the publisher is not used: this project's classes are
    return PldrConfig.from_dict(raw)


def _load_weight_file(file: Path) -> dict[str, torch.Tensor]:
    if file.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        check_safetensors(file)  # a truncated file: one line that says so
        try:
            return load_file(str(file))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{file}: cannot be read as safetensors ({e})") from e
    try:  # legacy pytorch_model.bin: tensors only, nothing else is unpickled
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{file}: cannot be read with torch.load(weights_only=True) ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{file}: expected a state dict of tensors")
    return state


def load_port_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a port-format folder: model.safetensors, sharded safetensors, or legacy pytorch_model.bin."""
    path = Path(path)
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = path / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}).values()))
            missing = [s for s in shards if not (path / s).is_file()]
            if missing:
                raise FileNotFoundError(f"{index}: shard file(s) missing: {', '.join(missing)}")
            state = {}
            for s in shards:
                state.update(_load_weight_file(path / s))
            return state
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).is_file():
            return _load_weight_file(path / name)
    raise FileNotFoundError(
        f"{path}: no weights found (looked for model.safetensors, model.safetensors.index.json, pytorch_model.bin, "
        "pytorch_model.bin.index.json)"
    )


def copy_tokenizer_files(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copies the tokenizer files present in ``src`` to ``dst``; returns their names."""
    import shutil

    src, dst = Path(src), Path(dst)
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    return copied


def port_tokenizer_class(path: str | os.PathLike) -> str | None:
    """The ``tokenizer_class`` named in a folder's tokenizer_config.json (the port's is ``PldrllmTokenizer``)."""
    f = Path(path) / "tokenizer_config.json"
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text(encoding="utf-8")).get("tokenizer_class")
    except json.JSONDecodeError:
        return None


def convert_port(path: str | os.PathLike, out_dir: str | os.PathLike, dtype: torch.dtype | None = None):
    """Converts a port-format folder (config.json with model_type "pldrllm" + weights) into this project's format.

    Every tensor is checked against the model built from config.json (one error lists all missing, unexpected and
    mis-shaped tensors). The weights keep their stored dtype unless ``dtype`` is given. Tokenizer files and
    generation_config.json are copied.
    """
    path = Path(path)
    config = read_port_config(path)
    cls = model_class_for(config)
    state = load_port_state_dict(path)
    state = {k: v for k, v in state.items() if not k.endswith(PORT_IGNORED_SUFFIXES)}
    config.architectures = [cls.__name__]
    model = cls(config)
    check_state_dict(model, state, str(path), built_from="its config.json")
    model.load_state_dict(state, strict=True)
    if dtype is None:
        float_dtypes = {v.dtype for v in state.values() if v.is_floating_point()}
        dtype = float_dtypes.pop() if len(float_dtypes) == 1 else torch.float32
    model = model.to(dtype).eval()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if (path / "generation_config.json").is_file() and hasattr(model, "generation_config"):
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(path)
    model.save_pretrained(out_dir)
    copy_tokenizer_files(path, out_dir)
    return model
