"""PLDR-LLM: Large Language Model from Power Law Decoder Representations (arXiv 2410.16703, 2502.13502).

PLDR-LLM replaces dot-product attention by Power Law Graph Attention (PLGA). Each layer first *deduces* a small tensor
per head and then *induces* the next token with it:

* the metric tensor ``A`` (d x d per head) is the LayerNorm of ``sum_s q_s^T q_s`` over the (non-padding) positions of
  the input, refined by a residual *metric learner* of SwiGLU units;
* ``A_LM = iSwiGLU(W A + b) + 1e-9`` (positive), ``G_LM = a (A_LM ** p) + ba`` with learnable W, b, p, a, ba; G_LM is
  the *energy-curvature tensor*;
* attention is scaled dot-product attention on ``q' = q G_LM``: ``softmax(q G_LM k^T / sqrt(d)) v``, so the usual fused
  attention kernels (SDPA, FlashAttention) apply unchanged.

A, A_LM, G_LM (with the learned exponents p and couplings a, ba) are the *deductive outputs*. Because G_LM is nearly
input-invariant, a cache holds it besides k and v: the *G-cache*. With a cache, A is computed once from the prompt and
kept frozen while decoding, as in the original implementation.

This file depends only on torch and transformers, so that it can travel with a saved model as remote code.
"""

import functools
import inspect
import itertools
import math
import threading
import weakref
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.experimental.symbolic_shapes import statically_known_true
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, StaticLayer
from transformers.generation import GenerationMixin
from transformers import masking_utils
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    QuestionAnsweringModelOutput,
    SequenceClassifierOutputWithPast,
    TokenClassifierOutput,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.utils import ModelOutput, can_return_tuple, logging

from .cache_pldr import (  # noqa: F401  (PldrCacheMixin, PldrDynamicCache: re-exported)
    PldrCacheMixin,
    PldrDynamicCache,
    PldrStaticCache,
    _copyable_tensors,
    _decode_copyable,
    _DecodePack,
    _DecodeWeightCopies,
    _StaticCacheBuffers,
    as_pldr_cache,
)
from .configuration_pldr import PldrConfig
from .deduction_graphs import DeductionGraphs, suspended
from .metric_learner import (  # noqa: F401  (A_LM_EPSILON, apply_rotary_tables, _widens etc.: re-exported)
    _BMM_OUT_DTYPE,
    A_LM_EPSILON,
    _global_hooks,
    _gram,
    _has_hooks,
    _wide_dtype,
    _widens,
    apply_rotary_tables,
    LearnerLayout,
    flat_metric_learner,
    fused_metric_learner,
    joint_swiglu,
    plain_layer_norms,
    plain_linears,
    power_law,
    power_law_forward,
    rotary_metric_sum_kernels,
    rotary_qkv,
    rotary_qkv_metric_sum,
    runs_kernels_only,
)
from .packing import (
    SequenceGroups,
    groups_from_cu_seq_lens,
    groups_from_mask,
    groups_from_position_ids,
    positions_from_cu_seq_lens,
)

logger = logging.get_logger(__name__)

# transformers 5.24 renamed the cache argument of forward(), create_causal_mask() and prepare_inputs_for_generation(),
# and the outputs' cache field, from ``past_key_values`` to ``cache`` (the old name deprecated until 5.40). The models
# take either name and answer in the installed version's; CACHE_FIELD is that name.
CACHE_FIELD = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"


def _one_cache(past_key_values: Cache | None, cache: Cache | None) -> Cache | None:
    """The cache a forward got, under either name."""
    if past_key_values is not None and cache is not None and past_key_values is not cache:
        raise ValueError("Got two different caches, as past_key_values= and as cache=: pass one (transformers >= 5.24 "
                         "calls it cache; generate() passes its own, so a library that adds a past_key_values= of its "
                         "own, as PEFT's prefix tuning does, meets this).")
    return cache if cache is not None else past_key_values


def _cache_kwarg(kwargs: dict) -> Cache | None:
    """The cache in keyword arguments (generate's model kwargs), under either name."""
    return _one_cache(kwargs.get("past_key_values"), kwargs.get("cache"))


# ----------------------------------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class PldrDeductiveOutputs(ModelOutput):
    """Deductive outputs of one PLGA layer (shapes: [batch or 1, heads, head_dim, head_dim] unless stated).

    Args:
        A: metric tensor after the residual metric learner.
        A_LM: ``iSwiGLU(W A + b) + 1e-9``, the positive tensor raised to the learned power.
        power_exponents: learned exponents p, [heads, head_dim, head_dim].
        coupling: learned coupling coefficients a, [heads, head_dim, head_dim].
        coupling_bias: learned coupling bias ba, [heads, head_dim, head_dim].
        G_LM: energy-curvature tensor ``a (A_LM ** p) + ba``.
        attention_weights: softmax attention probabilities [batch, heads, query_len, key_len]; only computed with
            ``attn_implementation="eager"`` (fused kernels never materialise them).
    """

    A: torch.Tensor | None = None
    A_LM: torch.Tensor | None = None
    power_exponents: torch.Tensor | None = None
    coupling: torch.Tensor | None = None
    coupling_bias: torch.Tensor | None = None
    G_LM: torch.Tensor | None = None
    attention_weights: torch.Tensor | None = None


@dataclass
class PldrModelOutputWithPast(BaseModelOutputWithPast):
    """``BaseModelOutputWithPast`` plus ``pldr_attentions``: one :class:`PldrDeductiveOutputs` per layer."""

    pldr_attentions: tuple[PldrDeductiveOutputs, ...] | None = None


@dataclass
class PldrCausalLMOutputWithPast(CausalLMOutputWithPast):
    """``CausalLMOutputWithPast`` plus ``pldr_attentions``: one :class:`PldrDeductiveOutputs` per layer."""

    pldr_attentions: tuple[PldrDeductiveOutputs, ...] | None = None


# ----------------------------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------------------------
def _linear_bias_apart_if_compiled(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; under torch.compile the bias is added after the GEMM instead.

    For the FFN's padded W1|W2 without gradients (decoding, compiled inference; training folds the bias into the GEMM:
    :func:`_linear_bias_folded`), whose output only feeds the activation: inductor's ``addmm`` ran on cuBLAS's path
    that first copies the broadcast bias into the whole output, then accumulates onto it (PyTorch 2.11, H200: 33 us
    of copy per layer at 4096 rows, 2 us at 32); the separate add fuses into the activation's kernel instead. In eager
    mode ``F.linear`` with the bias takes cuBLASLt's bias epilogue, faster than a separate add."""
    if bias is None or not torch.compiler.is_compiling():
        return F.linear(x, weight, bias)
    return F.linear(x, weight) + bias


