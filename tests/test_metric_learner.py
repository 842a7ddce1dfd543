"""The model runs each layer's metric learner as one operator (modeling/metric_learner.py) in training, inference and
under torch.compile, with the numbers of the modules, and steps aside for anything that changes the modules (hooks,
adapters). The model stores each learner stacked (PldrMetricLearner) and checkpoints keep the port's per-unit
names. The operator itself is tested in test_metric_learner_op.py; the CUDA test here runs on a GPU machine only
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


def _as_modules(model):
    """A copy of the model with its learners as the port's modules (same weights)."""
    import copy

    return copy.deepcopy(model).use_metric_learner_modules()


def test_learners_are_stored_stacked_and_compute_what_the_modules_compute(monkeypatch):
    model = _tiny_model()
    learner = model.decoder.dec_layers[0].mha1.reslayerAs
    assert isinstance(learner, M.PldrMetricLearner)
    # 2 tensors per layer instead of 2 units x (2 GLUs x 6 + 2), and the power law's 5 as 1
    names = [n for n, _ in model.named_parameters()]
    assert sum(1 for n in names if ".reslayerAs." in n) == 2 * model.config.num_hidden_layers
    assert sum(1 for n in names if ".plgatt_layer." in n) == model.config.num_hidden_layers
    ids = torch.randint(4, 64, (2, 12))
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    with torch.no_grad():
        infer = model(input_ids=ids, labels=ids).loss
    modules = _as_modules(model)
    assert isinstance(modules.decoder.dec_layers[0].mha1.reslayerAs, torch.nn.ModuleList)
    monkeypatch.setattr(M, "fused_metric_learner", lambda *a: None)  # the modules themselves, one by one
    ref = modules(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(infer, ref.detach(), atol=1e-5, rtol=0)
    # Gradients of every parameter, in float64 (float32 sum-order noise grows through the power law), compared in the
    # port's names: the flat gradients sliced as state_dict() slices the weights.
    model.double()
    modules.double()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    modules(input_ids=ids, labels=ids).loss.backward()
    grads = []
    for m in (model, modules):
        for p in m.parameters():
            p.data = p.grad  # (state_dict() then slices the gradients)
        grads.append(m.state_dict())
    assert set(grads[0]) == set(grads[1])
    for name, g in grads[1].items():
        torch.testing.assert_close(grads[0][name], g, atol=1e-10 * max(1.0, g.abs().max().item()), rtol=0, msg=name)


def test_hooks_on_the_learner_run_and_modules_with_adapters_run_module_by_module():
    model = _tiny_model()
    ids = torch.randint(4, 64, (2, 12))
    model.train()
    base = model(input_ids=ids, labels=ids).loss.item()
    # A forward hook on a stacked learner takes effect (it is an ordinary module call)
    learner = model.decoder.dec_layers[0].mha1.reslayerAs
    handle = learner.register_forward_hook(lambda mod, inp, out: out * 3.0)
    hooked = model(input_ids=ids, labels=ids).loss.item()
    handle.remove()
    assert hooked != pytest.approx(base, abs=1e-4)
    # As modules: a hook on one GLU makes that layer's modules run one by one, and takes effect
    modules = _as_modules(model)
    units = modules.decoder.dec_layers[0].mha1.reslayerAs
    assert modules(input_ids=ids, labels=ids).loss.item() == pytest.approx(base, abs=1e-5)
    glu = units[0].denseAs[0]
    handle = glu.register_forward_hook(lambda mod, inp, out: out * 3.0)
    assert ML.learner_tensors(units) is None
    hooked = modules(input_ids=ids, labels=ids).loss.item()
    handle.remove()
    assert hooked != pytest.approx(base, abs=1e-4)
    # A GLU replaced by another module (as an adapter library does): no fused path for that layer.
    assert ML.learner_tensors(units) is not None
    glu.gluw1 = torch.nn.Sequential(glu.gluw1)
    assert ML.learner_tensors(units) is None
    assert modules(input_ids=ids, labels=ids).loss.item() == pytest.approx(base, abs=1e-5)


def test_state_dict_and_checkpoints_keep_the_ports_names(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = _tiny_model(glu_bias=True).eval()
    modules = _as_modules(model)
    sd = model.state_dict()
    assert list(sd) != [] and set(sd) == set(modules.state_dict())
    assert "decoder.dec_layers.1.mha1.reslayerAs.1.denseAs.0.gluw2.bias" in sd
    for k, v in modules.state_dict().items():
        torch.testing.assert_close(sd[k], v, atol=0, rtol=0, msg=k)
    ids = torch.randint(4, 64, (2, 9))
    ref = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "stacked")
    assert set(load_file(tmp_path / "stacked" / "model.safetensors")) == set(sd)
    modules.save_pretrained(tmp_path / "modules")
    for folder in ("stacked", "modules"):
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / folder).eval()
        assert isinstance(loaded.decoder.dec_layers[0].mha1.reslayerAs, M.PldrMetricLearner)
        torch.testing.assert_close(loaded(input_ids=ids).logits, ref, atol=0, rtol=0)
    half = AutoModelForCausalLM.from_pretrained(tmp_path / "stacked", dtype=torch.bfloat16)
    assert {p.dtype for p in half.decoder.dec_layers[0].mha1.parameters()} == {torch.bfloat16}
    # load_state_dict takes the port's names (and the stacked ones); an incomplete learner is reported missing
    fresh = _tiny_model(glu_bias=True)
    assert not fresh.load_state_dict(sd).missing_keys
    torch.testing.assert_close(fresh.eval()(input_ids=ids).logits, ref, atol=0, rtol=0)
    part = dict(sd)
    del part["decoder.dec_layers.0.mha1.reslayerAs.0.denseAs.1.gluw3.weight"]
    result = _tiny_model(glu_bias=True).load_state_dict(part, strict=False)
    assert result.missing_keys == ["decoder.dec_layers.0.mha1.reslayerAs.0.denseAs.1.gluw3.weight"]


