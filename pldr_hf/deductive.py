"""Deductive outputs made visible: G_LM invariance figures (arXiv 2502.13502), plots, and G export.

:func:`inspect_prompts` runs a set of prompts through a PLDR-LLM and reports, per layer and head:

* the G_LM and A_LM of each prompt (``deductive_tensors.safetensors``, [prompts, layers, heads, d, d]);
* their spread across prompts: RMSE to the mean over prompts, and relative to the RMS of the mean;
* ``det(G_LM)`` of each prompt;
* the G-cache swap: the next-token distribution of prompt j when its G-cache is taken from prompt i instead of its
  own (KL divergence, top-1 agreement, relative logit change). A perfectly input-invariant G gives 0 change; a fixed-G
  model (``custom_G_type="identity"``) gives exactly 0.

:func:`export_g` writes one prompt's G as a G file (:mod:`pldr_hf.gfile`) and measures what "G-only" inference
(``custom_G_type="external"``, no metric learner) saves: parameters skipped and forward time.

:func:`dag_divergence` / :func:`dag_terms` are the DAG measure of arXiv 2410.16703 (section 2.2) as the original code
optimises it; the training regulariser (:mod:`pldr_hf.training`) and ``pldr-hf inspect`` (per layer) use them.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Sequence

import torch

from .gfile import GTensors, cache_with_g, extract_g, load_g_only_model, save_g_file
from .modeling import PldrForCausalLM


# ----------------------------------------------------------------------------------------------------------------------
# DAG measure of the deductive outputs
# ----------------------------------------------------------------------------------------------------------------------
DAG_TERMS = ("A_LM", "A_P", "G_LM")


def dag_divergence(M: torch.Tensor) -> torch.Tensor:
    """``DL(M) = |log(tr(exp(M * M)) / d)|`` for every d x d matrix in the last two dims (``*`` elementwise, exp the
    matrix exponential), in float32; returns the leading dims.

    This is the DAG loss of the original v510_dag code (arXiv 2410.16703, section 2.2, after NOTEARS: M is the weighted
    adjacency matrix of a directed acyclic graph iff ``tr(exp(M * M)) = d``; the original takes the log of the ratio,
    so DL = 0 exactly for a DAG and grows slowly with the cycles). ``log tr(exp(B))`` (``B = M * M``) is computed by
    scaling and squaring with a running scale (:func:`log_trace_expm`): the same value and gradient as
    ``torch.log(torch.linalg.matrix_exp(B).diagonal(...).sum(-1))`` wherever that is finite, and finite where
    ``exp(B)`` overflows float32 (spectral radius above ~88: an all-ones 64 x 64 A_P, as at initialisation, has 64),
    unless ``tr(exp(B))`` is more than float32's range below ``exp(B)``'s largest entry (e.g. a strictly triangular
    64 x 64 M with entries in the thousands: then DL is inf, as the plain float32 computation gives too).
    """
    if M.dim() < 2 or M.shape[-1] != M.shape[-2]:
        raise ValueError(f"dag_divergence needs square matrices in the last two dims, got shape {tuple(M.shape)}")
    with torch.autocast(device_type=M.device.type, enabled=False):
        B = M.float().square()
        return (log_trace_expm(B) - math.log(B.shape[-1])).abs()


def log_trace_expm(B: torch.Tensor) -> torch.Tensor:
    """``log(tr(exp(B)))`` of nonnegative square matrices (last two dims) without overflow: ``exp(B / 2^s)`` with
    ``||B / 2^s|| <= 1`` (torch.linalg.matrix_exp), then s squarings, each rescaled by a power of two (exact, no
    gradient) that is added back to the log. s is chosen per matrix, so small matrices are not squared at all. The
    matrix products run in B's dtype; the final log and the scale are float64 scalars (returned in B's dtype)."""
    norm = B.sum(-1).amax(-1)  # the infinity norm of a nonnegative matrix
    s = torch.ceil(torch.log2(norm.detach().clamp_min(1.0)))
    E = torch.linalg.matrix_exp(B / torch.exp2(s)[..., None, None])
    exponent = torch.zeros(norm.shape, dtype=torch.float64, device=B.device)  # log2 of the scale taken out of E
    for k in range(int(s.max().item()) if s.numel() else 0):
        E2 = E @ E
        e = torch.floor(torch.log2(E2.detach().amax(dim=(-2, -1)).clamp_min(torch.finfo(E2.dtype).tiny)))
        active = s > k
        E = torch.where(active[..., None, None], E2 / torch.exp2(e)[..., None, None], E)
        exponent = torch.where(active, 2 * exponent + e.double(), exponent)
    trace = E.diagonal(dim1=-2, dim2=-1).sum(-1).double()
    return (torch.log(trace) + exponent * math.log(2.0)).to(B.dtype)


def dag_terms(pldr_attentions, per_layer: bool = False) -> dict[str, torch.Tensor]:
    """DL (:func:`dag_divergence`) of the three deductive outputs the original regularises, from the model's
    ``pldr_attentions`` (one :class:`PldrDeductiveOutputs` per layer, ``output_pldr_attentions=True``):

    * ``A_LM``: the positive tensor ``iSwiGLU(W A + b) + 1e-9``;
    * ``A_P = A_LM ** P``: A_LM raised elementwise to the learned exponents P (not P itself);
    * ``G_LM = a A_P + b_a``: the energy-curvature tensor.

    Returns {"A_LM", "A_P", "G_LM"}: each the mean over layers x batch rows x heads (float32 scalars with gradient), or
    with ``per_layer=True`` a [layers] tensor of per-layer means over batch rows x heads.
    """
    if not pldr_attentions:
        raise ValueError("the DAG terms need the deductive outputs: call the model with output_pldr_attentions=True")
    per = {k: [] for k in DAG_TERMS}
    for layer in pldr_attentions:
        if layer is None or layer.A_LM is None or layer.power_exponents is None or layer.G_LM is None:
            continue
        A_LM = layer.A_LM.float()
        A_P = A_LM.pow(layer.power_exponents.float())
        for key, M in (("A_LM", A_LM), ("A_P", A_P), ("G_LM", layer.G_LM)):
            per[key].append(dag_divergence(M).flatten())
    if not per["A_LM"]:
        raise ValueError("the model has no learned deductive outputs (custom_G_type is set): no DAG terms")
    if per_layer:
        return {k: torch.stack([v.mean() for v in vals]) for k, vals in per.items()}
    return {k: torch.cat(vals).mean() for k, vals in per.items()}


@torch.no_grad()
def dag_report(model, prompt_ids: Sequence[torch.Tensor]) -> dict | None:
    """Per layer DL of A_LM, A_P and G_LM (mean over prompts and heads) of each prompt run without cache; None for a
    fixed-G model."""
    if getattr(model.config, "custom_G_type", None) is not None:
        return None
    rows = []
    for x in prompt_ids:
        out = model(input_ids=x, use_cache=False, output_pldr_attentions=True)
        rows.append(dag_terms(out.pldr_attentions, per_layer=True))
    per_layer = {k: torch.stack([r[k] for r in rows]).mean(0) for k in DAG_TERMS}  # [layers]
    return {
        "definition": "DL(M) = |log(tr(exp(M*M)) / d)| (matrix exponential; 0 iff M is a DAG adjacency matrix); "
                      "A_P = A_LM ** P; mean over prompts and heads",
        "per_layer": [{"layer": i, **{k: per_layer[k][i].item() for k in DAG_TERMS}}
                      for i in range(len(per_layer["A_LM"]))],
        "mean": {k: per_layer[k].mean().item() for k in DAG_TERMS},
    }


def load_model_and_tokenizer(model_dir: str | os.PathLike, tokenizer: str | os.PathLike | None = None,
                             device: str = "cpu"):
    from transformers import AutoTokenizer

    from .convert import check_model_dir, has_tokenizer

    model_dir = check_model_dir(model_dir)
    tok_src = tokenizer or model_dir
    if tokenizer is None and not has_tokenizer(model_dir):
        raise FileNotFoundError(f"{model_dir} has no tokenizer (tokenizer.json / tokenizer_config.json); pass --tokenizer PATH")
    tok = AutoTokenizer.from_pretrained(str(tok_src))
    model = PldrForCausalLM.from_pretrained(str(model_dir)).to(device).eval()
    return model, tok


def read_prompts(path: str | os.PathLike) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"prompts file not found: {p}")
    prompts = [line.strip() for line in p.read_text().splitlines() if line.strip()]
    if len(prompts) < 2:
        raise ValueError(f"{p}: need at least 2 prompts (one per line) to measure spread across prompts, got {len(prompts)}")
    return prompts


def _encode(tok, prompt: str, device) -> torch.Tensor:
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    if ids.shape[1] == 0:
        raise ValueError(f"prompt {prompt!r} gives no tokens")
    return ids.to(device)


def _rel_rmse(stack: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """stack [P, L, H, d, d] -> (rmse, relative rmse) per [L, H]."""
    mean = stack.mean(0, keepdim=True)
    rmse = ((stack - mean) ** 2).mean(dim=(0, 3, 4)).sqrt()
    scale = (mean[0] ** 2).mean(dim=(2, 3)).sqrt()
    return rmse, rmse / scale.clamp_min(1e-12)


@torch.no_grad()
def g_swap_effect(model, prompt_ids: Sequence[torch.Tensor], gs: Sequence[GTensors]) -> dict:
    """Next-token effect of running prompt j with the G-cache of prompt i (matrices [source i, target j])."""
    P = len(prompt_ids)
    own = [torch.log_softmax(model(input_ids=x, use_cache=False).logits[0, -1].float(), -1) for x in prompt_ids]
    kl = torch.zeros(P, P)
    top1 = torch.zeros(P, P)
    rel = torch.zeros(P, P)
    for i in range(P):
        for j in range(P):
            cache = cache_with_g(model, gs[i])
            logits = model(input_ids=prompt_ids[j], past_key_values=cache, use_cache=True).logits[0, -1].float()
            lp = torch.log_softmax(logits, -1)
            kl[i, j] = (own[j].exp() * (own[j] - lp)).sum().clamp_min(0)
            top1[i, j] = float(lp.argmax() == own[j].argmax())
            own_centered = own[j] - own[j].mean()
            rel[i, j] = ((lp - lp.mean()) - own_centered).norm() / own_centered.norm().clamp_min(1e-12)
    off = ~torch.eye(P, dtype=torch.bool)
    return {
        "kl": kl, "top1_agreement": top1, "relative_logit_change": rel,
        "mean_kl_offdiag": kl[off].mean().item(), "max_kl_offdiag": kl[off].max().item(),
        "top1_agreement_offdiag": top1[off].mean().item(),
        "mean_relative_logit_change_offdiag": rel[off].mean().item(),
    }


@torch.no_grad()
def inspect_prompts(model, tokenizer, prompts: Sequence[str], out_dir: str | os.PathLike, plots: bool = True) -> dict:
    """Writes ``report.json``, ``deductive_tensors.safetensors`` and PNG heatmaps to ``out_dir``; returns the report."""
    from safetensors.torch import save_file

    if len(prompts) < 2:
        raise ValueError(f"inspect needs at least 2 prompts, got {len(prompts)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    ids = [_encode(tokenizer, p, device) for p in prompts]
    gs = [extract_g(model, x) for x in ids]
    G = torch.stack([g.G_LM for g in gs]).double()      # [P, L, H, d, d]
    A_LM = torch.stack([g.A_LM for g in gs]).double()
    rmse_G, rel_G = _rel_rmse(G)
    rmse_A, rel_A = _rel_rmse(A_LM)
    det_G = torch.linalg.det(G)                          # [P, L, H]
    swap = g_swap_effect(model, ids, gs)
    dag = dag_report(model, ids)
    c = model.config
    report = {
        "model": {"num_layers": c.num_hidden_layers, "num_heads": c.num_attention_heads, "head_dim": c.head_dim,
                  "custom_G_type": c.custom_G_type},
        "prompts": list(prompts),
        "prompt_tokens": [int(x.shape[1]) for x in ids],
        "per_layer_head": {
            "G_LM_rmse_to_mean": rmse_G.tolist(), "G_LM_relative_rmse": rel_G.tolist(),
            "A_LM_rmse_to_mean": rmse_A.tolist(), "A_LM_relative_rmse": rel_A.tolist(),
            "det_G_LM_per_prompt": det_G.tolist(),
            "det_G_LM_mean": det_G.mean(0).tolist(), "det_G_LM_std": det_G.std(0).tolist(),
        },
        "g_cache_swap": {k: (v.tolist() if torch.is_tensor(v) else v) for k, v in swap.items()},
        "dag": dag,
        "summary": {
            "G_LM_relative_rmse_mean": rel_G.mean().item(), "G_LM_relative_rmse_max": rel_G.max().item(),
            "A_LM_relative_rmse_mean": rel_A.mean().item(),
            "swap_mean_kl": swap["mean_kl_offdiag"], "swap_top1_agreement": swap["top1_agreement_offdiag"],
            "swap_mean_relative_logit_change": swap["mean_relative_logit_change_offdiag"],
            **({f"dag_{k}": v for k, v in dag["mean"].items()} if dag else {}),
        },
        "files": {"tensors": "deductive_tensors.safetensors"},
    }
    save_file({"G_LM": G.float().contiguous(), "A_LM": A_LM.float().contiguous()}, str(out / "deductive_tensors.safetensors"),
              metadata={"layout": "[prompt, layer, head, head_dim, head_dim]", "prompts": json.dumps(list(prompts))})
    if plots:
        report["files"].update(_plots(out, rel_G, rel_A, G, swap, len(prompts)))
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report


def _plots(out: Path, rel_G, rel_A, G, swap, P) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = {}
    L, H = rel_G.shape
    fig, axes = plt.subplots(1, 2, figsize=(4 + 1.2 * H, 1.5 + 0.6 * L), squeeze=False)
    for ax, data, title in ((axes[0, 0], rel_G, "G_LM"), (axes[0, 1], rel_A, "A_LM")):
        im = ax.imshow(data.numpy(), cmap="viridis", aspect="auto")
        ax.set_title(f"{title}: relative RMSE across {P} prompts")
        ax.set_xlabel("head"); ax.set_ylabel("layer")
        ax.set_xticks(range(H)); ax.set_yticks(range(L))
        for (l, h), v in zip(((l, h) for l in range(L) for h in range(H)), data.flatten().tolist()):
            ax.text(h, l, f"{v:.3g}", ha="center", va="center", color="w", fontsize=8)
        fig.colorbar(im, ax=ax)
    fig.tight_layout(); fig.savefig(out / "spread_rel_rmse.png", dpi=110); plt.close(fig)
    files["spread"] = "spread_rel_rmse.png"

    mean_G = G.mean(0).float()
    fig, axes = plt.subplots(L, H, figsize=(2.2 * H + 1, 2.0 * L + 0.5), squeeze=False)
    lim = mean_G.abs().max().item() or 1.0
    for l in range(L):
        for h in range(H):
            im = axes[l, h].imshow(mean_G[l, h].numpy(), cmap="RdBu_r", vmin=-lim, vmax=lim)
            axes[l, h].set_title(f"layer {l} head {h}", fontsize=8); axes[l, h].axis("off")
    fig.suptitle("mean G_LM over prompts"); fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8)
    fig.savefig(out / "G_LM_mean.png", dpi=110); plt.close(fig)
    files["G_mean"] = "G_LM_mean.png"

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for ax, key, title in ((axes[0], "kl", "KL(own || swapped) next token"),
                           (axes[1], "relative_logit_change", "relative logit change")):
        im = ax.imshow(swap[key].numpy(), cmap="magma")
        ax.set_title(title, fontsize=10); ax.set_xlabel("target prompt j"); ax.set_ylabel("G-cache from prompt i")
        ax.set_xticks(range(P)); ax.set_yticks(range(P)); fig.colorbar(im, ax=ax)
    fig.tight_layout(); fig.savefig(out / "g_cache_swap.png", dpi=110); plt.close(fig)
    files["swap"] = "g_cache_swap.png"
    return files


def metric_learner_parameters(model) -> int:
    """Parameters of the deduction (LayerNorm on A, residual metric learner, power law) that G-only inference skips."""
    n = 0
    for name, p in model.named_parameters():
        if ".mha1.layernorm1." in name or ".mha1.reslayerAs." in name or ".mha1.plgatt_layer." in name:
            n += p.numel()
    return n


def _time_forward(model, x, repeats: int) -> float:
    with torch.no_grad():
        model(input_ids=x, use_cache=False)
        times = []
        for _ in range(repeats):
            if x.is_cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            model(input_ids=x, use_cache=False)
            if x.is_cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


@torch.no_grad()
def export_g(model_dir: str | os.PathLike, prompt: str, out: str | os.PathLike, tokenizer=None, device: str = "cpu",
             bench_seq_len: int | None = None, bench_batch: int = 1, repeats: int = 5) -> dict:
    """Writes the G of ``prompt`` as a G file and measures G-only inference against the full model.

    Returns (and the CLI prints) a dict: the file, its size, parameters skipped, median forward time with and without
    the metric learner, and the max logit difference between the G-only model and the full model with that G cached.
    """
    model, tok = load_model_and_tokenizer(model_dir, tokenizer, device)
    if model.config.custom_G_type is not None:
        raise ValueError(f"{model_dir}: export-g needs a learned-G model, this one has custom_G_type="
                         f"{model.config.custom_G_type!r}")
    x = _encode(tok, prompt, device)
    g = extract_g(model, x)
    path = save_g_file(out, g, {"prompt": prompt, "source_model": str(model_dir)})
    g_only = load_g_only_model(model_dir, g).to(device).eval()
    # Correctness: G-only logits on the prompt equal the full model's with that G in its cache.
    ref = model(input_ids=x, past_key_values=cache_with_g(model, g), use_cache=True).logits
    got = g_only(input_ids=x, use_cache=False).logits
    S = bench_seq_len or min(model.config.max_position_embeddings, 512)
    bx = torch.randint(4, model.config.vocab_size, (bench_batch, S), generator=torch.Generator().manual_seed(0)).to(device)
    t_full = _time_forward(model, bx, repeats)
    t_gonly = _time_forward(g_only, bx, repeats)
    total = sum(p.numel() for p in model.parameters())
    skipped = metric_learner_parameters(model)
    return {
        "g_file": str(path), "g_file_bytes": path.stat().st_size,
        "parameters_full": total, "parameters_g_only": sum(p.numel() for p in g_only.parameters()),
        "parameters_skipped": skipped, "parameters_skipped_fraction": skipped / total,
        "bytes_skipped_fp32": skipped * 4,
        "forward_seconds_full": t_full, "forward_seconds_g_only": t_gonly,
        "speedup": t_full / t_gonly if t_gonly > 0 else None,
        "bench": {"batch": bench_batch, "seq_len": S, "device": str(device), "repeats": repeats},
        "max_abs_logit_diff_vs_full_with_g_cache": (ref - got).abs().max().item(),
    }
