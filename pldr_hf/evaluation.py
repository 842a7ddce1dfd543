"""Evaluation of PLDR-LLM with stock lm-eval-harness and a perplexity figure.

* ``PldrLM`` (lm-eval model name ``"pldr"``): lm-eval's ``HFLM`` that imports this plugin and scores PLDR-LLM
  correctly. Importing this module registers the name; ``pldr-hf eval`` / ``pldr-hf lm-eval`` / ``run_offline_eval``
  import it for you. ``--model hf`` works too once ``pldr_hf`` is imported (or with ``trust_remote_code=True``, as the
  saved folder carries its modelling code), with the padding caveat below.

  Cached vs uncached behaviour lm-eval gets:
    - ``loglikelihood`` and ``loglikelihood_rolling``: one forward pass over context + continuation without a cache
      (``use_cache=False``: nothing is reused across requests, so building a cache would only cost memory). The
      metric tensor A therefore sums over the whole scored sequence, context and continuation, exactly as in training
      (teacher forcing with a sequence-level A) and as in the published lm-eval numbers of the PLDR-LLM papers.
    - ``generate_until``: ``model.generate(use_cache=True)``: A (and G) are computed from the prompt once and frozen
      while decoding, as in the original implementation.
  The G-cache experiment of arXiv 2502.13502 (``g_prompt=`` / ``g_file=``, ``pldr-hf eval --g-cache on|both``):
  one G deduced once, from a fixed prompt (or a G file of ``pldr-hf export-g``), serves every request of every task,
  loglikelihood and generation alike; the model runs as G-only (``custom_G_type="external"``: the metric learner is
  skipped). With a KV-cache alone, caching G changes speed, not results (G is a function of the frozen A), so this is
  the setting in which "G-cache on" can change a score: the paper's claim is that it does not, because a trained
  model's G is nearly input-invariant.
  A is a sum over positions, so padding would leak into it: ``HFLM`` right-pads batched loglikelihood requests with
  zeros and passes no attention mask. ``PldrLM`` rebuilds that mask (trailing zeros are padding when id 0 is a special
  token, as for the PLDR tokenizers; otherwise it scores one request at a time), so a request's score does not depend
  on its batch. ``--model hf`` lacks this and should be run with ``batch_size=1``.

* :func:`perplexity`: held-out perplexity of a model on texts. The ``evaluate`` library's ``"perplexity"`` metric is a
  Hub-hosted script (``evaluate.load("perplexity")`` downloads it) that loads its own model from a model id, so it is
  unusable offline and for an in-memory model; this function is the documented equivalent (same definition:
  ``exp(mean token negative log-likelihood)``), see its docstring.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Sequence

import torch

import pldr_hf  # noqa: F401  (registers model_type "pldrllm" with transformers' Auto classes)
from pldr_hf.convert import check_model_dir, has_tokenizer

logger = logging.getLogger(__name__)

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
OFFLINE_GROUP = "pldr_offline"
PAPER_GROUPS = ("pldrllm_zeroshot", "pldrllm_tiny")
# The prompt whose G serves every request with the G-cache on (any text works: the paper's claim is that it does not
# matter); override with g_prompt= / --g-prompt, or give a G file.
DEFAULT_G_PROMPT = "The quick brown fox jumps over the lazy dog."
G_CACHE_MEANING = {
    "off": "each request deduces its own G: loglikelihood requests (multiple choice, perplexity) from the whole scored "
           "sequence in one uncached pass; generate_until from its prompt, then frozen in the KV+G cache while decoding",
    "on": "one G, deduced once from the G prompt (or read from a G file), serves every request of every task "
          "(G-only inference: the metric learner is skipped), for loglikelihood and generate_until alike",
}


def tasks_dir() -> str:
    """Folder of the task YAMLs that ship with pldr-hf (pass as lm-eval's ``--include_path``)."""
    return str(TASKS_DIR)


def _lm_eval_classes():
    from lm_eval.api.registry import model_registry, register_model
    from lm_eval.models.huggingface import HFLM

    return HFLM, register_model, model_registry


HFLM, _register_model, _model_registry = _lm_eval_classes()


class PldrLM(HFLM):
    """lm-eval model ``"pldr"``: ``HFLM`` for PLDR-LLM folders (or an in-memory ``PldrForCausalLM``).

    ``lm_eval --model pldr --model_args pretrained=runs/tiny --tasks ...`` (through ``pldr-hf lm-eval``), or
    ``lm_eval.simple_evaluate(model="pldr", model_args={"pretrained": "runs/tiny"}, ...)`` after importing this module.
    """

    def __init__(self, pretrained="", g_prompt: str | None = None, g_file: str | None = None, **kwargs):
        if g_prompt and g_file:
            raise ValueError("give g_prompt or g_file, not both")
        if isinstance(pretrained, (str, os.PathLike)):
            s = str(pretrained)
            looks_local = os.path.isabs(s) or s.startswith((".", "~")) or s.count("/") > 1 or os.path.exists(s)
            if looks_local:
                check_model_dir(os.path.expanduser(s))
                if kwargs.get("tokenizer") is None and not has_tokenizer(os.path.expanduser(s)):
                    raise FileNotFoundError(
                        f"{s} has no tokenizer (tokenizer.json / tokenizer_config.json); pass tokenizer=PATH in "
                        "model_args (pldr-hf eval: --tokenizer PATH)"
                    )
        kwargs.setdefault("backend", "causal")
        super().__init__(pretrained=pretrained, **kwargs)
        special = set(getattr(self.tokenizer, "all_special_ids", []) or [])
        self._zero_is_padding = 0 in special or getattr(self.config, "pad_token_id", None) == 0
        if not self._zero_is_padding and self.batch_size_per_gpu != 1:
            logger.warning("pldr: token id 0 is not a special token, so right padding cannot be told from text; "
                           "scoring one request at a time (batch_size=1) to keep scores exact.")
            self.batch_size_per_gpu = 1
        self.g_source = None
        if g_prompt or g_file:
            self._use_fixed_g(g_prompt, g_file)

    def _use_fixed_g(self, g_prompt: str | None, g_file: str | None) -> None:
        """Swaps the model for its G-only twin whose G is the prompt's (or the G file's) for every request."""
        from .gfile import extract_g, load_g_file

        model = self.model
        if getattr(model.config, "custom_G_type", None) is not None:
            raise ValueError(f"the G-cache comparison needs a learned-G model; this one has custom_G_type="
                             f"{model.config.custom_G_type!r}")
        if g_file:
            g = load_g_file(g_file, model.config)
            self.g_source = {"g_file": str(g_file)}
        else:
            ids = self.tokenizer(g_prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
            if ids.shape[1] == 0:
                raise ValueError(f"the G prompt {g_prompt!r} gives no tokens")
            g = extract_g(model, ids.to(model.device))
            self.g_source = {"g_prompt": g_prompt, "g_prompt_tokens": int(ids.shape[1])}
        self._model = g_only_model(model, g)

    def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
        mask = None
        if inps.shape[0] > 1 and self._zero_is_padding:
            nonpad = inps != 0
            # Rows are right-padded: everything after the last non-zero token is padding.
            positions = torch.arange(inps.shape[1], device=inps.device)
            last = torch.where(nonpad, positions, torch.full_like(positions, -1)).max(dim=1).values
            mask = (positions[None, :] <= last[:, None]).long()
        with torch.no_grad(), torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                                             enabled=self.mixed_precision_dtype is not None):
            return self.model(input_ids=inps, attention_mask=mask, use_cache=False).logits


def g_only_model(model, g):
    """A ``custom_G_type="external"`` copy of a learned-G ``PldrForCausalLM`` with G fixed to ``g`` (GTensors):
    the same weights less the metric learner and power law, on the same device and dtype, in eval mode."""
    import copy

    from .gfile import apply_g_to_model
    from .modeling import PldrForCausalLM

    config = copy.deepcopy(model.config)
    config.custom_G_type = "external"
    param = next(model.parameters())
    twin = PldrForCausalLM(config)
    missing, _ = twin.load_state_dict(model.state_dict(), strict=False)
    missing = [k for k in missing if not k.endswith("past_G_values")]
    if missing:
        raise ValueError(f"G-only model: weights missing from the source model: {missing[:5]}")
    apply_g_to_model(twin, g)
    return twin.to(device=param.device, dtype=param.dtype).eval()


if "pldr" not in _model_registry or _model_registry.get("pldr") is not PldrLM:
    if "pldr" in _model_registry:  # re-import (e.g. importlib.reload): replace the stale class
        _model_registry._objs.pop("pldr", None)
    _register_model("pldr")(PldrLM)


def task_manager(include_default: bool = True):
    """An lm-eval TaskManager that also knows the tasks shipped with pldr-hf."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=tasks_dir(), include_defaults=include_default)


def check_tasks(tasks: Sequence[str], manager) -> list[str]:
    tasks = [t.strip() for t in tasks if t.strip()]
    if not tasks:
        raise ValueError("no task given (e.g. --tasks pldr_offline)")
    known = set(manager.all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        ours = sorted(t for t in known if t.startswith("pldr"))
        raise ValueError(f"unknown lm-eval task(s): {', '.join(unknown)}; tasks shipped with pldr-hf: {', '.join(ours)}")
    import importlib.util

    tiny = [t for t in tasks if t == "pldrllm_tiny" or t.startswith("tiny")]
    if tiny and importlib.util.find_spec("tinyBenchmarks") is None:
        raise ValueError(f"{', '.join(tiny)}: lm-eval's tinyBenchmarks tasks need the tinyBenchmarks package (not on "
                         "PyPI): pip install git+https://github.com/felipemaiapolo/tinyBenchmarks")
    return tasks


def run_offline_eval(model, tasks: Sequence[str] = (OFFLINE_GROUP,), out: str | os.PathLike | None = None,
                     tokenizer=None, batch_size: int = 8, device: str | None = None, limit: int | None = None,
                     seed: int = 0, g_cache: str = "off", g_prompt: str | None = None,
                     g_file: str | os.PathLike | None = None) -> dict:
    """Runs lm-eval's ``simple_evaluate`` with model ``"pldr"`` on ``tasks`` (default: the offline group).

    ``model``: a saved model folder or a ``PldrForCausalLM`` (then ``tokenizer`` is required). ``g_cache``: "off"
    (each request deduces its own G), "on" (one G from ``g_prompt``, default :data:`DEFAULT_G_PROMPT`, or from
    ``g_file`` serves every request; see :data:`G_CACHE_MEANING`) or "both" (both runs; the G-cache-on metrics are
    added to the results under the filter name ``g_cache``, e.g. ``acc,g_cache``, and ``results["pldr_g_cache"]``
    holds the comparison). Writes the results JSON to ``out`` (a file path, or a folder that gets ``results.json``)
    and returns the results dict.
    """
    import lm_eval

    if g_cache not in ("off", "on", "both"):
        raise ValueError(f"g_cache must be 'off', 'on' or 'both', got {g_cache!r}")
    if g_file is not None and g_prompt is not None:
        raise ValueError("give g_prompt or g_file, not both")
    manager = task_manager()
    tasks = check_tasks(list(tasks), manager)
    if isinstance(model, (str, os.PathLike)):
        check_model_dir(model)
    elif tokenizer is None:
        raise ValueError("run_offline_eval with an in-memory model needs tokenizer=")

    def make_lm(fixed_g: bool) -> PldrLM:
        g_args = {}
        if fixed_g:
            g_args = {"g_file": str(g_file)} if g_file is not None else {"g_prompt": g_prompt or DEFAULT_G_PROMPT}
        if isinstance(model, (str, os.PathLike)):
            model_args = {"pretrained": str(model)}
            if tokenizer is not None:
                model_args["tokenizer"] = tokenizer
            return PldrLM(**model_args, **g_args, batch_size=batch_size,
                          device=device or ("cuda" if torch.cuda.is_available() else "cpu"))
        return PldrLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device or str(model.device),
                      **g_args)

    def evaluate(lm):
        return lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, random_seed=seed,
                                       numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
                                       log_samples=False)

    runs = {}
    for mode in (("off", "on") if g_cache == "both" else (g_cache,)):
        lm = make_lm(mode == "on")
        runs[mode] = (evaluate(lm), lm.g_source)
        del lm
    results = runs[g_cache if g_cache != "both" else "off"][0]
    if g_cache == "both":
        merge_g_cache_results(results, runs["on"][0])
    results["pldr_g_cache"] = {
        "mode": g_cache,
        "meaning": {m: G_CACHE_MEANING[m] for m in runs},
        "g_source": runs["on"][1] if "on" in runs else None,
    }
    if g_cache == "both":
        results["pldr_g_cache"]["comparison"] = g_cache_comparison(runs["off"][0], runs["on"][0])
    if out is not None:
        from lm_eval.utils import handle_non_serializable

        out = Path(out)
        if out.suffix != ".json":
            out = out / "results.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2, default=handle_non_serializable))
        results["results_file"] = str(out)
    return results


def _g_cache_filter(filt: str) -> str:
    return "g_cache" if filt in ("", "none") else f"{filt}+g_cache"


def merge_g_cache_results(off: dict, on: dict) -> dict:
    """Adds the metrics of the G-cache-on run to the results of the off run, as extra lm-eval filters: ``acc,none`` of
    ``on`` becomes ``acc,g_cache`` (``acc,strict-match`` -> ``acc,strict-match+g_cache``), stderr alike. lm-eval's
    table prints them as rows of filter ``g_cache``, and the model card's model-index gets them with that config."""
    for section in ("results", "groups"):
        for task, metrics in (on.get(section) or {}).items():
            target = off.setdefault(section, {}).setdefault(task, {})
            for key, value in metrics.items():
                if "," not in key:
                    continue
                metric, _, filt = key.partition(",")
                target[f"{metric},{_g_cache_filter(filt)}"] = value
    return off


def g_cache_comparison(off: dict, on: dict) -> list[dict]:
    """Rows (task, metric, filter, n-shot, off +- stderr, on +- stderr, on - off) for every numeric metric of the
    two runs (tasks, then groups)."""
    rows = []
    n_shot = off.get("n-shot", {})
    for section in ("results", "groups"):
        for task, metrics in (off.get(section) or {}).items():
            other = (on.get(section) or {}).get(task, {})
            for key, value in metrics.items():
                metric, _, filt = key.partition(",")
                if (not filt or filt.endswith("g_cache") or metric.endswith("_stderr") or key not in other
                        or isinstance(value, bool) or not isinstance(value, (int, float))):
                    continue
                se_key = f"{metric}_stderr,{filt}"
                se_off, se_on = metrics.get(se_key), other.get(se_key)
                rows.append({
                    "task": task, "metric": metric, "filter": filt, "n_shot": n_shot.get(task),
                    "off": value, "off_stderr": se_off if isinstance(se_off, (int, float)) else None,
                    "on": other[key], "on_stderr": se_on if isinstance(se_on, (int, float)) else None,
                    "difference": other[key] - value,
                })
    return rows


def format_g_cache_comparison(rows: list[dict]) -> str:
    """The comparison rows as a Markdown table."""
    def cell(v, se):
        return "" if v is None else f"{v:.4f}" + (f" ± {se:.4f}" if isinstance(se, (int, float)) else "")

    lines = ["| task | metric | n-shot | G-cache off | G-cache on | on - off |", "|---|---|---|---|---|---|"]
    for r in rows:
        metric = r["metric"] if r["filter"] == "none" else f"{r['metric']} ({r['filter']})"
        lines.append(f"| {r['task']} | {metric} | {'' if r['n_shot'] is None else r['n_shot']} | "
                     f"{cell(r['off'], r['off_stderr'])} | {cell(r['on'], r['on_stderr'])} | {r['difference']:+.4f} |")
    return "\n".join(lines)


@torch.no_grad()
def perplexity(model, tokenizer_or_ids, texts: Sequence[str] | None = None, block_size: int = 256,
               batch_size: int = 8, add_eos: bool = True) -> float:
    """Held-out perplexity ``exp(mean negative log-likelihood per predicted token)`` of a causal LM.

    The equivalent of the ``evaluate`` library's ``"perplexity"`` metric (which is a Hub script and loads its own model
    from a model id) for an in-memory model and offline use. Like ``run_clm.py`` evaluation: texts are tokenized,
    joined (an EOS token after each text when ``add_eos`` and the tokenizer has one), cut into consecutive blocks of
    ``block_size`` tokens (the last block may be shorter), each block scored in one forward pass without cache (so for
    PLDR-LLM the metric tensor A covers the block, as in training); every token but the first of a block is predicted.

    Args:
        model: a causal LM (e.g. ``PldrForCausalLM``), used in eval mode on its own device.
        tokenizer_or_ids: a tokenizer (then ``texts`` is required), or already tokenized texts: a list of lists of
            token ids or a 1-D/2-D LongTensor (then ``texts`` must be None).
        texts: the held-out texts.
        block_size: tokens per block (at most ``model.config.max_position_embeddings``).
        batch_size: blocks per forward pass.
    Returns:
        the perplexity (float).
    """
    if block_size < 2:
        raise ValueError(f"block_size must be >= 2, got {block_size}")
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos is not None and block_size > max_pos:
        raise ValueError(f"block_size {block_size} exceeds the model's max_position_embeddings ({max_pos})")
    if isinstance(tokenizer_or_ids, torch.Tensor) or (isinstance(tokenizer_or_ids, (list, tuple))):
        if texts is not None:
            raise ValueError("pass texts only with a tokenizer, not with token ids")
        ids = tokenizer_or_ids
        seqs = [ids.tolist()] if isinstance(ids, torch.Tensor) and ids.dim() == 1 else [list(map(int, s)) for s in ids]
        eos = None
    else:
        if texts is None:
            raise ValueError("perplexity(model, tokenizer, texts): texts is required with a tokenizer")
        if isinstance(texts, str):
            texts = [texts]
        tok = tokenizer_or_ids
        seqs = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        eos = getattr(tok, "eos_token_id", None) if add_eos else None
    stream: list[int] = []
    for s in seqs:
        stream.extend(s)
        if eos is not None:
            stream.append(eos)
    vocab = model.config.vocab_size
    if stream and (min(stream) < 0 or max(stream) >= vocab):
        raise ValueError(f"token ids must be in [0, {vocab}) (the model's vocab_size), got max {max(stream)}")
    blocks = [stream[i:i + block_size] for i in range(0, len(stream), block_size)]
    blocks = [b for b in blocks if len(b) >= 2]
    if not blocks:
        raise ValueError("perplexity needs at least 2 tokens of text")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    full = [b for b in blocks if len(b) == block_size]
    rest = [b for b in blocks if len(b) != block_size]
    groups = [full[i:i + batch_size] for i in range(0, len(full), batch_size)] + [[b] for b in rest]
    for group in groups:
        x = torch.tensor(group, dtype=torch.long, device=device)
        logits = model(input_ids=x, use_cache=False).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        nll -= logp.gather(-1, x[:, 1:, None]).sum().item()
        count += x[:, 1:].numel()
    model.train(was_training)
    return math.exp(nll / count)
