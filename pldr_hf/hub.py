"""Publishing PLDR-LLM folders on the Hugging Face Hub: model cards, remote-code packaging, dry runs and uploads.

:func:`assemble` writes exactly what a Hub repository gets: config.json with a complete ``auto_map`` (so plain
transformers loads it with ``trust_remote_code=True``), safetensors weights, the remote-code files of ``modeling/``,
tokenizer files, generation_config.json and a README.md model card filled from the model folder (config, training
state, lm-eval results). :func:`validate` checks such a folder: the card metadata parses, and a fresh Python process in
which ``pldr_hf`` cannot be imported loads it with ``trust_remote_code=True`` and gives the same logits as the plugin.
:func:`upload` sends the folder with huggingface_hub (create repo, branch, commit).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .checks import check_weights, has_tokenizer, read_json
from .convert import copy_tokenizer_files, model_class_for, read_port_config

REMOTE_CODE_FILES = ("configuration_pldr.py", "modeling_pldr.py", "cache_pldr.py", "metric_learner.py",
                     "packing.py", "deduction_graphs.py")
AUTO_MAP = {
    "AutoConfig": "configuration_pldr.PldrConfig",
    "AutoModel": "modeling_pldr.PldrModel",
    "AutoModelForCausalLM": "modeling_pldr.PldrForCausalLM",
    "AutoModelForSequenceClassification": "modeling_pldr.PldrForSequenceClassification",
    "AutoModelForTokenClassification": "modeling_pldr.PldrForTokenClassification",
    "AutoModelForQuestionAnswering": "modeling_pldr.PldrForQuestionAnswering",
}
CARD_TEMPLATE = "pldr_llm.md"
DEFAULT_TAGS = ["pldr-llm", "pldrllm", "power-law-graph-attention", "custom_code"]
# Hyperparameters worth a line in the card, read from training_args.json when the run saved one.
_CARD_TRAINING_KEYS = (
    "learning_rate", "lr_scheduler_type", "warmup_steps", "warmup_ratio", "weight_decay", "adam_beta1", "adam_beta2",
    "adam_epsilon", "max_grad_norm", "per_device_train_batch_size", "gradient_accumulation_steps", "num_train_epochs",
    "max_steps", "block_size", "seed", "bf16", "fp16", "optim",
    # the PLDR-LLM recipe (scripts/pretrain.py writes them to training_args.json)
    "clip_grad_value", "lr_scheduler_kwargs", "dag_coeffs", "preset", "document_masking",
)


class HubUploadError(RuntimeError):
    """An upload to the Hub failed; the message says why and what to do."""


@dataclass
class CardOptions:
    """What the model card says beyond what the folder itself records."""

    repo_id: str = "your-name/your-pldr-llm"
    license: str = "apache-2.0"
    language: list[str] = field(default_factory=lambda: ["en"])
    datasets: list[str] = field(default_factory=list)
    base_model: str | None = None
    tags: list[str] = field(default_factory=list)
    eval_results: str | None = None  # an lm-eval results JSON
    model_name: str | None = None


def template_path() -> Path:
    """The model card template shipped inside the package (``pldr_hf.model_cards``)."""
    return Path(str(resources.files("pldr_hf.model_cards").joinpath(CARD_TEMPLATE)))


# ----------------------------------------------------------------------------------------------------------------------
# Model card
# ----------------------------------------------------------------------------------------------------------------------
def read_training_info(model_dir: str | os.PathLike) -> tuple[dict, list[str]]:
    """Hyperparameters (and dataset names) from trainer_state.json / training_args.json in the model folder.

    ``training_args.bin`` (a pickle) is never read.
    """
    model_dir = Path(model_dir)
    hp: dict = {}
    datasets: list[str] = []
    args_file = model_dir / "training_args.json"
    if args_file.is_file():
        args = read_json(args_file)
        for k in _CARD_TRAINING_KEYS:
            v = args.get(k)
            if v is None or v is False or v == -1 or (k in ("warmup_steps", "warmup_ratio") and v == 0):
                continue
            if k == "num_train_epochs" and (args.get("max_steps") or 0) > 0:
                continue  # max_steps decides the length of the run
            hp[k] = v
        for k in ("dataset_name", "dataset", "datasets"):
            v = args.get(k)
            if isinstance(v, str) and v:
                datasets.append(v)
            elif isinstance(v, list):
                datasets += [x for x in v if isinstance(x, str)]
    state_file = model_dir / "trainer_state.json"
    if state_file.is_file():
        state = read_json(state_file)
        for k in ("global_step", "num_train_epochs", "max_steps", "train_batch_size"):
            if state.get(k) is not None:
                hp.setdefault(k, state[k])
        losses = [e for e in state.get("log_history", []) if "loss" in e]
        if losses:
            hp["final_train_loss"] = round(float(losses[-1]["loss"]), 4)
        evals = [e for e in state.get("log_history", []) if "eval_loss" in e]
        if evals:
            hp["final_eval_loss"] = round(float(evals[-1]["eval_loss"]), 4)
        if state.get("total_flos"):
            hp["total_flos"] = f"{float(state['total_flos']):.3g}"
    return hp, datasets


def read_training_data(model_dir: str | os.PathLike) -> str | None:
    """The description of the training data that a run recorded (``training_data`` in training_args.json), for
    corpora that are not a Hub dataset (e.g. the quickstart's)."""
    args_file = Path(model_dir) / "training_args.json"
    if not args_file.is_file():
        return None
    data = read_json(args_file)
    v = data.get("training_data") if isinstance(data, dict) else None
    return v if isinstance(v, str) and v.strip() else None


def eval_results_from_lm_eval(path: str | os.PathLike, model_name: str) -> list[EvalResult]:
    """EvalResults from an lm-eval-harness results JSON (``{"results": {task: {"acc,none": ...}}}``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"eval results not found: {path}")
    data = read_json(path)
    results = data.get("results") if isinstance(data, dict) else None
    if not isinstance(results, dict) or not results:
        raise ValueError(f"{path}: expected lm-eval output with a non-empty 'results' mapping")
    n_shot = data.get("n-shot", {}) if isinstance(data.get("n-shot"), dict) else {}
    out = []
    for task, metrics in sorted(results.items()):
        if not isinstance(metrics, dict):
            continue
        for key, value in sorted(metrics.items()):
            metric, _, filt = key.partition(",")
            if metric.endswith("_stderr") or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if not math.isfinite(float(value)):
                continue
            shots = n_shot.get(task)
            out.append(EvalResult(
                task_type="text-generation", task_name="Text Generation",
                dataset_type=task, dataset_name=str(metrics.get("alias", task)).strip(" -"),
                metric_type=metric, metric_name=metric if filt in ("", "none") else f"{metric} ({filt})",
                metric_value=float(value), metric_config=filt if filt not in ("", "none") else None,
                dataset_args={"num_few_shot": int(shots)} if isinstance(shots, int) else None,
            ))
    if not out:
        raise ValueError(f"{path}: no numeric metrics in 'results'")
    return out


def build_model_card(model_dir: str | os.PathLike, options: CardOptions, config=None, num_parameters: int | None = None,
                     dtype: str | None = None) -> ModelCard:
    """Fills model_cards/pldr_llm.md from the folder's config, training state and the given options."""
    model_dir = Path(model_dir)
    config = config if config is not None else read_port_config(model_dir)
    hp, run_datasets = read_training_info(model_dir)
    datasets = list(dict.fromkeys(list(options.datasets) + run_datasets))
    name = options.model_name or options.repo_id.split("/")[-1]
    eval_results = eval_results_from_lm_eval(options.eval_results, name) if options.eval_results else None
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag="text-generation",
        license=options.license,
        language=list(options.language) or None,
        datasets=datasets or None,
        base_model=options.base_model,
        tags=list(dict.fromkeys(DEFAULT_TAGS + list(options.tags))),
        model_name=name,
        eval_results=eval_results,
    )
    g = {None: "learned (full PLGA: metric learner + power law)", "identity": "fixed to the identity (SDPA LLM)",
         "random": "fixed random tensor", "external": "fixed, supplied from outside (G-only inference)"}
    tokenizer_present = has_tokenizer(model_dir)
    rows = [{"task": r.dataset_name, "metric": r.metric_name, "value": f"{r.metric_value:.4g}"} for r in eval_results or []]
    return ModelCard.from_template(
        data, template_path=str(template_path()),
        model_name=name, repo_id=options.repo_id, base_model=options.base_model, config=config,
        num_parameters=f"{num_parameters:,}" if num_parameters else "n/a", dtype=dtype or "float32",
        g_description=g.get(config.custom_G_type, str(config.custom_G_type)), datasets=datasets,
        hyperparameters=hp, eval_rows=rows, has_tokenizer=tokenizer_present,
        training_data=read_training_data(model_dir),
    )


