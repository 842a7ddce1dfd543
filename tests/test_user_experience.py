"""What a newcomer meets first: `pldr-hf --help` without heavy imports and with help for every option; one-line
errors with exit status 1 for bad inputs (truncated weights, no CUDA, corrupt config.json, empty training data) in
every command that takes them; decoded text that reads like the whole decode (pipeline, new tokens, streaming); a
tokenizer folder that needs no code of this package; a quiet G-only load; names that say what things do.

Tiny models saved to tmp_path, CPU, offline. Commands run in-process through their ``main`` (the exit status is its
return value) except two subprocesses that check what only a fresh interpreter shows.
"""

import importlib.util
import json
import logging
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pldr_hf  # noqa: F401
from pldr_hf import PldrConfig, PldrForCausalLM
from pldr_hf.cli import build_parser
from pldr_hf.cli import main as cli_main

REPO = Path(__file__).resolve().parents[1]
WORDS = ("the cat sat on a mat while dogs ran in green parks and birds sang over quiet rivers near old towns where "
         "people walked slowly talking about books music weather food and friends").split()
TINY = dict(hidden_size=16, num_attention_heads=2, head_dim=8, num_hidden_layers=2, intermediate_size=42, A_dff=12,
            num_reslayerA=2, num_denseA=2, max_position_embeddings=64)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A saved PLDR-LLM folder with its SentencePiece tokenizer, as the recipes write it."""
    from pldr_hf.tokenizer import train_tokenizer

    d = tmp_path_factory.mktemp("ux")
    rng = random.Random(0)
    corpus = d / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))) + "."
                                for _ in range(300)) + "\n")
    out = d / "model"
    tok = train_tokenizer([corpus], out, vocab_size=64)
    torch.manual_seed(0)
    PldrForCausalLM(PldrConfig(vocab_size=len(tok), **TINY)).save_pretrained(out)
    return out


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="module")
def truncated(folder, tmp_path_factory):
    d = _copy(folder, tmp_path_factory.mktemp("bad") / "truncated")
    f = d / "model.safetensors"
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size // 2)
    return d


@pytest.fixture(scope="module")
def corrupt(folder, tmp_path_factory):
    d = _copy(folder, tmp_path_factory.mktemp("bad") / "corrupt")
    (d / "config.json").write_text('{"model_type": "pldrllm", "hidden_size": 16,')  # cut short
    return d


def _one_line_error(capsys, prog: str, *names: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err
    for name in names:
        assert name in lines[0], (name, err)
    return lines[0]


def _commands(model_dir: Path, tmp: Path) -> dict:
    """Every pldr-hf command that reads a model folder, with the arguments it needs."""
    prompts = tmp / "prompts.txt"
    prompts.write_text("the cat sat\nbirds sang over quiet rivers\n")
    return {
        "eval": ["eval", str(model_dir), "--tasks", "pldr_pd_word_order", "--limit", "2", "--out", str(tmp / "r.json")],
        "inspect": ["inspect", str(model_dir), "--prompts", str(prompts), "--out", str(tmp / "report")],
        "export-g": ["export-g", str(model_dir), "--prompt", "the cat", "--out", str(tmp / "g.safetensors")],
        "push": ["push", str(model_dir), "--repo-id", "me/x", "--dry-run", str(tmp / "dry")],
        "convert": ["convert", "--from", "port", str(model_dir), "--out", str(tmp / "converted")],
    }


# ----------------------------------------------------------------------------------------------------------------------
# --help: fast, and every option explained
# ----------------------------------------------------------------------------------------------------------------------
def _subparsers(parser):
    import argparse

    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def test_every_command_and_option_has_help_and_an_example():
    parser = build_parser()
    commands = _subparsers(parser)
    assert list(commands)[0] == "quickstart"  # what a newcomer runs first comes first
    for name, sub in commands.items():
        assert "example" in (sub.epilog or ""), name
        for action in sub._actions:
            if action.dest != "help":
                assert action.help, f"pldr-hf {name}: {'/'.join(action.option_strings) or action.dest} has no help"


def test_quickstart_options_reach_the_run(monkeypatch):
    import pldr_hf.quickstart as quickstart

    got = {}
    monkeypatch.setattr(quickstart, "run_quickstart", lambda **kw: got.update(kw) or {"learned": True})
    assert cli_main(["quickstart", "--steps", "5", "--prompt", "Open a file", "--out", "somewhere"]) == 0
    assert got["prompt"] == "Open a file" and got["max_steps"] == 5 and got["out_dir"] == "somewhere"
    cli_main(["quickstart"])
    assert got["prompt"] is None and got["max_steps"] == 800  # (None: the corpus's own prompt)


HELP_THEN_REGISTER = r"""
import sys, time
from pldr_hf.cli import main
t = time.perf_counter()
for argv in (["--help"], ["quickstart", "--help"], ["eval", "--help"], ["inspect", "--help"], ["export-g", "--help"],
             ["push", "--help"], ["convert", "--help"], ["train-tokenizer", "--help"], ["lm-eval", "--help"]):
    try:
        main(argv)
    except SystemExit:
        pass
