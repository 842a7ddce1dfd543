"""``pldr-hf quickstart``: train a tokenizer and a tiny PLDR-LLM on real English text on a CPU in minutes, evaluate
held-out perplexity before and after, save a transformers folder, and generate with and without the G-cache.

The verdict is honest: the run fails (exit 1) unless the trained model's held-out perplexity beats the unigram
baseline of the same tokenizer (the perplexity of predicting every token from its training frequency alone, i.e. a
model that learned no context).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from pathlib import Path

from .corpus import load_english_corpus

# The demo continuation: greedy (deterministic, so the runs with and without the G-cache can be compared token for
# token), without the loops of repeated phrases that a model this small falls into under plain greedy decoding.
DEMO_DECODING = {"no_repeat_ngram_size": 3, "repetition_penalty": 1.2}


def unigram_perplexity(train_ids: list[list[int]], val_ids: list[list[int]], vocab_size: int) -> float:
    """Perplexity of the held-out tokens under add-one-smoothed unigram frequencies of the training tokens."""
    counts = Counter(t for block in train_ids for t in block)
    total = sum(counts.values()) + vocab_size
    nll, n = 0.0, 0
    for block in val_ids:
        for t in block[1:]:  # the LM predicts tokens 1..n-1 of each block
            nll -= math.log((counts.get(t, 0) + 1) / total)
            n += 1
    return math.exp(nll / n)


def progress_callback(log, losses: list, bars: bool = True):
    """The quickstart's Trainer callback: its step lines (also appended to ``losses``), and tqdm bars in between
    (training steps, held-out batches), so that the long stretches show that they move."""
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        def __init__(self):
            self.train_bar = self.eval_bar = None

        def _bar(self, **kw):
            if not bars:
                return None
            from tqdm.auto import tqdm

            return tqdm(leave=False, dynamic_ncols=True, **kw)

        def on_train_begin(self, args, state, control, **kw):
            self.train_bar = self._bar(total=state.max_steps, initial=state.global_step, desc="      training",
                                       unit="step")

        def on_step_end(self, args, state, control, **kw):
            if self.train_bar is not None:
                self.train_bar.update(state.global_step - self.train_bar.n)

        def on_train_end(self, args, state, control, **kw):
            if self.train_bar is not None:
                self.train_bar.close()
                self.train_bar = None

        def on_prediction_step(self, args, state, control, eval_dataloader=None, **kw):
            if self.eval_bar is None and eval_dataloader is not None:
                self.eval_bar = self._bar(total=len(eval_dataloader), desc="      held-out loss", unit="batch")
            if self.eval_bar is not None:
                self.eval_bar.update(1)

        def on_evaluate(self, args, state, control, **kw):
            if self.eval_bar is not None:
                self.eval_bar.close()
                self.eval_bar = None

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append((state.global_step, logs["loss"]))
                tps = logs.get("tokens_per_second")
                line = (f"      step {state.global_step:5d}  loss {logs['loss']:.4f}  "
                        f"lr {logs.get('learning_rate', 0):.2e}" + (f"  {tps:,.0f} tokens/s" if tps else ""))
                if self.train_bar is not None:
                    self.train_bar.clear()
                log(line)
                if self.train_bar is not None:
                    self.train_bar.refresh()

    return Progress()


def write_training_record(out: Path, args, trainer, corpus: dict, n_train: int, n_val: int, block_size: int) -> None:
    """Writes what a model card reports beside the weights: training_args.json (the hyperparameters, the block size
    and a description of the training data) and trainer_state.json (steps, losses)."""
    import json

    record = json.loads(args.to_json_string())
    record["block_size"] = block_size
    record["training_data"] = (
        f"{corpus['name']} ({corpus['licence']}): {n_train} documents for training, the last {n_val} held out; "
        "text that ships with CPython, read by pldr_hf.corpus (no download)")
    (out / "training_args.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    trainer.state.save_to_json(str(out / "trainer_state.json"))


def run_quickstart(out_dir: str = "runs/quickstart", max_steps: int = 800, vocab_size: int = 4000,
                   block_size: int = 128, batch_size: int = 16, learning_rate: float = 3e-3, max_chars: int | None = None,
                   preset: str = "tiny", config_overrides: str | None = None, prompt: str | None = None,
                   new_tokens: int = 40, seed: int = 42, log=None) -> dict:
    """Runs the whole quickstart; returns a dict of the measured numbers (also written to out_dir/quickstart.json).

    Progress bars (tqdm) run between the step lines unless ``log`` is given (then only ``log`` receives lines)."""
    import json

    import torch

    from .data import write_lines
    from .tokenizer import train_tokenizer
    from .training import DataArguments, ModelArguments, PldrTrainingArguments, perplexity, pretrain

    bars = log is None
    if log is None:
        def log(*a):
            print(*a, flush=True)
    t_start = time.perf_counter()
    out = Path(out_dir)
    work = out / "work"
    log("[1/5] reading the corpus: docstrings of the standard library + the language reference topics")
    corpus = load_english_corpus(max_chars=max_chars)
    docs = corpus["documents"]
    n_val = max(1, len(docs) // 20)
    train_docs, val_docs = docs[:-n_val], docs[-n_val:]
    train_file = write_lines(work / "train.txt", train_docs)
    val_file = write_lines(work / "validation.txt", val_docs)
    log(f"      {corpus['name']} ({corpus['licence']}), {sum(map(len, docs)) / 1e6:.2f}M characters, "
        f"{len(train_docs)} training / {len(val_docs)} held-out documents")

    tok_dir = work / "tokenizer"
    # No model_max_length here: the corpus documents are packed into blocks, their length is no concern of the model.
    tokenizer = train_tokenizer([train_file], tok_dir, vocab_size=vocab_size, kind="sentencepiece", seed=seed)
    log(f"[2/5] tokenizer: SentencePiece unigram, {len(tokenizer)} tokens (pad 0, unk 1, [START] 2, [END] 3)")

    model_args = ModelArguments(preset=preset, tokenizer_name_or_path=str(tok_dir), config_overrides=config_overrides)
    data_args = DataArguments(train_file=[str(train_file)], validation_file=[str(val_file)], block_size=block_size)
    args = PldrTrainingArguments(
        output_dir=str(work / "trainer"), max_steps=max_steps, per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=batch_size, learning_rate=learning_rate, warmup_steps=0.05, seed=seed,
        data_seed=seed, logging_steps=max(1, max_steps // 15), save_strategy="no", use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True, dataloader_num_workers=0, dataloader_pin_memory=torch.cuda.is_available(), report_to="none",
    )
    log(f"[3/5] training a '{preset}' PLDR-LLM for {max_steps} steps of {batch_size} x {block_size} tokens")
    losses = []
    trainer = pretrain(model_args, data_args, args, callbacks=[progress_callback(log, losses, bars)], eval_before=True,
                       quiet=True)
    before = trainer.eval_before
    after = trainer.evaluate()["eval_loss"]
    train_ids = trainer.train_dataset["input_ids"]
    val_ids = trainer.eval_dataset["input_ids"]
    uni = unigram_perplexity(train_ids, val_ids, len(tokenizer))
    ppl_before, ppl_after = perplexity(before), perplexity(after)
    log(f"[4/5] held-out perplexity: before {ppl_before:.1f}, after {ppl_after:.1f} "
        f"(unigram baseline {uni:.1f}, {len(val_ids)} blocks x {block_size} tokens)")

    model = trainer.model
    model.save_pretrained(out)
    tokenizer.model_max_length = model.config.max_position_embeddings  # the saved folder's tokenizer knows the context
    tokenizer.save_pretrained(out)
    write_training_record(out, args, trainer, corpus, len(train_docs), len(val_docs), block_size)

    model.eval()
    prompt = prompt or corpus["prompt"]
    enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(model.device)
    gens = {}
    for use_g in (True, False):
        with torch.no_grad():
            model.generate(**enc, max_new_tokens=4, do_sample=False, use_g_cache=use_g, **DEMO_DECODING)  # warm-up
            t0 = time.perf_counter()
            ids = model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                 use_g_cache=use_g, pad_token_id=tokenizer.pad_token_id, **DEMO_DECODING)
            dt = time.perf_counter() - t0
        text = tokenizer.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        gens[use_g] = (ids[0].tolist(), text, new_tokens / dt)
    same = gens[True][0] == gens[False][0]
    log(f"[5/5] greedy continuation of {prompt!r} (no repeated 3-grams, repetition penalty "
        f"{DEMO_DECODING['repetition_penalty']}):\n      {prompt}{gens[True][1]}")
    log(f"      with G-cache {gens[True][2]:.1f} tokens/s, without {gens[False][2]:.1f} tokens/s; "
        f"same tokens: {same}")
    wall = time.perf_counter() - t_start
    learned = ppl_after < uni and ppl_after < ppl_before
    result = {
        "corpus": corpus["name"], "licence": corpus["licence"], "steps": max_steps, "block_size": block_size,
        "batch_size": batch_size, "vocab_size": len(tokenizer), "parameters": sum(p.numel() for p in model.parameters()),
        "loss_curve": losses, "perplexity_before": ppl_before, "perplexity_after": ppl_after,
        "unigram_perplexity": uni, "generation": gens[True][1], "generation_settings": dict(DEMO_DECODING),
        "generation_token_ids": gens[True][0], "tokens_per_s_g_cache": gens[True][2],
        "tokens_per_s_no_g_cache": gens[False][2], "g_cache_same_tokens": same, "wall_s": wall, "learned": learned,
        "output_dir": str(out),
    }
    (out / "quickstart.json").write_text(json.dumps(result, indent=1))
    verdict = "the model learned" if learned else "FAILED: the model did not beat the unigram baseline"
    log(f"saved model + tokenizer to {out} ({wall:.0f} s in all); {verdict}")
    return result
