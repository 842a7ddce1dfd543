"""Training recipe (optimiser, schedule, clipping by value, packing), DAG regulariser, resume, LoRA, tokenizer and
quickstart (tiny, CPU, offline, seeded)."""

import json
import math
import random
from pathlib import Path

import pytest
import torch

import pldr_hf  # noqa: F401
from pldr_hf.tokenizer import SPECIAL_IDS, train_tokenizer, wrap_sentencepiece
from pldr_hf.training import (
    DAG_PRESETS,
    DataArguments,
    ModelArguments,
    PldrTrainingArguments,
    dag_divergence,
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
    assert last < first - 0.4, losses
    after = trainer.evaluate()["eval_loss"]
    assert after < trainer.eval_before - 0.4
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
    assert a.lr_scheduler_type == "cosine_with_min_lr" and a.lr_scheduler_kwargs == {"min_lr_rate": 0.1}
    assert a.clip_grad_value == 1.0 and a.max_grad_norm == 0.0  # the original clips by value, not by norm
    # the run records its recipe beside the weights (the model card reads it)
    record = json.loads((tmp_path / "run" / "training_args.json").read_text())
    assert record["clip_grad_value"] == 1.0 and record["max_grad_norm"] == 0.0 and record["block_size"] == 32
    assert record["document_masking"] is False and record["dag_coeffs"] is None and "EOS" in record["packing"]
    from pldr_hf.hub import CardOptions, build_model_card

    card = build_model_card(tmp_path / "run", CardOptions()).text
    assert "gradient clipping: by value, each element to [-1.0, 1.0]" in card
    assert "then cosine_with_min_lr down to 0.1 x the peak" in card and "blocks of 32 tokens" in card


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


def test_dag_divergence_closed_forms():
    import math

    # diagonal M: exp(M*M) is diagonal, tr = sum_i exp(m_ii^2), so DL = |log(sum exp(m_ii^2) / d)|
    diag = torch.tensor([0.5, 1.0, 2.0, 10.0])  # 10^2 = 100: exp(100) overflows float32, DL must not
    want = abs(math.log(sum(math.exp(x * x) for x in diag.tolist()) / 4))
    assert dag_divergence(torch.diag(diag)).item() == pytest.approx(want, rel=1e-5)
    # t * identity: tr = d exp(t^2), DL = t^2
    assert dag_divergence(0.3 * torch.eye(5)).item() == pytest.approx(0.09, rel=1e-5)
    # strictly triangular M: M*M is nilpotent, tr(exp(M*M)) = d, DL = 0 (a DAG), also with large entries
    g = torch.Generator().manual_seed(0)
    tri = torch.triu(torch.randn(3, 6, 6, generator=g) * 30, diagonal=1)
    assert torch.equal(dag_divergence(tri), torch.zeros(3))
    # a 3-cycle with unit weights: tr(exp(P)) = 3 * sum_{k = 0 mod 3} 1/k!
    cyc = torch.zeros(3, 3)
    cyc[0, 1] = cyc[1, 2] = cyc[2, 0] = 1.0
    want = math.log(sum(1 / math.factorial(k) for k in range(0, 30, 3)))
    assert dag_divergence(cyc).item() == pytest.approx(want, rel=1e-5)
    # all-ones 64 x 64 (an A_P at initialisation): tr(exp(J)) = 63 + e^64, DL = log((63 + e^64) / 64)
    assert dag_divergence(torch.ones(64, 64)).item() == pytest.approx(math.log((63 + math.exp(64)) / 64), rel=1e-6)
    # batched, against the plain float64 formula; values and gradients
    M = (torch.randn(20, 8, 8, generator=g, dtype=torch.float64) * torch.rand(20, 1, 1, generator=g, dtype=torch.float64)
         * 3).requires_grad_()
    ref = (torch.log(torch.linalg.matrix_exp(M * M).diagonal(dim1=-2, dim2=-1).sum(-1) / 8)).abs()
    Mf = M.detach().float().requires_grad_()
    got = dag_divergence(Mf)
    assert got.dtype == torch.float32 and torch.allclose(got.double(), ref, rtol=1e-5, atol=1e-6)
    ref.sum().backward()
    got.sum().backward()
    assert torch.allclose(Mf.grad.double(), M.grad, rtol=1e-4, atol=1e-5 * M.grad.abs().max().item())
    with pytest.raises(ValueError, match="square"):
        dag_divergence(torch.ones(3, 4))


def test_dag_loss_terms_and_gradient_reach_the_metric_learner():
    from pldr_hf import PldrConfig, PldrForCausalLM

    torch.manual_seed(0)
    cfg = PldrConfig(vocab_size=64, hidden_size=16, num_attention_heads=2, head_dim=8, num_hidden_layers=2,
                     intermediate_size=42, A_dff=12, num_reslayerA=2, num_denseA=2, max_position_embeddings=64)
    model = PldrForCausalLM(cfg).train()
    x = torch.randint(4, 64, (3, 16))
    out = model(x, use_cache=False, output_pldr_attentions=True)
    coeffs = (0.001, 0.005, 0.005)
    value, terms = dag_loss(out.pldr_attentions, coeffs)
    assert set(terms) == {"A_LM", "A_P", "G_LM"}
    # each term: mean over layers x batch x heads of DL; A_P is A_LM ** P (the power), not the exponents P
    layers = out.pldr_attentions
    want = {
        "A_LM": torch.stack([dag_divergence(d.A_LM) for d in layers]).mean(),
        "A_P": torch.stack([dag_divergence(d.A_LM ** d.power_exponents) for d in layers]).mean(),
        "G_LM": torch.stack([dag_divergence(d.G_LM) for d in layers]).mean(),
    }
    for k in want:
        assert terms[k].item() == pytest.approx(want[k].item(), rel=1e-5), k
    assert terms["A_P"].item() != pytest.approx(torch.stack([dag_divergence(d.power_exponents) for d in layers]).mean().item())
    assert value.item() == pytest.approx(sum(c * want[k].item() for c, k in zip(coeffs, ("A_LM", "A_P", "G_LM"))), rel=1e-5)
    # the gradient of the DAG loss alone reaches the metric learner, W, b, the exponents and the couplings
    model.zero_grad()
    value.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    learner = model.decoder.dec_layers[0].mha1.reslayerAs
    for part in ("reslayerAs.glu_weights", "reslayerAs.biases_and_layernorms", "plgatt_layer.power_params",
                 "mha1.wq.weight"):
        name = next(n for n in grads if n.endswith(part) and "dec_layers.0." in n)
        assert grads[name] is not None and grads[name].abs().sum() > 0, name
    # (by kind: the learner's W1|W2 and LayerNorm weights; W, b, the exponents and the couplings a and ba)
    kinds = learner.layout.unpack_pair(learner.glu_weights.grad, learner.biases_and_layernorms.grad)
    power = model.decoder.dec_layers[0].mha1.plgatt_layer.power_params.grad
    for g in (kinds[0], kinds[4], *power):
        assert g.abs().sum() > 0
    assert DAG_PRESETS == {"paper": (0.001, 0.005, 0.005), "v510_dag": (0.05, 0.05, 0.05)}


def test_dag_regularised_run_logs_three_terms_and_they_fall(corpus, tok_dir, tmp_path):
    import statistics

    data = DataArguments(train_file=[str(corpus)], block_size=32)
    dag = pretrain(_model_args(tok_dir), data, _args(tmp_path / "dag", 30, dag_preset="v510_dag"))
    assert dag.args.dag_coeffs == [0.05, 0.05, 0.05]
    free = pretrain(_model_args(tok_dir), data, _args(tmp_path / "free", 30, log_dag=True))  # logged, not in the loss
    terms = ("dag_A_LM", "dag_A_P", "dag_G_LM")
    for trainer, coeffs in ((dag, (0.05,) * 3), (free, (0.0,) * 3)):
        logs = [h for h in trainer.state.log_history if "loss" in h]
        assert len(logs) == 30 and all(set(terms) | {"lm_loss"} <= set(h) for h in logs)
        for h in logs:  # lm_loss is the cross-entropy: the logged loss less the weighted DAG terms
            assert h["lm_loss"] == pytest.approx(h["loss"] - sum(c * h[t] for c, t in zip(coeffs, terms)), abs=1e-3)
    logs = {name: [h for h in t.state.log_history if "loss" in h] for name, t in (("dag", dag), ("free", free))}
    for t in terms:
        first = statistics.median(h[t] for h in logs["dag"][:5])
        last = statistics.median(h[t] for h in logs["dag"][-5:])
        free_last = statistics.median(h[t] for h in logs["free"][-5:])
        assert last < 0.8 * first, (t, first, last)
        if t != "dag_A_LM":  # (A_LM's term is the smallest, ~0.07 here: 30 steps leave it within the runs' noise)
            assert last < free_last, (t, last, free_last)  # lower than the same run without the regulariser
    # held-out evaluation reports the plain cross-entropy (no DAG term in eval_loss)
    assert "eval_loss" in dag.evaluate()


def test_dag_arguments(tmp_path):
    with pytest.raises(ValueError, match="--dag_weight was removed.*--dag_coeffs"):
        _args(tmp_path, 1, dag_weight=0.01)
    with pytest.raises(ValueError, match="unknown --dag_preset 'nope'"):
        _args(tmp_path, 1, dag_preset="nope")
    with pytest.raises(ValueError, match="not both"):
        _args(tmp_path, 1, dag_preset="paper", dag_coeffs=[0.1, 0.1, 0.1])
    with pytest.raises(ValueError, match="three non-negative"):
        _args(tmp_path, 1, dag_coeffs=[0.1, 0.1])
    assert _args(tmp_path, 1, dag_preset="paper").dag_coeffs == [0.001, 0.005, 0.005]
    assert _args(tmp_path, 1, dag_coeffs=[0.1, 0, 0.2]).dag_coeffs == [0.1, 0.0, 0.2]


def test_clipping_is_by_value_not_by_norm(corpus, tok_dir, tmp_path):
    from transformers import TrainerCallback

    seen = {}

    class SetAndRecordGrads(TrainerCallback):
        # User callbacks run before the recipe's clipping callback: set known gradients, then read what the
        # optimiser stepped with.
        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            g = torch.Generator().manual_seed(state.global_step)
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=g) * 3  # many elements beyond +-1
            seen["before"] = {n: p.grad.clone() for n, p in model.named_parameters()}

        def on_optimizer_step(self, args, state, control, model=None, **kw):
            seen["after"] = {n: p.grad.clone() for n, p in model.named_parameters()}

    pretrain(_model_args(tok_dir), DataArguments(train_file=[str(corpus)], block_size=32), _args(tmp_path / "v", 1),
             callbacks=[SetAndRecordGrads()])
    before, after = seen["before"], seen["after"]
    n_big = sum(int((g.abs() > 1).sum()) for g in before.values())
    assert n_big > 100
    for n, g in before.items():
        assert torch.equal(after[n], g.clamp(-1.0, 1.0)), n  # elementwise: >1 -> 1, <-1 -> -1, the rest untouched
    small = torch.cat([g[g.abs() <= 1] for g in before.values()])
    assert torch.equal(small, torch.cat([after[n][g.abs() <= 1] for n, g in before.items()]))  # no norm rescaling
    # norm clipping instead, and both at once
    assert _args(tmp_path, 1, max_grad_norm=1.0).clip_grad_value == 0.0
    with pytest.raises(ValueError, match="not both"):
        _args(tmp_path, 1, max_grad_norm=1.0, clip_grad_value=1.0)


