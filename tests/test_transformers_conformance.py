"""PLDR-LLM behaves like an in-tree transformers causal LM: tuple outputs, compiled decoding without recompiles,
packed / padding-free batches and 4D masks, inputs_embeds in generate, run-time attention switching, multi-token
static-cache steps, cache_first_G and half precision.

Tiny random models on CPU; every test compares numbers or tokens against an independent way of getting them.
"""

import contextlib
import copy

import pytest
import torch
from transformers import CompileConfig, DataCollatorWithFlattening, DynamicCache, StaticCache
from transformers.modeling_utils import AttentionInterface

import pldr_hf  # noqa: F401  (registers the model)
import pldr_hf.modeling.modeling_pldr as modeling_pldr
import pldr_hf.modeling.packing as packing
from pldr_hf.modeling.modeling_pldr import CACHE_FIELD
from pldr_hf import (
    PldrConfig,
    PldrForCausalLM,
    PldrForQuestionAnswering,
    PldrForSequenceClassification,
    PldrForTokenClassification,
    PldrModel,
)

TINY = dict(vocab_size=64, hidden_size=16, num_attention_heads=2, head_dim=8, num_hidden_layers=2,
            intermediate_size=42, A_dff=12, num_reslayerA=2, num_denseA=2, max_position_embeddings=128,
            pad_token_id=0, bos_token_id=None, eos_token_id=None)
TOL = dict(rtol=0, atol=5e-5)  # float32 sum-order noise, amplified through the power law


def make(seed=0, cls=PldrForCausalLM, attn="sdpa", **overrides):
    torch.manual_seed(seed)
    model = cls(PldrConfig(**{**TINY, **overrides})).eval()
    model.config._attn_implementation = attn
    return model


def _flex_eagerly(attn):
    """For flex attention, torch.compile'd functions (transformers' flex kernel) run eagerly inside the context."""
    return torch.compiler.set_stance("force_eager") if attn == "flex_attention" else contextlib.nullcontext()


def tokens(seed, n, batch=None):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, 64, (n,) if batch is None else (batch, n), generator=g)


def right_pad(seqs):
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
    return ids, mask


def left_pad(seqs):
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = s
        mask[i, width - len(s):] = 1
    return ids, mask


# ----------------------------------------------------------------------------------------------------------------------
# The cache's name: past_key_values, or cache from transformers 5.24 on
# ----------------------------------------------------------------------------------------------------------------------
def test_cache_is_taken_under_either_name_and_returned_under_the_installed_ones():
    import inspect

    from transformers.masking_utils import create_causal_mask
    from transformers.modeling_outputs import CausalLMOutputWithPast

    installed = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"
    assert modeling_pldr.CACHE_FIELD == installed
    assert installed in CausalLMOutputWithPast.__dataclass_fields__
    model = make(2)
    x = tokens(2, 12, batch=2)
    with torch.no_grad():
        for cls in (PldrForCausalLM, PldrModel, PldrForSequenceClassification):
            out = (model if cls is PldrForCausalLM else make(2, cls=cls))(x[:, :8], use_cache=True)
            assert isinstance(getattr(out, installed), modeling_pldr.PldrDynamicCache), cls.__name__
            assert installed in out.keys(), cls.__name__  # where generate() looks for it
        steps = []
        for name in ("past_key_values", "cache"):
            cache = getattr(model(x[:, :8], use_cache=True), installed)
            step = model(x[:, 8:], use_cache=True, **{name: cache})
            assert getattr(step, installed) is cache and cache.get_seq_length() == 12
            steps.append(step.logits)
        torch.testing.assert_close(steps[0], steps[1], rtol=0, atol=0)
        alone = model(x[:, 8:], position_ids=torch.arange(8, 12)[None]).logits  # what an ignored cache would give
        assert (steps[0] - alone).abs().max() > 1e-2
        with pytest.raises(ValueError, match="two different caches"):
            model(x, past_key_values=DynamicCache(), cache=DynamicCache())
    # generate() hands the cache from step to step under the installed name: its tokens are a greedy loop's.
    with torch.no_grad():
        got = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=6, min_new_tokens=6,
                             do_sample=False)
        out = model(x, use_cache=True)
        seq = x
        for _ in range(6):
            seq = torch.cat([seq, out.logits[:, -1].argmax(-1, keepdim=True)], 1)
            out = model(seq[:, -1:], use_cache=True, **{installed: getattr(out, installed)})
    assert torch.equal(got, seq)


