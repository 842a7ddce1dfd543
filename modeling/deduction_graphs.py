"""A PLGA layer's deduction as captured CUDA graphs in eager mode.

From the metric sum A of a layer (``sum_s q_s^T q_s``, [batch, heads, d, d]) the deduction computes the LayerNorm of
A, the metric learner and the power law: (A, A_LM, G_LM). Its tensors are tiny and their shape does not depend on
the sequence length, but in eager mode it is some 20 operators forward and as many backward a layer, each paying
PyTorch's and Triton's host (CPU) time: on an H200 host 1.8-2.3 ms a layer for a forward and backward whose kernels
take 0.33 ms of GPU time. A small training batch (4 x 1024 tokens at the 110M sizes) is then paced by the host.

:class:`DeductionGraphs` records the deduction of one layer as CUDA graphs, a forward graph and, with gradients, a
backward graph, and replays them: per call, one copy of the inputs into the graphs' own tensors, one graph launch and
one copy of the outputs (the same again backward). The graphs run the same kernels on the same numbers as the
operators one by one, so the results are the same bit for bit.

* Keys: everything that decides the kernels and the tensors' shapes: each input's shape, dtype and ``requires_grad``,
  the device, whether gradients are taken, inference mode, and the autocast state. A key is recorded at its
  ``CAPTURE_AT``-th call (earlier calls run one by one: shapes seen once cost no recording); a layer keeps at most
  ``MAX_KEYS`` recorded keys (least recently used dropped first, with their memory).
* Parameters are inputs like A: copied into the graph's tensors at every call, so an optimiser's in-place step, a
  replaced parameter or parameters at new addresses (FSDP's unsharded ones) are read as they are now. A caller may
  instead have inputs read where they are (``run(..., in_place=n)``: the decoder stack's graph, whose parameters are
  the whole model's): their addresses are then part of the key, and a backward whose parameters moved since the
  forward differentiates the operators.
* cuBLAS's workspaces are dropped before and after each recording, so that a recorded GEMM's workspace lies in the
  graph's own memory (see :func:`_clear_library_workspaces`).
* Gradients: a forward replay leaves the saved activations in the graphs' memory. The backward of a call replays the
  backward graph if no other forward of that key has run since; otherwise (two forwards before their backwards,
  e.g. a preference loss, or a second backward with ``retain_graph``) it replays that call's forward first, from its
  saved inputs. A backward that builds a graph (``create_graph=True``) differentiates the operators instead.
* Not used (the caller runs the operators): under ``torch.compile`` (inductor has its own graphs), while a CUDA graph
  is being captured, where the caller's ``recordable`` says no (the model: where the deduction would run library
  GEMMs such as cuBLAS rather than its Triton kernels, e.g. a float32 learner without autocast), and by the model
  with gradient checkpointing, adapters or hooks on the deduction's modules, or ``deduction_cuda_graphs=False`` in
  the config. A key is not recorded inside a backward pass, and a failed recording
  turns the layer's graphs off with a warning.

* An operator with an autograd formula of its own (the decoder stack under ``torch.compile``: an opaque custom
  operator, whose implementation runs below autograd) uses :meth:`DeductionGraphs.forward_for_operator` and
  :meth:`DeductionGraphs.backward_for_operator` instead of :meth:`DeductionGraphs.run`: the same keys and graphs, a
  ticket from the forward to its backward in place of an autograd node.

Threads: one call at a time per :class:`DeductionGraphs` (a lock around recording, replay and the copies in and
out, also a replayed backward); a forward replay without gradients also orders itself after the last one's copies out
on the GPU (an event), for callers on other CUDA streams. So threads that share a model (a server's concurrent
``generate()`` calls) each get the results of their own inputs.

Memory: each recorded key keeps its own memory pool, holding what the operators would hold between a forward and
its backward (the learner's saved activations) plus its backward's temporaries.

This file imports only torch: it travels with saved models as remote code.
"""

import contextlib
import itertools
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable

import torch

logger = logging.getLogger(__name__)

__all__ = ["DeductionGraphs"]

_forward_ids = itertools.count(1)


def _copies(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """New tensors equal bit for bit to these (x * 1 is exact, also for NaN and -0), as one multi-tensor operator
    rather than one clone each: each operator call costs host time, which is what the graphs save."""
    return list(torch._foreach_mul(tensors, 1.0)) if tensors else []


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


@contextlib.contextmanager
def _autograd_inside_operator():
    """Autograd back on inside an operator's implementation (PyTorch runs it below autograd: its dispatch keys
    excluded), for a function that records or differentiates operators."""
    K = torch._C.DispatchKey
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in (K.AutogradFunctionality, K.AutogradOther, K.AutogradNestedTensor, K.ADInplaceOrView):
        exclude = exclude.remove(key)
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude):
        yield


