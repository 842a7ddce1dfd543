"""Builds the JSONL data of the offline lm-eval tasks (pldr_hf/tasks/pldr_offline/) from public-domain texts.

Sources (all public domain, United States government works / pre-1900 texts):
  * Abraham Lincoln, Gettysburg Address (1863, "Bliss copy").
  * Preamble and First Amendment of the Constitution of the United States (1787, 1791).
  * Declaration of Independence (1776), opening paragraphs.
  * Abraham Lincoln, Second Inaugural Address (1865), closing paragraph.

Tasks built from them:
  * pldr_pd_perplexity: loglikelihood_rolling over each paragraph (word/byte perplexity, bits per byte).
  * pldr_pd_word_order: zero-shot multiple choice, the sentence vs the same words in a shuffled order (like BLiMP).
  * pldr_pd_next_sentence: zero-shot multiple choice, which of 4 sentences follows the context sentence.

Run:  python scripts/make_offline_tasks.py   (deterministic; rewrites the JSONL files)
"""

import json
import random
import re
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "pldr_hf" / "tasks" / "pldr_offline"

TEXTS = {
    "gettysburg_address": [
        "Four score and seven years ago our fathers brought forth on this continent, a new nation, conceived in "
        "Liberty, and dedicated to the proposition that all men are created equal.",
        "Now we are engaged in a great civil war, testing whether that nation, or any nation so conceived and so "
        "dedicated, can long endure. We are met on a great battle-field of that war. We have come to dedicate a "
        "portion of that field, as a final resting place for those who here gave their lives that that nation might "
        "live. It is altogether fitting and proper that we should do this.",
        "But, in a larger sense, we can not dedicate -- we can not consecrate -- we can not hallow -- this ground. "
        "The brave men, living and dead, who struggled here, have consecrated it, far above our poor power to add or "
        "detract. The world will little note, nor long remember what we say here, but it can never forget what they "
        "did here. It is for us the living, rather, to be dedicated here to the unfinished work which they who "
        "fought here have thus far so nobly advanced. It is rather for us to be here dedicated to the great task "
        "remaining before us -- that from these honored dead we take increased devotion to that cause for which "
        "they gave the last full measure of devotion -- that we here highly resolve that these dead shall not have "
        "died in vain -- that this nation, under God, shall have a new birth of freedom -- and that government of "
        "the people, by the people, for the people, shall not perish from the earth.",
    ],
    "us_constitution": [
        "We the People of the United States, in Order to form a more perfect Union, establish Justice, insure "
        "domestic Tranquility, provide for the common defence, promote the general Welfare, and secure the Blessings "
        "of Liberty to ourselves and our Posterity, do ordain and establish this Constitution for the United States "
        "of America.",
        "Congress shall make no law respecting an establishment of religion, or prohibiting the free exercise "
        "thereof; or abridging the freedom of speech, or of the press; or the right of the people peaceably to "
        "assemble, and to petition the Government for a redress of grievances.",
    ],
    "declaration_of_independence": [
        "When in the Course of human events, it becomes necessary for one people to dissolve the political bands "
        "which have connected them with another, and to assume among the powers of the earth, the separate and "
        "equal station to which the Laws of Nature and of Nature's God entitle them, a decent respect to the "
        "opinions of mankind requires that they should declare the causes which impel them to the separation.",
        "We hold these truths to be self-evident, that all men are created equal, that they are endowed by their "
        "Creator with certain unalienable Rights, that among these are Life, Liberty and the pursuit of Happiness. "
        "That to secure these rights, Governments are instituted among Men, deriving their just powers from the "
        "consent of the governed. That whenever any Form of Government becomes destructive of these ends, it is the "
        "Right of the People to alter or to abolish it, and to institute new Government, laying its foundation on "
        "such principles and organizing its powers in such form, as to them shall seem most likely to effect their "
        "Safety and Happiness. Prudence, indeed, will dictate that Governments long established should not be "
        "changed for light and transient causes; and accordingly all experience hath shewn, that mankind are more "
        "disposed to suffer, while evils are sufferable, than to right themselves by abolishing the forms to which "
        "they are accustomed.",
    ],
    "second_inaugural_address": [
        "With malice toward none, with charity for all, with firmness in the right as God gives us to see the right, "
        "let us strive on to finish the work we are in, to bind up the nation's wounds, to care for him who shall "
        "have borne the battle and for his widow and his orphan, to do all which may achieve and cherish a just and "
        "lasting peace among ourselves and with all nations.",
    ],
}


def sentences(paragraph: str) -> list[str]:
    parts = re.split(r"(?<=[.;])\s+(?=[A-Z])", paragraph)
    return [p.strip() for p in parts if len(p.split()) >= 6]


def main():
    rng = random.Random(1863)
    OUT.mkdir(parents=True, exist_ok=True)
    ppl, order, nxt = [], [], []
    all_sents = [(src, s) for src, paras in TEXTS.items() for p in paras for s in sentences(p)]
    for src, paras in TEXTS.items():
        for i, p in enumerate(paras):
            ppl.append({"source": src, "paragraph": i, "text": p})
    for src, s in all_sents:
        words = s.split()
        bad = words[:]
        while bad == words:
            rng.shuffle(bad)
        order.append({"source": src, "sentence_good": s, "sentence_bad": " ".join(bad)})
    for k in range(len(all_sents) - 1):
        src, ctx = all_sents[k]
        src2, gold = all_sents[k + 1]
        if src2 != src:
            continue
        others = [s for j, (_, s) in enumerate(all_sents) if j not in (k, k + 1)]
        choices = rng.sample(others, 3) + [gold]
        rng.shuffle(choices)
        nxt.append({"source": src, "context": ctx, "choices": choices, "label": choices.index(gold)})
    for name, rows in (("perplexity", ppl), ("word_order", order), ("next_sentence", nxt)):
        with open(OUT / f"{name}.jsonl", "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        print(name, len(rows))


if __name__ == "__main__":
    main()
