#!/usr/bin/env python
"""Pretrain a PLDR-LLM with transformers' Trainer (in the style of transformers' examples/pytorch/run_clm.py).

Defaults are the original's recipe: AdamW (0.9, 0.95), eps 1e-5, weight decay 0.1, peak lr 1e-3 with linear warm-up
then cosine decay to 0.1 x peak (cosine_with_min_lr), gradients clipped by value at 1.0 (--clip_grad_value; Trainer's
norm clipping --max_grad_norm is off), bf16 on a GPU, documents joined with EOS and packed into blocks of the context
length. `--preset pldr-110m` also warms up for 2000 steps (as the papers' 110M runs) unless --warmup_steps is given.
Optional: the DAG regulariser (--dag_preset paper|v510_dag, or --dag_coeffs cA cAp cG) and document-masked packing
(--document_masking).

Examples:
  pldr-hf train-tokenizer --corpus corpus.txt --vocab-size 8000 --out runs/tok
  python scripts/pretrain.py --preset tiny --tokenizer_name_or_path runs/tok --train_file corpus.txt \\
      --block_size 128 --per_device_train_batch_size 16 --max_steps 200 --output_dir runs/tiny
  python scripts/pretrain.py --preset pldr-110m --tokenizer_name_or_path refinedweb-32k-pldr.model \\
      --train_file corpus.txt --per_device_train_batch_size 16 --max_steps 250000 --dag_preset v510_dag ...
  accelerate launch --config_file configs/accelerate_fsdp.yaml scripts/pretrain.py --preset pldr-110m ...
  python scripts/pretrain.py ... --output_dir runs/tiny --resume       # continue from the last checkpoint
"""

import sys
from dataclasses import dataclass, field

from transformers import HfArgumentParser

import pldr_hf  # noqa: F401  (registers the model with the Auto classes)
from pldr_hf.checks import check_training_inputs, input_errors, report_error
from pldr_hf.training import (
    PRESET_TRAINING_DEFAULTS,
    DataArguments,
    ModelArguments,
    PldrTrainingArguments,
    perplexity,
    pretrain,
)


@dataclass
class RunArguments:
    resume: bool = field(default=False, metadata={"help": "resume from the last checkpoint in --output_dir"})
    resume_from: str | None = field(default=None, metadata={"help": "resume from this checkpoint folder"})
    eval_before: bool = field(default=False, metadata={"help": "report held-out loss before training too"})


def _preset_in(argv) -> str | None:
    for i, a in enumerate(argv):
        if a == "--preset" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--preset="):
            return a.split("=", 1)[1]
    return None


def parse(argv=None):
    """(model_args, data_args, training_args, run_args) from the command line or one JSON file; ValueError if invalid."""
    parser = HfArgumentParser((ModelArguments, DataArguments, PldrTrainingArguments, RunArguments))
    args = sys.argv[1:] if argv is None else list(argv)
    if len(args) == 1 and args[0].endswith(".json"):
        return parser.parse_json_file(args[0])
    # A preset's training defaults (e.g. pldr-110m's 2000 warm-up steps) apply unless the command line sets them.
    parser.set_defaults(**PRESET_TRAINING_DEFAULTS.get(_preset_in(args), {}))
    return parser.parse_args_into_dataclasses(args=args)


def main(argv=None):
    try:
        model_args, data_args, training_args, run_args = parse(argv)
    except ValueError as e:  # argument validation (e.g. the removed --dag_weight, clip by value and by norm)
        return report_error("pretrain.py", e)
    try:
        resume = run_args.resume_from or (True if run_args.resume else None)
        check_training_inputs(model_args, data_args)
        trainer = pretrain(model_args, data_args, training_args, resume=resume, eval_before=run_args.eval_before)
    except input_errors() as e:
        return report_error("pretrain.py", e)
    metrics = trainer.evaluate()
    if trainer.is_world_process_zero():
        loss = metrics["eval_loss"]
        print(f"[pldr-hf] held-out loss {loss:.4f}, perplexity {perplexity(loss):.2f}; saved to {training_args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
