"""Training recipe for PLDR-LLM on transformers' Trainer: presets, the papers' optimiser/schedule/clipping defaults, and
the DAG regulariser of arXiv 2410.16703 on the deductive outputs.

The recipe of the original implementation (and the defaults here): AdamW (0.9, 0.95), eps 1e-5, weight decay 0.1, peak
lr 1e-3 with linear warm-up then cosine decay to 0.1 x peak (transformers' ``cosine_with_min_lr`` schedule,
``min_lr_rate=0.1``), gradients clipped elementwise by value at 1.0 (``--clip_grad_value``; Trainer's own clipping is by
norm, ``--max_grad_norm``, and is off unless asked for), documents joined with EOS and packed into blocks of the
context length (:mod:`pldr_hf.data`).

DAG regulariser (section 2.2 of arXiv 2410.16703; the original v510_dag code): for each layer, batch row and head the
DAG measure ``DL(M) = |log(tr(exp(M * M)) / d)|`` (:func:`pldr_hf.deductive.dag_divergence`) of three deductive
outputs, A_LM, ``A_P = A_LM ** P`` and G_LM, each averaged over layers x batch x heads and weighted by its own
coefficient::

    loss = cross_entropy + cA * DL(A_LM) + cAp * DL(A_P) + cG * DL(G_LM)

``--dag_coeffs cA cAp cG`` or ``--dag_preset paper`` (0.001, 0.005, 0.005: the first paper's script) /
``v510_dag`` (0.05, 0.05, 0.05: the v510_dag sample script). The three terms are logged (``dag_A_LM``,
``dag_A_P``, ``dag_G_LM``) beside ``lm_loss``; ``--log_dag`` logs them without adding them to the loss.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import SaveStrategy, SchedulerType

from .deductive import DAG_TERMS, dag_divergence, dag_terms  # noqa: F401  (dag_divergence re-exported)
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

# Training defaults a preset brings beyond PldrTrainingArguments' (scripts/pretrain.py applies them unless the command
# line sets the option): the papers' 110M runs warm up for 2000-8000 steps (PLDRv51-110M-2: 4000).
PRESET_TRAINING_DEFAULTS = {
    "pldr-110m": {"learning_rate": 1e-3, "warmup_steps": 2000},
    "tiny": {},
}


def preset_config(name: str, **overrides) -> PldrConfig:
    """PldrConfig of a named preset, with ``overrides`` (e.g. ``vocab_size``) applied."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PldrConfig(**{**PRESETS[name], **overrides})


# ----------------------------------------------------------------------------------------------------------------------
# DAG regulariser
# ----------------------------------------------------------------------------------------------------------------------
# Coefficients (cA, cAp, cG) of DL(A_LM), DL(A_P), DL(G_LM) used by the original implementation.
DAG_PRESETS = {
    "paper": (0.001, 0.005, 0.005),     # the first paper's (arXiv 2410.16703) TensorFlow training script
    "v510_dag": (0.05, 0.05, 0.05),     # the v510_dag sample training script of the PyTorch original
}


