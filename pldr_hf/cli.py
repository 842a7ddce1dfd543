"""``pldr-hf <command>``: argument parsing only; the work is done by the modules of this package."""

from __future__ import annotations

import argparse
import sys


def _cmd_convert(args: argparse.Namespace) -> int:
    if args.source == "original":
        if not args.checkpoint or not args.hparams:
            raise SystemExit("pldr-hf convert --from original needs --checkpoint C.pth and --hparams H (.pkl or .json)")
        from .convert import convert_original

        model = convert_original(args.checkpoint, args.hparams, args.out)
        n = sum(p.numel() for p in model.parameters())
        print(f"converted {args.checkpoint} -> {args.out} ({n:,} parameters, {model.config.num_hidden_layers} layers)")
        return 0
    raise SystemExit(f"unknown --from {args.source!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pldr-hf",
        description="PLDR-LLM as a Hugging Face transformers model: convert, train, evaluate, inspect, publish.",
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>")

    p = sub.add_parser(
        "convert",
        help="import a checkpoint of the original PLDR-LLM implementation into a transformers folder",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  pldr-hf convert --from original --checkpoint model.pth --hparams model_hparams.pkl --out runs/imported",
    )
    p.add_argument("--from", dest="source", choices=["original"], required=True, help="checkpoint format")
    p.add_argument("--checkpoint", help="original .pth checkpoint (read with weights_only=True)")
    p.add_argument("--hparams", help="original _hparams.pkl (read with a restricted unpickler) or a JSON with the same keys")
    p.add_argument("--out", required=True, help="output folder (config.json + model.safetensors)")
    p.set_defaults(func=_cmd_convert)
    _add_issue4_commands(sub)
    return parser


def _add_issue4_commands(sub) -> None:
    """Issue 4: `train-tokenizer` and `quickstart`."""

    def _cmd_train_tokenizer(args: argparse.Namespace) -> int:
        from .tokenizer import train_tokenizer, wrap_sentencepiece

        if args.from_model:
            tok = wrap_sentencepiece(args.from_model, args.out)
        elif args.corpus:
            tok = train_tokenizer(args.corpus, args.out, vocab_size=args.vocab_size, kind=args.kind)
        else:
            raise ValueError("give --corpus FILE [FILE ...] to train, or --from-model X.model to wrap")
        print(f"saved a {len(tok)}-token tokenizer to {args.out} (pad {tok.pad_token_id} {tok.pad_token}, "
              f"unk {tok.unk_token_id} {tok.unk_token}, bos {tok.bos_token_id} {tok.bos_token}, "
              f"eos {tok.eos_token_id} {tok.eos_token}); load it with AutoTokenizer.from_pretrained({args.out!r})")
        return 0

    p = sub.add_parser(
        "train-tokenizer",
        help="train a SentencePiece unigram (or tokenizers) model, or wrap a .model, as a transformers tokenizer",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  pldr-hf train-tokenizer --corpus corpus.txt --vocab-size 32000 --out runs/tok\n"
               "  pldr-hf train-tokenizer --from-model refinedweb-32k-pldr.model --out runs/tok32k",
    )
    p.add_argument("--corpus", nargs="+", help="text files, one document or sentence per line")
    p.add_argument("--from-model", help="an existing SentencePiece .model to wrap instead of training")
    p.add_argument("--vocab-size", type=int, default=32000, help="vocabulary size (default 32000, as the papers)")
    p.add_argument("--kind", choices=["sentencepiece", "unigram", "bpe"], default="sentencepiece",
                   help="sentencepiece: SentencePiece unigram (the papers); unigram/bpe: a `tokenizers` model")
    p.add_argument("--out", required=True, help="output folder (tokenizer.json + tokenizer_config.json)")
    p.set_defaults(func=_cmd_train_tokenizer)

    def _cmd_quickstart(args: argparse.Namespace) -> int:
        from .quickstart import run_quickstart

        result = run_quickstart(out_dir=args.out, max_steps=args.steps, vocab_size=args.vocab_size,
                                block_size=args.block_size, batch_size=args.batch_size, seed=args.seed)
        return 0 if result["learned"] else 1

    p = sub.add_parser(
        "quickstart",
        help="train a tokenizer and a tiny PLDR-LLM on real English text on a CPU in minutes, evaluate and generate",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  pldr-hf quickstart                 # ~5 minutes on 2 CPU cores, writes runs/quickstart\n"
               "  pldr-hf quickstart --steps 100     # shorter",
    )
    p.add_argument("--out", default="runs/quickstart", help="output folder (default runs/quickstart)")
    p.add_argument("--steps", type=int, default=800, help="training steps (default 800)")
    p.add_argument("--vocab-size", type=int, default=4000, help="tokenizer size (default 4000)")
    p.add_argument("--block-size", type=int, default=128, help="tokens per training block (default 128)")
    p.add_argument("--batch-size", type=int, default=16, help="blocks per step (default 16)")
    p.add_argument("--seed", type=int, default=42)
    p.set_defaults(func=_cmd_quickstart)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"pldr-hf {args.command}: error: {e}", file=sys.stderr)
        return 1
    except __import__("pickle").UnpicklingError as e:
        print(f"pldr-hf {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
