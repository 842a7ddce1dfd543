#!/usr/bin/env python
"""Fine-tune a saved PLDR-LLM as a causal LM on a text/JSON dataset: all weights, or LoRA adapters (peft).

Examples:
  python scripts/finetune.py --model_name_or_path runs/quickstart --train_file my.txt --block_size 128 \\
      --use_lora --learning_rate 1e-3 --max_steps 100 --output_dir runs/ft-lora --merge
  python scripts/finetune.py --model_name_or_path runs/quickstart --train_file my.jsonl --text_column text \\
      --learning_rate 1e-4 --max_steps 100 --output_dir runs/ft-full
The adapters go to --output_dir; with --merge a standalone model goes to --output_dir/merged.

--help lists every TrainingArguments option after this script's own; the few that matter here: --output_dir,
--max_steps (or --num_train_epochs), --learning_rate, --per_device_train_batch_size, --gradient_accumulation_steps,
--warmup_steps, --logging_steps, --save_steps, --eval_strategy steps --eval_steps N, --bf16 (GPU), --seed.
"""

import sys

from transformers import HfArgumentParser

import pldr_hf  # noqa: F401  (registers the model with the Auto classes)
from pldr_hf.checks import input_errors, report_error
from pldr_hf.finetune import FinetuneArguments, finetune
from pldr_hf.training import DataArguments, PldrTrainingArguments, perplexity


def main(argv=None):
    parser = HfArgumentParser((FinetuneArguments, DataArguments, PldrTrainingArguments))
    try:
        ft_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    except ValueError as e:  # e.g. an unknown option or an invalid training argument
        return report_error("finetune.py", e)
    try:
        trainer, merged = finetune(ft_args, data_args, training_args)
    except input_errors() as e:  # a bad folder, file or option: one line, exit status 1
        return report_error("finetune.py", e)
    loss = trainer.evaluate()["eval_loss"]
    if trainer.is_world_process_zero():
        print(f"[pldr-hf] held-out loss {loss:.4f}, perplexity {perplexity(loss):.2f}; saved to {training_args.output_dir}"
              + (f"; merged model in {merged}" if merged else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