# ----------------------------------------------------------------------------------------------------------------------
# resize_token_embeddings
# ----------------------------------------------------------------------------------------------------------------------
def test_resize_token_embeddings_keeps_the_old_tokens_and_round_trips(tmp_path):
    # Adding tokens (tokenizer.add_tokens, then model.resize_token_embeddings) grows the embedding and the LM head
    # (with its bias): the old tokens' logits stay as they were, generation and save/load work with the new size.
    model = make(2)
    x = tokens(2, 9, batch=2)
    with torch.no_grad():
        before = model(x).logits
    model.resize_token_embeddings(70, pad_to_multiple_of=8)
    assert model.config.vocab_size == 72
    assert model.get_input_embeddings().weight.shape == (72, 16)
    assert model.final_layer.weight.shape == (72, 16) and model.final_layer.bias.shape == (72,)
    new = torch.tensor([[70, 71, 5, 6]])
    with torch.no_grad():
        after = model(x).logits
        assert torch.isfinite(model(new).logits).all()
    torch.testing.assert_close(after[..., :64], before, rtol=0, atol=0)
    out = model.generate(x, max_new_tokens=4, do_sample=False)
    model.save_pretrained(tmp_path)
    loaded = PldrForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.vocab_size == 72
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, after, rtol=0, atol=0)
    assert torch.equal(loaded.generate(x, max_new_tokens=4, do_sample=False), out)


# ----------------------------------------------------------------------------------------------------------------------
# return_dict=False
# ----------------------------------------------------------------------------------------------------------------------
def test_loss_and_logits_unpack_from_a_tuple():
    model = make(1)
    x = tokens(1, 9, batch=2)
    with torch.no_grad():
        ref = model(x, labels=x, use_cache=False)
        loss, logits = model(x, labels=x, use_cache=False, return_dict=False)
        loss_c, logits_c, cache = model(x, labels=x, return_dict=False)  # use_cache defaults to True
    assert isinstance(loss, torch.Tensor) and loss.dim() == 0
    torch.testing.assert_close(loss, ref.loss, rtol=0, atol=0)
    torch.testing.assert_close(logits, ref.logits, rtol=0, atol=0)
    torch.testing.assert_close(logits_c, ref.logits, rtol=0, atol=0)
    assert type(cache).__name__ == "PldrDynamicCache" and cache.get_seq_length() == 9


def test_config_return_dict_false_gives_tuples_for_every_head():
    x = tokens(2, 7, batch=2)
    cases = [
        (PldrModel, {}, ("last_hidden_state",)),
        (PldrForCausalLM, {"labels": x}, ("loss", "logits")),
        (PldrForSequenceClassification, {"labels": torch.tensor([0, 1])}, ("loss", "logits")),
        (PldrForTokenClassification, {"labels": torch.zeros_like(x)}, ("loss", "logits")),
        (PldrForQuestionAnswering, {"start_positions": torch.tensor([1, 2]), "end_positions": torch.tensor([3, 4])},
         ("loss", "start_logits", "end_logits")),
    ]
    for cls, extra, names in cases:
        model = make(2, cls=cls, num_labels=2)
        with torch.no_grad():
            ref = model(x, use_cache=False, **extra)
            by_arg = model(x, use_cache=False, return_dict=False, **extra)
            model.config.return_dict = False
            by_config = model(x, use_cache=False, **extra)
            as_dict = model(x, use_cache=False, return_dict=True, **extra)  # the argument wins over the config
        for out in (by_arg, by_config):
            assert type(out) is tuple, cls.__name__
            assert len(out) == len(names), cls.__name__
            for got, name in zip(out, names):
                torch.testing.assert_close(got, ref[name], rtol=0, atol=0)
        assert not isinstance(as_dict, tuple)


# ----------------------------------------------------------------------------------------------------------------------
# inputs_embeds
# ----------------------------------------------------------------------------------------------------------------------
def test_inputs_embeds_forward_equals_input_ids():
    model = make(3)
    x = tokens(3, 10, batch=2)
    mask = torch.ones_like(x)
    mask[1, :3] = 0
    with torch.no_grad():
        by_ids = model(x, attention_mask=mask).logits
        by_embeds = model(inputs_embeds=model.get_input_embeddings()(x), attention_mask=mask).logits
    torch.testing.assert_close(by_embeds, by_ids, rtol=0, atol=0)


@pytest.mark.parametrize("cache_implementation", [None, "static"])
def test_generate_from_inputs_embeds_equals_input_ids(cache_implementation):
    model = make(4)
    ids, mask = left_pad([tokens(40, 6), tokens(41, 9)])
    kw = dict(attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False,
              cache_implementation=cache_implementation)
    with torch.no_grad():
        by_ids = model.generate(ids, **kw)
        by_embeds = model.generate(inputs_embeds=model.get_input_embeddings()(ids), **kw)
    assert by_embeds.shape == (2, 6)  # like Llama: only the new tokens
    assert torch.equal(by_embeds, by_ids[:, ids.shape[1]:])


@pytest.mark.parametrize("cache_implementation", [None, "static"])
def test_generate_continues_from_inputs_embeds_and_its_cache(cache_implementation):
    model = make(5)
    p = tokens(42, 7, batch=1)
    embed = model.get_input_embeddings()
    kw = dict(do_sample=False, cache_implementation=cache_implementation)
    with torch.no_grad():
        full = model.generate(p, max_new_tokens=8, min_new_tokens=8, **kw)
        first = model.generate(inputs_embeds=embed(p), max_new_tokens=3, min_new_tokens=3,
                               return_dict_in_generate=True, **kw)
        more = torch.cat([embed(p), embed(first.sequences)], dim=1)
        rest = model.generate(inputs_embeds=more, **{CACHE_FIELD: getattr(first, CACHE_FIELD)}, max_new_tokens=5,
                              min_new_tokens=5, do_sample=False)
    assert torch.equal(first.sequences, full[:, 7:10])
    assert torch.equal(rest, full[:, 10:])