def test_other_activations_keep_the_modules():
    model = _tiny_model(hidden_act="gelu")
    assert isinstance(model.decoder.dec_layers[0].mha1.reslayerAs, torch.nn.ModuleList)
    ids = torch.randint(4, 64, (1, 6))
    assert torch.isfinite(model(input_ids=ids).logits).all()


def test_compiled_training_step_has_no_graph_break_and_the_eager_numbers():
    # (compiled training also takes the LM head's bias into its GEMM: _linear_bias_folded; its gradient is checked too)
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
    def run(as_modules=False, autocast=True):
        model = _tiny_model()
        if as_modules:
            model.use_metric_learner_modules()
        model = model.cuda().train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        data = torch.randint(4, 64, (4, 16), generator=torch.Generator().manual_seed(1)).cuda()
        losses = []
        for step in range(8):
            ids = data[:3] if step == 4 else data  # a second shape mid-run
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        return losses

    with_op = run()
    exact = run(autocast=False)
    monkeypatch.setattr(M, "fused_metric_learner", lambda *a: None)
    with_modules = run(as_modules=True)
    # Same weights at step 0: both bf16 forwards are within bf16 rounding of the float32 loss. Later steps drift by
    # bf16 noise through AdamW (its normalised updates turn tiny gradient differences into full-size steps): on an
    # H100 the modules' bf16 run stayed within 0.022 of the float32 run over the 8 steps and the operator's within
    # 0.067 (its kernels' bf16 gradients are within 2x the modules' bf16 errors, test_metric_learner_op.py).
    op_err = [abs(a - b) for a, b in zip(with_op, exact)]
    modules_err = [abs(a - b) for a, b in zip(with_modules, exact)]
    assert op_err[0] <= max(modules_err[0], 2e-3), (with_op, with_modules, exact)
    assert max(op_err) <= 0.1 and max(modules_err) <= 0.1, (with_op, with_modules, exact)
    assert with_op[-1] < with_op[0] - 0.1


def test_checkpoint_missing_entries_get_a_new_models_values(tmp_path):
    # transformers materialises what a checkpoint lacks with uninitialised memory, then initialises it: the stored
    # learner and power law must give those slices a new model's values (not the memory's NaN or garbage), and keep
    # every loaded slice exactly
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    model = _tiny_model(glu_bias=True)
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    p = "decoder.dec_layers.0.mha1."
    missing = {p + "reslayerAs.0.denseAs.1.gluw3.weight", p + "reslayerAs.1.layernormA.weight",
               p + "reslayerAs.1.denseAs.0.gluw2.bias", p + "plgatt_layer.pwlst", p + "plgatt_layer.blst"}
    for k in missing:
        del state[k]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert set(info["missing_keys"]) == missing
    got = loaded.state_dict()
    for k, v in state.items():
        assert torch.equal(got[k], v), k
    w = got[p + "reslayerAs.0.denseAs.1.gluw3.weight"]  # Xavier uniform [d, A_dff]
    bound = (6 / sum(w.shape)) ** 0.5
    assert torch.isfinite(w).all() and w.std() > bound / 4 and w.abs().max() <= bound
    assert torch.equal(got[p + "reslayerAs.1.layernormA.weight"], torch.ones(16))
    assert torch.equal(got[p + "reslayerAs.1.denseAs.0.gluw2.bias"], torch.zeros(20))
    assert torch.equal(got[p + "plgatt_layer.blst"], torch.zeros(2, 16, 16))
    exponents = got[p + "plgatt_layer.pwlst"]  # Xavier normal
    assert torch.isfinite(exponents).all() and exponents.std() > 0.05
    ids = torch.randint(4, 64, (1, 7))
    assert torch.isfinite(loaded(input_ids=ids).logits).all()