def dag_loss(pldr_attentions, coeffs=(1.0, 1.0, 1.0)) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The DAG regulariser of the deductive outputs (one :class:`PldrDeductiveOutputs` per layer):
    ``cA * DL(A_LM) + cAp * DL(A_P) + cG * DL(G_LM)``, each DL a mean over layers x batch x heads (float32).
    Returns (weighted sum, {"A_LM", "A_P", "G_LM"} unweighted terms)."""
    if len(coeffs) != 3:
        raise ValueError(f"dag_loss needs 3 coefficients (A_LM, A_P, G_LM), got {list(coeffs)}")
    terms = dag_terms(pldr_attentions)
    return sum(c * terms[k] for c, k in zip(coeffs, DAG_TERMS)), terms


# ----------------------------------------------------------------------------------------------------------------------
# Training arguments with the papers' recipe as defaults
# ----------------------------------------------------------------------------------------------------------------------
def _bf16_default() -> bool:
    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


@dataclass
class PldrTrainingArguments(TrainingArguments):
    """``TrainingArguments`` whose defaults are the PLDR-LLM pretraining recipe (arXiv 2410.16703 / 2502.13502):
    AdamW (0.9, 0.95), eps 1e-5, weight decay 0.1, linear warm-up then cosine decay to ``min_lr_rate`` x lr, gradients
    clipped by value at 1.0 (``clip_grad_value``; norm clipping off), bf16 when a GPU supports it; plus ``dag_coeffs``
    / ``dag_preset`` / ``log_dag`` for the DAG regulariser."""

    output_dir: str | None = field(default="runs/pretrain", metadata={"help": "where checkpoints and the model go"})
    learning_rate: float = field(default=1e-3, metadata={"help": "peak learning rate"})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    adam_beta2: float = field(default=0.95, metadata={"help": "AdamW beta2"})
    adam_epsilon: float = field(default=1e-5, metadata={"help": "AdamW epsilon"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay"})
    max_grad_norm: float = field(
        default=0.0, metadata={"help": "clip the gradients' global norm (Trainer's clipping; off by default: the recipe "
                                       "clips by value, see --clip_grad_value)"}
    )
    clip_grad_value: float | None = field(
        default=None,
        metadata={"help": "clip every gradient element to [-v, v] before the optimiser step, as the original "
                          "(torch.nn.utils.clip_grad_value_). Default 1.0, or off when --max_grad_norm is given; 0: off"},
    )
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
    dag_coeffs: list[float] | None = field(
        default=None,
        metadata={"help": "DAG regulariser: three coefficients cA cAp cG of DL(A_LM), DL(A_P), DL(G_LM) (default: off)"},
    )
    dag_preset: str | None = field(
        default=None,
        metadata={"help": "DAG coefficients of the original: 'paper' (0.001 0.005 0.005) or 'v510_dag' (0.05 0.05 0.05)"},
    )
    log_dag: bool = field(default=False, metadata={"help": "log the three DAG terms even when they are not in the loss"})
    dag_weight: float | None = field(
        default=None, metadata={"help": "removed: use --dag_coeffs cA cAp cG or --dag_preset paper|v510_dag"}
    )

    def __post_init__(self):
        if self.dag_weight is not None:
            raise ValueError(
                "--dag_weight was removed: it weighted tr(exp(M*M)) - d of A_LM, the exponents P and G_LM with one "
                "weight, which is not what the original optimises. The DAG loss is now the original's "
                "DL(M) = |log(tr(exp(M*M))/d)| of A_LM, A_P = A_LM**P and G_LM with one coefficient each: pass "
                "--dag_coeffs cA cAp cG (e.g. --dag_coeffs W W W for one weight W) or --dag_preset paper|v510_dag"
            )
        if self.dag_preset is not None:
            if self.dag_preset not in DAG_PRESETS:
                raise ValueError(f"unknown --dag_preset {self.dag_preset!r}; choose one of {sorted(DAG_PRESETS)}")
            if self.dag_coeffs is not None and tuple(self.dag_coeffs) != DAG_PRESETS[self.dag_preset]:
                raise ValueError("give --dag_preset or --dag_coeffs, not both")
            self.dag_coeffs = list(DAG_PRESETS[self.dag_preset])
        if self.dag_coeffs is not None:
            if len(self.dag_coeffs) != 3 or any(not c >= 0 for c in self.dag_coeffs):
                raise ValueError(f"--dag_coeffs needs three non-negative numbers cA cAp cG, got {self.dag_coeffs}")
            self.dag_coeffs = [float(c) for c in self.dag_coeffs]
        if self.clip_grad_value is None:
            self.clip_grad_value = 0.0 if self.max_grad_norm and self.max_grad_norm > 0 else 1.0
        if self.clip_grad_value < 0:
            raise ValueError(f"--clip_grad_value must be >= 0, got {self.clip_grad_value}")
        if self.clip_grad_value > 0 and self.max_grad_norm and self.max_grad_norm > 0:
            raise ValueError(f"clip by value (--clip_grad_value {self.clip_grad_value}) or by norm (--max_grad_norm "
                             f"{self.max_grad_norm}), not both: set the other to 0")
        super().__post_init__()

    @property
    def dag_in_loss(self) -> bool:
        return bool(self.dag_coeffs) and any(c > 0 for c in self.dag_coeffs)


# ----------------------------------------------------------------------------------------------------------------------
# Trainer
# ----------------------------------------------------------------------------------------------------------------------
class ClipGradValueCallback(TrainerCallback):
    """Clips every gradient element to ``[-clip_value, clip_value]`` right before the optimiser step (after gradient
    accumulation, after Trainer's own norm clipping/measuring, which unscales fp16 gradients first), as the original
    does with ``torch.nn.utils.clip_grad_value_``. The gradient norm Trainer logs is the one before this clipping."""

    def __init__(self, clip_value: float):
        if not clip_value > 0:
            raise ValueError(f"clip_value must be > 0, got {clip_value}")
        self.clip_value = float(clip_value)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        params = [p for p in model.parameters() if p.grad is not None]
        try:
            torch.nn.utils.clip_grad_value_(params, self.clip_value)
        except (RuntimeError, NotImplementedError):  # a foreach kernel missing for some gradient type (e.g. sharded)
            for p in params:
                p.grad.clamp_(-self.clip_value, self.clip_value)


class PldrTrainer(Trainer):
    """Trainer with the PLDR-LLM recipe's extras: gradient clipping by value (``args.clip_grad_value``, through
    :class:`ClipGradValueCallback`), the DAG regulariser (``args.dag_coeffs``), and ``lm_loss``, ``dag_A_LM``,
    ``dag_A_P``, ``dag_G_LM`` and ``tokens_per_second`` in the logs."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        clip = getattr(self.args, "clip_grad_value", 0.0) or 0.0
        if clip > 0:
            if self.args.max_grad_norm and self.args.max_grad_norm > 0:
                raise ValueError("clip_grad_value and max_grad_norm are both set: clip by value or by norm, not both")
            self.add_callback(ClipGradValueCallback(clip))
        self._dag_sums = {k: 0.0 for k in DAG_TERMS}
        self._n_micro = 0
        self._last_log = (time.perf_counter(), 0)

    @property
    def _dag_coeffs(self) -> list[float]:
        return list(getattr(self.args, "dag_coeffs", None) or (0.0, 0.0, 0.0))

    @property
    def _dag_on(self) -> bool:
        return any(c > 0 for c in self._dag_coeffs) or getattr(self.args, "log_dag", False)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not (self._dag_on and model.training):
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        inputs = {**inputs, "output_pldr_attentions": True}
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        dag, terms = dag_loss(outputs.pldr_attentions, self._dag_coeffs)
        # With num_items_in_batch the LM loss of one micro-batch is already a share of the accumulated mean (and is
        # multiplied by the number of processes when tokens are averaged across devices); scale the DAG term alike.
        scale = 1.0
        if num_items_in_batch is not None and self.model_accepts_loss_kwargs:
            scale = 1.0 / self.current_gradient_accumulation_steps
            if self.args.average_tokens_across_devices:
                scale *= self.accelerator.num_processes
        for k in DAG_TERMS:
            self._dag_sums[k] += float(terms[k].detach())
        self._n_micro += 1
        if any(c > 0 for c in self._dag_coeffs):
            loss = loss + scale * dag
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
                means = {k: v / self._n_micro for k, v in self._dag_sums.items()}
                penalty = sum(c * means[k] for c, k in zip(self._dag_coeffs, DAG_TERMS))
                logs["lm_loss"] = round(logs["loss"] - penalty, 6)
                for k in DAG_TERMS:
                    logs[f"dag_{k}"] = round(means[k], 6)
                self._dag_sums = {k: 0.0 for k in DAG_TERMS}
                self._n_micro = 0
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
    document_masking: bool = field(
        default=False,
        metadata={"help": "also give each block position_ids that restart at 0 at every document start, so the model "
                          "keeps the documents of a block apart (default: plain packing, as the original)"},
    )
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
    packed = pack_corpus(raw, tokenizer, block, data_args.text_column, data_args.preprocessing_num_workers,
                         document_masking=data_args.document_masking)
    train, val = packed["train"], packed["validation"]
    if data_args.max_train_samples:
        train = train.select(range(min(len(train), data_args.max_train_samples)))
    if data_args.max_eval_samples:
        val = val.select(range(min(len(val), data_args.max_eval_samples)))
    return train, val, block


