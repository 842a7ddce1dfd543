#!/usr/bin/env python
"""Pretrain a PLDR-LLM with transformers' Trainer (in the style of transformers' examples/pytorch/run_clm.py).

Defaults are the papers' recipe: AdamW (0.9, 0.95), eps 1e-5, weight decay 0.1, linear warm-up then cosine decay to
0.1 x lr, clipping at 1.0, bf16 on a GPU. Optional DAG regulariser on the deductive outputs (--dag_weight).

Examples:
  pldr-hf train-tokenizer --corpus corpus.txt --vocab-size 8000 --out runs/tok
  python scripts/pretrain.py --preset tiny --tokenizer_name_or_path runs/tok --train_file corpus.txt \\
      --block_size 128 --per_device_train_batch_size 16 --max_steps 200 --output_dir runs/tiny
  accelerate launch --config_file configs/accelerate_fsdp.yaml scripts/pretrain.py --preset pldr-110m ...
  python scripts/pretrain.py ... --output_dir runs/tiny --resume       # continue from the last checkpoint
"""

import sys
from dataclasses import dataclass, field

from transformers import HfArgumentParser

import pldr_hf  # noqa: F401  (registers the model with the Auto classes)
from pldr_hf.checks import check_training_inputs, input_errors, report_error
from pldr_hf.training import DataArguments, ModelArguments, PldrTrainingArguments, perplexity, pretrain


@dataclass
class RunArguments:
    resume: bool = field(default=False, metadata={"help": "resume from the last checkpoint in --output_dir"})
    resume_from: str | None = field(default=None, metadata={"help": "resume from this checkpoint folder"})
    eval_before: bool = field(default=False, metadata={"help": "report held-out loss before training too"})


def main(argv=None):
    parser = HfArgumentParser((ModelArguments, DataArguments, PldrTrainingArguments, RunArguments))
    if argv is None and len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        model_args, data_args, training_args, run_args = parser.parse_json_file(sys.argv[1])
    else:
        model_args, data_args, training_args, run_args = parser.parse_args_into_dataclasses(args=argv)
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