class _Suspension(threading.local):
    depth = 0  # (> 0 while a recorded function runs in this thread: graphs of its parts are not used inside it)


_suspension = _Suspension()


class suspended:
    """A context in which no :class:`DeductionGraphs` is used (in this thread): the body of a recording that contains
    other recorded parts (the decoder stack's graph holds the layers' deductions) runs their operators."""

    def __enter__(self):
        _suspension.depth += 1

    def __exit__(self, *exc):
        _suspension.depth -= 1


def _clear_library_workspaces():
    """Drops cuBLAS's workspaces (PyTorch keeps one per handle and stream, made at a stream's first GEMM). Called
    before and after recording, as inductor's CUDA graph trees do: a GEMM recorded in a graph keeps its workspace's
    address, so that workspace must come from the graph's own memory pool. One made before the recording, outside the
    pool, is freed when anything (compiled generation's CUDA graph trees do, at each recording) clears the workspaces,
    and the graph would then write into memory that other tensors hold (seen as "unspecified launch failure")."""
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear is not None:
        clear()


class _EmulatedGraph:
    """Stands in for ``torch.cuda.CUDAGraph`` on CPU, for the tests: ``replay()`` runs the recorded function again,
    reading and writing the same tensors a captured graph would."""

    def __init__(self, run: Callable[[], None]):
        self.replay = run


