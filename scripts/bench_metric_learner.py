#!/usr/bin/env python
"""Micro-benchmark of one layer's metric learner (the fused operator of modeling/metric_learner.py), printed as JSON.

    python scripts/bench_metric_learner.py                    # GPU: 110M sizes (d 64, A_dff 170, 8 units x 2 GLUs)
    python scripts/bench_metric_learner.py --sweep            # + block-size sweep of each Triton kernel (GPU time)
    python scripts/bench_metric_learner.py --device cpu --cases 512:fp32 --compiled none   # smoke run anywhere
    python scripts/bench_metric_learner.py --cases --compiled none --rotary 16x1024,4x1024  # the rotary operator only

For rows = batch * heads * d = 14336 and 3584 (batch 16 and 4 at 14 heads x 64) under bf16 autocast, and 14336 in
float32 (exact, and with TF32 allowed), the median time (triton.testing.do_bench on CUDA) of

* ``kernel``: ``fused_metric_learner`` with its Triton kernels (in float32 the exact or the TF32 kernels, which the
  operator only uses when ``metric_learner.FLOAT32_KERNELS`` says so);
* ``reference``: the same operator with its plain-PyTorch path;
* ``modules``: the ``PldrResidualMetricUnit`` modules in eager mode;
* ``modules_compiled`` and ``kernel_compiled``: the modules and the operator under ``torch.compile`` (inductor; first
  size, bf16, forward + backward only): compiled training without and with the operator;

as ``fwd`` (no gradient: inference), ``fwd_train`` (forward keeping what the backward needs) and ``fwd_bwd`` (forward
and backward, all parameter gradients), in milliseconds; ``launches``: CUDA kernels of one forward + backward; and
``error``: the largest relative error (max |x - exact| / max |exact|) of the output and of the gradients of A and of
each parameter against the modules in float64.

With ``--rotary BATCHxSEQ,...`` also the rotary operator on the joint q|k|v projection (``--heads`` heads of ``--d``,
bf16 on CUDA, float32 on CPU) per shape, in microseconds: ``fwd_us`` / ``bwd_us`` (rotate q and k, pass v; its
backward) for interleaved pairs (the papers' ``reference_rope``) and half-split pairs, next to ``clone_us`` (a copy
of the projection: the memory traffic's floor); and the backward with the metric sum's gradient inside
(``metric_sum_bwd_us``: dq += q (dA + dA^T) in the rotary kernel) against the separate GEMM, add and rotary backward
(``separate_bwd_us``), with the largest difference of their results over the largest result (``max_rel_diff``: the
fused backward adds in float32 before rounding, the separate ops round the GEMM's result first, so bf16 differs by
about its rounding). GPU time through CUDA graphs
on CUDA (no host time), wall time of the PyTorch path on CPU.
"""

import argparse
import contextlib
import copy
import json
import statistics
import sys
import time
import traceback

from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's pldr_hf, even if another is installed
import pldr_hf  # noqa: E402,F401  (makes pldr_hf.modeling importable from a source checkout)
from pldr_hf import PldrConfig  # noqa: E402
from pldr_hf.modeling import metric_learner as ML  # noqa: E402
from pldr_hf.modeling import modeling_pldr as M  # noqa: E402


def make_learner(d, hidden, units, glus, device, seed=0):
    cfg = PldrConfig(hidden_size=14 * d, num_attention_heads=14, head_dim=d, A_dff=hidden, num_reslayerA=units,
                     num_denseA=glus)
    torch.manual_seed(seed)
    learner = nn.ModuleList([M.PldrResidualMetricUnit(cfg) for _ in range(units)])
    with torch.no_grad():  # scaled init: activations of order 1 through all units, as in a trained model
        for name, p in learner.named_parameters():
            if "layernorm" in name:
                p.normal_(0, 0.1).add_(1.0 if name.endswith("weight") else 0.0)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
            else:
                p.normal_(0, p.shape[1] ** -0.5)
    return learner.to(device)


def modules(learner, A):
    for unit in learner:
        A = unit(A)
    return A


@contextlib.contextmanager
def tf32(enabled: bool):
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


@contextlib.contextmanager
def kernels_enabled(enabled: bool):
    """``enabled``: the kernels, in float32 too (exact, or TF32 where TF32 is allowed; by default float32 runs
    cuBLAS); otherwise the operator's reference path."""
    orig = ML._use_kernels
    if not enabled:
        ML._use_kernels = lambda *args: False
    ML.FLOAT32_KERNELS = ("tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee") if enabled else None
    try:
        yield
    finally:
        ML._use_kernels = orig
        ML.FLOAT32_KERNELS = None