def describe_recipe(args, data_args=None) -> str:
    """One line stating the optimiser, schedule, clipping, DAG regulariser and packing of a run."""
    kw = args.lr_scheduler_kwargs if isinstance(args.lr_scheduler_kwargs, dict) else {}
    sched = str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type))
    floor = f" to {kw['min_lr_rate']:g} x peak" if "min_lr_rate" in kw else ""
    clip = (f"clip by value {args.clip_grad_value:g}" if getattr(args, "clip_grad_value", 0) else
            f"clip by norm {args.max_grad_norm:g}" if args.max_grad_norm else "no clipping")
    coeffs = getattr(args, "dag_coeffs", None)
    dag = (f"DAG coeffs A_LM/A_P/G_LM {'/'.join(f'{c:g}' for c in coeffs)}" if coeffs and any(coeffs) else
           "DAG logged only" if getattr(args, "log_dag", False) else "no DAG loss")
    text = (f"AdamW({args.adam_beta1:g}, {args.adam_beta2:g}, eps {args.adam_epsilon:g}, wd {args.weight_decay:g}), "
            f"lr {args.learning_rate:g}, warm-up {args.warmup_steps:g} then {sched}{floor}, {clip}, {dag}")
    if data_args is not None:
        text += ", " + ("document-masked packing" if data_args.document_masking else "plain EOS-joined packing")
    return text


