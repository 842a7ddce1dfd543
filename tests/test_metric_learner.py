"""The model runs each layer's metric learner as one operator (modeling/metric_learner.py) in training, inference and
under torch.compile, with the numbers of the modules, and steps aside for anything that changes the modules (hooks,
adapters). The operator itself is tested in test_metric_learner_op.py; the CUDA test here runs on a GPU machine only
(``python -m pytest tests/test_metric_learner.py`` there)."""

import pytest
import torch

from pldr_hf import PldrConfig, PldrForCausalLM
from pldr_hf.modeling import metric_learner as ML
from pldr_hf.modeling import modeling_pldr as M

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


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
    orig = M.fused_metric_learner
    monkeypatch.setattr(M, "fused_metric_learner", lambda *a: calls.append(1) or orig(*a))
    loss = model(input_ids=ids, labels=ids).loss
    with torch.no_grad():
        infer = model(input_ids=ids, labels=ids).loss
    assert len(calls) == 2 * model.config.num_hidden_layers  # training and inference both take the operator
    monkeypatch.setattr(M, "fused_metric_learner", lambda *a: None)  # the modules themselves
    ref = model(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(infer, ref.detach(), atol=1e-5, rtol=0)
    # Gradients of every parameter, in float64 (float32 sum-order noise grows through the power law).
    model.double()
    monkeypatch.setattr(M, "fused_metric_learner", orig)
    loss = model(input_ids=ids, labels=ids).loss
    grads = torch.autograd.grad(loss, list(model.parameters()))
    monkeypatch.setattr(M, "fused_metric_learner", lambda *a: None)
    ref = model(input_ids=ids, labels=ids).loss
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    for (name, _), g, r in zip(model.named_parameters(), grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-10 * max(1.0, r.abs().max().item()), rtol=0, msg=name)


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
    assert ML.learner_tensors(model.decoder.dec_layers[0].mha1.reslayerAs) is not None
    glu.gluw1 = torch.nn.Sequential(glu.gluw1)
    assert ML.learner_tensors(model.decoder.dec_layers[0].mha1.reslayerAs) is None


def test_compiled_training_step_has_no_graph_break_and_the_eager_numbers():
    model = _tiny_model()
    model.train()
    ids = torch.randint(4, 64, (2, 12), generator=torch.Generator().manual_seed(3))
    eager = model(input_ids=ids, labels=ids).loss
    eager_grads = torch.autograd.grad(eager, list(model.parameters()))
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(input_ids=ids, labels=ids)
    assert explained.graph_break_count == 0, explained.break_reasons
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    loss = compiled(input_ids=ids, labels=ids).loss
    grads = torch.autograd.grad(loss, list(model.parameters()))
    torch._dynamo.reset()
    torch.testing.assert_close(loss, eager, atol=1e-5, rtol=0)
    for (name, _), g, r in zip(model.named_parameters(), grads, eager_grads):
        torch.testing.assert_close(g, r, atol=1e-5 * max(1.0, r.abs().max().item()), rtol=0, msg=name)


@needs_cuda
def test_training_with_the_operator_and_with_the_modules_gives_the_same_losses(monkeypatch):
    def run():
        model = _tiny_model().cuda().train()
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
        return losses

    with_op = run()
    monkeypatch.setattr(M, "fused_metric_learner", lambda *a: None)
    with_modules = run()
    # Same weights at step 0: the bf16 forwards agree to rounding; later steps drift by bf16 noise through AdamW
    # (its normalised updates turn tiny gradient differences into full-size steps), not by a wrong gradient.
    assert with_op[0] == pytest.approx(with_modules[0], abs=2e-3), (with_op, with_modules)
    assert with_op == pytest.approx(with_modules, abs=3e-2), (with_op, with_modules)
    assert with_op[-1] < with_op[0] - 0.1
