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
    return parser


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
