"""Training recipe, DAG regulariser, resume, LoRA, tokenizer and quickstart (tiny, CPU, offline, seeded)."""

import json
import random
from pathlib import Path

import pytest
import torch

import pldr_hf  # noqa: F401
from pldr_hf.tokenizer import SPECIAL_IDS, train_tokenizer, wrap_sentencepiece
from pldr_hf.training import (
    DataArguments,
    ModelArguments,
    PldrTrainingArguments,
    dag_acyclicity,
    dag_loss,
    pretrain,
)

SHARED_SPM = Path("/work/shared/tokenizer/refinedweb-32k-pldr.model")
WORDS = ("the cat sat on a mat while dogs ran in green parks and birds sang over quiet rivers near old towns "
         "where people walked slowly talking about books music weather food and friends").split()
TINY = ("hidden_size=16,num_attention_heads=2,head_dim=8,num_hidden_layers=2,intermediate_size=42,A_dff=12,"
        "num_reslayerA=2,num_denseA=2,max_position_embeddings=64")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 20))) + "." for _ in range(400)]
    f = d / "train.txt"
    f.write_text("\n".join(lines) + "\n")
    return f


@pytest.fixture(scope="module")
def tok_dir(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer([corpus], out, vocab_size=64, kind="sentencepiece")
    return out


def _args(out, steps, **kw):
    base = dict(output_dir=str(out), max_steps=steps, per_device_train_batch_size=4, learning_rate=5e-3,
                warmup_steps=2, logging_steps=1, save_strategy="no", use_cpu=True, seed=0, data_seed=0,
                disable_tqdm=True, report_to="none", dataloader_num_workers=0)
    base.update(kw)
    return PldrTrainingArguments(**base)


def _losses(trainer):
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


def _model_args(tok_dir, **kw):
    return ModelArguments(preset="tiny", tokenizer_name_or_path=str(tok_dir), config_overrides=TINY, **kw)


def test_tokenizer_roundtrip_and_special_ids(corpus, tok_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    assert (tok.pad_token_id, tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2, 3)
    assert (tok.pad_token, tok.unk_token, tok.bos_token, tok.eos_token) == ("[PAD]", "[UNK]", "[START]", "[END]")
    text = "the cat sat on a mat while birds sang."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    # decode keeps the space of every word-initial piece, the first one's too (so that parts decode like the whole)
    assert min(ids) > 3 and tok.decode(ids) == " " + text
    # tokenizers-library models keep the ids too
    bpe = train_tokenizer([corpus], tok_dir.parent / "bpe", vocab_size=80, kind="bpe")
    assert [bpe.convert_tokens_to_ids(t) for t in ("[PAD]", "[UNK]", "[START]", "[END]")] == [0, 1, 2, 3]
    assert bpe.decode(bpe(text, add_special_tokens=False)["input_ids"]) == " " + text


@pytest.mark.skipif(not SHARED_SPM.exists(), reason="the papers' SentencePiece model is not on this machine")
def test_wrap_papers_sentencepiece_model(tmp_path):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    wrap_sentencepiece(SHARED_SPM, tmp_path / "t")
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "t"))
    sp = spm.SentencePieceProcessor(model_file=str(SHARED_SPM))
    text = "Power law graph attention learns a metric tensor of the input, 42 times over."
    assert tok(text, add_special_tokens=False)["input_ids"] == sp.encode(text)
    assert tok.decode(sp.encode(text)) == " " + text  # SentencePiece drops the leading space, a slice needs it
    rare = "naïve café 🙂 東京"  # characters outside the vocabulary: byte fallback, as SentencePiece
    ids = tok(rare, add_special_tokens=False)["input_ids"]
    assert ids == sp.encode(rare) and tok.unk_token_id not in ids
    assert tok.decode(sp.encode(rare)) == " " + rare
    assert {k: getattr(tok, f"{k}_token_id") for k in SPECIAL_IDS} == SPECIAL_IDS
    assert len(tok) == sp.get_piece_size() == 32000


def test_recipe_trains_and_loss_falls(corpus, tok_dir, tmp_path):
    trainer = pretrain(_model_args(tok_dir), DataArguments(train_file=[str(corpus)], block_size=32),
                       _args(tmp_path / "run", 30), eval_before=True)
    losses = _losses(trainer)
    first, last = sum(losses[s] for s in (1, 2, 3)) / 3, sum(losses[s] for s in (28, 29, 30)) / 3
    assert last < first - 0.5, losses
    after = trainer.evaluate()["eval_loss"]
    assert after < trainer.eval_before - 0.5
    # the saved folder loads with the Auto classes and generates
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run")
    tok = AutoTokenizer.from_pretrained(tmp_path / "run")
    out = model.generate(**tok("the cat", return_tensors="pt", add_special_tokens=False), max_new_tokens=5,
                         min_new_tokens=5, do_sample=False)
    assert out.shape[1] == len(tok("the cat", add_special_tokens=False)["input_ids"]) + 5
    # recipe defaults
    a = trainer.args
    assert (a.adam_beta1, a.adam_beta2, a.adam_epsilon, a.weight_decay) == (0.9, 0.95, 1e-5, 0.1)
    assert a.lr_scheduler_type == "cosine_with_min_lr" and a.max_grad_norm == 1.0


