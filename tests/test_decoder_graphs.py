"""The whole decoder stack through recorded CUDA graphs in eager training (PldrModel._graphed_stack, config
``decoder_cuda_graphs``).

On CPU the graphs are emulated as in test_deduction_graphs.py (a replay reruns the recorded function on the same
tensors; a backward replayed without its forward raises). Every test compares with the same model without graphs,
exactly: losses, gradients, parameters after optimiser steps, the cache a training forward returns, the deductive
outputs. The CUDA test (run on a GPU machine) checks real graphs against the operators bit for bit."""

import copy

import pytest
import torch

from test_deduction_graphs import (  # noqa: F401  (emulated: a fixture)
    TINY,
    assert_same_grads,
    emulated,
    ids,
    step_both,
)

from pldr_hf import PldrConfig, PldrForCausalLM
from pldr_hf.modeling import modeling_pldr as mp


def pair(seed=0, device="cpu", **overrides):
    """The same weights twice: with the recorded stack, and without any graphs."""
    torch.manual_seed(seed)
    on = PldrForCausalLM(PldrConfig(**{**TINY, **overrides})).to(device)
    off = copy.deepcopy(on)
    off.config = copy.deepcopy(on.config)
    off.config.decoder_cuda_graphs = off.config.deduction_cuda_graphs = False
    off.decoder.config = off.config  # (the copy's decoder kept the copied config of the original)
    for layer in off.decoder.dec_layers:
        layer.mha1.config = off.config
    return on, off


def stack(model):
    """The recorded stack of training forwards (with a backward)."""
    return model.decoder._stack_graphs


def forward_stack(model):
    """The recorded stack of forwards without a backward (evaluation, generate()'s prompt)."""
    return model.decoder._stack_forward_graphs


def assert_same_cache(a, b, layers):
    for i in range(layers):
        assert torch.equal(a.layers[i].keys, b.layers[i].keys)
        assert torch.equal(a.layers[i].values, b.layers[i].values)
        for x, y in zip(a.get_deductive(i), b.get_deductive(i)):
            assert (x is None) == (y is None)
            if x is not None:
                assert torch.equal(x, y)


def test_training_steps_through_the_recorded_stack_equal_the_layers(emulated):
    on, off = pair()
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (on, off)]
    for step in range(6):
        outs = step_both((on, off), opts, ids(step, (2, 12)))
        assert torch.equal(outs[0].loss, outs[1].loss)
        assert torch.equal(outs[0].logits, outs[1].logits)
        assert_same_grads(on, off)
        # the cache of a training forward (use_cache is on by default) is filled from the graph's outputs
        assert_same_cache(outs[0].past_key_values, outs[1].past_key_values, on.config.num_hidden_layers)
    for p, q in zip(on.parameters(), off.parameters()):
        assert torch.equal(p, q)
    assert stack(on).recorded_keys == 1 and stack(on).replays == 4  # recorded at the third call, then replayed
    # the layers' own deduction graphs stay out of it: not recorded inside the stack's recording
    assert all(layer.mha1._deduction_graphs.recorded_keys == 0 for layer in on.decoder.dec_layers)


def test_a_loss_on_the_deductive_outputs_and_padded_rows(emulated):
    on, off = pair(1)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :3] = 0
    for step in range(5):
        x = ids(10 + step, (2, 10))
        losses = []
        for model in (on, off):
            model.zero_grad()
            out = model(x, attention_mask=mask, labels=x, output_pldr_attentions=True, use_cache=False)
            # a DAG-style term: A_LM, G_LM and the copies of the power law's exponents
            loss = out.loss + sum((d.A_LM - d.G_LM).pow(2).mean() + d.power_exponents.pow(2).mean()
                                  for d in out.pldr_attentions)
            loss.backward()
            losses.append(loss)
        assert torch.equal(losses[0], losses[1])
        assert_same_grads(on, off)
    assert stack(on).replays == 3


