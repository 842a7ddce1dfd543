"""Corpora for PLDR-LLM training: load text through ``datasets`` and pack it into fixed-length blocks.

The order is deterministic: files are read in the order given, documents keep their order, and packing concatenates
them (each followed by the eos token) before cutting blocks. Shuffling is left to the Trainer's seeded sampler, so a
run resumed from a checkpoint sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import os
from pathlib import Path

TEXT_SUFFIXES = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def load_corpus(
    train_files: list[str] | None = None,
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    validation_files: list[str] | None = None,
    validation_split_percentage: float = 5.0,
    text_column: str = "text",
    seed: int = 42,
):
    """Returns a ``DatasetDict`` with ``train`` and ``validation`` splits holding a ``text_column`` column.

    Sources: local files (``.txt`` one document per line, ``.json``/``.jsonl``, ``.csv``, ``.parquet``), a folder saved
    with ``Dataset.save_to_disk``, or a dataset name that ``datasets.load_dataset`` resolves (an installed loading
    script, a local dataset folder, or a Hub name when the Hub is reachable). Without a validation split, the last
    ``validation_split_percentage`` % of the training rows is held out.
    """
    import datasets

    if bool(train_files) == bool(dataset_name):
        raise ValueError("give exactly one corpus: --train_file FILE [FILE ...] or --dataset_name NAME")
    if train_files:
        files = {"train": list(train_files)}
        if validation_files:
            files["validation"] = list(validation_files)
        suffixes = set()
        for split, names in files.items():
            for f in names:
                if not Path(f).is_file():
                    raise FileNotFoundError(f"{split} corpus file not found: {f}")
                suffix = Path(f).suffix.lower()
                if suffix not in TEXT_SUFFIXES:
                    raise ValueError(f"corpus file {f}: unsupported suffix {suffix!r}; use one of {sorted(TEXT_SUFFIXES)}")
                suffixes.add(TEXT_SUFFIXES[suffix])
        if len(suffixes) != 1:
            raise ValueError(f"corpus files must share one format, got {sorted(suffixes)}")
        builder = suffixes.pop()
        kwargs = {"keep_linebreaks": True} if builder == "text" else {}
        raw = datasets.load_dataset(builder, data_files=files, **kwargs)
    else:
        if Path(dataset_name).is_dir() and (Path(dataset_name) / "dataset_dict.json").exists() or (
            Path(dataset_name).is_dir() and (Path(dataset_name) / "dataset_info.json").exists()
        ):
            raw = datasets.load_from_disk(dataset_name)
            if isinstance(raw, datasets.Dataset):
                raw = datasets.DatasetDict({"train": raw})
        else:
            try:
                raw = datasets.load_dataset(dataset_name, dataset_config_name)
            except Exception as e:  # datasets raises many types (DatasetNotFoundError, ConnectionError, ...)
                raise ValueError(f"could not load dataset {dataset_name!r}: {type(e).__name__}: {e}") from None
    if "train" not in raw:
        raise ValueError(f"corpus has no 'train' split (splits: {list(raw)})")
    if text_column not in raw["train"].column_names:
        raise ValueError(f"corpus has no column {text_column!r} (columns: {raw['train'].column_names}); set --text_column")
    if "validation" not in raw:
        if not 0 < validation_split_percentage < 100:
            raise ValueError(f"validation_split_percentage must be in (0, 100), got {validation_split_percentage}")
        n = len(raw["train"])
        n_val = max(1, int(n * validation_split_percentage / 100))
        if n - n_val < 1:
            raise ValueError(f"corpus has only {n} rows: too few to hold out a validation split")
        # The held-out rows are the tail of the corpus (contiguous text), not a random sample.
        raw = datasets.DatasetDict(
            {"train": raw["train"].select(range(n - n_val)), "validation": raw["train"].select(range(n - n_val, n))}
        )
    return raw


def pack_corpus(raw, tokenizer, block_size: int, text_column: str = "text", num_proc: int | None = None,
                add_eos: bool = True):
    """Tokenises every split and packs it into rows of exactly ``block_size`` tokens (``input_ids``, ``labels``).

    Each document is followed by the eos token; the remainder shorter than a block at the end of a split is dropped.
    """
    if block_size < 2:
        raise ValueError(f"block_size must be at least 2, got {block_size}")
    eos = tokenizer.eos_token_id
    columns = raw["train"].column_names

    def tokenize(batch):
        ids = tokenizer(batch[text_column], add_special_tokens=False)["input_ids"]
        if add_eos and eos is not None:
            ids = [x + [eos] for x in ids]
        return {"ids": ids}

    def group(batch):
        flat = [t for doc in batch["ids"] for t in doc]
        n = (len(flat) // block_size) * block_size
        blocks = [flat[i : i + block_size] for i in range(0, n, block_size)]
        return {"input_ids": blocks, "labels": [list(b) for b in blocks]}

    tokenized = raw.map(tokenize, batched=True, remove_columns=columns, num_proc=num_proc, desc="tokenising")
    packed = tokenized.map(group, batched=True, batch_size=2000, remove_columns=["ids"], num_proc=num_proc,
                           desc=f"packing into blocks of {block_size}")
    for split, ds in packed.items():
        if len(ds) == 0:
            raise ValueError(f"the {split} split has fewer than block_size={block_size} tokens; use a smaller "
                             f"--block_size or a larger corpus")
    return packed


def write_lines(path: str | os.PathLike, lines: list[str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
