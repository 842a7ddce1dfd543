#!/usr/bin/env python
"""Trained vs random: evaluates a trained PLDR-LLM folder and a randomly initialised model of the same config (and
tokenizer) on the offline tasks shipped with pldr-hf, and prints accuracies with their standard errors, the gap and
the gap in units of its standard error.

  pldr-hf quickstart --out runs/quickstart                      # a trained model (minutes on a CPU)
  python scripts/eval_demo.py --trained runs/quickstart --out runs/eval_demo
  python scripts/eval_demo.py --trained runs/quickstart --g-cache both   # also with the G-cache on

Writes OUT/random (the random model), OUT/trained.json and OUT/random.json (lm-eval results) and OUT/summary.json.
"""

import argparse
import json
import math
import sys
from pathlib import Path

import torch

import pldr_hf  # noqa: F401  (registers the model)
from pldr_hf import PldrForCausalLM
from pldr_hf.evaluation import OFFLINE_GROUP, run_offline_eval


def random_twin(trained_dir: Path, out_dir: Path, seed: int) -> Path:
    """A randomly initialised model with the trained folder's config, saved with its tokenizer."""
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(trained_dir)
    torch.manual_seed(seed)
    PldrForCausalLM(config).save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(trained_dir).save_pretrained(out_dir)
    return out_dir


def compare(trained: dict, random: dict) -> list[dict]:
    rows = []
    for task, metrics in sorted(trained["results"].items()):
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if not filt or metric.endswith("_stderr") or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            other = random["results"].get(task, {}).get(key)
            if not isinstance(other, (int, float)):
                continue
            se_t = metrics.get(f"{metric}_stderr,{filt}")
            se_r = random["results"][task].get(f"{metric}_stderr,{filt}")
            row = {"task": task, "metric": metric, "filter": filt, "random": other, "trained": value,
                   "gap": value - other}
            if isinstance(se_t, (int, float)) and isinstance(se_r, (int, float)):
                se = math.hypot(se_t, se_r)
                row.update(random_stderr=se_r, trained_stderr=se_t, gap_stderr=se, gap_in_stderr=row["gap"] / se)
            rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    def cell(v, se):
        return f"{v:.4g}" + (f" ± {se:.3f}" if se is not None else "")

    lines = ["| task | metric | random | trained | gap (± stderr) | gap / stderr |", "|---|---|---|---|---|---|"]
    for r in rows:
        metric = r["metric"] if r["filter"] == "none" else f"{r['metric']} ({r['filter']})"
        gap = cell(r["gap"], r.get("gap_stderr"))
        z = f"{r['gap_in_stderr']:.1f}" if "gap_in_stderr" in r else ""
        lines.append(f"| {r['task']} | {metric} | {cell(r['random'], r.get('random_stderr'))} | "
                     f"{cell(r['trained'], r.get('trained_stderr'))} | {gap} | {z} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trained", required=True, help="a trained model folder, e.g. runs/quickstart")
    ap.add_argument("--out", default="runs/eval_demo")
    ap.add_argument("--tasks", default=OFFLINE_GROUP)
    ap.add_argument("--g-cache", choices=["off", "on", "both"], default="off")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0, help="seed of the random model's initialisation")
    args = ap.parse_args(argv)
    trained_dir, out = Path(args.trained), Path(args.out)
    if not (trained_dir / "config.json").is_file():
        print(f"eval_demo.py: error: {trained_dir} is not a model folder (run `pldr-hf quickstart --out "
              f"{trained_dir}` first)", file=sys.stderr)
        return 2
    random_dir = random_twin(trained_dir, out / "random", args.seed)
    results = {}
    for name, folder in (("random", random_dir), ("trained", trained_dir)):
        results[name] = run_offline_eval(folder, tasks=args.tasks.split(","), out=out / f"{name}.json",
                                         batch_size=args.batch_size, device=args.device, limit=args.limit,
                                         g_cache=args.g_cache)
    rows = compare(results["trained"], results["random"])
    (out / "summary.json").write_text(json.dumps({"trained": str(trained_dir), "random_seed": args.seed,
                                                  "tasks": args.tasks, "g_cache": args.g_cache, "rows": rows}, indent=2))
    print(table(rows))
    print(f"wrote {out}/summary.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