# ----------------------------------------------------------------------------------------------------------------------
# set_attn_implementation
# ----------------------------------------------------------------------------------------------------------------------
def test_set_attn_implementation_switches_the_kernel_at_run_time(monkeypatch):
    model = make(6)
    x = tokens(6, 9, batch=2)
    mask = torch.ones_like(x)
    mask[0, :2] = 0
    calls = []
    sdpa = AttentionInterface._global_mapping["sdpa"]
    eager = modeling_pldr.eager_attention_forward

    def spy(name, fn):
        def wrapped(*args, **kwargs):
            calls.append(name)
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setitem(AttentionInterface._global_mapping, "sdpa", spy("sdpa", sdpa))
    monkeypatch.setattr(modeling_pldr, "eager_attention_forward", spy("eager", eager))
    with torch.no_grad():
        model.set_attn_implementation("eager")
        assert model.config._attn_implementation == "eager"
        out_eager = model(x, attention_mask=mask, output_attentions=True)
        assert calls == ["eager"] * 2
        model.set_attn_implementation("sdpa")
        assert model.config._attn_implementation == "sdpa"
        out_sdpa = model(x, attention_mask=mask, output_attentions=True)
    assert calls == ["eager"] * 2 + ["sdpa"] * 2
    assert all(w is not None and w.shape == (2, 2, 9, 9) for w in out_eager.attentions)
    torch.testing.assert_close(out_eager.attentions[0].sum(-1)[mask.bool()[:, None].expand(-1, 2, -1)],
                               torch.ones(2 * 16), **TOL)  # rows of real tokens are distributions
    assert all(w is None for w in out_sdpa.attentions)  # fused kernels do not materialise them
    real = mask.bool()
    torch.testing.assert_close(out_sdpa.logits[real], out_eager.logits[real], **TOL)


def test_set_attn_implementation_flash_needs_the_package():
    model = make(6)
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError):
            model.set_attn_implementation("flash_attention_2")
        assert model.config._attn_implementation == "sdpa"
    else:
        model.set_attn_implementation("flash_attention_2")
        assert model.config._attn_implementation == "flash_attention_2"


def test_flex_attention_equals_sdpa_in_forward_and_generate():
    # attn_implementation="flex_attention", as an in-tree model takes it: a forward (torch's compiled flex kernel),
    # padded and packed rows (A still excludes padding and keeps sequences apart: the 2D mask and the position ids are
    # read before the BlockMask is made), and greedy generation with a dynamic and a static cache, whose decoding steps
    # get generate()'s BlockMask. (Flex attention on CPU has no backward in torch; the CUDA test trains with it.)
    from torch.nn.attention.flex_attention import create_block_mask

    sdpa = make(12)
    flex = make(12)
    flex.set_attn_implementation("flex_attention")
    assert flex.config._attn_implementation == "flex_attention"
    x = tokens(12, 9, batch=2)
    mask = torch.ones_like(x)
    mask[1, :3] = 0
    real = mask.bool()
    with torch.no_grad():
        torch.testing.assert_close(flex(x).logits, sdpa(x).logits, **TOL)
        out = flex(x, attention_mask=mask, output_attentions=True)
    torch.testing.assert_close(out.logits[real], sdpa(x, attention_mask=mask).logits[real], **TOL)
    assert out.attentions == (None,) * TINY["num_hidden_layers"]  # (not flex's log-sum-exp)
    packed = torch.cat([x[0], x[1, 3:]])[None]
    positions = torch.cat([torch.arange(9), torch.arange(6)])[None]
    with torch.no_grad():
        got = flex(packed, position_ids=positions).logits[0]
        torch.testing.assert_close(got[9:], sdpa(x[1:, 3:]).logits[0], **TOL)
    with torch.compiler.set_stance("force_eager"):  # (torch's CPU kernel for a one-token query fails to compile)
        for cache_implementation in ("dynamic", "static"):
            kw = dict(attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                      cache_implementation=cache_implementation)
            with torch.no_grad():
                assert torch.equal(flex.generate(x, **kw), sdpa.generate(x, **kw)), cache_implementation
        # A BlockMask of one's own: refused where A is computed (its padding and sequences are code, not data), used
        # for a step after the prompt, whose A the cache holds.
        causal = create_block_mask(lambda b, h, q, k: q >= k, None, None, 9, 9, device="cpu")
        with pytest.raises(ValueError, match="BlockMask.*metric tensor A"):
            flex(x, attention_mask=causal)
        with torch.no_grad():
            cache = flex(x[:, :8], use_cache=True)[modeling_pldr.CACHE_FIELD]
            last = create_block_mask(lambda b, h, q, k: k <= 8, None, None, 1, 9, device="cpu")
            step = flex(x[:, 8:], attention_mask=last, **{modeling_pldr.CACHE_FIELD: cache}).logits
            cache = sdpa(x[:, :8], use_cache=True)[modeling_pldr.CACHE_FIELD]
            want = sdpa(x[:, 8:], **{modeling_pldr.CACHE_FIELD: cache}).logits
        torch.testing.assert_close(step, want, **TOL)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flex attention's backward and decoding kernels need a GPU")