class _Recorded:
    """One recorded key: the graphs' input tensors, a forward graph, and with gradients a backward graph."""

    def __init__(self, fn: Callable, inputs: tuple, grad: bool, autocast: tuple, emulate: bool, in_place: int = 0,
                 requires_grad: tuple | None = None):
        """``requires_grad``: per input, whether the graphs differentiate with respect to it (default: the inputs'
        own ``requires_grad``; an operator's implementation gets tensors without it)."""
        self.fn = fn
        self.grad = grad
        self.autocast = autocast
        copied = len(inputs) - in_place  # (the last in_place inputs are read where they are: parameters)
        self.copied = copied
        # Inputs read in place are new leaves on the same memory: differentiating the recorded function with respect
        # to them keeps autograd away from the parameters' own gradient accumulators, which an earlier step's graph
        # still alive (or DDP) may tie to the default stream, a synchronisation that breaks the recording.
        self.static = (tuple(None if t is None else t.detach().clone() for t in inputs[:copied])
                       + tuple(t.detach() for t in inputs[copied:]))
        if requires_grad is None:
            requires_grad = tuple(t is not None and t.requires_grad for t in inputs)
        if grad:
            for s, rg in zip(self.static, requires_grad):
                if s is not None:
                    s.requires_grad_(rg)
        self.targets = [s for s in self.static[:copied] if s is not None]
        self.addresses = [t.data_ptr() for t in inputs[copied:]]
        self.wanted_mask = [s is not None and s.requires_grad for s in self.static]
        self.wanted = [s for s, w in zip(self.static, self.wanted_mask) if w]
        self.state = None  # the id of the forward whose saved activations the graphs' memory holds
        self.zeroed: list[bool] = []  # per output: its gradient buffer holds zeros
        (self._record_emulated if emulate else self._record)()

    # -- recording -----------------------------------------------------------------------------------------------------
    def modes(self):
        device_type, enabled, dtype = self.autocast
        return torch.autocast(device_type, dtype=dtype, enabled=enabled, cache_enabled=False)

    def _differentiable(self, outs):
        return [(i, o) for i, o in enumerate(outs) if o.requires_grad]

    def _record(self):
        device = self.targets[0].device
        stream = torch.cuda.Stream(device=device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream), torch.set_grad_enabled(self.grad), self.modes():
            # one run on the recording stream first (lazy initialisations, e.g. Triton's compilations, happen outside)
            outs = self.fn(*self.static)
            if self.grad:
                diff = self._differentiable(outs)
                torch.autograd.grad([o for _, o in diff], self.wanted, [torch.zeros_like(o) for _, o in diff],
                                    allow_unused=True)
            del outs
        torch.cuda.current_stream(device).wait_stream(stream)
        try:
            _clear_library_workspaces()
            self._capture(stream, device)
        finally:
            _clear_library_workspaces()

    def _capture(self, stream, device):
        pool = torch.cuda.graph_pool_handle()
        self.forward_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.forward_graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
            with torch.set_grad_enabled(self.grad), self.modes():
                outs = self.fn(*self.static)
        self.outputs = [o.detach() for o in outs]
        if self.grad:
            diff = self._differentiable(outs)
            self.output_grads = [torch.zeros_like(o) for o in self.outputs]
            self.zeroed = [True] * len(self.outputs)
            self.backward_graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.backward_graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
                grads = torch.autograd.grad([o for _, o in diff], self.wanted,
                                            [self.output_grads[i] for i, _ in diff], allow_unused=True)
            self.input_grads = [None if g is None else g.detach() for g in grads]

    def _record_emulated(self):
        held = {}

        def forward():
            with torch.set_grad_enabled(self.grad), self.modes():
                outs = self.fn(*self.static)
            with torch.no_grad():
                for dst, src in zip(self.outputs, outs):
                    dst.copy_(src)
            held["outs"] = outs

        def backward():
            outs = held.pop("outs", None)  # (the graph's saved activations are overwritten by its backward)
            if outs is None:
                raise RuntimeError("deduction graphs: backward replayed without its forward")
            diff = self._differentiable(outs)
            grads = torch.autograd.grad([o for _, o in diff], self.wanted, [self.output_grads[i] for i, _ in diff],
                                        allow_unused=True)
            with torch.no_grad():
                for dst, src in zip(self.input_grads, grads):
                    if dst is not None:
                        dst.copy_(src)

        with torch.set_grad_enabled(self.grad), self.modes():
            outs = self.fn(*self.static)
        # (with the strides of the function's outputs, as a captured graph's own tensors have them)
        self.outputs = [torch.empty_strided(o.shape, o.stride(), dtype=o.dtype, device=o.device).copy_(o.detach())
                        for o in outs]
        if self.grad:
            diff = self._differentiable(outs)
            self.output_grads = [torch.zeros_like(o) for o in self.outputs]
            self.zeroed = [True] * len(self.outputs)
            grads = torch.autograd.grad([o for _, o in diff], self.wanted, [self.output_grads[i] for i, _ in diff],
                                        allow_unused=True)
            self.input_grads = [None if g is None else g.detach().clone() for g in grads]
            self.backward_graph = _EmulatedGraph(backward)
        self.forward_graph = _EmulatedGraph(forward)

    # -- replaying -----------------------------------------------------------------------------------------------------
    def moved(self, inputs: tuple) -> bool:
        """Whether an input read in place is no longer where the graphs read it (e.g. a parameter that FSDP gathered
        again at another address for the backward)."""
        return any(t.data_ptr() != a for t, a in zip(inputs[self.copied:], self.addresses))

    def replay_forward(self, inputs: tuple) -> int:
        with torch.no_grad():
            torch._foreach_copy_(self.targets, [t for t in inputs[:self.copied] if t is not None])
        self.forward_graph.replay()
        self.state = next(_forward_ids)
        return self.state

    def replay_backward(self, output_grads: tuple) -> list:
        """The gradients of the inputs that require them, in order (None for those the deduction does not use).
        ``output_grads``: None for an output that got no gradient (in training usually A and A_LM): its buffer is
        zeroed once and then left as it is, rather than autograd making and copying a tensor of zeros each call."""
        given = [(dst, g) for dst, g in zip(self.output_grads, output_grads) if g is not None]
        with torch.no_grad():
            for i, g in enumerate(output_grads):
                if g is None and not self.zeroed[i]:
                    self.output_grads[i].zero_()
                self.zeroed[i] = g is None
            if given:
                torch._foreach_copy_([d for d, _ in given], [g for _, g in given])
        self.backward_graph.replay()
        self.state = None
        found = iter(_copies([g for g in self.input_grads if g is not None]))
        return [None if g is None else next(found) for g in self.input_grads]


