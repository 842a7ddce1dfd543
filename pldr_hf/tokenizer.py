"""Tokenizers for PLDR-LLM: train one on a corpus, or wrap an existing SentencePiece ``.model``, and save it as a
transformers tokenizer folder that ``AutoTokenizer.from_pretrained`` loads.

The papers' special ids are kept: pad 0 ``[PAD]``, unk 1 ``[UNK]``, bos 2 ``[START]``, eos 3 ``[END]``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterable

SPECIAL_TOKENS = {"pad": "[PAD]", "unk": "[UNK]", "bos": "[START]", "eos": "[END]"}
SPECIAL_IDS = {"pad": 0, "unk": 1, "bos": 2, "eos": 3}


def _wrap_tokenizers_object(tok, out_dir: str | os.PathLike, model_max_length: int = 1024):
    """Wraps a ``tokenizers.Tokenizer`` as a transformers fast tokenizer with the special tokens, saves and returns it."""
    from transformers import PreTrainedTokenizerFast

    for name, token in SPECIAL_TOKENS.items():
        got = tok.token_to_id(token)
        if got != SPECIAL_IDS[name]:
            raise ValueError(f"tokenizer: special token {token} has id {got}, expected {SPECIAL_IDS[name]}.")
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=SPECIAL_TOKENS["pad"],
        unk_token=SPECIAL_TOKENS["unk"],
        bos_token=SPECIAL_TOKENS["bos"],
        eos_token=SPECIAL_TOKENS["eos"],
        model_max_length=model_max_length,
        padding_side="left",
    )
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(out_dir))
    return hf


def wrap_sentencepiece(model_file: str | os.PathLike, out_dir: str | os.PathLike, model_max_length: int = 1024):
    """Converts a SentencePiece ``.model`` (unigram or BPE) into a transformers tokenizer folder.

    The model must define the papers' special pieces at ids 0-3 ([PAD], [UNK], [START], [END]); the error names any
    id that does not match.
    """
    import sentencepiece as spm
    from transformers.convert_slow_tokenizer import SpmConverter

    model_file = Path(model_file)
    if not model_file.is_file():
        raise FileNotFoundError(f"SentencePiece model not found: {model_file}")
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    for name, token in SPECIAL_TOKENS.items():
        piece = sp.id_to_piece(SPECIAL_IDS[name]) if SPECIAL_IDS[name] < sp.get_piece_size() else None
        if piece != token:
            raise ValueError(
                f"{model_file}: id {SPECIAL_IDS[name]} is {piece!r}, expected {token!r} (the papers' special ids are "
                f"pad 0 [PAD], unk 1 [UNK], bos 2 [START], eos 3 [END])."
            )

    class _Original:  # what SpmConverter reads from a slow tokenizer
        vocab_file = str(model_file)
        add_prefix_space = True
        legacy = False
        handle_byte_fallback = True

    converter = SpmConverter.__new__(SpmConverter)
    converter.original_tokenizer = _Original()

    converter.__init__(_Original())
    tok = converter.converted()
    # No template post-processor: the recipes add [START]/[END] themselves where they belong.
    from tokenizers import processors

    tok.post_processor = processors.Sequence([])
    return _wrap_tokenizers_object(tok, out_dir, model_max_length)


def iter_text_lines(files: Iterable[str | os.PathLike]) -> Iterable[str]:
    for f in files:
        with open(f, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                line = line.strip()
                if line:
                    yield line


def train_tokenizer(
    files: list[str | os.PathLike],
    out_dir: str | os.PathLike,
    vocab_size: int = 32000,
    kind: str = "sentencepiece",
    model_max_length: int = 1024,
    seed: int = 0,
):
    """Trains a tokenizer on text files and saves it as a transformers tokenizer folder.

    kind: ``"sentencepiece"`` (a SentencePiece unigram model, as the papers; the ``.model`` file is kept in the folder
    as ``spm.model``) or ``"unigram"`` / ``"bpe"`` (a ``tokenizers`` model trained directly).
    """
    files = [Path(f) for f in files]
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"corpus file not found: {f}")
    if vocab_size < 8:
        raise ValueError(f"--vocab-size must be at least 8, got {vocab_size}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    specials = [SPECIAL_TOKENS[k] for k in ("pad", "unk", "bos", "eos")]
    if kind == "sentencepiece":
        import sentencepiece as spm

        prefix = out_dir / "spm"
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(list(iter_text_lines(files))),
            model_prefix=str(prefix),
            vocab_size=vocab_size,
            model_type="unigram",
            pad_id=0, unk_id=1, bos_id=2, eos_id=3,
            pad_piece=specials[0], unk_piece=specials[1], bos_piece=specials[2], eos_piece=specials[3],
            character_coverage=1.0,
            byte_fallback=False,
            hard_vocab_limit=False,
            num_threads=min(os.cpu_count() or 1, 8),
            minloglevel=2,
        )
        return wrap_sentencepiece(f"{prefix}.model", out_dir, model_max_length)
    if kind in ("unigram", "bpe"):
        from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

        if kind == "unigram":
            tok = Tokenizer(models.Unigram())
            trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=specials, unk_token=specials[1])
        else:
            tok = Tokenizer(models.BPE(unk_token=specials[1], byte_fallback=False))
            trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials)
        tok.normalizer = normalizers.NFKC()
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        tok.train_from_iterator(iter_text_lines(files), trainer=trainer)
        return _wrap_tokenizers_object(tok, out_dir, model_max_length)
    raise ValueError(f"unknown tokenizer kind {kind!r}: use 'sentencepiece', 'unigram' or 'bpe'")


def load_tokenizer(path: str | os.PathLike):
    """Loads a tokenizer folder (or wraps a SentencePiece ``.model`` file on the fly into a temporary folder)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if path.suffix == ".model" and path.is_file():
        tmp = tempfile.mkdtemp(prefix="pldr-tok-")
        return wrap_sentencepiece(path, tmp)
    if not path.exists():
        raise FileNotFoundError(f"tokenizer not found: {path}")
    return AutoTokenizer.from_pretrained(str(path))