def test_cuda_flex_attention_trains_and_generates_as_sdpa():
    # On a GPU: torch's compiled flex kernels, forward and backward, in a padded training step (gradients as SDPA's),
    # attention weights not confused with flex's log-sum-exp, and greedy decoding with its BlockMasks (static cache).
    sdpa = make(13, head_dim=16, hidden_size=32).cuda().train()
    flex = copy.deepcopy(sdpa)
    flex.set_attn_implementation("flex_attention")
    x = tokens(13, 32, batch=2).cuda()
    mask = torch.ones_like(x)
    mask[1, :5] = 0
    labels = x.masked_fill(mask == 0, -100)
    losses = [m(x, attention_mask=mask, labels=labels).loss for m in (sdpa, flex)]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[1], losses[0], rtol=0, atol=1e-4)
    for (name, a), b in zip(sdpa.named_parameters(), flex.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-3, atol=1e-4, msg=name)
    for m in (sdpa, flex):
        m.eval()
    with torch.no_grad():
        assert flex(x, attention_mask=mask, output_attentions=True).attentions == (None,) * TINY["num_hidden_layers"]
        kw = dict(attention_mask=mask, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                  cache_implementation="static")
        assert torch.equal(flex.generate(x, **kw), sdpa.generate(x, **kw))


def test_output_attentions_warns_where_the_kernel_has_no_weights_and_eager_gives_them():
    # As transformers' SDPA and flash attention functions do for an in-tree model: attentions asked for from a kernel
    # that never materialises them is said, not silently None; eager gives the causal softmax weights
    from transformers.testing_utils import CaptureLogger

    model = make(3, attn="sdpa")
    x = tokens(3, 7, batch=2)
    model_logger = modeling_pldr.logger
    type(model_logger).warning_once.cache_clear()  # (warning_once warns once per process and message)
    with CaptureLogger(model_logger) as captured, torch.no_grad():
        out = model(x, output_attentions=True)
    assert "attn_implementation 'sdpa'" in captured.out and 'set_attn_implementation("eager")' in captured.out
    assert out.attentions == (None,) * TINY["num_hidden_layers"]
    model.set_attn_implementation("eager")
    with CaptureLogger(model_logger) as captured, torch.no_grad():
        eager = model(x, output_attentions=True)
    assert captured.out == ""
    torch.testing.assert_close(eager.logits, out.logits, **TOL)
    for weights in eager.attentions:
        assert weights.shape == (2, TINY["num_attention_heads"], 7, 7)
        torch.testing.assert_close(weights.sum(-1), torch.ones(2, TINY["num_attention_heads"], 7))
        assert torch.equal(weights.triu(1), torch.zeros_like(weights))  # (causal)


def test_torch_export_of_a_forward_without_a_cache():
    # torch.export of a forward without a cache gives the model's logits (with a cache export is not supported: the
    # exported program would not keep the deductive cache between calls; see the README)
    model = make(4)
    x = tokens(4, 9, batch=2)

    class Logits(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, ids):
            return self.inner(input_ids=ids, use_cache=False).logits

    exported = torch.export.export(Logits(model), (x,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), model(x, use_cache=False).logits, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------------------------
# Compiled static-cache decoding: no recompiles
# ----------------------------------------------------------------------------------------------------------------------
def test_compiled_static_cache_steps_never_recompile():
    model = make(7)
    ids, mask = left_pad([tokens(70, 5), tokens(71, 8)])
    steps = 20
    cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + steps + 1)
    eager_cache = DynamicCache()
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    compiled = torch.compile(model.forward, fullgraph=True, backend="eager")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with torch.no_grad():
        # Prefill, uncompiled, as generate() does; then every step through prepare_inputs_for_generation.
        inputs = model.prepare_inputs_for_generation(ids, **{CACHE_FIELD: cache}, attention_mask=mask,
                                                     position_ids=position_ids, use_cache=True,
                                                     is_first_iteration=True)
        assert inputs["attention_mask"].dim() == 2  # the forward computing A gets the 2D mask (padding)
        out = model(**inputs)
        ref = model(ids, attention_mask=mask, position_ids=position_ids, past_key_values=eager_cache)
        torch.testing.assert_close(out.logits, ref.logits, **TOL)
        nxt = ref.logits[:, -1:].argmax(-1)
        with torch._dynamo.config.patch(error_on_recompile=True):
            for step in range(steps):
                ids = torch.cat([ids, nxt], 1)
                mask = torch.cat([mask, torch.ones_like(nxt)], 1)
                position_ids = torch.cat([position_ids, position_ids[:, -1:] + 1], 1)
                inputs = model.prepare_inputs_for_generation(ids, **{CACHE_FIELD: cache}, attention_mask=mask,
                                                             position_ids=position_ids, use_cache=True,
                                                             next_sequence_length=1)
                assert inputs["attention_mask"].dim() == 4
                got = compiled(**inputs).logits
                want = model(nxt, attention_mask=mask, position_ids=position_ids[:, -1:],
                             past_key_values=eager_cache).logits
                torch.testing.assert_close(got, want, **TOL)
                nxt = want[:, -1:].argmax(-1)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_generate_compiled_static_cache_compiles_once():
    model = make(8)
    ids, mask = left_pad([tokens(80, 4), tokens(81, 7)])
    cfg = CompileConfig(fullgraph=True, backend="eager")
    cfg._compile_all_devices = True  # generate compiles on accelerators only unless told otherwise
    kw = dict(attention_mask=mask, max_new_tokens=20, min_new_tokens=20, do_sample=False)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        out = model.generate(ids, cache_implementation="static", compile_config=cfg, **kw)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    with torch.no_grad():
        assert torch.equal(out, model.generate(ids, **kw))


