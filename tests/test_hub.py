"""Hub packaging (model card, remote code, dry run, upload to a local stand-in Hub) and port-format import."""

import base64
import json
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import pldr_hf
from pldr_hf import PldrConfig, PldrForCausalLM
from pldr_hf.cli import main
from pldr_hf.hub import AUTO_MAP, CardOptions, HubUploadError, assemble, push, validate

TINY = dict(vocab_size=64, hidden_size=16, num_attention_heads=2, head_dim=8, num_hidden_layers=2,
            intermediate_size=42, A_dff=12, num_reslayerA=2, num_denseA=2, max_position_embeddings=128)
IDS = torch.tensor([[2, 17, 5, 33, 9, 41, 12, 60, 7, 3]])


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A trained-looking model folder: weights, trainer_state.json, training_args.json, tokenizer config."""
    d = tmp_path_factory.mktemp("run") / "tiny"
    torch.manual_seed(0)
    model = PldrForCausalLM(PldrConfig(**TINY)).eval()
    model.save_pretrained(d)
    (d / "trainer_state.json").write_text(json.dumps({
        "global_step": 120, "num_train_epochs": 1, "max_steps": 120, "train_batch_size": 8, "total_flos": 1.5e12,
        "log_history": [{"loss": 4.1, "step": 60}, {"loss": 3.2345678, "step": 120}, {"eval_loss": 3.5, "step": 120}],
    }))
    (d / "training_args.json").write_text(json.dumps({
        "learning_rate": 0.0003, "lr_scheduler_type": "cosine", "warmup_steps": 10, "weight_decay": 0.1,
        "adam_beta1": 0.9, "adam_beta2": 0.95, "seed": 42, "per_device_train_batch_size": 8, "max_steps": 120,
        "dataset_name": "tiiuae/falcon-refinedweb",
    }))
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                          "bos_token": "[START]"}))
    return d


@pytest.fixture(scope="module")
def lm_eval_json(tmp_path_factory):
    f = tmp_path_factory.mktemp("eval") / "results.json"
    f.write_text(json.dumps({
        "results": {
            "arc_easy": {"alias": "arc_easy", "acc,none": 0.4123, "acc_stderr,none": 0.01, "acc_norm,none": 0.39},
            "hellaswag": {"alias": "hellaswag", "acc,none": 0.2871, "acc_stderr,none": 0.004, "acc_norm,none": 0.301},
        },
        "n-shot": {"arc_easy": 0, "hellaswag": 0},
    }))
    return f


@pytest.fixture(scope="module")
def dry_run(run_dir, lm_eval_json, tmp_path_factory):
    out = tmp_path_factory.mktemp("dry") / "repo"
    rc = main(["push", str(run_dir), "--repo-id", "me/pldr-tiny", "--dry-run", str(out), "--eval-results",
               str(lm_eval_json), "--base-model", "fromthesky/PLDR-LLM-v51-110M-1", "--tag", "tiny"])
    assert rc == 0
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Dry run: folder contents and card
# ----------------------------------------------------------------------------------------------------------------------
def test_dry_run_folder_contents(dry_run, run_dir):
    names = {p.name for p in dry_run.iterdir()}
    assert names == {"README.md", "config.json", "model.safetensors", "configuration_pldr.py", "modeling_pldr.py",
                     "cache_pldr.py", "metric_learner.py", "packing.py", "deduction_graphs.py", "generation_config.json",
                     "tokenizer_config.json"}
    cfg = json.loads((dry_run / "config.json").read_text())
    assert cfg["auto_map"] == AUTO_MAP and len(AUTO_MAP) == 6
    assert cfg["model_type"] == "pldrllm" and cfg["architectures"] == ["PldrForCausalLM"]
    # remote code is the package's modeling/ source, byte for byte
    src = Path(pldr_hf.modeling.__file__).parent
    for name in ("configuration_pldr.py", "modeling_pldr.py", "cache_pldr.py", "metric_learner.py", "packing.py",
                 "deduction_graphs.py"):
        assert (dry_run / name).read_bytes() == (src / name).read_bytes()
    # weights are the run's weights
    a, b = load_file(str(dry_run / "model.safetensors")), load_file(str(run_dir / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    gen = json.loads((dry_run / "generation_config.json").read_text())
    assert gen["bos_token_id"] == 2 and gen["eos_token_id"] == 3


def test_card_metadata_and_body(dry_run):
    card = ModelCard.load(dry_run / "README.md")
    meta = card.data.to_dict()
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert meta["license"] == "apache-2.0" and meta["language"] == ["en"]
    assert meta["datasets"] == ["tiiuae/falcon-refinedweb"]  # read from training_args.json
    assert meta["base_model"] == "fromthesky/PLDR-LLM-v51-110M-1"
    assert {"pldr-llm", "custom_code", "tiny"} <= set(meta["tags"])
    results = {(r.dataset_type, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert results == {("arc_easy", "acc"): 0.4123, ("arc_easy", "acc_norm"): 0.39,
                       ("hellaswag", "acc"): 0.2871, ("hellaswag", "acc_norm"): 0.301}
    assert meta["model-index"][0]["name"] == "pldr-tiny"
    text = card.text
    assert 'from_pretrained("me/pldr-tiny", trust_remote_code=True)' in text and "import pldr_hf" in text
    assert "learning_rate: 0.0003" in text and "final_train_loss: 3.2346" in text and "global_step: 120" in text
    assert "| parameters | 12,616 |" in text and "| hellaswag | acc | 0.2871 |" in text


def test_card_template_is_package_data():
    from importlib import resources

    assert resources.files("pldr_hf.model_cards").joinpath("pldr_llm.md").is_file()


_HIDDEN_PLUGIN_LOAD = r"""
import sys, json
sys.modules["pldr_hf"] = None
try:
    import pldr_hf
    raise SystemExit("pldr_hf importable")
