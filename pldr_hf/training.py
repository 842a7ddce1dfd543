"""Training recipe for PLDR-LLM on transformers' Trainer: presets, the papers' optimiser/schedule defaults, and the
DAG regulariser of arXiv 2410.16703 on the deductive outputs.

DAG regulariser (section 2.2 of arXiv 2410.16703, after NOTEARS, Zheng et al. 2018): a square matrix M (d x d) is the
weighted adjacency matrix of a directed acyclic graph iff ``h(M) = tr(exp(M * M)) - d = 0`` (``*`` elementwise). The
paper adds the mean absolute value of h over all attention heads of three deductive outputs, A_LM, the power
exponents P (``A_P``) and G_LM, to the cross-entropy loss. Here::

    dag_loss = mean|h(A_LM)| + mean|h(P)| + mean|h(G_LM)|     (means over layers, heads and batch rows)
    loss     = cross_entropy + dag_weight * dag_loss

computed in float32. ``dag_weight = 0`` (default) trains without it; ``log_dag=True`` logs dag_loss as a metric only.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import SaveStrategy, SchedulerType

from .modeling import PldrConfig

# ----------------------------------------------------------------------------------------------------------------------
# Presets
# ----------------------------------------------------------------------------------------------------------------------
PRESETS = {
    # PLDR-LLM-v51-110M of arXiv 2502.13502: the PldrConfig defaults.
    "pldr-110m": {},
    # A small model that trains in minutes on a laptop CPU.
    "tiny": dict(hidden_size=128, num_attention_heads=4, head_dim=32, num_hidden_layers=2, intermediate_size=341,
                 A_dff=48, num_reslayerA=2, num_denseA=2, max_position_embeddings=256),
}


def preset_config(name: str, **overrides) -> PldrConfig:
    """PldrConfig of a named preset, with ``overrides`` (e.g. ``vocab_size``) applied."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PldrConfig(**{**PRESETS[name], **overrides})


# ----------------------------------------------------------------------------------------------------------------------
# DAG regulariser
# ----------------------------------------------------------------------------------------------------------------------
def dag_acyclicity(M: torch.Tensor) -> torch.Tensor:
    """NOTEARS acyclicity ``h(M) = tr(exp(M * M)) - d`` for every d x d matrix in the last two dims (float32)."""
    if M.dim() < 2 or M.shape[-1] != M.shape[-2]:
        raise ValueError(f"dag_acyclicity needs square matrices in the last two dims, got shape {tuple(M.shape)}")
    M = M.float()
    return torch.linalg.matrix_exp(M * M).diagonal(dim1=-2, dim2=-1).sum(-1) - M.shape[-1]


