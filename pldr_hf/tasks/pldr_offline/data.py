"""Loaders of the offline tasks: the JSONL files next to this file, read with `datasets` (no Hub access)."""

from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def _load(name: str) -> datasets.DatasetDict:
    return datasets.load_dataset("json", data_files={"test": str(HERE / f"{name}.jsonl")})


def load_perplexity(**kwargs) -> datasets.DatasetDict:
    return _load("perplexity")


def load_word_order(**kwargs) -> datasets.DatasetDict:
    return _load("word_order")


def load_next_sentence(**kwargs) -> datasets.DatasetDict:
    return _load("next_sentence")