def test_two_forwards_before_their_backwards_and_a_second_backward(emulated):
    on, off = pair(2)
    x, y = ids(20, (2, 8)), ids(21, (2, 8))
    for model in (on, off):
        for _ in range(2):  # (to the recording)
            model(x, labels=x, use_cache=False).loss.backward()
        model.zero_grad()
        a = model(x, labels=x, use_cache=False).loss
        b = model(y, labels=y, use_cache=False).loss  # overwrites the graph's activations of a's forward
        (a + 3 * b).backward(retain_graph=True)
        a.backward()  # a second backward of a: its forward replayed again first
    assert_same_grads(on, off)
    assert stack(on).recomputed >= 2


def test_second_derivatives_through_the_recorded_stack(emulated):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    on, off = pair(3)
    x = ids(30, (2, 8))
    results = []
    for model in (on, off):
        for _ in range(3):
            model(x, labels=x, use_cache=False)
        embeds = model.decoder.embedding(x).detach().requires_grad_(True)
        with sdpa_kernel(SDPBackend.MATH):  # (SDPA's other CPU kernel has no second derivative)
            loss = model(inputs_embeds=embeds, labels=x, use_cache=False).loss
            (g,) = torch.autograd.grad(loss, embeds, create_graph=True)
            results.append(torch.autograd.grad(g.pow(2).sum(), embeds)[0])
    assert stack(on).replays >= 1
    # (the operators differentiated again inside the graphs' backward: the same math, sums in another order. Measured:
    # 9.3e-7 before the LayerNorm of A moved into the learner operator, 1.1e-6 after; a float64 model, whose sum A and
    # power law stay float32, 7.2e-7 and 7.6e-7: float32 noise. A lost or wrong term would be of order 1.)
    err = ((results[0] - results[1]).abs().max() / results[1].abs().max()).item()
    assert err < 4e-6, err


def test_parameters_at_new_addresses_frozen_ones_and_moved_models(emulated):
    on, off = pair(4)
    x = ids(40, (2, 8))

    def step():
        for model in (on, off):
            model.zero_grad()
            model(x, labels=x, use_cache=False).loss.backward()
        assert_same_grads(on, off)

    for _ in range(3):
        step()
    assert stack(on).recorded_keys == 1
    for model in (on, off):  # a replaced parameter: another address, so another key (the old graph never reads it)
        model.decoder.dec_layers[0].mha1.wq.weight = torch.nn.Parameter(model.decoder.dec_layers[0].mha1.wq.weight * 2)
        model.decoder.dec_layers[1].ffn.gluw3.weight.requires_grad_(False)
    for _ in range(3):
        step()
    assert stack(on).recorded_keys == 2
    on.to(torch.float64)
    off.to(torch.float64)
    assert stack(on).recorded_keys == 0
    step()


def test_a_parameter_shared_by_two_layers(emulated):
    """A weight tied between two layers is an input of the recorded stack once per layer; both layers' gradients add up
    in it, as without graphs (before, the recording failed and turned the graphs off)."""
    on, off = pair(14)
    for model in (on, off):
        layers = model.decoder.dec_layers
        layers[1].mha1.dense.weight = layers[0].mha1.dense.weight
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (on, off)]
    for step in range(5):
        outs = step_both((on, off), opts, ids(150 + step, (2, 8)))
        assert torch.equal(outs[0].loss, outs[1].loss)
        assert_same_grads(on, off)
    assert stack(on).disabled is None and stack(on).replays == 3


def test_shapes_that_keep_changing_stop_being_recorded(emulated, monkeypatch):
    monkeypatch.setattr(mp.PldrModel, "GRAPHED_STACK_RECORDINGS", 3)
    on, off = pair(5)
    lengths = [4, 5, 6, 7]
    for length in lengths * 3:
        x = ids(length, (2, length))
        for model in (on, off):
            model.zero_grad()
            model(x, labels=x, use_cache=False).loss.backward()
        assert_same_grads(on, off)
    g = stack(on)
    assert g.recordings == 3 and g.recorded_keys == 2  # (GRAPHED_STACK_KEYS)


@pytest.mark.parametrize("case", ["large", "packed", "hidden_states", "checkpointing", "hook", "eager_attention",
                                  "dropout", "config_off", "cache_given", "static_cache_given"])
