"""Checks of user inputs: a bad folder, file or option becomes one line that names it, before anything heavy loads.

The ``pldr-hf`` commands and the scripts run these first: a model folder (config.json that parses, weights that are
whole), a device that exists, corpus files that hold text. Only the standard library is imported at module level
(torch only inside :func:`check_device`), so a check costs next to nothing when the input is fine.

:func:`input_errors` and :func:`report_error` give the commands one way to end on a bad input: ``<prog>: error:
<message>`` on stderr and exit status 1, also for the errors that third-party loaders raise (a truncated
safetensors file, a corpus that ``datasets`` cannot read).
"""

from __future__ import annotations

import json
import os
import pickle
import sys
from pathlib import Path

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def read_json(path: str | os.PathLike):
    """The content of a JSON file, or a ValueError naming the file."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def check_safetensors(path: str | os.PathLike) -> None:
    """Raises a ValueError naming ``path`` unless it is a whole safetensors file (header + every tensor's bytes).

    Reads only the header: the file must be exactly 8 + header + the end of the last tensor long, which is what the
    safetensors loader checks too ("incomplete metadata" when it is not).
    """
    path = Path(path)
    size = path.stat().st_size
    hint = "it was not written completely; save or download it again"
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: truncated safetensors file ({size} bytes): {hint}")
        n = int.from_bytes(head, "little")
        if n > size - 8:
            raise ValueError(f"{path}: truncated safetensors file (header of {n} bytes, file of {size}): {hint}")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not a safetensors file (its header is not JSON: {e})") from e
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (AttributeError, KeyError, IndexError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: not a safetensors file (bad tensor entry in its header: {e})") from e
    if 8 + n + end != size:
        raise ValueError(f"{path}: truncated safetensors file ({size} bytes, its header describes {8 + n + end}): "
                         f"{hint}")


def check_torch_file(path: str | os.PathLike) -> None:
    """Raises a ValueError naming ``path`` when a ``torch.save`` file (zip format) is cut short."""
    import zipfile

    path = Path(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if path.stat().st_size == 0 or (magic[:2] == b"PK" and not zipfile.is_zipfile(path)):
        raise ValueError(f"{path}: truncated PyTorch checkpoint ({path.stat().st_size} bytes): it was not written "
                         "completely; save or download it again")


def check_weights(folder: str | os.PathLike) -> list[Path]:
    """The weight files of a saved model folder, each checked to be whole; a clear error when there are none."""
    folder = Path(folder)
    for index_name in WEIGHT_INDEXES:
        index = folder / index_name
        if index.is_file():
            data = read_json(index)
            weight_map = data.get("weight_map") if isinstance(data, dict) else None
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError(f"{index}: no 'weight_map' in this index of weight shards")
            shards = [folder / s for s in sorted(set(weight_map.values()))]
            missing = [s.name for s in shards if not s.is_file()]
            if missing:
                raise FileNotFoundError(f"{index}: shard file(s) missing: {', '.join(missing)}")
            for s in shards:
                (check_safetensors if s.suffix == ".safetensors" else check_torch_file)(s)
            return shards
    for name in WEIGHT_FILES:
        f = folder / name
        if f.is_file():
            (check_safetensors if f.suffix == ".safetensors" else check_torch_file)(f)
            return [f]
    raise FileNotFoundError(f"{folder}: no weights in this model folder (looked for {', '.join(WEIGHT_FILES)} and "
                            "sharded indexes)")


def check_model_dir(path: str | os.PathLike, weights: bool = True) -> Path:
    """Raises a clear error unless ``path`` is a saved model folder: config.json that parses to a JSON object, and
    (``weights=True``) weight files that are whole."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"model folder not found: {p} (expected a folder written by save_pretrained)")
    if not p.is_dir() or not (p / "config.json").is_file():
        raise FileNotFoundError(f"{p} is not a saved model folder: no config.json in it")
    if not isinstance(read_json(p / "config.json"), dict):
        raise ValueError(f"{p / 'config.json'}: expected a JSON object")
    if weights:
        check_weights(p)
    return p


def has_tokenizer(path: str | os.PathLike) -> bool:
    p = Path(path)
    return any((p / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


def check_tokenizer_dir(path: str | os.PathLike) -> Path:
    """Raises a clear error unless ``path`` is a tokenizer folder whose JSON files parse (``AutoTokenizer`` also reads
    a config.json beside them)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"tokenizer not found: {p}")
    if p.is_dir():
        if not has_tokenizer(p):
            raise FileNotFoundError(f"{p} has no tokenizer (tokenizer.json / tokenizer_config.json)")
        for name in ("config.json", "tokenizer_config.json", "tokenizer.json", "special_tokens_map.json"):
            if (p / name).is_file():
                read_json(p / name)
    return p


def check_device(device: str | None, option: str = "--device") -> None:
    """Raises a ValueError naming ``option`` when ``device`` cannot be used with this torch on this machine."""
    if device is None or str(device) in ("", "cpu"):
        return
    device = str(device)
    kind, _, index = device.partition(":")
    if kind not in ("cpu", "cuda", "mps", "xpu") or (index and not index.isdigit()):
        raise ValueError(f"{option} {device}: not a device; use cpu, cuda or cuda:N")
    import torch

    if kind == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch build has no CUDA support" if torch.version.cuda is None
                   else "no CUDA GPU is visible (check CUDA_VISIBLE_DEVICES and the driver)")
            raise ValueError(f"{option} {device}: CUDA is not available ({why}; torch {torch.__version__}); "
                             f"use {option} cpu")
        if index and int(index) >= torch.cuda.device_count():
            raise ValueError(f"{option} {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif kind == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError(f"{option} {device}: MPS is not available on this machine; use {option} cpu")
    elif kind == "xpu" and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        raise ValueError(f"{option} {device}: XPU is not available on this machine; use {option} cpu")


def _has_text(path: Path, chunk: int = 1 << 16) -> bool:
    with open(path, "rb") as f:
        while block := f.read(chunk):
            if block.strip():
                return True
    return False


def check_corpus_files(files, option: str = "--train_file") -> None:
    """Raises a clear error naming ``option`` and the file when a corpus file is missing or holds no text."""
    for f in files or []:
        p = Path(f)
        if not p.is_file():
            raise FileNotFoundError(f"{option} {p}: file not found")
        if p.suffix.lower() == ".parquet":
            if p.stat().st_size == 0:
                raise ValueError(f"{option} {p}: the file is empty")
        elif not _has_text(p):
            raise ValueError(f"{option} {p}: the file is empty (no text to train on)")


def check_training_inputs(model_args=None, data_args=None) -> None:
    """The checks above for the arguments of scripts/pretrain.py and scripts/finetune.py (ModelArguments or
    FinetuneArguments, DataArguments): model folder, tokenizer folder, corpus files."""
    model_dir = getattr(model_args, "model_name_or_path", None)
    if model_dir:
        check_model_dir(model_dir)
    tok = getattr(model_args, "tokenizer_name_or_path", None) or model_dir
    if tok and Path(tok).suffix != ".model":
        check_tokenizer_dir(tok)
    if data_args is not None:
        check_corpus_files(getattr(data_args, "train_file", None), "--train_file")
        check_corpus_files(getattr(data_args, "validation_file", None), "--validation_file")


# ----------------------------------------------------------------------------------------------------------------------
# Ending a command on a bad input
# ----------------------------------------------------------------------------------------------------------------------
def input_errors() -> tuple[type[BaseException], ...]:
    """The exception types that mean "bad input" (as opposed to a bug): for ``except input_errors() as e``."""
    types: list[type[BaseException]] = [ValueError, OSError, pickle.UnpicklingError]
    try:
        from safetensors import SafetensorError

        types.append(SafetensorError)
    except ImportError:
        pass
    if "datasets" in sys.modules:  # only a command that read a corpus can have raised it
        try:
            from datasets.exceptions import DatasetGenerationError

            types.append(DatasetGenerationError)
        except ImportError:
            pass
    return tuple(types)


def error_message(e: BaseException) -> str:
    """The message of a bad-input error, with the cause when the error itself says little (datasets, safetensors)."""
    msg = str(e).strip() or type(e).__name__
    if type(e).__module__.split(".")[0] in ("safetensors", "datasets"):
        msg = f"{type(e).__name__}: {msg}"
        cause = e.__cause__ or e.__context__
        if cause is not None and str(cause).strip():
            msg += f" ({type(cause).__name__}: {str(cause).strip().splitlines()[0]})"
    return msg


def report_error(prog: str, e: BaseException) -> int:
    """Prints ``<prog>: error: <message>`` to stderr; returns the exit status of a bad input, 1."""
    print(f"{prog}: error: {error_message(e)}", file=sys.stderr)
    return 1