# ----------------------------------------------------------------------------------------------------------------------
# Several new tokens per step with a static cache (the assisted / speculative decoding pattern)
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cache_factory", ["static", "dynamic"])
def test_multi_token_steps_equal_single_token_steps(cache_factory):
    model = make(9)
    prompt, mask = left_pad([tokens(90, 4), tokens(91, 7)])
    new = tokens(92, 9, batch=2)
    positions = lambda m: (m.cumsum(-1) - 1).clamp(min=0)

    def run(step):
        cache = StaticCache(config=model.config, max_cache_len=20) if cache_factory == "static" else DynamicCache()
        ids, m = prompt, mask
        with torch.no_grad():
            out = model(**model.prepare_inputs_for_generation(ids, **{CACHE_FIELD: cache}, attention_mask=m,
                                                              position_ids=positions(m), use_cache=True))
            logits = [out.logits[:, -1:]]
            for i in range(0, new.shape[1], step):
                chunk = new[:, i: i + step]
                ids = torch.cat([ids, chunk], 1)
                m = torch.cat([m, torch.ones_like(chunk)], 1)
                inputs = model.prepare_inputs_for_generation(ids, **{CACHE_FIELD: cache}, attention_mask=m,
                                                             position_ids=positions(m), use_cache=True,
                                                             next_sequence_length=chunk.shape[1])
                logits.append(model(**inputs).logits)
        return torch.cat(logits, 1)

    single = run(1)
    torch.testing.assert_close(run(3), single, **TOL)
    torch.testing.assert_close(run(4), single, **TOL)  # 4 + 4 + 1 tokens
    # The same with a dynamic cache and plain 2D masks.
    cache = DynamicCache()
    with torch.no_grad():
        first = model(prompt, attention_mask=mask, position_ids=positions(mask), past_key_values=cache)
        m = torch.cat([mask, torch.ones_like(new)], 1)
        rest = model(new, attention_mask=m, position_ids=positions(m)[:, -new.shape[1]:], past_key_values=cache)
    torch.testing.assert_close(torch.cat([first.logits[:, -1:], rest.logits], 1), single, **TOL)


def test_generate_continues_a_left_padded_batch_with_several_new_tokens_per_cache_type():
    model = make(9)
    ids, mask = left_pad([tokens(93, 4), tokens(94, 7)])
    extra = tokens(95, 3, batch=2)  # user tokens appended before continuing: a 4-token step with the cache
    results = []
    for cache in (StaticCache(config=model.config, max_cache_len=40), DynamicCache()):
        with torch.no_grad():
            first = model.generate(ids, attention_mask=mask, **{CACHE_FIELD: cache}, max_new_tokens=4,
                                   min_new_tokens=4, do_sample=False, return_dict_in_generate=True)
            seq = torch.cat([first.sequences, extra], 1)
            m = torch.cat([mask, torch.ones(2, 7, dtype=torch.long)], 1)
            out = model.generate(seq, attention_mask=m, **{CACHE_FIELD: cache}, max_new_tokens=5, min_new_tokens=5,
                                 do_sample=False, output_logits=True, return_dict_in_generate=True)
        results.append(out)
    assert torch.equal(results[0].sequences, results[1].sequences)
    torch.testing.assert_close(torch.stack(results[0].logits), torch.stack(results[1].logits), **TOL)


# ----------------------------------------------------------------------------------------------------------------------
# Packed / padding-free sequences
# ----------------------------------------------------------------------------------------------------------------------
SEQ_LENS = [5, 9, 3, 70, 1]  # 70 > packing.CHUNK: a sequence spans two chunks