def test_optimizer_and_schedule_warm_up_then_cosine_to_a_tenth(corpus, tok_dir, tmp_path):
    import math

    from pldr_hf.training import PldrTrainer, build_model_and_tokenizer

    model, _ = build_model_and_tokenizer(_model_args(tok_dir))
    args = _args(tmp_path, 100, learning_rate=1e-3, warmup_steps=10)
    trainer = PldrTrainer(model=model, args=args)
    trainer.create_optimizer_and_scheduler(num_training_steps=100)
    opt = trainer.optimizer
    assert isinstance(opt, torch.optim.AdamW)
    assert {g["betas"] for g in opt.param_groups} == {(0.9, 0.95)} and {g["eps"] for g in opt.param_groups} == {1e-5}
    assert {g["weight_decay"] for g in opt.param_groups} == {0.0, 0.1}  # biases and norms are not decayed
    lrs = []
    for _ in range(101):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        trainer.lr_scheduler.step()
    assert lrs[0] == 0.0 and lrs[5] == pytest.approx(0.5e-3) and lrs[10] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # decays monotonically after the warm-up
    assert lrs[100] == pytest.approx(0.1 * 1e-3, rel=1e-6)  # ends at min_lr_rate x peak
    mid = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 45 / 90))  # cosine between the peak and the floor
    assert lrs[55] == pytest.approx(1e-3 * mid, rel=1e-6)