except ImportError:
    pass
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
ids = torch.tensor(json.loads(sys.argv[2]))
with torch.no_grad():
    logits = m(input_ids=ids, use_cache=False).logits
cls = AutoModelForSequenceClassification.from_pretrained(sys.argv[1], trust_remote_code=True, num_labels=3)
print(json.dumps({"module": type(m).__module__, "cls": type(cls).__name__, "logits": logits.tolist()}))
"""


def test_dry_run_folder_loads_with_trust_remote_code_without_plugin(dry_run, run_dir, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    proc = subprocess.run([sys.executable, "-c", _HIDDEN_PLUGIN_LOAD, str(dry_run), json.dumps(IDS.tolist())],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["module"].startswith("transformers_modules") and out["cls"] == "PldrForSequenceClassification"
    expected = _logits(PldrForCausalLM.from_pretrained(run_dir).eval())
    torch.testing.assert_close(torch.tensor(out["logits"]), expected, rtol=0, atol=1e-5)


def test_validate_rejects_broken_folders(dry_run, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(dry_run, bad)
    cfg = json.loads((bad / "config.json").read_text())
    del cfg["auto_map"]["AutoModelForTokenClassification"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="auto_map lacks AutoModelForTokenClassification"):
        validate(bad)
    (bad / "modeling_pldr.py").unlink()
    with pytest.raises(ValueError, match="modeling_pldr.py is missing"):
        validate(bad)
    with pytest.raises(FileExistsError, match="not empty"):
        assemble(dry_run, dry_run, CardOptions())


def test_push_errors_on_bad_eval_json(run_dir, tmp_path):
    f = tmp_path / "r.json"
    f.write_text(json.dumps({"config": {}}))
    with pytest.raises(ValueError, match="'results'"):
        push(run_dir, CardOptions(eval_results=str(f)), dry_run=tmp_path / "o")


# ----------------------------------------------------------------------------------------------------------------------
# Upload against a local stand-in Hub (huggingface_hub's real HTTP layer, endpoint on 127.0.0.1)
# ----------------------------------------------------------------------------------------------------------------------
class FakeHub:
    """A tiny Hub API on 127.0.0.1: repos/create, branch, validate-yaml, preupload, commit. Stops by itself."""

    def __init__(self, status: int = 200):
        self.status = status
        self.log, self.created, self.branches, self.commits = [], [], [], []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, code, obj):
                body = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                hub.log.append(("GET", self.path, self.headers.get("authorization")))
                self._send(404, {"error": "not found"})

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                path = self.path.split("?")[0]
                hub.log.append(("POST", path, self.headers.get("authorization")))
                if hub.status != 200:
                    return self._send(hub.status, {"error": "Invalid credentials" if hub.status == 401 else "Forbidden"})
                if path == "/api/repos/create":
                    payload = json.loads(body)
                    hub.created.append(payload)
                    return self._send(200, {"url": f"{hub.url}/{payload['organization']}/{payload['name']}"})
                if path == "/api/validate-yaml":
                    return self._send(200, {})
                if "/branch/" in path:
                    hub.branches.append(path.split("/branch/")[1])
                    return self._send(200, {})
                if "/preupload/" in path:
                    files = json.loads(body)["files"]
                    return self._send(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                                       "shouldIgnore": False} for f in files]})
                if "/commit/" in path:
                    lines = [json.loads(x) for x in body.decode().splitlines() if x.strip()]
                    header = next(x["value"] for x in lines if x["key"] == "header")
                    files = {x["value"]["path"]: base64.b64decode(x["value"]["content"])
                             for x in lines if x["key"] == "file"}
                    hub.commits.append({"revision": path.split("/commit/")[1], "header": header, "files": files,
                                        "repo": path.split("/api/models/")[1].split("/commit/")[0]})
                    return self._send(200, {"commitUrl": f"{hub.url}/me/pldr-tiny/commit/{'a' * 40}",
                                            "commitOid": "a" * 40})
                return self._send(404, {"error": f"unexpected {path}"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self):
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        self.timer = threading.Timer(120, self.server.shutdown)  # bounded even if a test hangs
        self.timer.daemon = True
        self.timer.start()
        return self

    def __exit__(self, *exc):
        self.timer.cancel()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def no_proxy(monkeypatch):
    for k in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


def test_upload_sends_files_and_metadata(run_dir, lm_eval_json, no_proxy, monkeypatch, capsys):
    with FakeHub() as hub:
        rc = main(["push", str(run_dir), "--repo-id", "me/pldr-tiny", "--private", "--revision", "dev",
                   "--commit-message", "first PLDR upload", "--token", "hf_test_token", "--endpoint", hub.url,
                   "--eval-results", str(lm_eval_json), "--no-check"])
    assert rc == 0, capsys.readouterr().err
    assert f"uploaded to {hub.url}/me/pldr-tiny/commit/" in capsys.readouterr().out
    assert hub.created == [{"name": "pldr-tiny", "organization": "me", "visibility": "private", "type": "model"}]
    assert hub.branches == ["dev"]
    assert all(auth == "Bearer hf_test_token" for _, _, auth in hub.log)
    (commit,) = hub.commits
    assert commit["repo"] == "me/pldr-tiny" and commit["revision"] == "dev"
    assert commit["header"]["summary"] == "first PLDR upload"
    files = commit["files"]
    assert set(files) == {"README.md", "config.json", "model.safetensors", "configuration_pldr.py",
                          "modeling_pldr.py", "cache_pldr.py", "metric_learner.py", "packing.py", "deduction_graphs.py",
                          "generation_config.json", "tokenizer_config.json"}
    assert json.loads(files["config.json"])["auto_map"] == AUTO_MAP
    card = ModelCard(files["README.md"].decode())
    assert card.data.library_name == "transformers" and card.data.eval_results[0].metric_value == 0.4123
    from safetensors.torch import load as load_bytes

    sent = load_bytes(files["model.safetensors"])
    ref = load_file(str(run_dir / "model.safetensors"))
    assert sent.keys() == ref.keys() and all(torch.equal(sent[k], ref[k]) for k in ref)


@pytest.mark.parametrize("status,message", [(401, "rejected the token (401"), (403, "(403 Forbidden)")])
def test_upload_http_errors_are_clear(run_dir, no_proxy, status, message, tmp_path):
    with FakeHub(status=status) as hub:
        with pytest.raises(HubUploadError, match=re.escape(message)):
            push(run_dir, CardOptions(repo_id="me/pldr-tiny"), token="hf_bad", endpoint=hub.url, check=False)


def test_upload_without_token_or_network(run_dir, no_proxy, monkeypatch, capsys):
    import socket

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    rc = main(["push", str(run_dir), "--repo-id", "me/pldr-tiny", "--no-check", "--endpoint", "http://127.0.0.1:9"])
    assert rc == 1 and "no Hugging Face token" in capsys.readouterr().err
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    with pytest.raises(HubUploadError, match=f"cannot reach http://127.0.0.1:{port}"):
        push(run_dir, CardOptions(repo_id="me/pldr-tiny"), token="hf_x", endpoint=f"http://127.0.0.1:{port}",
             check=False)


# ----------------------------------------------------------------------------------------------------------------------
# Port-format folders (the published PLDR-LLM-v51 layout), built from the port's parameter names
# ----------------------------------------------------------------------------------------------------------------------
def port_state_dict(c: dict, custom_G_type=None, seed=0) -> dict:
    """Tensors named and shaped as the transformers port (PldrllmForCausalLM) saves them."""
    g = torch.Generator().manual_seed(seed)
    D, H, d, F, Ad, V, L = (c["hidden_size"], c["num_attention_heads"], c["head_dim"], c["intermediate_size"],
                            c["A_dff"], c["vocab_size"], c["num_hidden_layers"])
    shapes = {"decoder.embedding.weight": (V, D), "decoder.layernorm1.weight": (D,), "decoder.layernorm1.bias": (D,)}

    def linear(prefix, n_out, n_in):
        shapes[prefix + ".weight"], shapes[prefix + ".bias"] = (n_out, n_in), (n_out,)

    for i in range(L):
        p = f"decoder.dec_layers.{i}."
        for n in ("wq", "wk", "wv", "dense"):
            linear(p + "mha1." + n, D, D)
        if custom_G_type is None:  # the port builds the metric learner and power-law tensors only for learned G
            for n in ("Wlst", "blst", "pwlst", "alst", "balst"):
                shapes[p + "mha1.plgatt_layer." + n] = (H, d, d)
            for j in range(c["num_reslayerA"]):
                for k in range(c["num_denseA"]):
                    q = p + f"mha1.reslayerAs.{j}.denseAs.{k}."
                    linear(q + "gluw1", Ad, d), linear(q + "gluw2", Ad, d), linear(q + "gluw3", d, Ad)
                shapes[p + f"mha1.reslayerAs.{j}.layernormA.weight"] = (d,)
                shapes[p + f"mha1.reslayerAs.{j}.layernormA.bias"] = (d,)
            shapes[p + "mha1.layernorm1.weight"], shapes[p + "mha1.layernorm1.bias"] = (d,), (d,)
        linear(p + "ffn.gluw1", F, D), linear(p + "ffn.gluw2", F, D), linear(p + "ffn.gluw3", D, F)
        for n in ("layernorm1", "layernorm2"):
            shapes[p + n + ".weight"], shapes[p + n + ".bias"] = (D,), (D,)
    linear("final_layer", V, D)
    state = {}
    for k, s in shapes.items():
        t = torch.randn(s, generator=g) * 0.3
        state[k] = 1.0 + 0.1 * t if ("layernorm" in k and k.endswith("weight")) else t
    if custom_G_type is not None:
        G = torch.eye(d).expand(L, 1, H, d, d) + 0.2 * torch.randn(L, 1, H, d, d, generator=g)
        zeros = torch.zeros(L, 1, H, d, d)
        state["decoder.past_G_values"] = torch.stack([zeros, zeros, G], dim=1)  # [L, 3, 1, H, d, d]
        state["decoder.past_G_values_status"] = torch.ones(L, dtype=torch.bool)
    return state


def write_port_folder(path: Path, custom_G_type=None, legacy_bin=False, state=None) -> dict:
    path.mkdir(parents=True)
    state = state if state is not None else port_state_dict(TINY, custom_G_type)
    cfg = {  # config.json as the port (transformers 4.x, PldrllmConfig) writes it
        "architectures": ["PldrllmForCausalLM"], "model_type": "pldrllm", "torch_dtype": "float32",
        "transformers_version": "4.56.1", "A_dff": 12, "attention_bias": True, "attention_dropout": 0.0,
        "bos_token_id": 2, "cache_first_G": False, "custom_G_type": custom_G_type, "eos_token_id": 3,
        "final_bias": True, "glu_bias": True, "head_dim": 8, "hidden_act": "silu", "hidden_size": 16,
        "initializer_range": 0.02, "intermediate_size": 42, "layer_norm_eps": 1e-06, "max_position_embeddings": 128,
        "num_attention_heads": 2, "num_denseA": 2, "num_hidden_layers": 2, "num_reslayerA": 2,
        "output_pldr_attentions": False, "pad_token_id": 0, "reference_rope": True, "rope_scaling": None,
        "rope_theta": 10000.0, "tie_word_embeddings": False, "use_cache": True, "vocab_size": 64,
    }
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 2, "eos_token_id": 3, "pad_token_id": 0,
                                                             "transformers_version": "4.56.1"}))
    (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PldrllmTokenizer", "bos_token": "[START]",
                                                            "eos_token": "[END]", "pad_token": "[PAD]"}))
    if legacy_bin:
        torch.save(state, path / "pytorch_model.bin")
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, str(path / "model.safetensors"), metadata={"format": "pt"})
    return state


def _assert_holds(model, state):
    own = model.state_dict()
    for k, v in state.items():
        if k.endswith("past_G_values_status"):
            assert k not in own
            continue
        assert torch.equal(own[k], v), k


@pytest.mark.parametrize("custom_G_type,legacy_bin", [(None, False), ("external", False), (None, True)])
def test_port_folder_loads_directly_and_converts(tmp_path, custom_G_type, legacy_bin, capsys):
    port = tmp_path / "port"
    state = write_port_folder(port, custom_G_type, legacy_bin)
    direct = AutoModelForCausalLM.from_pretrained(port).eval()  # import pldr_hf, no trust_remote_code
    assert type(direct) is PldrForCausalLM
    _assert_holds(direct, state)  # every tensor landed where the port put it (nothing left at init values)
    out = tmp_path / "converted"
    assert main(["convert", "--from", "port", str(port), "--out", str(out)]) == 0
    assert "PldrllmTokenizer" in capsys.readouterr().out  # the port's tokenizer class is reported
    assert (out / "model.safetensors").is_file() and not (out / "pytorch_model.bin").exists()
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] == "PldrllmTokenizer"
    converted = AutoModelForCausalLM.from_pretrained(out).eval()
    _assert_holds(converted, state)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["PldrForCausalLM"]
    a, b = _logits(direct), _logits(converted)
    assert torch.equal(a, b)
    if custom_G_type is not None:
        # the stored G_LM is what the model attends with: identity G gives different logits
        with torch.no_grad():
            converted.decoder.past_G_values[:, 2] = torch.eye(8)
        assert (a - _logits(converted)).abs().max() > 1e-3


def test_port_errors_name_the_problem(tmp_path, capsys):
    state = port_state_dict(TINY)
    state.pop("decoder.dec_layers.1.ffn.gluw2.bias")
    state["decoder.dec_layers.0.mha1.wq.weight"] = torch.zeros(16, 8)
    state["decoder.extra.weight"] = torch.zeros(3)
    bad = tmp_path / "bad"
    write_port_folder(bad, state=state)
    assert main(["convert", "--from", "port", str(bad), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "missing (1): decoder.dec_layers.1.ffn.gluw2.bias" in err
    assert "unexpected (1): decoder.extra.weight" in err
    assert "decoder.dec_layers.0.mha1.wq.weight: checkpoint (16, 8) vs model (16, 16)" in err
    (bad / "model.safetensors").unlink()
    assert main(["convert", "--from", "port", str(bad), "--out", str(tmp_path / "o")]) == 1
    assert "no weights found" in capsys.readouterr().err
    (bad / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert main(["convert", "--from", "port", str(bad), "--out", str(tmp_path / "o")]) == 1
    assert "model_type is 'llama', expected 'pldrllm'" in capsys.readouterr().err
    (bad / "config.json").unlink()
    assert main(["convert", "--from", "port", str(bad), "--out", str(tmp_path / "o")]) == 1
    assert "no config.json" in capsys.readouterr().err
    assert main(["convert", "--from", "port", "--out", str(tmp_path / "o")]) == 1
    assert "needs PATH" in capsys.readouterr().err


def test_push_script_dry_run(run_dir, tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("push_to_hub", Path(__file__).parents[1] / "scripts" / "push_to_hub.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "repo"
    assert mod.main(["--model_dir", str(run_dir), "--repo_id", "me/x", "--dry_run", str(out), "--license", "mit",
                     "--datasets", "a/b", "c/d"]) == 0
    meta = ModelCard.load(out / "README.md").data.to_dict()
    assert meta["license"] == "mit" and meta["datasets"] == ["a/b", "c/d", "tiiuae/falcon-refinedweb"]
    assert json.loads((out / "config.json").read_text())["auto_map"] == AUTO_MAP