def test_left_out_where_the_layers_must_run(emulated, monkeypatch, case):
    overrides = {"attention_dropout": 0.1} if case == "dropout" else {}
    on, off = pair(6, **overrides)
    x = ids(60, (2, 8))
    kwargs = dict(labels=x)
    if case == "large":
        monkeypatch.setattr(mp.PldrModel, "GRAPHED_STACK_MAX_ELEMENTS", 2 * 8 * TINY["hidden_size"] - 1)
    if case == "packed":
        kwargs["position_ids"] = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]] * 2)
    if case == "hidden_states":
        kwargs["output_hidden_states"] = True
    if case == "checkpointing":
        for model in (on, off):  # (renamed in transformers 5.25)
            (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    if case == "hook":
        on.decoder.dec_layers[1].ffn.gluw1.register_forward_hook(lambda *args: None)
    if case == "eager_attention":
        on.set_attn_implementation("eager")
    if case == "config_off":
        on.config.decoder_cuda_graphs = False
    if case == "dropout":
        torch.manual_seed(0)
    for _ in range(4):
        if case == "cache_given":  # (a cache that holds a prefix already)
            with torch.no_grad():
                out = off(x[:, :4], use_cache=True)
            on(x[:, 4:], past_key_values=out.past_key_values, labels=x[:, 4:]).loss.backward()
        elif case == "static_cache_given":
            cache = mp.PldrStaticCache(config=on.config, max_cache_len=16)
            with torch.no_grad():
                off(x[:, :4], past_key_values=cache)
                on(x[:, 4:], past_key_values=cache)
        else:
            on(**{"input_ids": x, **kwargs}).loss.backward()
    for graphs in (stack(on), forward_stack(on)):
        assert graphs.replays == 0 and graphs.recorded_keys == 0


def test_generation_after_training_through_the_stack_gives_the_tokens_of_the_layers(emulated):
    """Generation after training through the recorded stack gives the tokens of the model without graphs."""
    on, off = pair(7)
    x = ids(70, (2, 8))
    for _ in range(4):
        for model in (on, off):
            model(x, labels=x).loss.backward()
    assert stack(on).replays == 2
    tokens = [m.generate(x[:, :5], max_new_tokens=6, do_sample=False) for m in (on, off)]
    assert torch.equal(tokens[0], tokens[1])


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "frozen"])
def test_forwards_without_gradients_through_the_recorded_stack(emulated, mode):
    """Evaluation forwards (no gradients, or none needed) run the stack as one forward graph once a shape recurs: the
    same logits, cache (keys and values contiguous, as the layers give them) and deductive outputs."""
    on, off = pair(9)
    x = ids(100, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :2] = 0  # (a left-padded row)
    context = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}.get(mode, torch.enable_grad)
    for model in (on, off):
        model.eval()
        if mode == "frozen":
            model.requires_grad_(False)
    for _ in range(4):
        with context():
            outs = [m(x, attention_mask=mask, output_pldr_attentions=True) for m in (on, off)]
        assert torch.equal(outs[0].logits, outs[1].logits)
        assert_same_cache(outs[0].past_key_values, outs[1].past_key_values, on.config.num_hidden_layers)
        for a, b in zip(outs[0].pldr_attentions, outs[1].pldr_attentions):
            assert torch.equal(a.G_LM, b.G_LM) and torch.equal(a.A, b.A)
        layer = outs[0].past_key_values.layers[0]
        assert layer.keys.is_contiguous() and layer.values.is_contiguous()
    assert forward_stack(on).recorded_keys == 1 and forward_stack(on).replays == 2 and stack(on).replays == 0


