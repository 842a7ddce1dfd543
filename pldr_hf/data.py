"""Corpora for PLDR-LLM training: load text through ``datasets`` and pack it into fixed-length blocks.

Packing is the original's: every document is tokenised, followed by the eos token, and the documents of a split are
joined in order into one token stream that is cut into consecutive blocks of ``block_size`` tokens (a document may
run across a block boundary; only the final remainder shorter than a block is dropped). The loss sees every token.

``document_masking=True`` keeps that packing and adds ``position_ids`` to every block, restarting at 0 at each
document start inside the block (the token after each eos) and at the block start: the contract of transformers'
``DataCollatorWithFlattening`` (no attention mask; position-id resets mark the documents), from which the model
builds per-document attention and metric tensors.

The order is deterministic: files are read in the order given and documents keep their order. Shuffling is left to
the Trainer's seeded sampler, so a run resumed from a checkpoint sees exactly the batches an uninterrupted run would.
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
                add_eos: bool = True, document_masking: bool = False):
    """Tokenises every split and packs it into rows of exactly ``block_size`` tokens (``input_ids``, ``labels``, and
    with ``document_masking`` also ``position_ids``); see the module docstring.
    """
    import numpy as np

    if block_size < 2:
        raise ValueError(f"block_size must be at least 2, got {block_size}")
    eos = tokenizer.eos_token_id
    columns = raw["train"].column_names

    def tokenize(batch):
        ids = tokenizer(batch[text_column], add_special_tokens=False)["input_ids"]
        if add_eos and eos is not None:
            ids = [x + [eos] for x in ids]
        return {"ids": ids, "length": [len(x) for x in ids]}

    tokenized = raw.map(tokenize, batched=True, remove_columns=columns, num_proc=num_proc, desc="tokenising")
    packed = {}
    for split, docs in tokenized.items():
        packed[split] = _pack_split(docs, block_size, document_masking, num_proc, split, np)
        if len(packed[split]) == 0:
            raise ValueError(f"the {split} split has fewer than block_size={block_size} tokens; use a smaller "
                             f"--block_size or a larger corpus")
    import datasets

    return datasets.DatasetDict(packed)


def _pack_split(docs, block_size: int, document_masking: bool, num_proc, split: str, np):
    """Cuts the token stream of ``docs`` (columns ids, length) into blocks: block k holds stream tokens
    [k * block_size, (k + 1) * block_size). Each batch of blocks reads only the documents it spans."""
    import datasets

    lengths = np.asarray(docs["length"], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)])  # stream offset of each document (and the total at the end)
    n_blocks = int(starts[-1] // block_size)
    index = datasets.Dataset.from_dict({"block": np.arange(n_blocks, dtype=np.int64)})

    def build(batch):
        first, last = int(batch["block"][0]), int(batch["block"][-1])
        lo, hi = first * block_size, (last + 1) * block_size
        d0 = int(np.searchsorted(starts, lo, side="right")) - 1
        d1 = int(np.searchsorted(starts, hi - 1, side="right")) - 1
        ids = docs[d0:d1 + 1]["ids"]
        stream = np.concatenate([np.asarray(x, dtype=np.int64) for x in ids])[lo - starts[d0]:hi - starts[d0]]
        blocks = stream.reshape(-1, block_size)
        out = {"input_ids": blocks.tolist(), "labels": blocks.tolist()}
        if document_masking:
            # position within its document for every stream token of the batch
            doc_len = lengths[d0:d1 + 1]
            pos = np.arange(int(doc_len.sum()), dtype=np.int64) - np.repeat(starts[d0:d1 + 1] - starts[d0], doc_len)
            pos = pos[lo - starts[d0]:hi - starts[d0]].reshape(-1, block_size).copy()
            for row in pos:  # a document that began in an earlier block restarts at 0 at the block start
                if row[0] != 0:
                    resets = np.flatnonzero(row == 0)
                    end = resets[0] if len(resets) else block_size
                    row[:end] -= row[0]
            out["position_ids"] = pos.tolist()
        return out

    fingerprint = f"pldr-pack-{docs._fingerprint}-{block_size}-{int(document_masking)}"
    return index.map(build, batched=True, batch_size=1000, remove_columns=["block"], num_proc=num_proc,
                     new_fingerprint=fingerprint[:64], desc=f"packing {split} into blocks of {block_size}")


def write_lines(path: str | os.PathLike, lines: list[str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
