"""generate() with PLDR-LLM's KV-cache + G-cache: every strategy, padding, G files, static cache and compile.

Tiny random models on CPU; every test compares tokens or logits against an independent way of getting them.
"""

import inspect

import pytest
import torch
import torch.nn.functional as F
from transformers import CompileConfig, DynamicCache, StaticCache

import pldr_hf  # noqa: F401  (registers the model)
from pldr_hf import PldrConfig, PldrDynamicCache, PldrForCausalLM
from pldr_hf.modeling.modeling_pldr import CACHE_FIELD, PldrDecoderLayer, PldrGLU
from pldr_hf.gfile import (
    GTensors,
    apply_g_to_model,
    cache_with_g,
    extract_g,
    g_from_cache,
    generate_with_g,
    load_g_file,
    save_g_file,
)

TINY = dict(vocab_size=64, hidden_size=16, num_attention_heads=2, head_dim=8, num_hidden_layers=2,
            intermediate_size=42, A_dff=12, num_reslayerA=2, num_denseA=2, max_position_embeddings=128,
            pad_token_id=0, bos_token_id=None, eos_token_id=None)
N = 10  # new tokens per generation


def make_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return PldrForCausalLM(PldrConfig(**{**TINY, **overrides})).eval()


@pytest.fixture(scope="module")
def model():
    return make_model(0)


def prompt(seed, length):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, 64, (1, length), generator=g)


def gen(model, ids, **kw):
    kw.setdefault("do_sample", False)
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=N, min_new_tokens=N, **kw)


def left_pad(prompts):
    width = max(p.shape[1] for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - p.shape[1]:] = p[0]
        mask[i, width - p.shape[1]:] = 1
    return ids, mask


# ----------------------------------------------------------------------------------------------------------------------
# Strategies
# ----------------------------------------------------------------------------------------------------------------------
def test_greedy_cached_matches_step_by_step_forward(model):
    p = prompt(1, 7)
    out = gen(model, p)
    # Independent loop: prefill the prompt, then feed one token at a time through forward with the same cache.
    cache, ids, toks = None, p, []
    with torch.no_grad():
        for _ in range(N):
            o = model(ids, past_key_values=cache, use_cache=True)
            cache = o.past_key_values
            ids = o.logits[:, -1:].argmax(-1)
            toks.append(ids)
    assert torch.equal(out[:, 7:], torch.cat(toks, 1))
    assert torch.equal(gen(model, p, use_g_cache=False), out)  # G-cache changes speed, not tokens


def test_no_cache_recomputes_A(model):
    p = prompt(1, 7)
    out = gen(model, p, use_cache=False)
    ids = p
    with torch.no_grad():
        for _ in range(N):
            ids = torch.cat([ids, model(ids, use_cache=False).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(out, ids)


def test_sampling_seeded_and_top_k_1_is_greedy(model):
    p = prompt(2, 6)
    kw = dict(do_sample=True, temperature=0.7, top_k=20, top_p=0.9)
    torch.manual_seed(5)
    a = gen(model, p, **kw)
    torch.manual_seed(5)
    b = gen(model, p, **kw)
    torch.manual_seed(6)
    c = gen(model, p, do_sample=True, temperature=1.5)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    torch.manual_seed(7)
    assert torch.equal(gen(model, p, do_sample=True, top_k=1), gen(model, p))


def test_beam_search_same_with_and_without_g_cache(model):
    p = prompt(3, 6)
    kw = dict(num_beams=4, num_return_sequences=4, return_dict_in_generate=True, output_scores=True)
    with_g = gen(model, p, **kw)
    without_g = gen(model, p, use_g_cache=False, **kw)
    assert torch.equal(with_g.sequences, without_g.sequences)
    torch.testing.assert_close(with_g.sequences_scores, without_g.sequences_scores)
    assert with_g.sequences.shape == (4, 6 + N)


def test_beam_search_batch_with_padding_equals_each_prompt_alone(model):
    prompts = [prompt(4, 5), prompt(5, 8)]
    ids, mask = left_pad(prompts)
    with torch.no_grad():
        batch = model.generate(ids, attention_mask=mask, num_beams=3, max_new_tokens=N, min_new_tokens=N,
                               do_sample=False)
    for i, p in enumerate(prompts):
        alone = gen(model, p, num_beams=3)
        assert torch.equal(batch[i, ids.shape[1]:], alone[0, p.shape[1]:])


def test_cache_batch_operations_move_deductive_tensors():
    cache = PldrDynamicCache()
    A = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 2, 4, 4).clone()
    shared = torch.ones(1, 2, 4, 4)
    k = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 2, 5, 4).clone()
    cache.update(k, k.clone(), 0)
    cache.set_deductive(0, A, shared, A * 2)
    cache.reorder_cache(torch.tensor([2, 2, 0]))
    a, a_lm, g = cache.get_deductive(0)
    assert a[:, 0, 0, 0].tolist() == [2, 2, 0] and g[:, 0, 0, 0].tolist() == [4, 4, 0]
    assert a_lm.shape[0] == 1  # a batch-1 (shared) tensor is left as it is
    assert cache.layers[0].keys[:, 0, 0, 0].tolist() == [2, 2, 0]
    cache.batch_repeat_interleave(2)
    assert cache.get_deductive(0)[0][:, 0, 0, 0].tolist() == [2, 2, 2, 2, 0, 0]
    cache.batch_select_indices(torch.tensor([0, 5]))
    assert cache.get_deductive(0)[0][:, 0, 0, 0].tolist() == [2, 0]
    cache.crop(-2)  # dropping tokens keeps the prompt's deductive tensors
    assert cache.get_seq_length() == 3 and cache.get_deductive(0)[0] is not None
    cache.reset()
    assert cache.get_deductive(0) == (None, None, None)


def test_assisted_decoding_equals_greedy(model):
    draft = make_model(1)  # a different tiny PLDR model proposes tokens; the main model decides
    for seed in (6, 7):
        p = prompt(seed, 7)
        greedy = gen(model, p)
        assert torch.equal(gen(model, p, assistant_model=draft), greedy)
        assert torch.equal(gen(model, p, assistant_model=model), greedy)  # every draft accepted
        assert torch.equal(gen(model, p, prompt_lookup_num_tokens=3), greedy)
        assert torch.equal(gen(model, p, assistant_model=draft, use_g_cache=False), greedy)


def test_assisted_decoding_without_cache_is_refused(model):
    with pytest.raises(ValueError, match="needs use_cache=True"):
        gen(model, prompt(6, 5), assistant_model=make_model(1), use_cache=False)