def _linear_bias_folded(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` with the bias inside the GEMM: x gains a column of ones (and zero columns up to a
    multiple of 8 features, for tensor-core aligned rows), the weight the bias as the matching column.

    Used under torch.compile in training for the FFN's padded W1|W2 and the LM head. The bias's gradient then comes out
    of the weight-gradient GEMM (its last column) instead of a reduction over all rows of the output's gradient. Per
    training step at 16 x 1024 (110M, bf16, H200, torch.profiler, five layers; measured before the SwiGLU became its
    own operator, metric_learner.joint_swiglu): inductor's SwiGLU backward kernel 224 -> 156 us a layer, the W1|W2
    bias's reduction (82 us a layer) and the LM head bias's (245 us) gone, for 8 more columns in the GEMMs' inner
    dimension and a 22 us kernel that writes x with them (once per FFN and for the LM head)."""
    extra = 8 - x.shape[-1] % 8
    ones = x.new_ones(*x.shape[:-1], 1)
    x_aug = torch.cat((x, ones, x.new_zeros(*x.shape[:-1], extra - 1)), dim=-1)
    w_aug = torch.cat((weight, bias[:, None].to(weight.dtype), weight.new_zeros(weight.shape[0], extra - 1)), dim=1)
    return F.linear(x_aug, w_aug)


def _joint_linear(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor | None]):
    """``F.linear`` of x with several linears' weights (and biases) stacked along the output features: one GEMM instead
    of one per linear (fewer kernels in the forward and the backward, and larger GEMMs), the outputs concatenated on
    the last dimension. None when some of the linears have a bias and others not."""
    if any((b is None) != (biases[0] is None) for b in biases):
        return None
    return F.linear(x, torch.cat(weights), None if biases[0] is None else torch.cat(biases))


# (activation names whose SwiGLUs the fused kernels compute: the metric learner's operator, the FFN's joint_swiglu)
_SILU_ACTS = ("silu", "swish")


class PldrGLU(_DecodeWeightCopies, nn.Module):
    """SwiGLU with biases: ``gluw3(act(gluw1 z) * gluw2 z)``.

    The papers' hidden widths (2389 for the FFN, 170 for the metric learner) are not multiples of 8, which pushes GPU
    GEMMs off the tensor-core kernels (16-byte aligned rows). On accelerators the FFN (``align_hidden=True``) therefore
    computes with its hidden width padded by zero rows/columns to a multiple of ``ALIGN`` (zero pre-activations give
    ``act(0) * 0 = 0`` and zero gradients, so outputs and gradients of the real parameters are unchanged); the stored
    parameters keep the checkpoint's shapes. ``ALIGN`` is 64 (2389 -> 2432, the width of the aligned Llama), not 8
    (2392): with 2392 the second half of the joint W1|W2 output starts at a column that is not a multiple of 16, and
    inductor's fused kernel for the activation's backward (which writes both halves' gradients) took 381 us per layer
    at 16 x 1024 tokens (bf16, H200); with 2432, 224 us. Widths that are multiples of 8 already are not padded (their
    GEMMs run on tensor cores; padding would copy the weights at every training step). The metric learner's own
    kernels pad its hidden width themselves.

    * Large inputs (training, prefill: at least ``MIN_PADDED_ROWS`` rows) pad the weights on the fly, with gluw1 and
      gluw2 as one GEMM. With SiLU, the activation and product on that GEMM's output are one operator
      (``metric_learner.joint_swiglu``: one Triton kernel forward and one backward on CUDA, eager and compiled).
    * Decoding steps would pay that copy every step, so inside ``generate()`` (:meth:`PldrForCausalLM.generate`) the
      FFN uses padded copies of its weights (and its biases) made once per call (see :class:`_DecodePack`), with gluw1
      and gluw2 as one GEMM. They stay allocated at fixed addresses between calls (refreshed from the parameters at the
      start of each), which compiled decoding with CUDA graphs reads in place: extra memory of one FFN's weights per
      layer.
    * Neither applies unless gluw1, gluw2 and gluw3 are plain ``nn.Linear`` modules without hooks (not PEFT adapters,
      quantised layers, offloading): those are always called as modules.
    """

    ALIGN = 64
    MIN_PADDED_ROWS = 1024
    PAD_ON_CPU = False  # pad on CPU too: nothing gained there; the tests use it to check the padded paths

    def __init__(self, in_features: int, hidden_features: int, out_features: int, bias: bool, act: str,
                 align_hidden: bool = False):
        super().__init__()
        self.gluw1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.gluw2 = nn.Linear(in_features, hidden_features, bias=bias)
        self.gluw3 = nn.Linear(hidden_features, out_features, bias=bias)
        self.act_fn = ACT2FN[act]
        self.silu = act in _SILU_ACTS
        self.hidden_pad = (-hidden_features) % self.ALIGN if align_hidden and hidden_features % 8 else 0
        # (padded W1|W2, b1|b2 or None, padded W3, b3 or None) for decoding; used while armed (inside generate)
        self._decode_weights: tuple[torch.Tensor | None, ...] | None = None
        self._decode_armed = False

    def forward(self, x: torch.Tensor, decode_weights: tuple | None = None) -> torch.Tensor:
        """``decode_weights``: the decoding copies (see :meth:`_decode_segments`) given by the decoder layer inside
        generate(); used without gradients only."""
        pad = self.hidden_pad
        if pad and (x.device.type != "cpu" or self.PAD_ON_CPU) and plain_linears(self.gluw1, self.gluw2, self.gluw3):
            copies = self._armed_weights(decode_weights)
            if copies is not None:
                w12, b12, w3, b3 = copies
                h1, h2 = _linear_bias_apart_if_compiled(x, w12, b12).chunk(2, dim=-1)
                return F.linear(self.act_fn(h1) * h2, w3, b3)
            lin1, lin2 = self.gluw1, self.gluw2
            if x.numel() >= self.MIN_PADDED_ROWS * x.shape[-1] and (lin1.bias is None) == (lin2.bias is None):
                # [W1; 0; W2; 0] as one stack and one pad (and so b1|b2): fewer kernels and autograd nodes than
                # padding each and concatenating
                w12 = F.pad(torch.stack((lin1.weight, lin2.weight)), (0, 0, 0, pad)).flatten(0, 1)
                b12 = None if lin1.bias is None else F.pad(torch.stack((lin1.bias, lin2.bias)), (0, pad)).flatten()
                if b12 is not None and torch.compiler.is_compiling() and torch.is_grad_enabled():
                    h12 = _linear_bias_folded(x, w12, b12)
                else:
                    h12 = _linear_bias_apart_if_compiled(x, w12, b12)
                # (one kernel forward, one backward on CUDA: see metric_learner.joint_swiglu; compiled without
                # gradients, inductor fuses the bias add, SiLU and product into one kernel instead)
                if self.silu and (torch.is_grad_enabled() or not torch.compiler.is_compiling()):
                    hidden = joint_swiglu(h12)
                else:
                    h1, h2 = h12.chunk(2, dim=-1)
                    hidden = self.act_fn(h1) * h2
                return F.linear(hidden, F.pad(self.gluw3.weight, (0, pad)), self.gluw3.bias)
        return self.gluw3(self.act_fn(self.gluw1(x)) * self.gluw2(x))

    def _decode_segments(self):
        """Padded W1|W2 [2H, in], b1|b2 [2H], padded W3 [out, H] and b3 [out] (H the padded hidden width): none for an
        FFN without padding, or where :func:`_decode_copyable` says no."""
        lin1, lin3 = self.gluw1, self.gluw3
        if not self.hidden_pad or not _decode_copyable((lin1, self.gluw2, lin3), self.PAD_ON_CPU):
            return None
        H = lin1.out_features + self.hidden_pad
        bias = lin1.bias is not None
        return lin1.weight, [(2 * H, lin1.in_features), (2 * H,) if bias else None, (lin3.out_features, H),
                             (lin3.out_features,) if bias else None]

    def _decode_params(self, copies):
        lin1, lin2, lin3 = self.gluw1, self.gluw2, self.gluw3
        params = [lin1.weight, lin2.weight, lin3.weight]
        return params if copies[1] is None else params + [lin1.bias, lin2.bias, lin3.bias]

    def _decode_targets(self, copies):
        w12, b12, w3, b3 = copies
        h, H = self.gluw1.out_features, self.gluw1.out_features + self.hidden_pad
        targets = [w12[:h], w12[H:H + h], w3[:, :h]]
        return targets if b12 is None else targets + [b12[:h], b12[H:H + h], b3]


class PldrResidualMetricUnit(nn.Module):
    """One unit of the residual metric learner: ``A = LayerNorm(A + GLU_n(...GLU_1(A)))`` on the rows of A."""

    def __init__(self, config: PldrConfig):
        super().__init__()
        d = config.head_dim
        self.denseAs = nn.ModuleList(
            [PldrGLU(d, config.A_dff, d, config.glu_bias, config.hidden_act) for _ in range(config.num_denseA)]
        )
        self.layernormA = nn.LayerNorm(d, eps=config.layer_norm_eps)

    def forward(self, A: torch.Tensor) -> torch.Tensor:
        residual = A
        for glu in self.denseAs:
            A = glu(A)
        return self.layernormA(A + residual)


class _PortNamedParameters(nn.Module):
    """A module whose parameters are stored as a few stacked or flat tensors (``FLAT``: per training step each
    parameter tensor costs autograd, optimizer, gradient-clipping and zero_grad work on the host, which sets the pace
    of small batches) while ``state_dict()``, ``load_state_dict()`` and transformers' loaders use the published port's
    per-tensor names.

    A subclass lists its port names in ``self._port_names`` {name: (kind, index)}, with ``KIND_HOME`` {kind: stored
    parameter}, and defines ``_views(stored)`` ({kind: view [n, ...]} of a dict of its stored tensors, e.g. clones or
    whole tensors of sharded ones) and ``_init_slot(kind, index, t)`` (a new model's values for one slice). Slices are
    initialised in the order of ``_port_names``, so a new model draws the same random numbers as one with a parameter
    per port name.

    * ``state_dict()`` gives copies of the slices under the port's names; ``load_state_dict()`` takes them (or the
      stored names), reporting the port names that a partial state dict lacks as missing.
    * transformers' loaders reach a port name by attribute (:meth:`_port_get`, :meth:`_port_set`): a slice it loads
      is written into the stored tensor (made on the loaded slice's device and dtype when it is on the meta device or
      elsewhere, its other slices initialised as a new model's); what it passes for a port name missing from the
      checkpoint (a plain tensor of uninitialised memory, not an ``nn.Parameter`` marked ``_is_hf_initialized``) gives
      that slice a new model's values instead."""

    FLAT: tuple[str, ...] = ()
    KIND_HOME: dict[str, str] = {}
    WHAT = "module"  # (how errors name the module)

    def _register_port_names(self, slots):
        self._port_names = {name: (kind, i) for name, kind, i in slots}
        self._register_state_dict_hook(_PortNamedParameters._state_dict_in_port_names)
        self.register_load_state_dict_pre_hook(_PortNamedParameters._load_port_names)

    def _views(self, stored: dict) -> dict:
        """{kind: view [n, ...]} of the kinds held in ``stored`` (some or all of the stored tensors, by name)."""
        raise NotImplementedError

    @staticmethod
    def _init_slot(kind: str, index: int, t: torch.Tensor):
        raise NotImplementedError

    def _stored(self) -> dict:
        return {name: getattr(self, name) for name in self.FLAT}

    @torch.no_grad()
    def _init_stored(self, name: str, tensor: torch.Tensor | None = None):
        """A new model's values for every slice of the stored parameter ``name`` (or of ``tensor`` in its place)."""
        views = self._views({name: getattr(self, name) if tensor is None else tensor})
        for kind, i in self._port_names.values():
            if self.KIND_HOME[kind] == name:
                self._init_slot(kind, i, views[kind][i])

    def _init_new(self):
        """:meth:`_init_stored` for each stored parameter that was not loaded (PreTrainedModel._init_weights)."""
        for name in self.FLAT:
            if not getattr(getattr(self, name), "_is_hf_initialized", False):
                self._init_stored(name)

    @staticmethod
    def _state_dict_in_port_names(module, state_dict, prefix, local_metadata):
        if not all(prefix + name in state_dict for name in module.FLAT):
            return state_dict
        stored = {}
        for name in module.FLAT:
            t = state_dict.pop(prefix + name)
            if _is_dtensor(t):  # a sharded (FSDP2 / DTensor) parameter: slices of the whole tensor
                t = t.full_tensor()
            stored[name] = t.detach()
        views = module._views(stored)
        for name, (kind, i) in module._port_names.items():
            state_dict[prefix + name] = views[kind][i].clone()
        return state_dict

    @staticmethod
    @torch.no_grad()
    def _load_port_names(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                         error_msgs):
        """Writes the port's entries of a state dict into the stored parameters' entries: over the entry under the
        stored name where the state dict has both, else over the parameter's present value (a state dict with only
        the stored names loads as it is). A sharded parameter gets a DTensor laid out as it is."""
        stored = {}
        for name, param in module._stored().items():
            slots = [(n, kind, i) for n, (kind, i) in module._port_names.items() if module.KIND_HOME[kind] == name]
            if not any(prefix + n in state_dict for n, _, _ in slots):
                continue  # (an entry under the stored name loads as it is; none: load_state_dict reports it missing)
            # The port's entries are written over the entry under the stored name where there is one (e.g. the
            # parameter's present value, which torch.distributed.checkpoint adds to a whole state dict), else over
            # the parameter's present value
            base = state_dict.get(prefix + name, param)
            if base.is_meta:
                device = next(state_dict[prefix + n].device for n, _, _ in slots if prefix + n in state_dict)
                stored[name] = torch.empty(param.shape, dtype=param.dtype, device=device)
                module._init_stored(name, stored[name])
            elif _is_dtensor(base):  # (FSDP2: the whole tensor, every rank taking part)
                stored[name] = base.detach().full_tensor().clone()
            else:
                stored[name] = base.detach().clone()
            views = module._views({name: stored[name]})
            for n, kind, i in slots:
                t = state_dict.pop(prefix + n, None)
                if t is None:
                    missing_keys.append(prefix + n)
                elif tuple(t.shape) != tuple(views[kind].shape[1:]):
                    error_msgs.append(f"size mismatch for {prefix + n}: copying a param with shape {tuple(t.shape)} "
                                      f"from checkpoint, the shape in current model is {tuple(views[kind].shape[1:])}.")
                else:
                    views[kind][i].copy_(t)
            if _is_dtensor(param):
                # A sharded (FSDP2 / DTensor) parameter loads a DTensor: the whole tensor laid out as the parameter
                # (its port-name entries came whole, as state_dict() gives them and torch.distributed.checkpoint reads
                # them back)
                from torch.distributed.tensor import distribute_tensor

                stored[name] = distribute_tensor(stored[name].to(param.to_local().device), param.device_mesh,
                                                 param.placements)
            state_dict[prefix + name] = stored[name]

    def _port_get(self, name: str) -> nn.Parameter:
        """The slice of a port name, as an ``nn.Parameter`` on the stored parameter's memory (for loaders, which ask
        for parameters; it is not the stored parameter: gradients do not reach the model through it)."""
        kind, i = self._port_names[name]
        param = getattr(self, self.KIND_HOME[kind])
        if param.is_meta:
            # One object per port name while the stored tensor is on the meta device (offloaded by accelerate):
            # transformers' save of an offloaded model tells a state dict's meta entries apart by the identity of
            # what this answers (a new object each time could reuse a freed one's id: "shared tensors")
            cache = self.__dict__.setdefault("_meta_port_params", {})
            hit = cache.get(name)
            if hit is None or hit[0] is not param:
                hit = cache[name] = (param, nn.Parameter(self._views({self.KIND_HOME[kind]: param})[kind].detach()[i],
                                                         requires_grad=param.requires_grad))
            return hit[1]
        return nn.Parameter(self._views(self._stored())[kind].detach()[i], requires_grad=param.requires_grad)

    def __setattr__(self, name: str, value):
        if name == "_hf_hook":  # (accelerate attaching its hook: see _PortNamedWeights)
            _read_offloaded_weights_by_stored_names(self, value)
        super().__setattr__(name, value)

    @torch.no_grad()
    def _assemble(self, name: str, weights) -> torch.Tensor:
        """The stored parameter ``name`` made from the port's entries of ``weights`` (a mapping by port name)."""
        slots = [(n, kind, i) for n, (kind, i) in self._port_names.items() if self.KIND_HOME[kind] == name]
        lacking = [n for n, _, _ in slots if n not in weights]
        if lacking:
            raise KeyError(f"{self.WHAT}: the offloaded weights hold neither {name!r} nor the port's entries "
                           f"{lacking[:3]}{' ...' if len(lacking) > 3 else ''} it is made of")
        first = weights[slots[0][0]]
        stored = torch.empty(getattr(self, name).shape, dtype=first.dtype, device=first.device)
        views = self._views({name: stored})
        for n, kind, i in slots:
            t = weights[n]
            if tuple(t.shape) != tuple(views[kind].shape[1:]):
                raise ValueError(f"{self.WHAT}: offloaded weight {n} has shape {tuple(t.shape)}, the model's is "
                                 f"{tuple(views[kind].shape[1:])}")
            views[kind][i].copy_(t)
        return stored

    @torch.no_grad()
    def _port_set(self, name: str, value: torch.Tensor, placeholder: bool = False):
        """Writes ``value`` into the slice of a port name; with ``placeholder`` (a loader's stand-in for a tensor its
        checkpoint lacks) the slice gets a new model's values instead."""
        kind, i = self._port_names[name]
        home = self.KIND_HOME[kind]
        param = getattr(self, home)
        shape = tuple(self._views(self._stored())[kind].shape[1:])
        if tuple(value.shape) != shape:
            raise ValueError(f"{self.WHAT}: {name} must have shape {shape}, got {tuple(value.shape)}")
        if param.device != value.device or param.dtype != value.dtype or param.is_meta:
            # Loading into a model made on the meta device: the stored parameter is created on the first slice,
            # initialised as a new model's (slices the checkpoint lacks keep that), then filled slice by slice.
            fresh = nn.Parameter(torch.empty(param.shape, dtype=value.dtype, device=value.device),
                                 requires_grad=param.requires_grad)
            if param.is_meta:
                self._init_stored(home, fresh)
            else:
                fresh.copy_(param)
            fresh._is_hf_initialized = True
            setattr(self, home, fresh)
        view = self._views(self._stored())[kind][i]
        if placeholder:
            self._init_slot(kind, i, view)
        else:
            view.copy_(value)


class _PortNamedWeights(Mapping):
    """An offloaded module's weights as accelerate's hook reads them before each forward (``weights_map[name]`` for
    each of the module's own parameters), for a :class:`_PortNamedParameters` module: by the stored parameters'
    names. A map made from a state dict or a checkpoint (disk offloading, ``from_pretrained(device_map=...)`` with
    layers on "cpu" or "disk", ``dispatch_model`` writing ``state_dict()`` to disk) holds the port's names instead;
    a stored parameter is then made from its port entries at each read (offloaded weights are read at each forward
    anyway)."""

    def __init__(self, module: "_PortNamedParameters", weights):
        self.module, self.weights = module, weights

    def __getitem__(self, key: str):
        module = self.module
        if key in module.FLAT:
            try:
                return self.weights[key]
            except KeyError:
                return module._assemble(key, self.weights)
        if key in module._port_names:  # (transformers' save of an offloaded model reads them by the port's names)
            try:
                return self.weights[key]
            except KeyError:
                kind, i = module._port_names[key]
                home = module.KIND_HOME[kind]
                return module._views({home: self.weights[home]})[kind][i].clone()
        return self.weights[key]

    def __iter__(self):
        return iter([name for name, _ in self.module.named_parameters(recurse=False)]
                    + [name for name, _ in self.module.named_buffers(recurse=False)])

    def __len__(self) -> int:
        return len(list(iter(self)))


def _read_offloaded_weights_by_stored_names(module: "_PortNamedParameters", hook) -> None:
    """Lets an accelerate hook that offloads ``module`` (its ``weights_map``; also inside a ``SequentialHook``) read
    the stored parameters from a map by the port's names (:class:`_PortNamedWeights`)."""
    for h in getattr(hook, "hooks", None) or (hook,):
        weights = getattr(h, "weights_map", None)
        if weights is not None and not isinstance(weights, _PortNamedWeights):
            h.weights_map = _PortNamedWeights(module, weights)


def _is_dtensor(t) -> bool:
    return hasattr(t, "device_mesh") and hasattr(t, "placements") and hasattr(t, "full_tensor")


def _is_placeholder(value) -> bool:
    """Whether a tensor assigned to a port name is transformers' stand-in for a tensor missing from a checkpoint
    (uninitialised memory to be initialised): a plain tensor, where its loader hands every loaded tensor over as an
    ``nn.Parameter`` marked ``_is_hf_initialized``."""
    return (isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter)
            and not getattr(value, "_is_hf_initialized", False))


class PldrMetricLearner(_PortNamedParameters):
    """The residual metric learner of a PLGA layer (``num_reslayerA`` units of ``num_denseA`` SwiGLUs and a LayerNorm,
    the math of :class:`PldrResidualMetricUnit`) with its parameters stored in two flat tensors, run as one operator
    (``metric_learner.py``, :func:`flat_metric_learner`):

    * ``glu_weights``: W1|W2 [2G, A_dff, d] (gluw1.weight and gluw2.weight of each GLU in turn, G = units x GLUs,
      unit-major), then W3 [G, d, A_dff];
    * ``biases_and_layernorms``: b1|b2 [2G, A_dff] and b3 [G, d] (none without ``glu_bias``), then the LayerNorms'
      weights and biases [units, d].

    Two parameter tensors per layer instead of 112 (at the papers' sizes; 6 when stacked per kind), each a contiguous
    part of the flat gradient that the operator's backward writes, so no copy assembles them. Trainer's weight-decay
    rule (not on biases and LayerNorms, by name) treats the two as the modules' weights and the rest. The views by
    kind: :meth:`kinds`.

    Checkpoints keep the original's (and the transformers port's) per-unit names,
    ``reslayerAs.{u}.denseAs.{j}.gluw{1,2,3}.{weight,bias}`` and ``reslayerAs.{u}.layernormA.{weight,bias}``
    (:class:`_PortNamedParameters`); transformers' loader reaches them through ``getattr``
    (``learner.3.denseAs.1.gluw2.weight`` is the slice ``kinds()["gluw12_weight"][2 * (3 * J + 1) + 1]``). For adapters
    on the learner's GLUs, :meth:`PldrPreTrainedModel.use_metric_learner_modules` turns the learners back into
    modules.
    """

    KINDS = ("gluw12_weight", "gluw3_weight", "gluw12_bias", "gluw3_bias", "layernormA_weight", "layernormA_bias")
    FLAT = ("glu_weights", "biases_and_layernorms")
    KIND_HOME = {"gluw12_weight": "glu_weights", "gluw3_weight": "glu_weights"} | {
        k: "biases_and_layernorms" for k in KINDS[2:]}
    WHAT = "metric learner"

    def __init__(self, config: PldrConfig):
        super().__init__()
        self.eps = config.layer_norm_eps
        self.config_for_modules = config
        self.layout = LearnerLayout(config.num_reslayerA, config.num_denseA, config.A_dff, config.head_dim,
                                    bool(config.glu_bias))
        n = self.layout.weights_numel
        self.glu_weights = nn.Parameter(torch.empty(n))
        self.biases_and_layernorms = nn.Parameter(torch.empty(self.layout.total - n))
        self._register_port_names(self._port_slots())
        self._init_stored("biases_and_layernorms")  # (no random numbers: zeros, and LayerNorm weights 1)

    def __len__(self) -> int:
        return self.layout.units

    def forward(self, A: torch.Tensor, norm: tuple | None = None) -> torch.Tensor:
        """The learner on the rows of A; ``norm`` = (weight, bias): a LayerNorm of the rows first (of this learner's
        eps), inside the operator (the attention passes its LayerNorm of A so)."""
        lay = self.layout
        return flat_metric_learner(A, self.glu_weights, self.biases_and_layernorms, lay.units, lay.glus, lay.hidden,
                                   self.eps, norm)

    def kinds(self) -> dict[str, torch.Tensor]:
        """The parameters by kind, as views of the flat ones (with gradients): ``gluw12_weight`` [2G, h, d],
        ``gluw3_weight`` [G, d, h], ``gluw12_bias`` [2G, h], ``gluw3_bias`` [G, d] (without biases: absent),
        ``layernormA_weight`` and ``layernormA_bias`` [units, d]."""
        return self._views(self._stored())

    def _views(self, stored: dict) -> dict:
        views = self.layout.unpack_pair(stored.get("glu_weights"), stored.get("biases_and_layernorms"))
        return {k: v for k, v in zip(self.KINDS, views) if v is not None}

    @staticmethod
    def _init_slot(kind: str, index: int, t: torch.Tensor):
        """A new model's values: each GLU's weights as an nn.Linear of the original (Xavier uniform per matrix), zero
        biases, LayerNorm weights 1 and biases 0."""
        if kind in ("gluw12_weight", "gluw3_weight"):
            nn.init.xavier_uniform_(t)
        elif kind == "layernormA_weight":
            nn.init.ones_(t)
        else:
            nn.init.zeros_(t)

    def extra_repr(self) -> str:
        lay = self.layout
        return f"units={lay.units}, glus_per_unit={lay.glus}, d={lay.d}, hidden={lay.hidden}, bias={lay.bias}"

    def _port_slots(self):
        """(name relative to this module in the port's layout, kind, index in it), kinds in :attr:`KINDS` order."""
        lay = self.layout
        slots = {kind: [] for kind in self.KINDS}
        for u in range(lay.units):
            for j in range(lay.glus):
                g = u * lay.glus + j
                p = f"{u}.denseAs.{j}."
                slots["gluw12_weight"] += [(p + "gluw1.weight", 2 * g), (p + "gluw2.weight", 2 * g + 1)]
                slots["gluw3_weight"].append((p + "gluw3.weight", g))
                if lay.bias:
                    slots["gluw12_bias"] += [(p + "gluw1.bias", 2 * g), (p + "gluw2.bias", 2 * g + 1)]
                    slots["gluw3_bias"].append((p + "gluw3.bias", g))
            slots["layernormA_weight"].append((f"{u}.layernormA.weight", u))
            slots["layernormA_bias"].append((f"{u}.layernormA.bias", u))
        for kind, entries in slots.items():  # (each kind's entries in index order)
            for name, i in entries:
                yield name, kind, i

    def __getattr__(self, name: str):
        # transformers' loader reaches a checkpoint entry by attribute path (``learner.0.denseAs.1.gluw1.weight``)
        layout = self.__dict__.get("layout")
        if name.isdigit() and layout is not None and int(name) < layout.units:
            return _PortNameView(self, name + ".")
        return super().__getattr__(name)

    # -- conversion to modules -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def to_units(self) -> nn.ModuleList:
        """The same learner as a ModuleList of :class:`PldrResidualMetricUnit` (the port's modules), with copies of
        the weights on the same device and dtype."""
        units = nn.ModuleList([PldrResidualMetricUnit(self.config_for_modules) for _ in range(self.layout.units)])
        units.to(device=self.glu_weights.device, dtype=self.glu_weights.dtype)
        own = dict(units.named_parameters())
        for name in self._port_names:
            own[name].copy_(self._port_get(name))
        return units


class _PortNameView(nn.Module):
    """A path into a :class:`PldrMetricLearner` in the port's per-unit names (``0.``, ``0.denseAs.``, ...), for loaders
    that reach parameters by attribute: reading the leaf gives the slice, assigning it writes the slice."""

    def __init__(self, learner: PldrMetricLearner, path: str):
        super().__init__()
        object.__setattr__(self, "_learner", learner)
        object.__setattr__(self, "_path", path)

    def __getattr__(self, name: str):
        learner, path = self.__dict__["_learner"], self.__dict__["_path"]
        full = path + name
        if full in learner._port_names:
            return learner._port_get(full)
        if any(n.startswith(full + ".") for n in learner._port_names):
            return _PortNameView(learner, full + ".")
        return super().__getattr__(name)

    def __setattr__(self, name: str, value):
        learner, path = self.__dict__["_learner"], self.__dict__["_path"]
        if path + name in learner._port_names:
            learner._port_set(path + name, value.detach() if isinstance(value, torch.Tensor) else value,
                              placeholder=_is_placeholder(value))
            return
        super().__setattr__(name, value)


class _GramFunction(torch.autograd.Function):
    """``A = sum over positions s of mask_s q_s^T q_s`` in ``dtype`` (the model passes float32) for q [B, H, S, d] of
    any float dtype and an optional mask [B, 1, S, 1]. Saves q itself (which attention keeps anyway) instead of two
    float32 copies, and its backward is one GEMM: ``dq = mask * q (dA + dA^T)``."""

    @staticmethod
    def forward(ctx, q, mask, dtype):
        A = _gram(q, mask, dtype)
        ctx.save_for_backward(q, mask)
        ctx.dtype = dtype
        return A

    @staticmethod
    def backward(ctx, g_A):
        q, mask = ctx.saved_tensors
        with torch.autocast(device_type=q.device.type, enabled=False):
            sym = g_A + g_A.transpose(-1, -2)
            # With bfloat16 q on a GPU the gradient is one bfloat16 GEMM: the d x d factor rounded to bfloat16, as
            # autocast rounds the operands of every other GEMM of the backward (not float16: its range could
            # overflow), float32 accumulation rounded once at the end, as the cast of a float32 result would be (a
            # float32 [B, H, S, d] result would be written and read again only to be rounded). A backward that builds
            # a graph (second derivatives) takes the float32 matmul, for float32 second derivatives.
            if (q.is_cuda and q.dtype == torch.bfloat16 and ctx.dtype == torch.float32
                    and not torch.is_grad_enabled()):
                g = torch.matmul(q, sym.to(q.dtype))
                return (g if mask is None else g * mask.to(q.dtype)), None, None
            g = torch.matmul(q.to(ctx.dtype), sym)
            if mask is not None:
                g = g * mask
        return g.to(q.dtype), None, None


class PldrPowerLaw(_PortNamedParameters):
    """The power law step: ``A_LM = iSwiGLU(W @ A + b) + 1e-9``, ``G_LM = a @ (A_LM ** p) + ba`` per head.

    Computed in float32 whatever the model's dtype: the tensors are tiny ([heads, d, d]) and fp16/bf16 would turn small
    A_LM into 0 and the power law into inf/NaN.

    The five parameters are stored as one, ``power_params`` [5, heads, d, d] (W, b, p, a, ba: fewer tensors per
    training step, and the operator's backward writes their gradient as one tensor). ``Wlst``, ``blst``, ``pwlst``,
    ``alst`` and ``balst`` read as views of it (gradients reach it through them) and are the names of checkpoints and
    state dicts (:class:`_PortNamedParameters`).
    """

    NAMES = ("Wlst", "blst", "pwlst", "alst", "balst")
    FLAT = ("power_params",)
    KIND_HOME = {"power_params": "power_params"}
    WHAT = "power law"

    def __init__(self, config: PldrConfig):
        super().__init__()
        self.power_params = nn.Parameter(torch.empty(5, config.num_attention_heads, config.head_dim, config.head_dim))
        self._register_port_names((name, "power_params", i) for i, name in enumerate(self.NAMES))

    def forward(self, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _power_law_step(A, self.power_params)

    def _views(self, stored: dict) -> dict:
        return stored

    @staticmethod
    def _init_slot(kind: str, index: int, t: torch.Tensor):
        """The original's initialisation: Xavier normal W, p and a, zero b and ba."""
        if index in (1, 4):
            nn.init.zeros_(t)
        else:
            nn.init.xavier_normal_(t)

    def __getattr__(self, name: str):
        if name in PldrPowerLaw.NAMES:
            return self.power_params[PldrPowerLaw.NAMES.index(name)]
        return super().__getattr__(name)

    def __setattr__(self, name: str, value):
        if name in PldrPowerLaw.NAMES:
            self._port_set(name, value.detach() if isinstance(value, torch.Tensor) else value,
                           placeholder=_is_placeholder(value))
            return
        super().__setattr__(name, value)


def _power_law_step(A, params) -> tuple[torch.Tensor, torch.Tensor]:
    """:class:`PldrPowerLaw`'s math (``params`` = W, b, p, a, ba stacked [5, H, d, d]): one operator
    (metric_learner.power_law), one Triton kernel each way on CUDA."""
    if not torch.is_grad_enabled() and not torch.compiler.is_compiling():
        # (e.g. a 16-bit model's prefill: the kernel reads the 16-bit tensors as float32 itself, two casts fewer)
        return power_law_forward(A, params)
    dtype = _wide_dtype(A.dtype, params.dtype)
    return power_law(A.to(dtype), params.to(dtype))


def _normed_metric(A: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """The LayerNorm of the float32 (float64) metric sum A (``layernorm1`` of the attention), in the LayerNorm's
    dtype."""
    if weight.dtype in (torch.float32, torch.float64):
        return F.layer_norm(A.to(weight.dtype), weight.shape, weight, bias, eps)
    # A float16/bfloat16 model normalises the float32 sum before casting it: the raw sum grows with the sequence
    # length and |q|^2 and overflows float16 (65504) on long or large-norm inputs (inf, then NaN).
    return F.layer_norm(A, weight.shape, weight.float(), bias.float(), eps).to(weight.dtype)


def _deduction_runs_kernels(A, ln_weight, ln_bias, weights, norms, power_params, *, sizes: tuple, eps: float):
    """Whether :func:`_deduce` on these tensors runs Triton kernels and no library GEMM (what its CUDA graphs record;
    asked once per shape, dtype and autocast state)."""
    return runs_kernels_only(A, weights, norms, *sizes, power_params, norm=(ln_weight, ln_bias))


def _deduce(A, ln_weight, ln_bias, weights, norms, power_params, *, sizes: tuple, eps: float):
    """A layer's deduction from its metric sum A: ``(A, A_LM, G_LM)`` after the LayerNorm and the metric learner (one
    operator: :class:`PldrMetricLearner`'s flat parameters, ``sizes`` its units, GLUs per unit and hidden width) and
    the power law. What the modules compute, as a function of tensors, so that :class:`DeductionGraphs` can record
    it."""
    A = flat_metric_learner(A, weights, norms, *sizes, eps, norm=(ln_weight, ln_bias))
    return (A, *_power_law_step(A, power_params))


def rotary_angles(position_ids: torch.Tensor, head_dim: int, base: float) -> torch.Tensor:
    """Rotation angles ``p * base^(-2i/d)`` in float32, shape [batch, seq, head_dim / 2] (same float ops as the
    original implementation, whose outputs are sensitive to the last bit of these angles)."""
    theta = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=position_ids.device)[: head_dim // 2].float() / head_dim))
    return position_ids.to(torch.float32)[..., None] * theta


def rotary_tables(
    position_ids: torch.Tensor, head_dim: int, base: float, interleaved: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-width cos and signed sin [batch, seq, 1, head_dim] (float32) for :func:`apply_rotary_tables`.

    Computed once per forward and shared by every layer, so that each layer rotates q and k with a few elementwise
    operations instead of re-deriving the angles (the decoding step is launch-bound at small batch).
    """
    angles = rotary_angles(position_ids, head_dim, base)
    cos, sin = angles.cos(), angles.sin()
    if interleaved:
        cos_full = torch.stack((cos, cos), dim=-1).flatten(-2)
        sin_signed = torch.stack((-sin, sin), dim=-1).flatten(-2)
    else:
        cos_full = torch.cat((cos, cos), dim=-1)
        sin_signed = torch.cat((-sin, sin), dim=-1)
    return cos_full[:, :, None, :], sin_signed[:, :, None, :]


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention with an explicit score matrix (returns the weights). query/key/value: [batch, heads, seq, head_dim].
    attention_mask: additive (float) or boolean (True attends), e.g. a custom 4D mask."""
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        mask = attention_mask[:, :, :, : key.shape[-2]]
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + mask
    weights = F.softmax(scores, dim=-1, dtype=_wide_dtype(query.dtype)).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    out = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return out, weights


# ----------------------------------------------------------------------------------------------------------------------
# Power Law Graph Attention
# ----------------------------------------------------------------------------------------------------------------------
class PldrAttention(_DecodeWeightCopies, nn.Module):
    """Power Law Graph Attention (PLGA) of one decoder layer.

    Attribute names follow the original implementation: ``wq, wk, wv, dense`` (projections), ``layernorm1`` (the
    d-sized LayerNorm on A), ``reslayerAs`` (metric learner), ``plgatt_layer`` (power law parameters).
    """

    def __init__(self, config: PldrConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5
        self.is_causal = True
        self.learned_G = config.custom_G_type is None
        D = config.hidden_size
        self.wq = nn.Linear(D, D, bias=config.attention_bias)
        self.wk = nn.Linear(D, D, bias=config.attention_bias)
        self.wv = nn.Linear(D, D, bias=config.attention_bias)
        self.wv._pldr_torch_default_init = True  # the original leaves Wv at PyTorch's default initialisation
        self.dense = nn.Linear(D, D, bias=config.attention_bias)
        if self.learned_G:
            self.layernorm1 = nn.LayerNorm(self.head_dim, eps=config.layer_norm_eps)
            if config.hidden_act in _SILU_ACTS and config.num_reslayerA and config.num_denseA:
                self.reslayerAs = PldrMetricLearner(config)
            else:  # the operator computes SwiGLUs only: other activations keep the modules (as do learners without
                # units, the identity, or units without GLUs, which the config allows)
                self.reslayerAs = nn.ModuleList([PldrResidualMetricUnit(config) for _ in range(config.num_reslayerA)])
            self.plgatt_layer = PldrPowerLaw(config)
            options = dict(eps=config.layer_norm_eps, sizes=(config.num_reslayerA, config.num_denseA, config.A_dff))
            self._deduction_graphs = DeductionGraphs(functools.partial(_deduce, **options),
                                                     functools.partial(_deduction_runs_kernels, **options))
        # (stacked W_q|W_k|W_v, its bias, the dense projection's weight and bias, each None where absent or not copied)
        # for decoding; used while armed, inside generate
        self._decode_weights: tuple[torch.Tensor | None, ...] | None = None
        self._decode_armed = False

    # On accelerators q, k and v are projected as one GEMM with the three weights stacked, when wq, wk and wv are plain
    # nn.Linear modules (PEFT adapters, hooks: the modules run). Off on CPU, where it gains nothing; the tests turn it
    # on there.
    # * Large inputs (training, prefill: at least MIN_JOINT_ROWS rows) stack the weights on the fly (_joint_linear).
    # * Decoding steps would pay that copy every step, so inside generate() (PldrForCausalLM.generate) no-grad forwards
    #   use a stacked copy made once per call (see _DecodeWeightCopies), with a copy of the dense projection beside it.
    #   They stay allocated at fixed addresses between calls (refreshed at the start of each), which compiled decoding
    #   with CUDA graphs reads in place: extra memory of the four projections' weights per layer.
    MIN_JOINT_ROWS = 1024
    JOINT_ON_CPU = False

    def project(self, hidden_states: torch.Tensor, decode_weights: tuple | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(q and k side by side [B, S, 2H, d], v [B, S, H, d]) of hidden_states [B, S, D], before the rotation.
        ``decode_weights``: the decoding copies given by the decoder inside generate() (no-grad forwards only)."""
        return self._split_projection(hidden_states, self._joint_projection(hidden_states, decode_weights))

    def _split_projection(self, hidden_states: torch.Tensor, qkv: torch.Tensor | None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`project`'s result from the joint projection qkv (views into it), or from the modules where it is
        None."""
        B, S, _ = hidden_states.shape
        H, d = self.num_heads, self.head_dim
        if qkv is not None:
            return qkv[..., : 2 * H * d].view(B, S, 2 * H, d), qkv[..., 2 * H * d:].view(B, S, H, d)
        shape = (B, S, H, d)
        # (q and k in one tensor: rotated in one go, fewer kernel launches per decoding step)
        qk = torch.cat((self.wq(hidden_states).view(shape), self.wk(hidden_states).view(shape)), dim=2)
        return qk, self.wv(hidden_states).view(shape)

    def _joint_projection(self, hidden_states: torch.Tensor, decode_weights: tuple | None = None) -> torch.Tensor | None:
        """q|k|v [B, S, 3D] of hidden_states as one GEMM (q's heads, then k's, then v's), or None where the modules run
        one by one (see :meth:`project`)."""
        lins = (self.wq, self.wk, self.wv)
        if (hidden_states.device.type != "cpu" or self.JOINT_ON_CPU) and plain_linears(*lins):
            copies = self._armed_weights(decode_weights)
            if copies is not None and copies[0] is not None:
                return F.linear(hidden_states, copies[0], copies[1])
            if hidden_states.numel() >= self.MIN_JOINT_ROWS * hidden_states.shape[-1]:
                return _joint_linear(hidden_states, [lin.weight for lin in lins], [lin.bias for lin in lins])
        return None

    def rotated_qkv(self, hidden_states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    decode_weights: tuple | None = None, metric_sum: bool = False,
                    token_mask: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(q, k, v, A): q, k, v [B, H, S, d] of hidden_states [B, S, D], q and k rotated, q contiguous; A None, or
        with ``metric_sum`` where the operator below takes it, the metric sum of q (:meth:`_metric_sum` without
        sequence groups, over the positions that ``token_mask`` [B, S] keeps).

        With gradients and q, k, v from one GEMM (training) this is one operator, ``metric_learner.rotary_qkv`` (or
        ``rotary_qkv_metric_sum``, which also takes q^T q): on CUDA one Triton kernel forward and one backward, whose
        backward writes the joint projection's gradient in one pass (left to autograd or inductor, the rotation's
        backward and the assembly of the joint gradient from dq, dk and dv were two passes, together twice the time of
        the GEMM that reads the result; q^T q's backward a third, and the sum of dq's two parts a fourth). k and v are
        then contiguous too."""
        interleaved = self.config.reference_rope
        qkv = self._joint_projection(hidden_states, decode_weights)
        if qkv is not None and qkv.requires_grad:  # (requires_grad: also that gradients are enabled)
            if metric_sum and rotary_metric_sum_kernels(qkv, self.head_dim):
                return rotary_qkv_metric_sum(qkv, cos, sin, self.num_heads, interleaved, token_mask)
            return (*rotary_qkv(qkv, cos, sin, self.num_heads, interleaved), None)
        qk, v = self._split_projection(hidden_states, qkv)
        q, k = apply_rotary_tables(qk, cos, sin, interleaved).transpose(1, 2).split(self.num_heads, dim=1)
        return q.contiguous(), k, v.transpose(1, 2), None

    def _decode_segments(self):
        """Stacked W_q|W_k|W_v [3D, D] and its bias [3D], the dense projection's weight [D, D] and bias [D]: each pair
        where :func:`_decode_copyable` says yes (the dense pair also needs the dtype and device of the first)."""
        lins = (self.wq, self.wk, self.wv)
        D = self.dense
        qkv = _decode_copyable(lins, self.JOINT_ON_CPU)
        dense = _decode_copyable((D,), self.JOINT_ON_CPU) and (
            not qkv or _copyable_tensors([self.wq.weight, D.weight], self.JOINT_ON_CPU))
        if not (qkv or dense):
            return None
        rows = sum(lin.out_features for lin in lins)
        return (self.wq.weight if qkv else D.weight,
                [(rows, lins[0].in_features) if qkv else None, (rows,) if qkv and lins[0].bias is not None else None,
                 (D.out_features, D.in_features) if dense else None,
                 (D.out_features,) if dense and D.bias is not None else None])

    def _decode_params(self, copies):
        w, b, dw, db = copies
        params = []
        if w is not None:
            params += [self.wq.weight, self.wk.weight, self.wv.weight]
            if b is not None:
                params += [self.wq.bias, self.wk.bias, self.wv.bias]
        if dw is not None:
            params.append(self.dense.weight)
            if db is not None:
                params.append(self.dense.bias)
        return params

    def _decode_targets(self, copies):
        w, b, dw, db = copies
        targets = []
        for full in (w, b) if w is not None else ():
            if full is not None:
                row = 0
                for lin in (self.wq, self.wk, self.wv):
                    targets.append(full[row:row + lin.out_features])
                    row += lin.out_features
        return targets + [t for t in (dw, db) if t is not None]

    def _metric_sum(self, q: torch.Tensor, token_mask: torch.Tensor | None,
                    sequence_groups: SequenceGroups | None) -> torch.Tensor:
        """``sum over non-padding positions s of q_s^T q_s`` in float32 (per sequence with ``sequence_groups``)."""
        if sequence_groups is not None:
            with torch.autocast(device_type=q.device.type, enabled=False):
                return sequence_groups.metric_sum(q)
        dtype = _wide_dtype(q.dtype)
        mask = None if token_mask is None else token_mask[:, None, :, None].to(dtype)
        # (without gradients, e.g. a prefill, the autograd function's own host cost is saved)
        gram = _GramFunction.apply if torch.is_grad_enabled() else _gram
        return gram(q, mask, dtype)

    def _learned_metric(self, A: torch.Tensor) -> torch.Tensor:
        """The LayerNorm of the metric sum A, then the metric learner: one operator, where the LayerNorm and the
        stored learner are plain (no hooks: a hook on the learner sees the normalised A it takes as a module)."""
        ln, learner = self.layernorm1, self.reslayerAs
        if (isinstance(learner, PldrMetricLearner) and ln.eps == learner.eps and plain_layer_norms(ln)
                and not _has_hooks(learner)):
            return learner(A, norm=(ln.weight, ln.bias))
        A = ln(A) if ln.weight.dtype == A.dtype else _normed_metric(A, ln.weight, ln.bias, ln.eps)
        # The metric learner as one operator per layer (Triton kernels on GPU), in training, inference and under
        # torch.compile. Learners kept as modules (use_metric_learner_modules) run through the same operator unless
        # they are not plain (adapters, hooks): then the modules themselves run.
        if isinstance(self.reslayerAs, PldrMetricLearner):
            return self.reslayerAs(A)
        learned = fused_metric_learner(self.reslayerAs, A)
        if learned is not None:
            return learned
        for unit in self.reslayerAs:
            A = unit(A)
        return A

    def _deduction(self, A: torch.Tensor, graphs_allowed: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(A, A_LM, G_LM)`` from the metric sum A: the LayerNorm, the metric learner and the power law, through
        recorded CUDA graphs (:class:`DeductionGraphs`) where they apply, else operator by operator."""
        graphs = self._deduction_graphs
        if (graphs_allowed and not torch.compiler.is_compiling() and self.config.deduction_cuda_graphs
                and graphs.applies_to(A) and isinstance(self.reslayerAs, PldrMetricLearner)
                and type(self.plgatt_layer) is PldrPowerLaw and plain_layer_norms(self.layernorm1)
                and not _has_hooks(self.reslayerAs) and not _has_hooks(self.plgatt_layer)):
            ln, learner, power = self.layernorm1, self.reslayerAs, self.plgatt_layer
            found = graphs.run((A, ln.weight, ln.bias, learner.glu_weights, learner.biases_and_layernorms,
                                power.power_params))
            if found is not None:
                return found
        A = self._learned_metric(A)
        return (A, *self.plgatt_layer(A))

    def _apply(self, fn, *args, **kwargs):
        if self.learned_G:  # (recorded graphs hold tensors of the old device and dtype)
            self._deduction_graphs.clear()
        return super()._apply(fn, *args, **kwargs)

    def forward(
        self,
        hidden_states: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        token_mask: torch.Tensor | None,
        past_key_values: Cache | None = None,
        fixed_G: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
        output_pldr_attentions: bool = False,
        sequence_groups: SequenceGroups | None = None,
        use_g_cache: bool | None = None,
        decode_weights: tuple | None = None,
        deduction_graphs: bool = True,
        kv_out: list | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, PldrDeductiveOutputs | None]:
        """``deduction_graphs=False`` (the decoder layer's, under gradient checkpointing) keeps the deduction out of
        CUDA graphs. ``kv_out``: a list that gets this layer's (k, v) [B, H, S, d] appended (the decoder stack's
        recorded graph, which fills the cache after its replay)."""
        B, S, _ = hidden_states.shape
        cached = (None,) * 3
        if fixed_G is None and past_key_values is not None:
            cached = past_key_values.get_deductive(self.layer_idx)
        # (q [B, H, S, d] contiguous: q^T q and q G_LM become plain batched GEMMs; in training the rotation's operator
        # may take q^T q itself when this forward deduces G_LM from its queries, one sum per row)
        wants_sum = fixed_G is None and cached[0] is None and cached[2] is None and sequence_groups is None
        q, k, v, A_sum = self.rotated_qkv(hidden_states, *cos_sin, decode_weights, wants_sum, token_mask)
        if past_key_values is not None and not torch.is_grad_enabled():
            # k is a view into q and k's [B, S, 2H, d] buffer. A dynamic cache concatenates it to its keys every step,
            # and torch.cat takes a slow, unvectorised path for a non-contiguous part (~15% of a batch-32 decoding
            # step's GPU time on an H100); the copy costs little next to that.
            k = k.contiguous()
            # (v is a view into q, k and v's joint projection on large inputs: the cache must not keep all of it)
            v = v.contiguous()
            # With gradients (training, where a cache is made too unless use_cache=False) k and v are kept as they come
            # (contiguous from the joint projection's rotary operator; else views, the copies being two more kernels).

        # Deduction: A -> A_LM -> G_LM, or their cached / fixed values. Rows holding several sequences
        # (sequence_groups) get one A, A_LM, G_LM per sequence.
        grouped = False
        G_query = None  # G_LM in q's dtype, when the cache holds it so
        if fixed_G is not None:
            A, A_LM, G_LM = fixed_G
        else:
            A, A_LM, G_LM = cached
            if G_LM is not None:
                G_query = past_key_values.get_query_metric(self.layer_idx, q.dtype)
            else:
                if A is None:
                    grouped = sequence_groups is not None
                    if A_sum is None:
                        A_sum = self._metric_sum(q, token_mask, sequence_groups if grouped else None)
                    A, A_LM, G_LM = self._deduction(A_sum, deduction_graphs)
                else:
                    A_LM, G_LM = self.plgatt_layer(A)
                if past_key_values is not None:
                    self._cache_deductive(past_key_values, A, A_LM, G_LM, sequence_groups if grouped else None,
                                          use_g_cache, q.dtype)

        if kv_out is not None:
            kv_out.append((k, v))
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)

        # Induction: scaled dot-product attention on q' = q G_LM.
        if grouped:
            query = sequence_groups.apply_metric(q, G_LM)
        else:
            query = torch.matmul(q, G_query if G_query is not None else G_LM.to(q.dtype))
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        out, weights = attention_interface(
            self,
            query,
            k,
            v,
            attention_mask,
            dropout=self.config.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        if weights is not None and weights.dim() != 4:
            weights = None  # (flex attention gives its log-sum-exp there, not attention weights)
        copies = self._armed_weights(decode_weights)
        if copies is not None and copies[2] is not None and plain_linears(self.dense):
            out = F.linear(out.reshape(B, S, -1), copies[2], copies[3])
        else:
            out = self.dense(out.reshape(B, S, -1))
        deductive = self.deductive_outputs(A, A_LM, G_LM, weights) if output_pldr_attentions else None
        return out, deductive

    def deductive_outputs(self, A, A_LM, G_LM, weights=None) -> PldrDeductiveOutputs:
        """This layer's deductive outputs, with copies of the power law's exponents and coupling."""
        power = self.plgatt_layer if self.learned_G else None
        # Copies, not the parameters themselves: under FSDP a parameter's unsharded storage is freed after the
        # layer's forward, and a loss on the deductive outputs (e.g. the DAG regulariser) must not read it.
        p = a = ba = None
        if power is not None:
            p, a, ba = power.power_params[2:].clone()  # (pwlst, alst, balst: one copy)
        return PldrDeductiveOutputs(
            A=A,
            A_LM=A_LM,
            power_exponents=p,
            coupling=a,
            coupling_bias=ba,
            G_LM=G_LM,
            attention_weights=weights,
        )

    def _cache_deductive(self, cache, A, A_LM, G_LM, sequence_groups: SequenceGroups | None, use_g_cache, query_dtype):
        """Stores this forward's deductive tensors for the next steps: per row (the row's last sequence when a row
        holds several), or with ``cache_first_G`` the first row's for every row. This forward itself has used each
        row's own (as the port does at prefill)."""
        if sequence_groups is not None:
            A, A_LM, G_LM = (t.index_select(0, sequence_groups.row_group) for t in (A, A_LM, G_LM))
        if self.config.cache_first_G:
            A, A_LM, G_LM = A[:1], A_LM[:1], G_LM[:1]
        keep_g = self.config.use_g_cache if use_g_cache is None else use_g_cache
        cache.set_deductive(self.layer_idx, A, A_LM if keep_g else None, G_LM if keep_g else None, query_dtype)


class PldrDecoderLayer(_DecodeWeightCopies, GradientCheckpointingLayer):
    """Post-norm decoder layer: ``h = LN(x + PLGA(x))``, ``out = LN(h + FFN(h))``.

    Inside generate() its LayerNorms' weights and biases have decoding copies too (see :class:`_DecodePack`), on
    accelerators (on CPU with ``COPY_ON_CPU``, for the tests)."""

    COPY_ON_CPU = False

    def __init__(self, config: PldrConfig, layer_idx: int):
        super().__init__()
        self.mha1 = PldrAttention(config, layer_idx)
        self.ffn = PldrGLU(config.hidden_size, config.intermediate_size, config.hidden_size, config.glu_bias,
                           config.hidden_act, align_hidden=True)
        self.layernorm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.layernorm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        # (layernorm1's and layernorm2's weights and biases for decoding; used while armed, inside generate)
        self._decode_weights: tuple[torch.Tensor | None, ...] | None = None
        self._decode_armed = False

    def forward(self, hidden_states: torch.Tensor, decode_weights: tuple | None = None,
                **kwargs) -> tuple[torch.Tensor, PldrDeductiveOutputs | None]:
        """``decode_weights``: (the attention's, the FFN's, the LayerNorms' decoding copies), given by the decoder
        inside generate()."""
        attn_copies, ffn_copies, norm_copies = decode_weights if decode_weights is not None else (None,) * 3
        attn, deductive = self.mha1(hidden_states, decode_weights=attn_copies,
                                    deduction_graphs=not (self.gradient_checkpointing and self.training), **kwargs)
        ln1, ln2 = self.layernorm1, self.layernorm2
        norms = self._armed_weights(norm_copies)
        if norms is None or not plain_layer_norms(ln1, ln2):
            hidden_states = ln1(hidden_states + attn)
            return ln2(hidden_states + self.ffn(hidden_states, decode_weights=ffn_copies)), deductive
        w1, b1, w2, b2 = norms
        hidden_states = F.layer_norm(hidden_states + attn, ln1.normalized_shape, w1, b1, ln1.eps)
        hidden_states = hidden_states + self.ffn(hidden_states, decode_weights=ffn_copies)
        return F.layer_norm(hidden_states, ln2.normalized_shape, w2, b2, ln2.eps), deductive

    def _decode_segments(self):
        """layernorm1's weight and bias, layernorm2's weight and bias [D] (plain LayerNorms of one dtype and device)."""
        ln1, ln2 = self.layernorm1, self.layernorm2
        if not plain_layer_norms(ln1, ln2):
            return None
        params = [t for ln in (ln1, ln2) for t in (ln.weight, ln.bias) if t is not None]
        if not _copyable_tensors(params, self.COPY_ON_CPU):
            return None
        return ln1.weight, [tuple(t.shape) if t is not None else None for ln in (ln1, ln2) for t in (ln.weight, ln.bias)]

    def _decode_params(self, copies):
        return [t for ln in (self.layernorm1, self.layernorm2) for t in (ln.weight, ln.bias) if t is not None]

    def _decode_targets(self, copies):
        return [c for c in copies if c is not None]


# ----------------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------------
class PldrPreTrainedModel(PreTrainedModel):
    config_class = PldrConfig
    config: PldrConfig
    base_model_prefix = "decoder"
    supports_gradient_checkpointing = True
    _no_split_modules = ["PldrDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True
    # The published port also saves a boolean "status" buffer next to past_G_values; it carries no information.
    _keys_to_ignore_on_load_unexpected = [r"past_G_values_status"]

    def __init__(self, config: PldrConfig, *args, **kwargs):
        # A config is checked when it is made, and again here: one changed afterwards (config.tie_word_embeddings = True,
        # a new hidden_size) gets the same error naming the key, not a tied head silently left untied or a failure deep
        # inside a layer's construction.
        if isinstance(config, PldrConfig):
            config.check_pldr_options()
        super().__init__(config, *args, **kwargs)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """``PreTrainedModel.save_pretrained``, also when the model's class was swapped for a subclass made on the fly
        elsewhere (FSDP2's ``fully_shard`` turns PldrForCausalLM into ``FSDPPldrForCausalLM`` of torch's fsdp module):
        the remote code copied and the ``auto_map`` written must be this file's class, not the wrapper's module, so the
        class is set back to the PLDR class for the time of the save."""
        cls = type(self)
        if not cls.__module__.startswith("torch."):  # ours, or a user's subclass (whose own file is the remote code)
            return super().save_pretrained(save_directory, *args, **kwargs)
        base = next((c for c in cls.__mro__ if c.__module__ == PldrPreTrainedModel.__module__), None)
        if base is None or base is PldrPreTrainedModel:
            return super().save_pretrained(save_directory, *args, **kwargs)
        self.__class__ = base
        try:
            return base.save_pretrained(self, save_directory, *args, **kwargs)
        finally:
            self.__class__ = cls

    def get_parameter_or_buffer(self, target: str):
        """``PreTrainedModel.get_parameter_or_buffer``, which transformers' loader asks for each parameter a checkpoint
        lacks; a port name that reads as a view of a stored parameter (``...plgatt_layer.pwlst``) is given as an
        ``nn.Parameter`` on its memory (:meth:`_PortNamedParameters._port_get`)."""
        path, _, name = target.rpartition(".")
        module = self.get_submodule(path)
        if isinstance(module, _PortNamedParameters) and name in module._port_names:
            return module._port_get(name)
        return super().get_parameter_or_buffer(target)

    def use_metric_learner_modules(self):
        """Turns every layer's stacked metric learner (:class:`PldrMetricLearner`) into the port's modules, a
        ModuleList of :class:`PldrResidualMetricUnit` with the same weights and parameter names as the checkpoint
        (``mha1.reslayerAs.{u}.denseAs.{j}.gluw1``, ...), e.g. to put PEFT adapters on the learner's GLUs. Plain
        modules still run as one operator; adapted ones run module by module. Returns the model."""
        for module in list(self.modules()):
            if isinstance(module, PldrAttention) and isinstance(getattr(module, "reslayerAs", None), PldrMetricLearner):
                module.reslayerAs = module.reslayerAs.to_units()
        return self

    @torch.no_grad()
    def _init_weights(self, module):
        """The original implementation's initialisation (see architecture notes in the project docs)."""
        if isinstance(module, nn.Linear):
            if getattr(module, "_pldr_torch_default_init", False):
                init.kaiming_uniform_(module.weight, a=math.sqrt(5))
                if module.bias is not None:
                    bound = 1.0 / math.sqrt(module.in_features)
                    init.uniform_(module.bias, -bound, bound)
            else:
                init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=1.0)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, _PortNamedParameters):
            module._init_new()
        elif isinstance(module, PldrModel) and module.past_G_values is not None:
            init.copy_(module.past_G_values, module.initial_fixed_G())


class PldrModel(PldrPreTrainedModel):
    """The PLDR-LLM decoder: embedding, post-norm PLGA decoder layers; no final norm.

    With ``config.custom_G_type`` set, the per-layer ``[A, A_LM, G_LM]`` are fixed and stored in the buffer
    ``past_G_values`` of shape (num_layers, 3, 1, heads, head_dim, head_dim), as in the published port.
    """

    def __init__(self, config: PldrConfig):
        super().__init__(config)
        self.embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layernorm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dec_layers = nn.ModuleList([PldrDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        if config.custom_G_type is not None:
            self.register_buffer("past_G_values", self.initial_fixed_G(), persistent=True)
            # Loading a learned-G folder as a fixed-G model is expected: its metric learner and power law are unused,
            # and the fixed G comes afterwards (pldr_hf.gfile), so neither is reported as a mismatch.
            self._keys_to_ignore_on_load_unexpected = [r"past_G_values_status",
                                                       r"\.mha1\.(layernorm1|reslayerAs|plgatt_layer)\."]
            self._keys_to_ignore_on_load_missing = [r"(^|\.)past_G_values$"]
        else:
            self.past_G_values = None
        self.gradient_checkpointing = False
        # the decoder stack's recorded CUDA graphs (see _graphed_stack): training forwards (with their backward), and
        # forwards without gradients (evaluation, generate()'s prompt), kept apart so that neither's shapes push the
        # other's out of its keys or use up its recordings
        self._stack_graphs = DeductionGraphs(None, max_keys=self.GRAPHED_STACK_KEYS,
                                             max_recordings=self.GRAPHED_STACK_RECORDINGS, name="the decoder stack")
        self._stack_forward_graphs = DeductionGraphs(None, max_keys=self.GRAPHED_STACK_KEYS,
                                                     max_recordings=self.GRAPHED_STACK_RECORDINGS,
                                                     name="the decoder stack (forward only)",
                                                     lock=self._stack_graphs.lock)
        self._stack_id, self._stack_arch = _register_stack(self)  # (how the compiled stack's operator finds it)
        self._static_cache_buffers = _StaticCacheBuffers()
        # the layers' decoding weight copies, in one buffer (see _DecodePack); used while armed, inside generate
        self._decode_pack = _DecodePack()
        self._decode_armed = False
        self._generate_calls = 0  # generate() calls running on this model, in any thread (see PldrForCausalLM.generate)
        self.post_init()

    def __setstate__(self, state):
        # (a copy - deepcopy, pickle - is a model of its own for the compiled stack's operator)
        super().__setstate__(state)
        self._stack_id, self._stack_arch = _register_stack(self)

    def _apply(self, fn, *args, **kwargs):
        # (.to(), .cpu(), .half(), ...: the static caches' kept buffers and the decoding weight copies would stay on the
        # old device, holding its memory; the recorded graphs read the old parameters)
        for graphs in (getattr(self, "_stack_graphs", None), getattr(self, "_stack_forward_graphs", None)):
            if graphs is not None:
                graphs.clear()
        if getattr(self, "_static_cache_buffers", None) is not None:
            self._static_cache_buffers.release()
        if getattr(self, "_decode_pack", None) is not None:
            self.release_decode_weights()
        return super()._apply(fn, *args, **kwargs)

    def _decode_copiers(self) -> list | None:
        """Per layer its attention, FFN and the layer itself (its LayerNorms): the modules with decoding copies."""
        modules = [m for layer in self.dec_layers for m in (layer.mha1, layer.ffn, layer)]
        return modules if all(isinstance(m, _DecodeWeightCopies) for m in modules) else None

    def arm_decode_weights(self) -> bool:
        """Fills the layers' decoding weight copies from the current parameters, in one buffer kept between calls
        (see :class:`_DecodePack`), and turns their use on for no-grad forwards; returns whether any was made."""
        modules = self._decode_copiers()
        self._decode_armed = modules is not None and any(self._decode_pack.arm(modules))
        return self._decode_armed

    def disarm_decode_weights(self):
        self._decode_armed = False
        for module in self._decode_copiers() or ():
            module.disarm_decode_weights()

    def release_decode_weights(self):
        """Turns the copies off and frees their memory."""
        self._decode_armed = False
        self._decode_pack = _DecodePack()
        for module in self._decode_copiers() or ():
            module.release_decode_weights()

    def initial_fixed_G(self) -> torch.Tensor:
        """[A, A_LM, G_LM] per layer for a fixed-G model: zeros, zeros, and identity (or random for "random")."""
        c = self.config
        shape = (c.num_hidden_layers, 1, c.num_attention_heads, c.head_dim, c.head_dim)
        if c.custom_G_type == "random":
            G = torch.randn(shape)
        else:
            G = torch.eye(c.head_dim).expand(shape).clone()
        return torch.stack([torch.zeros(shape), torch.zeros(shape), G], dim=1)

    def set_fixed_G(self, G_LM: torch.Tensor, A_LM: torch.Tensor | None = None):
        """Sets the fixed G_LM (and optionally A_LM) of a ``custom_G_type`` model, shape [layers, heads, d, d]."""
        if self.past_G_values is None:
            raise ValueError("set_fixed_G needs a model with config.custom_G_type set (e.g. 'external').")
        expected = (self.config.num_hidden_layers, self.config.num_attention_heads, self.config.head_dim,
                    self.config.head_dim)
        for name, t in (("G_LM", G_LM), ("A_LM", A_LM)):
            if t is not None and tuple(t.shape) != expected:
                raise ValueError(f"{name} must have shape {expected} (layers, heads, head_dim, head_dim), "
                                 f"got {tuple(t.shape)}.")
        with torch.no_grad():
            self.past_G_values[:, 2, 0] = G_LM.to(self.past_G_values)
            if A_LM is not None:
                self.past_G_values[:, 1, 0] = A_LM.to(self.past_G_values)

    def get_input_embeddings(self):
        return self.embedding

    def set_input_embeddings(self, value):
        self.embedding = value

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        output_pldr_attentions: bool | None = None,
        use_g_cache: bool | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> PldrModelOutputWithPast:
        r"""
        Rows may hold several sequences (packed or padding-free batches, shared prefixes): they are read from
        ``cu_seq_lens_q``/``cu_seq_lens_k``, a custom 4D ``attention_mask``, or ``position_ids`` that restart at a
        sequence start (looked for when no ``past_key_values`` is passed; one host sync). Each position then gets the
        metric tensor A of its own sequence and attends only inside it; see ``packing.py``.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        if input_ids is not None and input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape [batch, seq_len], got {tuple(input_ids.shape)}.")
        if input_ids is not None and (input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool):
            raise ValueError(f"input_ids must be integer token ids, got dtype {input_ids.dtype}.")
        if inputs_embeds is not None and (inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.hidden_size):
            raise ValueError(
                f"inputs_embeds must have shape [batch, seq_len, {self.config.hidden_size}], got {tuple(inputs_embeds.shape)}."
            )
        if (input_ids if input_ids is not None else inputs_embeds).shape[1] == 0:
            raise ValueError("input_ids / inputs_embeds hold no positions (sequence length 0).")
        if input_ids is not None and input_ids.device.type == "cpu" and not torch.compiler.is_compiling():
            # (on CPU the check costs a few microseconds; on an accelerator reading the ids back would stall the host
            # at every forward, so an id outside the table is torch's own device-side error there)
            size = getattr(self.embedding, "num_embeddings", None)
            if size is not None and input_ids.numel():
                low, high = torch.aminmax(input_ids)
                if low < 0 or high >= size:
                    raise ValueError(f"input_ids hold token id {int(low if low < 0 else high)}, outside the "
                                     f"embedding table's 0 ... {size - 1} (vocab_size {self.config.vocab_size}).")
        c = self.config
        use_cache = use_cache if use_cache is not None else c.use_cache
        output_attentions = output_attentions if output_attentions is not None else c.output_attentions
        output_hidden_states = output_hidden_states if output_hidden_states is not None else c.output_hidden_states
        output_pldr_attentions = output_pldr_attentions if output_pldr_attentions is not None else c.output_pldr_attentions
        if output_attentions and c._attn_implementation != "eager":
            # (as transformers' own SDPA and flash functions warn for an in-tree model)
            logger.warning_once(
                f"`output_attentions=True` with attn_implementation {c._attn_implementation!r}: its kernels do not "
                "materialise the attention weights, so `attentions` holds None for every layer. Use "
                "`model.set_attn_implementation(\"eager\")` (or `attn_implementation=\"eager\"` when loading) to get them.")
        if self.gradient_checkpointing and self.training and use_cache:
            use_cache = False

        if inputs_embeds is None:
            inputs_embeds = self.embedding(input_ids)
        B, S, D = inputs_embeds.shape
        if _is_2d(attention_mask) and attention_mask.shape[0] != B:
            raise ValueError(f"attention_mask has batch size {attention_mask.shape[0]}, inputs have {B}.")
        if position_ids is not None and (position_ids.dim() != 2 or position_ids.shape[0] not in (1, B)
                                         or position_ids.shape[1] != S):
            raise ValueError(f"position_ids must have shape [batch ({B}) or 1, seq_len ({S})], got "
                             f"{tuple(position_ids.shape)}.")

        past_key_values = _one_cache(past_key_values, cache)
        fresh_input = past_key_values is None
        if use_cache:
            past_key_values = PldrDynamicCache(config=c) if past_key_values is None else as_pldr_cache(past_key_values)
        elif past_key_values is not None:
            past_key_values = as_pldr_cache(past_key_values)
        lent_layers = None
        if past_key_values is not None and not torch.compiler.is_compiling():
            lent_layers = self._static_cache_buffers.lend(past_key_values)

        past_seen = past_key_values.get_seq_length() if past_key_values is not None else 0
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4:
            shape = tuple(attention_mask.shape)
            # (a static cache's length is a tensor: the key positions are then not checked, which would sync)
            short = isinstance(past_seen, int) and shape[3] < past_seen + S
            if shape[0] not in (1, B) or shape[1] not in (1, c.num_attention_heads) or shape[2] != S or short:
                keys = f"at least {past_seen + S}" if isinstance(past_seen, int) else "the cache's length"
                raise ValueError(
                    f"a 4D attention_mask must have shape [batch ({B}) or 1, heads ({c.num_attention_heads}) or 1, "
                    f"query positions ({S}), key positions ({keys})], got {shape}.")
        given_positions = position_ids is not None and fresh_input and position_ids.shape[-1] > 1
        if position_ids is None and kwargs.get("cu_seq_lens_q") is not None:
            position_ids = positions_from_cu_seq_lens(kwargs["cu_seq_lens_q"], B, S)
        if position_ids is None:
            position_ids = (torch.arange(S, device=inputs_embeds.device) + past_seen).unsqueeze(0)
        # A static cache reports its length as a tensor: reading it would sync the device and break a compiled graph.
        if isinstance(past_seen, int) and past_seen + S > c.max_position_embeddings and not getattr(
            self, "_warned_long", False
        ):
            logger.warning(f"Sequence length {past_seen + S} exceeds max_position_embeddings ({c.max_position_embeddings}).")
            self._warned_long = True

        # Positions excluded from the metric tensor A: the padding of the current input.
        token_mask = None
        if _is_2d(attention_mask):
            if attention_mask.shape[1] < S:
                raise ValueError(f"attention_mask covers {attention_mask.shape[1]} positions, the input has {S}.")
            token_mask = attention_mask[:, -S:]
        groups, token_mask = self._sequence_groups(attention_mask, position_ids if given_positions else None,
                                                   token_mask, past_key_values, past_seen, inputs_embeds, kwargs)

        mask_kwargs = {"position_ids": position_ids}
        if groups is not None and groups.mask_function is not None and not (
            attention_mask is None and past_key_values is None and groups.source == "position_ids"
        ):
            # create_causal_mask keeps sequences apart by itself only when it finds restarting position ids and there
            # is neither a mask nor a cache. Otherwise the sequences' mask function does it; the position ids are then
            # kept from create_causal_mask, which would call that function with positions instead of indices.
            mask_kwargs = {"position_ids": None, "and_mask_function": groups.mask_function}
        causal_mask = create_causal_mask(
            config=c,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            **{CACHE_FIELD: past_key_values},
            **mask_kwargs,
        )
        if (c._attn_implementation == "flex_attention" and isinstance(causal_mask, torch.Tensor)
                and not causal_mask.is_floating_point()):
            # A 4D mask of one's own reaches transformers' flex attention as it is, which adds it to the scores: a
            # boolean (or 0/1) one would add 1 or 0, masking nothing. As eager attention takes it: 0 or the minimum.
            causal_mask = torch.zeros(causal_mask.shape, dtype=inputs_embeds.dtype, device=causal_mask.device
                                      ).masked_fill(causal_mask == 0, torch.finfo(inputs_embeds.dtype).min)
        # What the attention kernels themselves read (flash attention's variable-length path).
        attention_kwargs = {k: kwargs[k] for k in _ATTENTION_KWARGS if kwargs.get(k) is not None}
        if "flash" in (c._attn_implementation or ""):
            attention_kwargs["position_ids"] = position_ids

        cos, sin = rotary_tables(position_ids, c.head_dim, c.rope_theta, c.reference_rope)
        if cos.shape[0] != B:
            cos, sin = cos.expand(B, -1, -1, -1), sin.expand(B, -1, -1, -1)

        hidden_states = inputs_embeds * math.sqrt(D)
        hidden_states = self.layernorm1(hidden_states)

        all_hidden = (hidden_states,) if output_hidden_states else None
        all_attn = () if output_attentions else None
        all_deductive = () if output_pldr_attentions else None
        copies = None
        if self._decode_armed and not torch.is_grad_enabled():
            copies = self._decode_pack.sliced()  # (per layer: attention, FFN, LayerNorms)
        graphed = None
        if (c.decoder_cuda_graphs and groups is None and not attention_kwargs
                and not (output_attentions or output_hidden_states) and self.past_G_values is None
                and (fresh_input or _starts_empty(past_key_values))):
            stack_mask = causal_mask
            if type(past_key_values) is PldrStaticCache:
                # (the stack attends to this input's keys alone, not to a static cache's whole length)
                stack_mask = functools.partial(create_causal_mask, config=c, inputs_embeds=inputs_embeds,
                                               attention_mask=attention_mask, **{CACHE_FIELD: None}, **mask_kwargs)
            graphed = self._graphed_stack(hidden_states, cos, sin, stack_mask, token_mask, past_key_values,
                                          output_pldr_attentions, use_g_cache)
        if graphed is not None:
            hidden_states, all_deductive = graphed
        for i, layer in enumerate(self.dec_layers if graphed is None else ()):
            fixed = None
            if self.past_G_values is not None:
                fixed = (self.past_G_values[i, 0], self.past_G_values[i, 1], self.past_G_values[i, 2])
            hidden_states, deductive = layer(
                hidden_states,
                cos_sin=(cos, sin),
                attention_mask=causal_mask,
                token_mask=token_mask,
                past_key_values=past_key_values,
                fixed_G=fixed,
                output_pldr_attentions=output_pldr_attentions or output_attentions,
                sequence_groups=groups,
                use_g_cache=use_g_cache,
                **({} if copies is None else {"decode_weights": tuple(copies[3 * i:3 * i + 3])}),
                **attention_kwargs,
            )
            if output_hidden_states:
                all_hidden += (hidden_states,)
            if output_pldr_attentions:
                all_deductive += (deductive,)
            if output_attentions:
                all_attn += (deductive.attention_weights,)
        if lent_layers:
            self._static_cache_buffers.settle(past_key_values, lent_layers)

        return PldrModelOutputWithPast(
            last_hidden_state=hidden_states,
            **{CACHE_FIELD: past_key_values if use_cache else None},
            hidden_states=all_hidden,
            attentions=all_attn,
            pldr_attentions=all_deductive,
        )

    # The decoder stack as recorded CUDA graphs in eager mode (see _graphed_stack): at most this many elements of
    # hidden states (batch x positions x hidden size; 4 x 1024 x 896 at the 110M sizes), recorded shapes kept, and
    # recordings, each per kind of graphs (training; without gradients) and model (against shapes that keep changing,
    # each recording holding a pool of memory).
    GRAPHED_STACK_MAX_ELEMENTS = 1 << 22
    GRAPHED_STACK_KEYS = 2
    GRAPHED_STACK_RECORDINGS = 8

    def _plain_stack_params(self) -> list[torch.Tensor] | None:
        """The decoder layers' parameters, each layer's in its ``named_parameters()`` order (what :meth:`_stack_body`
        takes: a parameter that two layers share comes once per layer, and its two gradients add up in it), if every
        module of the layers is PLDR-LLM's own or a plain torch one, without hooks, and no layer checkpoints its
        gradients (what the recorded stack computes is then what the modules compute); else None. One walk over the
        modules for both (each generator over a model's modules costs host time at every forward)."""
        if _global_hooks() or self.gradient_checkpointing:
            return None
        params = []
        compiling = torch.compiler.is_compiling()
        for layer in self.dec_layers:
            seen = set()
            if compiling:  # (named_parameters: dynamo's own; id() would make it guard on each parameter's identity)
                params.extend(p for _, p in layer.named_parameters())
            for module in layer.modules():
                if (type(module) not in _GRAPHED_STACK_TYPES and type(module).__module__ not in _ACTIVATION_MODULES) or (
                        _has_hooks(module) or (isinstance(module, GradientCheckpointingLayer)
                                               and module.gradient_checkpointing)):
                    # (gradient_checkpointing only asked of the layers that have it: a missing attribute of a module
                    # costs an exception inside nn.Module.__getattr__, some 1 us each)
                    return None
                for p in () if compiling else module._parameters.values():  # (as named_parameters: in order, once
                    if p is not None and id(p) not in seen:  # per layer)
                        seen.add(id(p))
                        params.append(p)
        return params

    def _graphed_stack(self, hidden, cos, sin, mask, token_mask, cache, output_pldr_attentions, use_g_cache):
        """The decoder layers' forward (and backward) through recorded CUDA graphs, or None where the layers must run
        one by one.

        On CUDA in eager mode, a small batch's forward (a training step, a prompt's forward in ``generate()``) is paced
        by the host's (CPU's) time for each of the layers' operators, not by the GPU. With no cache to continue from
        (none, or an empty one: ``mask`` is then the causal mask of this input alone, or a function that makes it),
        batches of at most GRAPHED_STACK_MAX_ELEMENTS hidden-state elements, SDPA attention without dropout and plain
        modules, the whole stack is recorded as one forward CUDA graph, and with gradients one backward graph, when a
        batch shape recurs (:class:`DeductionGraphs`: keyed by shapes, dtypes, autocast and the parameters' addresses;
        the parameters are read where they are, so optimiser steps are seen; forwards without a backward have graphs
        of their own). The cache is then filled from the graph's keys, values and deductive tensors."""
        c = self.config
        if torch.compiler.is_compiling():
            return self._stack_operator(hidden, cos, sin, mask, token_mask, cache, output_pldr_attentions, use_g_cache)
        if (not (self._stack_graphs.applies_to(hidden) or self._stack_forward_graphs.applies_to(hidden))
                or hidden.numel() > self.GRAPHED_STACK_MAX_ELEMENTS or c._attn_implementation != "sdpa"
                or (self.training and c.attention_dropout)):
            return None
        want_cache = cache is not None
        want_deductive = want_cache or bool(output_pldr_attentions)
        # (the lock of both kinds of graphs: a recording in another thread runs the layers with other tensors in place
        # of their parameters, which must not be read as the parameters here)
        with self._stack_graphs.lock:
            params = self._plain_stack_params()
            if params is None:
                return None
            if callable(mask):
                mask = mask()
            with_backward = torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in params))
            graphs = self._stack_graphs if with_backward else self._stack_forward_graphs
            if not graphs.applies_to(hidden):  # (this kind's recording failed and turned it off)
                return None
            outs = graphs.run((hidden, cos, sin, mask, token_mask, *params),
                              fn=functools.partial(self._stack_body, want_cache, want_deductive),
                              extra_key=(want_cache, want_deductive), in_place=len(params))
        if outs is None:
            return None
        return self._stack_results(outs, cache, want_cache, want_deductive, output_pldr_attentions, use_g_cache)

    def _stack_operator(self, hidden, cos, sin, mask, token_mask, cache, output_pldr_attentions, use_g_cache):
        """Under ``torch.compile``, with ``config.decoder_graphs_under_compile``: the recorded stack as one opaque
        operator (``pldr::decoder_stack``, its backward ``pldr::decoder_stack_backward``) in the compiled graph, where
        the recorded stack would be used in eager mode.
        A small batch's compiled step is paced by the host's time for each kernel launch (some 30 launches a layer
        forward and backward, even fused), and the recorded graphs launch the whole stack at once. Not while exporting
        (the operator refers to this model object), with shapes that dynamo made dynamic (each length would be a
        recording of its own, and past the recordings' limit the layers would run eagerly inside the operator), or
        where the eager path would not use the graphs; dynamo guards on what decides it (shapes, the graphs'
        ``disabled``), so a change retraces."""
        c = self.config
        if (not c.decoder_graphs_under_compile or _is_exporting()
                or not (hidden.is_cuda or DeductionGraphs.EMULATE_ON_CPU)
                # (False for dynamic shapes: not known for every size)
                or not statically_known_true(hidden.numel() <= self.GRAPHED_STACK_MAX_ELEMENTS)
                or c._attn_implementation != "sdpa"
                or (self.training and c.attention_dropout)):
            return None
        params = self._plain_stack_params()
        if params is None:
            return None
        if callable(mask):
            mask = mask()
        tensors = [hidden, cos, sin, mask, token_mask, *params]
        requires_grad = [t is not None and t.requires_grad for t in tensors]
        grad = torch.is_grad_enabled() and any(requires_grad)
        if (self._stack_graphs if grad else self._stack_forward_graphs).disabled is not None:
            return None
        want_cache = cache is not None
        want_deductive = want_cache or bool(output_pldr_attentions)
        device_type = hidden.device.type
        autocast_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
        outs = torch.ops.pldr.decoder_stack(self._stack_id, self._stack_arch, [grad, want_cache, want_deductive],
                                            autocast_dtype,
                                            [t is not None for t in tensors], requires_grad,
                                            [t for t in tensors if t is not None])
        return self._stack_results(outs[:-1], cache, want_cache, want_deductive, output_pldr_attentions,
                                   use_g_cache)

    def _stack_results(self, outs, cache, want_cache, want_deductive, output_pldr_attentions, use_g_cache):
        """The recorded stack's outputs as the layers give them: the last hidden states and the deductive outputs;
        the cache filled from the keys, values and deductive tensors."""
        layers = len(self.dec_layers)
        kv = outs[1:1 + 2 * layers] if want_cache else ()
        found = outs[1 + len(kv):]
        all_deductive = () if output_pldr_attentions else None
        for i, layer in enumerate(self.dec_layers if want_deductive else ()):
            A, A_LM, G_LM = found[3 * i:3 * i + 3]
            if want_cache:
                layer.mha1._cache_deductive(cache, A, A_LM, G_LM, None, use_g_cache, kv[2 * i].dtype)
                cache.update(kv[2 * i], kv[2 * i + 1], i)
            if output_pldr_attentions:
                all_deductive += (layer.mha1.deductive_outputs(A, A_LM, G_LM),)
        return outs[0], all_deductive

    def _stack_body(self, want_cache, want_deductive, hidden, cos, sin, mask, token_mask, *params):
        """What :meth:`_graphed_stack` records: the layers on hidden states, without a cache, computing with ``params``
        in place of their parameters (each layer's ``named_parameters()`` in turn). Returns the last hidden states,
        with ``want_cache`` each layer's k and v, and with ``want_deductive`` each layer's A, A_LM and G_LM."""
        kv = [] if want_cache else None
        deductive = []
        given = iter(params)
        with suspended():  # (the layers' own deduction graphs: not inside this one)
            for layer in self.dec_layers:
                # the layer computing with the given tensors in place of its parameters (the recording passes new
                # leaves on the parameters' memory)
                layer_params = {name: next(given) for name, _ in layer.named_parameters()}
                hidden, found = torch.func.functional_call(
                    layer, layer_params, (hidden,), dict(cos_sin=(cos, sin), attention_mask=mask, token_mask=token_mask,
                                                         output_pldr_attentions=want_deductive, kv_out=kv))
                if want_deductive:
                    deductive += [found.A, found.A_LM, found.G_LM]
        if kv and not torch.is_grad_enabled():
            # (contiguous, as the layers give a cache without gradients: a dynamic cache concatenates its keys every
            # decoding step, a slow path for strided ones)
            kv = [(k.contiguous(), v.contiguous()) for k, v in kv]
        return (hidden, *(t for pair in kv or () for t in pair), *deductive)

    def _sequence_groups(
        self, attention_mask, position_ids, token_mask, cache, past_seen, embeds, kwargs
    ) -> tuple[SequenceGroups | None, torch.Tensor | None]:
        """The sequences of rows that hold several (see ``packing.py``), or None for one sequence per row (no work
        is done then, unless position ids must be read), and the padding mask of the current tokens for A."""
        B, S = embeds.shape[:2]
        computes_A = self.past_G_values is None and (cache is None or all(t is None for t in cache.get_deductive(0)))
        cu_seq_lens = kwargs.get("cu_seq_lens_q")
        if cu_seq_lens is None:
            cu_seq_lens = kwargs.get("cu_seq_lens_k")
        if cu_seq_lens is not None:
            return groups_from_cu_seq_lens(cu_seq_lens, token_mask, B, S), token_mask
        if attention_mask is not None and not isinstance(attention_mask, torch.Tensor):
            # (flex attention's BlockMask: its mask function is code, which A cannot read its padding or sequences from)
            if not computes_A:
                return None, None
            raise ValueError(
                f"attention_mask is a {type(attention_mask).__name__} and this forward computes the metric tensor A, "
                "which must know the padding and the sequences of each row: pass the 2D padding mask (or position "
                "ids, or a 4D tensor mask) for this forward. A BlockMask serves the steps after it, whose A is cached.")
        if attention_mask is not None and attention_mask.dim() == 4:
            # A custom mask is used as given for attention; A needs its sequences (and padding) only when computed.
            if not computes_A:
                return None, None
            return groups_from_mask(attention_mask, B, int(past_seen))
        if position_ids is not None:
            return groups_from_position_ids(position_ids, token_mask, B), token_mask
        return None, token_mask