def dag_loss(pldr_attentions) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DAG loss of the deductive outputs (one :class:`PldrDeductiveOutputs` per layer): the sum over A_LM, P, G_LM of
    the mean over layers, heads and batch rows of ``|h(.)|``. Returns (loss, per-tensor parts)."""
    if not pldr_attentions:
        raise ValueError("dag_loss needs the deductive outputs: call the model with output_pldr_attentions=True")
    parts = {}
    for key, attr in (("A_LM", "A_LM"), ("P", "power_exponents"), ("G_LM", "G_LM")):
        vals = [dag_acyclicity(getattr(d, attr)).abs().mean() for d in pldr_attentions if getattr(d, attr) is not None]
        if vals:
            parts[key] = torch.stack(vals).mean()
    if not parts:
        raise ValueError("dag_loss: the model has no learned deductive outputs (custom_G_type is set)")
    return sum(parts.values()), parts


# ----------------------------------------------------------------------------------------------------------------------
# Training arguments with the papers' recipe as defaults
# ----------------------------------------------------------------------------------------------------------------------
def _bf16_default() -> bool:
    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


@dataclass
class PldrTrainingArguments(TrainingArguments):
    """``TrainingArguments`` whose defaults are the PLDR-LLM pretraining recipe (arXiv 2410.16703 / 2502.13502):
    AdamW (0.9, 0.95), eps 1e-5, weight decay 0.1, linear warm-up then cosine decay to ``min_lr_rate`` x lr, gradient
    clipping at 1.0, bf16 when a GPU supports it; plus ``dag_weight`` / ``log_dag`` for the DAG regulariser."""

    output_dir: str | None = field(default="runs/pretrain", metadata={"help": "where checkpoints and the model go"})
    learning_rate: float = field(default=1e-3, metadata={"help": "peak learning rate"})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    adam_beta2: float = field(default=0.95, metadata={"help": "AdamW beta2"})
    adam_epsilon: float = field(default=1e-5, metadata={"help": "AdamW epsilon"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm"})
    lr_scheduler_type: SchedulerType | str = field(default="cosine_with_min_lr", metadata={"help": "learning rate schedule"})
    lr_scheduler_kwargs: dict | str | None = field(
        default_factory=lambda: {"min_lr_rate": 0.1},
        metadata={"help": "schedule options; min_lr_rate is the floor as a fraction of the peak lr (lr_alpha)"},
    )
    warmup_steps: float = field(default=0.05, metadata={"help": "warm-up steps (an int) or fraction of all steps (<1)"})
    bf16: bool = field(default_factory=_bf16_default, metadata={"help": "bf16 mixed precision (default: on a GPU)"})
    logging_steps: float = field(default=10, metadata={"help": "log every N steps"})
    save_strategy: SaveStrategy | str = field(default="steps", metadata={"help": "checkpoint strategy"})
    save_steps: float = field(default=500, metadata={"help": "checkpoint every N steps"})
    save_total_limit: int | None = field(default=2, metadata={"help": "checkpoints kept"})
    report_to: None | str | list[str] = field(default="none", metadata={"help": "experiment trackers"})
    dag_weight: float = field(default=0.0, metadata={"help": "weight of the DAG regulariser (0: off)"})
    log_dag: bool = field(default=False, metadata={"help": "log the DAG loss as a metric even when dag_weight is 0"})


# ----------------------------------------------------------------------------------------------------------------------
# Trainer
# ----------------------------------------------------------------------------------------------------------------------
class PldrTrainer(Trainer):
    """Trainer that adds the DAG regulariser (``args.dag_weight``) and logs ``lm_loss``, ``dag_loss`` and
    ``tokens_per_second`` beside the loss."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._dag_sum = 0.0
        self._lm_sum = 0.0
        self._n_micro = 0
        self._last_log = (time.perf_counter(), 0)

    @property
    def _dag_on(self) -> bool:
        return getattr(self.args, "dag_weight", 0.0) > 0 or getattr(self.args, "log_dag", False)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not (self._dag_on and model.training):
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        inputs = {**inputs, "output_pldr_attentions": True}
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        dag, _ = dag_loss(outputs.pldr_attentions)
        # With num_items_in_batch the LM loss of one micro-batch is already a share of the accumulated mean (and is
        # multiplied by the number of processes when tokens are averaged across devices); scale the DAG term alike.
        scale = 1.0
        if num_items_in_batch is not None and self.model_accepts_loss_kwargs:
            scale = 1.0 / self.current_gradient_accumulation_steps
            if self.args.average_tokens_across_devices:
                scale *= self.accelerator.num_processes
        self._dag_sum += float(dag.detach())
        self._n_micro += 1
        weight = getattr(self.args, "dag_weight", 0.0)
        if weight > 0:
            loss = loss + weight * scale * dag
        return (loss, outputs) if return_outputs else loss

    def log(self, logs, *args, **kwargs):
        if "loss" in logs:
            now, step = time.perf_counter(), self.state.global_step
            t0, s0 = self._last_log
            if step > s0 and now > t0:
                ws = self.args.world_size
                tokens = (step - s0) * self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps * ws
                block = getattr(self, "_block_size", None)
                if block:
                    logs["tokens_per_second"] = round(tokens * block / (now - t0), 1)
            self._last_log = (now, step)
            if self._dag_on and self._n_micro:
                d = self._dag_sum / self._n_micro
                logs["dag_loss"] = round(d, 6)
                logs["lm_loss"] = round(logs["loss"] - getattr(self.args, "dag_weight", 0.0) * d, 6)
                self._dag_sum, self._n_micro = 0.0, 0
        return super().log(logs, *args, **kwargs)


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 50 else float("inf")