def test_continuous_batching_is_refused_with_a_clear_error(model):
    # transformers' continuous batching would run the model in a worker that logs the model's error and returns empty
    # generations; generate_batch, init_continuous_batching and generate(cache_implementation="paged") say why instead
    if not hasattr(model, "generate_batch"):
        pytest.skip("this transformers has no continuous batching")
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=3, do_sample=False, pad_token_id=0)
    for call in (lambda: model.generate_batch(inputs=[[5, 6, 7], [8, 9]], generation_config=config),
                 lambda: model.init_continuous_batching(generation_config=config),
                 lambda: gen(model, prompt(9, 4), cache_implementation="paged")):
        with pytest.raises(NotImplementedError, match="does not support continuous batching.*left-padded"):
            call()


def test_chunked_prefill_equals_greedy(model):
    p = prompt(8, 9)
    assert torch.equal(gen(model, p, prefill_chunk_size=4), gen(model, p))


def test_continue_from_returned_cache(model):
    p = prompt(9, 6)
    full = gen(model, p)
    with torch.no_grad():
        first = model.generate(p, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                               return_dict_in_generate=True)
        rest = model.generate(first.sequences, **{CACHE_FIELD: getattr(first, CACHE_FIELD)}, max_new_tokens=N - 4,
                              min_new_tokens=N - 4, do_sample=False)
    assert torch.equal(rest, full)


# ----------------------------------------------------------------------------------------------------------------------
# Batches with padding, cache_first_G
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cache_implementation", [None, "static"])
def test_left_padded_batch_equals_each_prompt_alone(model, cache_implementation):
    prompts = [prompt(10, 4), prompt(11, 9), prompt(12, 6)]
    ids, mask = left_pad(prompts)
    with torch.no_grad():
        batch = model.generate(ids, attention_mask=mask, max_new_tokens=N, min_new_tokens=N, do_sample=False,
                               cache_implementation=cache_implementation)
    for i, p in enumerate(prompts):
        assert torch.equal(batch[i, ids.shape[1]:], gen(model, p)[0, p.shape[1]:]), f"row {i}"


def test_cache_first_G_uses_first_rows_G_for_whole_batch():
    m = make_model(0, cache_first_G=True)
    plain = make_model(0)
    prompts = [prompt(13, 6), prompt(14, 6)]
    ids = torch.cat(prompts)
    with torch.no_grad():
        out = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=N, min_new_tokens=N,
                         do_sample=False, return_dict_in_generate=True)
    assert out.past_key_values.get_deductive(0)[2].shape[0] == 1  # one G for the batch
    assert torch.equal(out.sequences[0], gen(plain, prompts[0])[0])
    # Row 1 as the port computes it: its prefill with its own A/A_LM/G_LM, every later step with row 0's.
    with torch.no_grad():
        first = plain(prompts[0], use_cache=True).past_key_values
        step = plain(prompts[1], use_cache=True)
        cache = step.past_key_values
        for layer in range(plain.config.num_hidden_layers):
            cache.set_deductive(layer, *first.get_deductive(layer))
        tokens = [step.logits[:, -1].argmax(-1, keepdim=True)]
        for _ in range(N - 1):
            step = plain(tokens[-1], past_key_values=cache, use_cache=True)
            tokens.append(step.logits[:, -1].argmax(-1, keepdim=True))
    row1 = torch.cat([prompts[1]] + tokens, dim=1)
    assert torch.equal(out.sequences[1], row1[0])
    assert not torch.equal(row1, gen(plain, prompts[1]))  # prompt 1 with its own G all along goes elsewhere