class _Replayed(torch.autograd.Function):
    """A recorded key's forward and backward graphs as one autograd node."""

    @staticmethod
    def forward(ctx, graphs, recorded, *inputs):
        ctx.set_materialize_grads(False)  # (outputs without gradients come to backward as None)
        ctx.graphs, ctx.recorded = graphs, recorded
        ctx.state = recorded.replay_forward(inputs)
        ctx.save_for_backward(*inputs)
        return tuple(_copies(recorded.outputs))

    @staticmethod
    def backward(ctx, *output_grads):
        with ctx.graphs._lock:
            return _Replayed._backward(ctx, *output_grads)

    @staticmethod
    def _backward(ctx, *output_grads):
        recorded, graphs = ctx.recorded, ctx.graphs
        inputs = ctx.saved_tensors
        needs = ctx.needs_input_grad[2:]
        create_graph = torch.is_grad_enabled()
        if create_graph or recorded.moved(inputs):
            # A backward with create_graph=True (differentiably), or parameters no longer where the graphs read them:
            # the operators
            wanted = [t for t, need in zip(inputs, needs) if need]
            with torch.enable_grad(), recorded.modes():
                outs = [(o, g) for o, g in zip(recorded.fn(*inputs), output_grads) if g is not None]
                found = iter(torch.autograd.grad([o for o, _ in outs], wanted, [g for _, g in outs],
                                                 create_graph=create_graph, allow_unused=True))
            return None, None, *(next(found) if need else None for need in needs)
        if recorded.state != ctx.state:  # another forward of this key ran since this one: this one's again first
            recorded.replay_forward(inputs)
            graphs.recomputed += 1
        grads = iter(recorded.replay_backward(output_grads))
        out = [next(grads) if wanted else None for wanted in recorded.wanted_mask]
        return None, None, *(g if need else None for g, need in zip(out, needs))


