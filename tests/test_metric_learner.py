"""The metric learner's training path (one autograd node per layer, CUDA graphs on GPU) computes exactly what the
modules compute: outputs and gradients of A and every parameter, with and without biases, frozen parameters, under
autocast, and it steps aside for anything that changes the modules (hooks, adapters). The CUDA tests run on a GPU
machine only (``python -m pytest tests/test_metric_learner.py`` there)."""

import copy

import pytest
import torch

from pldr_hf import PldrConfig, PldrForCausalLM
from pldr_hf.modeling import modeling_pldr as M

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


def _attention(bias=True, glus=2, units=3, seed=0, device="cpu", graphs=True):
    cfg = PldrConfig(vocab_size=64, hidden_size=32, num_attention_heads=2, head_dim=16, num_hidden_layers=2,
                     intermediate_size=40, A_dff=20, num_reslayerA=units, num_denseA=glus, glu_bias=bias,
                     metric_learner_cuda_graphs=graphs)
    torch.manual_seed(seed)
    attn = M.PldrAttention(cfg, 0)
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return attn.to(device)


def _modules(attn, A):
    for unit in attn.reslayerAs:
        A = unit(A)
    return A


def _grads(out, A, params, gout):
    return torch.autograd.grad(out, [A] + params, gout)


def _compare(attn, A, gout, graphs, atol):
    params = list(attn.reslayerAs.parameters())
    ref = _modules(attn, A)
    ref_grads = _grads(ref, A, params, gout)
    out = M.fused_metric_learner(attn.reslayerAs, A, graphs)
    assert out is not None and out.shape == ref.shape and out.dtype == ref.dtype
    grads = _grads(out, A, params, gout)
    torch.testing.assert_close(out, ref, atol=atol, rtol=0)
    for (name, _), g, r in zip([("A", None)] + list(attn.reslayerAs.named_parameters()), grads, ref_grads):
        assert g.shape == r.shape and g.dtype == r.dtype, name
        torch.testing.assert_close(g, r, atol=atol * max(1.0, r.abs().max().item()), rtol=0, msg=name)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("glus", [1, 2, 3])
def test_fused_learner_matches_the_modules_cpu(bias, glus):
    attn = _attention(bias=bias, glus=glus)
    A = torch.randn(2, 2, 16, 16, requires_grad=True)
    _compare(attn, A, torch.randn(2, 2, 16, 16), None, atol=1e-5)


