#!/usr/bin/env python
"""Training throughput of PLDR-LLM next to the same-size Llama a user would actually pick, printed as JSON.

    python scripts/bench.py                                   # GPU: 110M config, 16 x 1024, eager and torch.compile
    python scripts/bench.py --shapes 16x1024,4x1024,8x2048    # several batch x sequence shapes in one run
    python scripts/bench.py --modes eager --profile prof/     # also a torch.profiler table and trace per run (2 steps)
    python scripts/bench.py --packed_mean_doc_len 350         # rows packed with ~3 documents (position ids restart)
    python scripts/bench.py --tiny --device cpu --modes eager --steps 2 --warmup 1   # smoke run anywhere
    python scripts/bench.py --host_proxy --device cpu --dtype fp32 --threads 1 --shapes 1x32 --models pldr,llama_aligned
                                                              # host (CPU) cost per step: the 110M structure, tiny widths

Every run is a full optimizer step (forward, backward, clip by value, fused AdamW) under bf16 autocast (``--dtype
fp32``: without) on random token ids. Models, built in the same process:

* ``pldr``: PLDR-LLM, ``PldrConfig()`` defaults (the papers' 110M: 5 layers, 14 heads x 64, FFN 2389, metric learner
  8 units x 2 GLUs of width 170, vocab 32000);
* ``llama_same_ffn``: ``LlamaForCausalLM`` with PLDR's sizes, FFN width 2389 included (odd widths put cuBLAS on slow
  kernels, so this one is handicapped);
* ``llama_aligned``: the same Llama with the FFN width rounded up to a multiple of 64 (2432): the setting a user would
  pick, and the one PLDR-LLM is compared with;
* ``pldr_no_graphs`` and ``pldr_no_stack_graphs`` (only when named in ``--models``): PLDR-LLM without recorded CUDA
  graphs in eager mode (``deduction_cuda_graphs=False``, ``decoder_cuda_graphs=False``), and with its layers'
  deductions recorded but not the whole decoder stack (``decoder_cuda_graphs=False``), to see what the graphs gain
  (the same model under compile). ``pldr_graphs_under_compile`` (also only when named): ``decoder_graphs_under_compile``
  on, the recorded decoder stack as one operator under ``torch.compile`` (small batches); the summary gives each
  variant's ratio to the best Llama too.

With ``--packed_mean_doc_len``, every row packs documents of random (exponential) length with position ids restarting
at each (as DataCollatorWithFlattening or document-masked pretraining give them; a new layout every step, from a pool
of 8), so each model keeps the documents apart: PLDR-LLM computes A per document, every model masks attention per
document.

Timing: per shape and mode the models are built and warmed up one after the other, then timed in ``--rounds`` rounds
of ``--steps`` steps that alternate between them; each reports its best round (``tokens_per_s``, ``step_ms``), the
median round and every round's step time, and the host (CPU) time of each phase of a step (forward, backward, clip,
optimizer, zero_grad; ``host_ms_by_phase``, taken without synchronising). With ``--profile`` each run also reports
the GPU's busy time per profiled step (the union of its kernels' intervals) next to that step's wall time: a GPU busy
for much less than the step means the host sets the pace; and ``gpu_ms_by_kind``, the GPU time per step of each kind
of kernel (GEMMs, attention, PLDR-LLM's learner / power law / SwiGLU / rotary operators, inductor's kernels, the
optimiser's multi-tensor kernels, other), where two models' GPU work differs. The host's speed drifts on shared GPU
machines (one model's back-to-back runs differ by tens of percent), and alternating spreads that drift over all models
alike. Peak memory is measured per model above what the models built before it hold, i.e. as if it ran alone.

``--host_proxy`` keeps the 110M structure (5 layers, 4 heads, a metric learner of 8 units x 2 GLUs, so as many
operators and parameter tensors as the papers' model) with tiny widths (hidden 64, heads of 16, FFN 96, A_dff 24,
vocab 256): run on a CPU (``--device cpu --dtype fp32 --threads 1``, a small shape such as 1x32), the step's time is
then mostly host work (operator dispatch, autograd, the per-parameter phases), what sets the pace of a GPU step at
small batches. ``host_ms_by_phase`` splits it by phase; compare models and code versions within one run. On a CPU
PLDR-LLM's own operators run their PyTorch reference math (the learner's 16 GLUs as separate GEMMs, where a GPU runs
three Triton kernels a layer), so the forward and backward phases stand for the GPU's only roughly; the phases per
parameter tensor (clip, optimizer, zero_grad) and ``param_tensors`` do.

``--use_cache false`` runs the training forward as Trainer does (``TrainingArguments.use_cache`` is False unless set):
without building a cache. By default the models' configs decide (on), and the forward returns k and v per layer
(PLDR-LLM also A, A_LM and G_LM), which a compiled backward gives zero gradients; ``returns_cache`` says which.

Modes: ``eager`` and ``compile`` (``torch.compile(model)``, default mode, what Trainer's ``torch_compile=True`` does;
each shape compiled with static shapes, as in a fresh process).
For each shape and mode the JSON's ``summary`` gives PLDR-LLM's throughput and peak memory as a ratio to the best
Llama of the same mode and shape: ``pldr_vs_best_llama`` from the two best rounds, and
``pldr_vs_best_llama_by_round``, the median over the rounds of each round's ratio, which the host's drift moves less
(use many short rounds, e.g. ``--steps 2 --rounds 60``: on an H200 host, 60 rounds of 2 steps gave per-round ratios
within about 6% between their quartiles and a median within 0.6% of the best rounds' ratio). ``--seq_len`` /
``--shapes`` longer than the configs' 1024 positions raise ``max_position_embeddings`` of every model (nothing is
silently cut).
"""