def test_pretrain_script_preset_defaults(tmp_path):
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("pldr_pretrain", Path(__file__).resolve().parents[1] / "scripts" / "pretrain.py")
    script = importlib.util.module_from_spec(spec)
    sys.modules["pldr_pretrain"] = script
    spec.loader.exec_module(script)
    base = ["--tokenizer_name_or_path", "t", "--train_file", "x.txt", "--output_dir", str(tmp_path), "--use_cpu"]
    _, _, args, _ = script.parse(["--preset", "pldr-110m", *base, "--dag_preset", "v510_dag"])
    assert (args.learning_rate, args.warmup_steps, args.clip_grad_value, args.max_grad_norm) == (1e-3, 2000, 1.0, 0.0)
    assert args.dag_coeffs == [0.05, 0.05, 0.05] and args.lr_scheduler_kwargs == {"min_lr_rate": 0.1}
    _, data, args, _ = script.parse(["--preset", "pldr-110m", *base, "--warmup_steps", "4000", "--document_masking"])
    assert args.warmup_steps == 4000 and data.document_masking
    _, _, args, _ = script.parse(["--preset", "tiny", *base])
    assert args.warmup_steps == 0.05


def test_packing_plain_and_document_masked():
    import datasets

    from pldr_hf.data import pack_corpus

    class WordTok:  # one token per word, ids >= 4; eos 3
        eos_token_id = 3

        def __call__(self, texts, add_special_tokens=False):
            return {"input_ids": [[4 + sum(map(ord, w)) % 50 for w in t.split()] for t in texts]}

    rng = random.Random(1)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 23))) for _ in range(300)]
    raw = datasets.DatasetDict({s: datasets.Dataset.from_dict({"text": docs}) for s in ("train", "validation")})
    stream = [t for d in WordTok()(docs)["input_ids"] for t in d + [3]]  # documents joined with EOS
    for block in (7, 64):
        plain = pack_corpus(raw, WordTok(), block)["train"]
        masked = pack_corpus(raw, WordTok(), block, document_masking=True)["train"]
        n = len(stream) // block
        assert plain.column_names == ["input_ids", "labels"] and len(plain) == n  # only the final remainder dropped
        assert plain["input_ids"] == [stream[i * block:(i + 1) * block] for i in range(n)] == plain["labels"]
        assert masked["input_ids"] == plain["input_ids"] and masked["labels"] == plain["labels"]
        for ids, pos in zip(masked["input_ids"], masked["position_ids"]):
            assert len(ids) == len(pos) == block and pos[0] == 0
            for j in range(1, block):  # restart exactly after each EOS, count up otherwise
                assert pos[j] == (0 if ids[j - 1] == 3 else pos[j - 1] + 1), (j, ids, pos)
    # the collator the recipe uses stacks them, with no attention mask
    from transformers import default_data_collator

    batch = default_data_collator([masked[0], masked[1]])
    assert set(batch) == {"input_ids", "labels", "position_ids"} and batch["position_ids"].shape == (2, 64)