@pytest.mark.parametrize("option", ["", "kv_only", "first_G", "chunked"])
@pytest.mark.parametrize("cache_implementation", ["dynamic", "static"])
def test_generation_prefills_through_the_recorded_stack(emulated, cache_implementation, option):
    """generate()'s prompt forward (an empty dynamic or static cache) runs through the recorded stack once its shape
    recurs and gives the tokens of the layers; a static cache is filled from the graph's outputs (its prompt forward
    attends to the prompt's keys alone rather than to the whole cache, so the scores agree to rounding). Also with the
    G-cache off (A cached only), the first row's G for every row, and a chunked prefill (the prompt's deductive tensors
    first, by a forward of the whole prompt through the graph; then chunks through the layers, the cache not empty)."""
    on, off = pair(10, cache_first_G=option == "first_G")
    x = ids(110, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :3] = 0
    kwargs = {"kv_only": {"use_g_cache": False}, "chunked": {"prefill_chunk_size": 3}}.get(option, {})
    for _ in range(4):
        outs = [m.generate(x, attention_mask=mask, max_new_tokens=5, do_sample=False, output_scores=True,
                           return_dict_in_generate=True, cache_implementation=cache_implementation, **kwargs)
                for m in (on, off)]
        assert torch.equal(outs[0].sequences, outs[1].sequences)
        for a, b in zip(outs[0].scores, outs[1].scores):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)
            if cache_implementation == "dynamic":
                assert torch.equal(a, b)
    assert forward_stack(on).recorded_keys == 1 and forward_stack(on).replays == 2


def test_forwards_from_several_threads_through_the_recorded_stack(emulated):
    """Threads sharing one model (a server's concurrent requests): each forward gets the logits of its own input, and
    every forward after the recording replays the one recorded key (a recording runs the layers with other tensors in
    place of their parameters; a replay copies into the graph's own inputs: neither may interleave with another
    thread's)."""
    import threading

    on, off = pair(13, hidden_size=64, num_attention_heads=4)
    on.eval()
    off.eval()
    xs = [ids(200 + i, (2, 24)) for i in range(8)]
    with torch.no_grad():
        want = [off(x).logits for x in xs]
    wrong = []

    def work(first):
        with torch.no_grad():
            for r in range(30):
                j = (first + r) % len(xs)
                if not torch.equal(on(xs[j]).logits, want[j]):
                    wrong.append(j)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    g = forward_stack(on)
    assert not wrong and g.recordings == 1 and g.recorded_keys == 1 and g.replays == 4 * 30 - 2


def test_one_kind_turned_off_leaves_the_other(emulated):
    """A failed recording turns off that kind of graphs only: the training ones off, forwards without gradients still
    replay theirs, and the other way round."""
    on, off = pair(15)
    x = ids(160, (2, 8))
    stack(on).disabled = "a failed recording"
    with torch.no_grad():
        for _ in range(3):
            assert torch.equal(on(x).logits, off(x).logits)
    assert forward_stack(on).replays == 1
    stack(on).disabled, forward_stack(on).disabled = None, "a failed recording"
    for _ in range(3):
        on(x, labels=x).loss.backward()
    assert stack(on).replays == 1


def test_evaluation_shapes_leave_the_training_graphs_alone(emulated):
    """Forwards without gradients (evaluation batches of several shapes, prompts) record into graphs of their own:
    training keeps its recorded stack however many shapes evaluation brings (each kind keeps GRAPHED_STACK_KEYS keys
    and GRAPHED_STACK_RECORDINGS recordings)."""
    on, off = pair(12)
    x = ids(130, (2, 8))
    for cycle in range(4):
        for _ in range(3):
            for model in (on, off):
                model.zero_grad()
                model(x, labels=x).loss.backward()
            assert_same_grads(on, off)
        with torch.no_grad():
            for length in (5, 6, 7):
                for _ in range(3):
                    y = ids(140 + length, (2, length))
                    assert torch.equal(on(y).logits, off(y).logits)
    assert stack(on).recordings == 1 and stack(on).replays == 4 * 3 - 2
    g = forward_stack(on)
    assert g.recorded_keys == 2 and g.recordings == mp.PldrModel.GRAPHED_STACK_RECORDINGS


def assert_close_grads(a, b, rtol=1e-5, atol=1e-6):
    """The gradients of two models' parameters agree (float32 rounding: the compiled parts sum in other orders)."""
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=rtol, atol=atol, msg=lambda m, name=name: f"{name}: {m}")