_is_exporting = getattr(torch.compiler, "is_exporting", lambda: False)  # (PyTorch >= 2.5)


def _is_2d(mask) -> bool:
    """Whether an attention mask is a 2D padding mask (not a 4D one, nor flex attention's BlockMask)."""
    return isinstance(mask, torch.Tensor) and mask.dim() == 2


# -- the decoder stack's recorded graphs as operators, under torch.compile (PldrModel._stack_operator) ----------------
# The operators find their model through its number (a CPU tensor input of the graph): the model's recorded graphs and
# layers are not values an operator could take.
_STACK_MODELS: "weakref.WeakValueDictionary[int, PldrModel]" = weakref.WeakValueDictionary()
_STACK_ARCHES: "dict[int, weakref.WeakSet]" = {}
_stack_ids = itertools.count(1)


def _register_stack(model: "PldrModel") -> tuple[torch.Tensor, int]:
    """The model's number, as a CPU tensor: an input of the compiled graph rather than a constant (dynamo guards on
    an integer attribute's value: every model would compile its own graph, and past torch's limit of recompilations
    run eagerly). And the number of its configuration, a constant of the graph: the operators' fake implementations
    (shapes and dtypes while tracing, where the tensor has no value) run the layers of any model of that
    configuration, on the given parameters."""
    stack_id = next(_stack_ids)
    _STACK_MODELS[stack_id] = model
    arch = zlib.crc32(model.config.to_json_string().encode())
    _STACK_ARCHES.setdefault(arch, weakref.WeakSet()).add(model)
    return torch.tensor(stack_id, device="cpu"), arch  # (explicitly: from_pretrained builds models under a meta device)