def test_corpus_from_a_saved_dataset_folder_and_its_errors(tmp_path):
    # --dataset_name may name a folder written by save_to_disk (a Dataset or a DatasetDict), offline: its rows come
    # back in order, the last 10% held out without a validation split; a wrong column or split is named.
    import datasets

    from pldr_hf.data import load_corpus

    texts = [f"document number {i}" for i in range(40)]
    datasets.Dataset.from_dict({"text": texts, "other": list(range(40))}).save_to_disk(tmp_path / "ds")
    raw = load_corpus(dataset_name=str(tmp_path / "ds"), validation_split_percentage=10)
    assert raw["train"]["text"] == texts[:36] and raw["validation"]["text"] == texts[36:]
    both = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"body": texts[:5]}),
                                 "validation": datasets.Dataset.from_dict({"body": texts[5:7]})})
    both.save_to_disk(tmp_path / "dd")
    raw = load_corpus(dataset_name=str(tmp_path / "dd"), text_column="body")
    assert raw["train"]["body"] == texts[:5] and raw["validation"]["body"] == texts[5:7]
    with pytest.raises(ValueError, match="no column 'text'.*body.*--text_column"):
        load_corpus(dataset_name=str(tmp_path / "dd"))
    datasets.DatasetDict({"test": datasets.Dataset.from_dict({"text": texts})}).save_to_disk(tmp_path / "t")
    with pytest.raises(ValueError, match="no 'train' split.*test"):
        load_corpus(dataset_name=str(tmp_path / "t"))
    with pytest.raises(ValueError, match="only 1 rows"):
        datasets.Dataset.from_dict({"text": ["one"]}).save_to_disk(tmp_path / "one")
        load_corpus(dataset_name=str(tmp_path / "one"))
    with pytest.raises(ValueError, match="exactly one corpus"):
        load_corpus(train_files=[str(tmp_path / "x.txt")], dataset_name=str(tmp_path / "ds"))