def test_offloaded_layers_run_generate_and_save_as_the_loaded_model(tmp_path, monkeypatch):
    # accelerate's offloading (from_pretrained with layers on "cpu"/"disk", dispatch_model, disk_offload) keeps each
    # offloaded module's weights in a map by name and brings them in around the module's forward: the stored learner
    # and power law must be made from maps by the port's names, and the attention must not read the offloaded
    # LayerNorm's or projections' weights outside their modules' own calls (they are on the meta device there)
    from accelerate import disk_offload, dispatch_model
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(M.PldrAttention, "JOINT_ON_CPU", True)  # (the GPU's joint q|k|v GEMM on large inputs)
    model = _tiny_model(glu_bias=True).eval()
    model.save_pretrained(tmp_path / "model")
    small, large = torch.randint(4, 64, (2, 9)), torch.randint(4, 64, (20, 60))  # (1200 rows: the joint GEMM's size)
    with torch.no_grad():
        ref = [model(input_ids=x).logits for x in (small, large)]
    ref_tokens = model.generate(small, max_new_tokens=6, do_sample=False)
    layout = {"decoder.embedding": "cpu", "decoder.layernorm1": "cpu", "decoder.dec_layers.0": "cpu",
              "decoder.dec_layers.1": "disk", "final_layer": "disk"}
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model", device_map=layout,
                                                  offload_folder=tmp_path / "offload").eval()
    assert loaded.decoder.dec_layers[1].mha1.reslayerAs.glu_weights.is_meta  # (offloaded indeed)
    with torch.no_grad():
        for x, want in zip((small, large), ref):
            torch.testing.assert_close(loaded(input_ids=x).logits, want, atol=0, rtol=0)
    assert torch.equal(loaded.generate(small, max_new_tokens=6, do_sample=False), ref_tokens)
    # saving the offloaded model writes every weight (the offloaded ones read back by the port's names)
    loaded.save_pretrained(tmp_path / "resaved")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "resaved").eval()
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
    assert ML._has_hooks(loaded.decoder.dec_layers[1].mha1.reslayerAs)  # (its weights come in around its call)
    # hooks that only place inputs on the weights' device (a device_map over several GPUs) keep the fused paths
    placed = dispatch_model(_tiny_model(glu_bias=True).eval(), {"": "cpu"}, force_hooks=True)
    attention = placed.decoder.dec_layers[0].mha1
    assert hasattr(attention.wq, "_hf_hook") and hasattr(attention.reslayerAs, "_hf_hook")
    assert not any(ML._has_hooks(m) for m in (attention.wq, attention.layernorm1, attention.reslayerAs))
    with torch.no_grad():
        torch.testing.assert_close(placed(input_ids=large).logits, ref[1], atol=0, rtol=0)
    # accelerate's own entry points write the model's state dict (the port's names) to disk and read it back
    for offload in (lambda m: disk_offload(m, str(tmp_path / "disk"), execution_device="cpu"),
                    lambda m: dispatch_model(m, {"decoder.embedding": "cpu", "decoder.layernorm1": "cpu",
                                                 "decoder.dec_layers": "disk", "final_layer": "cpu"},
                                             offload_dir=str(tmp_path / "dispatch"))):
        with torch.no_grad():
            torch.testing.assert_close(offload(_tiny_model(glu_bias=True).eval())(input_ids=large).logits, ref[1],
                                       atol=0, rtol=0)