class DeductionGraphs:
    """Recorded CUDA graphs of one layer's deduction ``fn(*inputs) -> tuple of tensors`` (see the module's text).

    :meth:`run` returns fn's outputs through the graphs, or None where the caller must run fn itself. ``replays``,
    ``recorded_keys`` and ``recomputed`` count what happened (tests and benchmarks read them)."""

    CAPTURE_AT = 3  # the call of a key that records it
    MAX_KEYS = 4  # recorded keys kept per layer
    EMULATE_ON_CPU = False  # replay by rerunning on CPU tensors (the tests, which have no GPU)

    def __init__(self, fn: Callable | None, recordable: Callable | None = None, max_keys: int | None = None,
                 max_recordings: int | None = None, name: str = "the deduction", lock=None):
        """``fn``: the recorded function (or None: each :meth:`run` passes its own). ``recordable(*inputs)``: whether a
        key may be recorded at all (asked once per key, at its recording). ``max_keys``: recorded keys kept (default
        ``MAX_KEYS``); ``max_recordings``: recordings after which no new key is recorded (default: no limit).
        ``lock``: a ``threading.RLock`` shared with other graphs (default: one of its own; see :attr:`lock`)."""
        self.fn = fn
        self.recordable = recordable
        self.max_keys = self.MAX_KEYS if max_keys is None else max_keys
        self.max_recordings = max_recordings
        self.name = name  # (what the warning of a failed recording names)
        # One caller at a time: a replay copies into the graphs' own input tensors and reads their output tensors, so
        # two threads using one model (e.g. a server's concurrent generate() calls) must not interleave there.
        self._lock = threading.RLock() if lock is None else lock
        self.clear()

    def clear(self):
        """Drops every recorded key (and the graphs' memory) and the counts of keys not yet recorded."""
        self._recorded: OrderedDict = OrderedDict()
        self._seen: dict = {}
        self._never: set = set()  # keys that recordable() turned down
        self.disabled: str | None = None
        self._done = None  # CUDA event after the last forward replay's copies out (ordering across streams)
        self._pending: OrderedDict = OrderedDict()  # ticket -> a forward's autograd outputs and leaves (operators)
        self.replays = 0
        self.recomputed = 0
        self.recordings = 0

    @property
    def lock(self):
        """The lock that :meth:`run` (and a replayed backward) holds: a caller that reads what a recording changes for a
        while (the decoder stack's recording runs the layers with other tensors in place of their parameters) holds it
        around that read and its :meth:`run`."""
        return self._lock

    @property
    def recorded_keys(self) -> int:
        return len(self._recorded)

    def applies_to(self, A: torch.Tensor) -> bool:
        """Whether a call on A may use graphs (a CUDA tensor, not while a CUDA graph is being captured)."""
        if self.disabled is not None or _suspension.depth:
            return False
        if A.is_cuda:
            return not torch.cuda.is_current_stream_capturing()
        return A.device.type == "cpu" and self.EMULATE_ON_CPU

    def run(self, inputs: tuple, fn: Callable | None = None, extra_key: tuple = (), in_place: int = 0
            ) -> tuple | None:
        """``fn``: the function for this call (with ``extra_key``, which must tell its variants apart), else the
        one given at construction. The last ``in_place`` inputs (parameters) are read where they are rather than
        copied: the key holds their addresses, and a call whose parameters moved uses (or records) another key."""
        with self._lock:
            return self._run(inputs, self.fn if fn is None else fn, extra_key, in_place)

    def _run(self, inputs: tuple, fn: Callable, extra_key: tuple, in_place: int) -> tuple | None:
        requires_grad = tuple(t is not None and t.requires_grad for t in inputs)
        grad = torch.is_grad_enabled() and any(requires_grad)
        device_type = inputs[0].device.type
        autocast = (device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        recorded = self._recorded_for(inputs, fn, extra_key, in_place, grad, requires_grad, autocast)
        if recorded is None:
            return None
        self.replays += 1
        if grad:
            return _Replayed.apply(self, recorded, *inputs)
        return self._replay_without_grad(recorded, inputs)

    def _replay_without_grad(self, recorded: "_Recorded", inputs: tuple) -> tuple:
        cuda = inputs[0].is_cuda
        if cuda and self._done is not None:
            # (a caller on another stream: this one's copies into the inputs wait for the last one's copies out)
            torch.cuda.current_stream(inputs[0].device).wait_event(self._done)
        recorded.replay_forward(inputs)
        outs = tuple(_copies(recorded.outputs))
        if cuda:
            self._done = self._done or torch.cuda.Event()
            self._done.record(torch.cuda.current_stream(inputs[0].device))
        return outs

    @staticmethod
    def _key(inputs: tuple, extra_key: tuple, in_place: int, grad: bool, requires_grad: tuple, autocast: tuple):
        copied = len(inputs) - in_place
        return (tuple(None if t is None else (t.shape, t.dtype, rg, t.device)
                      for t, rg in zip(inputs[:copied], requires_grad)),
                tuple((t.data_ptr(), t.dtype, rg) for t, rg in zip(inputs[copied:], requires_grad[copied:])), grad,
                torch.is_inference_mode_enabled(), autocast, extra_key)

    def _recorded_for(self, inputs: tuple, fn: Callable, extra_key: tuple, in_place: int, grad: bool,
                      requires_grad: tuple, autocast: tuple) -> "_Recorded | None":
        """The recorded key of this call, recording it at its CAPTURE_AT-th call; None where fn must run."""
        key = self._key(inputs, extra_key, in_place, grad, requires_grad, autocast)
        recorded = self._recorded.get(key)
        if recorded is None:
            if key in self._never:
                return None
            seen = self._seen.get(key, 0) + 1
            if seen < self.CAPTURE_AT or _in_backward() or (
                    self.max_recordings is not None and self.recordings >= self.max_recordings):
                if len(self._seen) > 64:  # (shapes that never recur, e.g. packed rows' sequence counts)
                    self._seen.clear()
                self._seen[key] = seen
                return None
            self._seen.pop(key, None)
            if self.recordable is not None and not self.recordable(*inputs):
                if len(self._never) > 64:  # (as _seen)
                    self._never.clear()
                self._never.add(key)
                return None
            self.recordings += 1
            try:
                recorded = _Recorded(fn, inputs, grad, autocast, emulate=not inputs[0].is_cuda, in_place=in_place,
                                     requires_grad=requires_grad)
            except Exception as e:  # noqa: BLE001  (any failure to record: the operators run, as without graphs)
                self.disabled = f"{type(e).__name__}: {e}"
                logger.warning("PLDR-LLM: recording a CUDA graph of %s failed (%s); it runs operator by operator "
                               "from now on", self.name, self.disabled)
                return None
            self._recorded[key] = recorded
            while len(self._recorded) > self.max_keys:
                self._recorded.popitem(last=False)
        else:
            self._recorded.move_to_end(key)
        return recorded

    # -- for an operator with an autograd formula of its own ----------------------------------------------------------
    # (the decoder stack under torch.compile: an opaque operator, whose implementation gets tensors without autograd
    # and whose backward is another operator. A forward gives its backward a ticket: > 0 the id of a replayed forward;
    # < 0 a forward that ran fn with autograd, kept here until its backward (at most PENDING of them); 0 none: the
    # backward then runs fn again from its inputs, as gradient checkpointing does.)
    PENDING = 4

    def forward_for_operator(self, inputs: tuple, fn: Callable, extra_key: tuple, in_place: int, grad: bool,
                             requires_grad: tuple, autocast: tuple) -> tuple[list, int]:
        """fn's outputs (new tensors) and the ticket for :meth:`backward_for_operator`. ``grad``: whether a backward
        may follow; ``requires_grad``: per input, whether it wants a gradient; ``autocast``: (device type, enabled,
        dtype) to compute under. Not replayed while a CUDA graph is being captured (someone else's)."""
        capturing = inputs[0].is_cuda and torch.cuda.is_current_stream_capturing()
        with self._lock, _autograd_inside_operator():
            recorded = None
            if self.applies_to(inputs[0]) and not capturing:
                recorded = self._recorded_for(inputs, fn, extra_key, in_place, grad, requires_grad, autocast)
            if recorded is not None:
                self.replays += 1
                if not grad:
                    return list(self._replay_without_grad(recorded, inputs)), 0
                ticket = recorded.replay_forward(inputs)
                return _copies(recorded.outputs), ticket
            if not grad or capturing:
                device_type, enabled, dtype = autocast
                with torch.no_grad(), torch.autocast(device_type, dtype=dtype, enabled=enabled):
                    return list(fn(*inputs)), 0
            ticket = -next(_forward_ids)
            outs, leaves = self._with_autograd(fn, inputs, requires_grad, autocast)
            self._pending[ticket] = outs, leaves
            while len(self._pending) > self.PENDING:  # (forwards whose backward never came: their backward recomputes)
                self._pending.popitem(last=False)
            return [o.detach() for o in outs], ticket

    @staticmethod
    def _with_autograd(fn: Callable, inputs: tuple, requires_grad: tuple, autocast: tuple) -> tuple[tuple, list]:
        """fn's outputs with autograd, on new leaves of the inputs that want a gradient; and those leaves."""
        device_type, enabled, dtype = autocast
        leaves = tuple(t.detach().requires_grad_(rg) if t is not None and rg else t
                       for t, rg in zip(inputs, requires_grad))
        with torch.enable_grad(), torch.autocast(device_type, dtype=dtype, enabled=enabled):
            outs = fn(*leaves)
        return outs, [t for t, rg in zip(leaves, requires_grad) if rg]

    def backward_for_operator(self, inputs: tuple, output_grads: list, ticket: int, fn: Callable, extra_key: tuple,
                              in_place: int, requires_grad: tuple, autocast: tuple) -> list:
        """The gradients of the inputs that want one (None where fn does not use one), in order, given the gradients
        of fn's outputs (None for one that got none) and the forward's ticket."""
        with self._lock, _autograd_inside_operator():
            return self._backward_for_operator(inputs, output_grads, ticket, fn, extra_key, in_place, requires_grad,
                                               autocast)

    def _backward_for_operator(self, inputs, output_grads, ticket, fn, extra_key, in_place, requires_grad, autocast):
        capturing = inputs[0].is_cuda and torch.cuda.is_current_stream_capturing()
        if ticket > 0 and not capturing and not torch.is_grad_enabled():
            recorded = self._recorded.get(self._key(inputs, extra_key, in_place, True, requires_grad, autocast))
            if recorded is not None and not recorded.moved(inputs):
                if recorded.state != ticket:  # another forward of this key ran since: this one's again first
                    recorded.replay_forward(inputs)
                    self.recomputed += 1
                grads = iter(recorded.replay_backward(output_grads))
                return [next(grads) if wanted else None
                        for wanted, rg in zip(recorded.wanted_mask, requires_grad) if rg]
        pending = self._pending.pop(ticket, None) if ticket < 0 else None
        if pending is None:  # (no forward to continue from: fn again, from the inputs)
            pending = self._with_autograd(fn, inputs, requires_grad, autocast)
            self.recomputed += 1
        outs, wanted = pending
        given = [(o, g) for o, g in zip(outs, output_grads) if g is not None and o.requires_grad]
        if not given:
            return [None] * len(wanted)
        return list(torch.autograd.grad([o for o, _ in given], wanted, [g for _, g in given], allow_unused=True))

    # A model copied (deepcopy: e.g. a reference model) or pickled gets its own, empty graphs.
    def __deepcopy__(self, memo):
        lock = memo.get(id(self._lock))  # (graphs that shared a lock share the copy's)
        if lock is None:
            lock = memo[id(self._lock)] = threading.RLock()
        return DeductionGraphs(self.fn, self.recordable, self.max_keys, self.max_recordings, self.name, lock)

    def __reduce__(self):
        return DeductionGraphs, (self.fn, self.recordable, self.max_keys, self.max_recordings, self.name)