# ----------------------------------------------------------------------------------------------------------------------
# G files
# ----------------------------------------------------------------------------------------------------------------------
def test_g_exported_from_generate_cache_round_trips_to_identical_logits(model, tmp_path):
    p = prompt(15, 8)
    with torch.no_grad():
        out = model.generate(p, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    g = g_from_cache(out.past_key_values)
    assert torch.equal(g_from_cache(out).G_LM, g.G_LM)  # the output itself, whatever its cache field is called
    ref = extract_g(model, p)
    torch.testing.assert_close(g.G_LM, ref.G_LM, rtol=0, atol=0)
    torch.testing.assert_close(g.A_LM, ref.A_LM, rtol=0, atol=0)
    path = save_g_file(tmp_path / "p.g.safetensors", g)
    loaded = load_g_file(path, model.config)
    other = prompt(16, 7)
    with torch.no_grad():
        own = model(p).logits
        from_file = model(p, past_key_values=cache_with_g(model, loaded)).logits
        taken = model(other, past_key_values=cache_with_g(model, g)).logits
        again = model(other, past_key_values=cache_with_g(model, loaded)).logits
    torch.testing.assert_close(from_file, own, rtol=0, atol=1e-6)
    assert torch.equal(taken, again)
    # generate_with_g accepts the path and decodes the other prompt with p's G.
    a = generate_with_g(model, path, other, max_new_tokens=N, do_sample=False)
    b = model.generate(other, **{CACHE_FIELD: cache_with_g(model, g)}, max_new_tokens=N, do_sample=False)
    assert torch.equal(a, b)


def test_g_from_cache_needs_the_g_cache(model):
    with torch.no_grad():
        out = model(prompt(1, 5), use_g_cache=False)
    with pytest.raises(ValueError, match="use_g_cache=False"):
        g_from_cache(out.past_key_values)
    with pytest.raises(ValueError, match="no PLDR-LLM deductive cache"):
        g_from_cache(object())
    with pytest.raises(ValueError, match="use_cache=True"):
        generate_with_g(model, extract_g(model, prompt(1, 5)), prompt(1, 5), use_cache=False)


def test_malformed_g_files_are_refused(model, tmp_path):
    from safetensors.torch import save_file

    g = extract_g(model, prompt(1, 6))
    three_layers = GTensors(A_LM=torch.cat([g.A_LM, g.A_LM[:1]]), G_LM=torch.cat([g.G_LM, g.G_LM[:1]]))
    with pytest.raises(ValueError, match=r"G_LM has shape \(3, 2, 8, 8\).*needs \(2, 2, 8, 8\)"):
        load_g_file(save_g_file(tmp_path / "layers.safetensors", three_layers), model.config)
    wrong_heads = GTensors(A_LM=torch.rand(2, 3, 8, 8), G_LM=torch.rand(2, 3, 8, 8))
    with pytest.raises(ValueError, match="G_LM has shape"):
        load_g_file(save_g_file(tmp_path / "heads.safetensors", wrong_heads), model.config)
    bad_a_lm = GTensors(A_LM=torch.rand(2, 2, 4, 4), G_LM=g.G_LM)
    with pytest.raises(ValueError, match="A_LM has shape"):
        load_g_file(save_g_file(tmp_path / "alm.safetensors", bad_a_lm), model.config)
    save_file({"layer0.G_LM": g.G_LM[0].contiguous(), "layer1.G_LM": g.G_LM[1].contiguous(),
               "layer0.A_LM": g.A_LM[0].contiguous()}, str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match=r"missing tensors \['layer1.A_LM'\]"):
        load_g_file(tmp_path / "missing.safetensors", model.config)
    save_file({"weights": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="expected tensors layer0.G_LM"):
        load_g_file(tmp_path / "other.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors G file"):
        load_g_file(tmp_path / "junk.safetensors")
    with pytest.raises(FileNotFoundError, match="G file not found"):
        load_g_file(tmp_path / "absent.safetensors")


def test_external_G_model_loads_g_file(model, tmp_path):
    p, other = prompt(17, 8), prompt(18, 6)
    path = save_g_file(tmp_path / "g.safetensors", extract_g(model, p))
    ext = PldrForCausalLM(PldrConfig(**{**TINY, "custom_G_type": "external"})).eval()
    missing, unexpected = ext.load_state_dict(model.state_dict(), strict=False)
    assert all(".mha1.layernorm1" in k or "reslayerAs" in k or "plgatt_layer" in k for k in unexpected)
    assert missing == ["decoder.past_G_values"]
    apply_g_to_model(ext, load_g_file(path, ext.config))
    with torch.no_grad():
        want = model(other, past_key_values=cache_with_g(model, load_g_file(path))).logits
        got = ext(other).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    ext.save_pretrained(tmp_path / "ext")  # the G travels with the model
    again = PldrForCausalLM.from_pretrained(tmp_path / "ext").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(other).logits, got, rtol=0, atol=0)
    assert torch.equal(gen(again, other), generate_with_g(model, path, other, max_new_tokens=N, min_new_tokens=N,
                                                          do_sample=False, attention_mask=torch.ones_like(other)))


# ----------------------------------------------------------------------------------------------------------------------
# Static cache and torch.compile
# ----------------------------------------------------------------------------------------------------------------------
def test_static_cache_generate_matches_dynamic(model):
    p = prompt(19, 7)
    with torch.no_grad():
        out = model.generate(p, max_new_tokens=N, min_new_tokens=N, do_sample=False, cache_implementation="static",
                             return_dict_in_generate=True)
    assert type(out.past_key_values).__name__ == "PldrStaticCache"
    assert torch.equal(out.sequences, gen(model, p))
    assert torch.equal(gen(model, p, cache_implementation="static", use_g_cache=False), gen(model, p))


@pytest.mark.parametrize("padded", [True, False])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_static_cache_decoding_masks_equal_transformers_masks(monkeypatch, attn, padded):
    # The model builds a one-token decoding step's 4D mask itself (three operations instead of transformers' host-side
    # mask functions, before every compiled step): at every step of a left-padded batch it must equal, in values, shape,
    # dtype and strides (a compiled step guards on them), what transformers' create_masks_for_generate gives, and only
    # the other cases (the prompt's forward, eager attention) may go to transformers' function. Without padding
    # transformers >= 5.25 passes no mask at all.
    import transformers.masking_utils as masking

    m = make_model(3, attn_implementation=attn)
    ids, mask = left_pad([prompt(40, 6), prompt(41, 3), prompt(42, 5)] if padded else [prompt(40, 6), prompt(43, 6)])
    reference, steps, delegated = masking.create_masks_for_generate, [], []

    def counted(*args, **kwargs):
        delegated.append(kwargs["inputs_embeds"].shape[1])
        return reference(*args, **kwargs)

    monkeypatch.setattr(masking, "create_masks_for_generate", counted)
    own = m.create_masks_for_generate

    def compared(config, inputs_embeds, attention_mask, **kwargs):
        built = own(config, inputs_embeds, attention_mask, **kwargs)
        want = reference(config, inputs_embeds, attention_mask, **kwargs)
        if want is None:  # (no mask needed: a prompt without padding)
            assert built is None
        else:
            want = want.contiguous()  # (as generate() passes it on)
            assert built.shape == want.shape and built.dtype == want.dtype and built.stride() == want.stride()
            assert torch.equal(built, want)
        steps.append(inputs_embeds.shape[1])
        return built

    monkeypatch.setattr(m, "create_masks_for_generate", compared)
    with torch.no_grad():
        out = m.generate(ids, attention_mask=mask, max_new_tokens=N, min_new_tokens=N, do_sample=False,
                         cache_implementation="static")
        # (then a shorter static cache: the positions kept from the longer one serve it)
        m.generate(ids, attention_mask=mask, max_new_tokens=N - 4, min_new_tokens=N - 4, do_sample=False,
                   cache_implementation="static")
    assert steps == [6] + [1] * (N - 1) + [6] + [1] * (N - 5)
    assert delegated == ([6, 6] if attn == "sdpa" else steps)
    assert len(m._mask_positions) == (1 if attn == "sdpa" else 0)  # (one per device, not one per cache length)
    monkeypatch.setattr(m, "create_masks_for_generate", reference)  # (generate() passes every argument by name)
    with torch.no_grad():
        assert torch.equal(out, m.generate(ids, attention_mask=mask, max_new_tokens=N, min_new_tokens=N,
                                           do_sample=False, cache_implementation="static"))


def test_decode_step_compiles_fullgraph_without_graph_breaks(model):
    import torch._dynamo as dynamo

    p = torch.cat([prompt(20, 6), prompt(21, 6)])
    cache = StaticCache(config=model.config, max_cache_len=16)
    with torch.no_grad():
        first = model(p, past_key_values=cache, use_cache=True)
    assert type(cache).__name__ == "PldrStaticCache"  # swapped in place, storage kept
    nxt = first.logits[:, -1:].argmax(-1)
    pos = torch.full((2, 1), 6)

    explained = dynamo.explain(model.forward)(input_ids=nxt, past_key_values=cache, position_ids=pos)
    assert explained.graph_break_count == 0, explained.break_reasons

    dynamo.reset()
    eager_cache = StaticCache(config=model.config, max_cache_len=16)
    compiled_cache = StaticCache(config=model.config, max_cache_len=16)
    compiled = torch.compile(model.forward, fullgraph=True, backend="eager")
    with torch.no_grad():
        for c in (eager_cache, compiled_cache):
            model(p, past_key_values=c, use_cache=True)
        tok_e = tok_c = nxt
        for step in range(3):
            pos = torch.full((2, 1), 6 + step)
            le = model(tok_e, past_key_values=eager_cache, position_ids=pos).logits
            lc = compiled(input_ids=tok_c, past_key_values=compiled_cache, position_ids=pos).logits
            torch.testing.assert_close(lc, le, rtol=0, atol=1e-6)
            tok_e, tok_c = le.argmax(-1), lc.argmax(-1)


def test_generate_autocompiles_static_decode_step(model):
    p = prompt(22, 7)
    cfg = CompileConfig(fullgraph=True, backend="eager")
    cfg._compile_all_devices = True  # generate compiles on accelerators only unless told otherwise
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with torch.no_grad():
        out = model.generate(p, attention_mask=torch.ones_like(p), max_new_tokens=N, min_new_tokens=N,
                             do_sample=False, cache_implementation="static", compile_config=cfg)
    assert torch.equal(out, gen(model, p))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1


def test_compiled_decode_step_reads_the_layers_weights_from_one_buffer(model, monkeypatch):
    # Inside generate() the decoding copies of the layers' weights (q|k|v, dense, FFN, biases, LayerNorms) are views
    # into one buffer, and a compiled decoding step slices them out of it inside its graph: one graph input instead of
    # some 12 per layer (each tensor a compiled call reads from a module costs host time at every step).
    monkeypatch.setattr(PldrGLU, "PAD_ON_CPU", True)
    monkeypatch.setattr(type(model.decoder.dec_layers[0].mha1), "JOINT_ON_CPU", True)
    monkeypatch.setattr(PldrDecoderLayer, "COPY_ON_CPU", True)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append([t for t in example_inputs if isinstance(t, torch.Tensor)])
        return gm.forward

    cfg = CompileConfig(fullgraph=True, backend=backend, mode=None)
    cfg._compile_all_devices = True
    p = prompt(23, 7)
    torch._dynamo.reset()
    with torch.no_grad():
        out = model.generate(p, attention_mask=torch.ones_like(p), max_new_tokens=N, min_new_tokens=N,
                             do_sample=False, cache_implementation="static", compile_config=cfg)
    torch._dynamo.reset()
    assert torch.equal(out, gen(model, p))
    assert len(graphs) == 1
    inputs = {t.data_ptr() for t in graphs[0]}
    (buffer,) = model.decoder._decode_pack.buffers
    storage = buffer.untyped_storage().data_ptr()
    assert [t.data_ptr() for t in graphs[0] if t.untyped_storage().data_ptr() == storage] == [buffer.data_ptr()]
    layer_params = {t.data_ptr() for layer in model.decoder.dec_layers
                    for m in (layer.mha1.wq, layer.mha1.wk, layer.mha1.wv, layer.mha1.dense, layer.ffn,
                              layer.layernorm1, layer.layernorm2) for t in m.parameters()}
    assert not inputs & layer_params


def test_overlapping_generate_calls_keep_the_decoding_copies_armed(monkeypatch):
    # Two generate() calls that overlap (threads sharing a model; here one inside the other's logits processor, in one
    # thread): the inner one ending must not switch the outer one's remaining steps from the decoding copies to the
    # modules (different roundings in 16-bit), nor must the inner one's start refill the copies. The last call to end
    # turns them off.
    from transformers import LogitsProcessor, LogitsProcessorList

    monkeypatch.setattr(PldrDecoderLayer, "COPY_ON_CPU", True)
    model = make_model(3)
    armed, fills = [], []
    arm = type(model.decoder).arm_decode_weights
    monkeypatch.setattr(type(model.decoder), "arm_decode_weights", lambda self: fills.append(self) or arm(self))
    inner_prompt = prompt(31, 5)

    class Inner(LogitsProcessor):
        def __call__(self, input_ids, scores):
            if input_ids.shape[1] == 8:  # (mid-way through the outer call)
                inner = gen(model, inner_prompt)
                assert torch.equal(inner, gen(make_model(3), inner_prompt))
            armed.append(model.decoder._decode_armed)
            return scores

    outer_prompt = prompt(30, 6)
    out = gen(model, outer_prompt, logits_processor=LogitsProcessorList([Inner()]))
    assert torch.equal(out, gen(make_model(3), outer_prompt))
    assert armed == [True] * N and sum(f is model.decoder for f in fills) == 1 and not model.decoder._decode_armed


def test_static_cache_keeps_deductive_tensors_at_fixed_addresses(model):
    # Compiled decoding with CUDA graphs reads the G-cache in place only if its tensors keep their addresses, also when
    # generate() reuses the cache (reset) for the next prompt.
    L = model.config.num_hidden_layers
    cache = StaticCache(config=model.config, max_cache_len=24)
    with torch.no_grad():
        model(prompt(30, 6), past_key_values=cache, use_cache=True)
        first = [[t.data_ptr() for t in cache.get_deductive(i)] for i in range(L)]
        cache.reset()
        assert cache.get_deductive(0) == (None, None, None)
        p = prompt(31, 6)
        model(p, past_key_values=cache, use_cache=True)
        dynamic = model(p, use_cache=True).past_key_values
    for i in range(L):
        kept = cache.get_deductive(i)
        assert [t.data_ptr() for t in kept] == first[i]
        assert all(getattr(t, "_dynamo_static_input_type", None) == "unguarded" for t in kept)
        for t, expected in zip(kept, dynamic.get_deductive(i)):
            assert torch.equal(t, expected)  # the new prompt's tensors, not the old ones
    # Beam search reorders them in place (same tokens and scores as with a dynamic cache).
    kw = dict(num_beams=3, num_return_sequences=3, return_dict_in_generate=True, output_scores=True)
    static, dyn = gen(model, p, cache_implementation="static", **kw), gen(model, p, **kw)
    assert torch.equal(static.sequences, dyn.sequences)
    torch.testing.assert_close(static.sequences_scores, dyn.sequences_scores)


def test_static_caches_of_successive_generate_calls_share_the_model_buffers():
    # generate() makes a new static cache per call. Its keys, values, lengths and deductive tensors go to buffers the
    # model keeps, so that the compiled decoding step's CUDA graphs find them at the same addresses in every call; a
    # cache that a caller still holds keeps its own tensors untouched, and decode_weight_copies=False gives the cache
    # buffers of its own.
    import copy
    import gc
    import pickle
    import weakref

    model = make_model(5)  # (its own: no cache of another test may hold the buffers)

    def run(seed, **kw):
        with torch.no_grad():
            return model.generate(prompt(seed, 7), max_new_tokens=N, min_new_tokens=N, do_sample=False,
                                  cache_implementation="static", return_dict_in_generate=True, **kw)

    def ptrs(out):
        cache = getattr(out, CACHE_FIELD)
        L = model.config.num_hidden_layers
        return ([t.data_ptr() for i in range(L) for t in cache.get_deductive(i)]
                + [t.data_ptr() for layer in cache.layers for t in (layer.keys, layer.values, layer.cumulative_length)])

    first = run(50)
    first_ptrs, gone = ptrs(first), weakref.ref(getattr(first, CACHE_FIELD))
    # (the model still copies and pickles: the buffers' holder keeps only a weak reference to the cache using them)
    assert torch.equal(gen(copy.deepcopy(model), prompt(50, 7)), first.sequences)
    assert torch.equal(gen(pickle.loads(pickle.dumps(model)), prompt(50, 7)), first.sequences)
    del first
    gc.collect()
    assert gone() is None
    second = run(51)
    assert ptrs(second) == first_ptrs  # the same buffers again
    assert torch.equal(second.sequences, gen(model, prompt(51, 7)))
    held = getattr(second, CACHE_FIELD)
    kept = [t.clone() for t in (*held.get_deductive(0), held.layers[0].keys, held.layers[0].values)]
    third = run(52)  # while `second` (and its cache) is still held
    assert set(ptrs(third)).isdisjoint(first_ptrs)
    assert torch.equal(third.sequences, gen(model, prompt(52, 7)))
    for t, before in zip((*held.get_deductive(0), held.layers[0].keys, held.layers[0].values), kept):
        assert torch.equal(t, before)
    del second, third
    gc.collect()
    own = run(53, decode_weight_copies=False)
    assert set(ptrs(own)).isdisjoint(first_ptrs)
    assert torch.equal(own.sequences, gen(model, prompt(53, 7)))
    del own
    lent = run(54)  # lent again (new buffers: the old ones were released), then released by the public method
    held_by_model = [weakref.ref(t) for t in (getattr(lent, CACHE_FIELD).layers[0].keys,
                                              getattr(lent, CACHE_FIELD).get_deductive(0)[0])]
    del lent
    gc.collect()
    assert all(r() is not None for r in held_by_model)
    model.release_decode_buffers()
    assert all(r() is None for r in held_by_model)
    assert torch.equal(run(54).sequences, gen(model, prompt(54, 7)))


def test_moving_the_model_frees_what_generate_keeps(monkeypatch):
    # .to(), .cpu(), .half() leave plain attributes where they are: the kept weight copies and static-cache buffers
    # would hold the old device's memory (e.g. after model.cpu() to free a GPU). Moving the model frees them; the next
    # generate() makes new ones and gives the same tokens.
    import gc
    import weakref

    model = make_model(8)
    monkeypatch.setattr(PldrGLU, "PAD_ON_CPU", True)
    monkeypatch.setattr(type(model.decoder.dec_layers[0].mha1), "JOINT_ON_CPU", True)
    p = prompt(62, 7)

    def run():
        with torch.no_grad():
            return model.generate(p, attention_mask=torch.ones_like(p), max_new_tokens=N, min_new_tokens=N,
                                  do_sample=False, cache_implementation="static", return_dict_in_generate=True)

    out = run()
    cache = getattr(out, CACHE_FIELD)
    kept = [weakref.ref(t) for t in (cache.layers[0].keys, cache.get_deductive(0)[0],
                                     model.decoder.dec_layers[0].ffn._decode_weights[0],
                                     model.decoder.dec_layers[0].mha1._decode_weights[0],
                                     *model._mask_positions.values())]
    assert len(kept) == 5
    del out, cache
    gc.collect()
    assert all(r() is not None for r in kept)  # kept by the model between calls
    model.to(torch.float64)
    assert all(r() is None for r in kept)
    model.to(torch.float32)
    assert torch.equal(run().sequences, gen(model, p))


def test_offloaded_static_cache_keeps_its_own_keys_and_values():
    # An offloaded static cache moves its keys and values off the accelerator between layers; buffers kept by the model
    # would hold that memory, so only a plain static cache's layers take the model's keys and values.
    for offloading in (True, False):
        model = make_model(7)
        cache = StaticCache(config=model.config, max_cache_len=16, offloading=offloading)
        lent = model.decoder._static_cache_buffers.lend(cache)
        assert lent == ([] if offloading else list(range(model.config.num_hidden_layers)))


def test_cache_keeps_g_lm_in_the_query_dtype_for_decoding(monkeypatch):
    # A bfloat16 model computes G_LM in float32; the cache also keeps it cast to the queries' dtype, so that decoding
    # steps do not cast it again in every layer. It must be exactly the per-step cast, follow the cache's batch
    # operations (beam search) and keep a fixed address in a static cache.
    from pldr_hf.modeling.modeling_pldr import PldrCacheMixin

    m = make_model(3).to(torch.bfloat16)
    L = m.config.num_hidden_layers
    p = torch.cat([prompt(40, 7), prompt(41, 7)])
    with torch.no_grad():
        cache = m(p, use_cache=True).past_key_values
    for i in range(L):
        G = cache.get_deductive(i)[2]
        G_query = cache.get_query_metric(i, torch.bfloat16)
        assert G.dtype == torch.float32 and G_query.dtype == torch.bfloat16
        assert torch.equal(G_query, G.to(torch.bfloat16))
    cache.reorder_cache(torch.tensor([1, 0]))  # batch operations apply to the copy too
    assert torch.equal(cache.get_query_metric(0, torch.bfloat16), cache.get_deductive(0)[2].to(torch.bfloat16))
    assert not torch.equal(cache.get_deductive(0)[2][0], cache.get_deductive(0)[2][1])  # (rows differ)
    static = StaticCache(config=m.config, max_cache_len=32)
    with torch.no_grad():
        m(p, past_key_values=static, use_cache=True)
    for i in range(L):
        G_query = static.get_query_metric(i, torch.bfloat16)
        assert G_query.data_ptr() == static._deductive_buffers[(3, i)].data_ptr()
        assert getattr(G_query, "_dynamo_static_input_type", None) == "unguarded"

    kw = dict(return_dict_in_generate=True, output_scores=True)
    runs = {}
    for label, extra in (("dynamic", {}), ("static", {"cache_implementation": "static"}),
                         ("beams", {"num_beams": 3, "num_return_sequences": 2})):
        with_copy = gen(m, p, **kw, **extra)
        with monkeypatch.context() as mp:  # the cast in every step instead
            mp.setattr(PldrCacheMixin, "get_query_metric", lambda self, layer_idx, dtype: None)
            cast = gen(m, p, **kw, **extra)
        assert torch.equal(with_copy.sequences, cast.sequences), label
        for a, b in zip(with_copy.scores, cast.scores):
            assert torch.equal(a, b), label
        runs[label] = with_copy.sequences
    assert torch.equal(runs["static"], runs["dynamic"])

    # A forward with gradients (training) keeps no copy.
    cache = m(p, use_cache=True).past_key_values
    assert cache.get_deductive(0)[2].requires_grad and cache.get_query_metric(0, torch.bfloat16) is None


# ----------------------------------------------------------------------------------------------------------------------
# The FFN's padded hidden width (GPU paths, run on CPU with PAD_ON_CPU)
# ----------------------------------------------------------------------------------------------------------------------
@pytest.fixture
def pad_on_cpu(monkeypatch):
    monkeypatch.setattr(PldrGLU, "PAD_ON_CPU", True)


def _linear_calls(fn, *args):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = fn(*args)
    return out, sum(1 for e in prof.events() if e.name == "aten::linear")


def _ffn_reference(ffn, x):
    return ffn.gluw3(F.silu(ffn.gluw1(x)) * ffn.gluw2(x))


def _assert_ffn_matches_the_modules(ffn, run, x, atol):
    """run(x) (the FFN, compiled or not) equals the modules' math in values and in the gradients of x and all
    parameters."""
    out = run(x)
    grads = torch.autograd.grad(out.square().sum(), [x, *ffn.parameters()])
    ref = _ffn_reference(ffn, x)
    ref_grads = torch.autograd.grad(ref.square().sum(), [x, *ffn.parameters()])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=atol)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=atol)