def test_resume_gives_same_next_losses(corpus, tok_dir, tmp_path):
    data = DataArguments(train_file=[str(corpus)], block_size=32)
    full = _losses(pretrain(_model_args(tok_dir), data, _args(tmp_path / "full", 8)))
    from transformers import TrainerCallback

    class Interrupt(TrainerCallback):  # the same 8-step run, killed right after the checkpoint at step 4
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 4:
                control.should_training_stop = True

    part = tmp_path / "part"
    pretrain(_model_args(tok_dir), data, _args(part, 8, save_strategy="steps", save_steps=4), callbacks=[Interrupt()])
    assert (part / "checkpoint-4").is_dir()
    # Trainer restores weights, optimiser, schedule, RNG states and the data order from the last checkpoint
    resumed = _losses(pretrain(_model_args(tok_dir), data, _args(part, 8, save_strategy="steps", save_steps=4),
                               resume=True))
    for step in (5, 6, 7, 8):
        assert resumed[step] == pytest.approx(full[step], rel=1e-4, abs=1e-4), (step, resumed, full)


def test_dag_regulariser_value_and_logging(corpus, tok_dir, tmp_path):
    # h(M) = tr(exp(M*M)) - d: zero for a strictly triangular (acyclic) matrix, positive with a cycle
    tri = torch.triu(torch.randn(5, 5), diagonal=1)
    assert dag_acyclicity(tri).item() == pytest.approx(0.0, abs=1e-6)
    cyc = torch.zeros(3, 3)
    cyc[0, 1] = cyc[1, 2] = cyc[2, 0] = 1.0
    assert dag_acyclicity(cyc).item() == pytest.approx(3 * (1 / 6 + 1 / 720 + 1 / 362880.0), rel=1e-4)

    trainer = pretrain(_model_args(tok_dir), DataArguments(train_file=[str(corpus)], block_size=32),
                       _args(tmp_path / "dag", 6, dag_weight=0.01))
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert all("dag_loss" in h and "lm_loss" in h and h["dag_loss"] > 0 for h in logs)
    assert all(h["lm_loss"] == pytest.approx(h["loss"] - 0.01 * h["dag_loss"], abs=1e-4) for h in logs)
    # the value logged is the one the model's deductive outputs give
    model = trainer.model.eval()
    batch = torch.tensor([trainer.train_dataset[0]["input_ids"]])
    out = model(batch, output_pldr_attentions=True)
    value, parts = dag_loss(out.pldr_attentions)
    assert set(parts) == {"A_LM", "P", "G_LM"} and value.item() > 0


@pytest.mark.parametrize("case", ["missing_file", "block_too_large", "unknown_preset", "both_sources"])
def test_bad_arguments_give_clear_errors(case, corpus, tok_dir, tmp_path):
    data = DataArguments(train_file=[str(corpus)], block_size=32)
    model = _model_args(tok_dir)
    if case == "missing_file":
        data, match = DataArguments(train_file=[str(tmp_path / "nope.txt")]), "corpus file not found: .*nope.txt"
        exc = FileNotFoundError
    elif case == "block_too_large":
        data, match, exc = DataArguments(train_file=[str(corpus)], block_size=65), "block_size 65 is larger", ValueError
    elif case == "unknown_preset":
        model = ModelArguments(preset="huge", tokenizer_name_or_path=str(tok_dir))
        match, exc = "unknown preset 'huge'", ValueError
    else:
        data = DataArguments(train_file=[str(corpus)], dataset_name="x")
        match, exc = "exactly one corpus", ValueError
    with pytest.raises(exc, match=match):
        pretrain(model, data, _args(tmp_path / "bad", 1))


def test_pretrain_script_cli_errors(tmp_path, tok_dir):
    import os
    import subprocess
    import sys

    repo = Path(__file__).parents[1]  # this checkout's pldr_hf, not whichever one the environment has installed
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")])))
    (tmp_path / "x.txt").write_text("the cat sat on a mat.\n")
    r = subprocess.run([sys.executable, "scripts/pretrain.py", "--preset", "nope", "--tokenizer_name_or_path",
                        str(tok_dir), "--train_file", str(tmp_path / "x.txt"), "--output_dir", str(tmp_path / "o"),
                        "--use_cpu"], capture_output=True, text=True, cwd=repo, env=env)
    assert r.returncode == 1 and "unknown preset 'nope'" in r.stderr and "Traceback" not in r.stderr


