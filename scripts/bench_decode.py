#!/usr/bin/env python
"""Decoding speed of PLDR-LLM with generate(): KV+G cache, KV only, no cache, static cache + torch.compile, next to
same-size LlamaForCausalLMs (dynamic cache and static + compiled), in one run. Prints JSON.

Two Llamas: ``llama_*`` keeps PLDR's FFN width (2389), ``llama_aligned_*`` rounds it up to a multiple of 64 (2432, the
setting a user would pick). ``summary`` gives, per batch size, PLDR-LLM's KV+G dynamic-cache speed against the best
Llama with a dynamic cache, and its static + compiled speed against the best static + compiled Llama; with
``pldr_static_compiled_hf_mask`` in ``--variants`` too, what the model's own one-token attention mask gains over
transformers' mask function in the same compiled decoding (``own_mask_vs_hf_mask``).

Every run is greedy and generates exactly ``new_tokens`` tokens per row (min_new_tokens = max_new_tokens); timings
follow warm-up runs (which also compile) and torch.cuda.synchronize; tokens/s = batch * new_tokens / seconds (best of
``repeats``; the median is reported too). The timed runs of a batch size alternate between the variants (``repeats``
rounds, the order rotating each round), so that the host's drift between runs falls on every variant alike. Each timed
run is followed by a generate() of one new token (the prompt's forward and generate's setup: ``prefill_ms``, best of
``repeats``); ``decode_step_ms`` = (best full run - best one-token run) / (new_tokens - 1), the time of one decoding
step without the prefill, which the summary compares too.

GPU (the papers' 110M configuration, bf16):
    python scripts/bench_decode.py --output bench_decode.json
    python scripts/bench_decode.py --variants pldr_static_compiled,pldr_static_compiled_hf_mask --repeats 7
Quick check on CPU with tiny models:
    python scripts/bench_decode.py --tiny --device cpu
"""

import copy
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import CompileConfig, HfArgumentParser, LlamaConfig, LlamaForCausalLM, masking_utils

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import pldr_hf  # noqa: E402,F401  (registers the model)
from bench import graph_counts, rotating_rounds  # noqa: E402  (scripts/bench.py: the same alternating order)
from pldr_hf import PldrConfig, PldrForCausalLM  # noqa: E402

VARIANTS = ("pldr_kv_g", "pldr_kv", "pldr_nocache", "pldr_static_compiled", "pldr_layers_kv_g",
            "pldr_layers_static_compiled", "pldr_static_compiled_hf_mask", "llama_dynamic", "llama_static_compiled",
            "llama_aligned_dynamic", "llama_aligned_static_compiled")
# (not in the default set: pldr_layers_*, the same PLDR-LLM with decoder_cuda_graphs=False, its prompt's forward run
# layer by layer rather than as the decoder stack's recorded CUDA graph; pldr_static_compiled_hf_mask, the same model
# and compiled step with each step's attention mask made by transformers' create_masks_for_generate instead of the
# model's own, to see what the model's one-token mask gains)
DEFAULT_VARIANTS = tuple(v for v in VARIANTS if not v.startswith("pldr_layers") and not v.endswith("hf_mask"))


@dataclass
class BenchDecodeArguments:
    device: str = field(default="cuda" if torch.cuda.is_available() else "cpu", metadata={"help": "cuda or cpu"})
    dtype: str = field(default="bfloat16", metadata={"help": "bfloat16, float16 or float32"})
    prompt_len: int = field(default=128, metadata={"help": "prompt tokens per row"})
    new_tokens: int = field(default=256, metadata={"help": "generated tokens per row (exactly)"})
    batch_sizes: str = field(default="1,32", metadata={"help": "comma-separated batch sizes"})
    variants: str = field(default=",".join(DEFAULT_VARIANTS), metadata={"help": f"comma-separated subset of {VARIANTS}"})
    repeats: int = field(default=3, metadata={"help": "timed runs per variant (rounds alternating between variants)"})
    warmup: int = field(default=2, metadata={"help": "untimed runs first (they compile the static variants)"})
    compile_backend: str = field(default="inductor", metadata={"help": "torch.compile backend of the static variants"})
    fullgraph: bool = field(default=True, metadata={"help": "compile with fullgraph=True (fails on a graph break)"})
    tiny: bool = field(default=False, metadata={"help": "tiny models and lengths, to check the script on CPU"})
    seed: int = field(default=0, metadata={"help": "random seed (weights and prompts)"})
    output: str | None = field(default=None, metadata={"help": "also write the JSON here"})