heavy = sorted(m for m in ("torch", "transformers", "lm_eval", "datasets", "safetensors") if m in sys.modules)
print("HEAVY", heavy, file=sys.stderr)
from transformers import AutoConfig, AutoModelForCausalLM   # importing transformers registers the model
cfg = AutoConfig.for_model("pldrllm", vocab_size=32, hidden_size=16, num_attention_heads=2, head_dim=8,
                           num_hidden_layers=1, intermediate_size=8, A_dff=8, num_reslayerA=1, num_denseA=1)
print("REGISTERED", type(AutoModelForCausalLM.from_config(cfg)).__name__, file=sys.stderr)
"""


def test_help_imports_nothing_heavy_and_transformers_then_finds_the_model():
    r = subprocess.run([sys.executable, "-c", HELP_THEN_REGISTER], capture_output=True, text=True, cwd=REPO,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "HEAVY []" in r.stderr, r.stderr[-3000:]
    assert "REGISTERED PldrForCausalLM" in r.stderr
    assert "usage: pldr-hf quickstart" in r.stdout and "usage: pldr-hf export-g" in r.stdout


# ----------------------------------------------------------------------------------------------------------------------
# Bad inputs: one line naming the file or option, exit status 1, in every command that takes them
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["eval", "inspect", "export-g", "push", "convert"])
def test_truncated_weights_one_line_error(command, truncated, tmp_path, capsys):
    assert cli_main(_commands(truncated, tmp_path)[command]) == 1
    line = _one_line_error(capsys, f"pldr-hf {command}", str(truncated / "model.safetensors"))
    assert "truncated" in line


@pytest.mark.parametrize("command", ["eval", "inspect", "export-g", "push", "convert"])
def test_corrupt_config_one_line_error(command, corrupt, tmp_path, capsys):
    assert cli_main(_commands(corrupt, tmp_path)[command]) == 1
    assert "not valid JSON" in _one_line_error(capsys, f"pldr-hf {command}", str(corrupt / "config.json"))


@pytest.mark.parametrize("command", ["eval", "inspect", "export-g", "lm-eval"])
@pytest.mark.parametrize("cuda_build", [False, True], ids=["cpu-torch", "no-visible-gpu"])
def test_device_cuda_without_cuda_one_line_error(command, cuda_build, folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "12.4" if cuda_build else None)
    commands = {**_commands(folder, tmp_path),
                "lm-eval": ["lm-eval", "--", "--model", "pldr", "--model_args", f"pretrained={folder}", "--tasks",
                            "pldr_pd_word_order"]}
    argv = commands[command] + ["--device", "cuda"]
    assert cli_main(argv) == 1
    line = _one_line_error(capsys, f"pldr-hf {command}", "--device cuda", "use --device cpu")
    assert ("no CUDA GPU is visible" if cuda_build else "no CUDA support") in line


@pytest.mark.parametrize("bad", ["truncated_shard", "missing_shard", "not_safetensors"])
def test_sharded_folder_errors_name_the_shard(bad, folder, tmp_path, capsys):
    # A folder saved in shards (save_pretrained(max_shard_size=...), as large models are): each shard the index names
    # is checked, and the error names the shard that is cut short, missing or not a safetensors file.
    model = PldrForCausalLM.from_pretrained(folder)
    d = tmp_path / "sharded"
    model.save_pretrained(d, max_shard_size="20KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (folder / name).is_file():
            (d / name).write_bytes((folder / name).read_bytes())
    shards = sorted(d.glob("model-*.safetensors"))
    assert len(shards) >= 2 and (d / "model.safetensors.index.json").is_file()
    assert cli_main(_commands(d, tmp_path)["inspect"]) == 0  # (whole: the command runs)
    capsys.readouterr()
    victim = shards[1]
    if bad == "truncated_shard":
        with open(victim, "r+b") as fh:
            fh.truncate(victim.stat().st_size - 10)
    elif bad == "missing_shard":
        victim.unlink()
    else:
        victim.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    assert cli_main(_commands(d, tmp_path)["inspect"]) == 1
    line = _one_line_error(capsys, "pldr-hf inspect", victim.name)
    assert {"truncated_shard": "truncated", "missing_shard": "missing",
            "not_safetensors": "not a safetensors file"}[bad] in line


def test_bad_input_exit_status_and_stderr_of_the_real_command(truncated):
    r = subprocess.run([sys.executable, "-m", "pldr_hf.cli", "inspect", str(truncated), "--prompts", __file__,
                        "--out", str(truncated.parent / "r")], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "truncated safetensors file" in r.stderr


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"pldr_script_{name}", REPO / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def empty_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("data") / "empty.txt"
    f.write_text("\n  \n")
    return f


@pytest.mark.parametrize("script", ["finetune", "pretrain"])
@pytest.mark.parametrize("bad", ["corrupt_config", "truncated_weights", "empty_train_file"])
def test_training_scripts_bad_input_one_line_error(script, bad, folder, corrupt, truncated, empty_file, tmp_path,
                                                   capsys):
    model_dir = {"corrupt_config": corrupt, "truncated_weights": truncated}.get(bad, folder)
    train = empty_file if bad == "empty_train_file" else folder.parent / "corpus.txt"
    argv = ["--model_name_or_path", str(model_dir), "--train_file", str(train), "--output_dir", str(tmp_path / "o"),
            "--use_cpu", "--max_steps", "1", "--report_to", "none"]
    assert _script(script).main(argv) == 1
    name = {"corrupt_config": str(corrupt / "config.json"), "truncated_weights": str(truncated / "model.safetensors"),
            "empty_train_file": str(empty_file)}[bad]
    line = _one_line_error(capsys, f"{script}.py", name)
    if bad == "empty_train_file":
        assert "--train_file" in line and "empty" in line
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


@pytest.mark.parametrize("script", ["finetune", "pretrain", "push_to_hub"])
def test_scripts_name_an_unknown_option_in_one_line(script, folder, tmp_path, capsys):
    argv = {"finetune": ["--model_name_or_path", str(folder), "--output_dir", str(tmp_path / "o")],
            "pretrain": ["--model_name_or_path", str(folder), "--output_dir", str(tmp_path / "o")],
            "push_to_hub": ["--model_dir", str(folder), "--repo_id", "me/x"]}[script]
    assert _script(script).main(argv + ["--warmup_stpes", "10"]) == 1  # (a misspelt --warmup_steps)
    _one_line_error(capsys, f"{script}.py", "--warmup_stpes")


def test_unreadable_corpus_names_the_cause(folder, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "the cat sat"\n')  # not JSON: datasets raises DatasetGenerationError
    argv = ["--preset", "tiny", "--tokenizer_name_or_path", str(folder), "--train_file", str(bad), "--output_dir",
            str(tmp_path / "o"), "--use_cpu", "--max_steps", "1", "--report_to", "none"]
    assert _script("pretrain").main(argv) == 1
    # datasets logs the file it failed on; the command ends with one line giving the cause
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("pretrain.py: error: DatasetGenerationError") and "JSON parse error" in last


# ----------------------------------------------------------------------------------------------------------------------
# Decoded text reads like the whole decode: pipeline, new tokens, streaming
# ----------------------------------------------------------------------------------------------------------------------
def _word_initial_ids(tok) -> list[int]:
    """Ids of the pieces that start a word ("▁cat"): a continuation made of them must be separated by spaces."""
    return [i for t, i in tok.get_vocab().items() if t.startswith("▁") and len(t) > 1 and i > 3]


def test_pipeline_new_tokens_and_streamer_read_like_the_full_decode(folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer, pipeline

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    words = _word_initial_ids(tok)
    gen = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, prefix_allowed_tokens_fn=lambda b, ids: words)
    prompt = "the cat sat on"
    enc = tok(prompt, return_tensors="pt", add_special_tokens=False)
    n = enc["input_ids"].shape[1]
    out = model.generate(**enc, **gen)
    full = tok.decode(out[0], skip_special_tokens=True)
    new = tok.decode(out[0, n:], skip_special_tokens=True)

    class Capture(TextStreamer):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.text = ""

        def on_finalized_text(self, text, stream_end=False):
            self.text += text

    streamer = Capture(tok, skip_prompt=True, skip_special_tokens=True)
    model.generate(**enc, streamer=streamer, **gen)
    piped = pipeline("text-generation", model=model, tokenizer=tok)(prompt, **gen)[0]["generated_text"]

    assert new.startswith(" ") and len(new.split()) == 6  # six words, each with its space
    assert full == tok.decode(out[0, :n], skip_special_tokens=True) + new  # parts decode like the whole
    assert full.strip() == prompt + new  # the whole reads like the prompt and its continuation
    assert piped == prompt + new  # pipeline: the prompt text + the decoded new tokens, not glued
    assert streamer.text == new  # streaming prints the same text


def test_decoding_in_parts_equals_decoding_at_once(folder):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    text = "birds sang over quiet rivers near old towns."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    whole = tok.decode(ids)
    assert whole.strip() == text
    for k in range(1, len(ids)):
        assert tok.decode(ids[:k]) + tok.decode(ids[k:]) == whole, k


def test_saved_tokenizer_needs_no_code_of_this_package(folder):
    from transformers import PreTrainedTokenizerFast

    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] in ("TokenizersBackend", "PreTrainedTokenizerFast") and "auto_map" not in cfg
    assert "model_max_length" not in cfg or cfg["model_max_length"] > 1e20  # a tokenizer on its own: no limit
    plain = PreTrainedTokenizerFast.from_pretrained(folder)  # the stock class, no remote code
    assert plain("the cat sat")["input_ids"] == pldr_hf_tokenizer(folder)("the cat sat")["input_ids"]
    assert (plain.pad_token_id, plain.unk_token_id, plain.bos_token_id, plain.eos_token_id) == (0, 1, 2, 3)
    # ...and the model card shows that way next to the remote-code model
    from pldr_hf.hub import CardOptions, build_model_card

    card = str(build_model_card(folder, CardOptions(repo_id="me/ux")))
    assert 'PreTrainedTokenizerFast.from_pretrained("me/ux")' in card


def pldr_hf_tokenizer(path):
    from pldr_hf.tokenizer import load_tokenizer

    return load_tokenizer(path)


# ----------------------------------------------------------------------------------------------------------------------
# G-only model: a correct load says nothing alarming
# ----------------------------------------------------------------------------------------------------------------------
class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_g_only_model_loads_quietly_and_matches_the_full_model(folder, tmp_path):
    from pldr_hf.deductive import export_g
    from pldr_hf.gfile import cache_with_g, load_g_file, load_g_only_model

    records = _Records()
    logging.getLogger("transformers").addHandler(records)
    try:
        rep = export_g(folder, "the cat sat on", tmp_path / "g.safetensors", bench_seq_len=16, repeats=1)
        g_only = load_g_only_model(folder, tmp_path / "g.safetensors")
    finally:
        logging.getLogger("transformers").removeHandler(records)
    assert not [m for m in records.messages if "LOAD REPORT" in m or "MISSING" in m or "UNEXPECTED" in m]
    assert rep["max_abs_logit_diff_vs_full_with_g_cache"] < 1e-5
    full = PldrForCausalLM.from_pretrained(folder).eval()
    g = load_g_file(tmp_path / "g.safetensors", full.config)
    x = torch.tensor([[5, 9, 7, 11, 6]])
    with torch.no_grad():
        want = full(input_ids=x, past_key_values=cache_with_g(full, g), use_cache=True).logits
        got = g_only(input_ids=x, use_cache=False).logits
    assert g_only.config.custom_G_type == "external" and (want - got).abs().max() < 1e-5
    assert sum(p.numel() for p in g_only.parameters()) == rep["parameters_g_only"]


def test_g_only_model_still_names_a_real_mismatch(folder, tmp_path):
    from safetensors.torch import load_file, save_file

    from pldr_hf.gfile import load_g_only_model

    d = _copy(folder, tmp_path / "extra")
    state = load_file(str(d / "model.safetensors"))
    state["decoder.extra.weight"] = torch.zeros(3)
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"unexpected \(1\): decoder.extra.weight"):
        load_g_only_model(d)


# ----------------------------------------------------------------------------------------------------------------------
# Names say what things do
# ----------------------------------------------------------------------------------------------------------------------
def test_nothing_outside_markdown_is_named_after_an_issue_number():
    pattern = re.compile(r"issue[-_ ]?[0-9]+", re.IGNORECASE)
    skip = {".git", "__pycache__", "runs", ".venv", "build", ".pytest_cache"}
    found = []
    for f in REPO.rglob("*"):
        rel = f.relative_to(REPO)
        if (not f.is_file() or f.suffix in (".md", ".pyc", ".safetensors", ".pth", ".pkl")
                or any(p in skip or p.startswith(".") or p.endswith(".egg-info") for p in rel.parts)):
            continue
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        found += [f"{rel}:{i}" for i, line in enumerate(text.splitlines(), 1) if pattern.search(line)]
    assert not found, found



_EXTERNAL_LOAD = """
import sys, torch
import pldr_hf
from pldr_hf import PldrConfig, PldrForCausalLM
cfg = PldrConfig(vocab_size=64, hidden_size=32, num_attention_heads=2, head_dim=16, num_hidden_layers=2,
                 intermediate_size=40, A_dff=20, num_reslayerA=2, num_denseA=2)
torch.manual_seed(0)
learned = PldrForCausalLM(cfg)
learned.save_pretrained(sys.argv[1])
print("LOADING", file=sys.stderr, flush=True)
model = PldrForCausalLM.from_pretrained(sys.argv[1], custom_G_type="external")
assert torch.equal(model.final_layer.weight, learned.final_layer.weight)
assert torch.equal(model.decoder.past_G_values[:, 2, 0], torch.eye(16).expand(2, 2, 16, 16))
"""


def test_from_pretrained_of_a_learned_folder_as_external_G_model_is_quiet(tmp_path):
    import os
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    r = subprocess.run([sys.executable, "-c", _EXTERNAL_LOAD, str(tmp_path / "m")], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    after = r.stderr.split("LOADING", 1)[1]
    assert "UNEXPECTED" not in after and "MISSING" not in after, after
