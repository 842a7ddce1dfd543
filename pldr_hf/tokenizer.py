"""Tokenizers for PLDR-LLM: train one on a corpus, or wrap an existing SentencePiece ``.model``, and save it as a
transformers tokenizer folder that ``AutoTokenizer.from_pretrained`` loads.

The papers' special ids are kept: pad 0 ``[PAD]``, unk 1 ``[UNK]``, bos 2 ``[START]``, eos 3 ``[END]``.

Decoding keeps the space that a word-initial piece (``▁word``) stands for, also when that piece comes first: text
decoded in parts reads like the whole decoded at once (``decode(a + b) == decode(a) + decode(b)``), which is what
``pipeline("text-generation")`` (prompt + decoded new tokens), ``TextStreamer`` and ``decode(out[0, n:])`` rely on.
SentencePiece itself drops the space before the first word of a decode, so a continuation decoded on its own would
be glued to its prompt ("a function isa string"). The price: a whole text decodes with one leading space (the
"dummy prefix" SentencePiece adds when encoding), which ``.strip()`` removes.

The folder saved holds only ``tokenizer.json`` + ``tokenizer_config.json`` of the stock ``TokenizersBackend`` class:
no code of this package is needed to load it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterable

SPECIAL_TOKENS = {"pad": "[PAD]", "unk": "[UNK]", "bos": "[START]", "eos": "[END]"}
SPECIAL_IDS = {"pad": 0, "unk": 1, "bos": 2, "eos": 3}


def continuation_decoder():
    """The decoder of the tokenizers this module writes: "▁" becomes a space everywhere, also in the first token, and
    byte pieces (``<0x0A>``, SentencePiece byte fallback) become their bytes."""
    from tokenizers import decoders

    return decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])


def _wrap_tokenizers_object(tok, out_dir: str | os.PathLike, model_max_length: int | None = None):
    """Wraps a ``tokenizers.Tokenizer`` as a transformers fast tokenizer with the special tokens, saves and returns it.

    ``model_max_length``: the context of the model the tokenizer is for (None: no limit, for a tokenizer on its own).
    """
    from transformers import PreTrainedTokenizerFast

    tok.decoder = continuation_decoder()
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
        padding_side="left",
        **({"model_max_length": int(model_max_length)} if model_max_length else {}),
    )
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(out_dir))
    return hf


def wrap_sentencepiece(model_file: str | os.PathLike, out_dir: str | os.PathLike, model_max_length: int | None = None):
    """Converts a SentencePiece ``.model`` (unigram or BPE) into a transformers tokenizer folder.

    The model must define the papers' special pieces at ids 0-3 ([PAD], [UNK], [START], [END]); the error names any
    id that does not match. Encoding gives SentencePiece's ids, byte fallback included.
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

    class _Converter(SpmConverter):
        # A model trained with byte fallback (the papers' has the 256 byte pieces <0x00>..<0xFF>) keeps it: characters
        # outside the vocabulary become their UTF-8 bytes, exactly as in SentencePiece, not [UNK].
        handle_byte_fallback = any(sp.is_byte(i) for i in range(sp.get_piece_size()))

    converter = _Converter.__new__(_Converter)
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
    model_max_length: int | None = None,
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
        from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

        if kind == "unigram":
            tok = Tokenizer(models.Unigram())
            trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=specials, unk_token=specials[1])
        else:
            tok = Tokenizer(models.BPE(unk_token=specials[1], byte_fallback=False))
            trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials)
        tok.normalizer = normalizers.NFKC()
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.train_from_iterator(iter_text_lines(files), trainer=trainer)
        return _wrap_tokenizers_object(tok, out_dir, model_max_length)
    raise ValueError(f"unknown tokenizer kind {kind!r}: use 'sentencepiece', 'unigram' or 'bpe'")


def load_tokenizer(path: str | os.PathLike):
    """Loads a tokenizer folder (or wraps a SentencePiece ``.model`` file on the fly into a temporary folder)."""
    from transformers import AutoTokenizer

    from .checks import check_tokenizer_dir

    path = Path(path)
    if path.suffix == ".model" and path.is_file():
        tmp = tempfile.mkdtemp(prefix="pldr-tok-")
        return wrap_sentencepiece(path, tmp)
    check_tokenizer_dir(path)
    return AutoTokenizer.from_pretrained(str(path))