def _sequences():
    return [tokens(100 + i, n) for i, n in enumerate(SEQ_LENS)]


def _padded_reference(model, seqs, **kw):
    ids, mask = right_pad(seqs)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, use_cache=False, output_pldr_attentions=True, **kw)
    logits = [out.logits[i, : len(s)] for i, s in enumerate(seqs)]
    A = [torch.stack([d.A[i] for d in out.pldr_attentions]) for i in range(len(seqs))]
    return logits, A


@pytest.mark.parametrize("attn", ["eager", "sdpa", "flex_attention"])
@pytest.mark.parametrize("use_cache", [False, True])
def test_packed_position_ids_equal_the_padded_batch(attn, use_cache):
    # (flex attention run eagerly: its compiled CPU kernel costs some ten seconds a shape; the flex test compiles it)
    with _flex_eagerly(attn):
        _packed_position_ids(attn, use_cache)


def _packed_position_ids(attn, use_cache):
    model = make(10, attn=attn)
    seqs = _sequences()
    ref_logits, ref_A = _padded_reference(model, seqs)
    packed = torch.cat(seqs)[None]
    position_ids = torch.cat([torch.arange(len(s)) for s in seqs])[None]
    with torch.no_grad():
        out = model(packed, position_ids=position_ids, use_cache=use_cache, output_pldr_attentions=True)
    for i, got in enumerate(out.logits[0].split(SEQ_LENS)):
        torch.testing.assert_close(got, ref_logits[i], **TOL)
        got_A = torch.stack([d.A[i] for d in out.pldr_attentions])  # one A per sequence, in packing order
        torch.testing.assert_close(got_A, ref_A[i], **TOL)
    # Without the restarts the sequences leak into each other (what this guards against).
    with torch.no_grad():
        mixed = model(packed, use_cache=False).logits[0].split(SEQ_LENS)
    assert (mixed[1] - ref_logits[1]).abs().max() > 1e-2


def test_packed_rows_with_padding_and_several_rows():
    model = make(11)
    seqs = _sequences()
    rows = [[seqs[0], seqs[1]], [seqs[2], seqs[3][:20]], [seqs[4]]]
    ids = torch.zeros(3, 30, dtype=torch.long)
    mask = torch.zeros_like(ids)
    position_ids = torch.zeros_like(ids)
    for r, parts in enumerate(rows):
        at = 0
        for s in parts:
            ids[r, at: at + len(s)] = s
            position_ids[r, at: at + len(s)] = torch.arange(len(s))
            at += len(s)
        mask[r, :at] = 1
    with torch.no_grad():
        out = model(ids, attention_mask=mask, position_ids=position_ids).logits
        for r, parts in enumerate(rows):
            at = 0
            for s in parts:
                alone = model(s[None]).logits[0]
                torch.testing.assert_close(out[r, at: at + len(s)], alone, **TOL)
                at += len(s)


def test_data_collator_with_flattening_equals_the_padded_batch():
    model = make(12)
    seqs = _sequences()
    features = [{"input_ids": s.tolist()} for s in seqs]
    ids, mask = right_pad(seqs)
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        padded = model(ids, attention_mask=mask, labels=labels, use_cache=False)
        for flash_kwargs in (False, True):  # (True: also seq_idx, as TRL's padding-free collator passes them all)
            batch = DataCollatorWithFlattening(return_flash_attn_kwargs=flash_kwargs, return_seq_idx=flash_kwargs)(features)
            assert ("cu_seq_lens_q" in batch) == flash_kwargs and "attention_mask" not in batch
            out = model(**batch, use_cache=False)
            torch.testing.assert_close(out.loss, padded.loss, **TOL)
            for i, got in enumerate(out.logits[0].split(SEQ_LENS)):
                torch.testing.assert_close(got, padded.logits[i, : SEQ_LENS[i]], **TOL)
        # cu_seq_lens alone (no position ids): positions restart at each sequence too.
        batch = DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_position_ids=False)(features)
        out = model(**batch, use_cache=False)
        torch.testing.assert_close(out.loss, padded.loss, **TOL)


def test_packed_training_step_has_the_padded_gradients():
    seqs = _sequences()[:3]
    model = make(13).train()
    ids, mask = right_pad(seqs)
    labels = ids.masked_fill(mask == 0, -100)
    model(ids, attention_mask=mask, labels=labels).loss.backward()
    padded = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    batch = DataCollatorWithFlattening()([{"input_ids": s.tolist()} for s in seqs])
    out = model(**batch, output_pldr_attentions=True)
    assert all(d.A.shape[0] == 3 and d.G_LM.shape[0] == 3 for d in out.pldr_attentions)  # one per sequence
    out.loss.backward()
    assert padded.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
    for n, g in padded.items():
        torch.testing.assert_close(dict(model.named_parameters())[n].grad, g, rtol=1e-4, atol=1e-5, msg=n)