# ----------------------------------------------------------------------------------------------------------------------
# The pretraining recipe (scripts/pretrain.py and `pldr-hf quickstart` call this)
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class ModelArguments:
    """Which model to train."""

    preset: str | None = field(default=None, metadata={"help": f"a config preset: {sorted(PRESETS)}"})
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "a saved PLDR-LLM folder to continue from (instead of --preset)"}
    )
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "tokenizer folder, or a SentencePiece .model (default: the model folder)"}
    )
    config_overrides: str | None = field(
        default=None, metadata={"help": "comma-separated key=value overrides of the preset, e.g. num_hidden_layers=3"}
    )
    attn_implementation: str = field(default="sdpa", metadata={"help": "sdpa, eager or flash_attention_2"})


@dataclass
class DataArguments:
    """Which corpus to train on."""

    train_file: list[str] | None = field(default=None, metadata={"help": "local .txt/.json/.jsonl/.csv/.parquet files"})
    validation_file: list[str] | None = field(default=None, metadata={"help": "held-out files (default: tail split)"})
    dataset_name: str | None = field(
        default=None, metadata={"help": "a datasets name (installed, local folder, or Hub when reachable)"}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "the dataset's config name"})
    text_column: str = field(default="text", metadata={"help": "column holding the text"})
    block_size: int | None = field(default=None, metadata={"help": "tokens per packed block (default: the context)"})
    validation_split_percentage: float = field(default=5.0, metadata={"help": "percent of train held out if no validation"})
    max_train_samples: int | None = field(default=None, metadata={"help": "keep only the first N packed blocks"})
    max_eval_samples: int | None = field(default=None, metadata={"help": "evaluate on the first N packed blocks"})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "processes for tokenising"})


def _parse_overrides(text: str | None) -> dict:
    out = {}
    for item in filter(None, (text or "").split(",")):
        if "=" not in item:
            raise ValueError(f"--config_overrides: expected key=value, got {item!r}")
        k, v = (s.strip() for s in item.split("=", 1))
        if k not in PldrConfig.__annotations__ and not hasattr(PldrConfig(), k):
            raise ValueError(f"--config_overrides: PldrConfig has no key {k!r}")
        for cast in (int, float):
            try:
                v = cast(v)
                break
            except ValueError:
                pass
        else:
            v = {"true": True, "false": False, "none": None}.get(v.lower(), v)
        out[k] = v
    return out


def build_model_and_tokenizer(model_args: ModelArguments):
    """Returns (model, tokenizer) from a preset (+ tokenizer) or a saved folder."""
    from transformers import AutoModelForCausalLM

    from .tokenizer import load_tokenizer

    if bool(model_args.preset) == bool(model_args.model_name_or_path):
        raise ValueError("give exactly one of --preset NAME or --model_name_or_path FOLDER")
    tok_path = model_args.tokenizer_name_or_path or model_args.model_name_or_path
    if not tok_path:
        raise ValueError("--preset needs --tokenizer_name_or_path (a tokenizer folder or SentencePiece .model; "
                         "`pldr-hf train-tokenizer` makes one)")
    tokenizer = load_tokenizer(tok_path)
    if model_args.preset:
        if model_args.preset not in PRESETS:
            raise ValueError(f"unknown preset {model_args.preset!r}; choose one of {sorted(PRESETS)}")
        overrides = {"vocab_size": len(tokenizer), **_parse_overrides(model_args.config_overrides)}
        config = preset_config(model_args.preset, **overrides)
        config._attn_implementation = model_args.attn_implementation
        from .modeling import PldrForCausalLM

        model = PldrForCausalLM(config)
    else:
        from pathlib import Path

        if not Path(model_args.model_name_or_path).is_dir():
            raise FileNotFoundError(f"model folder not found: {model_args.model_name_or_path}")
        model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path,
                                                     attn_implementation=model_args.attn_implementation)
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {model.config.vocab_size}")
    return model, tokenizer