@pytest.fixture
def fresh_dynamo():
    """Dynamo's caches emptied before and after (each test compiles new models with a backend of its own: the code
    objects they share would reach torch's limit of recompilations)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def operator_calls(model_fn, backend):
    """model_fn compiled (fullgraph) with ``backend``, and a list that receives, per graph dynamo makes, how many
    calls of the decoder stack's operator it holds."""
    found = []

    def counting(gm, example_inputs):
        found.append(sum(n.target in (torch.ops.pldr.decoder_stack, torch.ops.pldr.decoder_stack.default)
                         for n in gm.graph.nodes))
        return (torch._dynamo.lookup_backend(backend))(gm, example_inputs)

    return torch.compile(model_fn, backend=counting, fullgraph=True), found


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiled_model_runs_the_recorded_stack_as_one_operator(emulated, fresh_dynamo, backend):
    """Under torch.compile the stack is one operator in the (single) graph: the first two calls run the layers inside
    it (with autograd, kept for their backward), the third records, the rest replay; losses and gradients are those
    of the model without graphs, also with a cache returned (the bench's and the config's default) and with a
    padding mask; a compiled forward without gradients uses the forward-only graphs."""
    on, off = pair(20, decoder_graphs_under_compile=True)
    compiled, found = operator_calls(on, backend)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :3] = 0
    for step in range(5):
        x = ids(200 + step % 2, (2, 12))
        outs = []
        for model in (compiled, off):
            model.zero_grad() if model is off else on.zero_grad()
            out = model(x, attention_mask=mask, labels=x, use_cache=step % 2 == 0)
            out.loss.backward()
            outs.append(out)
        torch.testing.assert_close(outs[0].loss, outs[1].loss, rtol=1e-6, atol=0)
        assert_close_grads(on, off)
        if step % 2 == 0:
            got, want = outs[0].past_key_values, outs[1].past_key_values
            for i in range(on.config.num_hidden_layers):
                torch.testing.assert_close(got.layers[i].keys, want.layers[i].keys)
                torch.testing.assert_close(got.layers[i].values, want.layers[i].values)
                for a, b in zip(got.get_deductive(i), want.get_deductive(i)):
                    torch.testing.assert_close(a, b)
    assert found and all(n == 1 for n in found)
    # (use_cache on and off are two keys: steps 0, 2, 4 and 1, 3; recorded at their third call)
    assert stack(on).recorded_keys == 1 and stack(on).replays == 1 and stack(on).recomputed == 0
    on.eval()
    off.eval()
    with torch.no_grad():
        for _ in range(4):
            x = ids(210, (2, 12))
            torch.testing.assert_close(compiled(x).logits, off(x).logits, rtol=1e-5, atol=1e-6)
    assert forward_stack(on).replays == 2


def test_compiled_stack_operator_under_inductor(emulated, fresh_dynamo):
    """Inductor's own lowering of the operators (an extern kernel with a list of outputs and a CPU ticket): the
    operator is in the graph, records and replays, and losses and gradients agree with the model without graphs to
    inductor's rounding on CPU (its other parts are inductor's C++ kernels: 3e-3 relative measured, the same with the
    layers compiled by inductor instead; a wrong or stale buffer would be of order 1)."""
    on, off = pair(24, decoder_graphs_under_compile=True)
    compiled, found = operator_calls(on, "inductor")
    for step in range(5):
        x = ids(250 + step % 2, (2, 12))
        on.zero_grad()
        off.zero_grad()
        losses = [m(x, labels=x, use_cache=step == 4).loss for m in (compiled, off)]
        for loss in losses:
            loss.backward()
        torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=0)
        for (name, p), q in zip(on.named_parameters(), off.parameters()):
            err = ((p.grad - q.grad).abs().max() / q.grad.abs().max()).item()
            assert err < 2e-2, (step, name, err)
    assert found == [1, 1] and stack(on).recorded_keys == 1 and stack(on).replays == 2


