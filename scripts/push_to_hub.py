#!/usr/bin/env python
"""Publish a PLDR-LLM folder on the Hugging Face Hub (model card, remote code, weights, tokenizer).

Same work as ``pldr-hf push``, in the transformers ``run_*.py`` style::

    python scripts/push_to_hub.py --model_dir runs/tiny --repo_id me/pldr-tiny --dry_run out/
    python scripts/push_to_hub.py --model_dir runs/tiny --repo_id me/pldr-tiny --private --revision dev \
        --eval_results results.json --datasets tiiuae/falcon-refinedweb
"""

import sys
from dataclasses import dataclass, field

from transformers import HfArgumentParser

from pldr_hf.checks import report_error
from pldr_hf.hub import CardOptions, HubUploadError, push


@dataclass
class PushArguments:
    model_dir: str = field(metadata={"help": "saved PLDR-LLM folder (config.json + weights)"})
    repo_id: str = field(metadata={"help": "Hub repository, e.g. me/pldr-tiny"})
    private: bool = field(default=False, metadata={"help": "create the repository as private"})
    revision: str | None = field(default=None, metadata={"help": "branch to commit to (created if missing)"})
    commit_message: str | None = field(default=None, metadata={"help": "commit message"})
    dry_run: str | None = field(default=None, metadata={"help": "write the repository folder here and validate it"})
    token: str | None = field(default=None, metadata={"help": "Hub token (default: HF_TOKEN or stored login)"})
    endpoint: str | None = field(default=None, metadata={"help": "Hub endpoint (default: HF_ENDPOINT)"})


@dataclass
class CardArguments:
    license: str = field(default="apache-2.0", metadata={"help": "card license"})
    language: list[str] = field(default_factory=lambda: ["en"], metadata={"help": "card languages"})
    datasets: list[str] = field(default_factory=list, metadata={"help": "training dataset ids"})
    base_model: str | None = field(default=None, metadata={"help": "card base_model"})
    tags: list[str] = field(default_factory=list, metadata={"help": "extra card tags"})
    eval_results: str | None = field(default=None, metadata={"help": "lm-eval results JSON (model-index)"})
    model_name: str | None = field(default=None, metadata={"help": "name in the card"})


def main(argv=None) -> int:
    try:
        push_args, card_args = HfArgumentParser((PushArguments, CardArguments)).parse_args_into_dataclasses(argv)
    except ValueError as e:  # e.g. an unknown option (argparse's own errors exit with their message already)
        return report_error("push_to_hub.py", e)
    options = CardOptions(repo_id=push_args.repo_id, license=card_args.license, language=card_args.language,
                          datasets=card_args.datasets, base_model=card_args.base_model, tags=card_args.tags,
                          eval_results=card_args.eval_results, model_name=card_args.model_name)
    try:
        folder, report, info = push(push_args.model_dir, options, private=push_args.private,
                                    revision=push_args.revision, commit_message=push_args.commit_message,
                                    dry_run=push_args.dry_run, token=push_args.token, endpoint=push_args.endpoint)
    except HubUploadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if folder is not None:
        print(f"dry run: {folder} validated ({', '.join(report['files'])})")
    else:
        print(f"uploaded: {info.commit_url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