def _stack_inputs(present: list[bool], tensors) -> tuple:
    """The recorded function's inputs: ``tensors`` (the operators' schema has no optional tensors in a list with
    gradients) with None where ``present`` says."""
    given = iter(tensors)
    return tuple(next(given) if p else None for p in present)


def _stack_call(stack_id: torch.Tensor | int, flags: list[bool], autocast_dtype, tensors):
    """The model's graphs for this call, the recorded function, its key and autocast state. ``stack_id``: the model's
    number, or (an int, while tracing) its configuration's: then a model of that configuration with the parameters'
    layout."""
    if isinstance(stack_id, int):
        model = next((m for m in list(_STACK_ARCHES.get(stack_id, ())) if _lays_out(m, tensors)), None)
        if model is None:
            raise RuntimeError(f"pldr::decoder_stack: no model of configuration {stack_id} with these parameters' "
                               "shapes exists (traced after the model was deleted?)")
    else:
        model = _STACK_MODELS.get(int(stack_id))
        if model is None:
            raise RuntimeError(f"pldr::decoder_stack: model {int(stack_id)} no longer exists (a compiled graph was "
                               "called after the model it was compiled for was deleted)")
    grad, want_cache, want_deductive = flags
    graphs = model._stack_graphs if grad else model._stack_forward_graphs
    device_type = tensors[0].device.type
    autocast = (device_type, autocast_dtype is not None,
                torch.get_autocast_dtype(device_type) if autocast_dtype is None else autocast_dtype)
    return (graphs, functools.partial(model._stack_body, want_cache, want_deductive), (want_cache, want_deductive),
            autocast)


