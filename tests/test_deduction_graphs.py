"""Each layer's deduction (LayerNorm of the metric sum, metric learner, power law) through recorded CUDA graphs in
eager mode (modeling/deduction_graphs.py, config ``deduction_cuda_graphs``).

On CPU the graphs are emulated (``DeductionGraphs.EMULATE_ON_CPU``: a replay reruns the recorded function on the same
tensors, and a backward replayed without its forward raises), which checks the bookkeeping that real graphs rely on:
inputs copied in at every call, gradients after two forwards, second backwards and second derivatives, keys per shape,
where the graphs are left out. Every test compares with the same model with ``deduction_cuda_graphs=False``, exactly.
The CUDA test checks real graphs against the operators bit for bit (run on a GPU machine)."""

import copy
import logging

import pytest
import torch
from torch import nn

from pldr_hf import PldrConfig, PldrForCausalLM
from pldr_hf.modeling import deduction_graphs as dg
from pldr_hf.modeling import metric_learner as ml
from pldr_hf.modeling import modeling_pldr as mp

TINY = dict(vocab_size=64, hidden_size=32, num_attention_heads=2, head_dim=16, num_hidden_layers=2,
            intermediate_size=40, A_dff=24, num_reslayerA=2, num_denseA=2, max_position_embeddings=64)


@pytest.fixture
def emulated(monkeypatch):
    monkeypatch.setattr(dg.DeductionGraphs, "EMULATE_ON_CPU", True)
    # (on CPU the deduction runs its PyTorch reference, which the model would not record on a GPU)
    monkeypatch.setattr(mp, "_deduction_runs_kernels", lambda *tensors, **options: True)


def pair(seed=0, device="cpu", **overrides):
    """The same weights twice: with recorded graphs, and operator by operator."""
    torch.manual_seed(seed)
    # (the whole decoder stack's graphs, which would take these small batches over, are tested in test_decoder_graphs)
    on = PldrForCausalLM(PldrConfig(**{**TINY, "decoder_cuda_graphs": False, **overrides})).to(device)
    off = copy.deepcopy(on)
    off.config = copy.deepcopy(on.config)
    off.config.deduction_cuda_graphs = False
    off.decoder.config = off.config  # (the copy's decoder kept the copied config of the original)
    for layer in off.decoder.dec_layers:
        layer.mha1.config = off.config
    return on, off


def graphs(model):
    return [layer.mha1._deduction_graphs for layer in model.decoder.dec_layers]


def ids(seed, shape, device="cpu"):
    return torch.randint(4, 64, shape, generator=torch.Generator().manual_seed(seed)).to(device)


def grads(model):
    return {n: p.grad for n, p in model.named_parameters()}


def assert_same_grads(a, b):
    ga, gb = grads(a), grads(b)
    for name in ga:
        assert (ga[name] is None) == (gb[name] is None), name
        if ga[name] is not None:
            assert torch.equal(ga[name], gb[name]), name


def step_both(models, opts, x):
    """One optimiser step of each model on x (as its labels too); returns their outputs."""
    outs = []
    for model, opt in zip(models, opts):
        opt.zero_grad()
        out = model(x, labels=x)
        out.loss.backward()
        outs.append(out)
        opt.step()
    return outs


def test_training_steps_through_graphs_equal_the_operators(emulated):
    on, off = pair()
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (on, off)]
    for step in range(6):
        outs = step_both((on, off), opts, ids(step, (2, 12)))
        assert torch.equal(outs[0].loss, outs[1].loss)
        assert_same_grads(on, off)
    for p, q in zip(on.parameters(), off.parameters()):
        assert torch.equal(p, q)
    # recorded at the third call of the shape; the later ones replay (the optimiser's steps read in place)
    assert [(g.recorded_keys, g.replays) for g in graphs(on)] == [(1, 4)] * 2
    assert [(g.recorded_keys, g.replays) for g in graphs(off)] == [(0, 0)] * 2


def test_losses_on_the_deductive_outputs_in_some_steps(emulated):
    # e.g. the DAG regulariser on A_LM and G_LM: the outputs' gradients come and go from step to step
    on, off = pair()
    for step in range(7):
        x = ids(step, (2, 10))
        for model in (on, off):
            model.zero_grad()
            out = model(x, labels=x, output_pldr_attentions=True)
            loss = out.loss
            if step % 3 == 1:
                loss = loss + sum((d.A_LM ** 2).mean() + d.A.abs().mean() for d in out.pldr_attentions)
            loss.backward()
        assert_same_grads(on, off)
    assert all(g.replays == 5 for g in graphs(on))