def test_lora_trains_only_adapters_and_merge_equals_adapter(corpus, tok_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from pldr_hf.finetune import FinetuneArguments, finetune

    base_dir = tmp_path / "base"
    pretrain(_model_args(tok_dir), DataArguments(train_file=[str(corpus)], block_size=32), _args(base_dir, 3))
    base_state = {k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(base_dir).state_dict().items()}
    ft = FinetuneArguments(model_name_or_path=str(base_dir), use_lora=True, lora_r=4, merge=True)
    trainer, merged_dir = finetune(ft, DataArguments(train_file=[str(corpus)], block_size=32),
                                   _args(tmp_path / "lora", 5, learning_rate=1e-2))
    peft_model = trainer.model
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    wrapped = {n.split(".")[-4] for n in trainable}  # ...mha1.wq.lora_A.default.weight
    assert wrapped == {"wq", "wk", "wv", "dense", "gluw1", "gluw2", "gluw3"}
    assert not any("reslayerAs" in n for n in trainable)  # the metric learner's GLUs are not targeted
    # base weights unchanged, adapters moved
    for n, p in peft_model.named_parameters():
        if "lora_" not in n:
            key = n.replace("base_model.model.", "").replace(".base_layer", "")
            assert torch.equal(p.detach(), base_state[key]), n
    assert any(p.abs().sum() > 0 for n, p in peft_model.named_parameters() if "lora_B" in n)
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["r"] == 4
    # merged standalone model == base + adapter
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    peft_model.eval()
    x = torch.tensor([trainer.train_dataset[0]["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(merged(x).logits, peft_model(input_ids=x).logits, atol=1e-5)
        base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
        assert not torch.allclose(base(x).logits, merged(x).logits, atol=1e-4)
    out = merged.generate(x[:, :4], max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7)


def test_quickstart_small_learns(tmp_path):
    from pldr_hf.quickstart import run_quickstart

    r = run_quickstart(out_dir=str(tmp_path / "qs"), max_steps=40, vocab_size=300, block_size=64, batch_size=8,
                       max_chars=150_000, new_tokens=8, log=lambda *a: None)
    assert r["perplexity_after"] < r["perplexity_before"] / 3
    assert r["perplexity_after"] < r["unigram_perplexity"] and r["learned"]
    assert r["g_cache_same_tokens"]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "qs")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "qs")
    assert tok.eos_token_id == 3 and model.config.vocab_size == r["vocab_size"]
    # the saved tokenizer knows the model's context (the work copy used for packing documents has no limit)
    assert tok.model_max_length == model.config.max_position_embeddings == 256
    assert AutoTokenizer.from_pretrained(tmp_path / "qs" / "work" / "tokenizer").model_max_length > 1e20
    # the model card finds the training data and the hyperparameters beside the weights
    from pldr_hf.hub import CardOptions, build_model_card

    card = str(build_model_card(tmp_path / "qs", CardOptions(repo_id="me/qs"), num_parameters=r["parameters"]))
    assert "Not recorded" not in card and "CPython standard library docstrings" in card
    for line in ("- learning_rate: 0.003", "- max_steps: 40", "- block_size: 64", "- per_device_train_batch_size: 8",
                 "- seed: 42", "- final_eval_loss: "):
        assert line in card, line


def test_bench_train_smoke_prints_both_models_and_their_ratio(capsys, monkeypatch):
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("pldr_bench", Path(__file__).resolve().parents[1] / "scripts" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "pldr_bench", bench)  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(bench)
    res = bench.main(["--tiny", "--device", "cpu", "--steps", "1", "--warmup", "0", "--batch_size", "2",
                      "--seq_len", "32", "--metric_learner_cuda_graphs", "false"])
    printed = json.loads(capsys.readouterr().out)
    assert printed == res and res["metric_learner_cuda_graphs"] is False
    assert [r["model"] for r in res["runs"]] == ["pldr", "llama"]
    for r in res["runs"]:
        assert r["tokens_per_s"] > 0 and 0 < r["final_loss"] < 20
    assert res["pldr_vs_llama_throughput"] == pytest.approx(
        res["runs"][0]["tokens_per_s"] / res["runs"][1]["tokens_per_s"], abs=1e-3)
    with pytest.raises(SystemExit, match="unknown model"):
        bench.main(["--tiny", "--device", "cpu", "--models", "gpt2"])