# ----------------------------------------------------------------------------------------------------------------------
# Packaging
# ----------------------------------------------------------------------------------------------------------------------
def _modeling_dir() -> Path:
    from . import modeling

    return Path(modeling.__file__).parent


def assemble(model_dir: str | os.PathLike, out_dir: str | os.PathLike, options: CardOptions) -> Path:
    """Writes the folder a Hub repository gets (see module docstring) to ``out_dir``; returns it."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    config = read_port_config(model_dir)
    cls = model_class_for(config)
    check_weights(model_dir)
    if options.eval_results:  # fail before writing anything
        eval_results_from_lm_eval(options.eval_results, options.repo_id)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir}: output folder exists and is not empty")
    out_dir.mkdir(parents=True, exist_ok=True)
    model = cls.from_pretrained(model_dir, dtype="auto")
    model.save_pretrained(out_dir)  # safetensors (also for a legacy .bin source)
    for name in REMOTE_CODE_FILES:
        shutil.copyfile(_modeling_dir() / name, out_dir / name)
    cfg_file = out_dir / "config.json"
    cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    cfg["auto_map"] = dict(AUTO_MAP)
    cfg["architectures"] = [cls.__name__]
    cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    copy_tokenizer_files(model_dir, out_dir)
    if hasattr(model, "generation_config") and not (out_dir / "generation_config.json").is_file():
        model.generation_config.save_pretrained(out_dir)
    n = sum(p.numel() for p in model.parameters())
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    card = build_model_card(model_dir, options, config=model.config, num_parameters=n, dtype=dtype)
    card.save(out_dir / "README.md")
    return out_dir


_REMOTE_LOAD_SCRIPT = r"""
import json, sys
sys.modules["pldr_hf"] = None  # the plugin must not be importable: only the folder's remote code may be used
import torch, transformers
from safetensors.torch import save_file
folder, arch, out = sys.argv[1], sys.argv[2], sys.argv[3]
cfg = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=True)
auto = {"ForCausalLM": "AutoModelForCausalLM", "ForSequenceClassification": "AutoModelForSequenceClassification",
        "ForTokenClassification": "AutoModelForTokenClassification",
        "ForQuestionAnswering": "AutoModelForQuestionAnswering"}