def test_two_forwards_before_their_backwards_and_a_second_backward(emulated):
    on, off = pair()
    for model in (on, off):
        for s in range(3):
            model(ids(s, (2, 10)), labels=ids(s, (2, 10))).loss.backward()
        model.zero_grad()
    for model in (on, off):
        a, b = ids(10, (2, 10)), ids(11, (2, 10))
        first = model(a, labels=a).loss
        second = model(b, labels=b).loss
        first.backward(retain_graph=True)  # its forward's activations were overwritten by the second forward
        second.backward()
        first.backward()  # a second backward of the same forward
    assert_same_grads(on, off)
    # (the third warm-up call recorded and replayed; each of the three backwards found another forward's activations)
    assert all(g.replays == 3 and g.recomputed == 3 for g in graphs(on))


def test_second_derivatives_through_the_graphed_deduction(emulated):
    on, off = pair()
    for model in (on, off):
        model.set_attn_implementation("eager")  # (CPU SDPA has no second derivative)
    x = ids(3, (2, 10))
    for model in (on, off):
        for _ in range(2):
            model(x, labels=x)
    found = []
    for model in (on, off):
        layer = model.decoder.dec_layers[0].mha1
        wanted = [layer.plgatt_layer.power_params, layer.wq.weight, layer.reslayerAs.glu_weights]
        g = torch.autograd.grad(model(x, labels=x).loss, wanted, create_graph=True)
        penalty = sum((t * t).sum() for t in g)
        model.zero_grad()
        penalty.backward()
        found.append(([t.detach() for t in g], grads(model)))
    assert all(g.replays == 1 for g in graphs(on))
    for a, b in zip(found[0][0], found[1][0]):
        assert torch.equal(a, b)
    for name, g in found[0][1].items():
        other = found[1][1][name]
        assert (g is None) == (other is None), name
        if g is not None:
            # (the two differentiate the float32 power law in different orders; these second derivatives reach 1e8)
            torch.testing.assert_close(g, other, rtol=1e-3, atol=1e-5 * other.abs().max().item())
    assert found[0][1]["decoder.dec_layers.0.mha1.plgatt_layer.power_params"][2].abs().sum() > 0  # (the exponents)


def test_one_key_per_shape_least_recently_used_dropped(emulated, monkeypatch):
    monkeypatch.setattr(dg.DeductionGraphs, "MAX_KEYS", 2)
    on, off = pair()
    with torch.no_grad():
        for batch in (1, 2, 3, 1):
            x = ids(batch, (batch, 9))
            for _ in range(4):
                assert torch.equal(on(x).logits, off(x).logits)
    g = graphs(on)[0]
    # batches 1, 2 and 3 recorded at their third call; 3 pushed 1 out, which recorded again
    assert g.recorded_keys == 2 and g.replays == 2 + 2 + 2 + 2


def test_frozen_parameters_and_replaced_ones(emulated):
    on, off = pair()
    for model in (on, off):
        for layer in model.decoder.dec_layers:
            layer.mha1.reslayerAs.requires_grad_(False)
    for step in range(4):
        x = ids(step, (2, 8))
        for model in (on, off):
            model.zero_grad()
            model(x, labels=x).loss.backward()
        assert_same_grads(on, off)
    assert grads(on)["decoder.dec_layers.0.mha1.reslayerAs.glu_weights"] is None
    assert all(g.replays == 2 for g in graphs(on))
    torch.manual_seed(5)
    new = torch.rand_like(on.decoder.dec_layers[1].mha1.plgatt_layer.power_params)
    for model in (on, off):
        model.decoder.dec_layers[1].mha1.plgatt_layer.power_params = nn.Parameter(new.clone())
    x = ids(9, (2, 8))
    with torch.no_grad():
        for _ in range(3):
            assert torch.equal(on(x).logits, off(x).logits)


def test_generate_prefills_through_graphs(emulated):
    on, off = pair()
    on.eval(), off.eval()
    p = ids(4, (2, 6))
    for _ in range(4):
        a = on.generate(p, max_new_tokens=5, do_sample=False)
        b = off.generate(p, max_new_tokens=5, do_sample=False)
        assert torch.equal(a, b)
    assert all(g.replays >= 2 and g.recorded_keys == 1 for g in graphs(on))


def _steps(model, n=4):
    for step in range(n):
        x = ids(step, (2, 8))
        model(x, labels=x).loss.backward()


def test_left_out_where_they_would_not_be_what_the_user_asked_for(emulated):
    checkpointed, _ = pair()
    checkpointed.train()
    enable = getattr(checkpointed, "activation_checkpointing_enable", None) or checkpointed.gradient_checkpointing_enable
    enable()
    _steps(checkpointed)
    hooked, _ = pair()
    seen = []
    hooked.decoder.dec_layers[0].mha1.plgatt_layer.register_forward_hook(lambda *a: seen.append(1))
    _steps(hooked)
    modules, _ = pair()
    modules.use_metric_learner_modules()
    _steps(modules)
    assert all(g.replays == 0 for m in (checkpointed, modules) for g in graphs(m))
    assert graphs(hooked)[0].replays == 0 and graphs(hooked)[1].replays == 2 and len(seen) == 4


