"""The residual metric learner of PLDR-LLM as one PyTorch operator.

The metric learner of a PLGA layer refines the metric tensor A row by row: ``num_reslayerA`` residual units, each
``A = LayerNorm_d(A + GLU_n(...GLU_1(A)))`` with ``num_denseA`` SwiGLUs with biases
``GLU(z) = W3 (silu(W1 z + b1) * (W2 z + b2)) + b3`` (d -> A_dff -> d) on the rows of A. At the papers' sizes
(d = 64, A_dff = 170, 8 units x 2 GLUs, batch * heads * d = 14336 rows) module-by-module execution is some 100 forward
and 250 backward kernels per layer on tiny matrices, bound by kernel launches, and it keeps every SwiGLU's activations.

:func:`fused_metric_learner` runs the whole learner of a layer as two operators, ``pldr::metric_learner_fwd``
and ``pldr::metric_learner_bwd`` (``torch.library.triton_op`` with an autograd formula; opaque ``custom_op``s with
fake implementations without Triton or on PyTorch < 2.6), so that eager mode, ``torch.compile`` (no graph break;
inductor traces into them and launches their Triton kernels from its own code), FSDP/DDP, gradient checkpointing and
autocast all see one op per layer:

* the parameters enter as two flat tensors (:func:`flat_metric_learner`, :class:`LearnerLayout`): the GEMM weights
  W1|W2 [2G, h, d] (gluw1 and gluw2 of each GLU in turn) and W3 [G, d, h], then the biases b1|b2 [2G, h] and b3
  [G, d] with the LayerNorm weights and biases [U, d] (U units of J GLUs, G = U * J). The model stores them so
  (``PldrMetricLearner`` in modeling_pldr.py): two parameters per layer rather than 112, whose per-tensor autograd,
  optimizer and clipping work was the largest host cost of a small eager step (whose GPU work is about 1 ms a
  layer), and the backward's one flat gradient is both parameters' gradients as they lie, with no copy. Learners
  kept as modules (:func:`fused_metric_learner`) are packed by one differentiable ``torch.cat`` each per call, and
  :func:`stacked_metric_learner` takes the parameters stacked per kind;
* in eager mode the math runs through a plain ``torch.autograd.Function`` (a custom operator's Python dispatch costs
  about 0.5 ms of host time a call); under ``torch.compile`` the operators run;
* the GEMM dtype is decided by the wrapper (the autocast dtype under autocast, else the parameters' dtype) and
  passed as an argument: custom operators do not see autocast. The residual stream and the LayerNorms are float32;
* the forward keeps, for the backward, each GLU's input in the GEMM dtype and each unit's pre-LayerNorm sum with its
  mean and reciprocal standard deviation; the backward recomputes the SwiGLU activations from them.

On CUDA with Triton the operators run Triton kernels (below); elsewhere, and for shapes the kernels do not take, the
same math in plain PyTorch (:func:`_reference_forward`, :func:`_reference_backward`).

Kernels, per layer and step: forward ONE kernel, after one small kernel that stages the GEMM weights; backward TWO
kernels (plus one small reduction of the parameter gradients' row splits). With ``norm`` (:func:`flat_metric_learner`;
the model passes the attention's LayerNorm of A so) the LayerNorm before the learner runs in the same kernels: the
forward normalises the rows it loads (rounded to the dtype the separate LayerNorm would give), the row backward ends
with the LayerNorm's backward (its statistics recomputed from the rows) and adds its weight and bias partial sums to
the units' (summed by the parameter kernel, written after them in the flat gradient), where a separate LayerNorm was
one more kernel forward and about two backward per layer:

* staging (:func:`_stage_weights`): each GLU's W1, W2 and W3^T as one [3, A_dff', d] block in the GEMM dtype, with
  its biases in float32, the hidden units zero-padded to A_dff' (a multiple of the kernels' BLOCK_H: 170 -> 192).
  The kernels then load whole, aligned weight tiles without masks, and stream half the bytes of float32 weights
  under autocast. The forward keeps the staged weights for the backward (1.2 MB a layer at the 110M sizes);
* forward: each program takes BLOCK_M rows [BLOCK_M, d] into float32 registers and walks them through all units and
  GLUs, streaming each GLU's weights in hidden chunks of BLOCK_H: one loop over every (GLU, chunk), so that Triton's
  software pipeliner loads the next chunks' tiles while one is multiplied (across GLUs and units too); a GLU's and a
  unit's end are branches inside it. Dot operands in the GEMM dtype with float32 accumulation (float32 learners: see
  ``FLOAT32_KERNELS``);
* backward, rows: each program walks its rows backwards through the units and GLUs (LayerNorm backward, then each
  GLU's backward with the hidden activations recomputed in registers), writes dA, each GLU's output gradient in the
  GEMM dtype, and per-program partial sums of the LayerNorm parameter gradients;
* backward, parameters: one program per (GLU, hidden chunk) and row split recomputes the chunk's activations from the
  saved GLU inputs and output gradients and reduces dW1, dW2, dW3 and the biases' gradients over its rows; one more
  program per split sums the LayerNorm partials. Its products are written transposed (hidden units as rows, e.g.
  ``h1^T = W1 x^T``), so that each has BLOCK_H = 64 rows, as Hopper's warpgroup MMA (``wgmma``) wants. Written
  with 32-row blocks of x first, the kernel's PTX also had ``mma.sync``, and the whole backward took 402 us a layer
  at 14336 rows on an H200, against 294 us now. Splits write separate partial buffers summed afterwards (no
  atomics): the gradients are deterministic. Recomputing the chunk's activations (three small GEMMs) costs less than
  storing and re-reading the hidden gradients (3 * A_dff values a row and GLU) and keeps the backward's memory at one
  [G, rows, d] buffer.

The power law step that follows the learner (:func:`power_law`: ``A_LM = z silu(z) + eps`` with ``z = W A + b``,
``G_LM = a A_LM^p + ba`` per head, float32; its five parameters stacked [5, H, d, d], as the model stores them) is one
operator too, ``pldr::power_law_fwd`` / ``pldr::power_law_bwd``:
on CUDA one Triton kernel forward (one program per batch entry and head) and one backward that recomputes the
forward in column blocks, writes dA and each entry's share of the five parameter gradients, summed over the batch
afterwards (no atomics). As separate PyTorch ops it was some 7 kernels forward and 14 backward per layer on
[batch, H, d, d] tensors.

The FFN's SwiGLU on its joint W1|W2 output (:func:`joint_swiglu`, ``silu(h1) * h2`` for h12 = [h1 | h2]) is a third
operator, ``pldr::swiglu_fwd`` / ``pldr::swiglu_bwd``: on CUDA one Triton kernel each way, the backward writing both
halves' gradients from one evaluation of the sigmoid per pair (inductor's fused kernel evaluated it per half).

This file imports only torch and, optionally, triton: it travels with saved models as remote code.
"""

import contextlib
import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

try:  # optional: without Triton (or on CPU) the operators run their PyTorch reference
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001  (any failure to import means: no kernels)
    triton = None
    tl = None

# The operators are ``torch.library.triton_op``s (PyTorch >= 2.6) whose kernels are launched through ``wrap_triton``:
# torch.compile then traces into them and inductor launches the kernels from its own generated code (an opaque custom
# operator costs some 0.5 ms of host dispatch a call, which made small compiled steps host-bound). Without Triton
# (no kernels to trace; triton_op would also log a warning at import) or on older PyTorch they are opaque custom
# operators.
_TRACEABLE_KERNELS = (triton is not None and hasattr(torch.library, "triton_op")
                      and hasattr(torch.library, "wrap_triton"))
wrap_triton = getattr(torch.library, "wrap_triton", None)

__all__ = ["apply_rotary_tables", "flat_metric_learner", "fused_metric_learner", "joint_swiglu", "learner_tensors",
           "pack_learner", "plain_linears", "power_law", "rotary_qkv", "rotary_qkv_metric_sum",
           "stacked_metric_learner"]

# Run the Triton kernels on CPU tensors too. Only meaningful under Triton's interpreter (TRITON_INTERPRET=1, set before
# triton is imported); the tests use it to check the kernels without a GPU.
_KERNELS_ON_CPU = False
# Kernel block sizes. The row kernels (forward; backward over rows) map a row block BLOCK_M to (BLOCK_H hidden units,
# num_warps, num_stages) and take the largest BLOCK_M that still gives every SM a program (see _row_config); the
# parameter-gradient kernel has one (BLOCK_M, BLOCK_H, num_warps, num_stages). The fastest of a sweep on an H200 at the
# 110M sizes (bf16; 7168 and 14336 rows; GPU time through CUDA graphs, as scripts/bench_metric_learner.py --sweep
# takes it). The forward's num_stages is its weight loop's software-pipelining depth.
KERNEL_CONFIGS = {
    "fwd": {64: (64, 4, 3), 32: (64, 4, 3)},
    "bwd_rows": {64: (64, 4, 1), 32: (64, 4, 2)},
    "bwd_params": (64, 64, 4, 3),
    # (column block, num_warps) of the power law's backward kernel (see power_law_backward); the H200 sweep at batch 8
    # and 16 x 14 heads, d = 64 (GPU time, us): (64, 8) 47 and 83, (32, 4) 28 and 51, (16, 4) 31 and 42.
    "power_law_bwd": (16, 4),
}
# Some of these took up to 96 KB of shared memory per program on the H200 (the forward's 64-row blocks, the power
# law's backward). GPUs that give a program less than SHARED_MEMORY_NEEDED (Triton's own figure for the device; e.g.
# 99 KB on Ampere and Ada workstation GPUs, 64 KB on Turing; other architectures also lay it out differently, hence the
# margin) take SMALL_SHARED_MEMORY_CONFIGS, which took at most 46 KB there, rather than fail to launch.
SHARED_MEMORY_NEEDED = 128 * 1024
SMALL_SHARED_MEMORY_CONFIGS = {
    "fwd": {64: (32, 4, 2), 32: (64, 4, 2)},
    "bwd_rows": {64: (64, 4, 1), 32: (64, 4, 1)},
    "bwd_params": (32, 64, 4, 3),
    "power_law_bwd": (64, 8),
}
# Row splits of the parameter-gradient kernel (None: enough programs for PARAM_GRAD_WAVES waves over the GPU's SMs;
# the sweep measured 6 waves 15% faster than 2, with deterministic partial sums all the same).
PARAM_GRAD_SPLITS: int | None = None
PARAM_GRAD_WAVES = 6
# float32 learners (no autocast) run the reference path, on cuBLAS (which follows torch.backends.cuda.matmul.allow_tf32
# like any float32 matmul), unless this names the kernels' dot precision. Measured on an H100 at the 110M sizes:
# "ieee" (exact, on the CUDA cores) is ~4x slower than cuBLAS; "tf32" is ~4x faster than cuBLAS with TF32 but its
# errors are those of bf16 autocast, ~8x cuBLAS TF32's. The tests use "ieee" to check the kernels' math exactly.
FLOAT32_KERNELS: str | None = None

# Whether autocast runs layer_norm in float32 on a device type (true on CUDA, not on CPU): the modules' output dtype.
_AUTOCAST_LAYER_NORM_FP32 = {
    device: torch._C._dispatch_has_kernel_for_dispatch_key("aten::layer_norm", key)
    for device, key in (("cpu", "AutocastCPU"), ("cuda", "AutocastCUDA"), ("xpu", "AutocastXPU"),
                        ("mps", "AutocastMPS"))
}


# ----------------------------------------------------------------------------------------------------------------------
# Sizes, and the layout of the flat parameter gradient
# ----------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LearnerLayout:
    """Sizes of a learner, and the layout of the flat parameter-gradient tensor of the backward operator: W1|W2, W3,
    (b1|b2, b3,) LayerNorm weights, LayerNorm biases, each kind stacked as the forward takes it, and with ``norm_in``
    (a LayerNorm on the rows before the learner, in the operator) that LayerNorm's weight and bias [d] each."""

    units: int
    glus: int  # per unit
    hidden: int
    d: int
    bias: bool
    norm_in: bool = False

    @property
    def G(self) -> int:
        return self.units * self.glus

    @property
    def param_sizes(self) -> tuple[int, ...]:
        """The parts of the learner's own parameters (the layout without the input LayerNorm)."""
        G, h, d, U = self.G, self.hidden, self.d, self.units
        return (G * 2 * h * d, G * d * h) + ((G * 2 * h, G * d) if self.bias else ()) + (U * d, U * d)

    @property
    def sizes(self) -> tuple[int, ...]:
        return self.param_sizes + ((self.d, self.d) if self.norm_in else ())

    @property
    def total(self) -> int:
        return sum(self.sizes)

    @property
    def weights_numel(self) -> int:
        """Elements of the GEMM weights (W1|W2, then W3): the first part of the flat layout, the rest being the
        biases and the LayerNorms' parameters (which weight decay leaves out)."""
        return self.sizes[0] + self.sizes[1]

    def unpack(self, flat: torch.Tensor):
        """Views W12 [2G, h, d], W3 [G, d, h], B12 [2G, h] or None, B3 [G, d] or None, LNW [U, d], LNB [U, d]."""
        return self._views(flat.split(self.sizes))

    def unpack_pair(self, weights: torch.Tensor | None, norms: torch.Tensor | None):
        """:meth:`unpack` of the layout held in two flat tensors: ``weights`` (W1|W2, W3) and ``norms`` (the biases,
        the LayerNorm weights and biases), as the model stores a learner (None for either: None views of its part)."""
        sizes = self.param_sizes
        return self._views((weights.split(sizes[:2]) if weights is not None else (None, None))
                           + (norms.split(sizes[2:]) if norms is not None else (None,) * (len(sizes) - 2)))

    def norm_in_views(self, flat: torch.Tensor):
        """The input LayerNorm's weight and bias [d] in a flat tensor of this layout (``norm_in``)."""
        return flat.split(self.sizes)[-2:]

    def _views(self, parts):
        G, h, d, U = self.G, self.hidden, self.d, self.units
        shapes = [(2 * G, h, d), (G, d, h)] + ([(2 * G, h), (G, d)] if self.bias else []) + [(U, d), (U, d)]
        views = [None if part is None else part.view(shape) for part, shape in zip(parts, shapes)]
        W12, W3, *rest = views
        B12, B3 = (rest[0], rest[1]) if self.bias else (None, None)
        return W12, W3, B12, B3, rest[-2], rest[-1]


def pack_learner(w12, w3, b12, b3, ln_w, ln_b) -> tuple[torch.Tensor, torch.Tensor]:
    """The flat pair (weights, norms) that :func:`flat_metric_learner` takes, from the parameters by kind (each a
    stacked tensor or a list of the per-GLU / per-unit tensors, in the order of :func:`stacked_metric_learner`; b12 and
    b3 None without biases): one differentiable ``torch.cat`` each."""
    def flat(parts):
        return [t.reshape(-1) for t in (parts if isinstance(parts, (list, tuple)) else [parts])]

    kinds = [k for k in (b12, b3) if k is not None] + [ln_w, ln_b]
    return torch.cat(flat(w12) + flat(w3)), torch.cat([t for k in kinds for t in flat(k)])


def _flat_layout(weights, norms, units: int, glus: int, hidden: int) -> LearnerLayout:
    """The learner's layout from its flat parameters (the pair of :func:`pack_learner`; d follows from the weights'
    size); a ValueError that says what is wrong otherwise."""
    units, glus, hidden = int(units), int(glus), int(hidden)  # (sizes of the parameters: never dynamic)
    if min(units, glus, hidden) < 1:
        raise ValueError(f"metric learner: units, GLUs per unit and hidden size must be positive, got {units}, {glus}, "
                         f"{hidden}")
    G = units * glus
    if weights.dim() != 1 or weights.numel() == 0 or weights.numel() % (3 * G * hidden):
        raise ValueError(f"metric learner: the flat weights must be a vector of 3 x {G} GLUs x hidden {hidden} x d "
                         f"elements (W1|W2, then W3), got shape {tuple(weights.shape)}")
    d = int(weights.numel()) // (3 * G * hidden)
    layouts = [LearnerLayout(units, glus, hidden, d, bias) for bias in (False, True)]
    sizes = [sum(layout.param_sizes) - layout.weights_numel for layout in layouts]
    n = int(norms.numel()) if norms.dim() == 1 else -1
    if n not in sizes:
        raise ValueError(f"metric learner: the flat biases and LayerNorm parameters must be a vector of {sizes[0]} or "
                         f"{sizes[1]} elements (without or with the GLUs' biases), got shape {tuple(norms.shape)}")
    for name, t in (("weights", weights), ("biases and LayerNorm parameters", norms)):
        if not t.is_floating_point():
            raise ValueError(f"metric learner: the flat {name} must be floating point, got {t.dtype}")
    if weights.dtype != norms.dtype:
        raise ValueError(f"metric learner: all parameters must have the same dtype, got {weights.dtype} and "
                         f"{norms.dtype}")
    return layouts[sizes.index(n)]