@pytest.mark.skipif(not hasattr(torch._C.Tag, "cudagraph_unsafe"), reason="PyTorch < 2.8: no graph partitions")
def test_compiled_stack_operators_stay_out_of_inductors_cuda_graphs(emulated, fresh_dynamo):
    """Inductor's CUDA graphs (mode="reduce-overhead" or "max-autotune") split the compiled graph around the forward
    and backward operators, by inductor's own test of a node (in a capture they could only run the layers, and the
    backward would recompute the forward); the other operators of the graphs stay in."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    from torch._inductor.utils import is_cudagraph_unsafe_fx_node

    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    on, _ = pair(27, decoder_graphs_under_compile=True)
    compiled = torch.compile(on, backend=aot_autograd(fw_compiler=keep, bw_compiler=keep), fullgraph=True)
    x = ids(270, (2, 8))
    compiled(x, labels=x, use_cache=False).loss.backward()
    stack_ops = (torch.ops.pldr.decoder_stack.default, torch.ops.pldr.decoder_stack_backward.default)
    unsafe = [[str(n.target) for n in gm.graph.nodes if n.op == "call_function" and is_cudagraph_unsafe_fx_node(n)]
              for gm in graphs]
    assert unsafe == [[str(stack_ops[0])], [str(stack_ops[1])]]


def test_compiled_two_forwards_before_their_backwards(emulated, fresh_dynamo):
    """Two compiled forwards of one shape before their backwards (the second overwrites the graphs' saved
    activations of the first): the first's forward is replayed again for its backward; the gradients are those of the
    layers. (A second backward with retain_graph is refused by AOTAutograd itself: donated buffers.)"""
    on, off = pair(21, decoder_graphs_under_compile=True)
    compiled, _ = operator_calls(on, "aot_eager")
    x, y = ids(220, (2, 8)), ids(221, (2, 8))
    for model in (compiled, off):
        for _ in range(3):  # (to the recording)
            model(x, labels=x, use_cache=False).loss.backward()
    on.zero_grad()
    off.zero_grad()
    for model in (compiled, off):
        a = model(x, labels=x, use_cache=False).loss
        b = model(y, labels=y, use_cache=False).loss
        (a + 3 * b).backward()
    assert_close_grads(on, off)
    assert stack(on).recomputed == 1 and stack(on).replays == 3


def test_compiled_backward_without_a_kept_forward_recomputes(emulated, fresh_dynamo, monkeypatch):
    """More forwards than the graphs keep before their backwards (before the recording): the oldest one's backward
    runs the layers again from its inputs, with the same gradients."""
    monkeypatch.setattr(mp.DeductionGraphs, "PENDING", 1)
    on, off = pair(22, decoder_graphs_under_compile=True)
    compiled, _ = operator_calls(on, "aot_eager")
    x, y = ids(230, (2, 8)), ids(231, (2, 9))
    for model in (compiled, off):
        a = model(x, labels=x, use_cache=False).loss
        b = model(y, labels=y, use_cache=False).loss
        (a + b).backward()
    assert_close_grads(on, off)
    assert stack(on).recomputed == 1 and stack(on).replays == 0


@pytest.mark.parametrize("case", ["default", "dynamic", "config_off", "large", "copy"])
def test_compiled_stack_operator_left_out_or_per_model(emulated, fresh_dynamo, monkeypatch, case):
    """The config's default (``decoder_graphs_under_compile`` off), dynamic shapes, ``decoder_cuda_graphs`` off and
    large batches compile the layers themselves (no operator); a copy of the model (deepcopy, as a reference model is
    made) runs its own graphs."""
    on, off = pair(23, decoder_graphs_under_compile=case != "default")
    if case == "config_off":
        on.config.decoder_cuda_graphs = False
    if case == "large":
        monkeypatch.setattr(mp.PldrModel, "GRAPHED_STACK_MAX_ELEMENTS", 2 * 8 * TINY["hidden_size"] - 1)
    if case == "dynamic":
        compiled = torch.compile(on, backend="aot_eager", dynamic=True, fullgraph=True)
        counted = []
    else:
        compiled, counted = operator_calls(on, "aot_eager")
    twin = copy.deepcopy(on)
    twin_compiled, twin_counted = operator_calls(twin, "aot_eager")
    for step in range(4):
        x = ids(240 + step, (2, 8))
        for model in (compiled, off, twin_compiled):
            model(x, labels=x, use_cache=False).loss.backward()
    # (the layers compiled by dynamo, where the operator is left out: float32 rounding of other sums, 4e-5 measured)
    tolerance = (1e-5, 1e-6) if case == "copy" else (2e-4, 2e-5)
    assert_close_grads(on, off, *tolerance)
    assert_close_grads(twin, off, *tolerance)
    if case == "copy":
        assert counted == [1] and twin_counted == [1]
        assert stack(on).replays == 2 and stack(twin).replays == 2
    else:
        assert sum(counted) == 0 and stack(on).replays == 0 and stack(on).recordings == 0


def test_compiled_stack_operator_models_of_one_configuration_with_other_parameters(emulated, fresh_dynamo):
    """Two models of one configuration, one with its metric learners as modules (``use_metric_learner_modules``:
    other parameters), each compiled: each graph's operator is traced (its fake implementation) and run with its own
    model's layers; losses and the embeddings' gradients (through the whole stack) are those of the layers."""
    on, off = pair(26, decoder_graphs_under_compile=True)
    units = copy.deepcopy(on).use_metric_learner_modules()
    assert len(list(units.parameters())) != len(list(on.parameters()))
    compiled = [operator_calls(m, "aot_eager") for m in (on, units)]
    for step in range(4):
        x = ids(260 + step, (2, 8))
        off.zero_grad()
        want = off(x, labels=x, use_cache=False).loss
        want.backward()
        for model, (fn, _) in zip((on, units), compiled):
            model.zero_grad()
            loss = fn(x, labels=x, use_cache=False).loss
            loss.backward()
            torch.testing.assert_close(loss, want, rtol=1e-6, atol=0)
            torch.testing.assert_close(model.get_input_embeddings().weight.grad, off.get_input_embeddings().weight.grad,
                                       rtol=1e-5, atol=1e-6)
    assert [found for _, found in compiled] == [[1], [1]]
    assert stack(on).replays == 2 and stack(units).replays == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="real CUDA graphs need a GPU")
def test_cuda_recorded_stack_trains_as_the_layers_do():
    """Real graphs: the forward replays the same kernels (the recording step's loss is bit-identical); the backward's
    GEMMs may take other cuBLAS algorithms inside a graph (its own workspace), so gradients agree to rounding: on an
    H200 at the 110M sizes within the spread of two runs of the operators themselves."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    on, off = pair(8, device="cuda", hidden_size=128, num_attention_heads=2, head_dim=64, intermediate_size=170,
                   A_dff=170)
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-3, fused=True) for m in (on, off)]
    # (the math attention: flash attention's backward is not deterministic, so two runs of the same operators differ)
    with sdpa_kernel(SDPBackend.MATH):
        for step in range(6):
            x = ids(80 + step, (2, 64), "cuda")
            outs = []
            for model, opt in zip((on, off), opts):
                opt.zero_grad()
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    out = model(x, labels=x)
                out.loss.backward()
                outs.append(out)  # (kept alive: an earlier step's graph must not break the recording)
                opt.step()
            # (after the recording step the two models' parameters drift apart by rounding that AdamW amplifies:
            # losses 0.19% apart at step 5 on an H200 with the LayerNorm of A inside the learner's kernels, 0.07% with
            # it apart; a gradient missing from the graphs would fail the recording step's checks below)
            assert torch.allclose(outs[0].loss, outs[1].loss, rtol=1e-3 if step <= 2 else 5e-3)
            if step <= 2:  # up to the recording step the parameters are the same (later AdamW amplifies rounding)
                assert torch.equal(outs[0].loss, outs[1].loss)
                for (name, p), q in zip(on.named_parameters(), off.parameters()):
                    err = ((p.grad - q.grad).abs().max() / q.grad.abs().max().clamp_min(1e-12)).item()
                    assert err < 0.05, (step, name, err)
    assert stack(on).disabled is None and stack(on).replays == 4
    # compiled static-cache generation afterwards (its CUDA graph trees clear cuBLAS's workspaces), then training again
    tokens = []
    for model in (on, off):
        model.eval()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            for _ in range(2):
                tokens.append(model.generate(ids(90, (2, 16), "cuda"), max_new_tokens=8, do_sample=False,
                                             cache_implementation="static"))
        model.train()
        x = ids(99, (2, 64), "cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            model(x, labels=x).loss.backward()
    assert torch.equal(tokens[0], tokens[1]) and torch.equal(tokens[2], tokens[3]) and stack(on).replays == 5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="real CUDA graphs need a GPU")