def write_training_record(output_dir, training_args, model_args=None, data_args=None, block_size=None):
    """Writes ``training_args.json`` beside the weights: the TrainingArguments (as JSON, never the pickled
    training_args.bin) plus the data recipe (block size, packing, document masking, preset). The model card
    (:mod:`pldr_hf.hub`) reads its recipe from this file."""
    import json
    from pathlib import Path

    record = json.loads(training_args.to_json_string())
    for key in ("hub_token", "push_to_hub_token"):
        record.pop(key, None)
    if model_args is not None:
        record["preset"] = model_args.preset
        record["config_overrides"] = model_args.config_overrides
    if data_args is not None:
        record["block_size"] = block_size
        record["document_masking"] = bool(data_args.document_masking)
        record["packing"] = ("documents joined with EOS, cut into blocks of block_size tokens"
                             + ("; position_ids restart at each document start" if data_args.document_masking else ""))
        record["dataset_name"] = data_args.dataset_name
        record["train_file"] = [Path(f).name for f in data_args.train_file] if data_args.train_file else None
    path = Path(output_dir) / "training_args.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


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
    if training_args.process_index == 0:
        print(f"[pldr-hf] recipe: {describe_recipe(training_args, data_args)}", flush=True)
    trainer.eval_before = trainer.evaluate()["eval_loss"] if eval_before else None
    if eval_before and training_args.process_index == 0:
        print(f"[pldr-hf] held-out loss before training {trainer.eval_before:.4f}, "
              f"perplexity {perplexity(trainer.eval_before):.2f}", flush=True)
    result = trainer.train(resume_from_checkpoint=resume or None)
    trainer.save_model()
    trainer.save_state()
    if trainer.is_world_process_zero():
        write_training_record(training_args.output_dir, training_args, model_args, data_args, block)
    trainer.train_result = result
    return trainer
