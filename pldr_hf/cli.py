"""``pldr-hf <command>``: argument parsing only; the work is done by the modules of this package.

Only argparse runs until a command is chosen: each command imports what it needs (torch, transformers, lm-eval) when
it runs, so ``pldr-hf --help`` and ``pldr-hf <command> --help`` answer at once. Bad inputs (a missing or corrupt
file, a device this machine lacks) end with one line, ``pldr-hf <command>: error: ...``, and exit status 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

RAW = argparse.RawDescriptionHelpFormatter

# Measured wall time of `pldr-hf quickstart` with the defaults (see README.md, "Install and run").
QUICKSTART_TIME = "2.5-6 minutes on 2 CPU cores"


# ----------------------------------------------------------------------------------------------------------------------
# quickstart, train-tokenizer
# ----------------------------------------------------------------------------------------------------------------------
def _cmd_quickstart(args: argparse.Namespace) -> int:
    from .quickstart import run_quickstart

    result = run_quickstart(out_dir=args.out, max_steps=args.steps, vocab_size=args.vocab_size,
                            block_size=args.block_size, batch_size=args.batch_size, seed=args.seed,
                            prompt=args.prompt)
    return 0 if result["learned"] else 1


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


def _add_training_commands(sub) -> None:
    """`quickstart` and `train-tokenizer`."""
    p = sub.add_parser(
        "quickstart",
        help="train a tokenizer and a tiny PLDR-LLM on real English text on a CPU, evaluate and generate (no download)",
        formatter_class=RAW,
        epilog=f"examples:\n  pldr-hf quickstart                 # {QUICKSTART_TIME}, writes runs/quickstart\n"
               "  pldr-hf quickstart --steps 100     # shorter",
    )
    p.add_argument("--out", default="runs/quickstart", help="output folder (default runs/quickstart)")
    p.add_argument("--steps", type=int, default=800, help="training steps (default 800)")
    p.add_argument("--vocab-size", type=int, default=4000, help="tokenizer size (default 4000)")
    p.add_argument("--block-size", type=int, default=128, help="tokens per training block (default 128)")
    p.add_argument("--batch-size", type=int, default=16, help="blocks per step (default 16)")
    p.add_argument("--seed", type=int, default=42, help="random seed of the tokenizer, the model and the batches")
    p.add_argument("--prompt", default=None, help="text to continue at the end (default: 'Return a new list')")
    p.set_defaults(func=_cmd_quickstart)

    p = sub.add_parser(
        "train-tokenizer",
        help="train a SentencePiece unigram (or tokenizers) model, or wrap a .model, as a transformers tokenizer",
        formatter_class=RAW,
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


# ----------------------------------------------------------------------------------------------------------------------
# convert
# ----------------------------------------------------------------------------------------------------------------------
def _cmd_convert(args: argparse.Namespace) -> int:
    if args.source == "original":
        if not args.checkpoint or not args.hparams:
            raise ValueError("--from original needs --checkpoint C.pth and --hparams H (.pkl or .json)")
        from .convert import convert_original

        model = convert_original(args.checkpoint, args.hparams, args.out)
        n = sum(p.numel() for p in model.parameters())
        print(f"converted {args.checkpoint} -> {args.out} ({n:,} parameters, {model.config.num_hidden_layers} layers)")
        return 0
    if args.source == "port":
        if not args.path:
            raise ValueError("--from port needs PATH (a folder with config.json + weights)")
        from .convert import convert_port, port_tokenizer_class

        model = convert_port(args.path, args.out)
        n = sum(p.numel() for p in model.parameters())
        print(f"converted {args.path} -> {args.out} ({n:,} parameters, {model.config.num_hidden_layers} layers)")
        tok_cls = port_tokenizer_class(args.out)
        if tok_cls and tok_cls.startswith("Pldrllm"):
            print(f"note: tokenizer_config.json names the port's tokenizer class {tok_cls!r}, which plain transformers "
                  "does not know; the tokenizer files were copied unchanged")
        return 0
    raise ValueError(f"unknown --from {args.source!r}")


def _add_convert_command(sub) -> None:
    p = sub.add_parser(
        "convert",
        help="import a checkpoint of the original PLDR-LLM implementation (or a port-format folder) into a transformers folder",
        formatter_class=RAW,
        epilog="examples:\n  pldr-hf convert --from original --checkpoint model.pth --hparams model_hparams.pkl --out runs/imported"
               "\n  pldr-hf convert --from port path/to/PLDR-LLM-v51-110M-1 --out runs/v51",
    )
    p.add_argument("--from", dest="source", choices=["original", "port"], required=True,
                   help="checkpoint format: 'original' (.pth + hparams) or 'port' (a published PLDR-LLM-v51 folder)")
    p.add_argument("path", nargs="?", help="--from port: folder with config.json (model_type pldrllm) and weights")
    p.add_argument("--checkpoint", help="original .pth checkpoint (read with weights_only=True)")
    p.add_argument("--hparams", help="original _hparams.pkl (read with a restricted unpickler) or a JSON with the same keys")
    p.add_argument("--out", required=True, help="output folder (config.json + model.safetensors)")
    p.set_defaults(func=_cmd_convert)


# ----------------------------------------------------------------------------------------------------------------------
# eval, lm-eval, inspect, export-g
# ----------------------------------------------------------------------------------------------------------------------
def _check_model_and_device(args: argparse.Namespace) -> None:
    """Fails fast, before torch/transformers/lm-eval load, on a bad model folder, tokenizer or device."""
    from .checks import check_device, check_model_dir, check_tokenizer_dir

    check_model_dir(args.model_dir)
    if getattr(args, "tokenizer", None):
        check_tokenizer_dir(args.tokenizer)
    check_device(getattr(args, "device", None))


class _CustomDatasetNotice:
    """logging.Filter for lm-eval's notice "<task>: Custom kwargs can be passed to `--metadata` ...", which it logs
    for every task that builds its dataset in Python (our offline tasks do, they take no kwargs): dropped for the
    tasks shipped with pldr-hf, kept for any other."""

    def filter(self, record) -> bool:
        msg = record.getMessage()
        return not (msg.startswith("pldr_") and "Custom kwargs can be passed to `--metadata`" in msg)


def _quiet_lm_eval() -> None:
    """Silences two lines of lm-eval that read like failures but are none, narrowly: the notice above, and git's
    "fatal: not a git repository" when lm-eval asks git for a commit hash outside a repository (same hash, or None)."""
    import logging
    import subprocess

    task_logger = logging.getLogger("lm_eval.api.task")
    if not any(isinstance(f, _CustomDatasetNotice) for f in task_logger.filters):
        task_logger.addFilter(_CustomDatasetNotice())
    import lm_eval.evaluator as evaluator

    def git_commit_hash():  # lm_eval.loggers.utils.get_git_commit_hash, with git's stderr captured
        try:
            out = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True, check=True)
            return out.stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            from lm_eval.loggers.utils import get_commit_from_path

            return get_commit_from_path(Path.cwd())

    evaluator.get_git_commit_hash = git_commit_hash


def _cmd_eval(args: argparse.Namespace) -> int:
    _check_model_and_device(args)
    from .evaluation import run_offline_eval

    _quiet_lm_eval()
    out = args.out or str(Path(args.model_dir) / "eval" / "results.json")
    res = run_offline_eval(args.model_dir, tasks=args.tasks.split(","), out=out, tokenizer=args.tokenizer,
                           batch_size=args.batch_size, device=args.device, limit=args.limit,
                           g_cache=args.g_cache, g_prompt=args.g_prompt, g_file=args.g_file)
    from lm_eval.utils import make_table

    from .evaluation import format_g_cache_comparison

    print(make_table(res))
    g = res["pldr_g_cache"]
    if "comparison" in g:
        print(format_g_cache_comparison(g["comparison"]))
    for mode, meaning in g["meaning"].items():
        print(f"G-cache {mode}: {meaning}" + (f" ({g['g_source']})" if mode == "on" else ""))
    print(f"results: {res['results_file']}")
    return 0


def _cmd_lm_eval(args: argparse.Namespace) -> int:
    from .checks import check_device

    argv = list(args.lm_eval_args)
    if argv and argv[0] == "--":
        argv = argv[1:]
    for i, a in enumerate(argv):  # lm-eval's --device, checked before lm-eval loads
        if a == "--device" and i + 1 < len(argv):
            check_device(argv[i + 1])
        elif a.startswith("--device="):
            check_device(a.split("=", 1)[1])
    import pldr_hf.evaluation as ev  # registers lm-eval model "pldr"
    from lm_eval.__main__ import cli_evaluate

    _quiet_lm_eval()
    if "--include_path" not in argv:
        argv += ["--include_path", ev.tasks_dir()]
    sys.argv = ["lm_eval", *argv]
    cli_evaluate()
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .deductive import read_prompts

    prompts = read_prompts(args.prompts)
    _check_model_and_device(args)
    from .deductive import inspect_prompts, load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(args.model_dir, args.tokenizer, args.device)
    rep = inspect_prompts(model, tok, prompts, args.out)
    print(json.dumps(rep["summary"], indent=2))
    print(f"wrote {args.out}/report.json and " + ", ".join(v for k, v in rep["files"].items() if k != "tensors"))
    return 0


def _cmd_export_g(args: argparse.Namespace) -> int:
    _check_model_and_device(args)
    from .deductive import export_g

    rep = export_g(args.model_dir, args.prompt, args.out, tokenizer=args.tokenizer, device=args.device,
                   bench_seq_len=args.bench_seq_len, bench_batch=args.bench_batch)
    print(json.dumps(rep, indent=2))
    return 0


def _add_evaluation_commands(sub) -> None:
    """Evaluation and deductive outputs: `eval`, `lm-eval`, `inspect`, `export-g`."""
    tokenizer_help = "tokenizer folder, when the model folder has none (default: the model folder)"
    p = sub.add_parser("eval", help="run lm-eval tasks (default: the offline tasks shipped with pldr-hf) on a saved model",
                       formatter_class=RAW,
                       epilog="examples:\n  pldr-hf eval runs/tiny --tasks pldr_offline --out runs/tiny/eval\n"
                              "  pldr-hf eval runs/v51 --tasks pldrllm_zeroshot --device cuda   # the papers' suite (Hub)")
    p.add_argument("model_dir", help="saved model folder (config.json, weights, tokenizer)")
    p.add_argument("--tasks", default="pldr_offline", help="comma-separated lm-eval tasks/groups (default pldr_offline)")
    p.add_argument("--out", default=None, help="results JSON file or folder (default MODEL_DIR/eval/results.json)")
    p.add_argument("--tokenizer", default=None, help=tokenizer_help)
    p.add_argument("--batch-size", type=int, default=8, help="requests scored per forward pass (default 8)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--limit", type=int, default=None, help="at most this many documents per task")
    p.add_argument("--g-cache", choices=["off", "on", "both"], default="both",
                   help="off: each request deduces its own G; on: one G (from --g-prompt or --g-file) serves every "
                        "request, the metric learner skipped (the paper's G-cache); both (default): both, compared")
    p.add_argument("--g-prompt", default=None, help="text whose G serves every request with the G-cache on "
                                                    "(default: 'The quick brown fox jumps over the lazy dog.')")
    p.add_argument("--g-file", default=None, help="a G file (pldr-hf export-g) to use with the G-cache on instead")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("lm-eval", help="the stock lm_eval CLI with model 'pldr' registered and the offline tasks included",
                       formatter_class=RAW,
                       epilog="example:\n  pldr-hf lm-eval -- --model pldr --model_args pretrained=runs/tiny --tasks arc_easy")
    p.add_argument("lm_eval_args", nargs=argparse.REMAINDER, help="arguments passed to lm_eval unchanged")
    p.set_defaults(func=_cmd_lm_eval)

    p = sub.add_parser("inspect", help="G_LM / A_LM per layer and head across prompts, G-cache invariance, PNG heatmaps",
                       formatter_class=RAW,
                       epilog="example:\n  pldr-hf inspect runs/tiny --prompts prompts.txt --out report/")
    p.add_argument("model_dir", help="saved model folder (config.json, weights, tokenizer)")
    p.add_argument("--prompts", required=True, help="text file, one prompt a line (at least 2)")
    p.add_argument("--out", required=True, help="output folder (report.json, *.png, deductive_tensors.safetensors)")
    p.add_argument("--tokenizer", default=None, help=tokenizer_help)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ... (default cpu)")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("export-g", help="write one prompt's G as a G file for custom_G_type='external' (G-only) inference",
                       formatter_class=RAW,
                       epilog="example:\n  pldr-hf export-g runs/tiny --prompt 'The quick brown fox' --out g.safetensors")
    p.add_argument("model_dir", help="saved model folder of a learned-G PLDR-LLM (config.json, weights, tokenizer)")
    p.add_argument("--prompt", required=True, help="the text whose G (per layer A, A_LM, G_LM) is written")
    p.add_argument("--out", required=True, help="G file to write (.safetensors)")
    p.add_argument("--tokenizer", default=None, help=tokenizer_help)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ... (default cpu)")
    p.add_argument("--bench-seq-len", type=int, default=None, help="sequence length of the timing (default min(max_pos, 512))")
    p.add_argument("--bench-batch", type=int, default=1, help="batch size of the timing (default 1)")
    p.set_defaults(func=_cmd_export_g)


# ----------------------------------------------------------------------------------------------------------------------
# push
# ----------------------------------------------------------------------------------------------------------------------
def _cmd_push(args: argparse.Namespace) -> int:
    from .checks import check_model_dir

    check_model_dir(args.model_dir)
    from .hub import CardOptions, HubUploadError, push

    options = CardOptions(repo_id=args.repo_id, license=args.license, language=args.language or ["en"],
                          datasets=args.dataset or [], base_model=args.base_model, tags=args.tag or [],
                          eval_results=args.eval_results, model_name=args.model_name)
    try:
        folder, report, info = push(args.model_dir, options, private=args.private, revision=args.revision,
                                    commit_message=args.commit_message, dry_run=args.dry_run, token=args.token,
                                    endpoint=args.endpoint, check=not args.no_check)
    except HubUploadError as e:
        print(f"pldr-hf push: error: {e}", file=sys.stderr)
        return 1
    if folder is not None:
        print(f"dry run: wrote {folder} ({', '.join(report['files'])})")
        print(f"validated: card metadata parses; loads with trust_remote_code=True without pldr_hf "
              f"({report['remote']['model_class']}, max |logits diff| {report['max_abs_diff']:.2g})")
    else:
        print(f"uploaded to {info.commit_url}")
    return 0


def _add_publish_command(sub) -> None:
    p = sub.add_parser(
        "push",
        help="publish a model folder on the Hugging Face Hub (model card, remote code, weights), or --dry-run it",
        formatter_class=RAW,
        epilog="examples:\n  pldr-hf push runs/tiny --repo-id me/pldr-tiny --dry-run out/\n"
               "  pldr-hf push runs/tiny --repo-id me/pldr-tiny --private --revision dev --eval-results results.json",
    )
    p.add_argument("model_dir", help="a saved PLDR-LLM folder (config.json + weights [+ tokenizer, trainer_state.json])")
    p.add_argument("--repo-id", required=True, help="Hub repository, e.g. me/pldr-tiny")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.add_argument("--revision", help="branch to commit to (created if missing); default main")
    p.add_argument("--commit-message", help="commit message")
    p.add_argument("--dry-run", metavar="OUT", help="write the repository folder to OUT and validate it; upload nothing")
    p.add_argument("--license", default="apache-2.0", help="card license (default apache-2.0)")
    p.add_argument("--language", action="append", help="card language (repeatable; default en)")
    p.add_argument("--dataset", action="append", help="training dataset id for the card (repeatable)")
    p.add_argument("--base-model", help="card base_model (e.g. the checkpoint this one was fine-tuned from)")
    p.add_argument("--tag", action="append", help="extra card tag (repeatable)")
    p.add_argument("--eval-results", help="lm-eval results JSON: becomes the card's model-index")
    p.add_argument("--model-name", help="name in the card (default: the repository name)")
    p.add_argument("--token", help="Hub token (default: HF_TOKEN or the stored login)")
    p.add_argument("--endpoint", help="Hub endpoint (default: HF_ENDPOINT or https://huggingface.co)")
    p.add_argument("--no-check", action="store_true", help="skip the remote-code load check before uploading")
    p.set_defaults(func=_cmd_push)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pldr-hf",
        description="PLDR-LLM as a Hugging Face transformers model: train, convert, evaluate, inspect, publish.",
        formatter_class=RAW,
        epilog="start with:\n  pldr-hf quickstart        # tokenizer + tiny PLDR-LLM on a CPU, "
               f"{QUICKSTART_TIME}\n  pldr-hf <command> --help  # options and an example of each command",
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    _add_training_commands(sub)
    _add_convert_command(sub)
    _add_evaluation_commands(sub)
    _add_publish_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from .checks import input_errors, report_error

    try:
        return args.func(args)
    except input_errors() as e:
        return report_error(f"pldr-hf {args.command}", e)


if __name__ == "__main__":
    sys.exit(main())