def test_cuda_prefills_through_the_recorded_stack():
    """Real graphs for generate()'s prompt forward, with a dynamic and a static (compiled) cache: the tokens of the
    layers, a dynamic cache's keys and values contiguous, and the model trains through its stack graphs afterwards."""
    on, off = pair(11, device="cuda", hidden_size=128, num_attention_heads=2, head_dim=64, intermediate_size=170,
                   A_dff=170)
    x = ids(120, (2, 32), "cuda")
    mask = torch.ones_like(x)
    mask[1, :5] = 0
    for model in (on, off):
        model.eval()
    for implementation in ("dynamic", "static"):
        for _ in range(4):
            with torch.inference_mode():
                outs = [m.generate(x, attention_mask=mask, max_new_tokens=8, do_sample=False, output_scores=True,
                                   return_dict_in_generate=True, cache_implementation=implementation)
                        for m in (on, off)]
            assert torch.equal(outs[0].sequences, outs[1].sequences)
            for a, b in zip(outs[0].scores, outs[1].scores):
                assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)
    with torch.inference_mode():
        cache = on(x, attention_mask=mask).past_key_values
    assert all(layer.keys.is_contiguous() and layer.values.is_contiguous() for layer in cache.layers)
    # (both caches' prompt forwards share one key: the stack attends to the prompt alone either way)
    assert forward_stack(on).disabled is None and forward_stack(on).recorded_keys == 1
    assert forward_stack(on).replays == 7
    on.train()
    for _ in range(3):
        on(x, labels=x).loss.backward()
    assert stack(on).recorded_keys == 1 and stack(on).replays == 1 and forward_stack(on).replays == 7