def _lays_out(model: "PldrModel", tensors) -> bool:
    """Whether the model's layers have parameters of the shapes of ``tensors``' last ones, in order (two models of one
    configuration differ where one's metric learners are modules: ``use_metric_learner_modules``)."""
    shapes = [p.shape for layer in model.dec_layers for _, p in layer.named_parameters()]
    return 3 <= len(tensors) - len(shapes) <= 5 and all(
        s == t.shape for s, t in zip(shapes, tensors[len(tensors) - len(shapes):]))


def _layout_of(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """t with the strides of ``torch.empty_like(like)`` (what the fake implementations promise)."""
    out = torch.empty_like(like)
    return t if t.stride() == out.stride() else out.copy_(t)


def _unaliased(outs: list[torch.Tensor], inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """outs, each one that shares memory with an input or an earlier output cloned (an operator's outputs must not
    alias: autograd may pass an output's gradient on as an input's, e.g. through a residual connection)."""
    seen = {t.untyped_storage().data_ptr() for t in inputs}
    found = []
    for o in outs:
        if o.untyped_storage().data_ptr() in seen:
            o = o.clone()
        seen.add(o.untyped_storage().data_ptr())
        found.append(o)
    return found


# Inductor's CUDA graphs (mode="reduce-overhead", "max-autotune") leave the operators out (their own graphs replay or
# record inside; inside another capture they could only run the layers, and the backward would recompute the forward).
_OUTSIDE_CUDA_GRAPHS = ({"tags": (torch._C.Tag.cudagraph_unsafe,)} if hasattr(torch._C.Tag, "cudagraph_unsafe")
                        and "tags" in inspect.signature(torch.library.custom_op).parameters
                        else {})  # (PyTorch >= 2.8; before, inductor skips CUDA graphs for a graph with CPU tensors)


@torch.library.custom_op("pldr::decoder_stack", mutates_args=(), **_OUTSIDE_CUDA_GRAPHS)
def _decoder_stack_op(stack_id: torch.Tensor, arch: int, flags: list[bool], autocast_dtype: torch.dtype | None,
                      present: list[bool], requires_grad: list[bool], tensors: list[torch.Tensor]
                      ) -> list[torch.Tensor]:
    """``flags``: whether a backward may follow, whether the cache's and the deductive tensors are wanted.
    ``tensors``: hidden states, cos, sin, mask, token mask, the layers' parameters, leaving out those that are None
    (``present``, per input). Returns the recorded stack's outputs (contiguous) and a ticket (a CPU integer) for the
    backward."""
    inputs = _stack_inputs(present, tensors)
    graphs, fn, key, autocast = _stack_call(stack_id, flags, autocast_dtype, tensors)
    outs, ticket = graphs.forward_for_operator(inputs, fn, key, len(inputs) - 5, flags[0], tuple(requires_grad),
                                               autocast)
    return _unaliased([o.contiguous() for o in outs], tensors) + [torch.tensor(ticket, device="cpu")]


@_decoder_stack_op.register_fake
def _decoder_stack_fake(stack_id, arch, flags, autocast_dtype, present, requires_grad, tensors):
    _, fn, _, (device_type, enabled, dtype) = _stack_call(arch, flags, autocast_dtype, tensors)
    with torch.no_grad(), torch.autocast(device_type, dtype=dtype, enabled=enabled):
        outs = fn(*_stack_inputs(present, tensors))
    return ([torch.empty(o.shape, dtype=o.dtype, device=o.device) for o in outs]
            + [torch.empty((), dtype=torch.long, device="cpu")])


@torch.library.custom_op("pldr::decoder_stack_backward", mutates_args=(), **_OUTSIDE_CUDA_GRAPHS)
def _decoder_stack_backward_op(stack_id: torch.Tensor, arch: int, flags: list[bool],
                               autocast_dtype: torch.dtype | None, present: list[bool], requires_grad: list[bool],
                               ticket: torch.Tensor, tensors: list[torch.Tensor],
                               output_grads: list[torch.Tensor | None]) -> list[torch.Tensor]:
    """The gradients of the inputs that want one (``requires_grad``), in order."""
    inputs = _stack_inputs(present, tensors)
    graphs, fn, key, autocast = _stack_call(stack_id, flags, autocast_dtype, tensors)
    grads = graphs.backward_for_operator(inputs, list(output_grads), int(ticket), fn, key, len(inputs) - 5,
                                         tuple(requires_grad), autocast)
    wanted = [t for t, rg in zip(inputs, requires_grad) if rg]
    return _unaliased([torch.zeros_like(t) if g is None else _layout_of(g, t) for g, t in zip(grads, wanted)],
                      [*tensors, *(g for g in output_grads if g is not None)])


@_decoder_stack_backward_op.register_fake
def _decoder_stack_backward_fake(stack_id, arch, flags, autocast_dtype, present, requires_grad, ticket, tensors,
                                 output_grads):
    return [torch.empty_like(t) for t, rg in zip(_stack_inputs(present, tensors), requires_grad) if rg]


def _decoder_stack_setup(ctx, inputs, output):
    stack_id, arch, flags, autocast_dtype, present, requires_grad, tensors = inputs
    ctx.args = (arch, flags, autocast_dtype, present, requires_grad)
    ctx.save_for_backward(stack_id, output[-1], *tensors)


def _decoder_stack_grad(ctx, output_grads):
    stack_id, ticket, *tensors = ctx.saved_tensors
    present, requires_grad = ctx.args[3:]
    found = iter(torch.ops.pldr.decoder_stack_backward(stack_id, *ctx.args, ticket, tensors,
                                                       list(output_grads[:-1])))
    grads = [next(found) if rg else None for rg in requires_grad]
    return None, None, None, None, None, None, [g for g, p in zip(grads, present) if p]


_decoder_stack_op.register_autograd(_decoder_stack_grad, setup_context=_decoder_stack_setup)


def _starts_empty(cache: Cache | None) -> bool:
    """Whether ``cache`` is one that the decoder stack's recorded graph may fill: PLDR-LLM's dynamic cache or
    transformers' plain static one, holding nothing yet (the prompt's forward in ``generate()``). Reads no device
    value (a static cache's length is a tensor)."""
    if type(cache) is PldrDynamicCache:
        empty = cache.get_seq_length() == 0
    elif type(cache) is PldrStaticCache:
        empty = all(type(layer) is StaticLayer and not layer.is_initialized for layer in cache.layers)
    else:
        return False
    return empty and all(t is None for t in cache.get_deductive(0))


_ATTENTION_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
# The decoder layers' module types that the recorded stack (PldrModel._graphed_stack) takes, and activation modules
_GRAPHED_STACK_TYPES = frozenset((PldrDecoderLayer, PldrAttention, PldrGLU, PldrMetricLearner, PldrResidualMetricUnit,
                                  PldrPowerLaw, nn.Linear, nn.LayerNorm, nn.ModuleList))
_ACTIVATION_MODULES = ("transformers.activations", "torch.nn.modules.activation")


class _GenerateDepth(threading.local):
    depth = 0  # generate() calls of PLDR-LLM models running in this thread (see PldrForCausalLM.is_remote_code)


_GENERATING = _GenerateDepth()
_GENERATE_CALLS_LOCK = threading.Lock()  # (guards PldrModel._generate_calls and the arming it decides)
_TAKES_CACHE_POSITION: dict[type, bool] = {}


def _takes_cache_position(cls: type) -> bool:
    """Whether ``cls.forward`` has a ``cache_position`` parameter (a user's subclass may add one), once per class."""
    known = _TAKES_CACHE_POSITION.get(cls)
    if known is None:
        known = _TAKES_CACHE_POSITION[cls] = "cache_position" in inspect.signature(cls.forward).parameters
    return known


class PldrForCausalLM(PldrPreTrainedModel, GenerationMixin):
    """PLDR-LLM with its LM head ``final_layer`` (a Linear with bias, not tied to the embedding)."""

    _tied_weights_keys = {}

    def __init__(self, config: PldrConfig):
        super().__init__(config)
        self.decoder = PldrModel(config)
        self.final_layer = nn.Linear(config.hidden_size, config.vocab_size, bias=config.final_bias)
        self._mask_positions = {}  # (create_masks_for_generate: key positions 0, 1, ... per device, the longest asked)
        self.post_init()

    def _apply(self, fn, *args, **kwargs):
        self._mask_positions.clear()  # (.to(), .cpu(), ...: the positions would keep the old device's memory)
        return super()._apply(fn, *args, **kwargs)

    def get_input_embeddings(self):
        return self.decoder.embedding

    def set_input_embeddings(self, value):
        self.decoder.embedding = value

    def get_output_embeddings(self):
        return self.final_layer

    def set_output_embeddings(self, new_embeddings):
        self.final_layer = new_embeddings

    def get_decoder(self):
        return self.decoder

    def set_decoder(self, decoder):
        self.decoder = decoder

    # ------------------------------------------------------------------------------------------------------------------
    # generate() support. A is a summary of the whole prompt (its sum runs over every prompt position), so the first
    # forward of a generation must see exactly the prompt. Two strategies feed more or less than that and get the
    # prompt's deductive tensors filled in beforehand: assisted decoding (its first forward is prompt + draft tokens)
    # and chunked prefill (each chunk would otherwise see only part of the prompt).
    # ------------------------------------------------------------------------------------------------------------------
    def init_continuous_batching(self, *args, **kwargs):
        """Continuous batching (``generate_batch``, ``init_continuous_batching``, ``transformers serve``) is not
        supported, rather than left to fail inside its worker, which logs the error and returns empty generations."""
        raise NotImplementedError(
            "PLDR-LLM does not support continuous batching (generate_batch, init_continuous_batching, transformers "
            "serve): each request's metric tensor A must be computed over its whole prompt and its G_LM kept for its "
            "decoding steps, which the paged cache neither schedules (it may split a prompt into chunks) nor holds. "
            "Use generate() with a batch of left-padded prompts (tokenizer(..., padding=True) with padding_side='left').")

    def _computes_metric_tensor(self, cache: Cache | None) -> bool:
        """Whether the next forward with ``cache`` computes A (it holds no deductive tensors yet, and the model has no
        fixed G). Asked at every decoding step: the cache's answer, the common one there, comes first."""
        get = getattr(cache, "get_deductive", None)
        if get is not None and any(t is not None for t in get(0)):
            return False
        return self.decoder.past_G_values is None

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, inputs_embeds=None, **kwargs):
        # (generate passes the cache by keyword, under the installed transformers' name: CACHE_FIELD. inputs_embeds is
        # named: generate() looks for it in this signature.)
        inputs = super().prepare_inputs_for_generation(input_ids, attention_mask=attention_mask,
                                                       inputs_embeds=inputs_embeds, **kwargs)
        mask = inputs.get("attention_mask")
        if (mask is not None and not _is_2d(mask)
                and (attention_mask is None or _is_2d(attention_mask))
                and self._computes_metric_tensor(_cache_kwarg(kwargs))):
            # generate() turns the mask into a 4D one (flex attention: a BlockMask) for compileable (static) caches,
            # for the compiled decoding steps. The forward that computes A (the prefill, never compiled by generate)
            # needs to know the padding of the prompt, which A excludes: it gets the caller's 2D mask (or none) and
            # builds the 4D one itself.
            inputs.pop("attention_mask")
            if attention_mask is not None:
                inputs["attention_mask"] = attention_mask
        return inputs

    def create_masks_for_generate(self, config, inputs_embeds, attention_mask, **kwargs):
        """generate()'s hook for the 4D mask of a decoding step with a compileable (static) cache. transformers' own
        function builds it on the host before every step with some fifteen small operations, about a fifth of the
        host's time of a compiled step at batch 1 (profiled on an H200). A one-token step with SDPA needs one row per
        batch row, the same as transformers': key position j is visible when j is at most the query's position (the
        cache's length) and the 2D mask (if any) allows it; two or three operations here. Any other case goes to
        transformers' function."""
        cache = kwargs.get(CACHE_FIELD)
        plain = (config._attn_implementation == "sdpa" and inputs_embeds.shape[1] == 1
                 and (attention_mask is None or _is_2d(attention_mask)
                      and attention_mask.shape[0] == inputs_embeds.shape[0] and not attention_mask.is_floating_point())
                 and isinstance(cache, Cache) and getattr(cache, "is_compileable", False)
                 and cache.layers and all(type(layer) is StaticLayer for layer in cache.layers)
                 and all(kwargs.get(k) is None for k in ("or_mask_function", "and_mask_function",
                                                          "block_sequence_ids")))
        if plain:
            kv_length, kv_offset = cache.get_mask_sizes(1, 0)
            plain = isinstance(kv_length, int) and kv_offset == 0 and (attention_mask is None
                                                                       or attention_mask.shape[1] <= kv_length)
        if not plain:
            return masking_utils.create_masks_for_generate(config=config, inputs_embeds=inputs_embeds,
                                                           attention_mask=attention_mask, **kwargs)
        device = inputs_embeds.device
        positions = self._mask_positions.get(device)
        if positions is None or positions.shape[0] < kv_length:  # (one per device: cache lengths come and go)
            positions = self._mask_positions[device] = torch.arange(kv_length, device=device)
        if positions.shape[0] != kv_length:
            positions = positions[:kv_length]
        visible = positions <= cache.get_seq_length(0)  # (the length: a tensor on the device, read without a sync)
        if attention_mask is None:  # (transformers >= 5.25 drops a mask of ones before generating)
            return visible.expand(inputs_embeds.shape[0], 1, 1, kv_length).contiguous()
        padded = F.pad(attention_mask.to(device), (0, kv_length - attention_mask.shape[1]))
        return torch.logical_and(padded, visible)[:, None, None, :]

    @torch.no_grad()
    def fill_deductive_cache(
        self,
        input_ids: torch.LongTensor | None,
        past_key_values: Cache,
        attention_mask: torch.Tensor | None = None,
        use_g_cache: bool | None = None,
        inputs_embeds: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
    ) -> Cache:
        """Stores the prompt's A (and with the G-cache A_LM, G_LM) of every layer in ``past_key_values``, leaving its
        keys and values empty, so that a later forward over the prompt plus other tokens uses the prompt's deductive
        tensors, exactly as step-by-step decoding would. Does nothing for a fixed-G model or a cache that already
        holds deductive tensors (e.g. one made by ``pldr_hf.gfile.cache_with_g``).

        Position ids default to generate()'s (counted over the non-padding tokens of ``attention_mask``). Each row
        keeps its own tensors, also with ``cache_first_G``: the prompt's own forward uses each row's own G, as a
        prefill does; call ``cache.share_first_row()`` after it to serve every row with the first row's."""
        cache = as_pldr_cache(past_key_values)
        if self.decoder.past_G_values is not None or any(t is not None for t in cache.get_deductive(0)):
            return cache
        self.decoder._static_cache_buffers.lend(cache)
        if position_ids is None and _is_2d(attention_mask):
            position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
        out = self.decoder(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                           position_ids=position_ids, use_cache=False, output_pldr_attentions=True)
        keep_g = self.config.use_g_cache if use_g_cache is None else use_g_cache
        for i, d in enumerate(out.pldr_attentions):
            cache.set_deductive(i, d.A, d.A_LM if keep_g else None, d.G_LM if keep_g else None)
        return cache

    @classmethod
    def is_remote_code(cls) -> bool:
        """``PreTrainedModel.is_remote_code``: True, the classes are registered for the Auto classes (saved folders get
        ``auto_map`` and the code). Except inside this thread's ``generate()`` when ``forward`` takes no
        ``cache_position``: there transformers asks it at every decoding step only to decide whether to build
        ``cache_position`` for the forward, after ``inspect.signature(self.forward)``, which cost 25-60 us a step
        (measured on an H200's host; an in-tree model pays nothing). The answer "not remote" skips that, and changes
        nothing else: the forward would not have taken the argument."""
        if _GENERATING.depth and not _takes_cache_position(cls):
            return False
        return super().is_remote_code()

    def generate(self, *args, decode_weight_copies: bool = True, **kwargs):
        """``GenerationMixin.generate``. On accelerators the decoding steps use copies of some weights made at the start
        of each call: the FFNs' padded W1|W2 and W3 (see :class:`PldrGLU`), the attentions' stacked W_q|W_k|W_v (see
        :meth:`PldrAttention.project`) and dense projections, and the layers' biases and LayerNorm weights, all in one
        buffer (see :class:`_DecodePack`). They cost memory: about the decoder layers' weights once more (98 MB in bf16
        for the papers' 110M model). A static cache also borrows the model's buffers for its keys, values and deductive
        tensors, kept between calls (see :class:`_StaticCacheBuffers`; 330 MB at batch 32 with 384 positions for the
        110M model in bf16), so that the compiled decoding steps' CUDA graphs find them at the same addresses in every
        call.
        ``decode_weight_copies=False`` decodes with the modules themselves and a static cache with its own buffers, and
        frees the copies and buffers that earlier calls kept (as :meth:`release_decode_buffers` does).

        Calls that overlap (threads sharing the model, or a generate() inside another's callback) share the first
        one's setting: the first arms the copies (or frees them), the last to end disarms them, so that no call
        switches another's decoding steps between the copies and the modules halfway (in 16-bit their roundings
        differ, and so may the tokens)."""
        decoder = self.decoder
        kept = decoder._static_cache_buffers
        with _GENERATE_CALLS_LOCK:
            if decoder._generate_calls == 0:
                if decode_weight_copies:
                    decoder.arm_decode_weights()
                else:
                    self.release_decode_buffers()
                kept.enabled = decode_weight_copies
            decoder._generate_calls += 1
        _GENERATING.depth += 1
        try:
            return super().generate(*args, **kwargs)
        finally:
            _GENERATING.depth -= 1
            with _GENERATE_CALLS_LOCK:
                decoder._generate_calls -= 1
                if decoder._generate_calls == 0:
                    kept.enabled = True
                    decoder.disarm_decode_weights()

    def release_decode_buffers(self):
        """Frees what :meth:`generate` keeps between calls: the decoding weight copies and the static caches' buffers
        (a static cache that is still held keeps its own tensors). The next ``generate()`` makes them again."""
        self.decoder.release_decode_weights()
        self.decoder._static_cache_buffers.release()

    def _assisted_decoding(self, input_ids, *args, **kwargs):
        cache = _cache_kwarg(kwargs)
        if cache is None or kwargs.get("use_cache") is False:
            raise ValueError(
                "Assisted decoding with PLDR-LLM needs use_cache=True: without a cache the metric tensor A sums over "
                "the whole input, so one forward over the draft tokens would score each of them with A of later ones."
            )
        if cache.get_seq_length() == 0:  # (assisted decoding runs one row: cache_first_G changes nothing)
            self.fill_deductive_cache(input_ids, cache, attention_mask=kwargs.get("attention_mask"),
                                      use_g_cache=kwargs.get("use_g_cache"), position_ids=kwargs.get("position_ids"))
        return super()._assisted_decoding(input_ids, *args, **kwargs)

    def _prefill(self, input_ids, generation_config, model_kwargs, *args, **kwargs):
        cache = _cache_kwarg(model_kwargs)
        chunked = getattr(generation_config, "prefill_chunk_size", None) is not None and cache is not None and \
            cache.get_seq_length() == 0 and self._computes_metric_tensor(cache)
        if chunked:
            embeds = model_kwargs.get("inputs_embeds")
            self.fill_deductive_cache(None if embeds is not None else input_ids, cache,
                                      attention_mask=model_kwargs.get("attention_mask"),
                                      use_g_cache=model_kwargs.get("use_g_cache"), inputs_embeds=embeds,
                                      position_ids=model_kwargs.get("position_ids"))
        outputs = super()._prefill(input_ids, generation_config, model_kwargs, *args, **kwargs)
        if chunked and self.config.cache_first_G:
            cache.share_first_row()
        return outputs

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        output_pldr_attentions: bool | None = None,
        use_g_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        cache: Cache | None = None,
        **kwargs,
    ) -> PldrCausalLMOutputWithPast:
        outputs = self.decoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=_one_cache(past_key_values, cache),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            output_pldr_attentions=output_pldr_attentions,
            use_g_cache=use_g_cache,
            return_dict=True,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        head = self.final_layer
        if (torch.compiler.is_compiling() and torch.is_grad_enabled() and head.bias is not None
                and plain_linears(head)):
            # (under torch.compile the bias's gradient would be one more pass over the logits' gradient, vocab x rows)
            logits = _linear_bias_folded(hidden_states[:, keep, :], head.weight, head.bias)
        else:
            logits = head(hidden_states[:, keep, :])
        loss = None
        if labels is not None:
            if labels.shape != hidden_states.shape[:2]:
                raise ValueError(f"labels must have shape {tuple(hidden_states.shape[:2])}, got {tuple(labels.shape)}.")
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return PldrCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)},
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            pldr_attentions=outputs.pldr_attentions,
        )


