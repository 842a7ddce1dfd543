"""PLDR-LLM's caches and decoding buffers.

* :class:`PldrCacheMixin`: a transformers ``Cache`` (dynamic, static, ...) that also holds each layer's deductive
  tensors, A of the prompt and the G-cache (A_LM, G_LM); :func:`as_pldr_cache` gives any ``Cache`` object this mixin.
* :class:`_StaticCacheBuffers`: the buffers a model keeps for its static caches from one ``generate()`` call to the
  next, so that compiled decoding steps find their tensors at the same addresses.
* :class:`_DecodeWeightCopies` and :class:`_DecodePack`: the copies of the decoder layers' weights that decoding steps
  compute with inside ``generate()``, views into one buffer.

The model (modeling_pldr.py) uses these; they hold no part of the architecture's math. This file imports only torch,
transformers and its own package's files, so it travels with saved models as remote code.
"""

import math
import weakref
from collections.abc import Callable

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache, StaticCache, StaticLayer

from .metric_learner import plain_linears

__all__ = ["PldrCacheMixin", "PldrDynamicCache", "PldrStaticCache", "as_pldr_cache"]


# ----------------------------------------------------------------------------------------------------------------------
# Cache: k, v through any transformers Cache, plus the per-layer deductive cache (A and the G-cache A_LM, G_LM)
# ----------------------------------------------------------------------------------------------------------------------
class PldrCacheMixin:
    """Adds PLDR-LLM's deductive cache to a transformers ``Cache``.

    Per layer it holds ``A`` (the metric tensor of the prompt, after the metric learner) and, when the G-cache is on,
    ``A_LM`` and ``G_LM`` (float32 in a 16-bit model, as computed; next to it, G_LM already cast to the queries' dtype,
    so that a decoding step does not cast it again in every layer). They are filled by the first forward pass that sees
    an empty entry (the prompt) and stay frozen afterwards, as in the original implementation. Batch operations of the cache (beam reordering, repeats,
    selection, reset) apply to them too; cropping keeps them (they summarise the prompt) unless the cache is emptied.
    """

    def _init_deductive(self, num_layers: int | None = None):
        n = num_layers if num_layers is not None else 0
        self.deductive_A: list[torch.Tensor | None] = [None] * n
        self.deductive_A_LM: list[torch.Tensor | None] = [None] * n
        self.deductive_G_LM: list[torch.Tensor | None] = [None] * n
        self.deductive_G_query: list[torch.Tensor | None] = [None] * n

    def _ensure_deductive(self, layer_idx: int):
        if not hasattr(self, "deductive_A"):
            self._init_deductive()
        while len(self.deductive_A) <= layer_idx:
            self.deductive_A.append(None)
            self.deductive_A_LM.append(None)
            self.deductive_G_LM.append(None)
            self.deductive_G_query.append(None)

    def get_deductive(self, layer_idx: int):
        """Returns ``(A, A_LM, G_LM)`` of a layer; entries not cached are None."""
        if not hasattr(self, "deductive_A") or layer_idx >= len(self.deductive_A):
            return None, None, None
        return self.deductive_A[layer_idx], self.deductive_A_LM[layer_idx], self.deductive_G_LM[layer_idx]

    def get_query_metric(self, layer_idx: int, dtype: torch.dtype) -> torch.Tensor | None:
        """The copy of a layer's G_LM in ``dtype`` (the queries' dtype) that :meth:`set_deductive` kept, else None."""
        if getattr(self, "deductive_G_query", None) is None or layer_idx >= len(self.deductive_G_query):
            return None
        G = self.deductive_G_query[layer_idx]
        return G if G is not None and G.dtype == dtype else None

    def set_deductive(self, layer_idx: int, A: torch.Tensor, A_LM: torch.Tensor | None, G_LM: torch.Tensor | None,
                      query_dtype: torch.dtype | None = None):
        """Stores a layer's deductive tensors; with ``query_dtype`` (the attention's query dtype, e.g. bfloat16 under
        autocast) also G_LM cast to it, unless G_LM takes part in a backward (training keeps no copies)."""
        self._ensure_deductive(layer_idx)
        self.deductive_A[layer_idx] = self._keep(0, layer_idx, A)
        self.deductive_A_LM[layer_idx] = self._keep(1, layer_idx, A_LM)
        self.deductive_G_LM[layer_idx] = self._keep(2, layer_idx, G_LM)
        G_query = None
        if G_LM is not None and query_dtype is not None and query_dtype != G_LM.dtype and not G_LM.requires_grad:
            G_query = G_LM.to(query_dtype)
        self.deductive_G_query[layer_idx] = self._keep(3, layer_idx, G_query)

    def _keep(self, kind: int, layer_idx: int, t: torch.Tensor | None) -> torch.Tensor | None:
        """What the cache stores for a deductive tensor. A compileable (static) cache copies it into a buffer at a fixed
        address, kept across ``reset()`` as its keys and values are: compiled decoding steps with CUDA graphs then read
        it in place instead of copying it into the graph's inputs every step. Tensors that require grad are kept as
        they are (so is everything while torch.compile traces)."""
        if t is None or not self.is_compileable or t.requires_grad or torch.compiler.is_compiling():
            return t
        buffers = self.__dict__.setdefault("_deductive_buffers", {})
        buf = buffers.get((kind, layer_idx))
        if (buf is None or buf.shape != t.shape or buf.dtype != t.dtype or buf.device != t.device
                or (buf.is_inference() and not torch.is_inference_mode_enabled())):
            buf = torch.empty(t.shape, dtype=t.dtype, device=t.device)
            torch._dynamo.mark_static_address(buf)
            buffers[(kind, layer_idx)] = buf
        if buf.data_ptr() != t.data_ptr():
            buf.copy_(t)
        return buf

    def clear_deductive(self):
        self._init_deductive(len(getattr(self, "deductive_A", [])))

    def share_first_row(self):
        """Keeps the first batch row's deductive tensors only: they serve every row from now on (``cache_first_G``)."""
        for store in self._deductive_stores():
            for i, t in enumerate(store):
                if t is not None:
                    store[i] = t[:1]

    def _deductive_stores(self) -> tuple[list, ...]:
        """The per-layer lists, in the order of ``_keep``'s kinds: A, A_LM, G_LM, G_LM in the queries' dtype."""
        return tuple(getattr(self, name, None) or [] for name in
                     ("deductive_A", "deductive_A_LM", "deductive_G_LM", "deductive_G_query"))

    def _map_deductive(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        # Tensors of batch size 1 (cache_first_G, or an imported G) are shared by every row and stay as they are.
        for kind, store in enumerate(self._deductive_stores()):
            for i, t in enumerate(store):
                if t is not None and t.shape[0] > 1:
                    store[i] = self._keep(kind, i, fn(t))

    def reset(self):
        super().reset()
        self.clear_deductive()

    def reorder_cache(self, beam_idx: torch.LongTensor):
        super().reorder_cache(beam_idx)
        self._map_deductive(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int):
        super().batch_repeat_interleave(repeats)
        self._map_deductive(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor):
        super().batch_select_indices(indices)
        self._map_deductive(lambda t: t[indices])

    def crop(self, max_length: int):
        super().crop(max_length)
        if self.get_seq_length() == 0:
            self.clear_deductive()


class _StaticCacheBuffers:
    """The buffers of a static cache, kept by the model across caches: its keys, values and lengths (transformers'
    ``StaticLayer``) and the deductive tensors.

    ``generate()`` makes a new static cache for every call, which allocated its tensors during the prefill. Their
    addresses moved from call to call, and the compiled decoding step's CUDA graphs read them in place, so each new set
    of addresses was recorded as one more graph, which every later step checks before the one that matches (measured
    on an H200, 10 calls of one model: 5 graphs at batch 1 and 7 at batch 32, still growing). :meth:`lend` gives a
    static cache the model's buffers when no other cache still alive holds them (the deductive tensors are written
    into them; the keys and values that the cache's first forward allocates are replaced by the kept ones after it,
    :meth:`settle`): then every call finds the graph of the first. A cache that finds them held keeps its own, so a
    cache that a caller still keeps is never overwritten.
    The memory stays allocated between calls: per layer the keys and values ([batch, heads, max_cache_len, head_dim]
    each) and A, A_LM, G_LM and G_LM in the queries' dtype ([batch, heads, head_dim, head_dim] each); 330 MB at batch
    32 with 384 positions for the papers' 110M model in bfloat16. Buffers of another shape, dtype or device replace
    them. :meth:`release` frees them."""

    def __init__(self):
        self.enabled = True
        self._buffers: dict = {}
        self._owner: weakref.ref | None = None

    def lend(self, cache: Cache) -> list[int]:
        """Gives ``cache`` the kept deductive buffers if it may have them; returns the indices of its layers whose keys
        and values this forward allocates (transformers' plain ``StaticLayer``, not yet initialised), for
        :meth:`settle` to replace by kept ones after the forward."""
        if not self.enabled or "_deductive_buffers" in cache.__dict__ or not cache.is_compileable:
            return []
        owner = self._owner() if self._owner is not None else None
        if owner is not None and owner is not cache:
            return []  # in use by a cache that is still alive: this one allocates its own
        self._owner = weakref.ref(cache)
        cache._deductive_buffers = self._buffers
        if getattr(cache, "offloading", False):
            return []  # (an offloaded cache moves its keys and values off the device: kept ones would hold its memory)
        # (sliding or quantised layers keep their own)
        return [i for i, layer in enumerate(getattr(cache, "layers", ()))
                if type(layer) is StaticLayer and not getattr(layer, "is_initialized", True)]

    def settle(self, cache: Cache, layer_ids: list[int]):
        """After the forward that allocated them: the kept keys, values and lengths take the place of these layers'
        new ones (their contents copied) where they match, else the new ones are kept."""
        for i in layer_ids:
            layer = cache.layers[i]
            if not getattr(layer, "is_initialized", False):
                continue
            for name in ("keys", "values", "cumulative_length"):
                new = getattr(layer, name, None)
                if not isinstance(new, torch.Tensor):
                    continue
                kept = self._buffers.get((name, i))
                if (kept is not None and (kept.shape, kept.dtype, kept.device) == (new.shape, new.dtype, new.device)
                        and _writable_here(kept)):
                    setattr(layer, name, kept.copy_(new))
                else:
                    self._buffers[(name, i)] = new

    def release(self):
        """Stops sharing; a cache that holds the buffers keeps them, and they are freed with it."""
        self._buffers, self._owner = {}, None

    def __deepcopy__(self, memo):  # (a copied model gets its own, empty)
        return type(self)()

    def __reduce__(self):  # (pickled as empty: weak references cannot be pickled)
        return type(self), ()


class PldrDynamicCache(PldrCacheMixin, DynamicCache):
    """``DynamicCache`` with PLDR-LLM's deductive cache (A, A_LM, G_LM per layer)."""


class PldrStaticCache(PldrCacheMixin, StaticCache):
    """``StaticCache`` with PLDR-LLM's deductive cache (A, A_LM, G_LM per layer)."""


_PLDR_CACHE_CLASSES: dict[type, type] = {DynamicCache: PldrDynamicCache, StaticCache: PldrStaticCache}


def as_pldr_cache(cache: Cache) -> Cache:
    """Gives a transformers ``Cache`` (as ``generate`` or a user creates it) PLDR-LLM's deductive cache, in place.

    The object keeps its identity and its key/value storage; only its class gains :class:`PldrCacheMixin`.
    """
    if isinstance(cache, PldrCacheMixin):
        return cache
    if not isinstance(cache, Cache):
        raise TypeError(
            f"past_key_values must be a transformers Cache (e.g. DynamicCache) or None, got {type(cache).__name__}."
        )
    base = type(cache)
    cls = _PLDR_CACHE_CLASSES.get(base)
    if cls is None:
        cls = type(f"Pldr{base.__name__}", (PldrCacheMixin, base), {"__doc__": f"{base.__name__} + PLDR deductive cache."})
        _PLDR_CACHE_CLASSES[base] = cls
    cache.__class__ = cls
    cache._init_deductive(len(cache.layers) if hasattr(cache, "layers") else None)
    return cache


# ----------------------------------------------------------------------------------------------------------------------
# Decoding weight copies
# ----------------------------------------------------------------------------------------------------------------------
def _decode_copyable(linears: tuple[nn.Linear, ...], on_cpu: bool) -> bool:
    """Whether copies of these linears' weights may stand in for them while decoding: plain ``nn.Linear`` modules
    without hooks (not PEFT adapters, quantised layers, offloading), all with or all without biases, whose parameters
    are plain tensors (not FSDP2's sharded DTensors or quantised tensor subclasses) of one dtype on one accelerator (on
    CPU only when ``on_cpu``; the copies gain nothing there, the tests use it)."""
    params = [t for lin in linears for t in (lin.weight, lin.bias) if t is not None]
    return (plain_linears(*linears) and len({lin.bias is None for lin in linears}) == 1
            and _copyable_tensors(params, on_cpu))


def _copyable_tensors(params: list[torch.Tensor], on_cpu: bool) -> bool:
    device = params[0].device
    return (all(type(t) is nn.Parameter and t.dtype == params[0].dtype and t.device == device for t in params)
            and device.type != "meta" and (device.type != "cpu" or on_cpu))


def _writable_here(t: torch.Tensor) -> bool:
    """Whether ``t`` may be written in place now: not an inference tensor (made under ``torch.inference_mode()``) while
    outside inference mode."""
    return torch.is_inference_mode_enabled() or not t.is_inference()


class _DecodeWeightCopies:
    """A module whose decoding steps may compute with copies of its weights, made at the start of each ``generate()``
    (:meth:`PldrForCausalLM.generate`): the copies' shapes (:meth:`_decode_segments`), how the parameters fill them
    (:meth:`_decode_params`, :meth:`_decode_targets`), and their switching. The copies are views into one flat buffer
    (:class:`_DecodePack`): the model's for all its layers inside generate(), or the module's own after
    :meth:`arm_decode_weights`."""

    def _decode_segments(self) -> tuple[torch.Tensor, list[tuple[int, ...] | None]] | None:
        """(a parameter with the copies' dtype and device, the shapes of the copies: None for one that is absent, e.g. a
        bias), or None when copies may not stand in for the module (see :func:`_decode_copyable`)."""
        raise NotImplementedError

    def _decode_params(self, copies: tuple) -> list[torch.Tensor]:
        """The parameters that fill the copies, in the order of :meth:`_decode_targets`."""
        raise NotImplementedError

    def _decode_targets(self, copies: tuple) -> list[torch.Tensor]:
        """The parts of the copies that the parameters fill. Parts never written (zero padding) stay zero."""
        raise NotImplementedError

    def _armed_weights(self, given: tuple | None) -> tuple | None:
        """The copies a no-grad forward computes with: those the caller passes (the decoder, from the model's buffer),
        else this module's own while armed; None with gradients (the parameters must get them) or when unarmed."""
        if torch.is_grad_enabled():
            return None
        if given is not None:
            return given
        return self._decode_weights if self._decode_armed else None

    @torch.no_grad()
    def arm_decode_weights(self) -> bool:
        """Copies the current weights into this module's own decoding copies (allocated on first use or when the
        parameters' shapes, dtype or device changed) and turns their use on for no-grad forwards; returns whether it
        did (not where :meth:`_decode_segments` says no)."""
        pack = self.__dict__.get("_own_decode_pack")
        if pack is None:
            pack = self.__dict__["_own_decode_pack"] = _DecodePack()
        return pack.arm([self])[0]

    def _apply(self, fn, *args, **kwargs):
        # .to(), .cpu(), .half(), ...: the copies are plain attributes, which these leave where they are; they would keep
        # the old device's memory (e.g. after model.cpu() to free a GPU). The next generate() makes new ones.
        self.release_decode_weights()
        return super()._apply(fn, *args, **kwargs)

    def disarm_decode_weights(self):
        self.__dict__["_decode_armed"] = False  # (at the end of every generate(): without nn.Module.__setattr__)

    def release_decode_weights(self):
        """Turns the copies off and frees their memory."""
        self._decode_armed = False
        self._decode_weights = None
        self.__dict__.pop("_own_decode_pack", None)


_PACK_ALIGN = 64  # elements: every copy in a _DecodePack starts at a multiple of 128 bytes (256 in float32)


class _DecodePack:
    """The decoding copies of several modules (:class:`_DecodeWeightCopies`) as views into one flat buffer per device
    and dtype, kept at fixed addresses between ``generate()`` calls (compiled decoding with CUDA graphs reads them in
    place) and refreshed at the start of each.

    One buffer rather than a tensor per copy, because a compiled decoding step pays host time for every tensor it
    reads from a module attribute (guards and the runtime's per-input work): about 0.45 us each on one CPU core of
    the test machine, for some 12 weights a layer beside the cache's 4. The compiled step slices the copies out of the
    buffer inside its graph (:meth:`sliced`); eager steps take the views made here (slicing anew would cost host time
    every step)."""

    def __init__(self):
        self.buffers: list[torch.Tensor] = []
        self.keys: list[tuple[torch.device, torch.dtype]] = []
        # per module: None, or (buffer index, per copy None or (offset, shape))
        self.layout: tuple = ()
        self.views: list[tuple | None] = []
        self.targets: list[torch.Tensor] = []  # the parts of the views the parameters fill, module by module
        self.module_ids: tuple = ()  # (the modules the views and targets were made for)

    @torch.no_grad()
    def arm(self, modules: list) -> list[bool]:
        """Fills the copies of ``modules`` from their parameters (``torch._foreach_copy_``) and arms them; returns
        which ones were armed. The buffers are kept when the modules, layout, dtypes and devices are those of the last
        call. (Runs at the start of every generate(): its host time counts as the prefill's.)"""
        sizes: dict = {}
        entries = []
        for module in modules:
            module.__dict__["_decode_armed"] = False
            found = module._decode_segments()
            if found is None:
                entries.append(None)
                continue
            like, shapes = found
            key = (like.device, like.dtype)
            index = list(sizes).index(key) if key in sizes else len(sizes)
            offset = sizes.setdefault(key, 0)
            spans = []
            for shape in shapes:
                if shape is None:
                    spans.append(None)
                    continue
                spans.append((offset, tuple(shape)))
                offset += -(-math.prod(shape) // _PACK_ALIGN) * _PACK_ALIGN
            sizes[key] = offset
            entries.append((index, tuple(spans)))
        layout, keys, module_ids = tuple(entries), list(sizes), tuple(map(id, modules))
        if ((layout, keys, module_ids) != (self.layout, self.keys, self.module_ids)
                or not all(_writable_here(b) for b in self.buffers)):
            self.buffers = []
            for device, dtype in keys:
                buf = torch.zeros(sizes[(device, dtype)], dtype=dtype, device=device)
                torch._dynamo.mark_static_address(buf)
                self.buffers.append(buf)
            self.keys, self.layout, self.module_ids = keys, layout, module_ids
            self.views = self._slice(self.buffers, layout)
            self.targets = [t for module, copies in zip(modules, self.views) if copies is not None
                            for t in module._decode_targets(copies)]
        params = [t for module, copies in zip(modules, self.views) if copies is not None
                  for t in module._decode_params(copies)]
        # (pairs of contiguous tensors take foreach's multi-tensor kernels, a few launches for all; a list with any
        # other pair would copy each pair by itself)
        targets, sources = [], []
        for d, s in zip(self.targets, params):
            if d.is_contiguous() and s.is_contiguous():
                targets.append(d)
                sources.append(s)
            else:
                d.copy_(s)
        if targets:
            torch._foreach_copy_(targets, sources)
        for module, copies in zip(modules, self.views):
            # (the module's __dict__ directly: nn.Module.__setattr__'s checks took most of the time here)
            module.__dict__["_decode_weights"] = copies
            module.__dict__["_decode_armed"] = copies is not None
        return [copies is not None for copies in self.views]

    @staticmethod
    def _slice(buffers: list[torch.Tensor], layout: tuple) -> list[tuple | None]:
        return [None if entry is None else tuple(
            None if span is None else buffers[entry[0]][span[0]:span[0] + math.prod(span[1])].view(span[1])
            for span in entry[1]) for entry in layout]

    def sliced(self) -> list[tuple | None]:
        """The copies per module: sliced out of the buffers under torch.compile (inside the graph), else the kept
        views."""
        if torch.compiler.is_compiling():
            return self._slice(self.buffers, self.layout)
        return self.views
