"""Evaluation demo: trains a tiny PLDR-LLM for a few minutes on CPU on Python standard-library docstrings
(PSF licence; English prose available offline), saves it with a BPE tokenizer, and saves a randomly initialised model of
the same size, so that `pldr-hf eval` / `pldr-hf inspect` can compare them.

  python scripts/eval_demo.py --out runs/demo --steps 300
"""

import argparse
import inspect
import pkgutil
import importlib
import time

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from pldr_hf import PldrConfig, PldrForCausalLM


def corpus():
    texts = []
    for m in sorted(pkgutil.iter_modules(), key=lambda m: m.name):
        if m.name.startswith("_") or m.name in ("antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo"):
            continue
        try:
            mod = importlib.import_module(m.name)
        except Exception:
            continue
        if not getattr(mod, "__file__", "") or "site-packages" in mod.__file__:
            continue
        for _, obj in inspect.getmembers(mod):
            doc = inspect.getdoc(obj)
            if doc and len(doc) > 200:
                texts.append(doc)
    return list(dict.fromkeys(texts))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/demo")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seq", type=int, default=128)
    args = ap.parse_args()
    torch.manual_seed(0)
    texts = corpus()
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=4096, special_tokens=["<pad>", "<unk>", "<s>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                     eos_token="</s>")
    ids = []
    for t in texts:
        ids += hf_tok(t, add_special_tokens=False)["input_ids"] + [3]
    data = torch.tensor(ids)
    print(f"corpus: {len(texts)} docstrings, {len(ids):,} tokens")
    cfg = PldrConfig(vocab_size=4096, hidden_size=128, num_attention_heads=4, head_dim=32, num_hidden_layers=3,
                     intermediate_size=341, A_dff=48, num_reslayerA=2, num_denseA=2, max_position_embeddings=256,
                     pad_token_id=0, bos_token_id=2, eos_token_id=3)
    rand = PldrForCausalLM(cfg)
    rand.save_pretrained(f"{args.out}/random")
    hf_tok.save_pretrained(f"{args.out}/random")
    torch.manual_seed(0)
    model = PldrForCausalLM(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=args.steps, pct_start=0.1)
    t0 = time.time()
    for step in range(args.steps):
        starts = torch.randint(0, len(data) - args.seq - 1, (16,))
        x = torch.stack([data[s:s + args.seq] for s in starts])
        loss = model(input_ids=x, labels=x, use_cache=False).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_value_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step} loss {loss.item():.3f} ({time.time() - t0:.0f}s)", flush=True)
    model.eval().save_pretrained(f"{args.out}/trained")
    hf_tok.save_pretrained(f"{args.out}/trained")


if __name__ == "__main__":
    main()