def test_copies_and_moved_models_start_without_graphs(emulated):
    on, off = pair()
    _steps(on)
    assert graphs(on)[0].recorded_keys == 1
    copied = copy.deepcopy(on)
    assert graphs(copied)[0].recorded_keys == 0 and graphs(copied)[0].replays == 0
    on.to(torch.float64)
    off.to(torch.float64)
    assert graphs(on)[0].recorded_keys == 0
    x = ids(1, (2, 8))
    with torch.no_grad():
        for _ in range(3):
            assert torch.equal(on(x).logits, off(x).logits)
    assert graphs(on)[0].recorded_keys == 1


def test_a_failed_recording_turns_the_layers_graphs_off(emulated, monkeypatch, caplog):
    def fail(*args, **kwargs):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(dg, "_Recorded", fail)
    on, off = pair()
    x = ids(2, (2, 8))
    with caplog.at_level(logging.WARNING, logger=dg.__name__), torch.no_grad():
        for _ in range(4):
            assert torch.equal(on(x).logits, off(x).logits)
    assert all(g.disabled == "RuntimeError: operation not permitted when stream is capturing" for g in graphs(on))
    assert "recording a CUDA graph of the deduction failed" in caplog.text


def test_recorded_only_where_the_deduction_runs_its_kernels(monkeypatch):
    # CUDA graphs record the learner's and the power law's Triton kernels; a float32 learner without autocast runs
    # cuBLAS GEMMs instead (metric_learner.FLOAT32_KERNELS), and is left to run operator by operator
    monkeypatch.setattr(ml, "_KERNELS_ON_CPU", True)  # (the kernels' conditions, as on a GPU; nothing is launched)
    on, _ = pair()
    attn = on.decoder.dec_layers[0].mha1
    ln, learner, power = attn.layernorm1, attn.reslayerAs, attn.plgatt_layer
    tensors = (torch.randn(2, 2, 16, 16), ln.weight, ln.bias, learner.glu_weights, learner.biases_and_layernorms,
               power.power_params)
    recordable = attn._deduction_graphs.recordable
    assert not recordable(*tensors)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert recordable(*tensors)
    assert recordable(*(t.bfloat16() for t in tensors))  # (a bfloat16 model)
    monkeypatch.setattr(ml, "_KERNELS_ON_CPU", False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not recordable(*tensors)


def test_a_key_turned_down_is_not_asked_again(monkeypatch):
    monkeypatch.setattr(dg.DeductionGraphs, "EMULATE_ON_CPU", True)
    asked = []

    def turned_down(*tensors, **options):
        asked.append(tensors[0].shape)
        return False

    monkeypatch.setattr(mp, "_deduction_runs_kernels", turned_down)
    on, off = pair()
    x = ids(2, (2, 8))
    with torch.no_grad():
        for _ in range(6):
            assert torch.equal(on(x).logits, off(x).logits)
    assert all(g.recorded_keys == 0 and g.replays == 0 for g in graphs(on))
    assert len(asked) == 2  # once per layer


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graphs_train_and_generate_as_the_operators_do():
    # the kernels' sizes (head_dim 64, A_dff 170), bf16 autocast, fused AdamW; real CUDA graphs
    on, off = pair(device="cuda", hidden_size=256, num_attention_heads=4, head_dim=64, A_dff=170, num_reslayerA=3,
                   intermediate_size=680, max_position_embeddings=256)
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-3, fused=True) for m in (on, off)]
    for step in range(6):
        x = ids(step, (2, 128), "cuda")
        for model, opt in zip((on, off), opts):
            opt.zero_grad()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(x, labels=x).loss
            loss.backward()
            opt.step()
            model.last_loss = loss.detach()
        assert torch.equal(on.last_loss, off.last_loss)
        assert_same_grads(on, off)
    assert all(g.recorded_keys == 1 and g.replays == 4 for g in graphs(on))
    # two forwards before their backwards
    for model in (on, off):
        model.zero_grad()
        a, b = ids(20, (2, 128), "cuda"), ids(21, (2, 128), "cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            first, second = model(a, labels=a).loss, model(b, labels=b).loss
        first.backward()
        second.backward()
    assert_same_grads(on, off)
    assert all(g.recomputed == 2 for g in graphs(on))  # (both backwards found the other forward's activations)
    on.eval(), off.eval()
    p = ids(7, (3, 16), "cuda")
    for _ in range(4):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            assert torch.equal(on.generate(p, max_new_tokens=8, do_sample=False),
                               off.generate(p, max_new_tokens=8, do_sample=False))
    assert all(g.recorded_keys == 2 for g in graphs(on))
    # float32 without autocast: the learner runs on cuBLAS, and the graphs are turned down
    on.train()
    for _ in range(4):
        x = ids(3, (2, 64), "cuda")
        on(x, labels=x).loss.backward()
    assert all(g.recorded_keys == 2 and len(g._never) == 1 for g in graphs(on))