def test_document_masked_pretraining_runs(corpus, tok_dir, tmp_path):
    trainer = pretrain(_model_args(tok_dir), DataArguments(train_file=[str(corpus)], block_size=32,
                                                          document_masking=True), _args(tmp_path / "dm", 3))
    assert "position_ids" in trainer.train_dataset.column_names
    assert all(h["loss"] > 0 for h in trainer.state.log_history if "loss" in h)
    assert json.loads((tmp_path / "dm" / "training_args.json").read_text())["document_masking"] is True


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
    base = ["--tokenizer_name_or_path", str(tok_dir), "--train_file", str(tmp_path / "x.txt"), "--output_dir",
            str(tmp_path / "o"), "--use_cpu"]
    for extra, message in ((["--preset", "nope"], "unknown preset 'nope'"),
                           (["--preset", "tiny", "--dag_weight", "0.01"], "--dag_weight was removed"),
                           (["--preset", "tiny", "--max_grad_norm", "1", "--clip_grad_value", "1"], "not both")):
        r = subprocess.run([sys.executable, "scripts/pretrain.py", *extra, *base], capture_output=True, text=True,
                           cwd=repo, env=env)
        assert r.returncode == 1 and message in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


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
    for n, p in peft_model.get_base_model().state_dict().items():  # (the checkpoint's names)
        if "lora_" not in n:
            key = n.replace(".base_layer", "")
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


