"""Causal-LM fine-tuning of a saved PLDR-LLM: full, or LoRA adapters through ``peft``.

LoRA targets, named for this architecture: the PLGA projections ``mha1.wq/wk/wv/dense`` and the feed-forward SwiGLU
``ffn.gluw1/gluw2/gluw3`` of every decoder layer (the metric learner's small d x d GLUs and the power-law tensors stay
frozen). Adapters are saved in ``output_dir``; with ``merge=True`` they are also merged into a standalone model in
``output_dir/merged`` that loads with ``AutoModelForCausalLM.from_pretrained`` and no ``peft``.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from .training import DataArguments, PldrTrainer, PldrTrainingArguments, prepare_datasets

# Module paths of the LoRA targets (a regex that peft matches against the full module name).
LORA_TARGETS = {
    "wq": r"mha1\.wq", "wk": r"mha1\.wk", "wv": r"mha1\.wv", "dense": r"mha1\.dense",
    "gluw1": r"ffn\.gluw1", "gluw2": r"ffn\.gluw2", "gluw3": r"ffn\.gluw3",
}


def lora_target_regex(names: str) -> str:
    parts = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in parts if n not in LORA_TARGETS]
    if unknown or not parts:
        raise ValueError(f"--lora_target_modules: unknown {unknown or names!r}; choose from {sorted(LORA_TARGETS)}")
    return r".*\.dec_layers\.\d+\.(" + "|".join(LORA_TARGETS[n] for n in parts) + r")$"


@dataclass
class FinetuneArguments:
    model_name_or_path: str = field(default=None, metadata={"help": "saved PLDR-LLM folder (with its tokenizer)"})
    tokenizer_name_or_path: str | None = field(default=None, metadata={"help": "tokenizer (default: the model folder)"})
    use_lora: bool = field(default=False, metadata={"help": "train LoRA adapters instead of all weights"})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank"})
    lora_alpha: float = field(default=16, metadata={"help": "LoRA alpha"})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout"})
    lora_target_modules: str = field(default="wq,wk,wv,dense,gluw1,gluw2,gluw3",
                                     metadata={"help": f"comma-separated, from {sorted(LORA_TARGETS)}"})
    merge: bool = field(default=False, metadata={"help": "also save the adapters merged into a standalone model"})


@contextlib.contextmanager
def _peft_quiet():
    """peft reads ``model.is_gradient_checkpointing``, which transformers 5.x deprecates with a FutureWarning on every
    wrap: third-party noise (peft vs transformers), ignored here and only here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def add_lora(model, args: FinetuneArguments):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                        target_modules=lora_target_regex(args.lora_target_modules), bias="none", task_type="CAUSAL_LM")
    with _peft_quiet():
        return get_peft_model(model, config)


def finetune(ft_args: FinetuneArguments, data_args: DataArguments, training_args: PldrTrainingArguments):
    """Fine-tunes and saves; returns (trainer, merged_dir or None)."""
    from transformers import AutoModelForCausalLM, default_data_collator, set_seed

    from .checks import check_training_inputs
    from .tokenizer import load_tokenizer

    if not ft_args.model_name_or_path:
        raise ValueError("--model_name_or_path is required: the saved PLDR-LLM folder to fine-tune")
    if ft_args.merge and not ft_args.use_lora:
        raise ValueError("--merge applies to LoRA adapters: add --use_lora")
    check_training_inputs(ft_args, data_args)  # model folder, tokenizer, corpus files: one clear line each
    set_seed(training_args.seed)
    tokenizer = load_tokenizer(ft_args.tokenizer_name_or_path or ft_args.model_name_or_path)
    model = AutoModelForCausalLM.from_pretrained(ft_args.model_name_or_path)
    with training_args.main_process_first(desc="corpus"):
        train, val, block = prepare_datasets(data_args, tokenizer, model.config, training_args.seed)
    if ft_args.use_lora:
        model = add_lora(model, ft_args)
        if training_args.process_index == 0:
            model.print_trainable_parameters()
    trainer = PldrTrainer(model=model, args=training_args, train_dataset=train, eval_dataset=val,
                          processing_class=tokenizer, data_collator=default_data_collator)
    trainer._block_size = block
    trainer.train()
    trainer.save_model()  # the adapters only (adapter_config.json + adapter_model.safetensors) with LoRA
    merged_dir = None
    if ft_args.merge and trainer.is_world_process_zero():
        merged_dir = Path(training_args.output_dir) / "merged"
        from peft import PeftModel

        # Merge from the saved files (base folder + saved adapters), leaving the trained PeftModel untouched.
        base = AutoModelForCausalLM.from_pretrained(ft_args.model_name_or_path)
        with _peft_quiet():
            merged = PeftModel.from_pretrained(base, training_args.output_dir).merge_and_unload()
        merged.save_pretrained(merged_dir)
        tokenizer.save_pretrained(merged_dir)
    return trainer, merged_dir
