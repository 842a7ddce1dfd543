#!/usr/bin/env python
"""Benchmarks of PLDR-LLM next to a same-size transformers Llama, printed as JSON.

    python scripts/bench.py --task train                 # GPU: the papers' 110M config, batch 16 x 1024, bf16 autocast + AdamW
    python scripts/bench.py --task train --metric_learner_cuda_graphs false        # PLDR's metric learner op by op
    python scripts/bench.py --task train --tiny --device cpu --steps 2 --warmup 1   # smoke run anywhere
    python scripts/bench.py --task train --packed_mean_doc_len 350    # packed rows: ~3 documents a 1024-token row

Training: tokens/s and peak GPU memory of full optimizer steps (forward, backward, clip, AdamW) on random token ids,
PLDR-LLM (PldrConfig() defaults: 5 layers, 14 heads x 64, A_dff 170, 8 residual units x 2 GLUs, vocab 32000) and
LlamaForCausalLM (hidden 896, 14 heads, 5 layers, intermediate 2389, vocab 32000) measured in the same process.
With --packed_mean_doc_len, every row packs documents of random (exponential) length with position ids restarting
at each (as DataCollatorWithFlattening or packed pretraining give them; a new layout every step, from a pool of 8),
and both models run with use_cache=False, so that each keeps the documents apart.
"""

from __future__ import annotations

import gc
import json
import sys
import time
from dataclasses import dataclass, field

import torch
from transformers import HfArgumentParser, LlamaConfig, LlamaForCausalLM

import pldr_hf  # noqa: F401
from pldr_hf import PldrConfig, PldrForCausalLM


@dataclass
class BenchArguments:
    task: str = field(default="train", metadata={"help": "train"})
    device: str = field(default="cuda", metadata={"help": "cuda or cpu"})
    batch_size: int = field(default=16)
    seq_len: int = field(default=1024)
    steps: int = field(default=10, metadata={"help": "timed optimizer steps"})
    warmup: int = field(default=3, metadata={"help": "untimed steps first (allocator, cuDNN/compile warm-up)"})
    attn_implementation: str = field(default="sdpa")
    compile: bool = field(default=False, metadata={"help": "torch.compile both models"})
    gradient_checkpointing: bool = field(default=False)
    models: str = field(default="pldr,llama", metadata={"help": "comma list of pldr, llama"})
    tiny: bool = field(default=False, metadata={"help": "tiny configs (smoke test)"})
    metric_learner_cuda_graphs: bool = field(
        default=True, metadata={"help": "PLDR: replay each layer's metric learner as CUDA graphs in training"})
    profile: str = field(default="", metadata={"help": "write a torch.profiler table of 2 steps per model to this folder"})
    packed_mean_doc_len: int = field(
        default=0, metadata={"help": "pack documents of this mean length into each row (position ids restart); 0: off"})


def model_configs(tiny: bool):
    if tiny:
        pldr = PldrConfig(vocab_size=128, hidden_size=32, num_attention_heads=2, head_dim=16, num_hidden_layers=2,
                          intermediate_size=85, A_dff=24, num_reslayerA=2, num_denseA=2, max_position_embeddings=256)
    else:
        pldr = PldrConfig()
    llama = LlamaConfig(vocab_size=pldr.vocab_size, hidden_size=pldr.hidden_size, intermediate_size=pldr.intermediate_size,
                        num_hidden_layers=pldr.num_hidden_layers, num_attention_heads=pldr.num_attention_heads,
                        num_key_value_heads=pldr.num_attention_heads, max_position_embeddings=pldr.max_position_embeddings,
                        tie_word_embeddings=False)
    return {"pldr": (PldrForCausalLM, pldr), "llama": (LlamaForCausalLM, llama)}


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


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


def bench_train(name, cls, config, args) -> dict:
    device = args.device
    torch.manual_seed(0)
    config._attn_implementation = args.attn_implementation
    model = cls(config).to(device)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    fused = device.startswith("cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-5, weight_decay=0.1, fused=fused)
    step_model = torch.compile(model) if args.compile else model
    seq = min(args.seq_len, config.max_position_embeddings)
    ids = torch.randint(4, config.vocab_size, (args.batch_size, seq), device=device)
    amp = torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16)
    layouts = [packed_position_ids(args.batch_size, seq, args.packed_mean_doc_len, seed, device) for seed in range(8)]
    calls = iter(range(10**9))

    def step():
        packed = {}
        if args.packed_mean_doc_len:
            packed = {"position_ids": layouts[next(calls) % len(layouts)], "use_cache": False}
        with amp:
            loss = step_model(input_ids=ids, labels=ids, **packed).loss
        loss.backward()
        torch.nn.utils.clip_grad_value_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(args.warmup):
        step()
    _sync(device)
    if args.profile:
        import os

        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
        with profile(activities=acts) as prof:
            for _ in range(2):
                step()
            _sync(device)
        os.makedirs(args.profile, exist_ok=True)
        key = "self_cuda_time_total" if device.startswith("cuda") else "self_cpu_time_total"
        with open(os.path.join(args.profile, f"profile_{name}.txt"), "w") as f:
            f.write(prof.key_averages().table(sort_by=key, row_limit=40, max_name_column_width=60))
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    _sync(device)
    dt = time.perf_counter() - t0
    out = {
        "model": name,
        "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "tokens_per_s": round(args.batch_size * seq * args.steps / dt, 1),
        "step_ms": round(1000 * dt / args.steps, 2),
        "final_loss": round(float(loss.detach()), 4),
    }
    if device.startswith("cuda"):
        out["peak_mem_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    del model, opt, step_model
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return out


def main(argv=None):
    (args,) = HfArgumentParser(BenchArguments).parse_args_into_dataclasses(args=argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("bench: --device cuda but no CUDA GPU is available (use --device cpu --tiny for a smoke run)")
    if args.task != "train":
        raise SystemExit(f"bench: unknown --task {args.task!r} (expected train)")
    configs = model_configs(args.tiny)
    configs["pldr"][1].metric_learner_cuda_graphs = args.metric_learner_cuda_graphs
    results = {"task": "train", "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
               "torch": torch.__version__, "transformers": __import__("transformers").__version__,
               "batch_size": args.batch_size, "seq_len": args.seq_len, "dtype": "bf16-autocast",
               "compile": args.compile, "gradient_checkpointing": args.gradient_checkpointing,
               "metric_learner_cuda_graphs": args.metric_learner_cuda_graphs,
               "packed_mean_doc_len": args.packed_mean_doc_len, "runs": []}
    for name in args.models.split(","):
        if name not in configs:
            raise SystemExit(f"bench: unknown model {name!r} in --models (expected pldr, llama)")
        cls, cfg = configs[name]
        results["runs"].append(bench_train(name, cls, cfg, args))
    by = {r["model"]: r for r in results["runs"]}
    if "pldr" in by and "llama" in by:
        results["pldr_vs_llama_throughput"] = round(by["pldr"]["tokens_per_s"] / by["llama"]["tokens_per_s"], 3)
    print(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