def test_fixed_G_model_keeps_packed_sequences_apart():
    model = make(14, custom_G_type="identity")
    seqs = _sequences()[:3]
    packed = torch.cat(seqs)[None]
    position_ids = torch.cat([torch.arange(len(s)) for s in seqs])[None]
    with torch.no_grad():
        out = model(packed, position_ids=position_ids).logits[0].split([len(s) for s in seqs])
        for s, got in zip(seqs, out):
            torch.testing.assert_close(got, model(s[None]).logits[0], **TOL)


def _shared_prefix_mask(p, continuations, dtype=torch.bool):
    n = p + sum(continuations)
    allowed = torch.zeros(n, n, dtype=torch.bool)
    allowed[:p, :p] = torch.ones(p, p, dtype=torch.bool).tril()
    at = p
    for c in continuations:
        allowed[at: at + c, :p] = True
        allowed[at: at + c, at: at + c] = torch.ones(c, c, dtype=torch.bool).tril()
        at += c
    if dtype != torch.bool:
        return torch.zeros(n, n, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)[None, None]
    return allowed[None, None]


@pytest.mark.parametrize("attn", ["eager", "sdpa", "flex_attention"])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32])
def test_shared_prefix_4d_mask_gives_each_continuation_its_own_A(attn, mask_dtype):
    # (flex attention: transformers adds a 4D tensor mask to the scores, so the model gives it a boolean one as 0 / the
    # minimum. Run eagerly: torch 2.13's compiled CPU flex kernel with a tensor mask crashes the process, a Llama's too.)
    with _flex_eagerly(attn):
        _shared_prefix_4d_mask(attn, mask_dtype)


def _shared_prefix_4d_mask(attn, mask_dtype):
    prefix, conts = tokens(140, 6), [tokens(141, 5), tokens(142, 3)]
    ids = torch.cat([prefix, *conts])[None]
    mask = _shared_prefix_mask(6, [5, 3], mask_dtype)
    position_ids = torch.cat([torch.arange(6), torch.arange(6, 11), torch.arange(6, 9)])[None]
    # One layer: a continuation token's A, G and logits are those of prefix + that continuation run as its own row.
    model = make(15, attn=attn, num_hidden_layers=1)
    with torch.no_grad():
        shared = model(ids, attention_mask=mask, position_ids=position_ids).logits[0]
        at = 6
        for c in conts:
            alone = model(torch.cat([prefix, c])[None]).logits[0, 6:]
            torch.testing.assert_close(shared[at: at + len(c)], alone, **TOL)
            at += len(c)
    # Deeper models: the first layer's A of each continuation is its own row's (deeper layers read keys and values of
    # prefix tokens, whose own A sums every continuation: a shared prefix cannot carry one state per continuation).
    model = make(15, attn=attn)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, position_ids=position_ids, output_pldr_attentions=True, use_cache=False)
        groups, _ = packing.groups_from_mask(mask, 1)
        at = 6
        for c in conts:
            alone = model(torch.cat([prefix, c])[None], output_pldr_attentions=True)
            group = groups.token_group[0, at]
            torch.testing.assert_close(out.pldr_attentions[0].A[group], alone.pldr_attentions[0].A[0], **TOL)
            at += len(c)
        # One continuation: the 4D mask is a plain causal mask and every layer matches the plain row.
        single = model(ids[:, :11], attention_mask=_shared_prefix_mask(6, [5], mask_dtype)).logits
        torch.testing.assert_close(single, model(ids[:, :11]).logits, **TOL)


def test_padded_4d_mask_excludes_padding_from_A():
    model = make(16, attn="eager")
    x, mask = left_pad([tokens(160, 5), tokens(161, 8)])
    causal = torch.ones(8, 8, dtype=torch.bool).tril()
    mask4d = causal[None, None] & mask.bool()[:, None, None, :]
    mask4d |= torch.eye(8, dtype=torch.bool)[None, None] & ~mask.bool()[:, None, :, None]  # padding rows see themselves
    with torch.no_grad():
        two_d = model(x, attention_mask=mask).logits
        four_d = model(x, attention_mask=mask4d).logits
    torch.testing.assert_close(four_d[mask.bool()], two_d[mask.bool()], **TOL)


def test_unpacked_inputs_take_the_plain_path(monkeypatch):
    model = make(17)
    x = tokens(170, 12, batch=2)
    mask = torch.ones_like(x)
    mask[0, :4] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # generate's position ids: 0 on the left padding
    with torch.no_grad():
        plain = model(x, attention_mask=mask).logits
        read = model(x, attention_mask=mask, position_ids=positions).logits  # read once: no restart found
        not_read = model(x, attention_mask=mask, position_ids=positions, past_key_values=DynamicCache()).logits
    assert torch.equal(read, not_read)
    assert torch.equal(read[1], plain[1])  # row 1 has no padding: the same positions

    def refuse(*args, **kwargs):
        raise AssertionError("looked for packed sequences")

    # Without position ids, or with a cache passed (as generate does), nothing looks for sequences.
    monkeypatch.setattr(modeling_pldr, "groups_from_position_ids", refuse)
    monkeypatch.setattr(modeling_pldr, "groups_from_mask", refuse)
    monkeypatch.setattr(modeling_pldr, "groups_from_cu_seq_lens", refuse)
    with torch.no_grad():
        again = model(x, attention_mask=mask).logits
        cached = model(x, attention_mask=mask, past_key_values=DynamicCache()).logits
        generated = model.generate(x, attention_mask=mask, max_new_tokens=3, do_sample=False)
        static = model.generate(x, attention_mask=mask, max_new_tokens=3, do_sample=False,
                                cache_implementation="static")
    assert torch.equal(again, plain) and torch.equal(cached, plain)
    assert torch.equal(generated, static) and generated.shape == (2, 15)


