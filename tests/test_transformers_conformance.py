"""PLDR-LLM behaves like an in-tree transformers causal LM: tuple outputs, compiled decoding without recompiles,
packed / padding-free batches and 4D masks, inputs_embeds in generate, run-time attention switching, multi-token
static-cache steps, cache_first_G and half precision.

Tiny random models on CPU; every test compares numbers or tokens against an independent way of getting them.
"""

import pytest
import torch
from transformers import CompileConfig, DynamicCache, StaticCache
from transformers.modeling_utils import AttentionInterface

import pldr_hf  # noqa: F401  (registers the model)
import pldr_hf.modeling.modeling_pldr as modeling_pldr
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
TOL = dict(rtol=0, atol=1e-5)


def make(seed=0, cls=PldrForCausalLM, attn="sdpa", **overrides):
    torch.manual_seed(seed)
    model = cls(PldrConfig(**{**TINY, **overrides})).eval()
    model.config._attn_implementation = attn
    return model


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
        rest = model.generate(inputs_embeds=more, past_key_values=first.past_key_values, max_new_tokens=5,
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