def prepare_datasets(data_args: DataArguments, tokenizer, model_config, seed: int = 42):
    from .data import load_corpus, pack_corpus

    block = data_args.block_size or model_config.max_position_embeddings
    if block > model_config.max_position_embeddings:
        raise ValueError(f"--block_size {block} is larger than the model's context "
                         f"(max_position_embeddings={model_config.max_position_embeddings})")
    raw = load_corpus(data_args.train_file, data_args.dataset_name, data_args.dataset_config_name,
                      data_args.validation_file, data_args.validation_split_percentage, data_args.text_column, seed)
    packed = pack_corpus(raw, tokenizer, block, data_args.text_column, data_args.preprocessing_num_workers)
    train, val = packed["train"], packed["validation"]
    if data_args.max_train_samples:
        train = train.select(range(min(len(train), data_args.max_train_samples)))
    if data_args.max_eval_samples:
        val = val.select(range(min(len(val), data_args.max_eval_samples)))
    return train, val, block


def last_checkpoint(output_dir: str) -> str | None:
    from pathlib import Path

    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(output_dir) if Path(output_dir).is_dir() else None


def pretrain(model_args: ModelArguments, data_args: DataArguments, training_args: PldrTrainingArguments,
             resume: str | bool | None = None, callbacks=None, eval_before: bool = False, quiet: bool = False):
    """Builds the model, packs the corpus and trains with :class:`PldrTrainer`. ``resume``: a checkpoint folder,
    ``True`` for the last checkpoint in ``output_dir``, or ``None``/``False`` to start fresh. Returns the trainer,
    with ``trainer.eval_before`` / ``trainer.eval_after`` (held-out loss) when there is a validation split."""
    from transformers import default_data_collator, set_seed

    set_seed(training_args.seed)
    model, tokenizer = build_model_and_tokenizer(model_args)
    with training_args.main_process_first(desc="corpus"):
        train, val, block = prepare_datasets(data_args, tokenizer, model.config, training_args.seed)
    if resume is True:
        resume = last_checkpoint(training_args.output_dir)
    trainer = PldrTrainer(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=val,
        processing_class=tokenizer,
        data_collator=default_data_collator,
        callbacks=callbacks,
    )
    trainer._block_size = block
    if quiet:  # the caller prints its own log lines
        from transformers.trainer_callback import PrinterCallback, ProgressCallback

        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
    n_params = sum(p.numel() for p in model.parameters())
    if training_args.process_index == 0:
        print(f"[pldr-hf] model: {n_params / 1e6:.2f}M parameters, {model.config.num_hidden_layers} layers; "
              f"train: {len(train)} blocks x {block} tokens; validation: {len(val)} blocks"
              + (f"; resuming from {resume}" if resume else ""), flush=True)
    trainer.eval_before = trainer.evaluate()["eval_loss"] if eval_before else None
    if eval_before and training_args.process_index == 0:
        print(f"[pldr-hf] held-out loss before training {trainer.eval_before:.4f}, "
              f"perplexity {perplexity(trainer.eval_before):.2f}", flush=True)
    result = trainer.train(resume_from_checkpoint=resume or None)
    trainer.save_model()
    trainer.save_state()
    trainer.train_result = result
    return trainer