# transformers calls inspect.signature(self.forward) several times per generate() call (and, for a class registered for
# the Auto classes, at every decoding step unless is_remote_code() says otherwise: see PldrForCausalLM.is_remote_code).
# A __signature__ set on the function is returned as it is, which spares inspect rebuilding it from the function each
# time. It is computed here, from the function itself, so it cannot differ from the one inspect would compute.
PldrForCausalLM.forward.__signature__ = inspect.signature(PldrForCausalLM.forward)


class PldrForSequenceClassification(PldrPreTrainedModel):
    """PLDR-LLM with a linear head on the last non-padding token (like other decoder-only models)."""

    def __init__(self, config: PldrConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.decoder = PldrModel(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.decoder.embedding

    def set_input_embeddings(self, value):
        self.decoder.embedding = value

    @can_return_tuple
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, inputs_embeds=None,
                labels=None, use_cache=None, output_attentions=None, output_hidden_states=None,
                output_pldr_attentions=None, cache=None, **kwargs) -> SequenceClassifierOutputWithPast:
        outputs = self.decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               past_key_values=_one_cache(past_key_values, cache), inputs_embeds=inputs_embeds,
                               use_cache=use_cache, output_attentions=output_attentions,
                               output_hidden_states=output_hidden_states,
                               output_pldr_attentions=output_pldr_attentions, return_dict=True, **kwargs)
        logits = self.score(outputs.last_hidden_state)
        batch = logits.shape[0]
        if _is_2d(attention_mask):
            mask = attention_mask[:, -logits.shape[1]:].to(torch.int32)
        elif input_ids is not None and self.config.pad_token_id is not None:
            mask = (input_ids != self.config.pad_token_id).to(torch.int32)
        else:
            mask = None
        if mask is not None:
            positions = torch.arange(mask.shape[-1], device=logits.device, dtype=torch.int32)
            last = (positions * mask.to(logits.device)).argmax(-1)
        else:
            last = torch.full((batch,), logits.shape[1] - 1, device=logits.device)
        pooled = logits[torch.arange(batch, device=logits.device), last]
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, pooled_logits=pooled, config=self.config)
        return SequenceClassifierOutputWithPast(loss=loss, logits=pooled, **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)},
                                                hidden_states=outputs.hidden_states, attentions=outputs.attentions)