from __future__ import annotations

import copy
import gc
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import HfArgumentParser, LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout without installing
import pldr_hf  # noqa: E402,F401  (registers the model)
from pldr_hf import PldrConfig, PldrForCausalLM  # noqa: E402

MODELS = ("pldr", "llama_same_ffn", "llama_aligned", "pldr_no_graphs", "pldr_no_stack_graphs",
          "pldr_graphs_under_compile")
DEFAULT_MODELS = MODELS[:3]
MODES = ("eager", "compile")


@dataclass
class BenchArguments:
    task: str = field(default="train", metadata={"help": "train (the only task)"})
    device: str = field(default="cuda", metadata={"help": "cuda or cpu"})
    batch_size: int = field(default=16, metadata={"help": "rows per step (ignored when --shapes is given)"})
    seq_len: int = field(default=1024, metadata={"help": "tokens per row; above 1024 raises max_position_embeddings"})
    shapes: str = field(default="", metadata={"help": "comma list of BATCHxSEQ, e.g. 16x1024,4x1024,8x2048"})
    modes: str = field(default="eager,compile", metadata={"help": f"comma list of {', '.join(MODES)}"})
    models: str = field(default=",".join(DEFAULT_MODELS), metadata={"help": f"comma list of {', '.join(MODELS)}"})
    steps: int = field(default=10, metadata={"help": "timed optimizer steps per round"})
    rounds: int = field(default=3, metadata={"help": "timing rounds, alternating between the models; best round"})
    warmup: int = field(default=3, metadata={"help": "untimed steps first (allocator, autotuning, compilation)"})
    attn_implementation: str = field(default="sdpa")
    gradient_checkpointing: bool = field(default=False)
    tiny: bool = field(default=False, metadata={"help": "tiny configs (smoke test)"})
    host_proxy: bool = field(default=False, metadata={
        "help": "the 110M structure (5 layers, learner of 8 x 2 GLUs) with tiny widths: host cost per step on a CPU"})
    dtype: str = field(default="bf16", metadata={"help": "bf16 (autocast, the default) or fp32 (no autocast)"})
    threads: int = field(default=0, metadata={"help": "torch.set_num_threads on CPU (0: torch's default)"})
    profile: str = field(default="", metadata={
        "help": "write a torch.profiler table and trace of 2 steps per run to this folder"})
    use_cache: str = field(default="config", metadata={
        "help": "config (the models' own default: on, the forward returns a cache), true, or false (Trainer's setting: "
                "TrainingArguments.use_cache is False unless set)"})
    packed_mean_doc_len: int = field(
        default=0, metadata={"help": "pack documents of this mean length into each row (position ids restart); 0: off"})