def timer(device):
    if device == "cuda":
        import triton.testing

        return lambda fn, grad_to_none=None: triton.testing.do_bench(fn, grad_to_none=grad_to_none,
                                                                      return_mode="median")

    def cpu_time(fn, grad_to_none=None, reps=5):
        fn()
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times)

    return cpu_time


def count_launches(fn, device, grad_to_none):
    if device != "cuda":
        return None
    fn()
    torch.cuda.synchronize()
    for t in grad_to_none:  # as in the timings: no accumulation into existing gradients
        t.grad = None
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
               and "memcpy" not in e.name.lower() and "memset" not in e.name.lower())


def rel(x, exact):
    return ((x.double() - exact).abs().max() / exact.abs().max()).item()


def run_case(args, rows, mode, learner, compiled=None, only=None):
    device = args.device
    d = args.d
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=mode == "bf16")  # fp32 and tf32: no autocast
    A = torch.randn(rows // d, d, d, device=device)
    A_req = A.clone().requires_grad_()
    gout = torch.randn_like(A)
    params = list(learner.parameters())
    bench = timer(device)
    paths = {
        "kernel": lambda x: ML.fused_metric_learner(learner, x),
        "reference": lambda x: ML.fused_metric_learner(learner, x),
        "modules": lambda x: modules(learner, x),
    }
    paths.update(compiled or {})
    if only is not None:
        paths = {name: paths[name] for name in only}
    learner64 = copy.deepcopy(learner).double()
    A64 = A.double().requires_grad_()
    exact = modules(learner64, A64)
    exact_grads = torch.autograd.grad(exact, [A64] + list(learner64.parameters()), gout.double())
    result = {}
    for name, fn in paths.items():
        if name.startswith("kernel") and not (device == "cuda" and ML.triton is not None):
            continue
        try:
            with tf32(mode == "tf32"):
                result[name] = measure(fn, name, A, A_req, gout, params, exact, exact_grads, autocast, bench, device)
        except Exception as err:  # noqa: BLE001  (report it and measure the other paths)
            traceback.print_exc()
            result[name] = {"failed": f"{type(err).__name__}: {str(err)[:1500]}"}
    if "fwd_bwd_ms" in result.get("kernel", {}):
        for other in ("reference", "modules"):
            if "fwd_bwd_ms" in result.get(other, {}):
                result[f"speedup_fwd_bwd_vs_{other}"] = result[other]["fwd_bwd_ms"] / result["kernel"]["fwd_bwd_ms"]
    return result


def measure(fn, name, A, A_req, gout, params, exact, exact_grads, autocast, bench, device):
    """Errors against the float64 modules, times and kernel launches of one path."""
    entry = {}
    with kernels_enabled(name != "reference"), autocast:

        def fwd():
            with torch.no_grad():
                return fn(A)

        def fwd_train():
            return fn(A_req)

        def fwd_bwd():
            fn(A_req).backward(gout)

        out = fn(A_req)
        grads = torch.autograd.grad(out, [A_req] + params, gout)
        entry["error"] = {"out": rel(out, exact), "grad_A": rel(grads[0], exact_grads[0]),
                          "grad_params_max": max(rel(g, e) for g, e in zip(grads[1:], exact_grads[1:]))}
        del out, grads
        if not name.endswith("compiled"):  # compiled: training only (each grad mode is another compilation)
            entry["fwd_ms"] = bench(fwd)
            entry["fwd_train_ms"] = bench(fwd_train)
        entry["fwd_bwd_ms"] = bench(fwd_bwd, grad_to_none=[A_req] + params)
        entry["launches_fwd_bwd"] = count_launches(fwd_bwd, device, [A_req] + params)
    return entry


def bench_rotary(args, batch, seq) -> dict:
    """The rotary operator's kernels at one shape (see the module's docstring)."""
    device, H, d = args.device, args.heads, args.d
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    if device == "cuda":
        import triton.testing

        def bench(fn):
            return round(triton.testing.do_bench_cudagraph(fn, return_mode="median") * 1000, 2)
    else:
        def bench(fn):
            return round(timer(device)(fn) * 1000, 2)

    qkv = torch.randn(batch, seq, 3 * H * d, device=device, dtype=dtype, generator=gen)
    dq, dk, dv = (torch.randn(batch, H, seq, d, device=device, dtype=dtype, generator=gen) for _ in range(3))
    dA = torch.randn(batch, H, d, d, device=device, generator=gen)
    positions = torch.arange(seq, device=device)[None].expand(batch, seq)
    out = {"clone_us": bench(lambda: qkv.clone())}
    for name, interleaved in (("interleaved", True), ("half_split", False)):
        cos, sin = M.rotary_tables(positions, d, 10000.0, interleaved)
        out[name] = {"fwd_us": bench(lambda: ML.rotary_qkv_forward(qkv, cos, sin, H, interleaved)),
                     "bwd_us": bench(lambda: ML.rotary_qkv_backward(dq, dk, dv, cos, sin, interleaved))}
    cos, sin = M.rotary_tables(positions, d, 10000.0, True)
    q = ML.rotary_qkv_forward(qkv, cos, sin, H, True)[0]

    def separate():
        gq = torch.matmul(q, (dA + dA.transpose(-1, -2)).to(q.dtype))
        return ML.rotary_qkv_backward(dq + gq, dk, dv, cos, sin, True)

    def fused():
        return ML.rotary_qkv_metric_sum_backward(dq, dk, dv, dA, q, None, cos, sin, True)

    out["metric_sum_bwd_us"] = bench(fused)
    out["separate_bwd_us"] = bench(separate)
    want = separate().float()
    out["max_rel_diff"] = ((fused().float() - want).abs().max() / want.abs().max()).item()
    return out


def sweep(args, rows, learner):
    """GPU time in ms (CUDA graphs: no host time, which would hide the kernels' own at small row counts) of each
    Triton kernel for block configurations around the defaults, the other kernels at their defaults (bf16). The row
    kernels are timed at each row block they may take; ``bwd_rows`` without parameter gradients (the row kernel
    alone); ``bwd_params`` as the whole backward with them. Times include the weight staging (a few microseconds)."""
    import triton.testing

    d = args.d
    *kinds, eps = ML.learner_tensors(learner)
    w12, w3, b12, b3, ln_w, ln_b = [None if ps is None else torch.stack(ps).detach() for ps in kinds]
    layout = ML.LearnerLayout(len(learner), args.glus, args.hidden, d, b12 is not None)
    x = torch.randn(rows, d, device=args.device)
    gout = torch.randn(rows, d, device=args.device)
    cd, f32 = torch.bfloat16, torch.float32
    active = ML._kernel_configs(torch.device(args.device))  # (the set this GPU runs: see SHARED_MEMORY_NEEDED)
    default = copy.deepcopy(active)
    row_options = [(64, 4, 2), (64, 4, 1), (64, 4, 3), (64, 8, 2), (32, 4, 3)]
    candidates = {
        "fwd": [{bm: option} for bm in (64, 32, 16) for option in row_options],
        "bwd_rows": [{bm: option} for bm in (64, 32, 16) for option in row_options],
        "bwd_params": [(64, 64, 4, 3), (64, 64, 4, 2), (32, 64, 4, 3), (64, 64, 8, 3), (64, 32, 4, 3)],
    }
    saved = ML._kernel_forward(x, w12, w3, b12, b3, ln_w, ln_b, layout, eps, cd, f32, True, False)[1:]
    runs = {
        "fwd": lambda: ML._kernel_forward(x, w12, w3, b12, b3, ln_w, ln_b, layout, eps, cd, f32, True, False),
        "bwd_rows": lambda: ML._kernel_backward(gout, w12, w3, b12, ln_w, *saved, layout, cd, f32, False, False),
        "bwd_params": lambda: ML._kernel_backward(gout, w12, w3, b12, ln_w, *saved, layout, cd, f32, True, False),
    }
    result = {}
    for kernel, configs in candidates.items():
        times = {}
        for config in configs:
            active.update(copy.deepcopy(default))
            active[kernel] = config
            name = str(next(iter(config.items())) if isinstance(config, dict) else config)
            try:
                times[name] = triton.testing.do_bench_cudagraph(runs[kernel], rep=30, return_mode="median")
            except Exception as err:  # noqa: BLE001  (e.g. out of shared memory: report and go on)
                times[name] = f"failed: {type(err).__name__}: {str(err)[:200]}"
        timed = {k: v for k, v in times.items() if isinstance(v, float)}
        result[kernel] = {"gpu_ms": times, "best": min(timed, key=timed.get) if timed else None}
    active.update(default)
    # row splits of the parameter-gradient kernel
    splits = {}
    for n in (None, 2, 8, 16, 32):
        ML.PARAM_GRAD_SPLITS = n
        splits[str(n)] = triton.testing.do_bench_cudagraph(runs["bwd_params"], rep=30, return_mode="median")
    ML.PARAM_GRAD_SPLITS = None
    result["param_grad_splits_bwd_gpu_ms"] = splits
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--cases", nargs="*", default=["14336:bf16", "3584:bf16", "14336:fp32", "14336:tf32"],
                        help="rows:mode, rows = batch * heads * d; mode bf16 (autocast), fp32, tf32 (fp32 with TF32);"
                             " none given: no learner cases")
    parser.add_argument("--rotary", default="", help="BATCHxSEQ,...: also the rotary operator at these shapes")
    parser.add_argument("--heads", type=int, default=14, help="attention heads (the rotary operator)")
    parser.add_argument("--d", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=170)
    parser.add_argument("--units", type=int, default=8)
    parser.add_argument("--glus", type=int, default=2)
    parser.add_argument("--compiled", default="both", choices=["both", "kernel", "none"],
                        help="which paths to also time under torch.compile (the modules take a while to compile)")
    parser.add_argument("--sweep", action="store_true", help="block-size sweep of each kernel (bf16)")
    parser.add_argument("--out", default="", help="also write the JSON report here (updated after every step)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --device cpu")
    learner = make_learner(args.d, args.hidden, args.units, args.glus, args.device)
    report = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "triton": getattr(ML.triton, "__version__", None),
        "sizes": {"d": args.d, "A_dff": args.hidden, "units": args.units, "glus": args.glus},
        "kernel_configs": {k: ({str(bm): list(c) for bm, c in v.items()} if isinstance(v, dict) else list(v))
                           for k, v in ML._kernel_configs(torch.device(args.device)).items()},
        "results": {},
    }

    def save():  # after every step, so that a run cut short still leaves what it measured
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=1))

    try:
        cases = [(int(case.split(":")[0]), case.split(":")[1]) for case in args.cases]
        rotary = [tuple(int(n) for n in shape.lower().split("x")) for shape in args.rotary.split(",") if shape]
    except (ValueError, IndexError):
        sys.exit(f"bench_metric_learner: --cases takes rows:mode (e.g. 14336:bf16), --rotary BATCHxSEQ (e.g. "
                 f"16x1024); got {args.cases} and {args.rotary!r}")
    if any(len(shape) != 2 for shape in rotary):
        sys.exit(f"bench_metric_learner: --rotary takes BATCHxSEQ shapes, got {args.rotary!r}")
    for batch, seq in rotary:
        t = time.time()
        report.setdefault("rotary", {})[f"{batch}x{seq}"] = bench_rotary(args, batch, seq)
        print(f"rotary {batch}x{seq}: {time.time() - t:.1f}s", file=sys.stderr, flush=True)
        save()
    for rows, mode in cases:
        t = time.time()
        report["results"][f"rows{rows}_{mode}"] = run_case(args, rows, mode, learner)
        print(f"rows {rows} {mode}: {time.time() - t:.1f}s", file=sys.stderr, flush=True)
        save()
    if args.sweep and args.device == "cuda" and ML.triton is not None:
        t = time.time()
        report["sweep"] = {}
        for rows in dict.fromkeys(rows for rows, mode in cases if mode == "bf16"):  # each bf16 case's row count
            report["sweep"][f"rows{rows}"] = sweep(args, rows, learner)
            save()
        print(f"sweep: {time.time() - t:.1f}s", file=sys.stderr, flush=True)
        save()
    if args.compiled != "none" and cases:  # last: compiling ~350 ops takes a while (first size, bf16, forward + backward only)
        t = time.time()
        compiled = {"kernel_compiled": torch.compile(lambda x: ML.fused_metric_learner(learner, x), fullgraph=True)}
        if args.compiled == "both":
            compiled["modules_compiled"] = torch.compile(lambda x: modules(learner, x))
        key = f"rows{cases[0][0]}_bf16"
        case = run_case(args, cases[0][0], "bf16", learner, compiled, only=list(compiled))
        results = report["results"].setdefault(key, {})
        results.update(case)
        if "fwd_bwd_ms" in results.get("kernel_compiled", {}) and "fwd_bwd_ms" in results.get("modules_compiled", {}):
            results["speedup_fwd_bwd_compiled"] = (
                results["modules_compiled"]["fwd_bwd_ms"] / results["kernel_compiled"]["fwd_bwd_ms"])
        print(f"compiled: {time.time() - t:.1f}s", file=sys.stderr, flush=True)
        save()
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