def test_fused_learner_under_bf16_autocast_cpu():
    attn = _attention()
    A = torch.randn(2, 2, 16, 16, requires_grad=True)
    gout = torch.randn(2, 2, 16, 16)
    params = list(attn.reslayerAs.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _modules(attn, A)
        out = M.fused_metric_learner(attn.reslayerAs, A, None)
    assert out.dtype == ref.dtype == torch.float32  # LayerNorm output, as autocast gives
    torch.testing.assert_close(out, ref, atol=1e-2, rtol=0)
    for g, r in zip(_grads(out, A, params, gout), _grads(ref, A, params, gout)):
        assert g.dtype == r.dtype
        assert (g - r).abs().max() <= 0.02 * r.abs().max()


def test_frozen_learner_gives_only_the_input_gradient():
    attn = _attention()
    for p in attn.reslayerAs.parameters():
        p.requires_grad_(False)
    A = torch.randn(2, 2, 16, 16, requires_grad=True)
    gout = torch.randn(2, 2, 16, 16)
    (ref,) = torch.autograd.grad(_modules(attn, A), A, gout)
    (got,) = torch.autograd.grad(M.fused_metric_learner(attn.reslayerAs, A, None), A, gout)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def _tiny_model(**kw):
    cfg = PldrConfig(vocab_size=64, hidden_size=32, num_attention_heads=2, head_dim=16, num_hidden_layers=2,
                     intermediate_size=40, A_dff=20, num_reslayerA=2, num_denseA=2, max_position_embeddings=64, **kw)
    torch.manual_seed(0)
    return PldrForCausalLM(cfg)


def test_training_forward_uses_the_fused_learner_and_matches_inference(monkeypatch):
    model = _tiny_model()
    ids = torch.randint(4, 64, (2, 12))
    model.train()
    calls = []
    orig = M._FusedMetricLearner.apply
    monkeypatch.setattr(M._FusedMetricLearner, "apply", lambda *a: calls.append(1) or orig(*a))
    loss = model(input_ids=ids, labels=ids).loss
    monkeypatch.undo()
    assert len(calls) == model.config.num_hidden_layers
    with torch.no_grad():
        ref = model(input_ids=ids, labels=ids).loss  # modules (no gradient needed)
    torch.testing.assert_close(loss.detach(), ref, atol=1e-5, rtol=0)


def test_hooks_and_replaced_glus_make_the_modules_run():
    model = _tiny_model()
    ids = torch.randint(4, 64, (2, 12))
    model.train()
    base = model(input_ids=ids, labels=ids).loss.item()
    # A forward hook on one learner GLU must take effect in training too (it would be skipped by the fused path).
    glu = model.decoder.dec_layers[0].mha1.reslayerAs[0].denseAs[0]
    handle = glu.register_forward_hook(lambda mod, inp, out: out * 3.0)
    hooked = model(input_ids=ids, labels=ids).loss.item()
    with torch.no_grad():
        hooked_ref = model(input_ids=ids, labels=ids).loss.item()
    handle.remove()
    assert hooked != pytest.approx(base, abs=1e-4)
    assert hooked == pytest.approx(hooked_ref, abs=1e-5)
    # A GLU replaced by another module (as an adapter library does): no fused path for that layer.
    assert M._learner_params(model.decoder.dec_layers[0].mha1.reslayerAs) is not None
    glu.gluw1 = torch.nn.Sequential(glu.gluw1)
    assert M._learner_params(model.decoder.dec_layers[0].mha1.reslayerAs) is None


def test_graph_cache_is_not_copied_and_is_freed_by_eval():
    model = _tiny_model()
    cache = model.decoder.dec_layers[0].mha1._learner_graphs
    cache.graphs["x"] = object()
    clone = copy.deepcopy(model)
    assert clone.decoder.dec_layers[0].mha1._learner_graphs.graphs == {}
    assert cache.graphs  # the original keeps its own
    model.train()
    assert cache.graphs
    model.eval()  # leaving training frees the graphs
    assert cache.graphs == {}


def test_config_key_validated():
    with pytest.raises(ValueError, match="metric_learner_cuda_graphs"):
        PldrConfig(metric_learner_cuda_graphs="yes")


# ---------------------------------------------------------------------------------------------------------------------
# CUDA graphs
# ---------------------------------------------------------------------------------------------------------------------
@needs_cuda
@pytest.mark.parametrize("bias", [True, False])
def test_cuda_graph_learner_matches_the_modules(bias):
    attn = _attention(bias=bias, device="cuda")
    cache = M._LearnerGraphCache()
    for step in range(3):  # capture, then replays
        A = torch.randn(4, 2, 16, 16, device="cuda", requires_grad=True)
        _compare(attn, A, torch.randn_like(A), cache, atol=1e-4)
    assert len(cache.graphs) == 1 and not cache.disabled
    with torch.autocast("cuda", dtype=torch.bfloat16):
        A = torch.randn(4, 2, 16, 16, device="cuda", requires_grad=True)
        ref = _modules(attn, A)
        out = M.fused_metric_learner(attn.reslayerAs, A, cache)
    torch.testing.assert_close(out, ref, atol=3e-2, rtol=0)
    assert len(cache.graphs) == 2  # one per (shape, compute dtype)


@needs_cuda
def test_cuda_graph_two_forwards_before_their_backwards():
    attn = _attention(device="cuda")
    cache = M._LearnerGraphCache()
    params = list(attn.reslayerAs.parameters())
    A1 = torch.randn(4, 2, 16, 16, device="cuda", requires_grad=True)
    A2 = torch.randn(4, 2, 16, 16, device="cuda", requires_grad=True)
    g1, g2 = torch.randn_like(A1), torch.randn_like(A2)
    out1 = M.fused_metric_learner(attn.reslayerAs, A1, cache)
    out2 = M.fused_metric_learner(attn.reslayerAs, A2, cache)  # overwrites the graph's buffers
    got1 = _grads(out1, A1, params, g1)
    got2 = _grads(out2, A2, params, g2)
    for got, A, g in ((got1, A1, g1), (got2, A2, g2)):
        for x, r in zip(got, _grads(_modules(attn, A), A, params, g)):
            torch.testing.assert_close(x, r, atol=1e-4 * max(1.0, r.abs().max().item()), rtol=0)
    torch.testing.assert_close(out1, _modules(attn, A1).detach(), atol=1e-4, rtol=0)


@needs_cuda
def test_cuda_graph_follows_parameters_that_move():
    attn = _attention(device="cuda")
    cache = M._LearnerGraphCache()
    A = torch.randn(4, 2, 16, 16, device="cuda", requires_grad=True)
    _compare(attn, A, torch.randn_like(A), cache, atol=1e-4)
    # New storage for every parameter (as .to(), FSDP or load_state_dict(assign=True) give): results must follow.
    with torch.no_grad():
        for p in attn.reslayerAs.parameters():
            p.data = p.data.clone() * 1.5
    _compare(attn, A, torch.randn_like(A), cache, atol=1e-4)
    # Parameters that move between forward and backward: the backward recomputes op by op.
    params = list(attn.reslayerAs.parameters())
    out = M.fused_metric_learner(attn.reslayerAs, A, cache)
    saved = [p.data for p in params]
    for p in params:
        p.data = p.data.clone()
    got = _grads(out, A, params, torch.ones_like(out))
    for p, s in zip(params, saved):
        p.data = s
    for x, r in zip(got, _grads(_modules(attn, A), A, params, torch.ones_like(out))):
        torch.testing.assert_close(x, r, atol=1e-4 * max(1.0, r.abs().max().item()), rtol=0)


@needs_cuda
def test_training_with_and_without_cuda_graphs_gives_the_same_losses():
    def run(graphs):
        model = _tiny_model(metric_learner_cuda_graphs=graphs).cuda().train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        data = torch.randint(4, 64, (4, 16), generator=torch.Generator().manual_seed(1)).cuda()
        losses = []
        for step in range(8):
            ids = data[:3] if step == 4 else data  # a second shape mid-run
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        return losses, model

    with_graphs, model = run(True)
    without, _ = run(False)
    assert with_graphs == pytest.approx(without, abs=2e-3)
    assert with_graphs[-1] < with_graphs[0]
    assert len(model.decoder.dec_layers[0].mha1._learner_graphs.graphs) == 2
    free_before = torch.cuda.mem_get_info()[0]
    model.eval()
    torch.cuda.empty_cache()
    assert model.decoder.dec_layers[0].mha1._learner_graphs.graphs == {}
    assert torch.cuda.mem_get_info()[0] >= free_before