@pytest.mark.parametrize("bias", [True, False])
def test_padded_ffn_equals_the_modules_in_values_and_gradients(pad_on_cpu, bias):
    torch.manual_seed(0)
    ffn = PldrGLU(16, 42, 16, bias, "silu", align_hidden=True)
    assert ffn.hidden_pad == 22  # 42 -> 64: a multiple of ALIGN
    assert PldrGLU(16, 40, 16, bias, "silu", align_hidden=True).hidden_pad == 0  # a multiple of 8 stays as it is
    x = torch.randn(2, PldrGLU.MIN_PADDED_ROWS // 2, 16, requires_grad=True)  # large: padded on the fly
    _assert_ffn_matches_the_modules(ffn, ffn, x, atol=1e-6)
    assert _linear_calls(ffn, x)[1] == 2  # padded W1|W2 as one GEMM, then W3

    small = torch.randn(3, 1, 16)
    assert ffn.arm_decode_weights()
    with torch.no_grad():
        armed, calls = _linear_calls(ffn, small)
    assert calls == 2  # W1|W2 as one padded GEMM, then W3
    torch.testing.assert_close(armed, _ffn_reference(ffn, small), rtol=1e-5, atol=1e-6)
    w12, b12, w3, b3 = ffn._decode_weights
    assert w12.shape == (128, 16) and w3.shape == (16, 64)
    assert not w12[42:64].any() and not w12[106:].any() and not w3[:, 42:].any()
    assert (b12 is None) if not bias else (not b12[42:64].any() and not b12[106:].any())
    assert (b3 is None) if not bias else torch.equal(b3, ffn.gluw3.bias)
    # (views into one buffer: a compiled decoding step reads one tensor, not one per copy)
    assert len({t.untyped_storage().data_ptr() for t in ffn._decode_weights if t is not None}) == 1
    # With gradients on, the armed copies are not used: the parameters get their gradients.
    assert _linear_calls(ffn, small)[1] == 3
    # Re-arming refreshes the copies in place from changed parameters.
    with torch.no_grad():
        ffn.gluw2.weight.mul_(-0.5)
        ffn.gluw3.weight.add_(0.1)
        if bias:
            ffn.gluw3.bias.add_(1.0)
    ptr = w12.data_ptr()
    assert ffn.arm_decode_weights() and ffn._decode_weights[0].data_ptr() == ptr
    with torch.no_grad():
        torch.testing.assert_close(ffn(small), _ffn_reference(ffn, small), rtol=1e-5, atol=1e-6)
    # ... and from a parameter that was replaced by a new one
    ffn.gluw1.weight = torch.nn.Parameter(torch.randn_like(ffn.gluw1.weight))
    assert ffn.arm_decode_weights() and ffn._decode_weights[0].data_ptr() == ptr
    with torch.no_grad():
        torch.testing.assert_close(ffn(small), _ffn_reference(ffn, small), rtol=1e-5, atol=1e-6)
    ffn.disarm_decode_weights()
    with torch.no_grad():
        assert _linear_calls(ffn, small)[1] == 3


def test_padded_ffn_compiled_equals_the_modules(pad_on_cpu):
    # Under torch.compile, with gradients, the padded W1|W2 GEMM takes its bias as one more column of the weight
    # against a column of ones in the input (_linear_bias_folded); without, it adds it after the GEMM (cuBLAS's path
    # for inductor's addmm copies the broadcast bias first): values and gradients must stay the modules'.
    torch.manual_seed(3)
    ffn = PldrGLU(16, 42, 16, True, "silu", align_hidden=True)
    with torch.no_grad():
        for lin in (ffn.gluw1, ffn.gluw2):
            lin.bias.normal_()  # (large biases: leaving them out would show)
    compiled = torch.compile(ffn, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, PldrGLU.MIN_PADDED_ROWS // 2, 16, requires_grad=True)
    _assert_ffn_matches_the_modules(ffn, compiled, x, atol=1e-5)
    with torch.no_grad():  # (compiled inference: the bias added after the GEMM)
        torch.testing.assert_close(compiled(x), _ffn_reference(ffn, x), rtol=1e-5, atol=1e-5)
    small = torch.randn(3, 1, 16)
    assert ffn.arm_decode_weights()
    with torch.no_grad():
        torch.testing.assert_close(compiled(small), _ffn_reference(ffn, small), rtol=1e-5, atol=1e-5)
    ffn.disarm_decode_weights()


def test_padded_ffn_never_bypasses_adapters_or_hooks(pad_on_cpu):
    # An adapter or hook on gluw1 (what PEFT's LoRA, quantisation or offloading look like to the FFN) must run: the
    # padded paths compute with the weights directly and would skip it.
    torch.manual_seed(1)
    ffn = PldrGLU(16, 42, 16, True, "silu", align_hidden=True)
    handle = ffn.gluw1.register_forward_hook(lambda mod, inp, out: out + 1.0)
    big = torch.randn(1, PldrGLU.MIN_PADDED_ROWS, 16)
    small = torch.randn(3, 1, 16)
    with torch.no_grad():
        torch.testing.assert_close(ffn(big), _ffn_reference(ffn, big))
        assert not ffn.arm_decode_weights()
        torch.testing.assert_close(ffn(small), _ffn_reference(ffn, small))
        hooked = _ffn_reference(ffn, small)
        handle.remove()
        assert not torch.allclose(hooked, _ffn_reference(ffn, small))  # the hook did change the output


def test_lora_on_the_ffn_runs_and_trains_with_padding_on(pad_on_cpu):
    # LoRA on gluw1/2/3 (the fine-tuning script's default targets) with a batch of at least MIN_PADDED_ROWS rows: the
    # on-the-fly padded path must not compute with the base weights alone.
    peft = pytest.importorskip("peft")
    torch.manual_seed(2)
    ffn = PldrGLU(16, 42, 16, True, "silu", align_hidden=True)
    peft.inject_adapter_in_model(peft.LoraConfig(r=2, target_modules=["gluw1", "gluw2", "gluw3"]), ffn)
    for name, p in ffn.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p)
    x = torch.randn(2, PldrGLU.MIN_PADDED_ROWS // 2, 16)
    out = ffn(x)
    torch.testing.assert_close(out, _ffn_reference(ffn, x))
    with torch.no_grad():
        base = F.linear(F.silu(F.linear(x, ffn.gluw1.weight, ffn.gluw1.bias)) * F.linear(x, ffn.gluw2.weight,
                        ffn.gluw2.bias), ffn.gluw3.weight, ffn.gluw3.bias)
    assert (out - base).abs().max() > 1e-2  # the adapters took part
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in ffn.named_parameters() if "lora_" in n)
    assert not ffn.arm_decode_weights()


@pytest.mark.parametrize("cache_implementation", [None, "static"])
def test_generate_with_decoding_weight_copies_equals_the_modules(model, monkeypatch, cache_implementation):
    # generate() decodes with the FFNs' padded W1|W2, W3 and the attentions' stacked Wq|Wk|Wv, copied at its start.
    p = prompt(40, 7)
    kw = dict(cache_implementation=cache_implementation, return_dict_in_generate=True, output_scores=True)
    plain = gen(model, p, **kw)
    attention = type(model.decoder.dec_layers[0].mha1)

    def copies_on_cpu(on: bool):
        monkeypatch.setattr(PldrGLU, "PAD_ON_CPU", on)
        monkeypatch.setattr(attention, "JOINT_ON_CPU", on)
        monkeypatch.setattr(PldrDecoderLayer, "COPY_ON_CPU", on)

    copies_on_cpu(True)
    copiers = [m for layer in model.decoder.dec_layers for m in (layer.ffn, layer.mha1, layer)]
    copied = gen(model, p, **kw)
    assert torch.equal(copied.sequences, plain.sequences)
    for a, b in zip(copied.scores, plain.scores):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert all(m._decode_weights is not None and not m._decode_armed for m in copiers)  # made, off after generate
    # every copy of every layer (FFN, q|k|v and dense projections, biases, LayerNorms) is a view into one buffer
    copies = [t for m in copiers for t in m._decode_weights]
    assert len(copies) == 12 * model.config.num_hidden_layers and all(t is not None for t in copies)
    assert len({t.untyped_storage().data_ptr() for t in copies}) == 1
    ptrs = [m._decode_weights[0].data_ptr() for m in copiers]
    layer0 = model.decoder.dec_layers[0]
    changes = (layer0.ffn.gluw1.weight, layer0.ffn.gluw3.bias, layer0.mha1.wk.weight, layer0.mha1.dense.weight,
               layer0.mha1.dense.bias, layer0.layernorm1.weight, layer0.layernorm2.bias)
    with torch.no_grad():  # generate must use the weights as they are now
        for t in changes:
            t.mul_(3.0)
    try:
        changed = gen(model, p, **kw)
        assert [m._decode_weights[0].data_ptr() for m in copiers] == ptrs  # refreshed in place
        copies_on_cpu(False)
        expected = gen(model, p, **kw)
    finally:
        with torch.no_grad():
            for t in changes:
                t.div_(3.0)
    # decode_weight_copies=False: the modules themselves, and the copies' memory is given back.
    copies_on_cpu(True)
    without = gen(model, p, decode_weight_copies=False, **kw)
    assert all(m._decode_weights is None for m in copiers)
    assert torch.equal(without.sequences, plain.sequences)
    assert torch.equal(changed.sequences, expected.sequences)
    for a, b in zip(changed.scores, expected.scores):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cache_implementation", [None, "static"])
def test_generate_inside_then_outside_inference_mode(monkeypatch, cache_implementation):
    # The buffers kept between generate() calls (decoding weight copies, a static cache's deductive tensors) made under
    # torch.inference_mode() are inference tensors, which cannot be written outside it: a later call without it (e.g.
    # generate's own no_grad) gets new ones instead of failing, and the same tokens.
    model = make_model(6)
    monkeypatch.setattr(PldrGLU, "PAD_ON_CPU", True)
    monkeypatch.setattr(type(model.decoder.dec_layers[0].mha1), "JOINT_ON_CPU", True)
    p = prompt(61, 7)
    kw = dict(attention_mask=torch.ones_like(p), max_new_tokens=N, min_new_tokens=N, do_sample=False,
              cache_implementation=cache_implementation)
    with torch.inference_mode():
        inside = model.generate(p, **kw)
    assert model.decoder.dec_layers[0].ffn._decode_weights[0].is_inference()
    outside = model.generate(p, **kw)
    assert not model.decoder.dec_layers[0].ffn._decode_weights[0].is_inference()
    with torch.inference_mode():
        again = model.generate(p, **kw)
    assert torch.equal(inside, outside) and torch.equal(outside, again)


# ----------------------------------------------------------------------------------------------------------------------
# q, k and v as one GEMM for large inputs (GPU path, run on CPU with JOINT_ON_CPU)
# ----------------------------------------------------------------------------------------------------------------------
def _train_step(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_joint_qkv_projection_equals_the_modules(monkeypatch):
    model = make_model(seed=3, max_position_embeddings=1024)
    attn = model.decoder.dec_layers[0].mha1
    ids = torch.randint(0, model.config.vocab_size, (2, attn.MIN_JOINT_ROWS // 2))
    logits, grads = _train_step(model, ids)
    monkeypatch.setattr(type(attn), "JOINT_ON_CPU", True)
    joint_logits, joint_grads = _train_step(model, ids)
    torch.testing.assert_close(joint_logits, logits, rtol=1e-5, atol=1e-5)
    assert joint_grads.keys() == grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(joint_grads[name], g, rtol=1e-4, atol=1e-6, msg=name)
    x = torch.randn(1, attn.MIN_JOINT_ROWS, model.config.hidden_size)
    with torch.no_grad():
        (qk, v), calls = _linear_calls(attn.project, x)
        assert calls == 1  # q, k and v as one GEMM
        (qk_small, _), calls = _linear_calls(attn.project, x[:, :8])
        assert calls == 3  # small inputs (decoding steps): the modules
    H, d = attn.num_heads, attn.head_dim
    torch.testing.assert_close(qk[..., :H, :].flatten(-2), attn.wq(x))
    torch.testing.assert_close(qk[..., H:, :].flatten(-2), attn.wk(x))
    torch.testing.assert_close(v.flatten(-2), attn.wv(x))
    torch.testing.assert_close(qk_small, qk[:, :8])


def test_stacked_qkv_copy_for_decoding(monkeypatch):
    model = make_model(seed=5)
    attn = model.decoder.dec_layers[0].mha1
    monkeypatch.setattr(type(attn), "JOINT_ON_CPU", True)
    x = torch.randn(3, 1, model.config.hidden_size)
    H = attn.num_heads

    def check(qk, v):
        torch.testing.assert_close(qk[..., :H, :].flatten(-2), attn.wq(x))
        torch.testing.assert_close(qk[..., H:, :].flatten(-2), attn.wk(x))
        torch.testing.assert_close(v.flatten(-2), attn.wv(x))

    assert attn.arm_decode_weights()
    with torch.no_grad():
        (qk, v), calls = _linear_calls(attn.project, x)
    assert calls == 1  # the stacked copy: one GEMM for a decoding step
    check(qk, v)
    w, b, dw, db = attn._decode_weights
    assert w.shape == (3 * attn.wq.out_features, attn.wq.in_features) and b.shape == (3 * attn.wq.out_features,)
    assert torch.equal(dw, attn.dense.weight) and torch.equal(db, attn.dense.bias)
    assert _linear_calls(attn.project, x)[1] == 3  # with gradients on: the modules (the parameters get gradients)
    with torch.no_grad():  # re-arming refreshes the copy in place from changed parameters
        attn.wv.weight.mul_(-0.5)
        attn.wq.bias.add_(1.0)
    ptr = w.data_ptr()
    assert attn.arm_decode_weights() and attn._decode_weights[0].data_ptr() == ptr
    with torch.no_grad():
        check(*attn.project(x))
    attn.disarm_decode_weights()
    with torch.no_grad():
        assert _linear_calls(attn.project, x)[1] == 3
    # A hook (or adapter) on one projection: no stacked copy, the modules run (the dense projection keeps its copy).
    handle = attn.wk.register_forward_hook(lambda mod, inp, out: out + 1.0)
    assert attn.arm_decode_weights() and attn._decode_weights[:2] == (None, None)
    handle_dense = attn.dense.register_forward_hook(lambda mod, inp, out: out + 1.0)
    assert not attn.arm_decode_weights()
    handle_dense.remove()
    with torch.no_grad():
        qk, v = attn.project(x)
    assert torch.allclose(qk[..., H:, :].flatten(-2), attn.wk(x))
    handle.remove()


def test_joint_qkv_projection_steps_aside_for_lora(monkeypatch):
    # LoRA on wq and wv (the usual attention targets) must take part: the joint GEMM would use the base weights only.
    peft = pytest.importorskip("peft")
    model = make_model(seed=4, max_position_embeddings=1024)
    monkeypatch.setattr(type(model.decoder.dec_layers[0].mha1), "JOINT_ON_CPU", True)
    peft.inject_adapter_in_model(peft.LoraConfig(r=2, target_modules=["wq", "wv"]), model)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p)
    attn = model.decoder.dec_layers[0].mha1
    x = torch.randn(1, attn.MIN_JOINT_ROWS, model.config.hidden_size)
    qk, v = attn.project(x)
    H = attn.num_heads
    torch.testing.assert_close(qk[..., :H, :].flatten(-2), attn.wq(x))
    torch.testing.assert_close(v.flatten(-2), attn.wv(x))
    base = F.linear(x, attn.wq.weight, attn.wq.bias)
    assert (qk[..., :H, :].flatten(-2) - base).abs().max() > 1e-2  # the adapter took part
    v.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in attn.named_parameters()
               if "lora_" in n and "wv" in n)


def test_forward_signature_is_exact_and_not_recomputed_every_decoding_step(model):
    # generate() reads inspect.signature(model.forward) to decide which keyword arguments the model takes (a wrong one
    # drops use_g_cache, the cache, ...), and for remote-code classes transformers computes it again at every decoding
    # step. The model keeps it on the function: it must equal the one of the function itself, and stay kept.
    assert PldrForCausalLM.is_remote_code()
    own = inspect.signature(inspect.unwrap(PldrForCausalLM.forward))
    assert "__signature__" in vars(PldrForCausalLM.forward)
    assert inspect.signature(model.forward) == own.replace(parameters=list(own.parameters.values())[1:])
    assert {"input_ids", "attention_mask", "use_g_cache", "output_pldr_attentions", "logits_to_keep",
            "kwargs"} <= set(inspect.signature(model.forward).parameters)


def test_generate_does_not_inspect_forward_at_every_decoding_step(model, monkeypatch):
    # For remote-code classes transformers calls inspect.signature(self.forward) at every decoding step, to build
    # cache_position if the forward takes it (25-60 us a step on a GPU host). Inside generate() the model answers
    # is_remote_code() False when its forward takes no cache_position, so the calls do not grow with the new tokens;
    # outside generate() it is remote code (save_pretrained writes auto_map and the code). A subclass whose forward
    # takes cache_position still gets it.
    counted = []
    real = inspect.signature

    def run(m, n):
        with torch.no_grad():
            return m.generate(p, attention_mask=torch.ones_like(p), max_new_tokens=n, min_new_tokens=n, do_sample=False)

    def counting(obj, *args, **kwargs):
        if getattr(obj, "__func__", None) is not None and getattr(obj.__func__, "__name__", "") == "forward":
            counted.append(obj.__self__)
        return real(obj, *args, **kwargs)

    p = prompt(60, 5)
    monkeypatch.setattr(inspect, "signature", counting)
    calls = []
    for n in (2, 8):
        counted.clear()
        out = run(model, n)
        assert out.shape[1] == 5 + n
        calls.append(sum(m is model for m in counted))
    assert calls[0] == calls[1], calls
    assert PldrForCausalLM.is_remote_code()

    seen = []

    class WithCachePosition(PldrForCausalLM):
        def forward(self, input_ids=None, cache_position=None, **kwargs):
            seen.append(cache_position)
            return super().forward(input_ids=input_ids, **kwargs)

    sub = WithCachePosition(model.config).eval()
    sub.load_state_dict(model.state_dict())
    assert torch.equal(run(sub, 3), run(model, 3))
    assert len(seen) == 3 and all(c is not None for c in seen[1:])
