"""``pldr-hf <command>``: argument parsing only; the work is done by the modules of this package."""

from __future__ import annotations

import argparse
import json
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


def _add_5_commands(sub) -> None:
    """Evaluation and deductive outputs (issue 5): eval, lm-eval, inspect, export-g."""
    raw = argparse.RawDescriptionHelpFormatter

    def cmd_eval(args):
        from .evaluation import run_offline_eval

        res = run_offline_eval(args.model_dir, tasks=args.tasks.split(","), out=args.out, tokenizer=args.tokenizer,
                               batch_size=args.batch_size, device=args.device, limit=args.limit)
        from lm_eval.utils import make_table

        print(make_table(res))
        print(f"results: {res['results_file']}")
        return 0

    p = sub.add_parser("eval", help="run lm-eval tasks (default: the offline tasks shipped with pldr-hf) on a saved model",
                       formatter_class=raw,
                       epilog="example:\n  pldr-hf eval runs/tiny --tasks pldr_offline --out runs/tiny/eval")
    p.add_argument("model_dir", help="saved model folder (config.json, weights, tokenizer)")
    p.add_argument("--tasks", default="pldr_offline", help="comma-separated lm-eval tasks/groups (default pldr_offline)")
    p.add_argument("--out", default=None, help="results JSON file or folder (default MODEL_DIR/eval/results.json)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder when the model folder has none")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--limit", type=int, default=None, help="at most this many documents per task")
    p.set_defaults(func=lambda a: cmd_eval(a if a.out else argparse.Namespace(**{**vars(a), "out": str(
        __import__("pathlib").Path(a.model_dir) / "eval" / "results.json")})))

    def cmd_lm_eval(args):
        import pldr_hf.evaluation as ev  # registers lm-eval model "pldr"
        from lm_eval.__main__ import cli_evaluate

        argv = list(args.lm_eval_args)
        if argv and argv[0] == "--":
            argv = argv[1:]
        if "--include_path" not in argv:
            argv += ["--include_path", ev.tasks_dir()]
        sys.argv = ["lm_eval", *argv]
        cli_evaluate()
        return 0

    p = sub.add_parser("lm-eval", help="the stock lm_eval CLI with model 'pldr' registered and the offline tasks included",
                       formatter_class=raw,
                       epilog="example:\n  pldr-hf lm-eval -- --model pldr --model_args pretrained=runs/tiny --tasks arc_easy")
    p.add_argument("lm_eval_args", nargs=argparse.REMAINDER, help="arguments passed to lm_eval unchanged")
    p.set_defaults(func=cmd_lm_eval)

    def cmd_inspect(args):
        from .deductive import inspect_prompts, load_model_and_tokenizer, read_prompts

        prompts = read_prompts(args.prompts)
        model, tok = load_model_and_tokenizer(args.model_dir, args.tokenizer, args.device)
        rep = inspect_prompts(model, tok, prompts, args.out)
        print(json.dumps(rep["summary"], indent=2))
        print(f"wrote {args.out}/report.json and " + ", ".join(v for k, v in rep["files"].items() if k != "tensors"))
        return 0

    p = sub.add_parser("inspect", help="G_LM / A_LM per layer and head across prompts, G-cache invariance, PNG heatmaps",
                       formatter_class=raw,
                       epilog="example:\n  pldr-hf inspect runs/tiny --prompts prompts.txt --out report/")
    p.add_argument("model_dir")
    p.add_argument("--prompts", required=True, help="text file, one prompt a line (at least 2)")
    p.add_argument("--out", required=True, help="output folder (report.json, *.png, deductive_tensors.safetensors)")
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_inspect)

    def cmd_export_g(args):
        from .deductive import export_g

        rep = export_g(args.model_dir, args.prompt, args.out, tokenizer=args.tokenizer, device=args.device,
                       bench_seq_len=args.bench_seq_len, bench_batch=args.bench_batch)
        print(json.dumps(rep, indent=2))
        return 0

    p = sub.add_parser("export-g", help="write one prompt's G as a G file for custom_G_type='external' (G-only) inference",
                       formatter_class=raw,
                       epilog="example:\n  pldr-hf export-g runs/tiny --prompt 'The quick brown fox' --out g.safetensors")
    p.add_argument("model_dir")
    p.add_argument("--prompt", required=True)
    p.add_argument("--out", required=True, help="G file to write (.safetensors)")
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--bench-seq-len", type=int, default=None, help="sequence length of the timing (default min(max_pos, 512))")
    p.add_argument("--bench-batch", type=int, default=1)
    p.set_defaults(func=cmd_export_g)


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
    _add_5_commands(sub)
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
