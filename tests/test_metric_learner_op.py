"""The metric learner operator (``pldr::metric_learner_fwd`` / ``pldr::metric_learner_bwd`` behind
``fused_metric_learner``) computes what the modules compute: outputs and gradients of A and of every parameter, with
and without biases, any number of units and GLUs, frozen parameters, without gradients, under autocast and under
``torch.compile``; it steps aside (returns None) for anything that changes the modules (adapters, hooks).

Its Triton kernels are checked on CPU under Triton's interpreter (in a subprocess: TRITON_INTERPRET must be set before
triton is imported). The CUDA tests (kernels against the reference on the GPU) run on a GPU machine only."""

import copy
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from pldr_hf import PldrConfig
from pldr_hf.modeling import metric_learner as ML
from pldr_hf.modeling import modeling_pldr as M

REPO = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_cuda_triton = pytest.mark.skipif(not (CUDA and HAS_TRITON), reason="needs a CUDA GPU and triton")


def _learner(units=3, glus=2, bias=True, d=16, hidden=20, seed=0, std=None, device="cpu"):
    """A ModuleList of PLDR metric learner units. ``std=None``: scaled init (weights ~ 1/sqrt(fan_in), LayerNorm
    weights near 1), well conditioned for low-precision comparisons; otherwise every parameter ~ N(0, std)."""
    cfg = PldrConfig(vocab_size=64, hidden_size=2 * d, num_attention_heads=2, head_dim=d, num_hidden_layers=1,
                     intermediate_size=40, A_dff=hidden, num_reslayerA=units, num_denseA=glus, glu_bias=bias)
    torch.manual_seed(seed)
    learner = nn.ModuleList([M.PldrResidualMetricUnit(cfg) for _ in range(units)])
    with torch.no_grad():
        for name, p in learner.named_parameters():
            if std is not None:
                p.normal_(0, std)
            elif "layernorm" in name:
                p.normal_(0, 0.1).add_(1.0 if name.endswith("weight") else 0.0)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
            else:
                p.normal_(0, p.shape[1] ** -0.5)
    return learner.to(device)


def _stacked(units, requires_grad=False):
    """The parameters stacked per kind (W1|W2, W3, b1|b2, b3, LayerNorm weights and biases) and eps."""
    *kinds, eps = ML.learner_tensors(units)
    return [None if ps is None else torch.stack(ps).detach().requires_grad_(requires_grad) for ps in kinds], eps


def _flat(units, requires_grad=False):
    """The operator's parameter inputs: the flat weights and norms, (units, GLUs per unit, hidden), and eps."""
    kinds, eps = _stacked(units)
    weights, norms = (t.requires_grad_(requires_grad) for t in ML.pack_learner(*kinds))
    return weights, norms, (len(units), len(units[0].denseAs), units[0].denseAs[0].gluw1.out_features), eps


def _modules(units, A):
    for unit in units:
        A = unit(A)
    return A


def _grads(out, inputs, gout):
    return torch.autograd.grad(out, inputs, gout, allow_unused=True)


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def _compare(units, A, gout, tol):
    """Op vs modules: same shape/dtype, outputs and gradients (A and every parameter) within ``tol`` of the largest
    value."""
    params = [p for p in units.parameters() if p.requires_grad]
    inputs = ([A] if A.requires_grad else []) + params
    ref = _modules(units, A)
    out = ML.fused_metric_learner(units, A)
    assert out is not None and out.shape == ref.shape and out.dtype == ref.dtype
    assert _rel(out, ref) <= tol
    for g, r in zip(_grads(out, inputs, gout), _grads(ref, inputs, gout)):
        assert g.shape == r.shape and g.dtype == r.dtype
        assert _rel(g, r) <= tol


# ---------------------------------------------------------------------------------------------------------------------
# Reference path (CPU)
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("glus", [1, 2, 3])
def test_op_matches_the_modules(bias, glus):
    units = _learner(units=2, glus=glus, bias=bias, std=0.3)
    A = torch.randn(2, 2, 16, 16, requires_grad=True)
    _compare(units, A, torch.randn(2, 2, 16, 16), 1e-5)


@pytest.mark.parametrize("n_units", [1, 3])
def test_op_matches_the_modules_any_number_of_units(n_units):
    units = _learner(units=n_units, glus=2, std=0.3)
    A = torch.randn(3, 5, 16, requires_grad=True)  # any leading shape
    _compare(units, A, torch.randn(3, 5, 16), 1e-5)


def test_non_contiguous_input_and_float64():
    units = _learner(units=2).double()
    A = torch.randn(4, 16, 3, dtype=torch.float64).transpose(1, 2).requires_grad_()
    assert not A.is_contiguous()
    _compare(units, A, torch.randn(4, 3, 16, dtype=torch.float64), 1e-12)