def test_trl_sft_padding_free_equals_padded(corpus, tok_dir, tmp_path):
    # TRL's SFTTrainer, the usual fine-tuning path: padding_free=True flattens each batch into one row with position
    # ids, cu_seq_lens and seq_idx. Each document keeps its own A and attends to itself alone, so the first logged loss
    # (the initial weights) equals the padded batch's; a leak between documents would change it.
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoTokenizer

    from pldr_hf import PldrConfig, PldrForCausalLM

    texts = corpus.read_text().splitlines()[:16]
    tok = AutoTokenizer.from_pretrained(tok_dir)
    config = dict(vocab_size=len(tok), hidden_size=16, num_attention_heads=2, head_dim=8, num_hidden_layers=2,
                  intermediate_size=42, A_dff=12, num_reslayerA=2, num_denseA=2, max_position_embeddings=64)
    losses = {}
    for padding_free in (False, True):
        torch.manual_seed(0)
        model = PldrForCausalLM(PldrConfig(**config))
        args = trl.SFTConfig(output_dir=str(tmp_path / str(padding_free)), per_device_train_batch_size=4, max_steps=3,
                             learning_rate=1e-3, logging_steps=1, save_strategy="no", use_cpu=True, seed=0,
                             data_seed=0, report_to="none", disable_tqdm=True, max_length=None,
                             padding_free=padding_free)
        trainer = trl.SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"text": texts}),
                                 processing_class=tok)
        batch = next(iter(trainer.get_train_dataloader()))
        assert ("position_ids" in batch and "attention_mask" not in batch) == padding_free
        trainer.train()
        losses[padding_free] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses[True]) == 3 and all(math.isfinite(x) for x in losses[True])
    assert losses[True][0] == pytest.approx(losses[False][0], abs=1e-4)