def model_configs(tiny: bool):
    if tiny:
        pldr = PldrConfig(vocab_size=256, hidden_size=32, num_attention_heads=4, head_dim=8, num_hidden_layers=2,
                          intermediate_size=85, A_dff=12, num_reslayerA=2, num_denseA=2, max_position_embeddings=512)
        llama = dict(vocab_size=256, hidden_size=32, num_attention_heads=4, num_key_value_heads=4,
                     num_hidden_layers=2, intermediate_size=85, max_position_embeddings=512)
    else:
        pldr = PldrConfig()  # the papers' 110M: 896 wide, 14 heads of 64, 5 layers, dff 2389, vocab 32000
        llama = dict(vocab_size=32000, hidden_size=896, num_attention_heads=14, num_key_value_heads=14,
                     num_hidden_layers=5, intermediate_size=2389, max_position_embeddings=1024)
    align = 8 if tiny else 64
    aligned = dict(llama, intermediate_size=-(-llama["intermediate_size"] // align) * align)
    return (pldr, LlamaConfig(**llama, pad_token_id=0, bos_token_id=2, eos_token_id=3),
            LlamaConfig(**aligned, pad_token_id=0, bos_token_id=2, eos_token_id=3))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prepare_variant(name, models, args, batch, device):
    """A closure that runs one generate() of the variant and returns its seconds (checking the output length)."""
    model = models[next(key for key in ("llama_aligned", "llama", "pldr_layers", "pldr") if name.startswith(key))]
    g = torch.Generator().manual_seed(args.seed + batch)
    ids = torch.randint(4, model.config.vocab_size, (batch, args.prompt_len), generator=g).to(device)
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
              min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
    if name == "pldr_kv":
        kw["use_g_cache"] = False
    elif name == "pldr_nocache":
        kw["use_cache"] = False
    elif "static_compiled" in name:
        # "reduce-overhead" (CUDA graphs) is an inductor mode; other backends take no mode.
        mode = {} if args.compile_backend == "inductor" else {"mode": None}
        cfg = CompileConfig(fullgraph=args.fullgraph, backend=args.compile_backend, **mode)
        if device.type == "cpu":
            cfg._compile_all_devices = True  # generate compiles on accelerators only unless told otherwise
        kw.update(cache_implementation="static", compile_config=cfg)

    def once(new_tokens: int = args.new_tokens):
        if name.endswith("hf_mask"):  # (transformers' function as an instance attribute: generate() looks the hook up
            # on the model and passes every argument by name)
            model.create_masks_for_generate = masking_utils.create_masks_for_generate
        sync(device)
        t0 = time.perf_counter()
        try:
            with torch.inference_mode():
                out = model.generate(**dict(kw, max_new_tokens=new_tokens, min_new_tokens=new_tokens))
            sync(device)
        finally:
            model.__dict__.pop("create_masks_for_generate", None)
        dt = time.perf_counter() - t0
        if out.shape != (batch, args.prompt_len + new_tokens):
            raise RuntimeError(f"{name}: generated shape {tuple(out.shape)}, expected exactly {new_tokens} tokens")
        return dt

    return once


def run_batch(variants, models, args, batch, device) -> dict:
    """Every variant at one batch size: warmed up one after the other (the first run compiles the static ones), then
    timed in ``repeats`` rounds that alternate between the variants, the order rotating each round. The host's speed
    drifts on shared GPU machines (one variant's back-to-back runs differ by tens of percent at batch 1); alternating
    spreads that drift over all variants alike."""
    runs, firsts, times, prefills, errors = {}, {}, {}, {}, {}
    for name in variants:
        try:
            once = prepare_variant(name, models, args, batch, device)
            firsts[name] = once()
            for _ in range(max(args.warmup - 1, 0)):
                once()
            runs[name], times[name], prefills[name] = once, [], []
        except Exception as e:  # one failing variant must not hide the others' numbers
            errors[name] = f"{type(e).__name__}: {e}"[:800]
    for name in rotating_rounds(list(runs), args.repeats):
        if name in errors:
            continue
        try:
            times[name].append(runs[name]())
            prefills[name].append(runs[name](1))
        except Exception as e:
            errors[name] = f"{type(e).__name__}: {e}"[:800]
    results = {}
    tokens = batch * args.new_tokens
    for name in variants:
        if name in errors:
            results[name] = {"error": errors[name]}
            continue
        t, t1 = times[name], prefills[name]
        step = (min(t) - min(t1)) / (args.new_tokens - 1) if args.new_tokens > 1 else None
        results[name] = {
            "tokens_per_s": round(tokens / min(t), 1),
            "tokens_per_s_median": round(tokens / statistics.median(t), 1),
            "ms_per_step": round(1000 * min(t) / args.new_tokens, 3),
            "prefill_ms": round(1000 * min(t1), 2),
            "decode_step_ms": round(1000 * step, 3) if step is not None and step > 0 else None,
            "first_run_s": round(firsts[name], 2),
            "times_s": [round(x, 4) for x in t],
            "prefill_times_s": [round(x, 4) for x in t1],
        }
    return results


def summarise(results: dict) -> list[dict]:
    """Per batch size and cache mode: PLDR-LLM against the fastest Llama of the same mode (by tokens/s; also
    ``pldr_vs_best_llama_by_round``, the median over the rounds of each round's ratio), and their prefill and
    decoding-step times (``pldr_vs_best_llama_decode_step``: that Llama's step time / PLDR-LLM's)."""
    rows = []
    batches = sorted({int(k.rsplit("@b", 1)[1]) for k in results})
    for batch in batches:
        def value(variant, key="tokens_per_s"):
            return results.get(f"{variant}@b{batch}", {}).get(key)
        for mode, pldr, llamas in (("dynamic", "pldr_kv_g", ("llama_dynamic", "llama_aligned_dynamic")),
                                   ("static_compiled", "pldr_static_compiled",
                                    ("llama_static_compiled", "llama_aligned_static_compiled"))):
            measured = {v: value(v) for v in llamas if value(v)}
            if not value(pldr) or not measured:
                continue
            best = max(measured, key=measured.get)
            steps = value(pldr, "decode_step_ms"), value(best, "decode_step_ms")
            rows.append({"batch": batch, "mode": mode, "pldr": pldr, "pldr_tokens_per_s": value(pldr),
                         "best_llama": best, "best_llama_tokens_per_s": measured[best],
                         "pldr_vs_best_llama": round(value(pldr) / measured[best], 3),
                         # (the median over the rounds of each round's ratio: the host's drift moves it less)
                         "pldr_vs_best_llama_by_round": round(statistics.median(
                             b / p for p, b in zip(value(pldr, "times_s"), value(best, "times_s"))), 3),
                         "pldr_prefill_ms": value(pldr, "prefill_ms"),
                         "best_llama_prefill_ms": value(best, "prefill_ms"),
                         "pldr_decode_step_ms": steps[0], "best_llama_decode_step_ms": steps[1],
                         "pldr_vs_best_llama_decode_step": round(steps[1] / steps[0], 3) if all(steps) else None})
        own, theirs = "pldr_static_compiled", "pldr_static_compiled_hf_mask"
        if value(own) and value(theirs):  # what the model's own one-token mask gains, in the same run
            rows.append({"batch": batch, "mode": "static_compiled_mask", "own_mask_tokens_per_s": value(own),
                         "hf_mask_tokens_per_s": value(theirs),
                         "own_mask_vs_hf_mask": round(value(own) / value(theirs), 3),
                         "own_mask_vs_hf_mask_by_round": round(statistics.median(
                             b / a for a, b in zip(value(own, "times_s"), value(theirs, "times_s"))), 3)})
    return rows


def main(argv=None):
    try:
        (args,) = HfArgumentParser(BenchDecodeArguments).parse_args_into_dataclasses(args=argv)
    except ValueError as e:  # e.g. an unknown option (argparse's own errors exit with their message already)
        raise SystemExit(f"bench_decode: {e}") from None
    if args.tiny:
        args.prompt_len, args.new_tokens = min(args.prompt_len, 16), min(args.new_tokens, 16)
        args.batch_sizes = args.batch_sizes if args.batch_sizes != "1,32" else "1,4"
        args.repeats, args.warmup = min(args.repeats, 2), min(args.warmup, 1)
        if args.compile_backend == "inductor" and args.device == "cpu":
            args.compile_backend = "eager"  # no C++ toolchain needed for the check
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}")
    if args.repeats < 1:
        raise SystemExit(f"--repeats must be at least 1, got {args.repeats}")
    device = torch.device(args.device)
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[args.dtype]
    torch.manual_seed(args.seed)
    pldr_cfg, llama_cfg, aligned_cfg = model_configs(args.tiny)
    models = {"pldr": PldrForCausalLM(pldr_cfg).to(device, dtype).eval(),
              "llama": LlamaForCausalLM(llama_cfg).to(device, dtype).eval(),
              "llama_aligned": LlamaForCausalLM(aligned_cfg).to(device, dtype).eval()}
    if any(v.startswith("pldr_layers") for v in variants):
        layers = copy.deepcopy(pldr_cfg)
        layers.decoder_cuda_graphs = False
        models["pldr_layers"] = PldrForCausalLM(layers).to(device, dtype).eval()
        models["pldr_layers"].load_state_dict(models["pldr"].state_dict())
    for m in models.values():  # random weights: never stop early on an end-of-sequence token
        m.generation_config.eos_token_id = None

    results, stack_graphs = {}, {}
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        for name, res in run_batch(variants, models, args, batch, device).items():
            results[f"{name}@b{batch}"] = res
            print(f"{name}@b{batch}: {res}", file=sys.stderr, flush=True)
        # (the prompts' forwards through the recorded decoder stack)
        stack_graphs[f"b{batch}"] = graph_counts(models["pldr"].decoder._stack_forward_graphs)
        torch._dynamo.reset()

    report = {
        "benchmark": "decode",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "settings": asdict(args),
        "params": {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()},
        "results": results,
        "summary": summarise(results),
        "pldr_decoder_graphs": stack_graphs,  # (counts so far, after each batch size)
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")
    return report


if __name__ == "__main__":
    main()