def _check_flat(x, weights, norms, units: int, glus: int, hidden: int) -> LearnerLayout:
    """:func:`_flat_layout`, and rows x [N, d] of the learner's width."""
    layout = _flat_layout(weights, norms, units, glus, hidden)
    if x.dim() != 2:
        raise ValueError(f"metric learner: expected rows [N, d], got a tensor of shape {tuple(x.shape)}")
    if x.shape[1] != layout.d:
        raise ValueError(f"metric learner: rows must have width {layout.d} (the learner's d), got shape "
                         f"{tuple(x.shape)}")
    return layout


def _check(x, w12, w3, b12, b3, ln_w, ln_b) -> LearnerLayout:
    """The learner's sizes from the operator's inputs; a ValueError that says what is wrong otherwise."""
    if x.dim() != 2:
        raise ValueError(f"metric learner: expected rows [N, d], got a tensor of shape {tuple(x.shape)}")
    if w3.dim() != 3 or ln_w.dim() != 2 or ln_w.shape[0] < 1 or w3.shape[0] % ln_w.shape[0] != 0 or w3.shape[0] < 1:
        raise ValueError(f"metric learner: expected W3 [G, d, h] and LayerNorm weights [U, d] with G a multiple of U, "
                         f"got {tuple(w3.shape)} and {tuple(ln_w.shape)}")
    G, d, h = w3.shape
    U = ln_w.shape[0]
    bias = b12 is not None
    expected = {"rows": (x, (x.shape[0], d)), "W1|W2": (w12, (2 * G, h, d)), "W3": (w3, (G, d, h)),
                "LayerNorm weights": (ln_w, (U, d)), "LayerNorm biases": (ln_b, (U, d))}
    if bias or b3 is not None:
        if b12 is None or b3 is None:
            raise ValueError("metric learner: give both b1|b2 and b3, or neither")
        expected.update({"b1|b2": (b12, (2 * G, h)), "b3": (b3, (G, d))})
    for name, (t, shape) in expected.items():
        if tuple(t.shape) != shape:
            raise ValueError(f"metric learner: {name} must have shape {shape} (G={G} GLUs, U={U} units, d={d}, "
                             f"hidden={h}), got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"metric learner: {name} must be floating point, got {t.dtype}")
    if any(t.dtype != w12.dtype for t, _ in list(expected.values())[1:]):
        raise ValueError("metric learner: all parameters must have the same dtype")
    return LearnerLayout(U, G // U, h, d, bias)


def _wide_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype of the steps that 16-bit models compute in float32 (the learner's residual stream, LayerNorms and
    saved pre-LayerNorm sums; the rotation, the metric sum, the power law): float32, or float64 where one of ``dtypes``
    is float64 (a float64 model computes everything in float64, e.g. for gradcheck)."""
    out = torch.float32
    for dtype in dtypes:
        out = torch.promote_types(out, dtype)
    return out


def _linear(x, w, b):
    return torch.mm(x, w.t()) if b is None else torch.addmm(b, x, w.t())


def _reference_forward(x, W12, W3, B12, B3, LNW, LNB, layout: LearnerLayout, eps, cd, out_dtype, save, norm=None):
    U, J, h, d, G = layout.units, layout.glus, layout.hidden, layout.d, layout.G
    N = x.shape[0]
    w12, w3 = W12.to(cd).reshape(G, 2 * h, d), W3.to(cd)
    b12 = B12.to(cd).reshape(G, 2 * h) if B12 is not None else None
    b3 = B3.to(cd) if B3 is not None else None
    acc = _wide_dtype(cd)
    lnw, lnb = LNW.to(acc), LNB.to(acc)
    if norm is not None:  # (the input LayerNorm, as the model's separate LayerNorm of A computes it)
        w_in, b_in = norm
        x = F.layer_norm(x, (d,), w_in.to(x.dtype), b_in.to(x.dtype), eps).to(_norm_dtype(x, w_in))
    xins = x.new_empty((G, N, d) if save else (0,), dtype=cd)
    zs = x.new_empty((U, N, d) if save else (0,), dtype=acc)
    means, rstds = [], []
    a = x.to(acc)
    for u in range(U):
        y = a
        for j in range(J):
            g = u * J + j
            xin = xins[g].copy_(y) if save else y.to(cd)
            hid = _linear(xin, w12[g], None if b12 is None else b12[g])
            y = _linear(F.silu(hid[:, :h]) * hid[:, h:], w3[g], None if b3 is None else b3[g])
        z = torch.add(a, y, out=zs[u]) if save else a + y
        a, mean, rstd = torch.native_layer_norm(z, (d,), lnw[u], lnb[u], eps)
        means.append(mean)
        rstds.append(rstd)
    staged = (x.new_empty(0, dtype=cd), x.new_empty(0, dtype=torch.float32))  # (the kernels' staged weights)
    if not save:
        return a.to(out_dtype), xins, zs, x.new_empty(0, dtype=acc), x.new_empty(0, dtype=acc), *staged
    return a.to(out_dtype), xins, zs, torch.stack(means).view(U, N), torch.stack(rstds).view(U, N), *staged


def _reference_backward(gout, W12, W3, B12, B3, LNW, LNB, xins, zs, means, rstds, layout: LearnerLayout, eps, cd,
                        x_dtype, param_grads, x=None, norm=None):
    U, J, h, d, G = layout.units, layout.glus, layout.hidden, layout.d, layout.G
    N = gout.shape[0]
    w12, w3 = W12.to(cd).reshape(G, 2 * h, d), W3.to(cd)
    b12 = B12.to(cd).reshape(G, 2 * h) if B12 is not None else None
    acc = _wide_dtype(cd)
    lnw, lnb = LNW.to(acc), LNB.to(acc)
    if param_grads:
        flat = torch.empty(layout.total, dtype=acc, device=gout.device)
        gW12, gW3, gB12, gB3, gLNW, gLNB = layout.unpack(flat)
    mask = [True, param_grads, param_grads]
    gx = gout.to(acc)
    for u in reversed(range(U)):
        gz, glnw, glnb = torch.ops.aten.native_layer_norm_backward(
            gx, zs[u], (d,), means[u].view(N, 1), rstds[u].view(N, 1), lnw[u], lnb[u], mask
        )
        if param_grads:
            gLNW[u].copy_(glnw)
            gLNB[u].copy_(glnb)
        gy = gz.to(cd)
        for j in reversed(range(J)):
            g = u * J + j
            xin = xins[g]
            hid = _linear(xin, w12[g], None if b12 is None else b12[g])
            h1, h2 = hid[:, :h], hid[:, h:]
            s = F.silu(h1)
            gp = torch.mm(gy, w3[g])
            ghid = torch.cat((torch.ops.aten.silu_backward(gp * h2, h1), gp * s), dim=1)
            if param_grads:
                gW3[g].copy_(torch.mm(gy.t(), s * h2))
                gW12.view(G, 2 * h, d)[g].copy_(torch.mm(ghid.t(), xin))
                if gB12 is not None:
                    gB3[g].copy_(gy.sum(0))
                    gB12.view(G, 2 * h)[g].copy_(ghid.sum(0))
            gy = torch.mm(ghid, w12[g])
        gx = gz + gy
    if norm is not None:  # the input LayerNorm's backward, in x's dtype as the separate LayerNorm's
        w_in, b_in = (t.to(x.dtype) for t in norm)
        _, mean0, rstd0 = torch.native_layer_norm(x, (d,), w_in, b_in, eps)
        gx, g_w_in, g_b_in = torch.ops.aten.native_layer_norm_backward(
            gx.to(x.dtype), x, (d,), mean0, rstd0, w_in, b_in, [True, param_grads, param_grads])
        if param_grads:
            for view, g in zip(layout.norm_in_views(flat), (g_w_in, g_b_in)):
                view.copy_(g)
    gx = gx.to(x_dtype)
    if not param_grads:
        return gx, W12.new_empty(0)
    return gx, flat.to(W12.dtype)


# ----------------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _row_stats(z, D: tl.constexpr, EPS: tl.constexpr):
        # A LayerNorm's statistics of the rows z [BLOCK_M, D] (float32): mean, z centred, reciprocal standard deviation
        mean = tl.sum(z, axis=1) / D
        zc = z - mean[:, None]
        return mean, zc, 1.0 / tl.sqrt(tl.sum(zc * zc, axis=1) / D + EPS)

    @triton.jit
    def _layer_norm_backward(g, xhat, rstd, W, cols, PART, D: tl.constexpr, PARAM_GRADS: tl.constexpr):
        # The gradient of a LayerNorm's input rows for the gradient g of its output (xhat its normalised input, rstd
        # its reciprocal standard deviations, W its weight); with PARAM_GRADS this block's partial sums of its weight's
        # and bias's gradients, written to PART [2, D]
        if PARAM_GRADS:
            tl.store(PART + cols, tl.sum(g * xhat, axis=0))
            tl.store(PART + D + cols, tl.sum(g, axis=0))
        gxh = g * tl.load(W + cols).to(tl.float32)[None, :]
        return rstd[:, None] * (gxh - (tl.sum(gxh, axis=1) / D)[:, None]
                                - xhat * (tl.sum(gxh * xhat, axis=1) / D)[:, None])

    @triton.jit
    def _learner_stage_kernel(W12, W3, B12, WS, BS, H, HP, D: tl.constexpr, BLOCK: tl.constexpr,
                              HAS_BIAS: tl.constexpr):
        # The GEMM weights of GLU g as the kernels read them: WS[g] = [W1; W2; W3^T] [3, HP, D] in the GEMM dtype,
        # and the biases BS[g] = [b1; b2] [2, HP] in float32, the hidden units zero-padded from H to HP.
        g = tl.program_id(0)
        h = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        cols = tl.arange(0, D)
        hm = h < H
        src = h[:, None] * D + cols[None, :]
        dst = WS + g * 3 * HP * D + src
        cd = WS.dtype.element_ty
        tl.store(dst, tl.load(W12 + 2 * g * H * D + src, mask=hm[:, None], other=0.0).to(cd))
        tl.store(dst + HP * D, tl.load(W12 + (2 * g + 1) * H * D + src, mask=hm[:, None], other=0.0).to(cd))
        tl.store(dst + 2 * HP * D, tl.load(W3 + g * D * H + cols[None, :] * H + h[:, None], mask=hm[:, None],
                                           other=0.0).to(cd))
        if HAS_BIAS:
            tl.store(BS + g * 2 * HP + h, tl.load(B12 + 2 * g * H + h, mask=hm, other=0.0).to(tl.float32))
            tl.store(BS + g * 2 * HP + HP + h, tl.load(B12 + (2 * g + 1) * H + h, mask=hm, other=0.0).to(tl.float32))

    @triton.jit
    def _learner_fwd_kernel(
        X, OUT, WS, BS, B3, LNW, LNB, LNIW, LNIB, XIN, Z, MEAN, RSTD, N, U, J,
        EPS: tl.constexpr,  # (a constant: inductor would pass a Python float argument as float64)
        D: tl.constexpr, HP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, HAS_BIAS: tl.constexpr,
        SAVE: tl.constexpr, CD: tl.constexpr, PREC: tl.constexpr, STAGES: tl.constexpr, NORM_IN: tl.constexpr,
        RD: tl.constexpr,
    ):
        # One loop over every (GLU, hidden chunk) of the learner, so that Triton's software pipeliner streams the
        # weight tiles ahead of their products; a GLU's (and a unit's) end is a branch inside it.
        pid = tl.program_id(0)
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < N
        cols = tl.arange(0, D)
        hh = tl.arange(0, BLOCK_H)
        offs = rows[:, None] * D + cols[None, :]
        m2 = rmask[:, None]
        wofs = hh[:, None] * D + cols[None, :]
        SLAB: tl.constexpr = HP * D
        CHUNKS: tl.constexpr = HP // BLOCK_H
        G = U * J
        a = tl.load(X + offs, mask=m2, other=0.0).to(tl.float32)
        if NORM_IN:  # the LayerNorm before the learner, its result rounded to RD as the separate LayerNorm's would be
            _, a_c, a_r = _row_stats(a, D, EPS)
            a = (a_c * a_r[:, None] * tl.load(LNIW + cols).to(tl.float32)[None, :]
                 + tl.load(LNIB + cols).to(tl.float32)[None, :]).to(RD).to(tl.float32)
        xin = a.to(CD)
        if SAVE:
            tl.store(XIN + offs, xin, mask=m2)
        acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
        for t in tl.range(0, G * CHUNKS, num_stages=STAGES):
            g = t // CHUNKS
            c = t - g * CHUNKS
            base = WS + g * 3 * SLAB + c * BLOCK_H * D
            h1 = tl.dot(xin, tl.trans(tl.load(base + wofs)), input_precision=PREC)
            h2 = tl.dot(xin, tl.trans(tl.load(base + SLAB + wofs)), input_precision=PREC)
            if HAS_BIAS:
                h1 += tl.load(BS + g * 2 * HP + c * BLOCK_H + hh)[None, :]
                h2 += tl.load(BS + g * 2 * HP + HP + c * BLOCK_H + hh)[None, :]
            act = h1 * tl.sigmoid(h1) * h2  # zero in the padded hidden units
            acc = tl.dot(act.to(CD), tl.load(base + 2 * SLAB + wofs), acc, input_precision=PREC)
            if c == CHUNKS - 1:  # GLU g done: acc is its output
                if HAS_BIAS:
                    acc += tl.load(B3 + g * D + cols).to(tl.float32)[None, :]
                u = g // J
                if g - u * J == J - 1:  # unit u done: residual sum and LayerNorm
                    z = a + acc
                    mean, zc, rstd = _row_stats(z, D, EPS)
                    if SAVE:
                        tl.store(Z + u * N * D + offs, z, mask=m2)
                        tl.store(MEAN + u * N + rows, mean, mask=rmask)
                        tl.store(RSTD + u * N + rows, rstd, mask=rmask)
                    lnw = tl.load(LNW + u * D + cols).to(tl.float32)
                    lnb = tl.load(LNB + u * D + cols).to(tl.float32)
                    a = zc * rstd[:, None] * lnw[None, :] + lnb[None, :]
                    y = a
                else:
                    y = acc
                xin = y.to(CD)
                if SAVE:
                    if g + 1 < G:
                        tl.store(XIN + (g + 1) * N * D + offs, xin, mask=m2)
                acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
        tl.store(OUT + offs, a.to(OUT.dtype.element_ty), mask=m2)

    @triton.jit
    def _learner_bwd_rows_kernel(
        GOUT, GX, WS, BS, LNW, XIN, Z, MEAN, RSTD, GY, LNPART, X, LNIW, N, U, J, UP,
        D: tl.constexpr, HP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, HAS_BIAS: tl.constexpr,
        PARAM_GRADS: tl.constexpr, CD: tl.constexpr, PREC: tl.constexpr, NORM_IN: tl.constexpr, EPS: tl.constexpr,
    ):
        # (LNPART: per program UP = U (+ 1 with NORM_IN: the input LayerNorm's, last) partial sums)
        pid = tl.program_id(0)
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < N
        cols = tl.arange(0, D)
        hh = tl.arange(0, BLOCK_H)
        offs = rows[:, None] * D + cols[None, :]
        m2 = rmask[:, None]
        wofs = hh[:, None] * D + cols[None, :]
        SLAB: tl.constexpr = HP * D
        gx = tl.load(GOUT + offs, mask=m2, other=0.0).to(tl.float32)  # zero in the masked rows, all the way down
        for uu in range(U):
            u = U - 1 - uu
            z = tl.load(Z + u * N * D + offs, mask=m2, other=0.0)
            mean = tl.load(MEAN + u * N + rows, mask=rmask, other=0.0)
            rstd = tl.load(RSTD + u * N + rows, mask=rmask, other=0.0)
            xhat = (z - mean[:, None]) * rstd[:, None]
            # (and this block's share of the LayerNorm weight and bias gradients)
            gz = _layer_norm_backward(gx, xhat, rstd, LNW + u * D, cols, LNPART + (pid * UP + u) * 2 * D, D,
                                      PARAM_GRADS)
            gy = gz
            for jj in range(J):
                g = u * J + J - 1 - jj
                xin = tl.load(XIN + g * N * D + offs, mask=m2, other=0.0)
                gyc = gy.to(CD)
                if PARAM_GRADS:
                    tl.store(GY + g * N * D + offs, gyc, mask=m2)
                gin = tl.zeros([BLOCK_M, D], dtype=tl.float32)
                for c in tl.static_range(HP // BLOCK_H):
                    base = WS + g * 3 * SLAB + c * BLOCK_H * D
                    w1 = tl.load(base + wofs)
                    w2 = tl.load(base + SLAB + wofs)
                    w3 = tl.load(base + 2 * SLAB + wofs)
                    h1 = tl.dot(xin, tl.trans(w1), input_precision=PREC)
                    h2 = tl.dot(xin, tl.trans(w2), input_precision=PREC)
                    if HAS_BIAS:
                        h1 += tl.load(BS + g * 2 * HP + c * BLOCK_H + hh)[None, :]
                        h2 += tl.load(BS + g * 2 * HP + HP + c * BLOCK_H + hh)[None, :]
                    gp = tl.dot(gyc, tl.trans(w3), input_precision=PREC)
                    sig = tl.sigmoid(h1)
                    gh1 = gp * h2 * sig * (1.0 + h1 * (1.0 - sig))
                    gh2 = gp * h1 * sig
                    gin += tl.dot(gh1.to(CD), w1, input_precision=PREC)
                    gin += tl.dot(gh2.to(CD), w2, input_precision=PREC)
                gy = gin
            gx = gz + gy
        if NORM_IN:  # the input LayerNorm's backward, its statistics recomputed from the rows
            _, a_c, a_r = _row_stats(tl.load(X + offs, mask=m2, other=0.0).to(tl.float32), D, EPS)
            gx = _layer_norm_backward(gx, a_c * a_r[:, None], a_r, LNIW, cols, LNPART + (pid * UP + U) * 2 * D, D,
                                      PARAM_GRADS)
        tl.store(GX + offs, gx.to(GX.dtype.element_ty), mask=m2)

    @triton.jit
    def _learner_bwd_params_kernel(
        XIN, GY, WS, BS, LNPART, PART, N, H, U, J, UP, ROW_PROGRAMS, ROWS_PER_SPLIT, ROW_PROGRAMS_PER_SPLIT, TOTAL,
        D: tl.constexpr, HP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr,
        HAS_BIAS: tl.constexpr, CD: tl.constexpr, PREC: tl.constexpr,
    ):
        G = U * J
        off_w3 = G * 2 * H * D
        off_b12 = off_w3 + G * D * H
        off_b3 = off_b12 + G * 2 * H
        if HAS_BIAS:
            off_ln = off_b3 + G * D
        else:
            off_ln = off_b12
        SLAB: tl.constexpr = HP * D
        CHUNKS: tl.constexpr = HP // BLOCK_H
        tile = tl.program_id(0)
        split = tl.program_id(1)
        out = PART + split * TOTAL
        cols = tl.arange(0, D)
        if tile == G * CHUNKS:
            # LayerNorm weight and bias gradients: the sum of this split's share of the row kernel's partials.
            pp = tl.arange(0, BLOCK_P)
            p_lo = split * ROW_PROGRAMS_PER_SPLIT
            p_hi = tl.minimum(p_lo + ROW_PROGRAMS_PER_SPLIT, ROW_PROGRAMS)
            for u in range(UP):  # (u = U: the input LayerNorm's, stored after the units')
                accw = tl.zeros([D], dtype=tl.float32)
                accb = tl.zeros([D], dtype=tl.float32)
                for p0 in range(p_lo, p_hi, BLOCK_P):
                    pr = p0 + pp
                    pm = (pr < p_hi)[:, None]
                    base = LNPART + (pr[:, None] * UP + u) * 2 * D + cols[None, :]
                    accw += tl.sum(tl.load(base, mask=pm, other=0.0), axis=0)
                    accb += tl.sum(tl.load(base + D, mask=pm, other=0.0), axis=0)
                if u < U:
                    tl.store(out + off_ln + u * D + cols, accw)
                    tl.store(out + off_ln + (U + u) * D + cols, accb)
                else:
                    tl.store(out + off_ln + 2 * U * D + cols, accw)
                    tl.store(out + off_ln + 2 * U * D + D + cols, accb)
        else:
            # dW1, dW2 (rows of the chunk), dW3 (columns of the chunk) and bias gradients of one GLU over this split's
            # rows, from the saved GLU inputs and output gradients.
            g = tile // CHUNKS
            c = tile % CHUNKS
            hidx = c * BLOCK_H + tl.arange(0, BLOCK_H)
            hm = hidx < H
            base = WS + g * 3 * SLAB + c * BLOCK_H * D
            wofs = tl.arange(0, BLOCK_H)[:, None] * D + cols[None, :]
            w1 = tl.load(base + wofs)
            w2 = tl.load(base + SLAB + wofs)
            w3t = tl.load(base + 2 * SLAB + wofs)
            if HAS_BIAS:
                b1 = tl.load(BS + g * 2 * HP + hidx)
                b2 = tl.load(BS + g * 2 * HP + HP + hidx)
            dw1 = tl.zeros([BLOCK_H, D], dtype=tl.float32)
            dw2 = tl.zeros([BLOCK_H, D], dtype=tl.float32)
            dw3t = tl.zeros([BLOCK_H, D], dtype=tl.float32)
            db1 = tl.zeros([BLOCK_H], dtype=tl.float32)
            db2 = tl.zeros([BLOCK_H], dtype=tl.float32)
            db3 = tl.zeros([D], dtype=tl.float32)
            r_lo = split * ROWS_PER_SPLIT
            r_hi = tl.minimum(r_lo + ROWS_PER_SPLIT, N)
            for r0 in range(r_lo, r_hi, BLOCK_M):
                rows = r0 + tl.arange(0, BLOCK_M)
                m2 = (rows < r_hi)[:, None]
                offs = g * N * D + rows[:, None] * D + cols[None, :]
                xin = tl.load(XIN + offs, mask=m2, other=0.0)
                gyc = tl.load(GY + offs, mask=m2, other=0.0)
                h1 = tl.dot(w1, tl.trans(xin), input_precision=PREC)  # [BLOCK_H, BLOCK_M]: transposed throughout
                h2 = tl.dot(w2, tl.trans(xin), input_precision=PREC)
                if HAS_BIAS:
                    h1 += b1[:, None]
                    h2 += b2[:, None]
                gp = tl.dot(w3t, tl.trans(gyc), input_precision=PREC)  # zero in the masked rows
                sig = tl.sigmoid(h1)
                silu = h1 * sig
                gh1 = gp * h2 * sig * (1.0 + h1 * (1.0 - sig))
                gh2 = gp * silu
                dw1 = tl.dot(gh1.to(CD), xin, dw1, input_precision=PREC)
                dw2 = tl.dot(gh2.to(CD), xin, dw2, input_precision=PREC)
                dw3t = tl.dot((silu * h2).to(CD), gyc, dw3t, input_precision=PREC)
                if HAS_BIAS:
                    db1 += tl.sum(gh1, axis=1)
                    db2 += tl.sum(gh2, axis=1)
                    db3 += tl.sum(gyc.to(tl.float32), axis=0)
            w_offs = hidx[:, None] * D + cols[None, :]
            tl.store(out + g * 2 * H * D + w_offs, dw1, mask=hm[:, None])
            tl.store(out + (g * 2 + 1) * H * D + w_offs, dw2, mask=hm[:, None])
            tl.store(out + off_w3 + g * D * H + cols[None, :] * H + hidx[:, None], dw3t, mask=hm[:, None])
            if HAS_BIAS:
                tl.store(out + off_b12 + g * 2 * H + hidx, db1, mask=hm)
                tl.store(out + off_b12 + (g * 2 + 1) * H + hidx, db2, mask=hm)
                if c == 0:
                    tl.store(out + off_b3 + g * D + cols, db3)

    _TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


_SM_COUNTS: dict = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _SM_COUNTS:
        _SM_COUNTS[key] = torch.cuda.get_device_properties(key).multi_processor_count
    return _SM_COUNTS[key]


_SHARED_MEMORY: dict = {}


def _kernel_configs(device: torch.device) -> dict:
    """KERNEL_CONFIGS, or SMALL_SHARED_MEMORY_CONFIGS on a GPU whose programs get less shared memory than
    SHARED_MEMORY_NEEDED."""
    if device.type != "cuda":
        return KERNEL_CONFIGS
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _SHARED_MEMORY:
        try:  # the limit Triton itself checks a kernel against
            _SHARED_MEMORY[key] = triton.runtime.driver.active.utils.get_device_properties(key)["max_shared_mem"]
        except Exception:  # noqa: BLE001  (unknown: take the configurations that need little)
            _SHARED_MEMORY[key] = getattr(torch.cuda.get_device_properties(key), "shared_memory_per_block_optin", 0)
    return KERNEL_CONFIGS if _SHARED_MEMORY[key] >= SHARED_MEMORY_NEEDED else SMALL_SHARED_MEMORY_CONFIGS


def _use_kernels(x: torch.Tensor, w12: torch.Tensor, layout: LearnerLayout, cd: torch.dtype) -> bool:
    """Whether the Triton kernels take this call: CUDA (or the interpreter on CPU), d a power of two in [16, 128]
    (the rows live in registers), bfloat16/float16 GEMMs (float32: see FLOAT32_KERNELS), and offsets that fit in 32
    bits."""
    if triton is None or not (x.device.type == "cuda" or (x.device.type == "cpu" and _KERNELS_ON_CPU)):
        return False
    floats = (torch.float32, torch.bfloat16, torch.float16)
    if cd == torch.float32 and FLOAT32_KERNELS is None:
        return False
    return (
        layout.d in (16, 32, 64, 128) and cd in floats and w12.dtype in floats and x.dtype in floats
        and max(layout.G, 2) * x.shape[0] * layout.d < 2**31 and layout.total < 2**31
    )


def _dot_precision(cd: torch.dtype) -> str:
    if cd == torch.float32:
        return FLOAT32_KERNELS or "ieee"
    return "tf32"  # (unused for 16-bit operands)


def _padded_hidden(hidden: int) -> int:
    """The hidden size of the staged weights: a multiple of every kernel's BLOCK_H (in either set of configurations)."""
    block = max([cfg[0] for configs in (KERNEL_CONFIGS, SMALL_SHARED_MEMORY_CONFIGS) for kind in ("fwd", "bwd_rows")
                 for cfg in configs[kind].values()]
                + [configs["bwd_params"][1] for configs in (KERNEL_CONFIGS, SMALL_SHARED_MEMORY_CONFIGS)])
    return triton.cdiv(hidden, block) * block


def _stage_weights(W12, W3, B12, layout: LearnerLayout, cd, wrap):
    """The GEMM weights as the kernels read them, made once per forward (and kept for the backward): per GLU
    [W1; W2; W3^T] [G, 3, HP, d] in the GEMM dtype and [b1; b2] [G, 2, HP] in float32 (empty without biases), the
    hidden units zero-padded to HP (:func:`_padded_hidden`): the kernels load whole, aligned tiles without masks, and
    a padded unit adds silu(0) * 0 = 0."""
    G, H, D = layout.G, layout.hidden, layout.d
    hp = _padded_hidden(H)
    ws = torch.empty((G, 3, hp, D), dtype=cd, device=W12.device)
    bs = torch.empty((G, 2, hp) if layout.bias else (0,), dtype=torch.float32, device=W12.device)
    block = 16
    kernel = wrap_triton(_learner_stage_kernel) if wrap else _learner_stage_kernel
    kernel[(G, hp // block)](W12, W3, B12 if layout.bias else W12, ws, bs if layout.bias else ws, H, hp, D=D,
                             BLOCK=block, HAS_BIAS=layout.bias, num_warps=1)
    return ws, bs


def _row_config(kind: str, rows: int, d: int, device: torch.device):
    """(BLOCK_M, BLOCK_H, num_warps, num_stages) of a row kernel: the largest row block of its configurations that
    still gives every SM a program, else the smallest (e.g. on 132 SMs: 64 rows at 14336 rows, 32 at 7168 and 3584).
    BLOCK_H is capped at 4096 / d: the forward keeps the weight tiles [BLOCK_H, d] of several chunks in flight."""
    configs = _kernel_configs(device)[kind]
    sms = _sm_count(device)
    fits = [bm for bm in configs if triton.cdiv(rows, bm) >= sms]
    bm = max(fits) if fits else min(configs)
    bh, warps, stages = configs[bm]
    return bm, max(16, min(bh, 4096 // d)), warps, stages


_ALREADY_CURRENT = contextlib.nullcontext()


def _on_device(x: torch.Tensor):
    """A context that makes ``x``'s GPU the current one while launching (Triton launches on the current device); a
    no-op one when it already is, the usual case (on an H200 host: 1.0 us a launch, where the wrapper that switched
    every time took 8.6 us to make and enter)."""
    if x.device.type != "cuda" or x.device.index == torch.cuda.current_device():
        return _ALREADY_CURRENT
    return torch.cuda.device(x.device)


def _kernel_forward(x, W12, W3, B12, B3, LNW, LNB, layout: LearnerLayout, eps, cd, out_dtype, save, wrap, norm=None):
    U, J, D, G = layout.units, layout.glus, layout.d, layout.G
    N = x.shape[0]
    out = torch.empty((N, D), dtype=out_dtype, device=x.device)
    f32 = torch.float32
    xins = x.new_empty((G, N, D) if save else (0,), dtype=cd)  # outputs of an operator must not alias each other
    zs = x.new_empty((U, N, D) if save else (0,), dtype=f32)
    mean = x.new_empty((U, N) if save else (0,), dtype=f32)
    rstd = x.new_empty((U, N) if save else (0,), dtype=f32)
    with _on_device(x):
        ws, bs = _stage_weights(W12, W3, B12, layout, cd, wrap)
        if N:
            bm, bh, warps, stages = _row_config("fwd", N, D, x.device)
            saved = (xins, zs, mean, rstd) if save else (x,) * 4  # (not written without save)
            biases = (bs, B3) if layout.bias else (ws, ws)  # (not read without biases)
            norm_in = (LNW, LNB) if norm is None else norm  # (not read without the input LayerNorm)
            kernel = wrap_triton(_learner_fwd_kernel) if wrap else _learner_fwd_kernel
            kernel[(triton.cdiv(N, bm),)](
                x, out, ws, biases[0], biases[1], LNW, LNB, *norm_in, *saved, N, U, J,
                EPS=float(eps), D=D, HP=ws.shape[2], BLOCK_M=bm, BLOCK_H=bh, HAS_BIAS=layout.bias, SAVE=save,
                CD=_TL_DTYPES[cd], PREC=_dot_precision(cd), STAGES=stages, NORM_IN=norm is not None,
                RD=tl.float32 if norm is None else _TL_DTYPES[_norm_dtype(x, norm[0])], num_warps=warps,
                num_stages=stages,
            )
    if not save:
        ws, bs = ws.new_empty(0), bs.new_empty(0)
    return out, xins, zs, mean, rstd, ws, bs


def _kernel_backward(gout, W12, W3, B12, LNW, xins, zs, mean, rstd, ws, bs, layout: LearnerLayout, cd, x_dtype,
                     param_grads, wrap, eps=0.0, x=None, norm_weight=None):
    U, J, H, D, G = layout.units, layout.glus, layout.hidden, layout.d, layout.G
    N = gout.shape[0]
    gx = torch.empty((N, D), dtype=x_dtype, device=gout.device)
    if N == 0:
        return gx, W12.new_zeros(layout.total if param_grads else 0)
    prec = _dot_precision(cd)
    with _on_device(gout):
        if ws.numel() == 0 or ws.dtype != cd:  # (a forward that did not run the kernels)
            ws, bs = _stage_weights(W12, W3, B12, layout, cd, wrap)
        hp = ws.shape[2]
        bm, bh, warps, stages = _row_config("bwd_rows", N, D, gout.device)
        row_programs = triton.cdiv(N, bm)
        gys = gout.new_empty((G, N, D), dtype=cd) if param_grads else gx
        up = U + layout.norm_in  # (LayerNorms with partial sums: the units', then the input one's)
        lnpart = gout.new_empty((row_programs, up, 2, D), dtype=torch.float32) if param_grads else gx
        biases = bs if layout.bias else ws  # (not read without biases)
        kernel = wrap_triton(_learner_bwd_rows_kernel) if wrap else _learner_bwd_rows_kernel
        kernel[(row_programs,)](
            gout, gx, ws, biases, LNW, xins, zs, mean, rstd, gys, lnpart, gout if x is None else x,
            LNW if norm_weight is None else norm_weight, N, U, J, up,
            D=D, HP=hp, BLOCK_M=bm, BLOCK_H=bh, HAS_BIAS=layout.bias, PARAM_GRADS=param_grads, CD=_TL_DTYPES[cd],
            PREC=prec, NORM_IN=layout.norm_in, EPS=float(eps), num_warps=warps, num_stages=stages,
        )
        if not param_grads:
            return gx, W12.new_empty(0)
        bm, bh, warps, stages = _kernel_configs(gout.device)["bwd_params"]
        tiles = G * (hp // bh) + 1  # + the LayerNorm program
        row_blocks = triton.cdiv(N, bm)
        splits = PARAM_GRAD_SPLITS or triton.cdiv(PARAM_GRAD_WAVES * _sm_count(gout.device), tiles)
        splits = max(1, min(splits, row_blocks))
        rows_per_split = triton.cdiv(row_blocks, splits) * bm
        splits = triton.cdiv(N, rows_per_split)
        part = torch.empty((splits, layout.total), dtype=torch.float32, device=gout.device)
        kernel = wrap_triton(_learner_bwd_params_kernel) if wrap else _learner_bwd_params_kernel
        kernel[(tiles, splits)](
            xins, gys, ws, biases, lnpart, part, N, H, U, J, up, row_programs, rows_per_split,
            triton.cdiv(row_programs, splits), layout.total,
            D=D, HP=hp, BLOCK_M=bm, BLOCK_H=bh, BLOCK_P=16, HAS_BIAS=layout.bias, CD=_TL_DTYPES[cd], PREC=prec,
            num_warps=warps, num_stages=stages,
        )
    flat = part.view(-1) if splits == 1 else part.sum(0)
    return gx, flat.to(W12.dtype)


# ----------------------------------------------------------------------------------------------------------------------
# The operators
# ----------------------------------------------------------------------------------------------------------------------
def _forward(x, w12, w3, b12, b3, ln_w, ln_b, layout, eps, compute_dtype, out_dtype, save, wrap, norm=None):
    """The learner (of sizes ``layout``, which the caller checked) on rows x [N, d] (with ``norm`` = (weight, bias) [d],
    on the rows after that LayerNorm, of eps
    ``eps`` too, as the model's LayerNorm of A). Returns the output [N, d] (``out_dtype``) and, with ``save``, what the
    backward needs: each GLU's input [G, N, d] (``compute_dtype``), each unit's pre-LayerNorm sum [U, N, d] with its
    mean and reciprocal standard deviation [U, N] (float32), and the kernels' staged weights and biases
    (:func:`_stage_weights`; empty on the reference path); without ``save`` these are empty (the backward also takes
    x itself with ``norm``). ``wrap``: launch the kernels through ``wrap_triton`` (inside the operator, so that
    torch.compile traces them)."""
    _check_norm(x, norm)
    args = [t if t is None else t.contiguous() for t in (x, w12, w3, b12, b3, ln_w, ln_b)]
    norm = None if norm is None else tuple(t.contiguous() for t in norm)
    if norm is not None:
        layout = dataclasses.replace(layout, norm_in=True)
    if _use_kernels(args[0], args[1], layout, compute_dtype) and _norm_kernels(args[0], norm):
        return _kernel_forward(*args, layout, eps, compute_dtype, out_dtype, save, wrap, norm)
    with torch.autocast(x.device.type, enabled=False):
        return _reference_forward(*args, layout, eps, compute_dtype, out_dtype, save, norm)


def _fwd_impl(
    x: torch.Tensor, weights: torch.Tensor, norms: torch.Tensor, norm_weight: torch.Tensor | None,
    norm_bias: torch.Tensor | None, units: int, glus: int, hidden: int, eps: float, compute_dtype: torch.dtype,
    out_dtype: torch.dtype, save: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``pldr::metric_learner_fwd``: :func:`_forward` on the flat parameters (:func:`pack_learner`), after the input
    LayerNorm where ``norm_weight`` and ``norm_bias`` are given, with its kernels visible to torch.compile."""
    layout = _check_flat(x, weights, norms, units, glus, hidden)
    return _forward(x, *layout.unpack_pair(weights, norms), layout, eps, compute_dtype, out_dtype, save,
                    _TRACEABLE_KERNELS, _norm_pair(norm_weight, norm_bias))


def _norm_pair(norm_weight, norm_bias):
    if (norm_weight is None) != (norm_bias is None):
        raise ValueError("metric learner: give the input LayerNorm's weight and bias, or neither")
    return None if norm_weight is None else (norm_weight, norm_bias)


def _fwd_fake(x, weights, norms, norm_weight, norm_bias, units, glus, hidden, eps, compute_dtype, out_dtype, save):
    layout = _check_flat(x, weights, norms, units, glus, hidden)
    _check_norm(x, _norm_pair(norm_weight, norm_bias))
    N, d = x.shape
    U = layout.units
    out = x.new_empty((N, d), dtype=out_dtype)
    f32 = _wide_dtype(compute_dtype)
    # (opaque operators run without Triton, so on the reference path: no staged weights)
    staged = (x.new_empty(0, dtype=compute_dtype), x.new_empty(0, dtype=torch.float32))
    if not save:
        return (out, x.new_empty(0, dtype=compute_dtype), x.new_empty(0, dtype=f32), x.new_empty(0, dtype=f32),
                x.new_empty(0, dtype=f32), *staged)
    return (out, x.new_empty((layout.G, N, d), dtype=compute_dtype), x.new_empty((U, N, d), dtype=f32),
            x.new_empty((U, N), dtype=f32), x.new_empty((U, N), dtype=f32), *staged)


def _backward_math(grad_out, w12, w3, b12, b3, ln_w, ln_b, xins, zs, mean, rstd, ws, bs, layout, eps, compute_dtype,
                   x_dtype, param_grads, wrap, x=None, norm=None):
    """Gradient of the rows (``x_dtype``) and, with ``param_grads``, of the parameters as one flat tensor in their
    dtype, laid out as :class:`LearnerLayout` says (else empty); with ``norm`` (the input LayerNorm, which also needs
    the rows x), the gradient of x and the flat tensor with the LayerNorm's weight and bias gradients last. ``layout``:
    the learner's sizes, which the caller checked."""
    N, d = grad_out.shape
    if xins.shape != (layout.G, N, d) or zs.shape != (layout.units, N, d) or mean.shape != (layout.units, N):
        raise ValueError("metric learner backward: the saved tensors do not match the rows and the learner's sizes")
    if norm is not None:
        if x is None or tuple(x.shape) != (N, d):
            raise ValueError("metric learner backward: the input LayerNorm needs the rows x [N, d]")
        _check_norm(x, norm)
        layout = dataclasses.replace(layout, norm_in=True)
        x, norm = x.contiguous(), tuple(t.contiguous() for t in norm)
    grad_out = grad_out.contiguous()
    if _use_kernels(grad_out, w12, layout, compute_dtype) and (norm is None or _norm_kernels(x, norm)):
        return _kernel_backward(grad_out, w12.contiguous(), w3.contiguous(), None if b12 is None else b12.contiguous(),
                                ln_w.contiguous(), xins, zs, mean, rstd, ws, bs, layout, compute_dtype, x_dtype,
                                param_grads, wrap, eps, x, None if norm is None else norm[0])
    with torch.autocast(grad_out.device.type, enabled=False):
        return _reference_backward(grad_out, w12, w3, b12, b3, ln_w, ln_b, xins, zs, mean, rstd, layout, eps,
                                   compute_dtype, x_dtype, param_grads, x, norm)


def _bwd_impl(
    grad_out: torch.Tensor, x: torch.Tensor | None, weights: torch.Tensor, norms: torch.Tensor,
    norm_weight: torch.Tensor | None, norm_bias: torch.Tensor | None, units: int, glus: int, hidden: int,
    xins: torch.Tensor, zs: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, ws: torch.Tensor, bs: torch.Tensor,
    eps: float, compute_dtype: torch.dtype, x_dtype: torch.dtype, param_grads: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``pldr::metric_learner_bwd``: :func:`_backward_math` on the flat parameters (the rows x are read only with the
    input LayerNorm), with its kernels visible to torch.compile. The parameters' gradient is one flat tensor, the
    weights' part first, the input LayerNorm's last (:class:`LearnerLayout`)."""
    layout = _check_flat(grad_out, weights, norms, units, glus, hidden)
    return _backward_math(grad_out, *layout.unpack_pair(weights, norms), xins, zs, mean, rstd, ws, bs, layout, eps,
                          compute_dtype, x_dtype, param_grads, _TRACEABLE_KERNELS, x, _norm_pair(norm_weight, norm_bias))


def _bwd_fake(grad_out, x, weights, norms, norm_weight, norm_bias, units, glus, hidden, xins, zs, mean, rstd, ws, bs,
              eps, compute_dtype, x_dtype, param_grads):
    layout = _check_flat(grad_out, weights, norms, units, glus, hidden)
    total = layout.total + (2 * layout.d if norm_weight is not None else 0)
    return grad_out.new_empty(grad_out.shape, dtype=x_dtype), weights.new_empty(total if param_grads else 0)


def _setup_context(ctx, inputs, output):
    x, weights, norms, norm_weight, norm_bias, units, glus, hidden, eps, compute_dtype, out_dtype, save = inputs
    _, xins, zs, mean, rstd, ws, bs = output
    # (x itself only for the input LayerNorm's backward)
    ctx.save_for_backward(None if norm_weight is None else x, weights, norms, norm_weight, norm_bias, xins, zs, mean,
                          rstd, ws, bs)
    ctx.options = (units, glus, hidden, eps, compute_dtype, x.dtype, save)
    ctx.mark_non_differentiable(xins, zs, mean, rstd, ws, bs)


def _split_param_grads(flat, needs, weights, norms) -> list:
    """The gradients of the flat weights and norms and of the input LayerNorm's weight and bias (the flat tensor's
    last two equal parts, where it has them) from the backward's one flat tensor: views of it, None where ``needs``
    (four flags) says no."""
    n, m = weights.numel(), norms.numel()
    d = (flat.numel() - n - m) // 2
    parts = [flat[:n], flat[n:n + m], flat[n + m:n + m + d], flat[n + m + d:]]
    return [part if need else None for part, need in zip(parts, needs)]


def _backward(ctx, grad_out, *_):
    x, weights, norms, norm_weight, norm_bias, xins, zs, mean, rstd, ws, bs = ctx.saved_tensors
    units, glus, hidden, eps, compute_dtype, x_dtype, save = ctx.options
    if not save:
        raise RuntimeError("pldr::metric_learner_fwd ran with save=False, so it cannot be differentiated; call it with "
                           "save=True when gradients are needed (fused_metric_learner does)")
    needs = ctx.needs_input_grad[1:5]  # (the input LayerNorm's: False without it)
    gx, flat = torch.ops.pldr.metric_learner_bwd(grad_out, x, weights, norms, norm_weight, norm_bias, units, glus,
                                                 hidden, xins, zs, mean, rstd, ws, bs, eps, compute_dtype, x_dtype,
                                                 any(needs))
    return gx, *_split_param_grads(flat, needs, weights, norms), None, None, None, None, None, None, None


def _define_ops(name: str, fwd_impl, bwd_impl, fwd_fake, bwd_fake, backward, setup_context):
    """Defines the operators ``pldr::{name}_fwd`` (differentiable through ``backward``) and ``pldr::{name}_bwd`` once
    per process (the file may be imported twice, e.g. installed and as remote code: the first definition serves both).
    With Triton they are ``triton_op``s, whose own implementation, traced with fake tensors, is their fake
    implementation; else opaque custom operators with the given fake implementations."""
    try:
        return getattr(torch.ops.pldr, f"{name}_fwd").default, getattr(torch.ops.pldr, f"{name}_bwd").default
    except (AttributeError, RuntimeError):
        pass
    if _TRACEABLE_KERNELS:
        fwd = torch.library.triton_op(f"pldr::{name}_fwd", fwd_impl, mutates_args=())
        bwd = torch.library.triton_op(f"pldr::{name}_bwd", bwd_impl, mutates_args=())
    else:
        fwd = torch.library.custom_op(f"pldr::{name}_fwd", fwd_impl, mutates_args=())
        fwd.register_fake(fwd_fake)
        bwd = torch.library.custom_op(f"pldr::{name}_bwd", bwd_impl, mutates_args=())
        bwd.register_fake(bwd_fake)
    fwd.register_autograd(backward, setup_context=setup_context)
    return getattr(torch.ops.pldr, f"{name}_fwd").default, getattr(torch.ops.pldr, f"{name}_bwd").default


metric_learner_fwd, metric_learner_bwd = _define_ops("metric_learner", _fwd_impl, _bwd_impl, _fwd_fake, _bwd_fake,
                                                      _backward, _setup_context)


# ----------------------------------------------------------------------------------------------------------------------
# The power law step that follows the learner: A_LM = iSwiGLU(W A + b) + eps, G_LM = a (A_LM ** p) + ba, per head
# ----------------------------------------------------------------------------------------------------------------------
A_LM_EPSILON = 1e-9
# Dot precision of the power law's kernels (float32 operands): "tf32x3" (three TF32 tensor-core passes, float32
# accuracy) or "ieee" (CUDA cores, far slower; see the kernels).
POWER_LAW_PRECISION = "tf32x3"


def _power_law_terms(A, W, b, p):
    """``z = W A + b``, ``A_LM = z silu(z) + eps`` and ``P = A_LM ** p`` (no autocast)."""
    with torch.autocast(device_type=A.device.type, enabled=False):
        z = torch.matmul(W, A) + b
        A_LM = z * F.silu(z) + A_LM_EPSILON
        return z, A_LM, torch.pow(A_LM, p)


def power_law_reference(A, W, b, p, a, ba):
    """The power law step's forward in plain PyTorch: ``z``, ``A_LM``, ``P = A_LM ** p`` and ``G_LM = a P + ba``
    (no autocast). A [..., H, d, d], the parameters [H, d, d]."""
    z, A_LM, P = _power_law_terms(A, W, b, p)
    with torch.autocast(device_type=A.device.type, enabled=False):
        return z, A_LM, P, torch.matmul(a, P) + ba


def _batch_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over the leading (batch) dimensions of t [..., H, d, d]: the gradient of a [H, d, d] parameter broadcast
    over them."""
    return t.sum(dim=tuple(range(t.dim() - 3))) if t.dim() > 3 else t


def _power_law_reference_backward(g_A_LM, g_G, A, W, b, p, a, param_grads: bool):
    """Gradients of A and (with ``param_grads``) of W, b, p, a, ba stacked [5, H, d, d], from the recomputed forward:

    ``dP = a^T dG``, ``dA_LM += p A_LM^(p-1) dP``, ``dp = sum dP P log(A_LM)``,
    ``dz = dA_LM (silu(z) + z silu'(z))``, ``dA = W^T dz``, ``dW = sum dz A^T``, ``db = sum dz``, ``da = sum dG P^T``,
    ``dba = sum dG``."""
    z, A_LM, P = _power_law_terms(A, W, b, p)
    with torch.autocast(device_type=A.device.type, enabled=False):
        g_AL = torch.zeros_like(A_LM) if g_A_LM is None else g_A_LM
        gp = ga = gba = torch.zeros_like(W)
        if g_G is not None:
            gP = torch.matmul(a.transpose(-1, -2), g_G)
            g_AL = g_AL + gP * p * torch.pow(A_LM, p - 1)
            if param_grads:
                gp = _batch_sum(gP * P * torch.log(A_LM))
                ga = _batch_sum(torch.matmul(g_G, P.transpose(-1, -2)))
                gba = _batch_sum(g_G)
        sig = torch.sigmoid(z)
        gz = g_AL * (z * sig * (2.0 + z * (1.0 - sig)))  # d/dz z silu(z) = silu(z) + z silu'(z)
        gA = torch.matmul(W.transpose(-1, -2), gz)
        if not param_grads:
            return gA, W.new_empty(0)
        gW = _batch_sum(torch.matmul(gz, A.transpose(-1, -2)))
        return gA, torch.stack((gW, _batch_sum(gz), gp, ga, gba))


if triton is not None:

    # The d x d x d products run on the tensor cores in three TF32 passes ("tf32x3": float32 accuracy). Plain float32
    # ("ieee") products run on the CUDA cores, with each thread holding whole rows and columns of the operands: some
    # 100x slower at d = 64 (measured on an H100: 0.78 ms for the forward at batch 16 x 14 heads).
    @triton.jit
    def _power_law_fwd_kernel(A, W, B, PW, CA, BA, A_LM, G, H, D: tl.constexpr, EPS: tl.constexpr,
                              PREC: tl.constexpr):
        # One program per (batch entry, head): two d x d x d products and the elementwise steps between. 16-bit inputs
        # are widened to float32 as they are read (exactly; see power_law_forward).
        pid = tl.program_id(0)
        r = tl.arange(0, D)
        offs = r[:, None] * D + r[None, :]
        own = pid * D * D + offs
        par = (pid % H) * D * D + offs
        f32 = tl.float32
        z = (tl.dot(tl.load(W + par).to(f32), tl.load(A + own).to(f32), input_precision=PREC)
             + tl.load(B + par).to(f32))
        alm = z * (z * tl.sigmoid(z)) + EPS
        tl.store(A_LM + own, alm)
        pw = tl.exp2(tl.load(PW + par).to(f32) * tl.log2(alm))  # A_LM ** p (A_LM > 0)
        tl.store(G + own, tl.dot(tl.load(CA + par).to(f32), pw, input_precision=PREC) + tl.load(BA + par).to(f32))

    @triton.jit
    def _power_law_bwd_kernel(GAL, GG, A, W, B, PW, CA, GA, PART, H, D: tl.constexpr, EPS: tl.constexpr,
                              HAS_GAL: tl.constexpr, HAS_GG: tl.constexpr, PARAM_GRADS: tl.constexpr,
                              PREC: tl.constexpr, BLOCK_C: tl.constexpr):
        # One program per (batch entry n, head h): recomputes the forward, writes dA and, with PARAM_GRADS, this
        # entry's share of the five parameter gradients into PART [N, 5, H, d, d] (summed over N afterwards). It walks
        # the d x d tiles in column blocks of BLOCK_C: every step but dW = sum dz A^T and da = sum dG P^T is
        # column-wise, and those two are accumulated over the blocks. (Whole d x d tiles at once kept some 16 of them
        # live, beyond the registers: 440 spilled registers, 83 us a layer at batch 16 x 14 heads on an H200.)
        pid = tl.program_id(0)
        n = pid // H
        h = pid % H
        r = tl.arange(0, D)
        offs = r[:, None] * D + r[None, :]
        par = h * D * D
        own = pid * D * D
        out = PART + (n * 5 * H + h) * D * D
        step = H * D * D
        if PARAM_GRADS:
            g_w = tl.zeros([D, D], dtype=tl.float32)
            g_a = tl.zeros([D, D], dtype=tl.float32)  # (stays zero without a gradient of G_LM)
        for c0 in tl.range(0, D, BLOCK_C):  # (a loop, not unrolled: one block's tiles live at a time)
            w = tl.load(W + par + offs)  # (reloaded per block, from cache: fewer live registers)
            cofs = r[:, None] * D + (c0 + tl.arange(0, BLOCK_C))[None, :]
            x = tl.load(A + own + cofs)
            z = tl.dot(w, x, input_precision=PREC) + tl.load(B + par + cofs)
            sig = tl.sigmoid(z)
            alm = z * (z * sig) + EPS
            dz = z * sig * (2.0 + z * (1.0 - sig))  # d/dz z silu(z) = silu(z) + z silu'(z)
            if HAS_GAL:
                gal = tl.load(GAL + own + cofs)
            else:
                gal = tl.zeros([D, BLOCK_C], dtype=tl.float32)
            if HAS_GG:
                gg = tl.load(GG + own + cofs)
                pexp = tl.load(PW + par + cofs)
                pw = tl.exp2(pexp * tl.log2(alm))
                gpw = tl.dot(tl.trans(tl.load(CA + par + offs)), gg, input_precision=PREC)
                if PARAM_GRADS:
                    tl.store(out + 4 * step + cofs, gg)
                    tl.store(out + 2 * step + cofs, gpw * pw * tl.log(alm))
                    g_a = tl.dot(gg, tl.trans(pw), g_a, input_precision=PREC)
                gal += gpw * pexp * pw / alm  # p A_LM^(p-1) dP
            elif PARAM_GRADS:
                zero = tl.zeros([D, BLOCK_C], dtype=tl.float32)
                tl.store(out + 2 * step + cofs, zero)
                tl.store(out + 4 * step + cofs, zero)
            gz = gal * dz
            tl.store(GA + own + cofs, tl.dot(tl.trans(w), gz, input_precision=PREC))
            if PARAM_GRADS:
                g_w = tl.dot(gz, tl.trans(x), g_w, input_precision=PREC)
                tl.store(out + step + cofs, gz)
        if PARAM_GRADS:
            tl.store(out + offs, g_w)
            tl.store(out + 3 * step + offs, g_a)


_NARROW = (torch.bfloat16, torch.float16)


def _power_law_kernels(A: torch.Tensor, params: torch.Tensor, narrow: bool = False) -> bool:
    """Whether the power law's Triton kernels take this call: CUDA (or the interpreter on CPU), float32 (with
    ``narrow``, the forward's case, also 16-bit A and parameters), A [..., H, d, d] with the parameters [5, H, d, d]
    and d a power of two in [16, 128], offsets within 32 bits."""
    if triton is None or not (A.device.type == "cuda" or (A.device.type == "cpu" and _KERNELS_ON_CPU)):
        return False
    floats = (torch.float32, *_NARROW) if narrow else (torch.float32,)
    return (A.dtype in floats and params.dtype in floats and A.dim() >= 3 and params.dim() == 4
            and tuple(A.shape[-3:]) == tuple(params.shape[1:]) and params.shape[-1] == params.shape[-2]
            and params.shape[-1] in (16, 32, 64, 128)
            and 5 * A.numel() < 2**31)


def _check_power_law(A, params):
    if not isinstance(params, torch.Tensor) or params.dim() != 4 or params.shape[0] != 5 or A.dim() < 3 or \
            tuple(A.shape[-3:]) != tuple(params.shape[1:]) or params.shape[-1] != params.shape[-2]:
        shape = tuple(params.shape) if isinstance(params, torch.Tensor) else type(params).__name__
        raise ValueError(f"power law: expected A [..., H, d, d] and its parameters W, b, p, a, ba stacked "
                         f"[5, H, d, d], got A {tuple(A.shape)} and parameters {shape}")


def power_law_forward(A, params, wrap: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(A_LM, G_LM) of A [..., H, d, d] and the parameters W, b, p, a, ba stacked [5, H, d, d]: one Triton kernel where
    :func:`_power_law_kernels` says so, else :func:`power_law_reference`. In float32, or in the inputs' dtype when they
    share a wider one (float64): 16-bit or mixed inputs are computed as their float32 values (the kernel widens 16-bit
    ones as it reads them, which is exact: no cast kernels before it)."""
    _check_power_law(A, params)
    if not _power_law_kernels(A, params, narrow=True):
        if A.dtype != params.dtype or A.dtype in _NARROW:
            A, params = A.float(), params.float()
        _, A_LM, _, G_LM = power_law_reference(A, *params)
        return A_LM, G_LM
    x = A.contiguous()
    W, b, p, a, ba = params.contiguous()
    A_LM, G_LM = torch.empty_like(x, dtype=torch.float32), torch.empty_like(x, dtype=torch.float32)
    H, d = W.shape[0], W.shape[-1]
    programs = x.numel() // (d * d)
    if programs:
        with _on_device(x):
            kernel = wrap_triton(_power_law_fwd_kernel) if wrap else _power_law_fwd_kernel
            kernel[(programs,)](x, W, b, p, a, ba, A_LM, G_LM, H, D=d, EPS=A_LM_EPSILON, PREC=POWER_LAW_PRECISION,
                                num_warps=4)
    return A_LM, G_LM


def power_law_backward(g_A_LM, g_G, A, params, param_grads: bool, wrap: bool = False):
    """Gradient of A and, with ``param_grads``, of the parameters W, b, p, a, ba stacked [5, H, d, d] as ``params``
    (else empty), for output gradients g_A_LM and g_G (either may be None; the rows of p, a and ba are zero without
    g_G)."""
    if not _power_law_kernels(A, params):
        return _power_law_reference_backward(g_A_LM, g_G, A, *params[:4], param_grads)
    x = A.contiguous()
    W, b, p, a, _ = params.contiguous()
    H, d = W.shape[0], W.shape[-1]
    programs = x.numel() // (d * d)
    N = programs // H
    gA = torch.empty_like(x)
    if not programs:
        return gA, W.new_zeros((5, H, d, d) if param_grads else (0,))
    part = x.new_empty((N, 5, H, d, d)) if param_grads else gA
    gal = gA if g_A_LM is None else g_A_LM.contiguous()  # (not read without it)
    gg = gA if g_G is None else g_G.contiguous()
    config = _kernel_configs(x.device)["power_law_bwd"]
    with _on_device(x):
        kernel = wrap_triton(_power_law_bwd_kernel) if wrap else _power_law_bwd_kernel
        kernel[(programs,)](gal, gg, x, W, b, p, a, gA, part, H, D=d, EPS=A_LM_EPSILON, HAS_GAL=g_A_LM is not None,
                            HAS_GG=g_G is not None, PARAM_GRADS=param_grads, PREC=POWER_LAW_PRECISION,
                            BLOCK_C=min(d, config[0]), num_warps=config[1])
    if not param_grads:
        return gA, W.new_empty(0)
    return gA, part[0] if N == 1 else part.sum(0)


def _pl_fwd_impl(A: torch.Tensor, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``pldr::power_law_fwd``: :func:`power_law_forward` with its kernel visible to torch.compile."""
    return power_law_forward(A, params, _TRACEABLE_KERNELS)


def _pl_bwd_impl(
    g_A_LM: torch.Tensor | None, g_G: torch.Tensor | None, A: torch.Tensor, params: torch.Tensor, param_grads: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``pldr::power_law_bwd``: :func:`power_law_backward` with its kernel visible to torch.compile."""
    return power_law_backward(g_A_LM, g_G, A, params, param_grads, _TRACEABLE_KERNELS)


def _pl_fwd_fake(A, params):
    _check_power_law(A, params)
    return torch.empty_like(A, memory_format=torch.contiguous_format), torch.empty_like(
        A, memory_format=torch.contiguous_format)


def _pl_bwd_fake(g_A_LM, g_G, A, params, param_grads):
    return (torch.empty_like(A, memory_format=torch.contiguous_format),
            params.new_empty(params.shape if param_grads else (0,)))


def _pl_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _pl_backward(ctx, g_A_LM, g_G):
    needs = ctx.needs_input_grad[:2]
    gA, flat = torch.ops.pldr.power_law_bwd(g_A_LM, g_G, *ctx.saved_tensors, needs[1])
    return gA if needs[0] else None, flat if needs[1] else None


power_law_fwd, power_law_bwd = _define_ops("power_law", _pl_fwd_impl, _pl_bwd_impl, _pl_fwd_fake, _pl_bwd_fake,
                                           _pl_backward, _pl_setup_context)


class PowerLawFunction(torch.autograd.Function):
    """The power law step as one autograd node for eager mode (float32 in, float32 out; no custom operator dispatch):
    the forward and backward run one Triton kernel each on CUDA (plus one sum of the parameter gradients over the
    batch), else the same math in PyTorch (the backward recomputes the forward from A: a third of autograd's
    operations on these tiny [batch, H, d, d] tensors). Differentiable twice: a backward with ``create_graph=True``
    runs the PyTorch ops."""

    @staticmethod
    def forward(ctx, A, params):
        A_LM, G_LM = power_law_forward(A, params)
        ctx.save_for_backward(A, params)
        ctx.set_materialize_grads(False)
        return A_LM, G_LM

    @staticmethod
    def backward(ctx, g_A_LM, g_G):
        needs = ctx.needs_input_grad
        if g_A_LM is None and g_G is None:
            return None, None
        A, params = ctx.saved_tensors
        if torch.is_grad_enabled():
            # (a backward that builds a graph, for second derivatives, takes the PyTorch ops: the kernel's results
            # would enter that graph as constants)
            gA, flat = _power_law_reference_backward(g_A_LM, g_G, A, *params[:4], needs[1])
        else:
            gA, flat = power_law_backward(g_A_LM, g_G, A, params, needs[1])
        return gA if needs[0] else None, flat if needs[1] else None


def power_law(A, params) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A_LM, G_LM)`` of the power law step for A [..., H, d, d] and its parameters W, b, p, a, ba stacked
    [5, H, d, d] (the model stores them so), all float32: one operator (one Triton kernel forward, one backward on
    CUDA) in eager mode, under torch.compile and without gradients. The parameters' gradient is one [5, H, d, d]
    tensor."""
    _check_power_law(A, params)
    if torch.compiler.is_compiling():
        if _power_law_kernels(A, params):
            return torch.ops.pldr.power_law_fwd(A, params)
        # (elsewhere inductor derives the backward from the ops; PyTorch 2.11's dynamo also fails to trace the
        # autograd function with dynamic shapes)
        _, A_LM, _, G_LM = power_law_reference(A, *params)
        return A_LM, G_LM
    if torch.is_grad_enabled() and (A.requires_grad or params.requires_grad):
        return PowerLawFunction.apply(A, params)
    return power_law_forward(A, params)


def _recomputed_grads(reference, inputs, needs, grad_out) -> list:
    """The gradients of ``reference(*inputs)`` (an operator's forward in PyTorch ops) with respect to the inputs that
    ``needs`` marks (None for the others and for None inputs), as a graph that autograd can differentiate again: the
    backward of an autograd function called with ``create_graph=True``, for second derivatives. Its kernels' results
    would enter that graph as constants, silently dropping terms."""
    wanted = [t for t, need in zip(inputs, needs) if need and t is not None]
    with torch.enable_grad():
        found = iter(torch.autograd.grad(reference(*inputs), wanted, grad_out, create_graph=True, allow_unused=True))
    return [next(found) if need and t is not None else None for t, need in zip(inputs, needs)]


# ----------------------------------------------------------------------------------------------------------------------
# The FFN's SwiGLU on its joint W1|W2 output: silu(h1) * h2 for h12 = [h1 | h2]
# ----------------------------------------------------------------------------------------------------------------------
# The FFN (PldrGLU) multiplies its input with W1 and W2 as one GEMM, whose output h12 holds h1 and h2 side by side.
# The gradient of h12 is then one tensor too. Left to inductor, its fused backward kernel computes each element of that
# gradient on its own (a masked "cat" of the two halves' formulas: every lane evaluates both), so each pair (h1, h2)
# had its sigmoid computed four times instead of once: 157 us a layer at 16 x 1024 tokens on an H200 (bf16, the FFN
# alone, compiled), the aligned Llama's kernel (two outputs, no cat) 94 us. With the halves interleaved instead (W1's
# row i, then W2's) it took 170 us: the same masked formulas. The backward kernel here takes one pair per element and
# writes both halves of the gradient: 98.5 us there (its forward: 57.8 us, inductor's 54.3 us).
# (BLOCK_R rows, BLOCK_C columns of one half, num_warps: chosen, not swept)
SWIGLU_CONFIG = (16, 128, 4)


if triton is not None:

    @triton.jit
    def _swiglu_fwd_kernel(h_ptr, out_ptr, rows, H, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask = (r[:, None] < rows) & (c[None, :] < H)
        r64 = r[:, None].to(tl.int64)
        h1 = tl.load(h_ptr + r64 * (2 * H) + c[None, :], mask=mask, other=0.0).to(tl.float32)
        h2 = tl.load(h_ptr + r64 * (2 * H) + H + c[None, :], mask=mask, other=0.0).to(tl.float32)
        y = h1 * tl.sigmoid(h1) * h2
        tl.store(out_ptr + r64 * H + c[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_bwd_kernel(g_ptr, h_ptr, dh_ptr, rows, H, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask = (r[:, None] < rows) & (c[None, :] < H)
        r64 = r[:, None].to(tl.int64)
        at1 = r64 * (2 * H) + c[None, :]
        g = tl.load(g_ptr + r64 * H + c[None, :], mask=mask, other=0.0).to(tl.float32)
        h1 = tl.load(h_ptr + at1, mask=mask, other=0.0).to(tl.float32)
        h2 = tl.load(h_ptr + at1 + H, mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(h1)
        # d/dh1 silu(h1) = sig (1 + h1 (1 - sig)), as aten.silu_backward
        tl.store(dh_ptr + at1, (g * h2 * sig * (1.0 + h1 * (1.0 - sig))).to(dh_ptr.dtype.element_ty), mask=mask)
        tl.store(dh_ptr + at1 + H, (g * h1 * sig).to(dh_ptr.dtype.element_ty), mask=mask)


def _swiglu_kernels(h12: torch.Tensor) -> bool:
    """Whether the SwiGLU's Triton kernels take h12 (of a shape that :func:`_check_swiglu` accepts): CUDA (or the
    interpreter on CPU) and a float dtype."""
    return (triton is not None and (h12.device.type == "cuda" or (h12.device.type == "cpu" and _KERNELS_ON_CPU))
            and h12.dtype in (torch.float32, torch.bfloat16, torch.float16))


def _check_swiglu(h12: torch.Tensor, g: torch.Tensor | None = None):
    if h12.dim() < 1 or h12.shape[-1] % 2:
        raise ValueError(f"swiglu: expected h12 [..., 2 * hidden] (h1 and h2 side by side), got {tuple(h12.shape)}")
    if g is not None and tuple(g.shape) != (*h12.shape[:-1], h12.shape[-1] // 2):
        raise ValueError(f"swiglu: expected the output gradient [..., hidden] = {(*h12.shape[:-1], h12.shape[-1] // 2)}"
                         f" for h12 {tuple(h12.shape)}, got {tuple(g.shape)}")


def _swiglu_launch(kernel, rows: int, H: int, *args, wrap: bool):
    block_r, block_c, warps = SWIGLU_CONFIG
    if rows and H:
        with _on_device(args[0]):
            (wrap_triton(kernel) if wrap else kernel)[(triton.cdiv(rows, block_r), triton.cdiv(H, block_c))](
                *args, rows, H, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=warps)


def _swiglu_reference(h12: torch.Tensor) -> torch.Tensor:
    h1, h2 = h12.chunk(2, dim=-1)
    return F.silu(h1) * h2


def swiglu_forward(h12: torch.Tensor, wrap: bool = False) -> torch.Tensor:
    """``silu(h1) * h2`` for h12 = [h1 | h2] on the last dimension, in h12's dtype (float32 math in the kernel)."""
    _check_swiglu(h12)
    if not _swiglu_kernels(h12):
        return _swiglu_reference(h12)
    x = h12.contiguous()
    H = x.shape[-1] // 2
    out = x.new_empty((*x.shape[:-1], H))
    _swiglu_launch(_swiglu_fwd_kernel, x.numel() // (2 * H) if H else 0, H, x, out, wrap=wrap)
    return out


def swiglu_backward(g: torch.Tensor, h12: torch.Tensor, wrap: bool = False) -> torch.Tensor:
    """Gradient of h12 for the output gradient g of :func:`swiglu_forward`, in h12's dtype."""
    _check_swiglu(h12, g)
    if not _swiglu_kernels(h12):
        h1, h2 = h12.chunk(2, dim=-1)
        return torch.cat((torch.ops.aten.silu_backward(g * h2, h1), g * F.silu(h1)), dim=-1)
    x, gc = h12.contiguous(), g.contiguous()
    H = x.shape[-1] // 2
    dh = torch.empty_like(x)
    _swiglu_launch(_swiglu_bwd_kernel, x.numel() // (2 * H) if H else 0, H, gc, x, dh, wrap=wrap)
    return dh


def _sw_fwd_impl(h12: torch.Tensor) -> torch.Tensor:
    """``pldr::swiglu_fwd``: :func:`swiglu_forward` with its kernel visible to torch.compile."""
    return swiglu_forward(h12, _TRACEABLE_KERNELS)


def _sw_bwd_impl(g: torch.Tensor, h12: torch.Tensor) -> torch.Tensor:
    """``pldr::swiglu_bwd``: :func:`swiglu_backward` with its kernel visible to torch.compile."""
    return swiglu_backward(g, h12, _TRACEABLE_KERNELS)


def _sw_fwd_fake(h12):
    _check_swiglu(h12)
    return h12.new_empty((*h12.shape[:-1], h12.shape[-1] // 2))


def _sw_bwd_fake(g, h12):
    _check_swiglu(h12, g)
    return torch.empty_like(h12, memory_format=torch.contiguous_format)


def _sw_setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _sw_backward(ctx, g):
    return torch.ops.pldr.swiglu_bwd(g, *ctx.saved_tensors)


swiglu_fwd, swiglu_bwd = _define_ops("swiglu", _sw_fwd_impl, _sw_bwd_impl, _sw_fwd_fake, _sw_bwd_fake, _sw_backward,
                                     _sw_setup_context)


class SwiGLUFunction(torch.autograd.Function):
    """:func:`swiglu_forward` / :func:`swiglu_backward` as one autograd node for eager mode (no custom operator
    dispatch). Its backward kernel is not differentiable: a backward that builds a graph (``create_graph=True``, for
    second derivatives) takes the PyTorch ops instead."""

    @staticmethod
    def forward(ctx, h12):
        ctx.save_for_backward(h12)
        return swiglu_forward(h12)

    @staticmethod
    def backward(ctx, g):
        (h12,) = ctx.saved_tensors
        if torch.is_grad_enabled():
            return _recomputed_grads(_swiglu_reference, (h12,), (True,), g)[0]
        return swiglu_backward(g, h12)


def joint_swiglu(h12: torch.Tensor) -> torch.Tensor:
    """``silu(h1) * h2`` for h12 = [h1 | h2] on the last dimension: on CUDA one Triton kernel forward and one backward
    (one operator under torch.compile), elsewhere the PyTorch ops."""
    if not _swiglu_kernels(h12):
        return swiglu_forward(h12)
    if torch.compiler.is_compiling():
        return torch.ops.pldr.swiglu_fwd(h12)
    if torch.is_grad_enabled() and h12.requires_grad:
        return SwiGLUFunction.apply(h12)
    return swiglu_forward(h12)


# torch.bmm(..., out_dtype=) (PyTorch >= 2.8): 16-bit operands, float32 accumulation and result.
_BMM_OUT_DTYPE = "dtype" in torch.ops.aten.bmm.overloads()


def _widens(t: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether :func:`_widening_bmm` takes a 16-bit CUDA tensor t to ``dtype`` (float32)."""
    return _BMM_OUT_DTYPE and t.is_cuda and dtype == torch.float32 and t.dtype in (torch.bfloat16, torch.float16)


def _widening_bmm(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``a @ b`` for a, b [..., m, k] x [..., k, n] of one 16-bit dtype (see :func:`_widens`) as one tensor-core GEMM
    that accumulates and returns ``dtype`` (float32). Products of 16-bit values are exact in float32, so this is the
    float32 product of the same numbers up to the order of the sums, without float32 copies of the operands and the
    CUDA-core float32 GEMM (some 0.5 ms of a 16 x 1024 training step on an H100)."""
    out = torch.bmm(a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:]), out_dtype=dtype)
    return out.view(*a.shape[:-2], a.shape[-2], b.shape[-1])


def _gram(q: torch.Tensor, mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """``sum over positions s of mask_s q_s^T q_s`` in ``dtype`` (no autocast); q [B, H, S, d], mask [B, 1, S, 1]."""
    with torch.autocast(device_type=q.device.type, enabled=False):
        if _widens(q, dtype):
            masked = q if mask is None else q * mask.to(q.dtype)  # (mask: 0 or 1, exact in any dtype)
            return _widening_bmm(masked.transpose(-1, -2), q, dtype)
        qf = q.to(dtype)
        masked = qf if mask is None else qf * mask
        return torch.matmul(masked.transpose(-1, -2), qf)


# ----------------------------------------------------------------------------------------------------------------------
# The attention's rotary embedding on its joint q|k|v projection: q, k rotated, q, k, v in [batch, heads, seq, d]
# ----------------------------------------------------------------------------------------------------------------------
# With q, k and v from one GEMM (PldrAttention.project), the gradient of that GEMM's output is one [B, S, 3 H d] tensor
# assembled from dq (the attention's and q^T q's gradients summed), dk and dv, with the rotation undone on dq and dk.
# Left to inductor this was two kernels a layer: the rotation's backward on dq and dk, written out, and then a second
# pass that interleaved it with dv into the joint layout: 86 + 139 us a layer at 16 x 1024 tokens on an H200 (bf16,
# compiled training), against the 109 us GEMM that reads the result. The backward kernel here reads dq, dk and dv
# once and writes the joint gradient once. Its forward kernel writes q, k and v contiguous in [B, H, S, d] (the
# attention and q^T q take them so; an operator's outputs cannot be views of its input).
#
# The same operator can also take the metric sum of the rotated queries, A = sum_s mask_s q_s^T q_s in float32
# (rotary_qkv_metric_sum): forward the rotary kernel and the q^T q GEMM of the separate path (the same numbers), and
# backward one kernel that adds mask_s q_s (dA + dA^T) to dq in registers before undoing the rotation. As separate
# operators, backward a GEMM wrote q (dA + dA^T), an add summed it with the attention's dq, and the sum was read again:
# three more kernels a layer, each paying a launch.
ROTARY_BLOCK_S = 64  # positions per program (one program per block of positions, batch entry and head)


def rotary_swap(x: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """x with the two members of every rotated pair exchanged on the last dimension: (2i, 2i+1) with ``interleaved``
    (the original PLDR-LLM), else (i, i + d/2). The exchange is its own inverse."""
    if interleaved:
        return x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    return x.roll(x.shape[-1] // 2, dims=-1)


def apply_rotary_tables(x: torch.Tensor, cos_full: torch.Tensor, sin_signed: torch.Tensor, interleaved: bool):
    """Rotary embedding of x [batch, seq, heads, head_dim] in float32 (float64 for float64 x), cast back to x's dtype,
    from the tables of :func:`rotary_tables`: ``x * cos + swap(x) * signed_sin`` where swap exchanges the two members of
    every rotated pair: ``(x0 cos - x1 sin, x1 cos + x0 sin)``, the original's float ops. ``interleaved=True`` pairs
    (2i, 2i+1) (the original PLDR-LLM), otherwise (i, i + d/2) (``rotate_half``)."""
    xf = x if x.dtype == torch.float64 else x.float()  # (every decoding step: no dtype promotion on the host)
    swapped = rotary_swap(xf, interleaved)
    # Not addcmul: its fused multiply-add rounds differently from the original's separate products.
    return (xf * cos_full + swapped * sin_signed).to(x.dtype)


if triton is not None:

    @triton.jit
    def _rotary_pairs(x, BLOCK_S: tl.constexpr, D: tl.constexpr, INTERLEAVED: tl.constexpr):
        # the two members (a, b) of every rotated pair of the rows x [BLOCK_S, D], in registers (no gathers):
        # (2i, 2i+1) interleaved, else (i, i + D/2)
        if INTERLEAVED:
            a, b = tl.split(tl.reshape(x, [BLOCK_S, D // 2, 2]))
        else:
            a, b = tl.split(tl.permute(tl.reshape(x, [BLOCK_S, 2, D // 2]), (0, 2, 1)))
        return a, b

    @triton.jit
    def _rotary_rows(a, b, BLOCK_S: tl.constexpr, D: tl.constexpr, INTERLEAVED: tl.constexpr):
        # the rows [BLOCK_S, D] of the pairs (a, b): _rotary_pairs undone
        if INTERLEAVED:
            return tl.reshape(tl.join(a, b), [BLOCK_S, D])
        return tl.reshape(tl.permute(tl.join(a, b), (0, 2, 1)), [BLOCK_S, D])

    @triton.jit
    def _rotary_index(S, H, D: tl.constexpr, BLOCK_S: tl.constexpr):
        # This program's rows: the positions s of one batch entry b and head h. (Apart from the tables' loads: inductor
        # reads a kernel's writes from its Triton IR, and a store address computed from a call that also took the
        # tables' pointers would count the tables as written, which makes it copy them before every launch.)
        bh = tl.program_id(1)
        b = bh // H
        s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
        m = (s < S)[:, None]
        return bh.to(tl.int64), b.to(tl.int64), bh - b * H, s[:, None].to(tl.int64), tl.arange(0, D)[None, :], m

    @triton.jit
    def _rotary_tables(COS, SIN, b, s64, j, m, s_cb, s_cs, D: tl.constexpr, BLOCK_S: tl.constexpr,
                       INTERLEAVED: tl.constexpr):
        # The rows' pairs of the tables
        tab = b * s_cb + s64 * s_cs + j
        ca, cb = _rotary_pairs(tl.load(COS + tab, mask=m, other=0.0), BLOCK_S, D, INTERLEAVED)
        sa, sb = _rotary_pairs(tl.load(SIN + tab, mask=m, other=0.0), BLOCK_S, D, INTERLEAVED)
        return ca, cb, sa, sb

    @triton.jit
    def _rotated(x, ca, cb, sa, sb, BLOCK_S: tl.constexpr, D: tl.constexpr, INTERLEAVED: tl.constexpr):
        # Per pair (a, b) of the rows x: (a ca + b sa, b cb + a sb) in float32. With the tables x cos + swap(x) sin;
        # with sa and sb exchanged, its gradient dy cos + swap(dy sin) (the exchange is its own inverse).
        xa, xb = _rotary_pairs(x.to(tl.float32), BLOCK_S, D, INTERLEAVED)
        return _rotary_rows(xa * ca + xb * sa, xb * cb + xa * sb, BLOCK_S, D, INTERLEAVED)

    @triton.jit
    def _rotary_qkv_fwd_kernel(QKV, COS, SIN, Q, K, V, S, H, s_qb, s_qs, s_cb, s_cs,
                               D: tl.constexpr, BLOCK_S: tl.constexpr, INTERLEAVED: tl.constexpr):
        # q and k rotated (float32, then x's dtype), v copied, into [B, H, S, D]
        bh, b, h, s64, j, m = _rotary_index(S, H, D, BLOCK_S)
        ca, cb, sa, sb = _rotary_tables(COS, SIN, b, s64, j, m, s_cb, s_cs, D, BLOCK_S, INTERLEAVED)
        src = QKV + b * s_qb + s64 * s_qs + h * D + j
        dst = (bh * S + s64) * D + j
        y = _rotated(tl.load(src, mask=m, other=0.0), ca, cb, sa, sb, BLOCK_S, D, INTERLEAVED)
        tl.store(Q + dst, y.to(Q.dtype.element_ty), mask=m)
        y = _rotated(tl.load(src + H * D, mask=m, other=0.0), ca, cb, sa, sb, BLOCK_S, D, INTERLEAVED)
        tl.store(K + dst, y.to(K.dtype.element_ty), mask=m)
        tl.store(V + dst, tl.load(src + 2 * H * D, mask=m, other=0.0), mask=m)

    @triton.jit
    def _rotary_qkv_bwd_kernel(DQ, DK, DV, COS, SIN, OUT, Q, DA, MASK, S, H, s_qb, s_qh, s_qs, s_kb, s_kh, s_ks,
                               s_vb, s_vh, s_vs, s_cb, s_cs, s_ab, s_ah, s_ar, s_ak, s_mb,
                               D: tl.constexpr, BLOCK_S: tl.constexpr, INTERLEAVED: tl.constexpr, GRAM: tl.constexpr,
                               HAS_MASK: tl.constexpr, IEEE: tl.constexpr):
        # the joint gradient [B, S, 3 H D]: dq and dk rotated back (float32, then its dtype), dv copied. With GRAM dq
        # first gains mask_s q_s (dA + dA^T), the gradient of the metric sum A of the rows' batch entry and head.
        bh, b, h, s64, j, m = _rotary_index(S, H, D, BLOCK_S)
        ca, cb, sa, sb = _rotary_tables(COS, SIN, b, s64, j, m, s_cb, s_cs, D, BLOCK_S, INTERLEAVED)
        HD = H * D
        dst = OUT + (b * S + s64) * (3 * HD) + h * D + j
        g = tl.load(DQ + b * s_qb + h * s_qh + s64 * s_qs + j, mask=m, other=0.0)
        if GRAM:
            r = tl.arange(0, D)
            dA = tl.load(DA + b * s_ab + h * s_ah + r[:, None] * s_ar + r[None, :] * s_ak)
            sym = dA + tl.trans(dA)
            q = tl.load(Q + (bh * S + s64) * D + j, mask=m, other=0.0)
            if IEEE:
                gq = tl.dot(q.to(tl.float32), sym, input_precision="ieee")
            else:  # (16-bit q: the d x d factor rounded to q's dtype, as the separate q^T q backward does)
                gq = tl.dot(q, sym.to(q.dtype))
            if HAS_MASK:  # (the rows' weights mask_s [BLOCK_S, 1], float32)
                gq = gq * tl.load(MASK + b * s_mb + s64, mask=m, other=0.0)
            g = g.to(tl.float32) + gq
        tl.store(dst, _rotated(g, ca, cb, sb, sa, BLOCK_S, D, INTERLEAVED).to(OUT.dtype.element_ty), mask=m)
        g = tl.load(DK + b * s_kb + h * s_kh + s64 * s_ks + j, mask=m, other=0.0)
        tl.store(dst + HD, _rotated(g, ca, cb, sb, sa, BLOCK_S, D, INTERLEAVED).to(OUT.dtype.element_ty), mask=m)
        g = tl.load(DV + b * s_vb + h * s_vh + s64 * s_vs + j, mask=m, other=0.0)
        tl.store(dst + 2 * HD, g.to(OUT.dtype.element_ty), mask=m)


def _check_rotary(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int,
                  mask: torch.Tensor | None = None):
    if qkv.dim() != 3 or heads < 1 or qkv.shape[-1] % (3 * heads) or (qkv.shape[-1] // (3 * heads)) % 2:
        raise ValueError(f"rotary_qkv: expected the joint projection [batch, seq, 3 * {heads} heads * head_dim] with an "
                         f"even head_dim, got {tuple(qkv.shape)}")
    B, S, _ = qkv.shape
    d = qkv.shape[-1] // (3 * heads)
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dim() != 4 or t.shape[0] not in (1, B) or tuple(t.shape[1:]) != (S, 1, d):
            raise ValueError(f"rotary_qkv: expected {name} [{B} or 1, {S}, 1, {d}], got {tuple(t.shape)}")
    if mask is not None and tuple(mask.shape) != (B, S):
        raise ValueError(f"rotary_qkv: expected the metric sum's token mask [{B}, {S}], got {tuple(mask.shape)}")


def _rotary_kernels(t: torch.Tensor, d: int) -> bool:
    """Whether the rotary Triton kernels take tensors like t with head size d: CUDA (or the interpreter on CPU), a
    float dtype, d a power of two from 2 to 256."""
    return (triton is not None and (t.device.type == "cuda" or (t.device.type == "cpu" and _KERNELS_ON_CPU))
            and t.dtype in (torch.float32, torch.bfloat16, torch.float16) and 2 <= d <= 256 and d & (d - 1) == 0)


def rotary_metric_sum_kernels(t: torch.Tensor, d: int) -> bool:
    """Whether the rotary kernels also take the metric sum for tensors like t with head size d (a d x d float32
    accumulator per program: d from 16, the smallest matrix product, to 128)."""
    return _rotary_kernels(t, d) and 16 <= d <= 128


def _rotary_table_inputs(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The float32 tables as the kernels read them, contiguous; tables broadcast over the batch (stride 0, as the model
    expands them) kept as their one row rather than copied out per batch entry."""
    return tuple((t[:1] if t.shape[0] > 1 and t.stride(0) == 0 else t).float().contiguous() for t in (cos, sin))


def _table_strides(t: torch.Tensor) -> tuple[int, int]:
    """(batch, position) strides of a [B or 1, S, 1, d] table; 0 for a batch of 1 (shared by every row)."""
    return (t.stride(0) if t.shape[0] > 1 else 0), t.stride(1)


def _rotary_reference(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, interleaved: bool):
    """:func:`rotary_qkv_forward` in PyTorch ops (:func:`apply_rotary_tables`, as PldrAttention rotates without the
    operator)."""
    qk = qkv[..., : qkv.shape[-1] * 2 // 3].unflatten(-1, (2 * heads, -1))
    v = qkv[..., qkv.shape[-1] * 2 // 3:].unflatten(-1, (heads, -1))
    q, k = apply_rotary_tables(qk, cos, sin, interleaved).transpose(1, 2).split(heads, dim=1)
    return q.contiguous(), k.contiguous(), v.transpose(1, 2).contiguous()


def _gram_reference_backward(dA: torch.Tensor, q: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The gradient (float32) of the metric sum's q in PyTorch ops: ``mask_s q_s (dA + dA^T)``; mask [B, S]."""
    with torch.autocast(device_type=q.device.type, enabled=False):
        g = torch.matmul(q.float(), (dA + dA.transpose(-1, -2)).float())
    return g if mask is None else g * mask[:, None, :, None]


def _rotary_reference_backward(dq, dk, dv, cos, sin, interleaved: bool, gram_dq: torch.Tensor | None = None):
    """:func:`rotary_qkv_backward` in PyTorch ops: ``dx = dy cos + swap(dy sin)`` in float32 for q and k (dq plus
    ``gram_dq``, float32, where given)."""
    g = torch.cat((dq.float() if gram_dq is None else dq.float() + gram_dq, dk.float()), dim=1).transpose(1, 2)
    gqk = (g * cos + rotary_swap(g * sin, interleaved)).to(dq.dtype)  # g [B, S, 2H, d]
    return torch.cat((gqk.flatten(-2), dv.transpose(1, 2).flatten(-2)), dim=-1)


def rotary_qkv_forward(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, interleaved: bool,
                       wrap: bool = False):
    """``(q, k, v)``, each [B, heads, S, d] contiguous, from the joint projection qkv [B, S, 3 heads d] (q's heads,
    then k's, then v's): q and k rotated with the float32 tables cos, sin [B or 1, S, 1, d] (full-width cos and signed
    sin: ``x cos + swap(x) sin``, see :func:`rotary_swap`), v as it is."""
    _check_rotary(qkv, cos, sin, heads)
    B, S, W = qkv.shape
    d = W // (3 * heads)
    if not _rotary_kernels(qkv, d):
        return _rotary_reference(qkv, cos, sin, heads, interleaved)
    x = qkv if qkv.stride(-1) == 1 else qkv.contiguous()
    c, s_ = _rotary_table_inputs(cos, sin)
    q, k, v = (x.new_empty((B, heads, S, d)) for _ in range(3))
    if q.numel():
        with _on_device(x):
            kernel = wrap_triton(_rotary_qkv_fwd_kernel) if wrap else _rotary_qkv_fwd_kernel
            kernel[(triton.cdiv(S, ROTARY_BLOCK_S), B * heads)](
                x, c, s_, q, k, v, S, heads, x.stride(0), x.stride(1), *_table_strides(c), D=d,
                BLOCK_S=ROTARY_BLOCK_S, INTERLEAVED=interleaved, num_warps=4)
    return q, k, v


def rotary_qkv_metric_sum_forward(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                                  heads: int, interleaved: bool, wrap: bool = False):
    """:func:`rotary_qkv_forward`'s ``(q, k, v)`` and the metric sum of the rotated q,
    ``A = sum over positions s of mask_s q_s^T q_s`` [B, heads, d, d] in float32 (:func:`_gram`: the products of q's
    values as stored, float32 sums), mask [B, S] (float32) or None (all positions)."""
    _check_rotary(qkv, cos, sin, heads, mask)
    q, k, v = rotary_qkv_forward(qkv, cos, sin, heads, interleaved, wrap)
    return q, k, v, _gram(q, None if mask is None else mask[:, None, :, None], torch.float32)


def _rotary_launch_backward(dq, dk, dv, cos, sin, interleaved, wrap, gram: tuple | None):
    B, H, S, d = dq.shape
    grads = [t if t.stride(-1) == 1 else t.contiguous() for t in (dq, dk, dv)]
    c, s_ = _rotary_table_inputs(cos, sin)
    out = dq.new_empty((B, S, 3 * H * d))
    dA, q, w = gram if gram is not None else (None, None, None)
    if gram is not None:
        q = q.contiguous()
        w = None if w is None else w.float().contiguous()
    if out.numel():
        with _on_device(dq):
            kernel = wrap_triton(_rotary_qkv_bwd_kernel) if wrap else _rotary_qkv_bwd_kernel
            kernel[(triton.cdiv(S, ROTARY_BLOCK_S), B * H)](
                *grads, c, s_, out, dq if q is None else q, c if dA is None else dA, c if w is None else w, S, H,
                *(st for t in grads for st in (t.stride(0), t.stride(1), t.stride(2))), *_table_strides(c),
                *(dA.stride() if dA is not None else (0,) * 4), 0 if w is None else w.stride(0), D=d,
                BLOCK_S=ROTARY_BLOCK_S, INTERLEAVED=interleaved, GRAM=gram is not None, HAS_MASK=w is not None,
                IEEE=dq.dtype != torch.bfloat16, num_warps=4 if gram is None or d <= 64 else 8)
    return out


def _check_grads(dq, dk, dv):
    if dk.shape != dq.shape or dv.shape != dq.shape:
        raise ValueError(f"rotary_qkv: expected dq, dk, dv of one shape, got {tuple(dq.shape)}, {tuple(dk.shape)}, "
                         f"{tuple(dv.shape)}")


def rotary_qkv_backward(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                        interleaved: bool, wrap: bool = False) -> torch.Tensor:
    """The gradient [B, S, 3 H d] of :func:`rotary_qkv_forward`'s input for the gradients dq, dk, dv [B, H, S, d] of
    its outputs (the same dtype)."""
    _check_grads(dq, dk, dv)
    if not _rotary_kernels(dq, dq.shape[-1]):
        return _rotary_reference_backward(dq, dk, dv, cos, sin, interleaved)
    return _rotary_launch_backward(dq, dk, dv, cos, sin, interleaved, wrap, None)


def rotary_qkv_metric_sum_backward(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, dA: torch.Tensor,
                                   q: torch.Tensor, mask: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                                   interleaved: bool, wrap: bool = False) -> torch.Tensor:
    """The gradient [B, S, 3 H d] of :func:`rotary_qkv_metric_sum_forward`'s input for the gradients of its outputs
    (dA [B, H, d, d], float32) and its rotated q."""
    _check_grads(dq, dk, dv)
    B, H, S, d = dq.shape
    if tuple(dA.shape) != (B, H, d, d) or q.shape != dq.shape:
        raise ValueError(f"rotary_qkv: expected the metric sum's gradient [{B}, {H}, {d}, {d}] and q {tuple(dq.shape)}, "
                         f"got {tuple(dA.shape)} and {tuple(q.shape)}")
    if not rotary_metric_sum_kernels(dq, d):
        w = None if mask is None else mask.float()
        return _rotary_reference_backward(dq, dk, dv, cos, sin, interleaved, _gram_reference_backward(dA, q, w))
    return _rotary_launch_backward(dq, dk, dv, cos, sin, interleaved, wrap, (dA, q, mask))


def _rq_fwd_impl(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int,
                 interleaved: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``pldr::rotary_qkv_fwd``: :func:`rotary_qkv_forward` with its kernel visible to torch.compile."""
    return rotary_qkv_forward(qkv, cos, sin, heads, interleaved, _TRACEABLE_KERNELS)


def _rq_bwd_impl(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 interleaved: bool) -> torch.Tensor:
    """``pldr::rotary_qkv_bwd``: :func:`rotary_qkv_backward` with its kernel visible to torch.compile."""
    return rotary_qkv_backward(dq, dk, dv, cos, sin, interleaved, _TRACEABLE_KERNELS)


def _rq_fwd_fake(qkv, cos, sin, heads, interleaved):
    _check_rotary(qkv, cos, sin, heads)
    B, S, W = qkv.shape
    return tuple(qkv.new_empty((B, heads, S, W // (3 * heads))) for _ in range(3))


def _rq_bwd_fake(dq, dk, dv, cos, sin, interleaved):
    B, H, S, d = dq.shape
    return dq.new_empty((B, S, 3 * H * d))


def _rq_setup_context(ctx, inputs, output):
    qkv, cos, sin, heads, interleaved = inputs
    ctx.save_for_backward(cos, sin)
    ctx.interleaved = interleaved


def _rotary_grads(like: torch.Tensor, dq, dk, dv, dA=None, A_shape=None) -> list | None:
    """The output gradients, zeros for those that got none (an output the loss does not reach; dq, dk, dv like
    ``like``, dA float32 of ``A_shape`` where given); None if none got one."""
    grads = [dq, dk, dv] if A_shape is None else [dq, dk, dv, dA]
    if all(g is None for g in grads):
        return None
    filled = [torch.zeros_like(like) if g is None else g for g in grads[:3]]
    if A_shape is not None:
        filled.append(like.new_zeros(A_shape, dtype=torch.float32) if dA is None else dA)
    return filled


def _rq_backward(ctx, dq, dk, dv):
    cos, sin = ctx.saved_tensors
    like = next((g for g in (dq, dk, dv) if g is not None), None)
    grads = None if like is None else _rotary_grads(like, dq, dk, dv)
    g = None if grads is None else torch.ops.pldr.rotary_qkv_bwd(*grads, cos, sin, ctx.interleaved)
    return g, None, None, None, None


rotary_qkv_fwd, rotary_qkv_bwd = _define_ops("rotary_qkv", _rq_fwd_impl, _rq_bwd_impl, _rq_fwd_fake, _rq_bwd_fake,
                                             _rq_backward, _rq_setup_context)


def _rqm_fwd_impl(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None, heads: int,
                  interleaved: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``pldr::rotary_qkv_metric_sum_fwd``: :func:`rotary_qkv_metric_sum_forward`, its kernel visible to
    torch.compile."""
    return rotary_qkv_metric_sum_forward(qkv, cos, sin, mask, heads, interleaved, _TRACEABLE_KERNELS)


def _rqm_bwd_impl(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, dA: torch.Tensor, q: torch.Tensor,
                  mask: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """``pldr::rotary_qkv_metric_sum_bwd``: :func:`rotary_qkv_metric_sum_backward`, its kernel visible to
    torch.compile."""
    return rotary_qkv_metric_sum_backward(dq, dk, dv, dA, q, mask, cos, sin, interleaved, _TRACEABLE_KERNELS)


def _rqm_fwd_fake(qkv, cos, sin, mask, heads, interleaved):
    _check_rotary(qkv, cos, sin, heads, mask)
    B, S, W = qkv.shape
    d = W // (3 * heads)
    return (*(qkv.new_empty((B, heads, S, d)) for _ in range(3)),
            qkv.new_empty((B, heads, d, d), dtype=torch.float32))


def _rqm_bwd_fake(dq, dk, dv, dA, q, mask, cos, sin, interleaved):
    B, H, S, d = dq.shape
    return dq.new_empty((B, S, 3 * H * d))


def _rqm_setup_context(ctx, inputs, output):
    qkv, cos, sin, mask, heads, interleaved = inputs
    ctx.save_for_backward(cos, sin, mask, output[0])
    ctx.interleaved = interleaved
    ctx.A_shape = tuple(output[3].shape)


def _rqm_backward(ctx, dq, dk, dv, dA):
    cos, sin, mask, q = ctx.saved_tensors
    grads = _rotary_grads(q, dq, dk, dv, dA, ctx.A_shape)
    g = None if grads is None else torch.ops.pldr.rotary_qkv_metric_sum_bwd(*grads, q, mask, cos, sin,
                                                                          ctx.interleaved)
    return g, None, None, None, None, None


rotary_qkv_metric_sum_fwd, rotary_qkv_metric_sum_bwd = _define_ops(
    "rotary_qkv_metric_sum", _rqm_fwd_impl, _rqm_bwd_impl, _rqm_fwd_fake, _rqm_bwd_fake, _rqm_backward,
    _rqm_setup_context)


class RotaryQKVFunction(torch.autograd.Function):
    """:func:`rotary_qkv_forward` or, with ``gram``, :func:`rotary_qkv_metric_sum_forward` (``mask`` [B, S] or None)
    and their backwards as one autograd node for eager mode (no custom operator dispatch). A backward that builds a
    graph (second derivatives) takes the PyTorch ops."""

    @staticmethod
    def forward(ctx, qkv, cos, sin, heads, interleaved, gram=False, mask=None):
        ctx.interleaved = interleaved
        ctx.set_materialize_grads(False)
        if not gram:
            ctx.save_for_backward(cos, sin)
            return rotary_qkv_forward(qkv, cos, sin, heads, interleaved)
        out = rotary_qkv_metric_sum_forward(qkv, cos, sin, mask, heads, interleaved)
        ctx.save_for_backward(cos, sin, mask, out[0])
        ctx.A_shape = tuple(out[3].shape)
        return out

    @staticmethod
    def backward(ctx, *out_grads):
        saved = ctx.saved_tensors
        cos, sin = saved[:2]
        gram = len(out_grads) == 4
        like = saved[3] if gram else next((g for g in out_grads if g is not None), None)
        grads = None if like is None else _rotary_grads(like, *out_grads[:3], *(out_grads[3:]),
                                                        A_shape=ctx.A_shape if gram else None)
        if grads is None:
            return (None,) * 7
        # (a backward that builds a graph, for second derivatives, takes the PyTorch ops: the kernel's result would be
        # a constant there)
        if not gram:
            backward = _rotary_reference_backward if torch.is_grad_enabled() else rotary_qkv_backward
            return backward(*grads, cos, sin, ctx.interleaved), None, None, None, None, None, None
        mask, q = saved[2], saved[3]
        if torch.is_grad_enabled():
            w = None if mask is None else mask.float()
            gram_dq = _gram_reference_backward(grads[3], q, w)
            g = _rotary_reference_backward(*grads[:3], cos, sin, ctx.interleaved, gram_dq)
        else:
            g = rotary_qkv_metric_sum_backward(*grads, q, mask, cos, sin, ctx.interleaved)
        return g, None, None, None, None, None, None


def rotary_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, interleaved: bool):
    """``(q, k, v)`` [B, heads, S, d] (contiguous) of the joint projection qkv [B, S, 3 heads d], q and k rotated (see
    :func:`rotary_qkv_forward`): on CUDA one Triton kernel forward and one backward (one operator under
    torch.compile), elsewhere the PyTorch ops."""
    d = qkv.shape[-1] // (3 * heads) if heads else 0
    if not _rotary_kernels(qkv, d):
        return rotary_qkv_forward(qkv, cos, sin, heads, interleaved)
    if torch.compiler.is_compiling():
        return torch.ops.pldr.rotary_qkv_fwd(qkv, cos, sin, heads, interleaved)
    if torch.is_grad_enabled() and qkv.requires_grad:
        return RotaryQKVFunction.apply(qkv, cos, sin, heads, interleaved)
    return rotary_qkv_forward(qkv, cos, sin, heads, interleaved)


def rotary_qkv_metric_sum(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, interleaved: bool,
                          mask: torch.Tensor | None = None):
    """``(q, k, v, A)``: :func:`rotary_qkv`'s q, k, v and the metric sum of the rotated queries,
    ``A = sum over positions s of mask_s q_s^T q_s`` [B, heads, d, d] in float32 (products of q's values as stored,
    float32 sums; mask [B, S], None for all positions). Where :func:`rotary_metric_sum_kernels` says yes, one operator
    (under torch.compile too): the rotary kernel and the q^T q GEMM forward, one kernel backward; elsewhere the PyTorch
    ops."""
    d = qkv.shape[-1] // (3 * heads) if heads else 0
    w = None if mask is None else mask.to(torch.float32)
    if torch.compiler.is_compiling() and rotary_metric_sum_kernels(qkv, d):
        return torch.ops.pldr.rotary_qkv_metric_sum_fwd(qkv, cos, sin, w, heads, interleaved)
    if torch.is_grad_enabled() and qkv.requires_grad and rotary_metric_sum_kernels(qkv, d):
        return RotaryQKVFunction.apply(qkv, cos, sin, heads, interleaved, True, w)
    return rotary_qkv_metric_sum_forward(qkv, cos, sin, w, heads, interleaved)


# ----------------------------------------------------------------------------------------------------------------------
# The entry point
# ----------------------------------------------------------------------------------------------------------------------
def _module_types():
    from .modeling_pldr import PldrGLU, PldrResidualMetricUnit

    return PldrResidualMetricUnit, PldrGLU


def _has_hooks(module: nn.Module) -> bool:
    """Whether calling the module may do more than its class's forward: torch hooks on it, or a forward replaced on
    the instance, except by an accelerate hook that does not offload. (accelerate wraps ``module.forward``; an
    offloading hook brings the weights onto the device only inside that call, so they must not be read around it,
    while one that only moves inputs to the device its weights already live on, as ``device_map`` splits over
    several GPUs give, leaves the module what its weights say.)"""
    if module._forward_hooks or module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks:
        return True
    if "forward" not in module.__dict__:
        return False
    hook = module.__dict__.get("_hf_hook")
    return hook is None or any(getattr(h, "offload", True) for h in (getattr(hook, "hooks", None) or (hook,)))


def _global_hooks() -> bool:
    """Whether hooks are registered on every module (``nn.modules.module.register_module_forward_hook`` etc.)."""
    m = nn.modules.module
    return bool(m._global_forward_hooks or m._global_forward_pre_hooks or m._global_backward_hooks
                or m._global_backward_pre_hooks)


def plain_linears(*linears: nn.Module) -> bool:
    """Whether these are plain ``nn.Linear`` modules without hooks, so that computing with their weights directly
    gives what calling them gives: not PEFT adapters, quantised or parametrised layers, nor modules with (module or
    global) hooks such as offloading or ZeRO-3."""
    return not _global_hooks() and all(type(lin) is nn.Linear and not _has_hooks(lin) for lin in linears)


def plain_layer_norms(*norms: nn.Module) -> bool:
    """Whether these are plain ``nn.LayerNorm`` modules with weights and without hooks (see :func:`plain_linears`)."""
    return not _global_hooks() and all(type(ln) is nn.LayerNorm and ln.elementwise_affine and not _has_hooks(ln)
                                       for ln in norms)


def learner_tensors(units: nn.ModuleList):
    """The learner's parameters by kind, as lists in the order the operator stacks them, and the LayerNorms' eps:
    ``(w12, w3, b12, b3, ln_w, ln_b, eps)`` with w12 = [gluw1.weight, gluw2.weight] of each GLU in turn, b12 and b3
    None without biases. None when the fused operator must not run: a unit or GLU that is not the plain PLDR module
    with ``nn.Linear`` / ``nn.LayerNorm`` / SiLU (PEFT adapters, quantised layers, parametrisations), module or global
    hooks (offloading, ZeRO-3, user hooks), GLUs of different sizes, some GLUs with biases and others without, a
    LayerNorm without weight or bias, or mixed parameter dtypes."""
    if _global_hooks():
        return None
    unit_type, glu_type = _module_types()
    w12, w3, b12, b3, lnw, lnb, eps, norm_shapes = [], [], [], [], [], [], set(), set()
    glus = None
    for unit in units:  # (each attribute read once: nn.Module.__getattr__ is slow, and this runs every call)
        if type(unit) is not unit_type or _has_hooks(unit):
            return None
        dense, ln = unit.denseAs, unit.layernormA
        if _has_hooks(dense) or len(dense) == 0 or (glus is not None and len(dense) != glus):
            return None
        glus = len(dense)
        for glu in dense:
            if type(glu) is not glu_type or _has_hooks(glu):
                return None
            if type(glu.act_fn).__name__ not in ("SiLU", "SiLUActivation"):
                return None
            lin1, lin2, lin3 = glu.gluw1, glu.gluw2, glu.gluw3
            if not plain_linears(lin1, lin2, lin3):
                return None
            w12 += [lin1.weight, lin2.weight]
            w3.append(lin3.weight)
            b12 += [lin1.bias, lin2.bias]
            b3.append(lin3.bias)
        if type(ln) is not nn.LayerNorm or _has_hooks(ln):
            return None
        weight, bias = ln.weight, ln.bias
        if weight is None or bias is None:
            return None
        lnw.append(weight)
        lnb.append(bias)
        eps.add(ln.eps)
        norm_shapes.add(tuple(ln.normalized_shape))
    if not lnw or len(eps) != 1:
        return None
    hidden, d = w12[0].shape
    if norm_shapes != {(d,)} or any(w.shape != (hidden, d) for w in w12) or any(w.shape != (d, hidden) for w in w3):
        return None
    bias = b12[0] is not None
    if any((b is not None) != bias for b in b12 + b3):
        return None
    dtype = w12[0].dtype
    if any(p.dtype != dtype for p in w12 + w3 + (b12 + b3 if bias else []) + lnw + lnb):
        return None
    return w12, w3, (b12 if bias else None), (b3 if bias else None), lnw, lnb, eps.pop()


def _output_dtype(A: torch.Tensor, compute_dtype: torch.dtype, autocast: bool, param_dtype: torch.dtype,
                  a_dtype: torch.dtype):
    """The dtype the modules give: under autocast the pre-LayerNorm sum is ``A + GLU output`` (compute dtype), and
    autocast runs layer_norm in float32 on CUDA (not on CPU); without autocast everything is the parameters' dtype.
    ``a_dtype``: the dtype of the rows that enter the learner."""
    if not autocast:
        return param_dtype
    if _AUTOCAST_LAYER_NORM_FP32.get(A.device.type, True):
        return torch.float32
    return torch.promote_types(a_dtype, compute_dtype)


class _LearnerFunction(torch.autograd.Function):
    """The operators' math as a plain autograd function, for eager mode: a custom operator's Python dispatch (autograd
    wrapper, redispatch, alias checks) cost about 0.5 ms of host time per call, more than its kernels' GPU time at small
    batches. Under torch.compile the custom operators run instead (opaque to inductor, no graph break)."""

    @staticmethod
    def forward(ctx, x, weights, norms, norm_weight, norm_bias, layout, eps, compute_dtype, out_dtype):
        kinds = layout.unpack_pair(weights, norms)
        norm = _norm_pair(norm_weight, norm_bias)
        out, xins, zs, mean, rstd, ws, bs = _forward(x, *kinds, layout, eps, compute_dtype, out_dtype, True, False,
                                                     norm)
        # (x itself for the input LayerNorm's backward and for a second derivative: rows [N, d], a fraction of what
        # the GLU inputs xins take)
        ctx.save_for_backward(x, weights, norms, norm_weight, norm_bias, xins, zs, mean, rstd, ws, bs)
        ctx.options = (layout, eps, compute_dtype, out_dtype)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weights, norms, norm_weight, norm_bias, xins, zs, mean, rstd, ws, bs = ctx.saved_tensors
        layout, eps, compute_dtype, out_dtype = ctx.options
        norm = _norm_pair(norm_weight, norm_bias)
        if torch.is_grad_enabled():  # (a backward with create_graph=True, for second derivatives)
            def reference(x, weights, norms, norm_weight, norm_bias):
                with torch.autocast(x.device.type, enabled=False):
                    return _reference_forward(x, *layout.unpack_pair(weights, norms), layout, eps, compute_dtype,
                                              out_dtype, False, _norm_pair(norm_weight, norm_bias))[0]

            grads = _recomputed_grads(reference, (x, weights, norms, norm_weight, norm_bias),
                                      ctx.needs_input_grad[:5], grad_out)
            return *grads, None, None, None, None
        needs = ctx.needs_input_grad[1:5]  # (the input LayerNorm's: False without it)
        gx, flat = _backward_math(grad_out, *layout.unpack_pair(weights, norms), xins, zs, mean, rstd, ws, bs, layout,
                                  eps, compute_dtype, x.dtype, any(needs), False, x, norm)
        return gx, *_split_param_grads(flat, needs, weights, norms), None, None, None, None


def _dtypes(A: torch.Tensor, param_dtype: torch.dtype, a_dtype: torch.dtype | None = None):
    """(compute dtype, output dtype) of the learner on A (rows entering the learner in ``a_dtype``, by default A's),
    or None when the modules would reject the combination."""
    device = A.device.type
    a_dtype = A.dtype if a_dtype is None else a_dtype
    autocast = torch.is_autocast_enabled(device)
    if autocast:
        compute_dtype = torch.get_autocast_dtype(device)
    elif a_dtype != param_dtype:
        return None
    else:
        compute_dtype = param_dtype
    if compute_dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        return None
    return compute_dtype, _output_dtype(A, compute_dtype, autocast, param_dtype, a_dtype)


def _norm_dtype(x: torch.Tensor, norm_weight: torch.Tensor) -> torch.dtype:
    """The dtype of the input LayerNorm's result, as the model's separate LayerNorm of A gives it: x's (computed with
    float32 parameters), or the parameters' own 16-bit (or float64) dtype, rounded to it."""
    return x.dtype if norm_weight.dtype == torch.float32 else norm_weight.dtype


def _check_norm(x: torch.Tensor, norm) -> None:
    if norm is None:
        return
    d = x.shape[-1]
    for name, t in zip(("weight", "bias"), norm):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (d,) or not t.is_floating_point():
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"metric learner: the input LayerNorm's {name} must be a floating-point vector of the "
                             f"rows' width {d}, got {shape}")


def _norm_kernels(x: torch.Tensor, norm) -> bool:
    """Whether the kernels take the input LayerNorm (dtypes they read and round to)."""
    floats = (torch.float32, torch.bfloat16, torch.float16)
    return norm is None or (norm[0].dtype in floats and norm[1].dtype in floats and _norm_dtype(x, norm[0]) in floats)


def _run(A: torch.Tensor, weights, norms, layout: LearnerLayout, eps: float, compute_dtype, out_dtype,
         norm=None) -> torch.Tensor:
    """The learner on the rows of A [..., d] with the flat parameters (see :func:`pack_learner`), after the input
    LayerNorm ``norm`` = (weight, bias) if given."""
    x = A.reshape(-1, layout.d)
    norm_weight, norm_bias = (None, None) if norm is None else norm
    needs_grad = torch.is_grad_enabled() and (A.requires_grad or weights.requires_grad or norms.requires_grad or (
        norm is not None and (norm_weight.requires_grad or norm_bias.requires_grad)))
    if torch.compiler.is_compiling():
        out = torch.ops.pldr.metric_learner_fwd(x, weights, norms, norm_weight, norm_bias, layout.units, layout.glus,
                                                layout.hidden, float(eps), compute_dtype, out_dtype, needs_grad)[0]
    elif needs_grad:
        out = _LearnerFunction.apply(x, weights, norms, norm_weight, norm_bias, layout, float(eps), compute_dtype,
                                     out_dtype)
    else:
        out = _forward(x, *layout.unpack_pair(weights, norms), layout, float(eps), compute_dtype, out_dtype, False,
                       False, norm)[0]
    return out.view(A.shape)


def _check_rows(A: torch.Tensor, d: int):
    if A.dim() < 1 or A.shape[-1] != d:
        raise ValueError(f"metric learner: A must have rows of width {d} (the learner's d), got shape {tuple(A.shape)}")
    if not A.is_floating_point():
        raise ValueError(f"metric learner: A must be floating point, got {A.dtype}")


def flat_metric_learner(A: torch.Tensor, weights: torch.Tensor, norms: torch.Tensor, units: int, glus: int,
                        hidden: int, eps: float, norm: tuple | None = None) -> torch.Tensor:
    """The learner on the rows of A [..., d] from its parameters in two flat tensors (the model's
    ``PldrMetricLearner`` stores them so; :func:`pack_learner` makes them from the kinds): ``weights`` = W1|W2 [2G, h, d]
    (gluw1 and gluw2 of each GLU in turn) then W3 [G, d, h], ``norms`` = b1|b2 [2G, h] and b3 [G, d] (without biases:
    none), then the LayerNorm weights and biases [U, d]; ``units`` U of ``glus`` J GLUs (G = U J) of width ``hidden``.
    Their gradients come out of the backward as they are laid out, with no copy. ``norm`` = (weight, bias) [d]: a
    LayerNorm (of the same eps) on the rows first, computed inside the operator as the model's LayerNorm of A (its
    result in A's dtype for float32 weights, else rounded to theirs). Returns a tensor of A's shape with the dtype the
    modules would give; raises a ValueError for sizes that do not match, rows of the wrong width or a dtype the
    modules would reject."""
    layout = _flat_layout(weights, norms, units, glus, hidden)
    _check_rows(A, layout.d)
    _check_norm(A, norm)
    a_dtype = A.dtype if norm is None else _norm_dtype(A, norm[0])
    dtypes = _dtypes(A, weights.dtype, a_dtype)
    if dtypes is None:
        raise ValueError(f"metric learner: A is {a_dtype} but the learner's parameters are {weights.dtype} (and no "
                         f"autocast is active); cast A or the model to one dtype")
    return _run(A, weights, norms, layout, eps, *dtypes, norm)


def stacked_metric_learner(A: torch.Tensor, w12, w3, b12, b3, ln_w, ln_b, eps: float) -> torch.Tensor:
    """:func:`flat_metric_learner` from the parameters stacked per kind: W1|W2 [2G, h, d] (gluw1 and gluw2 of each GLU
    in turn), W3 [G, d, h], b1|b2 [2G, h] and b3 [G, d] or None, LayerNorm weights and biases [U, d] (packed by one
    copy each way)."""
    _check_rows(A, w12.shape[-1])
    layout = _check(A.reshape(-1, A.shape[-1]), w12, w3, b12, b3, ln_w, ln_b)
    return flat_metric_learner(A, *pack_learner(w12, w3, b12, b3, ln_w, ln_b), layout.units, layout.glus,
                               layout.hidden, eps)


def runs_kernels_only(A: torch.Tensor, weights, norms, units: int, glus: int, hidden: int, power_params,
                      norm: tuple | None = None) -> bool:
    """Whether the flat learner (:func:`flat_metric_learner`, with its input LayerNorm ``norm``) on A [..., d] and
    then the power law with ``power_params`` [5, H, d, d] run their Triton kernels alone, with no cuBLAS or other
    library GEMM, under the present autocast state: where a layer's deduction is recorded as CUDA graphs (the tested
    case; float32 learners without autocast run on cuBLAS, see FLOAT32_KERNELS)."""
    x = A.reshape(-1, A.shape[-1])
    try:
        layout = _check_flat(x, weights, norms, units, glus, hidden)
        _check_norm(x, norm)
    except ValueError:
        return False
    dtypes = _dtypes(A, weights.dtype, A.dtype if norm is None else _norm_dtype(A, norm[0]))
    if dtypes is None:
        return False
    return (_use_kernels(x, weights, layout, dtypes[0]) and _norm_kernels(x, norm)
            and _power_law_kernels(A.float(), power_params.float()))


def fused_metric_learner(units: nn.ModuleList, A: torch.Tensor) -> torch.Tensor | None:
    """Runs the metric learner ``units`` (a ModuleList of PldrResidualMetricUnit) on the rows of A [..., d] as one
    operator; returns a tensor of A's shape with the dtype the modules would give, or None when the modules
    themselves must run (see :func:`learner_tensors`; also a dtype combination the modules would reject).

    Works with and without gradients (nothing is kept for the backward when none is needed), under autocast (GEMMs
    in the autocast dtype with float32 accumulation, LayerNorms and the residual stream in float32), in eager mode
    and under ``torch.compile``. The model itself stores its learners stacked (``PldrMetricLearner``), which saves the
    per-call stacking and the per-parameter autograd and optimizer work; this entry serves learners kept as modules
    (e.g. with adapters on their GLUs, which make it return None)."""
    if len(units) == 0:
        return A
    found = learner_tensors(units)
    if found is None:
        return None
    w12, w3, b12, b3, ln_w, ln_b, eps = found
    _check_rows(A, w12[0].shape[1])
    dtypes = _dtypes(A, w12[0].dtype)
    if dtypes is None:
        return None  # the modules raise a dtype mismatch: let them say so
    layout = LearnerLayout(len(ln_w), len(w3) // len(ln_w), w12[0].shape[0], w12[0].shape[1], b12 is not None)
    return _run(A, *pack_learner(w12, w3, b12, b3, ln_w, ln_b), layout, eps, *dtypes)