def test_bf16_autocast_within_autocast_noise():
    units = _learner(units=3, glus=2, d=16, hidden=20)
    A = torch.randn(2, 2, 16, 16, requires_grad=True)
    gout = torch.randn(2, 2, 16, 16)
    params = list(units.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _modules(units, A)
        out = ML.fused_metric_learner(units, A)
    assert out.dtype == ref.dtype == torch.float32  # A + (bf16 GLU output) is float32, and so is its LayerNorm
    exact = _modules(copy.deepcopy(units).double(), A.detach().double().requires_grad_())
    assert _rel(out, exact) <= 2e-2 and _rel(out, ref) <= 3e-2
    units64 = copy.deepcopy(units).double()
    A64 = A.detach().double().requires_grad_()
    exact_grads = _grads(_modules(units64, A64), [A64] + list(units64.parameters()), gout.double())
    for g, r, e in zip(_grads(out, [A] + params, gout), _grads(ref, [A] + params, gout), exact_grads):
        assert g.dtype == r.dtype
        assert _rel(g, e) <= max(2e-2, 2 * _rel(r, e))  # as close to the exact gradient as the modules' own


def test_bf16_parameters_without_autocast():
    units = _learner(units=2).to(torch.bfloat16)
    A = torch.randn(2, 2, 16, 16, dtype=torch.bfloat16, requires_grad=True)
    ref = _modules(units, A)
    out = ML.fused_metric_learner(units, A)
    assert out.dtype == ref.dtype == torch.bfloat16
    assert _rel(out, ref) <= 3e-2
    (g,) = _grads(out, [A], torch.ones_like(out))
    assert g.dtype == torch.bfloat16 and torch.isfinite(g).all()


def test_frozen_learner_gives_only_the_input_gradient():
    units = _learner(units=2, std=0.3)
    for p in units.parameters():
        p.requires_grad_(False)
    A = torch.randn(2, 2, 16, 16, requires_grad=True)
    gout = torch.randn(2, 2, 16, 16)
    (ref,) = _grads(_modules(units, A), [A], gout)
    out = ML.fused_metric_learner(units, A)
    (got,) = _grads(out, [A], gout)
    assert _rel(got, ref) <= 1e-5
    assert all(p.grad is None for p in units.parameters())


def test_parameter_gradients_without_input_gradient():
    units = _learner(units=2, glus=1, bias=False, std=0.3)
    A = torch.randn(2, 2, 16, 16)
    _compare(units, A, torch.randn(2, 2, 16, 16), 1e-5)
    units[0].layernormA.weight.requires_grad_(False)  # partly frozen
    _compare(units, A, torch.randn(2, 2, 16, 16), 1e-5)


def test_no_grad_path_saves_nothing():
    units = _learner(units=2, std=0.3)
    A = torch.randn(2, 2, 16, 16, requires_grad=True)
    ref = _modules(units, A).detach()
    for ctx in (torch.no_grad, torch.inference_mode):
        with ctx():
            out = ML.fused_metric_learner(units, A)
        assert out.grad_fn is None and not out.requires_grad
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    weights, norms, sizes, eps = _flat(units)
    _, *kept = torch.ops.pldr.metric_learner_fwd(A.detach().reshape(-1, 16), weights, norms, None, None, *sizes, eps,
                                                 torch.float32, torch.float32, False)
    assert len(kept) == 6 and all(t.numel() == 0 for t in kept)  # GLU inputs, sums, means, rstds, staged weights


def test_gradients_accumulate_over_two_calls():
    units = _learner(units=2, std=0.3)
    A1, A2 = torch.randn(3, 16), torch.randn(5, 16)
    (ML.fused_metric_learner(units, A1).sum() + ML.fused_metric_learner(units, A2).pow(2).sum()).backward()
    got = [p.grad.clone() for p in units.parameters()]
    units.zero_grad()
    (_modules(units, A1).sum() + _modules(units, A2).pow(2).sum()).backward()
    for g, p in zip(got, units.parameters()):
        assert _rel(g, p.grad) <= 1e-5


# ---------------------------------------------------------------------------------------------------------------------
# When the modules must run, and wrong shapes
# ---------------------------------------------------------------------------------------------------------------------
def test_lora_adapter_makes_the_modules_run():
    peft = pytest.importorskip("peft")
    units = _learner(units=2)
    A = torch.randn(2, 2, 16, 16)
    assert ML.fused_metric_learner(units, A) is not None
    peft.inject_adapter_in_model(peft.LoraConfig(r=2, target_modules=["gluw1"]), units)
    assert type(units[0].denseAs[0].gluw1) is not nn.Linear
    assert ML.fused_metric_learner(units, A) is None


def test_hooks_make_the_modules_run():
    units = _learner(units=2)
    A = torch.randn(2, 16)
    for module in (units[1], units[0].denseAs[1], units[1].denseAs[0].gluw3, units[0].layernormA):
        for register in (module.register_forward_hook, module.register_forward_pre_hook):
            handle = register(lambda *args: None)
            assert ML.fused_metric_learner(units, A) is None
            handle.remove()
        handle = module.register_full_backward_hook(lambda *args: None)
        assert ML.fused_metric_learner(units, A) is None
        handle.remove()
    handle = nn.modules.module.register_module_forward_hook(lambda *args: None)
    try:
        assert ML.fused_metric_learner(units, A) is None
    finally:
        handle.remove()
    assert ML.fused_metric_learner(units, A) is not None


def test_other_module_changes_make_the_modules_run():
    A = torch.randn(2, 16)
    units = _learner(units=2)
    units[1].denseAs[0].gluw2 = nn.Sequential(units[1].denseAs[0].gluw2)  # a wrapped Linear
    assert ML.fused_metric_learner(units, A) is None
    units = _learner(units=2)
    units[0].denseAs[0].act_fn = nn.GELU()
    assert ML.fused_metric_learner(units, A) is None
    units = _learner(units=2)
    units[1].layernormA.bias.data = units[1].layernormA.bias.data.double()  # mixed parameter dtypes
    assert ML.fused_metric_learner(units, A) is None
    units = _learner(units=2)
    assert ML.fused_metric_learner(units, A.double()) is None  # the modules raise their own dtype error
    assert ML.fused_metric_learner(nn.ModuleList(), A) is A


def test_wrong_shapes_raise_value_error():
    units = _learner(units=2)
    with pytest.raises(ValueError, match="rows of width 16"):
        ML.fused_metric_learner(units, torch.randn(4, 15))
    # the parameters by kind (stacked_metric_learner)
    (w12, w3, b12, b3, ln_w, ln_b), eps = _stacked(units)

    def stacked(x, *kinds):
        return ML.stacked_metric_learner(x, *kinds, eps)

    with pytest.raises(ValueError, match=r"W1\|W2 must have shape \(8, 20, 16\)"):
        stacked(torch.randn(4, 16), w12[:-1], w3, b12, b3, ln_w, ln_b)
    with pytest.raises(ValueError, match="rows of width 16"):
        stacked(torch.randn(4, 17), w12, w3, b12, b3, ln_w, ln_b)
    with pytest.raises(ValueError, match="G a multiple of U"):
        stacked(torch.randn(4, 16), w12, w3, b12, b3, ln_w.repeat(3, 1), ln_b.repeat(3, 1))
    with pytest.raises(ValueError, match="both b1|b2 and b3, or neither"):
        stacked(torch.randn(4, 16), w12, w3, b12, None, ln_w, ln_b)
    with pytest.raises(ValueError, match="same dtype"):
        stacked(torch.randn(4, 16), w12, w3.double(), b12, b3, ln_w, ln_b)
    # the flat parameters (the operator's inputs, flat_metric_learner)
    weights, norms, sizes, eps = _flat(units)
    def fwd(x, weights, norms, *rest):
        return torch.ops.pldr.metric_learner_fwd(x, weights, norms, None, None, *rest)

    options = (eps, torch.float32, torch.float32, False)
    with pytest.raises(ValueError, match=r"flat weights must be a vector of 3 x 4 GLUs x hidden 20 x d elements"):
        fwd(torch.randn(4, 16), weights[:-1], norms, *sizes, *options)
    with pytest.raises(ValueError, match=r"rows must have width 16"):
        fwd(torch.randn(4, 17), weights, norms, *sizes, *options)
    with pytest.raises(ValueError, match=r"flat biases and LayerNorm parameters must be a vector of 64 or 288"):
        fwd(torch.randn(4, 16), weights, norms[:-1], *sizes, *options)
    with pytest.raises(ValueError, match=r"expected rows \[N, d\]"):
        fwd(torch.randn(4, 2, 16), weights, norms, *sizes, *options)
    with pytest.raises(ValueError, match="must be positive"):
        fwd(torch.randn(4, 16), weights, norms, 0, 2, 20, *options)
    with pytest.raises(ValueError, match="same dtype"):
        fwd(torch.randn(4, 16), weights, norms.double(), *sizes, *options)
    with pytest.raises(ValueError, match="rows of width 16"):
        ML.flat_metric_learner(torch.randn(3, 5, 17), weights, norms, *sizes, eps)
    with pytest.raises(ValueError, match="A is torch.float64"):
        ML.flat_metric_learner(torch.randn(3, 16).double(), weights, norms, *sizes, eps)


# ---------------------------------------------------------------------------------------------------------------------
# torch.compile and the operator checks
# ---------------------------------------------------------------------------------------------------------------------
def test_compiles_without_graph_breaks_and_matches_eager():
    units = _learner(units=2, std=0.3)

    def fn(A):
        return ML.fused_metric_learner(units, A) * 2.0

    A = torch.randn(2, 2, 16, 16, requires_grad=True)
    assert torch._dynamo.explain(fn)(A).graph_break_count == 0
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    gout = torch.randn(2, 2, 16, 16)
    inputs = [A] + list(units.parameters())
    out, ref = compiled(A), fn(A)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    for g, r in zip(_grads(out, inputs, gout), _grads(ref, inputs, gout)):
        torch.testing.assert_close(g, r, atol=1e-6, rtol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, ref = compiled(A), fn(A)
    assert out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    with torch.no_grad():
        assert not compiled(A).requires_grad


@pytest.mark.parametrize("bias", [True, False])
def test_opcheck(bias):
    units = _learner(units=2, glus=2, bias=bias, std=0.3)
    x = torch.randn(12, 16)
    norm = (1 + 0.1 * torch.randn(16), 0.1 * torch.randn(16))  # (the input LayerNorm in the operator)
    for save, dtype, with_norm in ((True, torch.float32, False), (False, torch.float32, False),
                                   (True, torch.bfloat16, False), (True, torch.float32, True),
                                   (False, torch.bfloat16, True)):
        weights, norms, sizes, eps = _flat(units, requires_grad=save)
        n = [t.clone().requires_grad_(save) for t in norm] if with_norm else [None, None]
        args = (x.clone().requires_grad_(save), weights, norms, *n, *sizes, eps, dtype, torch.float32, save)
        torch.library.opcheck(torch.ops.pldr.metric_learner_fwd.default, args)
    weights, norms, sizes, eps = _flat(units)
    for n in ([None, None], list(norm)):
        _, *saved = torch.ops.pldr.metric_learner_fwd(x, weights, norms, *n, *sizes, eps, torch.float32, torch.float32,
                                                      True)
        for param_grads in (True, False):
            args = (torch.randn(12, 16), x, weights, norms, *n, *sizes, *saved, eps, torch.float32, torch.float32,
                    param_grads)
            torch.library.opcheck(torch.ops.pldr.metric_learner_bwd.default, args)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not importable")
def test_which_calls_the_kernels_take(monkeypatch):
    monkeypatch.setattr(ML, "_KERNELS_ON_CPU", True)  # CPU tensors stand for GPU ones here (nothing is launched)
    x = torch.zeros(10, 64)
    params = torch.zeros(1)
    layout = ML.LearnerLayout(8, 2, 170, 64, True)
    assert ML._use_kernels(x, params, layout, torch.bfloat16) and ML._use_kernels(x, params, layout, torch.float16)
    assert not ML._use_kernels(x, params, ML.LearnerLayout(8, 2, 170, 48, True), torch.bfloat16)  # d not a power of two
    assert not ML._use_kernels(x.double(), params, layout, torch.float64)
    # float32: cuBLAS unless the kernels' dot precision is named
    assert not ML._use_kernels(x, params, layout, torch.float32)
    for precision in ("ieee", "tf32"):
        monkeypatch.setattr(ML, "FLOAT32_KERNELS", precision)
        assert ML._use_kernels(x, params, layout, torch.float32) and ML._dot_precision(torch.float32) == precision
    monkeypatch.setattr(ML, "_KERNELS_ON_CPU", False)
    assert not ML._use_kernels(x, params, layout, torch.bfloat16)


# What each Triton kernel writes, by argument name: its outputs and nothing else. Under torch.compile inductor reads a
# kernel's writes from its Triton IR and copies every input it finds written before each launch (on an H200 the rotary
# kernels' cos and sin tables were copied per layer, forward and backward: ten launches a step at 4 x 1024).
KERNEL_WRITES = {
    "_learner_stage_kernel": {"WS", "BS"},
    "_learner_fwd_kernel": {"OUT", "XIN", "Z", "MEAN", "RSTD"},
    "_learner_bwd_rows_kernel": {"GX", "GY", "LNPART"},
    "_learner_bwd_params_kernel": {"PART"},
    "_power_law_fwd_kernel": {"A_LM", "G"},
    "_power_law_bwd_kernel": {"GA", "PART"},
    "_swiglu_fwd_kernel": {"out_ptr"},
    "_swiglu_bwd_kernel": {"dh_ptr"},
    "_rotary_qkv_fwd_kernel": {"Q", "K", "V"},
    "_rotary_qkv_bwd_kernel": {"OUT"},
}


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not importable")
def test_compile_sees_each_kernel_write_only_its_outputs(monkeypatch):
    # Every kernel the model's training step and the operators launch (recorded on CPU tensors, not run), analysed as
    # inductor analyses it, from the Triton IR made for a Hopper GPU (no GPU needed to make it).
    import triton.runtime
    from torch._higher_order_ops import triton_kernel_wrap
    from triton.backends.compiler import GPUTarget
    from triton.runtime.jit import JITFunction

    analyse = getattr(triton_kernel_wrap, "identify_accessed_tensors", None)
    if analyse is None:
        pytest.skip("this torch has no identify_accessed_tensors")

    class Hopper:
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

    monkeypatch.setattr(triton.runtime.driver, "_active", Hopper())
    monkeypatch.setattr(ML, "_KERNELS_ON_CPU", True)
    monkeypatch.setattr(ML, "_sm_count", lambda device: 132)
    launches = []

    def record(self, *args, grid, warmup, **kwargs):
        launches.append((self.fn.__name__, {**dict(zip(self.arg_names, args)), **kwargs}))

    monkeypatch.setattr(JITFunction, "run", record)
    cfg = PldrConfig(vocab_size=64, hidden_size=32, num_attention_heads=2, head_dim=16, num_hidden_layers=1,
                     intermediate_size=42, A_dff=12, num_reslayerA=2, num_denseA=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = M.PldrForCausalLM(cfg).train()
    ids = torch.randint(4, 64, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    ML.joint_swiglu(torch.randn(4, 8, 64, dtype=torch.bfloat16, requires_grad=True)).float().sum().backward()
    B, S, H, d = 2, 32, 2, 16
    qkv = torch.randn(B, S, 3 * H * d, requires_grad=True)
    cos, sin = (torch.randn(1, S, 1, d).expand(B, -1, -1, -1) for _ in range(2))  # (as the model expands them)
    q, k, v, A = ML.rotary_qkv_metric_sum(qkv, cos, sin, H, True, torch.ones(B, S))
    (q.sum() + k.sum() + v.sum() + A.sum()).backward()
    q, k, v = ML.rotary_qkv(qkv, cos, sin, H, True)
    (q.sum() + k.sum() + v.sum()).backward()

    assert {name for name, _ in launches} == set(KERNEL_WRITES)
    for name, args in launches:
        kwargs = {k: v for k, v in args.items() if k not in ("num_warps", "num_stages")}
        writes = {dep.name for dep in analyse(getattr(ML, name), kwargs, {}).read_writes.writes}
        assert writes == KERNEL_WRITES[name], (name, sorted(writes))
        if name.startswith("_rotary"):  # broadcast tables are read as their one row, not copied out per batch entry
            assert args["COS"].shape[0] == 1 and args["SIN"].shape[0] == 1


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not importable")
def test_row_blocks_and_staged_hidden_size(monkeypatch):
    # The row kernels take the largest row block that gives every SM a program (measured fastest on an H200 at the
    # 110M sizes); the staged weights pad A_dff to a multiple of every kernel's hidden block.
    monkeypatch.setattr(ML, "_sm_count", lambda device: 132)
    cpu = torch.device("cpu")
    blocks = [ML._row_config("fwd", rows, 64, cpu)[0] for rows in (14336, 8385, 8384, 7168, 3584, 96)]
    assert blocks == [64, 64, 32, 32, 32, 32]
    assert ML._row_config("bwd_rows", 14336, 64, cpu) == (64, 64, 4, 1)
    assert ML._row_config("bwd_rows", 3584, 64, cpu) == (32, 64, 4, 2)
    assert ML._row_config("fwd", 14336, 128, cpu)[1] == 32  # (the weight tiles [BLOCK_H, d] of chunks in flight)
    assert ML._padded_hidden(170) == 192 and ML._padded_hidden(128) == 128 and ML._padded_hidden(20) == 64


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not importable")
def test_gpus_with_little_shared_memory_take_the_small_configurations(monkeypatch):
    # A GPU whose programs get 64 KB of shared memory (Turing) cannot launch the H200-tuned blocks (up to 96 KB there):
    # it takes the configurations that need less; one with 227 KB (Hopper) the tuned ones. (Device indices with their
    # limits filled in: no GPU is needed.)
    monkeypatch.setattr(ML, "_sm_count", lambda device: 132)
    monkeypatch.setattr(ML, "_SHARED_MEMORY", {0: 64 * 1024, 1: 227 * 1024})
    small, large = torch.device("cuda", 0), torch.device("cuda", 1)
    assert ML._kernel_configs(small) is ML.SMALL_SHARED_MEMORY_CONFIGS
    assert ML._kernel_configs(large) is ML.KERNEL_CONFIGS
    assert ML._row_config("fwd", 14336, 64, small) == (64, 32, 4, 2)
    assert ML._row_config("fwd", 14336, 64, large) == (64, 64, 4, 3)
    assert ML._row_config("bwd_rows", 3584, 64, small) == (32, 64, 4, 1)
    assert ML._kernel_configs(small)["bwd_params"] == (32, 64, 4, 3)
    assert ML._kernel_configs(small)["power_law_bwd"] == (64, 8)
    assert ML._padded_hidden(170) == 192  # (the same staged weights either way)


# ---------------------------------------------------------------------------------------------------------------------
# The Triton kernels under Triton's CPU interpreter
# ---------------------------------------------------------------------------------------------------------------------
# Runs in a fresh interpreter with TRITON_INTERPRET=1. Three shortcomings of Triton 3.6's interpreter are patched
# there first (they concern the interpreter only, not compiled kernels): loop bounds taken from kernel arguments are
# converted with int() on one-element arrays, which NumPy >= 2.4 rejects; tl.dot multiplies bfloat16 operands as
# their raw 16-bit patterns; and float32 -> bfloat16 casts truncate (or, asked to round, drop the carry) where the GPU
# rounds to nearest even.
_INTERPRETER_PATCHES = r'''
import copy, json, os, sys
assert os.environ.get("TRITON_INTERPRET") == "1"
import numpy as np
import torch
import triton.language as tl
import triton.runtime.interpreter as interp

_patch_tensor = interp._patch_lang_tensor
def _patch_lang_tensor(tensor, scope):
    _patch_tensor(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))
interp._patch_lang_tensor = _patch_lang_tensor

_create_dot = interp.InterpreterBuilder.create_dot
def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
    def widen(t):
        if t.dtype.scalar != tl.bfloat16:
            return t
        return interp.TensorHandle(interp._convert_float(t.data, tl.bfloat16, tl.float32, None).view(np.float32),
                                   tl.float32)
    return _create_dot(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)
interp.InterpreterBuilder.create_dot = create_dot

_convert = interp._convert_float
def _convert_float(data, src, dst, rounding_mode):
    if src == tl.float32 and dst == tl.bfloat16:
        u = np.ascontiguousarray(data).view(np.uint32).astype(np.uint64)
        return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return _convert(data, src, dst, rounding_mode)
interp._convert_float = _convert_float
'''
_INTERPRETER_SCRIPT = _INTERPRETER_PATCHES + r'''
from test_metric_learner_op import _learner, _modules, _grads, _rel
from pldr_hf.modeling import metric_learner as ML

# Small blocks so that the sizes below exercise every edge: 70 rows = 4 full blocks of 16 + 6 (masked) rows;
# A_dff = 40 staged as 64 = two chunks of 32, the second with 24 zero-padded units (the forward's one-chunk-ahead loads
# cross chunk, GLU and unit boundaries); the parameter gradients split over 2 row ranges.
ML.KERNEL_CONFIGS.update(fwd={16: (32, 4, 1)}, bwd_rows={16: (32, 4, 1)}, bwd_params=(16, 32, 4, 1))
ML.PARAM_GRAD_SPLITS = 2
ML.FLOAT32_KERNELS = "ieee"
calls = []
for name in ("_kernel_forward", "_kernel_backward"):
    fn = getattr(ML, name)
    setattr(ML, name, lambda *a, fn=fn, name=name: calls.append(name) or fn(*a))

def run(units, A, gout, kernels, autocast):
    ML._KERNELS_ON_CPU = kernels
    params = [p for p in units.parameters() if p.requires_grad]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = ML.fused_metric_learner(units, A)
    return out, _grads(out, [A] + params, gout)

results = {}
for case, (bias, frozen, autocast) in {
    "fp32": (True, False, False), "fp32_no_bias_frozen": (False, True, False), "bf16": (True, False, True),
}.items():
    units = _learner(units=2, glus=2, bias=bias, d=32, hidden=40, seed=1)
    for p in units.parameters():
        p.requires_grad_(not frozen)
    A = torch.randn(5, 14, 32, requires_grad=True)
    gout = torch.randn(5, 14, 32)
    calls.clear()
    out, grads = run(units, A, gout, True, autocast)
    assert calls == ["_kernel_forward", "_kernel_backward"], calls
    ref, ref_grads = run(units, A, gout, False, autocast)
    units64 = copy.deepcopy(units).double()
    A64 = A.detach().double().requires_grad_()
    exact = _modules(units64, A64)
    exact_grads = _grads(exact, [A64] + [p for p in units64.parameters() if p.requires_grad], gout.double())
    assert out.dtype == ref.dtype and len(grads) == len(ref_grads) == len(exact_grads)
    results[case] = {
        "kernel": [_rel(out, exact)] + [_rel(g, e) for g, e in zip(grads, exact_grads)],
        "reference": [_rel(ref, exact)] + [_rel(g, e) for g, e in zip(ref_grads, exact_grads)],
    }
print(json.dumps(results))
'''


def _record_launches(module, names) -> list:
    """Replaces the named Triton kernels of ``module`` by wrappers that append their name to the returned list at each
    launch (for the interpreter scripts)."""
    launched = []
    for name in names:
        kernel = getattr(module, name)

        class Spy:
            def __getitem__(self, grid, kernel=kernel, name=name):
                launched.append(name)
                return kernel[grid]

        setattr(module, name, Spy())
    return launched


def _interpreted(script: str):
    """Runs ``script`` in a fresh Python with TRITON_INTERPRET=1 and returns the JSON of its last line."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600,
                          cwd=REPO / "tests")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not importable, so its kernels cannot be interpreted on CPU")
def test_triton_kernels_in_the_interpreter():
    results = _interpreted(_INTERPRETER_SCRIPT)
    for case in ("fp32", "fp32_no_bias_frozen"):
        # float32 (input_precision="ieee"): as exact as the modules themselves
        assert max(results[case]["kernel"]) <= 1e-5, results[case]
    kernel, reference = results["bf16"]["kernel"], results["bf16"]["reference"]
    for k, r in zip(kernel, reference):  # bf16 GEMMs: within autocast noise, as close as the reference path
        assert k <= max(2e-2, 2 * r), results["bf16"]
    assert len(kernel) == 1 + 1 + 2 * 2 * 6 + 2 * 2  # out, A, 4 GLUs x 6 parameters, 2 LayerNorms x 2


def _normed(A, norm, eps):
    """The model's separate LayerNorm of A (float32 weights: in A's dtype; else rounded to the weights' dtype)."""
    w, b = norm
    out = torch.nn.functional.layer_norm(A, (A.shape[-1],), w.to(A.dtype), b.to(A.dtype), eps)
    return out if w.dtype == torch.float32 else out.to(w.dtype)


@pytest.mark.parametrize("case", ["fp32", "bf16_autocast", "bf16_model"])
def test_input_layer_norm_in_the_operator_computes_the_separate_layer_norm(case):
    # The attention's LayerNorm of A runs inside the learner operator (norm=): the same output as the LayerNorm then
    # the learner, and the same gradients of A, the learner's parameters and the LayerNorm's weight and bias (the
    # reference path on CPU; the kernels: the interpreter test below and the CUDA test)
    units = _learner(units=2, glus=2, bias=True, d=16, hidden=20, seed=3)
    weights, norms, sizes, eps = _flat(units)
    torch.manual_seed(1)
    norm = (1 + 0.2 * torch.randn(16), 0.2 * torch.randn(16))
    A = 3 * torch.randn(2, 3, 16, 16) + 1
    if case == "bf16_model":
        weights, norms, norm = weights.bfloat16(), norms.bfloat16(), tuple(t.bfloat16() for t in norm)
    leaves = [A, weights, norms, *norm]
    gout = torch.randn(2, 3, 16, 16)

    def run(fused):
        x = [t.detach().clone().requires_grad_() for t in leaves]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "bf16_autocast"):
            if fused:
                out = ML.flat_metric_learner(x[0], x[1], x[2], *sizes, eps, norm=(x[3], x[4]))
            else:
                out = ML.flat_metric_learner(_normed(x[0], (x[3], x[4]), eps), x[1], x[2], *sizes, eps)
        return out, torch.autograd.grad(out, x, gout.to(out.dtype))

    (out, grads), (ref, ref_grads) = run(True), run(False)
    assert out.dtype == ref.dtype and torch.equal(out, ref)
    for g, r in zip(grads, ref_grads):
        assert g.dtype == r.dtype
        # float32 (also under autocast: the LayerNorm is float32 there): the same backward ops; a bf16 model: the
        # separate path rounds the gradient of the normalised A to bf16 on its way, the operator does not
        tol = 1e-6 if case != "bf16_model" else 2e-2
        assert _rel(g, r) <= tol, case
    with pytest.raises(ValueError, match=r"input LayerNorm's weight must be a floating-point vector of the rows' width "
                                         r"16, got \(15,\)"):
        ML.flat_metric_learner(A, weights, norms, *sizes, eps, norm=(norm[0][:15], norm[1]))


_NORM_INTERPRETER_SCRIPT = _INTERPRETER_PATCHES + r'''
from test_metric_learner_op import _flat, _learner, _grads, _record_launches, _rel
from pldr_hf.modeling import metric_learner as ML

# (as the learner's interpreter test: 70 rows = 4 blocks of 16 + 6 masked rows, two hidden chunks, two row splits)
ML.KERNEL_CONFIGS.update(fwd={16: (32, 4, 1)}, bwd_rows={16: (32, 4, 1)}, bwd_params=(16, 32, 4, 1))
ML.PARAM_GRAD_SPLITS = 2
ML.FLOAT32_KERNELS = "ieee"
launched = _record_launches(ML, ("_learner_fwd_kernel", "_learner_bwd_rows_kernel", "_learner_bwd_params_kernel"))
units = _learner(units=2, glus=2, bias=True, d=32, hidden=40, seed=1)
weights, norms, sizes, eps = _flat(units)
torch.manual_seed(2)
norm = [1 + 0.2 * torch.randn(32), 0.2 * torch.randn(32)]
A = 3 * torch.randn(5, 14, 32) + 1
gout = torch.randn(5, 14, 32)

def run(leaves, kernels, autocast):
    ML._KERNELS_ON_CPU = kernels
    x = [t.detach().clone().requires_grad_() for t in leaves]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = ML.flat_metric_learner(x[0], x[1], x[2], *sizes, eps, norm=(x[3], x[4]))
    return out, _grads(out, x, gout.to(out.dtype))

results = {}
for case, (to, autocast) in {"fp32": (torch.float32, False), "bf16_autocast": (torch.float32, True),
                             "bf16_model": (torch.bfloat16, False)}.items():
    leaves = [A] + [t.to(to) for t in (weights, norms, *norm)]
    launched.clear()
    out, grads = run(leaves, True, autocast)
    assert launched == ["_learner_fwd_kernel", "_learner_bwd_rows_kernel", "_learner_bwd_params_kernel"], launched
    ref, ref_grads = run(leaves, False, autocast)
    exact, exact_grads = run([t.double() for t in leaves], False, False)
    assert out.dtype == ref.dtype
    results[case] = {
        "kernel": [_rel(out, exact)] + [_rel(g, e) for g, e in zip(grads, exact_grads)],
        "reference": [_rel(ref, exact)] + [_rel(g, e) for g, e in zip(ref_grads, exact_grads)],
    }
print(json.dumps(results))
'''


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not importable, so its kernels cannot be interpreted on CPU")
def test_input_layer_norm_kernels_in_the_interpreter():
    # the forward kernel's LayerNorm prologue, the row kernel's LayerNorm backward and the parameter kernel's sum of
    # its partials: float32 as exact as the modules, bf16 (autocast, or a bf16 model rounding the normalised A)
    # within its noise, as close as the reference path, for A, the learner's parameters and the LayerNorm's
    results = _interpreted(_NORM_INTERPRETER_SCRIPT)
    assert max(results["fp32"]["kernel"]) <= 1e-5, results["fp32"]
    for case in ("bf16_autocast", "bf16_model"):
        kernel, reference = results[case]["kernel"], results[case]["reference"]
        assert len(kernel) == 1 + 5
        for k, r in zip(kernel, reference):
            assert k <= max(2e-2, 2 * r), (case, results[case])


# ---------------------------------------------------------------------------------------------------------------------
# CUDA: the compiled kernels against the reference path and the modules
# ---------------------------------------------------------------------------------------------------------------------
def _cuda_case(dtype, bias, rows_shape, frozen=False, seed=0, d=64, hidden=170, n_units=8):
    units = _learner(units=n_units, glus=2, bias=bias, d=d, hidden=hidden, seed=seed, device="cuda")
    for p in units.parameters():
        p.requires_grad_(not frozen)
    A = torch.randn(*rows_shape, d, device="cuda", requires_grad=True)
    gout = torch.randn(*rows_shape, d, device="cuda")
    params = [p for p in units.parameters() if p.requires_grad]

    def run(kernels):
        orig = ML._use_kernels
        ML._use_kernels = lambda *a: kernels and orig(*a)
        ML.FLOAT32_KERNELS = "ieee"  # float32: check the exact kernels (by default float32 runs cuBLAS)
        try:
            with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
                out = ML.fused_metric_learner(units, A)
            return out, _grads(out, [A] + params, gout)
        finally:
            ML._use_kernels = orig
            ML.FLOAT32_KERNELS = None

    units64 = copy.deepcopy(units).double()
    A64 = A.detach().double().requires_grad_()
    exact = _modules(units64, A64)
    exact_grads = _grads(exact, [A64] + [p for p in units64.parameters() if p.requires_grad], gout.double())
    assert dtype == torch.float32 or ML._use_kernels(A.reshape(-1, d), torch.zeros(1, device="cuda"),
                                                     ML.LearnerLayout(n_units, 2, hidden, d, bias), dtype)
    return run(True), run(False), (exact, exact_grads)


@needs_cuda_triton
@pytest.mark.parametrize("dtype, bias", [(torch.float32, True), (torch.bfloat16, True), (torch.bfloat16, False),
                                         (torch.float16, True)])
def test_cuda_kernels_match_the_reference(dtype, bias):
    # 3 x 14 x 64 = 2688 rows, and 2200 rows (not a multiple of any block); on 132 SMs both run row blocks of 32
    for shape in ((3, 14, 64), (2200,)):
        (out, grads), (ref, ref_grads), (exact, exact_grads) = _cuda_case(dtype, bias, shape)
        assert out.dtype == ref.dtype
        for k, r, e in zip((out, *grads), (ref, *ref_grads), (exact, *exact_grads)):
            if dtype == torch.float32:
                assert _rel(k, e) <= 1e-5 and _rel(r, e) <= 1e-4
            else:
                assert _rel(k, e) <= max(2e-2, 2 * _rel(r, e))


@needs_cuda_triton
@pytest.mark.parametrize("d, hidden, units, rows", [(16, 20, 2, 96), (16, 20, 2, 100), (32, 24, 3, 200),
                                                     (128, 170, 2, 1000)])
def test_cuda_kernels_match_the_reference_at_small_sizes(d, hidden, units, rows):
    # the sizes of the tiny test models (rows = batch x heads x d), a block not filled included; and the largest d
    (out, grads), (ref, ref_grads), (exact, exact_grads) = _cuda_case(torch.bfloat16, True, (rows,), d=d,
                                                                        hidden=hidden, n_units=units)
    for k, r, e in zip((out, *grads), (ref, *ref_grads), (exact, *exact_grads)):
        assert _rel(k, e) <= max(2e-2, 2 * _rel(r, e))


@needs_cuda_triton
def test_cuda_kernels_with_the_small_shared_memory_configurations(monkeypatch):
    # What a GPU that gives a program little shared memory runs (SMALL_SHARED_MEMORY_CONFIGS), checked on the GPU at
    # hand: the learner at both row blocks (64 at 14336 rows, 32 at 2688 on 132 SMs) and the power law, against the
    # reference path
    monkeypatch.setattr(ML, "_SHARED_MEMORY", {torch.cuda.current_device(): 64 * 1024})
    assert ML._kernel_configs(torch.device("cuda")) is ML.SMALL_SHARED_MEMORY_CONFIGS
    for shape in ((16, 14, 64), (3, 14, 64)):
        (out, grads), (ref, ref_grads), (exact, exact_grads) = _cuda_case(torch.bfloat16, True, shape)
        for k, r, e in zip((out, *grads), (ref, *ref_grads), (exact, *exact_grads)):
            assert _rel(k, e) <= max(2e-2, 2 * _rel(r, e))
    _cuda_power_law_case((4,))


@needs_cuda_triton
def test_cuda_frozen_learner_and_no_grad():
    (out, grads), (ref, ref_grads), (exact, exact_grads) = _cuda_case(torch.bfloat16, True, (2, 14, 64), frozen=True)
    assert len(grads) == 1 and _rel(grads[0], exact_grads[0]) <= max(2e-2, 2 * _rel(ref_grads[0], exact_grads[0]))
    units = _learner(units=8, glus=2, d=64, hidden=170, device="cuda")
    A = torch.randn(2, 14, 64, 64, device="cuda")
    with torch.no_grad():
        out = ML.fused_metric_learner(units, A)
        assert _rel(out, _modules(units, A)) <= 1e-5


@needs_cuda_triton
def test_cuda_compiled_with_inductor():
    from torch._inductor.utils import run_and_get_code

    units = _learner(units=8, glus=2, d=64, hidden=170, device="cuda")

    def fn(A):
        return ML.fused_metric_learner(units, A).sum(-1)

    compiled = torch.compile(fn, fullgraph=True)
    A = torch.randn(2, 14, 64, 64, device="cuda", requires_grad=True)
    params = list(units.parameters())
    with torch.autocast("cuda", dtype=torch.bfloat16):
        (out, codes), ref = run_and_get_code(compiled, A), fn(A)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    gout = torch.randn_like(out)
    (grads, bwd_codes) = run_and_get_code(_grads, out, [A] + params, gout)
    for g, r in zip(grads, _grads(ref, [A] + params, gout)):
        torch.testing.assert_close(g, r, atol=1e-4 * max(1.0, r.abs().max().item()), rtol=0)
    # inductor launches the learner's kernels from its own code: no opaque operator call (host dispatch) is left
    code = "\n".join(codes + bwd_codes)
    for kernel in ("_learner_fwd_kernel", "_learner_bwd_rows_kernel", "_learner_bwd_params_kernel"):
        assert kernel in code
    assert "pldr.metric_learner_fwd" not in code and "pldr.metric_learner_bwd" not in code


@needs_cuda_triton
@pytest.mark.parametrize("case", ["bf16_autocast", "bf16_model"])
def test_cuda_input_layer_norm_in_the_kernels(case):
    # the learner with the attention's LayerNorm of A inside its kernels, at the papers' sizes: eager and compiled,
    # as close to float64 as the reference path, and compiled, inductor launches the three kernels itself
    from torch._inductor.utils import run_and_get_code

    units = _learner(units=8, glus=2, d=64, hidden=170, seed=4, device="cuda")
    weights, norms, sizes, eps = _flat(units)
    torch.manual_seed(5)
    norm = [1 + 0.2 * torch.randn(64, device="cuda"), 0.2 * torch.randn(64, device="cuda")]
    A = 3 * torch.randn(4, 14, 64, 64, device="cuda") + 1
    gout = torch.randn_like(A)
    to = torch.bfloat16 if case == "bf16_model" else torch.float32
    leaves = [A] + [t.to(to) for t in (weights, norms, *norm)]
    autocast = case == "bf16_autocast"

    def learner(x):
        return ML.flat_metric_learner(x[0], x[1], x[2], *sizes, eps, norm=(x[3], x[4]))

    def run(fn, tensors, kernels, with_autocast):
        orig = ML._use_kernels
        ML._use_kernels = lambda *a: kernels and orig(*a)
        try:
            x = [t.detach().clone().requires_grad_() for t in tensors]
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=with_autocast):
                out = fn(x)
            return out, _grads(out, x, gout.to(out.dtype))
        finally:
            ML._use_kernels = orig

    exact, exact_grads = run(learner, [t.double() for t in leaves], False, False)
    ref, ref_grads = run(learner, leaves, False, autocast)
    (out, grads), codes = run_and_get_code(lambda: run(torch.compile(learner, fullgraph=True), leaves, True, autocast))
    for got in (run(learner, leaves, True, autocast), (out, grads)):
        for k, r, e in zip((got[0], *got[1]), (ref, *ref_grads), (exact, *exact_grads)):
            assert _rel(k, e) <= max(2e-2, 2 * _rel(r, e)), case
    code = "\n".join(codes)
    for kernel in ("_learner_fwd_kernel", "_learner_bwd_rows_kernel", "_learner_bwd_params_kernel"):
        assert kernel in code


# ---------------------------------------------------------------------------------------------------------------------
# The power law step as one operator (pldr::power_law_fwd / pldr::power_law_bwd)
# ---------------------------------------------------------------------------------------------------------------------
def _power_law_inputs(batch, H=2, d=16, device="cpu", seed=0):
    torch.manual_seed(seed)
    A = torch.randn(*batch, H, d, d, device=device)
    params = 0.5 * torch.randn(5, H, d, d, device=device)  # W, b, p, a, ba stacked
    params[2] = params[2].abs() + 0.3  # exponents
    return [A, params]


def _reference_outputs(A, params):
    """(A_LM, G_LM) of the plain PyTorch power law."""
    return ML.power_law_reference(A, *params)[1::2]


def test_power_law_forward_computes_16_bit_and_mixed_inputs_in_float32():
    # Without gradients a 16-bit model's power law takes its tensors as they are (no casts before it): the result must
    # be that of their float32 values, also for mixed dtypes; float64 stays float64.
    inputs = _power_law_inputs((2,))
    for dtypes in ([torch.bfloat16] * 2, [torch.float16] * 2, [torch.float32, torch.bfloat16],
                   [torch.float64, torch.float32]):
        given = [t.to(dt) for t, dt in zip(inputs, dtypes)]
        outs = ML.power_law_forward(*given)
        want = _reference_outputs(*[t.float() for t in given])
        for o, w in zip(outs, want):
            assert o.dtype == torch.float32 and torch.equal(o, w), dtypes
    wide = [t.double() for t in inputs]
    for o, w in zip(ML.power_law_forward(*wide), _reference_outputs(*wide)):
        assert o.dtype == torch.float64 and torch.equal(o, w)


def _power_law_grads(fn, inputs, g_A_LM, g_G):
    """Outputs and input gradients of fn for output gradients g_A_LM and g_G (either None: that output unused)."""
    x = [t.detach().clone().requires_grad_() for t in inputs]
    outs = fn(*x)
    used = [(o, g) for o, g in zip(outs, (g_A_LM, g_G)) if g is not None]
    grads = torch.autograd.grad([o for o, _ in used], x, [g.to(o.dtype) for o, g in used], allow_unused=True)
    return outs, grads


# ---------------------------------------------------------------------------------------------------------------------
# The FFN's SwiGLU on the joint W1|W2 output (joint_swiglu: pldr::swiglu_fwd / pldr::swiglu_bwd)
# ---------------------------------------------------------------------------------------------------------------------
def _swiglu_exact(h12, g):
    """silu(h1) * h2 and the gradient of h12, in float64."""
    h = h12.detach().double().requires_grad_()
    h1, h2 = h.chunk(2, dim=-1)
    out = torch.nn.functional.silu(h1) * h2
    return out, torch.autograd.grad(out, h, g.double())[0]


def test_swiglu_opcheck_and_reference():
    h12 = torch.randn(3, 5, 24, requires_grad=True)
    g = torch.randn(3, 5, 12)
    torch.library.opcheck(torch.ops.pldr.swiglu_fwd.default, (h12,))
    torch.library.opcheck(torch.ops.pldr.swiglu_bwd.default, (g, h12.detach()))
    out = ML.joint_swiglu(h12)
    exact, exact_grad = _swiglu_exact(h12, g)
    assert _rel(out, exact) <= 1e-6
    assert _rel(torch.autograd.grad(out, h12, g)[0], exact_grad) <= 1e-6
    compiled = torch.compile(lambda h: torch.ops.pldr.swiglu_fwd(h), fullgraph=True)
    out = compiled(h12)
    assert _rel(out, exact) <= 1e-6 and _rel(torch.autograd.grad(out, h12, g)[0], exact_grad) <= 1e-6


def test_swiglu_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"swiglu: expected h12 \[\.\.\., 2 \* hidden\]"):
        ML.joint_swiglu(torch.randn(4, 7))
    with pytest.raises(ValueError, match=r"swiglu: expected the output gradient \[\.\.\., hidden\]"):
        ML.swiglu_backward(torch.randn(4, 5), torch.randn(4, 8))


_SWIGLU_INTERPRETER_SCRIPT = _INTERPRETER_PATCHES + r'''
import torch.nn.functional as F
from test_metric_learner_op import _record_launches, _rel, _swiglu_exact
from pldr_hf.modeling import metric_learner as ML
from pldr_hf.modeling import modeling_pldr as M

# Blocks of 4 rows x 16 columns: 10 rows are 2 full row blocks and one of 2 (masked); hidden 40 is 2 full column
# blocks and one of 8 (masked).
ML.SWIGLU_CONFIG = (4, 16, 4)
launched = _record_launches(ML, ("_swiglu_fwd_kernel", "_swiglu_bwd_kernel"))

def run(h12, g, kernels):
    ML._KERNELS_ON_CPU = kernels
    launched.clear()
    h = h12.detach().requires_grad_()
    out = ML.joint_swiglu(h)
    grad = torch.autograd.grad(out, h, g)[0]
    calls = list(launched)
    with torch.no_grad():  # (no gradients: the forward kernel alone)
        assert torch.equal(ML.joint_swiglu(h12), out.detach())
    return out, grad, calls

results = {}
for dtype in (torch.float32, torch.bfloat16):
    h12 = (2 * torch.randn(2, 5, 80)).to(dtype)
    g = torch.randn(2, 5, 40).to(dtype)
    exact, exact_grad = _swiglu_exact(h12, g)
    row = {}
    for kernels in (True, False):
        out, grad, calls = run(h12, g, kernels)
        assert out.dtype == grad.dtype == dtype and grad.shape == h12.shape
        assert calls == (["_swiglu_fwd_kernel", "_swiglu_bwd_kernel"] if kernels else []), calls
        row["kernel" if kernels else "reference"] = [_rel(out, exact), _rel(grad, exact_grad)]
    results[str(dtype)] = row

# The FFN with its hidden width padded (42 -> 64) on CPU: the kernels take the joint W1|W2 output.
M.PldrGLU.PAD_ON_CPU = True
ML._KERNELS_ON_CPU = True
torch.manual_seed(0)
ffn = M.PldrGLU(16, 42, 16, True, "silu", align_hidden=True)
x = torch.randn(2, M.PldrGLU.MIN_PADDED_ROWS // 2, 16, requires_grad=True)
launched.clear()
out = ffn(x)
grads = torch.autograd.grad(out.square().sum(), [x, *ffn.parameters()])
ref = ffn.gluw3(F.silu(ffn.gluw1(x)) * ffn.gluw2(x))
ref_grads = torch.autograd.grad(ref.square().sum(), [x, *ffn.parameters()])
results["ffn"] = {"launched": launched, "errors": [_rel(out, ref)] + [_rel(a, b) for a, b in zip(grads, ref_grads)]}
print(json.dumps(results))
'''


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not importable, so its kernels cannot be interpreted on CPU")
def test_swiglu_kernels_in_the_interpreter():
    # one forward and one backward kernel, against float64: float32 as close as the reference (rounding only),
    # bfloat16 within one rounding of the output (the reference rounds twice: silu(h1), then the product)
    results = _interpreted(_SWIGLU_INTERPRETER_SCRIPT)
    for dtype, tol in (("torch.float32", 1e-6), ("torch.bfloat16", 8e-3)):
        row = results[dtype]
        for k, r in zip(row["kernel"], row["reference"]):
            assert k <= max(tol, r), (dtype, row)
    ffn = results["ffn"]
    assert ffn["launched"] == ["_swiglu_fwd_kernel", "_swiglu_bwd_kernel"]
    assert len(ffn["errors"]) == 8 and max(ffn["errors"]) <= 1e-5, ffn


@needs_cuda_triton
def test_cuda_swiglu_kernels_in_the_ffn():
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(0)
    ffn = M.PldrGLU(256, 597, 256, True, "silu", align_hidden=True).cuda()  # 597 -> 640
    x = torch.randn(4, 512, 256, device="cuda", requires_grad=True)
    params = [x, *ffn.parameters()]

    def grads(run, autocast):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            out = run(x)
        return [out, *torch.autograd.grad(out.float().square().sum(), params)]

    def reference(z):
        return ffn.gluw3(torch.nn.functional.silu(ffn.gluw1(z)) * ffn.gluw2(z))

    ffn64 = copy.deepcopy(ffn).double()
    x64 = x.detach().double().requires_grad_()
    out64 = ffn64.gluw3(torch.nn.functional.silu(ffn64.gluw1(x64)) * ffn64.gluw2(x64))
    exact = [out64, *torch.autograd.grad(out64.square().sum(), [x64, *ffn64.parameters()])]
    compiled = torch.compile(ffn)
    for autocast in (False, True):
        ref = grads(reference, autocast)
        for run in (ffn, compiled):
            got = grads(run, autocast)
            for k, r, e in zip(got, ref, exact):
                assert k.dtype == r.dtype and _rel(k, e) <= max(1e-5, 2 * _rel(r, e))
    # under torch.compile inductor launches the two kernels from its own code
    torch._dynamo.reset()
    _, codes = run_and_get_code(lambda: grads(torch.compile(ffn), True))
    code = "\n".join(codes)
    assert "_swiglu_fwd_kernel" in code and "_swiglu_bwd_kernel" in code


def test_power_law_opcheck():
    inputs = _power_law_inputs((3,))
    torch.library.opcheck(torch.ops.pldr.power_law_fwd.default, [t.requires_grad_() for t in inputs])
    A, params = _power_law_inputs((3,))
    g = torch.randn_like(A)
    for g_A_LM, g_G, param_grads in ((g, g, True), (None, g, True), (g, None, False)):
        torch.library.opcheck(torch.ops.pldr.power_law_bwd.default, (g_A_LM, g_G, A, params, param_grads))


def test_power_law_operator_under_compile_equals_eager():
    inputs = _power_law_inputs((2,))
    g_A_LM, g_G = torch.randn_like(inputs[0]), torch.randn_like(inputs[0])

    def via_op(*x):
        return torch.ops.pldr.power_law_fwd(*x)

    outs, grads = _power_law_grads(torch.compile(via_op, fullgraph=True), inputs, g_A_LM, g_G)
    ref, ref_grads = _power_law_grads(_reference_outputs, inputs, g_A_LM, g_G)
    for o, r in zip(outs, ref):
        torch.testing.assert_close(o, r, rtol=1e-6, atol=1e-7)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


def test_power_law_rejects_mismatched_shapes():
    A, params = _power_law_inputs((2,))
    for bad in ((A[..., :8], params), (A, params[:4]), (A, list(params))):
        with pytest.raises(ValueError, match=r"power law: expected A \[\.\.\., H, d, d\] and its parameters W, b, p, a, "
                                             r"ba stacked \[5, H, d, d\]"):
            ML.power_law(*bad)


_POWER_LAW_INTERPRETER_SCRIPT = r'''
import json, os
assert os.environ.get("TRITON_INTERPRET") == "1"
import torch
from test_metric_learner_op import _power_law_inputs, _power_law_grads, _record_launches, _reference_outputs, _rel
from pldr_hf.modeling import metric_learner as ML

launched = _record_launches(ML, ("_power_law_fwd_kernel", "_power_law_bwd_kernel"))
results = {}
# (d = 32 with column blocks of 16: the backward walks its tiles in two blocks)
for batch, d, config in (((3,), 16, (64, 8)), ((2, 2), 16, (64, 8)), ((), 16, (64, 8)), ((2,), 32, (16, 4))):
    ML.KERNEL_CONFIGS["power_law_bwd"] = config
    inputs = _power_law_inputs(batch, d=d)
    g = torch.randn_like(inputs[0])
    exact_inputs = [t.double() for t in inputs]
    for case, (g_A_LM, g_G) in {"both": (g, 2 * g), "G only": (None, g), "A_LM only": (g, None)}.items():
        exact = _power_law_grads(_reference_outputs, exact_inputs, g_A_LM, g_G)
        row = {}
        for kernels in (True, False):
            ML._KERNELS_ON_CPU = kernels
            launched.clear()
            outs, grads = _power_law_grads(ML.power_law, inputs, g_A_LM, g_G)
            assert launched == (["_power_law_fwd_kernel", "_power_law_bwd_kernel"] if kernels else []), launched
            errs = [_rel(o, e) for o, e in zip(outs, exact[0])]
            for k, (got, want) in enumerate(zip(grads, exact[1])):
                assert (got is None) == (want is None), (case, k)
                errs.append(None if want is None else _rel(got, want))
            row["kernel" if kernels else "reference"] = errs
        results[f"{batch} d={d} {case}"] = row
# Without gradients the forward kernel takes 16-bit A and parameters and widens them as it reads them: the float32
# values' results, bit for bit, with no cast before it.
ML._KERNELS_ON_CPU = True
inputs = _power_law_inputs((2,), d=16)
for dtype in (torch.bfloat16, torch.float16):
    narrow = [t.to(dtype) for t in inputs]
    launched.clear()
    outs = ML.power_law_forward(*narrow)
    assert launched == ["_power_law_fwd_kernel"], launched
    wide = ML.power_law_forward(*[t.float() for t in narrow])
    results[f"widened {dtype}"] = [o.dtype == torch.float32 and torch.equal(o, w) for o, w in zip(outs, wide)]
print(json.dumps(results))
'''


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not importable, so its kernels cannot be interpreted on CPU")
def test_power_law_kernels_in_the_interpreter():
    # float32 kernels (one forward, one backward launch) against the float64 power law, as close as the float32
    # reference path, for losses on both outputs, on G_LM alone and on A_LM alone (the rows of p, a, ba: zero)
    results = _interpreted(_POWER_LAW_INTERPRETER_SCRIPT)
    assert results.pop("widened torch.bfloat16") == [True, True]
    assert results.pop("widened torch.float16") == [True, True]
    assert len(results) == 12
    for case, row in results.items():
        assert len(row["kernel"]) == 2 + 2
        for k, r in zip(row["kernel"], row["reference"]):
            assert (k is None) == (r is None), case
            if k is not None:
                assert k <= max(2e-6, 2 * r), (case, row)


def _cuda_power_law_case(batch, device="cuda"):
    """The power law's kernels (float32) against the float64 reference, as close as the float32 reference path, at
    14 heads and d = 64; returns the inputs, the output gradients and the float64 results."""
    inputs = _power_law_inputs(batch, H=14, d=64, device=device)
    g_A_LM, g_G = torch.randn_like(inputs[0]), torch.randn_like(inputs[0])
    exact = _power_law_grads(_reference_outputs, [t.double() for t in inputs], g_A_LM, g_G)
    outs, grads = _power_law_grads(ML.power_law, inputs, g_A_LM, g_G)
    ref, ref_grads = _power_law_grads(_reference_outputs, inputs, g_A_LM, g_G)
    for k, r, e in zip((*outs, *grads), (*ref, *ref_grads), (*exact[0], *exact[1])):
        assert _rel(k, e) <= max(1e-5, 2 * _rel(r, e))
    return inputs, g_A_LM, g_G, exact


@needs_cuda_triton
def test_cuda_power_law_kernels_match_the_reference():
    from torch._inductor.utils import run_and_get_code

    for batch in ((4,), (16,), ()):
        inputs, g_A_LM, g_G, exact = _cuda_power_law_case(batch)
    # under torch.compile inductor launches the two kernels from its own code
    compiled = torch.compile(ML.power_law, fullgraph=True)
    (outs, codes) = run_and_get_code(lambda *x: _power_law_grads(compiled, x, g_A_LM, g_G), *inputs)
    code = "\n".join(codes)
    assert "_power_law_fwd_kernel" in code and "_power_law_bwd_kernel" in code
    for k, e in zip((*outs[0], *outs[1]), (*exact[0], *exact[1])):
        assert _rel(k, e) <= 1e-5


# ---------------------------------------------------------------------------------------------------------------------
# Second derivatives (a gradient penalty, a Hessian-vector product: backward with create_graph=True)
# ---------------------------------------------------------------------------------------------------------------------
# The kernels' gradients would enter the graph of a backward with create_graph=True as constants, silently dropping
# terms of the second derivative; such a backward takes the PyTorch ops instead (the forward stays on the kernels).
def _second_derivatives(fn, inputs):
    """Gradients, with respect to the inputs x and the output weights w, of the penalty ||dL/dx||^2 for
    L = <fn(x), w> + ||x||^2 / 2: second derivatives as a gradient penalty takes them. w requires gradients, as a
    network's later layers would make it, and the second term is a path around fn, as a residual connection is: the
    first derivatives are in the graph even where fn's own terms would be missing from it."""
    x = [t.detach().clone().requires_grad_() for t in inputs]
    outs = fn(*x)
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.manual_seed(1)
    # (the same numbers in any dtype and on any device)
    ws = [torch.randn(o.shape).to(o.device, o.dtype).requires_grad_() for o in outs]
    loss = sum((o * w).sum() for o, w in zip(outs, ws)) + sum(t.square().sum() / 2 for t in x)
    first = torch.autograd.grad(loss, x, create_graph=True)
    penalty = sum(f.square().sum() for f in first)
    second = torch.autograd.grad(penalty, x + ws, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(second, x + ws)]  # (None: no dependence)


@pytest.mark.parametrize("bias", [True, False])
def test_second_derivatives_of_the_learner_on_the_reference_path(bias):
    units = _learner(units=2, glus=2, bias=bias, d=8, hidden=6, seed=2).double()
    stacked, eps = _stacked(units, requires_grad=True)
    A = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    inputs = [A] + [t for t in stacked if t is not None]

    def learner(A, *params):
        it = iter(params)
        return ML.stacked_metric_learner(A, *(None if t is None else next(it) for t in stacked), eps)

    assert torch.autograd.gradgradcheck(learner, inputs)


def test_second_derivatives_of_the_power_law_and_the_gram_on_the_reference_path():
    inputs = [t.double().requires_grad_() for t in _power_law_inputs((2,), H=2, d=4)]
    assert torch.autograd.gradgradcheck(ML.power_law, inputs)
    q = torch.randn(2, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1.0, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.float64)[:, None, :, None]
    assert torch.autograd.gradgradcheck(lambda q: M._GramFunction.apply(q, mask, torch.float64), [q])


_SECOND_DERIVATIVE_INTERPRETER_SCRIPT = _INTERPRETER_PATCHES + r'''
from test_metric_learner_op import (_learner, _power_law_inputs, _record_launches, _rel, _second_derivatives,
                                    _stacked)
from pldr_hf.modeling import metric_learner as ML

ML.KERNEL_CONFIGS.update(fwd={16: (32, 4, 1)}, bwd_rows={16: (32, 4, 1)}, bwd_params=(16, 32, 4, 1))
ML.FLOAT32_KERNELS = "ieee"
ML.SWIGLU_CONFIG = (4, 16, 4)
launched = _record_launches(ML, ("_learner_fwd_kernel", "_learner_bwd_rows_kernel", "_learner_bwd_params_kernel",
                                 "_power_law_fwd_kernel", "_power_law_bwd_kernel", "_swiglu_fwd_kernel",
                                 "_swiglu_bwd_kernel"))
units = _learner(units=2, glus=2, bias=True, d=16, hidden=20, seed=1)
stacked, eps = _stacked(units)
torch.manual_seed(0)
cases = {
    "learner": (lambda A, *p: ML.stacked_metric_learner(A, *p, eps), [torch.randn(3, 5, 16)] + stacked),
    "power law": (ML.power_law, _power_law_inputs((2,), d=16)),
    "swiglu": (ML.joint_swiglu, [2 * torch.randn(3, 5, 40)]),
}
results = {}
for name, (fn, inputs) in cases.items():
    row = {}
    exact = _second_derivatives(fn, [t.double() for t in inputs])
    for kernels in (True, False):
        ML._KERNELS_ON_CPU = kernels
        launched.clear()
        got = _second_derivatives(fn, inputs)
        row["launched" if kernels else "launched_reference"] = list(launched)
        row["kernel" if kernels else "reference"] = [_rel(g, e) for g, e in zip(got, exact)]
    row["exact_max"] = [e.abs().max().item() for e in exact]
    results[name] = row
print(json.dumps(results))
'''


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not importable, so its kernels cannot be interpreted on CPU")
def test_second_derivatives_with_the_kernels_in_the_interpreter():
    # the forward on the kernels, the backward that builds a graph on the PyTorch ops: every second derivative (of the
    # inputs, every parameter and the output weights) as close to float64 as the reference path's
    results = _interpreted(_SECOND_DERIVATIVE_INTERPRETER_SCRIPT)
    forward = {"learner": "_learner_fwd_kernel", "power law": "_power_law_fwd_kernel", "swiglu": "_swiglu_fwd_kernel"}
    for name, row in results.items():
        assert row["launched"] == [forward[name]], (name, row)
        assert row["launched_reference"] == [], (name, row)
        assert len(row["kernel"]) == {"learner": 8, "power law": 4, "swiglu": 2}[name]
        for k, r, e in zip(row["kernel"], row["reference"], row["exact_max"]):
            assert e > 0 and k <= max(1e-5, 2 * r), (name, row)  # (no vanishing second derivative: a real check)


@needs_cuda_triton
def test_cuda_second_derivatives(monkeypatch):
    # the learner's, the power law's and the SwiGLU's forward kernels (float32, exact dot products) and q^T q of bf16 q
    # (a widening GEMM forward, bmm with out_dtype, which has no derivative): second derivatives against float64
    monkeypatch.setattr(ML, "FLOAT32_KERNELS", "ieee")
    units = _learner(units=2, glus=2, bias=True, d=64, hidden=170, seed=1)
    stacked, eps = _stacked(units)
    torch.manual_seed(0)
    q = torch.randn(2, 3, 40, 64).bfloat16()
    cases = {
        "learner": (lambda A, *p: ML.stacked_metric_learner(A, *p, eps), [torch.randn(2, 4, 64, 64)] + stacked, 2e-5),
        "power law": (ML.power_law, _power_law_inputs((2,), H=4, d=64), 2e-5),
        "swiglu": (ML.joint_swiglu, [2 * torch.randn(3, 50, 256)], 2e-5),
        # (the first derivative of bf16 q is bf16: one rounding)
        "gram": (lambda q: M._GramFunction.apply(q, None, torch.promote_types(q.dtype, torch.float32)), [q], 1e-2),
    }
    for name, (fn, inputs, tol) in cases.items():
        exact = _second_derivatives(fn, [t.double() for t in inputs])
        got = _second_derivatives(fn, [t.cuda() for t in inputs])
        assert len(got) == len(exact) and all(g.is_cuda for g in got)
        errors = [_rel(g.cpu(), e) for g, e in zip(got, exact)]
        assert max(errors) <= tol, (name, errors)


# ----------------------------------------------------------------------------------------------------------------------
# The rotary embedding on the joint q|k|v projection (pldr::rotary_qkv_fwd / _bwd)
# ----------------------------------------------------------------------------------------------------------------------
def _rotary_case(B=2, S=5, H=3, d=8, table_batch=2, interleaved=True, dtype=torch.float32, seed=0, device="cpu"):
    torch.manual_seed(seed)
    qkv = torch.randn(B, S, 3 * H * d).to(device=device, dtype=dtype).requires_grad_()
    pos = (torch.arange(S)[None].expand(table_batch, S) + 3 * torch.arange(table_batch)[:, None]).to(device)
    cos, sin = M.rotary_tables(pos, d, 10000.0, interleaved)
    return qkv, cos, sin


def _rotary_as_the_attention_did(qkv, cos, sin, H, interleaved):
    """q, k, v [B, H, S, d] from the joint projection as PldrAttention computes them without the operator."""
    B, S, _ = qkv.shape
    d = qkv.shape[-1] // (3 * H)
    qk, v = qkv[..., : 2 * H * d].view(B, S, 2 * H, d), qkv[..., 2 * H * d:].view(B, S, H, d)
    q, k = M.apply_rotary_tables(qk, cos, sin, interleaved).transpose(1, 2).split(H, dim=1)
    return q, k, v.transpose(1, 2)


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("table_batch", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_qkv_equals_the_attentions_rotation(interleaved, table_batch, dtype):
    # outputs and the joint gradient are the very numbers of the separate ops (same float32 products, same roundings),
    # with one table for every row (table_batch 1) or one per row; the outputs come contiguous
    qkv, cos, sin = _rotary_case(table_batch=table_batch, interleaved=interleaved, dtype=dtype)
    out = ML.rotary_qkv(qkv, cos, sin, 3, interleaved)
    ref = _rotary_as_the_attention_did(qkv, cos, sin, 3, interleaved)
    grads = [torch.randn_like(t) for t in ref]
    for o, r in zip(out, ref):
        assert o.shape == r.shape == (2, 3, 5, 8) and o.dtype == dtype and o.is_contiguous()
        assert torch.equal(o, r)
    g = torch.autograd.grad(out, qkv, grads)[0]
    assert torch.equal(g, torch.autograd.grad(ref, qkv, grads)[0])
    assert torch.equal(ML.rotary_qkv_backward(*grads, cos, sin, interleaved), g)


def test_rotary_qkv_opcheck_compile_and_bad_shapes():
    qkv, cos, sin = _rotary_case()
    torch.library.opcheck(torch.ops.pldr.rotary_qkv_fwd.default, (qkv, cos, sin, 3, True))
    grads = [torch.randn(2, 3, 5, 8) for _ in range(3)]
    torch.library.opcheck(torch.ops.pldr.rotary_qkv_bwd.default, (*grads, cos, sin, True))
    compiled = torch.compile(lambda x: torch.ops.pldr.rotary_qkv_fwd(x, cos, sin, 3, True), fullgraph=True)
    out = compiled(qkv)
    ref = _rotary_as_the_attention_did(qkv, cos, sin, 3, True)
    assert all(torch.equal(o, r) for o, r in zip(out, ref))
    assert torch.equal(torch.autograd.grad(out, qkv, grads)[0], torch.autograd.grad(ref, qkv, grads)[0])
    # a second derivative through the operator's eager autograd node (its backward takes the PyTorch ops then)
    x = qkv.detach().requires_grad_()
    (gx,) = torch.autograd.grad(ML.RotaryQKVFunction.apply(x, cos, sin, 3, True)[0].square().sum(), x,
                                create_graph=True)
    (gx_ref,) = torch.autograd.grad(_rotary_as_the_attention_did(x, cos, sin, 3, True)[0].square().sum(), x,
                                    create_graph=True)
    assert torch.allclose(torch.autograd.grad(gx.sum(), x)[0], torch.autograd.grad(gx_ref.sum(), x)[0])
    with pytest.raises(ValueError, match=r"rotary_qkv: expected the joint projection \[batch, seq, 3 \* 3 heads"):
        ML.rotary_qkv(torch.randn(2, 5, 70), cos, sin, 3, True)
    with pytest.raises(ValueError, match=r"rotary_qkv: expected cos \[2 or 1, 5, 1, 8\]"):
        ML.rotary_qkv(qkv, cos[:, :4], sin, 3, True)
    with pytest.raises(ValueError, match=r"rotary_qkv: expected dq, dk, dv of one shape"):
        ML.rotary_qkv_backward(grads[0], grads[1][:, :2], grads[2], cos, sin, True)


def test_attention_training_takes_the_rotary_operator(monkeypatch):
    # with gradients and the joint projection (on CPU when asked to), the attention's q, k, v come from the operator,
    # and the layer's outputs and every gradient are those of the separate ops
    monkeypatch.setattr(M.PldrAttention, "JOINT_ON_CPU", True)
    monkeypatch.setattr(M.PldrAttention, "MIN_JOINT_ROWS", 1)
    calls = []
    real = ML.rotary_qkv_forward
    monkeypatch.setattr(ML, "rotary_qkv_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = PldrConfig(vocab_size=64, hidden_size=32, num_attention_heads=4, head_dim=8, num_hidden_layers=2,
                     intermediate_size=40, A_dff=12, num_reslayerA=2, num_denseA=2)
    torch.manual_seed(0)
    model = M.PldrForCausalLM(cfg)
    ids = torch.randint(4, 64, (2, 9))
    loss = model(input_ids=ids, labels=ids).loss
    grads = torch.autograd.grad(loss, list(model.parameters()))
    assert len(calls) == 2  # one per layer
    # the same joint projection with the rotation as separate ops
    monkeypatch.setattr(M, "rotary_qkv", lambda qkv, cos, sin, H, inter: (
        lambda q, k, v: (q.contiguous(), k, v))(*_rotary_as_the_attention_did(qkv, cos, sin, H, inter)))
    calls.clear()
    ref = model(input_ids=ids, labels=ids).loss
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    assert not calls
    assert torch.equal(loss, ref)
    for (name, _), g, r in zip(model.named_parameters(), grads, ref_grads):
        assert torch.allclose(g, r, rtol=1e-6, atol=1e-9), name


_ROTARY_INTERPRETER_SCRIPT = _INTERPRETER_PATCHES + r'''
from test_metric_learner_op import _record_launches, _rotary_as_the_attention_did, _rotary_case
from pldr_hf.modeling import metric_learner as ML

# blocks of 4 positions: 6 positions are one full block and one of 2 (masked)
ML.ROTARY_BLOCK_S = 4
launched = _record_launches(ML, ("_rotary_qkv_fwd_kernel", "_rotary_qkv_bwd_kernel"))
results = []
for dtype in (torch.float32, torch.bfloat16):
    for interleaved in (True, False):
        for table_batch in (1, 2, "expanded"):  # ("expanded": one row broadcast over the batch, as the model passes it)
            qkv, cos, sin = _rotary_case(S=6, table_batch=2 if table_batch == 2 else 1, interleaved=interleaved,
                                         dtype=dtype)
            if table_batch == "expanded":
                cos, sin = cos.expand(2, -1, -1, -1), sin.expand(2, -1, -1, -1)
            ref = _rotary_as_the_attention_did(qkv, cos, sin, 3, interleaved)
            grads = [torch.randn_like(t) for t in ref]
            grads[1] = grads[1].transpose(2, 3).contiguous().transpose(2, 3)  # (a strided gradient, as SDPA may give)
            ref_grad = torch.autograd.grad(ref, qkv, grads)[0]
            ML._KERNELS_ON_CPU = True
            launched.clear()
            out = ML.rotary_qkv(qkv, cos, sin, 3, interleaved)
            grad = torch.autograd.grad(out, qkv, grads)[0]
            ML._KERNELS_ON_CPU = False
            err = max([(o.double() - r.double()).abs().max().item() for o, r in zip(out, ref)]
                      + [(grad.double() - ref_grad.double()).abs().max().item()])
            results.append([str(dtype), interleaved, table_batch, list(launched), err,
                            all(o.is_contiguous() for o in out)])
# with the metric sum (rotary_qkv_metric_sum): 13 positions are 3 full blocks and one of 1; row 2 has 5 pads
metric_sum = []
for dtype in (torch.float32, torch.bfloat16):
    for interleaved in (True, False):
        for masked in (False, True):
            qkv, cos, sin = _rotary_case(S=13, H=2, d=16, table_batch=2, interleaved=interleaved, dtype=dtype)
            mask = (torch.arange(13)[None] >= torch.tensor([[0], [5]])).float() if masked else None
            ref = ML.rotary_qkv_metric_sum(qkv, cos, sin, 2, interleaved, mask)  # (the PyTorch path)
            grads = [torch.randn_like(t) for t in ref]
            ref_grad = torch.autograd.grad(ref, qkv, grads)[0]
            ML._KERNELS_ON_CPU = True
            launched.clear()
            out = ML.rotary_qkv_metric_sum(qkv, cos, sin, 2, interleaved, mask)
            grad = torch.autograd.grad(out, qkv, grads)[0]
            ML._KERNELS_ON_CPU = False
            errs = [(o.double() - r.double()).abs().max().item() / r.double().abs().max().item()
                    for o, r in zip(out + (grad,), ref + (ref_grad,))]
            metric_sum.append([str(dtype), interleaved, masked, list(launched), errs])
print(json.dumps({"rotary": results, "metric_sum": metric_sum}))
'''


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not importable, so its kernels cannot be interpreted on CPU")
def test_rotary_qkv_kernels_in_the_interpreter():
    # the kernels compute what the separate ops compute: float32 products, one rounding (the interpreter's numpy may
    # fuse nothing, so equal up to float32 rounding of a sum of two products)
    results = _interpreted(_ROTARY_INTERPRETER_SCRIPT)
    assert [row[2] for row in results["rotary"]] == [1, 2, "expanded"] * 4
    for dtype, interleaved, table_batch, launched, err, contiguous in results["rotary"]:
        assert launched == ["_rotary_qkv_fwd_kernel", "_rotary_qkv_bwd_kernel"], (dtype, interleaved, launched)
        assert contiguous
        assert err <= (1e-6 if dtype == "torch.float32" else 2 ** -7 * 8), (dtype, interleaved, table_batch, err)
    # with the metric sum: q, k, v and A are the PyTorch path's; the gradient within float32 rounding (float32) or one
    # bf16 rounding of the largest value (bf16: the kernel rounds the d x d factor of dq to bf16, as the separate q^T q
    # backward does, and sums dq's two parts in float32)
    for dtype, interleaved, masked, launched, errs in results["metric_sum"]:
        assert launched == ["_rotary_qkv_fwd_kernel", "_rotary_qkv_bwd_kernel"], (dtype, interleaved, launched)
        assert errs[:4] == [0.0, 0.0, 0.0, 0.0], (dtype, interleaved, masked, errs)
        assert errs[4] <= (1e-6 if dtype == "torch.float32" else 2 ** -7), (dtype, interleaved, masked, errs)


@needs_cuda_triton
@pytest.mark.parametrize("interleaved", [True, False])
def test_cuda_rotary_qkv_kernels_match_the_separate_ops(interleaved):
    # bf16 at a training shape's layout (200 positions of 14 heads of 64), eager and compiled: outputs and gradient
    # within one bf16 rounding of the separate ops (the kernel may fuse a product into an FMA)
    H = 14
    qkv, cos, sin = _rotary_case(2, 200, H, 64, 1, interleaved, torch.bfloat16, device="cuda")
    ref = _rotary_as_the_attention_did(qkv, cos, sin, H, interleaved)
    grads = [torch.randn_like(t) for t in ref]
    ref_grad = torch.autograd.grad(ref, qkv, grads)[0]
    for fn in (ML.rotary_qkv, torch.compile(ML.rotary_qkv, fullgraph=True)):
        out = fn(qkv, cos, sin, H, interleaved)
        grad = torch.autograd.grad(out, qkv, grads)[0]
        for o, r in zip(out, ref):
            assert o.is_contiguous() and _rel(o, r) <= 2 ** -7
        assert _rel(grad, ref_grad) <= 2 ** -7


# ----------------------------------------------------------------------------------------------------------------------
# The same operator with the metric sum of the rotated queries (pldr::rotary_qkv_metric_sum_fwd / _bwd)
# ----------------------------------------------------------------------------------------------------------------------
def _separate_rotary_and_gram(qkv, cos, sin, H, interleaved, mask):
    """q, k, v and A = sum_s mask_s q_s^T q_s as the attention computes them without the operator."""
    q, k, v = _rotary_as_the_attention_did(qkv, cos, sin, H, interleaved)
    q = q.contiguous()
    w = None if mask is None else mask[:, None, :, None].float()
    return q, k, v, M._GramFunction.apply(q, w, torch.float32)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_qkv_metric_sum_equals_the_separate_ops(masked, dtype):
    # the PyTorch path (CPU): the outputs are the very numbers of the separate ops, the gradient within float32
    # rounding of their sums' order
    qkv, cos, sin = _rotary_case(S=10, d=16, H=2, dtype=dtype)
    mask = (torch.arange(10)[None] < torch.tensor([[10], [6]])).long() if masked else None  # (row 2: 4 pads)
    out = ML.rotary_qkv_metric_sum(qkv, cos, sin, 2, True, mask)
    ref = _separate_rotary_and_gram(qkv, cos, sin, 2, True, mask)
    for o, r in zip(out, ref):
        assert torch.equal(o, r) and o.is_contiguous()
    A = out[3]
    assert A.shape == (2, 2, 16, 16) and A.dtype == torch.float32
    if masked:  # the padded positions are not in A: A of row 2 is that of its first 6 positions alone
        alone = ML.rotary_qkv_metric_sum(qkv[1:, :6], cos[1:, :6], sin[1:, :6], 2, True)[3]
        assert torch.allclose(A[1:], alone, rtol=1e-6, atol=1e-5)
    grads = [torch.randn_like(t) for t in ref]
    g = torch.autograd.grad(out, qkv, grads)[0]
    g_ref = torch.autograd.grad(ref, qkv, grads)[0]
    assert _rel(g, g_ref) <= (1e-6 if dtype == torch.float32 else 2 ** -7)
    # the backward function itself (autograd through the PyTorch path sums in another order)
    g_fn = ML.rotary_qkv_metric_sum_backward(*grads, out[0].detach(), mask, cos, sin, True)
    assert _rel(g_fn, g) <= (1e-6 if dtype == torch.float32 else 2 ** -7)


def test_rotary_qkv_metric_sum_opcheck_compile_and_bad_shapes():
    qkv, cos, sin = _rotary_case(S=10, d=16, H=2)
    mask = torch.ones(2, 10)
    mask[1, 7:] = 0
    for w in (None, mask):
        torch.library.opcheck(torch.ops.pldr.rotary_qkv_metric_sum_fwd.default, (qkv, cos, sin, w, 2, True))
        q = torch.randn(2, 2, 10, 16)
        grads = [torch.randn(2, 2, 10, 16) for _ in range(3)] + [torch.randn(2, 2, 16, 16)]
        torch.library.opcheck(torch.ops.pldr.rotary_qkv_metric_sum_bwd.default, (*grads, q, w, cos, sin, True))
    compiled = torch.compile(ML.rotary_qkv_metric_sum, fullgraph=True)
    out = compiled(qkv, cos, sin, 2, True, mask)
    ref = ML.rotary_qkv_metric_sum(qkv, cos, sin, 2, True, mask)
    assert all(torch.allclose(o, r, rtol=1e-6, atol=1e-6) for o, r in zip(out, ref))
    grads = [torch.randn_like(t) for t in ref]
    assert torch.allclose(torch.autograd.grad(out, qkv, grads)[0], torch.autograd.grad(ref, qkv, grads)[0],
                          rtol=1e-5, atol=1e-5)
    # a second derivative through the eager autograd node with the metric sum (its backward takes the PyTorch ops)
    x = qkv.detach().requires_grad_()
    (gx,) = torch.autograd.grad(ML.RotaryQKVFunction.apply(x, cos, sin, 2, True, True, mask)[3].square().sum(), x,
                                create_graph=True)
    (gx_ref,) = torch.autograd.grad(_separate_rotary_and_gram(x, cos, sin, 2, True, mask)[3].square().sum(), x,
                                    create_graph=True)
    assert torch.allclose(gx, gx_ref, rtol=1e-5, atol=1e-5)
    assert torch.allclose(torch.autograd.grad(gx.sum(), x)[0], torch.autograd.grad(gx_ref.sum(), x)[0], rtol=1e-4,
                          atol=1e-4)
    with pytest.raises(ValueError, match=r"rotary_qkv: expected the metric sum's token mask \[2, 10\], got \(2, 9\)"):
        ML.rotary_qkv_metric_sum(qkv, cos, sin, 2, True, mask[:, :9])
    with pytest.raises(ValueError, match=r"metric sum's gradient \[2, 2, 16, 16\] and q \(2, 2, 10, 16\), got "
                                         r"\(2, 2, 16, 15\)"):
        ML.rotary_qkv_metric_sum_backward(*grads[:3], grads[3][..., :15], q, None, cos, sin, True)


@pytest.mark.parametrize("padded", [False, True])
def test_attention_training_takes_the_metric_sum_from_the_rotary_operator(monkeypatch, padded):
    # where the rotary operator takes q^T q (CUDA kernels; here its PyTorch path, asked for on CPU), the model's loss
    # and every gradient are those of the separate q^T q (A in the loss too), also with padding (the token mask leaves
    # the pads out of A)
    monkeypatch.setattr(M.PldrAttention, "JOINT_ON_CPU", True)
    monkeypatch.setattr(M.PldrAttention, "MIN_JOINT_ROWS", 1)
    calls = []
    real = ML.rotary_qkv_metric_sum_forward
    monkeypatch.setattr(ML, "rotary_qkv_metric_sum_forward", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    cfg = PldrConfig(vocab_size=64, hidden_size=64, num_attention_heads=4, head_dim=16, num_hidden_layers=2,
                     intermediate_size=40, A_dff=12, num_reslayerA=2, num_denseA=2)
    torch.manual_seed(0)
    model = M.PldrForCausalLM(cfg)
    ids = torch.randint(4, 64, (2, 9))
    mask = None
    if padded:
        mask = torch.ones(2, 9, dtype=torch.long)
        mask[1, :3] = 0  # (left padding)

    def loss_and_grads():
        out = model(input_ids=ids, attention_mask=mask, labels=ids, output_pldr_attentions=True)
        loss = out.loss + sum(att.A.square().mean() for att in out.pldr_attentions)  # (A itself in the loss too)
        return loss, torch.autograd.grad(loss, list(model.parameters()))

    monkeypatch.setattr(M, "rotary_metric_sum_kernels", lambda t, d: True)
    loss, grads = loss_and_grads()
    assert len(calls) == 2 and all((m is None) == (not padded) for m in calls)  # one per layer, with the mask
    monkeypatch.setattr(M, "rotary_metric_sum_kernels", lambda t, d: False)
    calls.clear()
    ref, ref_grads = loss_and_grads()
    assert not calls
    # (the same forward; the backward's GEMMs sum in another order)
    assert torch.equal(loss, ref)
    for (name, _), g, r in zip(model.named_parameters(), grads, ref_grads):
        assert _rel(g, r) <= 1e-5, name


@needs_cuda_triton
@pytest.mark.parametrize("interleaved", [True, False])
def test_cuda_rotary_qkv_metric_sum_kernels_match_the_separate_ops(interleaved):
    # bf16 at a training shape's layout (14 heads of 64, 300 positions), eager and compiled, with a token mask: q, k, v
    # within one bf16 rounding of the separate ops, A the same GEMM's on those q, the gradient within one bf16 rounding
    B, S, H = 2, 300, 14
    qkv, cos, sin = _rotary_case(B, S, H, 64, 1, interleaved, torch.bfloat16, device="cuda")
    mask = torch.ones(B, S, device="cuda", dtype=torch.long)
    mask[1, :37] = 0
    ref = _separate_rotary_and_gram(qkv, cos, sin, H, interleaved, mask)
    grads = [torch.randn_like(t) for t in ref]
    ref_grad = torch.autograd.grad(ref, qkv, grads)[0]
    for fn in (ML.rotary_qkv_metric_sum, torch.compile(ML.rotary_qkv_metric_sum, fullgraph=True)):
        out = fn(qkv, cos, sin, H, interleaved, mask)
        grad = torch.autograd.grad(out, qkv, grads)[0]
        for o, r in zip(out[:3], ref[:3]):
            assert o.is_contiguous() and _rel(o, r) <= 2 ** -7
        assert _rel(out[3], ref[3]) <= 2 ** -10  # (of q within one rounding: 4e-5 on an H200)
        assert _rel(grad, ref_grad) <= 2 ** -7


@needs_cuda_triton
def test_cuda_training_with_the_metric_sum_in_the_rotary_operator():
    # a float32 model on CUDA, eager and compiled: the loss and every gradient with the metric sum in the rotary
    # kernels are those with the separate q^T q (float32 sums of the same products, in another order: a random tiny
    # model's LayerNorms of A amplify that to about 1e-3 of its gradients; a lost term or mask would be of order 1)
    cfg = PldrConfig(vocab_size=128, hidden_size=128, num_attention_heads=2, head_dim=64, num_hidden_layers=2,
                     intermediate_size=96, A_dff=24, num_reslayerA=2, num_denseA=2)
    torch.manual_seed(0)
    model = M.PldrForCausalLM(cfg).cuda()
    ids = torch.randint(4, 128, (4, 300), device="cuda")  # (1200 rows: q, k, v from the joint projection)
    mask = torch.ones_like(ids)
    mask[0, :20] = 0
    launched = []
    real = ML._rotary_launch_backward
    for compiled in (False, True):
        step = torch.compile(model) if compiled else model

        def loss_and_grads():
            loss = step(input_ids=ids, attention_mask=mask, labels=ids).loss
            return loss, torch.autograd.grad(loss, list(model.parameters()))

        try:
            ML._rotary_launch_backward = lambda *a: launched.append(a[-1] is not None) or real(*a)
            loss, grads = loss_and_grads()
            M.rotary_metric_sum_kernels, kernels = (lambda t, d: False), M.rotary_metric_sum_kernels
            ref, ref_grads = loss_and_grads()
        finally:
            ML._rotary_launch_backward = real
            M.rotary_metric_sum_kernels = kernels
        if not compiled:  # (compiled, inductor launches the kernels from its own code)
            assert launched == [True, True, False, False], launched  # (backward: with dA, then without)
        assert _rel(loss, ref) <= 1e-5
        for (name, _), g, r in zip(model.named_parameters(), grads, ref_grads):
            assert _rel(g, r) <= 1e-2, name