@needs_cuda
def test_cuda_layers_offloaded_to_cpu_and_disk_run_as_on_the_gpu(tmp_path):
    # With a GPU, accelerate's "cpu" offloading keeps the weights in host memory and brings them to the GPU around
    # each module's call (a map made from the model's state dict: the port's names); "disk" reads the checkpoint
    from transformers import AutoModelForCausalLM

    model = _tiny_model(glu_bias=True).eval()
    model.save_pretrained(tmp_path / "model")
    gpu = AutoModelForCausalLM.from_pretrained(tmp_path / "model", device_map={"": 0}).eval()
    layout = {"decoder.embedding": 0, "decoder.layernorm1": 0, "decoder.dec_layers.0": "cpu",
              "decoder.dec_layers.1": "disk", "final_layer": "cpu"}
    offloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model", device_map=layout,
                                                     offload_folder=tmp_path / "offload").eval()
    assert offloaded.decoder.dec_layers[0].mha1.plgatt_layer.power_params.is_meta
    for shape in ((2, 9), (20, 60)):
        ids = torch.randint(4, 64, shape, device="cuda")
        with torch.no_grad():
            # (the offloaded layers run module by module, the GPU model's through the fused operators: float32
            # rounding apart, up to 2.3e-4 measured on an H200; weights read wrongly would differ by order 0.1)
            torch.testing.assert_close(offloaded(input_ids=ids).logits, gpu(input_ids=ids).logits,
                                       atol=2e-3, rtol=2e-3)
    # generate() through the offloaded layers: the greedy tokens of the same model stepped with its cache by hand
    ids = torch.randint(4, 64, (2, 9), device="cuda")
    with torch.no_grad():
        out = offloaded(ids, use_cache=True)
        seq = ids
        for _ in range(6):
            seq = torch.cat([seq, out.logits[:, -1].argmax(-1, keepdim=True)], 1)
            out = offloaded(seq[:, -1:], use_cache=True, **{M.CACHE_FIELD: getattr(out, M.CACHE_FIELD)})
    assert torch.equal(offloaded.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                          min_new_tokens=6, do_sample=False), seq)


def test_the_power_law_is_one_parameter_with_the_ports_names():
    model = _tiny_model()
    power = model.decoder.dec_layers[1].mha1.plgatt_layer
    assert [n for n, _ in power.named_parameters()] == ["power_params"]
    assert tuple(power.power_params.shape) == (5, 2, 16, 16)
    # the five names read as views of it, in the order W, b, p, a, ba, and gradients reach it through them
    for i, name in enumerate(M.PldrPowerLaw.NAMES):
        assert getattr(power, name).data_ptr() == power.power_params[i].data_ptr()
    (power.pwlst.sum() + 2 * power.balst.sum()).backward()
    want = torch.zeros(5, 2, 16, 16)
    want[2], want[4] = 1.0, 2.0
    assert torch.equal(power.power_params.grad, want)
    # the state dict has the port's names; load_state_dict takes them, and reports a lacking one as missing
    sd = model.state_dict()
    prefix = "decoder.dec_layers.1.mha1.plgatt_layer."
    assert {k for k in sd if k.startswith(prefix)} == {prefix + n for n in M.PldrPowerLaw.NAMES}
    fresh = _tiny_model()
    fresh.decoder.dec_layers[1].mha1.plgatt_layer.power_params.data.zero_()
    assert not fresh.load_state_dict(sd).missing_keys
    assert torch.equal(fresh.decoder.dec_layers[1].mha1.plgatt_layer.power_params, power.power_params)
    part = {k: v for k, v in sd.items() if k != prefix + "alst"}
    assert fresh.load_state_dict(part, strict=False).missing_keys == [prefix + "alst"]
    bad = dict(sd, **{prefix + "alst": torch.zeros(2, 16, 15)})
    with pytest.raises(RuntimeError, match=r"size mismatch for decoder.dec_layers.1.mha1.plgatt_layer.alst"):
        fresh.load_state_dict(bad)
    # assigning a name writes its slice (as transformers' loader does)
    new = torch.rand(2, 16, 16)
    power.alst = torch.nn.Parameter(new.clone())
    assert torch.equal(power.power_params[3], new) and [n for n, _ in power.named_parameters()] == ["power_params"]
    with pytest.raises(ValueError, match=r"power law: alst must have shape \(2, 16, 16\), got \(2, 16\)"):
        power.alst = torch.nn.Parameter(torch.zeros(2, 16))


def test_weight_decay_groups_are_those_of_the_modules(tmp_path):
    # Trainer decays the learner's GLU weights and the power law (named as neither biases nor LayerNorms), not the
    # learner's biases and LayerNorms: as it treats the port's modules
    from transformers import Trainer, TrainingArguments

    model = _tiny_model(glu_bias=True)
    trainer = Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), report_to=[]))
    decayed = set(trainer.get_decay_parameter_names(model))
    p = "decoder.dec_layers.0.mha1."
    assert {p + "reslayerAs.glu_weights", p + "plgatt_layer.power_params"} <= decayed
    assert p + "reslayerAs.biases_and_layernorms" not in decayed
    modules = _as_modules(model)
    decayed_modules = set(Trainer(model=modules, args=TrainingArguments(output_dir=str(tmp_path), report_to=[]))
                          .get_decay_parameter_names(modules))
    learner = {n.partition(p + "reslayerAs.")[2] for n in decayed_modules if n.startswith(p + "reslayerAs.")}
    assert learner and all(n.endswith(".weight") and ".gluw" in n for n in learner)
    assert len(learner) == 2 * 2 * 3  # every GLU weight of 2 units x 2 GLUs, no bias, no LayerNorm