@pytest.mark.skipif(not torch.cuda.is_available(), reason="real CUDA graphs need a GPU")
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_cuda_compiled_training_through_the_stack_operator(mode):
    """Under torch.compile (inductor) the recorded stack is one operator of the compiled graph: training steps agree
    with the same model compiled without graphs (inductor's own kernels for the layers: bf16 rounding apart), the
    graphs are recorded once and replayed, and a compiled forward without gradients uses the forward-only graphs.
    Also with inductor's CUDA graphs around the operator (reduce-overhead)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch._dynamo.reset()
    on, off = pair(12, device="cuda", hidden_size=128, num_attention_heads=2, head_dim=64, intermediate_size=170,
                   A_dff=170, decoder_graphs_under_compile=True)
    models = [torch.compile(m, fullgraph=True, mode=mode) for m in (on, off)]
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-3, fused=True) for m in (on, off)]
    with sdpa_kernel(SDPBackend.MATH):
        for step in range(6):
            x = ids(130 + step, (2, 64), "cuda")
            losses = []
            for model, opt in zip(models, opts):
                opt.zero_grad()
                torch.compiler.cudagraph_mark_step_begin()
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = model(x, labels=x, use_cache=False).loss
                loss.backward()
                losses.append(loss.detach().clone())  # (inductor's CUDA graphs reuse their outputs' memory)
                opt.step()
            assert torch.allclose(losses[0], losses[1], rtol=2e-3 if step <= 2 else 5e-3), (step, losses)
        assert stack(on).disabled is None and stack(on).recorded_keys == 1 and stack(on).replays == 4
        for model in (on, off):
            model.eval()
        x = ids(140, (2, 64), "cuda")
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            logits = [[m(x).logits.float().clone() for _ in range(4)] for m in models]
    torch._dynamo.reset()
    for a, b in zip(*logits):
        assert torch.allclose(a, b, rtol=2e-2, atol=2e-2)
    assert forward_stack(on).replays == 2 and forward_stack(on).disabled is None