class PldrForTokenClassification(PldrPreTrainedModel):
    """PLDR-LLM with a linear head on every token."""

    def __init__(self, config: PldrConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.decoder = PldrModel(config)
        dropout = getattr(config, "classifier_dropout", None)
        self.dropout = nn.Dropout(0.1 if dropout is None else dropout)
        self.score = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def get_input_embeddings(self):
        return self.decoder.embedding

    def set_input_embeddings(self, value):
        self.decoder.embedding = value

    @can_return_tuple
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, labels=None,
                output_attentions=None, output_hidden_states=None, output_pldr_attentions=None, use_cache=None,
                **kwargs) -> TokenClassifierOutput:
        outputs = self.decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               inputs_embeds=inputs_embeds, use_cache=False, output_attentions=output_attentions,
                               output_hidden_states=output_hidden_states,
                               output_pldr_attentions=output_pldr_attentions, return_dict=True, **kwargs)
        logits = self.score(self.dropout(outputs.last_hidden_state))
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.config)
        return TokenClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                     attentions=outputs.attentions)


class PldrForQuestionAnswering(PldrPreTrainedModel):
    """PLDR-LLM with a span head (start and end logits) for extractive question answering."""

    def __init__(self, config: PldrConfig):
        super().__init__(config)
        self.decoder = PldrModel(config)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        self.post_init()

    def get_input_embeddings(self):
        return self.decoder.embedding

    def set_input_embeddings(self, value):
        self.decoder.embedding = value

    @can_return_tuple
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None,
                start_positions=None, end_positions=None, output_attentions=None, output_hidden_states=None,
                output_pldr_attentions=None, use_cache=None,
                **kwargs) -> QuestionAnsweringModelOutput:
        outputs = self.decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               inputs_embeds=inputs_embeds, use_cache=False, output_attentions=output_attentions,
                               output_hidden_states=output_hidden_states,
                               output_pldr_attentions=output_pldr_attentions, return_dict=True, **kwargs)
        start_logits, end_logits = self.qa_outputs(outputs.last_hidden_state).split(1, dim=-1)
        start_logits, end_logits = start_logits.squeeze(-1).contiguous(), end_logits.squeeze(-1).contiguous()
        loss = None
        if start_positions is not None and end_positions is not None:
            loss = self.loss_function(start_logits, end_logits, start_positions, end_positions, **kwargs)
        return QuestionAnsweringModelOutput(loss=loss, start_logits=start_logits, end_logits=end_logits,
                                            hidden_states=outputs.hidden_states, attentions=outputs.attentions)


__all__ = [
    "PldrPreTrainedModel",
    "PldrModel",
    "PldrForCausalLM",
    "PldrForSequenceClassification",
    "PldrForTokenClassification",
    "PldrForQuestionAnswering",
    "PldrDynamicCache",
    "PldrStaticCache",
    "PldrCacheMixin",
    "PldrDeductiveOutputs",
    "PldrModelOutputWithPast",
    "PldrCausalLMOutputWithPast",
    "as_pldr_cache",
]