def test_packing_layout_is_proportional_to_tokens():
    seg = torch.tensor([[0] * 3 + [1] * 130 + [2] * 1])
    groups = packing.groups_from_position_ids(torch.cat([torch.arange(3), torch.arange(130), torch.arange(1)])[None],
                                              None, 1)
    assert groups.num_groups == 3 and torch.equal(groups.token_group, seg)
    # 3 + 130 + 1 tokens: ceil(3/64) + ceil(130/64) + ceil(1/64) = 5 chunks, not 3 x 130 slots.
    assert groups.members.num_chunks == 5 and groups.queries is groups.members
    assert groups.members.chunk_group.tolist() == [0, 1, 1, 1, 2]
    assert packing.groups_from_position_ids(torch.arange(10)[None], None, 1) is None


# ----------------------------------------------------------------------------------------------------------------------
# cache_first_G
# ----------------------------------------------------------------------------------------------------------------------
def test_cache_first_G_prefill_uses_each_rows_own_G_then_the_first_rows():
    first_g = make(18, cache_first_G=True)
    plain = make(18)
    prompts = torch.stack([tokens(180, 6), tokens(181, 6)])
    nxt = tokens(182, 2).view(2, 1)
    with torch.no_grad():
        cache = DynamicCache()
        prefill = first_g(prompts, past_key_values=cache).logits
        step = first_g(nxt, past_key_values=cache).logits
        # The port: the prefill uses each row's own G...
        for r in range(2):
            torch.testing.assert_close(prefill[r], plain(prompts[r: r + 1]).logits[0], **TOL)
        # ...and the first row's A, A_LM, G_LM serve every row from the next step on.
        own = [DynamicCache(), DynamicCache()]
        for r in range(2):
            plain(prompts[r: r + 1], past_key_values=own[r])
        for i in range(plain.config.num_hidden_layers):
            assert all(t.shape[0] == 1 for t in cache.get_deductive(i))
            for got, want in zip(cache.get_deductive(i), own[0].get_deductive(i)):
                torch.testing.assert_close(got, want, **TOL)
            own[1].set_deductive(i, *own[0].get_deductive(i))  # row 1 decodes with row 0's tensors
        for r in range(2):
            torch.testing.assert_close(step[r], plain(nxt[r: r + 1], past_key_values=own[r]).logits[0], **TOL)


def test_cache_first_G_generate_chunked_prefill_and_fill_deductive_cache():
    first_g = make(19, cache_first_G=True)
    plain = make(19)
    prompts = torch.stack([tokens(190, 8), tokens(191, 8)])
    kw = dict(attention_mask=torch.ones_like(prompts), max_new_tokens=6, min_new_tokens=6, do_sample=False,
              output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        out = first_g.generate(prompts, **kw)
        chunked = first_g.generate(prompts, prefill_chunk_size=3, **kw)
        alone = plain.generate(prompts[1:], **{**kw, "attention_mask": torch.ones_like(prompts[1:])})
        cache = first_g.fill_deductive_cache(prompts, DynamicCache())
    assert torch.equal(chunked.sequences, out.sequences)
    torch.testing.assert_close(torch.stack(chunked.logits), torch.stack(out.logits), **TOL)
    # Row 1's first new token comes from its own prefill; later ones from row 0's G.
    torch.testing.assert_close(out.logits[0][1], alone.logits[0][0], **TOL)
    assert out.past_key_values.get_deductive(0)[2].shape[0] == 1
    assert cache.get_deductive(0)[0].shape[0] == 2  # per row until the prompt has run
    cache.share_first_row()
    assert all(t.shape[0] == 1 for t in cache.get_deductive(0))


# ----------------------------------------------------------------------------------------------------------------------
# Half precision
# ----------------------------------------------------------------------------------------------------------------------
def test_float16_metric_sum_beyond_float16_range_stays_finite():
    model = make(20)
    with torch.no_grad():
        for layer in model.decoder.dec_layers:
            layer.mha1.wq.weight.mul_(20)  # |q|^2 summed over 120 positions exceeds 65504
        x = tokens(200, 120, batch=1)
        half = copy.deepcopy(model).half()
        out = half(x, use_cache=False).logits
    assert torch.isfinite(out).all()
    assert half.decoder.dec_layers[0].mha1.layernorm1.weight.dtype == torch.float16