def parse_shapes(args) -> list[tuple[int, int]]:
    if not args.shapes:
        return [(args.batch_size, args.seq_len)]
    shapes = []
    for item in args.shapes.split(","):
        try:
            b, s = (int(x) for x in item.lower().split("x"))
        except ValueError:
            raise SystemExit(f"bench: --shapes item {item!r} is not BATCHxSEQ (e.g. 16x1024)") from None
        if b < 1 or s < 2:
            raise SystemExit(f"bench: --shapes item {item!r} needs batch >= 1 and seq >= 2")
        shapes.append((b, s))
    return shapes


def packed_position_ids(batch: int, seq: int, mean_doc_len: int, seed: int, device) -> torch.Tensor:
    """[batch, seq] position ids of rows packed with documents of exponential length (mean ``mean_doc_len``)."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        row = []
        while len(row) < seq:
            n = max(1, int(torch.empty(1).exponential_(1 / max(mean_doc_len, 1), generator=gen)))
            row += range(min(n, seq - len(row)))
        rows.append(row)
    return torch.tensor(rows, device=device)


def model_configs(tiny: bool, seq_len: int, host_proxy: bool = False) -> dict:
    """PLDR-LLM and the two Llamas, with max_position_embeddings raised to ``seq_len`` where it is longer."""
    if tiny:
        pldr = PldrConfig(vocab_size=128, hidden_size=32, num_attention_heads=2, head_dim=16, num_hidden_layers=2,
                          intermediate_size=85, A_dff=24, num_reslayerA=2, num_denseA=2, max_position_embeddings=256)
    elif host_proxy:  # (the papers' layer count and learner units x GLUs; tiny widths)
        pldr = PldrConfig(vocab_size=256, hidden_size=64, num_attention_heads=4, head_dim=16, intermediate_size=96,
                          A_dff=24, max_position_embeddings=64)
    else:
        pldr = PldrConfig()
    pldr.max_position_embeddings = max(pldr.max_position_embeddings, seq_len)
    align = 8 if tiny or host_proxy else 64
    no_graphs, no_stack_graphs = copy.deepcopy(pldr), copy.deepcopy(pldr)
    no_graphs.deduction_cuda_graphs = no_graphs.decoder_cuda_graphs = no_stack_graphs.decoder_cuda_graphs = False
    under_compile = copy.deepcopy(pldr)
    under_compile.decoder_graphs_under_compile = True  # (the recorded stack as one operator under torch.compile)
    configs = {"pldr": (PldrForCausalLM, pldr), "pldr_no_graphs": (PldrForCausalLM, no_graphs),
               "pldr_no_stack_graphs": (PldrForCausalLM, no_stack_graphs),
               "pldr_graphs_under_compile": (PldrForCausalLM, under_compile)}
    for name, ffn in (("llama_same_ffn", pldr.intermediate_size),
                      ("llama_aligned", math.ceil(pldr.intermediate_size / align) * align)):
        configs[name] = (LlamaForCausalLM, LlamaConfig(
            vocab_size=pldr.vocab_size, hidden_size=pldr.hidden_size, intermediate_size=ffn,
            num_hidden_layers=pldr.num_hidden_layers, num_attention_heads=pldr.num_attention_heads,
            num_key_value_heads=pldr.num_attention_heads, max_position_embeddings=pldr.max_position_embeddings,
            tie_word_embeddings=False))
    return configs


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


PHASES = ("forward", "backward", "clip", "optimizer", "zero_grad")


def busy_time(intervals) -> float:
    """Total length of the union of (start, end) intervals: the time a GPU ran at least one kernel."""
    total, end = 0.0, None
    for a, b in sorted(intervals):
        if end is None or a > end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total


# Kinds of GPU kernels by parts of their names (first match wins), for the profile's time per kind: where two models'
# GPU work differs. The names are those of torch.profiler's CUDA events: cuBLAS/cuBLASLt GEMMs (nvjet, cutlass, xmma,
# gemm), cuDNN/flash attention, PLDR-LLM's own Triton operators, the optimiser's and clipping's multi-tensor kernels.
# Inductor's generated kernels (triton_*; its GEMM templates triton_tem_*) are told apart by their prefix first, since
# their names repeat the names of the operations they fuse.
KERNEL_KINDS = (
    ("attention", ("sdpa", "flash", "fmha", "attention", "dot_do_o", "convert_dq")),
    ("gemm", ("nvjet", "gemm", "cutlass", "xmma", "splitkreduce", "cublas")),
    ("metric_learner", ("_learner_",)),
    ("power_law", ("_power_law_",)),
    ("swiglu", ("_swiglu_",)),
    ("rotary", ("_rotary_",)),
    ("multi_tensor", ("multi_tensor_apply",)),
)


def kernel_kind(name: str) -> str:
    """The kind of a GPU kernel: "inductor" (or "gemm" for its GEMM templates), one of :data:`KERNEL_KINDS`, or
    "other"."""
    low = name.lower()
    if low.startswith("triton_"):
        return "gemm" if low.startswith("triton_tem") else "inductor"
    for kind, parts in KERNEL_KINDS:
        if any(part in low for part in parts):
            return kind
    return "other"


def gpu_ms_by_kind(kernels, steps: int) -> dict:
    """GPU time per step of each kind of kernel, from (name, start_us, end_us) events, sorted by time (the sum of the
    kernels' own durations: kernels that overlap count each)."""
    totals: dict = {}
    for name, start, end in kernels:
        kind = kernel_kind(name)
        totals[kind] = totals.get(kind, 0.0) + (end - start)
    return {k: round(v / steps / 1000, 3) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}


def _write_profile(args, tag, step) -> dict:
    """Writes the torch.profiler table of 2 steps; returns the kernel launches and, on a GPU, the time the GPU was
    busy per step (the union of its kernels' intervals) next to the profiled steps' wall time: a step whose GPU is
    busy for much less than its wall time is bound by host (CPU) work."""
    import os

    from torch.profiler import ProfilerActivity, profile

    cuda = args.device.startswith("cuda")
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    _sync(args.device)
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for _ in range(2):
            step()
        _sync(args.device)
        wall_ms = (time.perf_counter() - t0) / 2 * 1000
    os.makedirs(args.profile, exist_ok=True)
    averages = prof.key_averages()
    launches = sum(e.count for e in averages if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx"))
    out = {"kernel_launches_per_step": launches / 2, "wall_ms_per_step": round(wall_ms, 2)}
    line = f"{tag}: {launches / 2:.0f} kernel launches per step"
    if cuda:
        # (GPU events less the user annotations, such as the optimizer step's, whose spans include idle gaps)
        kernels = [(e.name, e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA and not getattr(e, "is_user_annotation", False)
                   and e.time_range.end > e.time_range.start]
        out["gpu_busy_ms_per_step"] = round(busy_time([k[1:] for k in kernels]) / 2 / 1000, 2)  # (times are in us)
        out["gpu_ms_by_kind"] = gpu_ms_by_kind(kernels, 2)
        line += (f", GPU busy {out['gpu_busy_ms_per_step']:.2f} ms of a {wall_ms:.2f} ms step (profiled; a GPU busy for"
                 f" much less than the step means the host sets the pace)\nGPU ms per step by kind of kernel: "
                 + ", ".join(f"{k} {v:.3f}" for k, v in out["gpu_ms_by_kind"].items()))
    # (the timeline too, for chrome://tracing or Perfetto: where the host's time goes between the kernels)
    prof.export_chrome_trace(os.path.join(args.profile, f"trace_{tag}.json.gz"))
    with open(os.path.join(args.profile, f"profile_{tag}.txt"), "w") as f:
        f.write(line + "\n\n")
        if cuda:
            f.write(averages.table(sort_by="self_cuda_time_total", row_limit=80, max_name_column_width=90))
            f.write("\n\n")
        f.write(averages.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=60))
    return out


class TrainRun:
    """One model's training step at one shape and mode: built, warmed up and its memory measured by ``__init__``,
    timed by :meth:`time_steps` (called in rounds that alternate between the models)."""

    def __init__(self, name, cls, config, args, batch, seq, mode):
        device = self.device = args.device
        cuda = device.startswith("cuda")
        # Memory in use by the models built before this one (kept resident for the alternating rounds): this run's
        # peak is measured above it, so it is the peak the run would have alone.
        base_mem = torch.cuda.memory_allocated() if cuda else 0
        torch.manual_seed(0)
        config._attn_implementation = args.attn_implementation
        model = cls(config).to(device)
        if args.gradient_checkpointing:
            # (transformers >= 5.25 renames it, with a FutureWarning on the old name)
            (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
        model.train()
        # (fused AdamW on CPU too: one kernel per dtype and device group there as well, as on the GPU)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-5, weight_decay=0.1, fused=True)
        step_model = torch.compile(model) if mode == "compile" else model
        ids = torch.randint(4, config.vocab_size, (batch, seq), device=device)
        amp = torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=args.dtype == "bf16")
        layouts = [packed_position_ids(batch, seq, args.packed_mean_doc_len, seed, device)
                   for seed in range(8 if args.packed_mean_doc_len else 0)]
        calls = iter(range(10**9))
        # Host (CPU) time of each phase of the timed steps, taken without synchronising: the time the host spent
        # issuing that phase's work (including any wait for the GPU's queue to drain).
        self.phase_s: list[tuple[float, ...]] = []
        self.returns_cache = None  # (whether the training forward returns a cache: its tensors are autograd outputs,
        # each given a zero gradient by a compiled backward)
        self.record_phases = False

        cache_kwargs = {} if args.use_cache == "config" else {"use_cache": args.use_cache == "true"}

        def step():
            kwargs = cache_kwargs
            if args.packed_mean_doc_len:
                kwargs = {"position_ids": layouts[next(calls) % len(layouts)], "use_cache": False}
            t = [time.perf_counter()]
            with amp:
                out = step_model(input_ids=ids, labels=ids, **kwargs)
            loss, self.returns_cache = out.loss, out.past_key_values is not None
            del out  # (as a training loop keeps only the loss: logits and cache go before the backward)
            t.append(time.perf_counter())
            loss.backward()
            t.append(time.perf_counter())
            torch.nn.utils.clip_grad_value_(model.parameters(), 1.0)
            t.append(time.perf_counter())
            opt.step()
            t.append(time.perf_counter())
            opt.zero_grad(set_to_none=True)
            t.append(time.perf_counter())
            if self.record_phases:
                self.phase_s.append(tuple(b - a for a, b in zip(t, t[1:])))
            return loss

        self.step = step
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            step()
        _sync(device)
        warmup_s = time.perf_counter() - t0
        profiled = _write_profile(args, f"{name}_{mode}_{batch}x{seq}", step) if args.profile else None
        self.loss = None
        self.peak_mem = None
        if cuda:  # the peak of one measured step (every step is alike)
            torch.cuda.reset_peak_memory_stats()
            self.loss = step()
            _sync(device)
            self.peak_mem = torch.cuda.max_memory_allocated() - base_mem
        self.tokens = batch * seq
        self.deduction_graphs = [m._deduction_graphs for m in model.modules()
                                 if getattr(m, "_deduction_graphs", None) is not None]
        self.stack_graphs = getattr(getattr(model, "decoder", None), "_stack_graphs", None)  # (PLDR-LLM only)
        self.round_s: list[float] = []
        self.out = {
            "model": name,
            "mode": mode,
            "batch_size": batch,
            "seq_len": seq,
            "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
            "param_tensors": len(list(model.parameters())),  # (each costs host work per step: autograd, optimizer)
            "ffn_width": config.intermediate_size,
            "warmup_s": round(warmup_s, 1),
        }
        if profiled:
            self.out["profiled"] = profiled

    def time_steps(self, steps: int):
        _sync(self.device)
        self.record_phases = True
        t0 = time.perf_counter()
        for _ in range(steps):
            self.loss = self.step()
        _sync(self.device)
        self.round_s.append((time.perf_counter() - t0) / steps)
        self.record_phases = False

    def result(self) -> dict:
        best = min(self.round_s)
        out = dict(self.out, tokens_per_s=round(self.tokens / best, 1), step_ms=round(1000 * best, 2),
                   tokens_per_s_median=round(self.tokens / statistics.median(self.round_s), 1),
                   round_step_ms=[round(1000 * t, 2) for t in self.round_s],
                   final_loss=round(float(self.loss.detach()), 4), returns_cache=self.returns_cache)
        # (median over the timed steps; on a GPU a phase's host time includes waits for a full launch queue, so a
        # sum near step_ms alone does not prove a host-bound step: --profile's GPU busy time does)
        phases = {k: round(1000 * statistics.median(p[i] for p in self.phase_s), 2) for i, k in enumerate(PHASES)}
        out.update(host_ms_by_phase=phases, host_ms=round(sum(phases.values()), 2))
        if self.peak_mem is not None:
            out["peak_mem_GiB"] = round(self.peak_mem / 2**30, 2)
        if self.deduction_graphs:  # (PLDR-LLM: its layers' recorded CUDA graphs of the deduction, eager mode)
            out["deduction_graphs"] = {"recorded_keys": sum(g.recorded_keys for g in self.deduction_graphs),
                                       "replays": sum(g.replays for g in self.deduction_graphs),
                                       "disabled": sorted({g.disabled for g in self.deduction_graphs if g.disabled})}
        if self.stack_graphs is not None:  # (PLDR-LLM: the decoder stack's recorded CUDA graphs, eager mode)
            out["decoder_graphs"] = graph_counts(self.stack_graphs)
        return out


def graph_counts(graphs) -> dict:
    """What a model's :class:`DeductionGraphs` (e.g. the decoder stack's) recorded and replayed, for the JSON."""
    return {"recorded_keys": graphs.recorded_keys, "recordings": graphs.recordings, "replays": graphs.replays,
            "disabled": graphs.disabled}


def rotating_rounds(names: list[str], rounds: int) -> list[str]:
    """The timing order of ``rounds`` rounds over ``names``, each round starting one further along (a, b, c, b, c, a,
    ...): no model always runs right after the same one (also used by bench_decode.py)."""
    order = []
    for r in range(rounds):
        shift = r % max(len(names), 1)
        order += names[shift:] + names[:shift]
    return order


def bench_group(models: list[str], configs: dict, args, batch, seq, mode) -> list[dict]:
    """Every model at one shape and mode: built and warmed up one after the other, then timed in ``args.rounds``
    rounds of ``args.steps`` steps that alternate between them (the order rotating each round); each reports its
    best round. Alternating spreads the host's drift (clock, other load; large on shared GPU machines, where
    back-to-back runs of one model differ by tens of percent) over every model alike."""
    runs, failed = {}, {}
    for name in models:
        cls, cfg = configs[name]
        try:
            runs[name] = TrainRun(name, cls, cfg, args, batch, seq, mode)
        except Exception as err:  # one failing run (e.g. out of memory) must not hide the others
            failed[name] = f"{type(err).__name__}: {err}"[:600]
            gc.collect()
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
    for name in rotating_rounds(list(runs), args.rounds):
        if name in failed:
            continue
        try:
            runs[name].time_steps(args.steps)
        except Exception as err:
            failed[name] = f"{type(err).__name__}: {err}"[:600]
    results = []
    for name in models:
        if name in failed:
            results.append({"model": name, "mode": mode, "batch_size": batch, "seq_len": seq, "error": failed[name]})
        else:
            results.append(runs[name].result())
    return results


def summarise(runs: list[dict]) -> list[dict]:
    """Per shape and mode: PLDR-LLM against the best (fastest) Llama of the same shape and mode."""
    rows = []
    keys = sorted({(r["batch_size"], r["seq_len"], r["mode"]) for r in runs}, key=lambda k: (-k[0] * k[1], k))
    for b, s, mode in keys:
        group = [r for r in runs if (r["batch_size"], r["seq_len"], r["mode"]) == (b, s, mode) and "error" not in r]
        pldr = next((r for r in group if r["model"] == "pldr"), None)
        llamas = [r for r in group if r["model"].startswith("llama")]
        if pldr is None or not llamas:
            continue
        best = max(llamas, key=lambda r: r["tokens_per_s"])
        row = {"shape": f"{b}x{s}", "mode": mode, "pldr_tokens_per_s": pldr["tokens_per_s"],
               "best_llama": best["model"], "best_llama_tokens_per_s": best["tokens_per_s"]}
        for r in group:  # PLDR-LLM and its variants named in --models, against the same Llama
            if r["model"] == "pldr" or r["model"].startswith("pldr_"):
                row[f"{r['model']}_vs_best_llama"] = round(r["tokens_per_s"] / best["tokens_per_s"], 3)
                # Round by round: each round times every model once, close together, so the host's slower drift
                # cancels in that round's ratio (the best rounds of two models may come from different phases of the
                # host).
                row[f"{r['model']}_vs_best_llama_by_round"] = round(statistics.median(
                    llama_ms / ms for ms, llama_ms in zip(r["round_step_ms"], best["round_step_ms"])), 3)
        for r in llamas:
            row[f"pldr_vs_{r['model']}"] = round(pldr["tokens_per_s"] / r["tokens_per_s"], 3)
        if "peak_mem_GiB" in pldr:
            row["pldr_peak_mem_GiB"] = pldr["peak_mem_GiB"]
            row["best_llama_peak_mem_GiB"] = best["peak_mem_GiB"]
            row["pldr_mem_vs_best_llama"] = round(pldr["peak_mem_GiB"] / best["peak_mem_GiB"], 3)
        rows.append(row)
    return rows


def main(argv=None):
    try:
        (args,) = HfArgumentParser(BenchArguments).parse_args_into_dataclasses(args=argv)
    except ValueError as e:  # e.g. an unknown option (argparse's own errors exit with their message already)
        raise SystemExit(f"bench: {e}") from None
    if args.task != "train":
        raise SystemExit(f"bench: unknown --task {args.task!r} (expected train)")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("bench: --device cuda but no CUDA GPU is available (use --device cpu --tiny for a smoke run)")
    models = [m for m in args.models.split(",") if m]
    modes = [m for m in args.modes.split(",") if m]
    for name in models:
        if name not in MODELS:
            raise SystemExit(f"bench: unknown model {name!r} in --models (expected {', '.join(MODELS)})")
    for mode in modes:
        if mode not in MODES:
            raise SystemExit(f"bench: unknown mode {mode!r} in --modes (expected {', '.join(MODES)})")
    if args.dtype not in ("bf16", "fp32"):
        raise SystemExit(f"bench: unknown --dtype {args.dtype!r} (expected bf16 or fp32)")
    if args.use_cache not in ("config", "true", "false"):
        raise SystemExit(f"bench: unknown --use_cache {args.use_cache!r} (expected config, true or false)")
    if args.tiny and args.host_proxy:
        raise SystemExit("bench: --tiny and --host_proxy pick different configs; give one")
    if args.threads < 0:
        raise SystemExit(f"bench: --threads must be 0 (torch's default) or more, got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    for option in ("steps", "rounds"):
        if getattr(args, option) < 1:
            raise SystemExit(f"bench: --{option} must be at least 1, got {getattr(args, option)}")
    shapes = parse_shapes(args)
    results = {"task": "train", "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
               "torch": torch.__version__, "transformers": __import__("transformers").__version__,
               "dtype": "bf16-autocast" if args.dtype == "bf16" else "fp32", "optimizer": "fused AdamW, clip by value 1.0",
               "config": "tiny" if args.tiny else "host_proxy" if args.host_proxy else "papers_110m",
               "threads": torch.get_num_threads(),
               "gradient_checkpointing": args.gradient_checkpointing, "attn_implementation": args.attn_implementation,
               "steps": args.steps, "rounds": args.rounds, "packed_mean_doc_len": args.packed_mean_doc_len,
               "use_cache": args.use_cache, "runs": []}
    if "compile" in modes and hasattr(torch._dynamo.config, "automatic_dynamic_local_pgo"):
        # Each run compiles as a fresh process would. PyTorch's profile-guided dynamic shapes (a profile kept on disk,
        # not cleared by torch._dynamo.reset) would otherwise see the previous run's batch or sequence length and
        # compile the next run with dynamic shapes.
        torch._dynamo.config.automatic_dynamic_local_pgo = False
    for batch, seq in shapes:
        configs = model_configs(args.tiny, seq, args.host_proxy)
        for mode in modes:
            for run in bench_group(models, configs, args, batch, seq, mode):
                results["runs"].append(run)
                print(json.dumps(run), file=sys.stderr, flush=True)
            gc.collect()
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
            torch._dynamo.reset()
    results["summary"] = summarise(results["runs"])
    print(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