name = next((v for k, v in auto.items() if arch.endswith(k)), "AutoModel")
model = getattr(transformers, name).from_pretrained(folder, trust_remote_code=True).eval()
ids = torch.arange(min(8, cfg.max_position_embeddings)).remainder(cfg.vocab_size - 1).add(1).unsqueeze(0)
with torch.no_grad():
    o = model(input_ids=ids)
t = o.logits if getattr(o, "logits", None) is not None else (o[0] if not hasattr(o, "start_logits") else o.start_logits)
save_file({"out": t.float().contiguous()}, out)
print(json.dumps({"config_module": type(cfg).__module__, "model_module": type(model).__module__,
                  "model_class": type(model).__name__}))
"""


def validate(folder: str | os.PathLike, timeout: float = 300) -> dict:
    """Checks an assembled folder; raises ValueError naming the first problem, returns a small report."""
    folder = Path(folder)
    for name in ("config.json", "README.md", *REMOTE_CODE_FILES):
        if not (folder / name).is_file():
            raise ValueError(f"{folder}: {name} is missing")
    if not any(folder.glob("*.safetensors")):
        raise ValueError(f"{folder}: no safetensors weights")
    card = ModelCard.load(folder / "README.md")  # parses the YAML metadata
    meta = card.data.to_dict()
    for key, want in (("library_name", "transformers"), ("pipeline_tag", "text-generation")):
        if meta.get(key) != want:
            raise ValueError(f"{folder}/README.md: metadata {key} is {meta.get(key)!r}, expected {want!r}")
    cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    missing = sorted(set(AUTO_MAP) - set(cfg.get("auto_map", {})))
    if missing:
        raise ValueError(f"{folder}/config.json: auto_map lacks {', '.join(missing)}")
    arch = (cfg.get("architectures") or ["PldrForCausalLM"])[0]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "remote.safetensors"
        env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(Path(tmp) / "modules"))
        proc = subprocess.run([sys.executable, "-c", _REMOTE_LOAD_SCRIPT, str(folder), arch, str(out)],
                              capture_output=True, text=True, timeout=timeout, env=env)
        if proc.returncode != 0:
            raise ValueError(f"{folder}: does not load with trust_remote_code=True in a fresh process without "
                             f"pldr_hf:\n{proc.stderr[-3000:]}")
        remote_info = json.loads(proc.stdout.strip().splitlines()[-1])
        from safetensors.torch import load_file

        remote = load_file(str(out))["out"]
    if not remote_info["model_module"].startswith("transformers_modules"):
        raise ValueError(f"{folder}: the fresh process did not use the folder's remote code ({remote_info})")
    config = read_port_config(folder)
    model = model_class_for(config).from_pretrained(folder).eval()
    ids = torch.arange(min(8, config.max_position_embeddings)).remainder(config.vocab_size - 1).add(1).unsqueeze(0)
    with torch.no_grad():
        o = model(input_ids=ids)
    local = (o.logits if getattr(o, "logits", None) is not None else o.start_logits if hasattr(o, "start_logits")
             else o[0]).float()
    diff = (local - remote).abs().max().item()
    if not diff <= 1e-4 * max(1.0, local.abs().max().item()):
        raise ValueError(f"{folder}: remote-code outputs differ from pldr_hf's by {diff:.3g}")
    return {"metadata": meta, "remote": remote_info, "max_abs_diff": diff,
            "files": sorted(p.name for p in folder.iterdir() if p.is_file())}


# ----------------------------------------------------------------------------------------------------------------------
# Upload
# ----------------------------------------------------------------------------------------------------------------------
def upload(folder: str | os.PathLike, repo_id: str, private: bool = False, revision: str | None = None,
           commit_message: str | None = None, token: str | None = None, endpoint: str | None = None):
    """Uploads an assembled folder: creates the repo (and branch ``revision``) if missing, then one commit."""
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    api = HfApi(endpoint=endpoint, token=token)
    where = api.endpoint
    if not (token or get_token()):
        raise HubUploadError("no Hugging Face token: run `hf auth login` or set HF_TOKEN (a token with write access)")
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        return api.upload_folder(repo_id=repo_id, folder_path=str(folder), revision=revision,
                                 commit_message=commit_message or "Upload PLDR-LLM with pldr-hf", repo_type="model")
    except OfflineModeIsEnabled as e:
        raise HubUploadError(f"cannot upload: huggingface_hub is in offline mode (HF_HUB_OFFLINE is set) ({e})") from e
    except HfHubHTTPError as e:
        status = e.response.status_code if getattr(e, "response", None) is not None else None
        if status == 401:
            raise HubUploadError(f"{where} rejected the token (401 Unauthorized): log in again with `hf auth login` "
                                 "or set a valid HF_TOKEN") from e
        if status == 403:
            raise HubUploadError(f"{where} refused access to {repo_id} (403 Forbidden): the token needs write access "
                                 "to this namespace") from e
        raise HubUploadError(f"upload to {where}/{repo_id} failed (HTTP {status}): {e}") from e
    except Exception as e:
        # huggingface_hub's HTTP client (httpx, or httpx2 in newer releases) raises TransportError subclasses when
        # the endpoint cannot be reached; match them by name so that either client works.
        names = {c.__name__ for c in type(e).__mro__}
        if isinstance(e, OSError) or names & {"TransportError", "NetworkError", "ConnectError", "TimeoutException"}:
            raise HubUploadError(f"cannot reach {where} ({type(e).__name__}: {e}); check the network or "
                                 "HF_ENDPOINT") from e
        raise


def push(model_dir: str | os.PathLike, options: CardOptions, private: bool = False, revision: str | None = None,
         commit_message: str | None = None, dry_run: str | os.PathLike | None = None, token: str | None = None,
         endpoint: str | None = None, check: bool = True):
    """Assembles (and validates) the repository folder; writes it to ``dry_run`` or uploads it.

    Returns ``(folder, report, commit_info)``; commit_info is None for a dry run.
    """
    if dry_run is not None:
        folder = assemble(model_dir, dry_run, options)
        return folder, validate(folder), None
    with tempfile.TemporaryDirectory(prefix="pldr-push-") as tmp:
        folder = assemble(model_dir, Path(tmp) / "repo", options)
        report = validate(folder) if check else None
        info = upload(folder, options.repo_id, private=private, revision=revision, commit_message=commit_message,
                      token=token, endpoint=endpoint)
        return None, report, info