def test_trl_dpo_scores_each_pair_as_alone(corpus, tok_dir, tmp_path):
    # TRL's DPOTrainer scores chosen and rejected completions in one right-padded batch. Its logged log-probabilities
    # (the batch mean of each completion's summed token log-probabilities) must be those of every prompt + completion
    # scored alone: the padding of the batch excluded from each row's A. With the policy equal to the reference, the
    # first loss is ln 2.
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoTokenizer

    from pldr_hf import PldrConfig, PldrForCausalLM

    lines = corpus.read_text().split()
    rng = random.Random(0)

    def words(lo, hi):
        return " ".join(rng.choice(lines) for _ in range(rng.randint(lo, hi)))

    rows = [{"prompt": words(2, 6), "chosen": " " + words(1, 5), "rejected": " " + words(1, 5)} for _ in range(8)]
    tok = AutoTokenizer.from_pretrained(tok_dir)
    config = dict(vocab_size=len(tok), hidden_size=16, num_attention_heads=2, head_dim=8, num_hidden_layers=2,
                  intermediate_size=42, A_dff=12, num_reslayerA=2, num_denseA=2, max_position_embeddings=64)

    def build():
        torch.manual_seed(0)
        return PldrForCausalLM(PldrConfig(**config))

    args = trl.DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=len(rows), max_steps=1,
                         learning_rate=1e-3, logging_steps=1, save_strategy="no", use_cpu=True, report_to="none",
                         disable_tqdm=True, bf16=False)  # (TRL's default: bfloat16 autocast, on a CPU too)
    trainer = trl.DPOTrainer(model=build(), ref_model=build(), args=args, train_dataset=Dataset.from_list(rows),
                             processing_class=tok)
    lengths = {len(r["prompt_ids"]) + len(r["chosen_ids"]) for r in trainer.train_dataset}
    assert len(lengths) > 2  # (rows of several lengths: the batch is padded)
    alone = build().eval()

    def completion_logp(prompt_ids, completion_ids):
        # (the whole sequence is the input, as in the batch: A sums over every position of it, the last one too)
        ids = torch.tensor([prompt_ids + completion_ids])
        with torch.no_grad():
            logp = torch.log_softmax(alone(ids).logits[0].float(), -1)
        return sum(logp[len(prompt_ids) - 1 + j, t].item() for j, t in enumerate(completion_ids))

    want = {kind: sum(completion_logp(r["prompt_ids"], r[f"{kind}_ids"]) for r in trainer.train_dataset) / len(rows)
            for kind in ("chosen", "rejected")}
    trainer.train()
    first = trainer.state.log_history[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["logps/chosen"] == pytest.approx(want["chosen"], abs=1e-4)
    assert first["logps/rejected"] == pytest.approx(want["rejected"], abs=1e-4)


def test_quickstart_small_learns(tmp_path):
    from pldr_hf.quickstart import run_quickstart

    r = run_quickstart(out_dir=str(tmp_path / "qs"), max_steps=40, vocab_size=300, block_size=64, batch_size=8,
                       max_chars=150_000, new_tokens=24, log=lambda *a: None)
    assert r["perplexity_after"] < r["perplexity_before"] / 3
    assert r["perplexity_after"] < r["unigram_perplexity"] and r["learned"]
    assert r["g_cache_same_tokens"]
    # the demo continuation (prompt + 24 tokens) repeats no 3-gram of tokens: plain greedy decoding of a model this
    # small loops over a phrase
    ids = r["generation_token_ids"]
    grams = [tuple(ids[i:i + 3]) for i in range(len(ids) - 2)]
    assert r["generation_settings"] == {"no_repeat_ngram_size": 3, "repetition_penalty": 1.2}
    assert len(ids) > 24 and len(set(grams)) == len(grams)
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



_FSDP2_SCRIPT = r'''
import json, os, sys, tempfile
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from pldr_hf import PldrConfig, PldrForCausalLM

dist.init_process_group("gloo", rank=0, world_size=1)
cfg = PldrConfig(vocab_size=64, hidden_size=32, num_attention_heads=2, head_dim=16, num_hidden_layers=2,
                 intermediate_size=40, A_dff=20, num_reslayerA=2, num_denseA=2, max_position_embeddings=64,
                 glu_bias=True)
mesh = init_device_mesh("cpu", (1,))


def model(seed, shard=True):
    torch.manual_seed(seed)
    m = PldrForCausalLM(cfg).train()
    if shard:
        for layer in m.decoder.dec_layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(m, mesh=mesh)
    return m


def whole(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


ids = torch.randint(4, 64, (2, 12), generator=torch.Generator().manual_seed(0))
out = {}
sharded, plain = model(0), model(0, shard=False)
losses = [m(input_ids=ids, labels=ids).loss for m in (sharded, plain)]
for loss in losses:
    loss.backward()
out["loss"] = [loss.item() for loss in losses]
out["grad_err"] = max((whole(p.grad) - q.grad).abs().max().item()
                      for p, q in zip(sharded.parameters(), plain.parameters()))
out["sharded_types"] = sorted({type(p).__name__ for p in sharded.parameters()})
sd = sharded.state_dict()  # the port's names, whole tensors
out["state_dict_equal"] = set(sd) == set(plain.state_dict()) and all(
    torch.equal(whole(v), plain.state_dict()[k]) for k, v in sd.items())
folder = tempfile.mkdtemp()
dcp.save(get_model_state_dict(sharded), checkpoint_id=folder)  # (accelerate's save_state for FSDP2)
other = model(1)
state = get_model_state_dict(other)
dcp.load(state, checkpoint_id=folder)
set_model_state_dict(other, state)
out["sharded_round_trip"] = all(torch.equal(whole(v), plain.state_dict()[k]) for k, v in other.state_dict().items())
third = model(2)
set_model_state_dict(third, get_model_state_dict(plain, options=StateDictOptions(full_state_dict=True)),
                     options=StateDictOptions(full_state_dict=True))
out["full_round_trip"] = all(torch.equal(whole(v), plain.state_dict()[k]) for k, v in third.state_dict().items())
dist.destroy_process_group()
print("RESULT " + json.dumps(out))
'''


def test_fsdp2_one_process_trains_and_checkpoints_through_torch_distributed_checkpoint():
    # FSDP2 (fully_shard; one CPU process over gloo) shards the learner's and the power law's stored parameters as
    # any other: the same loss and gradients as the plain model; state_dict() gives the port's names, and
    # torch.distributed.checkpoint's save / load (what accelerate's save_state and load_state do) and its whole-state
    # loading give back every tensor exactly (before, loading raised: a plain tensor copied into a DTensor).
    import socket
    import subprocess
    import sys

    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**__import__("os").environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    r = subprocess.run([sys.executable, "-c", _FSDP2_SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line is not None, r.stdout[-2000:] + r.stderr[-4000:]
    out = json.loads(line[len("RESULT "):])
    assert out["loss"][0] == pytest.approx(out["loss"][1], abs=1e-6)
    assert out["grad_err"] <= 1e-6
    assert out["sharded_types"] == ["DTensor"]
    assert out["state_dict_equal"] and out["sharded_round_trip"] and out["full_round_trip"]
