"""scripts/bench.py: JSON with PLDR-LLM and both Llamas (same FFN width, aligned width) per shape and mode, ratios
against the best Llama, sequence lengths past the configs' context honoured, clear errors for bad arguments; and
bench_decode.py and bench_metric_learner.py (its rotary micro-benchmark) run on CPU."""

import gzip
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch


def _script(monkeypatch, filename: str, name: str):
    """scripts/<filename> imported as a module named ``name``."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "scripts" / filename)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def bench(monkeypatch):
    return _script(monkeypatch, "bench.py", "pldr_bench")


def test_bench_train_reports_every_model_and_ratio_to_the_best_llama(bench, capsys):
    # The tiny configs have 256 positions: 300 must run at 300 (raised context), not be cut to 256.
    res = bench.main(["--tiny", "--device", "cpu", "--modes", "eager", "--steps", "1", "--warmup", "0",
                      "--shapes", "2x32,1x300"])
    printed = json.loads(capsys.readouterr().out)
    assert printed == res
    runs = res["runs"]
    assert [(r["model"], r["batch_size"], r["seq_len"]) for r in runs] == [
        (m, b, s) for b, s in ((2, 32), (1, 300)) for m in ("pldr", "llama_same_ffn", "llama_aligned")]
    for r in runs:
        assert "error" not in r, r
        assert r["tokens_per_s"] > 0 and 0 < r["final_loss"] < 20
        assert r["returns_cache"]  # (the configs' default, use_cache on)
    ffn = {r["model"]: r["ffn_width"] for r in runs}
    assert ffn["llama_same_ffn"] == ffn["pldr"] == 85 and ffn["llama_aligned"] == 88
    assert [(row["shape"], row["mode"]) for row in res["summary"]] == [("1x300", "eager"), ("2x32", "eager")]
    for row in res["summary"]:
        group = [r for r in runs if f"{r['batch_size']}x{r['seq_len']}" == row["shape"]]
        tps = {r["model"]: r["tokens_per_s"] for r in group}
        best = max(("llama_same_ffn", "llama_aligned"), key=tps.get)
        assert row["best_llama"] == best
        assert row["pldr_vs_best_llama"] == pytest.approx(tps["pldr"] / tps[best], abs=1e-3)
        assert row["pldr_vs_llama_aligned"] == pytest.approx(tps["pldr"] / tps["llama_aligned"], abs=1e-3)


@pytest.mark.parametrize("argv, message", [
    (["--models", "gpt2"], "unknown model 'gpt2'"),
    (["--modes", "fast"], "unknown mode 'fast'"),
    (["--shapes", "16by1024"], "is not BATCHxSEQ"),
    (["--rounds", "0"], "--rounds must be at least 1"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--stpes", "2"], r"not used by the HfArgumentParser: \['--stpes', '2'\]"),
    (["--dtype", "fp16"], "unknown --dtype 'fp16'"),
    (["--host_proxy"], "--tiny and --host_proxy pick different configs"),
    (["--threads", "-1"], "--threads must be 0"),
    (["--use_cache", "no"], "unknown --use_cache 'no'"),
])
def test_bench_rejects_bad_arguments_by_name(bench, argv, message):
    with pytest.raises(SystemExit, match=message):
        bench.main(["--tiny", "--device", "cpu"] + argv)


def test_bench_reports_host_time_per_phase_and_profile(bench, tmp_path):
    res = bench.main(["--tiny", "--device", "cpu", "--modes", "eager", "--models", "pldr,llama_aligned", "--steps", "2",
                      "--warmup", "1", "--rounds", "2", "--batch_size", "2", "--seq_len", "32",
                      "--profile", str(tmp_path)])
    for r in res["runs"]:
        phases = r["host_ms_by_phase"]
        assert list(phases) == ["forward", "backward", "clip", "optimizer", "zero_grad"]
        assert phases["forward"] > 0 and phases["backward"] > 0 and min(phases.values()) >= 0
        # on CPU every op runs as it is issued: the phases add up to the step
        assert 0.5 * min(r["round_step_ms"]) <= r["host_ms"] <= 2 * max(r["round_step_ms"])
        assert r["profiled"]["wall_ms_per_step"] > 0 and "gpu_busy_ms_per_step" not in r["profiled"]  # (no GPU)
        text = (tmp_path / f"profile_{r['model']}_eager_2x32.txt").read_text()
        assert text.startswith(f"{r['model']}_eager_2x32: 0 kernel launches per step")
        with gzip.open(tmp_path / f"trace_{r['model']}_eager_2x32.json.gz", "rt") as f:
            events = json.load(f)["traceEvents"]
        assert any(e.get("name") == "aten::mm" for e in events)  # (the timeline of the steps' operators)


def test_bench_host_proxy_has_the_papers_structure_at_tiny_widths(bench):
    # The CPU proxy of a host-bound GPU step: as many layers, learner units and parameter tensors as the 110M model
    # (PLDR-LLM 120 tensors, the Llama 48), tiny widths, float32 without autocast, the threads asked for
    threads = torch.get_num_threads()
    try:
        res = bench.main(["--host_proxy", "--device", "cpu", "--dtype", "fp32", "--threads", "1", "--modes", "eager",
                          "--models", "pldr,llama_aligned", "--shapes", "1x16", "--steps", "1", "--warmup", "0"])
    finally:
        torch.set_num_threads(threads)
    assert res["config"] == "host_proxy" and res["dtype"] == "fp32" and res["threads"] == 1
    runs = {r["model"]: r for r in res["runs"]}
    assert runs["pldr"]["param_tensors"] == 120 and runs["llama_aligned"]["param_tensors"] == 48
    assert runs["pldr"]["ffn_width"] == 96 and runs["llama_aligned"]["ffn_width"] == 96
    full = bench.model_configs(False, 1024)["pldr"][1]
    proxy = bench.model_configs(False, 32, host_proxy=True)["pldr"][1]
    for key in ("num_hidden_layers", "num_reslayerA", "num_denseA"):
        assert getattr(proxy, key) == getattr(full, key), key
    assert proxy.hidden_size == 64 and proxy.A_dff == 24
    assert all("error" not in r and 0 < r["final_loss"] < 20 for r in res["runs"])


def test_busy_time_is_the_union_of_kernel_intervals(bench):
    assert bench.busy_time([]) == 0
    # overlapping (0-4 and 2-5), nested (6-10 holds 7-8), disjoint (12-13), given out of order
    assert bench.busy_time([(12, 13), (2, 5), (0, 4), (7, 8), (6, 10)]) == 5 + 4 + 1


def test_gpu_time_by_kind_of_kernel(bench):
    # kernel names as torch.profiler gave them in a compiled PLDR-LLM step on an H200
    names = {
        "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26_64x64x64_1x4x1_cga1": "attention",
        "void cudnn::fusion::convert_dq_to_16bits<true>(void const*, void*, unsigned int)": "attention",
        "nvjet_sm90_tst_160x256_64x3_2x1_v_bz_coopA_NNN": "gemm",
        "void cublasLt::splitKreduce_kernel<32, 16, int, float, __nv_bfloat16, float>": "gemm",
        "triton_tem_fused_mm_0": "gemm",
        "_learner_bwd_rows_kernel": "metric_learner",
        "_learner_stage_kernel": "metric_learner",
        "_power_law_bwd_kernel": "power_law",
        "_swiglu_bwd_kernel": "swiglu",
        "_rotary_qkv_bwd_kernel": "rotary",
        "triton_red_fused__log_softmax__log_softmax_backward_data__to_copy_add_arange": "inductor",
        "triton_poi_fused__scaled_dot_product_attention_transpose_0": "inductor",
        "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::(anonymous": "multi_tensor",
        "void at::native::vectorized_elementwise_kernel<8, at::native::FillFunctor<c10::BFloat16>>": "other",
        "Memset (Device)": "other",
    }
    for name, kind in names.items():
        assert bench.kernel_kind(name) == kind, name
    # (name, start us, end us) over 2 steps -> ms per step, largest first
    kernels = [("_learner_fwd_kernel", 0, 300), ("nvjet_x", 300, 1300), ("_learner_bwd_rows_kernel", 1300, 1500),
               ("nvjet_y", 1400, 2400), ("Memset (Device)", 2400, 2410)]
    by_kind = bench.gpu_ms_by_kind(kernels, 2)
    assert by_kind == {"gemm": 1.0, "metric_learner": 0.25, "other": 0.005}
    assert list(by_kind) == ["gemm", "metric_learner", "other"]


def test_bench_train_without_a_cache_as_trainer_runs_it(bench):
    # Trainer sets use_cache=False (TrainingArguments.use_cache): --use_cache false trains every model so
    res = bench.main(["--tiny", "--device", "cpu", "--modes", "eager", "--models", "pldr,llama_aligned", "--steps", "1",
                      "--warmup", "0", "--batch_size", "1", "--seq_len", "16", "--use_cache", "false"])
    assert res["use_cache"] == "false"
    assert [(r["model"], r["returns_cache"]) for r in res["runs"]] == [("pldr", False), ("llama_aligned", False)]
    assert all(r["final_loss"] > 0 for r in res["runs"])


def test_bench_train_reports_pldr_variants_against_the_same_llama(bench):
    # a variant named in --models (here the recorded stack as one operator under torch.compile) gets its own ratios
    configs = bench.model_configs(True, 32)
    assert configs["pldr_graphs_under_compile"][1].decoder_graphs_under_compile
    assert not configs["pldr"][1].decoder_graphs_under_compile
    res = bench.main(["--tiny", "--device", "cpu", "--modes", "eager", "--models",
                      "pldr,pldr_graphs_under_compile,llama_aligned", "--steps", "1", "--rounds", "2", "--warmup", "0",
                      "--batch_size", "1", "--seq_len", "16"])
    tps = {r["model"]: r["tokens_per_s"] for r in res["runs"]}
    (row,) = res["summary"]
    assert row["pldr_graphs_under_compile_vs_best_llama"] == pytest.approx(
        tps["pldr_graphs_under_compile"] / tps["llama_aligned"], abs=1e-3)
    assert row["pldr_graphs_under_compile_vs_best_llama_by_round"] > 0


def test_bench_train_packed_rows(bench, capsys):
    pos = bench.packed_position_ids(3, 40, 6, seed=0, device="cpu")
    assert pos.shape == (3, 40) and (pos == 0).sum() > 3  # several documents a row
    assert ((pos[:, 1:] == pos[:, :-1] + 1) | (pos[:, 1:] == 0)).all()  # +1 inside a document, 0 at each start
    res = bench.main(["--tiny", "--device", "cpu", "--modes", "eager", "--models", "pldr,llama_aligned", "--steps", "1",
                      "--warmup", "0", "--batch_size", "2", "--seq_len", "32", "--packed_mean_doc_len", "8"])
    assert res["packed_mean_doc_len"] == 8 and [r["model"] for r in res["runs"]] == ["pldr", "llama_aligned"]
    assert all("error" not in r and r["final_loss"] > 0 for r in res["runs"])
    assert json.loads(capsys.readouterr().out)["packed_mean_doc_len"] == 8


def test_bench_train_alternates_models_in_rotating_rounds(bench, monkeypatch):
    order = []
    timed = bench.TrainRun.time_steps

    def recording(self, steps):
        order.append(self.out["model"])
        return timed(self, steps)

    monkeypatch.setattr(bench.TrainRun, "time_steps", recording)
    res = bench.main(["--tiny", "--device", "cpu", "--modes", "eager", "--steps", "1", "--warmup", "0",
                      "--rounds", "3", "--batch_size", "2", "--seq_len", "16"])
    p, s, a = "pldr", "llama_same_ffn", "llama_aligned"
    assert order == [p, s, a, s, a, p, a, p, s]
    for r in res["runs"]:
        assert len(r["round_step_ms"]) == 3 and r["step_ms"] == min(r["round_step_ms"])
        assert r["tokens_per_s"] == pytest.approx(2 * 16 / (r["step_ms"] / 1000), rel=1e-2)
    # the round-by-round ratio: the median of the three rounds' ratios of step times (best Llama's / PLDR-LLM's)
    (row,) = res["summary"]
    ms = {r["model"]: r["round_step_ms"] for r in res["runs"]}
    ratios = sorted(b / q for q, b in zip(ms["pldr"], ms[row["best_llama"]]))
    assert row["pldr_vs_best_llama_by_round"] == pytest.approx(ratios[1], abs=1e-3)


@pytest.fixture
def bench_decode(monkeypatch):
    return _script(monkeypatch, "bench_decode.py", "pldr_bench_decode")


def test_bench_decode_alternates_variants_and_reports_ratios(bench_decode, monkeypatch, tmp_path, capsys):
    calls = []
    prepare = bench_decode.prepare_variant

    def recording(name, *args):
        once = prepare(name, *args)

        def run(*n):
            calls.append((name, *n))
            return once(*n)
        return run

    monkeypatch.setattr(bench_decode, "prepare_variant", recording)
    out = tmp_path / "d.json"
    report = bench_decode.main(["--tiny", "--device", "cpu", "--variants", "pldr_kv_g,llama_dynamic",
                                "--batch_sizes", "2", "--repeats", "2", "--warmup", "1", "--output", str(out)])
    # one warm-up run each, then two rounds, the second in rotated order; each timed run followed by one of 1 token
    p, q = "pldr_kv_g", "llama_dynamic"
    assert calls == [(p,), (q,), (p,), (p, 1), (q,), (q, 1), (q,), (q, 1), (p,), (p, 1)]
    assert json.loads(out.read_text()) == report == json.loads(capsys.readouterr().out)
    res = report["results"]
    new_tokens = report["settings"]["new_tokens"]
    for key in ("pldr_kv_g@b2", "llama_dynamic@b2"):
        r = res[key]
        assert len(r["times_s"]) == 2 and len(r["prefill_times_s"]) == 2 and r["tokens_per_s"] > 0, r
        assert r["prefill_ms"] == pytest.approx(1000 * min(r["prefill_times_s"]), abs=0.06)  # (times_s: 0.1 ms)
        assert r["decode_step_ms"] == pytest.approx(
            1000 * (min(r["times_s"]) - min(r["prefill_times_s"])) / (new_tokens - 1), abs=0.01)
    (row,) = report["summary"]
    assert row["mode"] == "dynamic" and row["best_llama"] == "llama_dynamic"
    assert row["pldr_vs_best_llama"] == pytest.approx(
        res["pldr_kv_g@b2"]["tokens_per_s"] / res["llama_dynamic@b2"]["tokens_per_s"], abs=1e-3)
    assert row["pldr_vs_best_llama_decode_step"] == pytest.approx(
        res["llama_dynamic@b2"]["decode_step_ms"] / res["pldr_kv_g@b2"]["decode_step_ms"], abs=1e-3)
    assert row["pldr_prefill_ms"] == res["pldr_kv_g@b2"]["prefill_ms"]
    by_round = [b / a for a, b in zip(res["pldr_kv_g@b2"]["times_s"], res["llama_dynamic@b2"]["times_s"])]
    assert row["pldr_vs_best_llama_by_round"] == pytest.approx(sum(by_round) / 2, abs=1e-3)  # (the median of two)


def test_bench_decode_compares_the_models_mask_with_transformers_in_one_run(bench_decode, monkeypatch):
    # pldr_static_compiled_hf_mask: the same model and static cache with transformers' mask function at every step
    # (counted here), the model's own hook back in place after each run
    import transformers.masking_utils as masking

    reference, steps = masking.create_masks_for_generate, []

    def counted(*args, **kwargs):
        steps.append(kwargs["inputs_embeds"].shape[1])
        return reference(*args, **kwargs)

    monkeypatch.setattr(masking, "create_masks_for_generate", counted)
    report = bench_decode.main(["--tiny", "--device", "cpu", "--variants",
                                "pldr_static_compiled,pldr_static_compiled_hf_mask", "--batch_sizes", "1",
                                "--repeats", "2", "--warmup", "1", "--compile_backend", "eager"])
    new_tokens = report["settings"]["new_tokens"]
    # runs: warm-up of each, then per round one full and one single-token run of each; transformers' function makes
    # the prompt's mask in every run, and every step's in the hf_mask runs only
    runs = 2 + 2 * 2 * 2
    assert len(steps) == runs + 3 * (new_tokens - 1) and steps.count(1) == 3 * (new_tokens - 1)
    row = next(r for r in report["summary"] if r["mode"] == "static_compiled_mask")
    res = report["results"]
    assert row["own_mask_vs_hf_mask"] == pytest.approx(
        res["pldr_static_compiled@b1"]["tokens_per_s"] / res["pldr_static_compiled_hf_mask@b1"]["tokens_per_s"],
        abs=1e-3)


def test_bench_decode_rejects_zero_repeats(bench_decode):
    with pytest.raises(SystemExit, match="--repeats must be at least 1"):
        bench_decode.main(["--tiny", "--device", "cpu", "--repeats", "0"])


def test_bench_decode_names_an_unknown_option(bench_decode):
    with pytest.raises(SystemExit, match=r"bench_decode: .*\['--output_file', 'x'\]"):
        bench_decode.main(["--tiny", "--device", "cpu", "--output_file", "x"])


def test_bench_decode_pldr_without_the_recorded_stack(bench_decode, monkeypatch):
    """pldr_layers_* variants decode with a copy of PLDR-LLM (same weights) whose prompt's forward runs layer by layer
    (decoder_cuda_graphs=False); the report counts the recorded stack's use by the other."""
    made = []
    real = bench_decode.PldrForCausalLM

    def recording(config):
        made.append(real(config))
        return made[-1]

    monkeypatch.setattr(bench_decode, "PldrForCausalLM", recording)
    report = bench_decode.main(["--tiny", "--device", "cpu", "--variants", "pldr_kv_g,pldr_layers_kv_g",
                                "--batch_sizes", "2", "--repeats", "1", "--warmup", "1"])
    pldr, layers = made
    assert pldr.config.decoder_cuda_graphs and not layers.config.decoder_cuda_graphs
    for (name, p), q in zip(pldr.named_parameters(), layers.parameters()):
        assert torch.equal(p, q), name
    assert report["results"]["pldr_layers_kv_g@b2"]["tokens_per_s"] > 0
    assert report["pldr_decoder_graphs"] == {"b2": {"recorded_keys": 0, "recordings": 0, "replays": 0,
                                                    "disabled": None}}  # (no CUDA graphs on CPU)


@pytest.fixture
def bench_learner(monkeypatch):
    return _script(monkeypatch, "bench_metric_learner.py", "pldr_bench_learner")


def test_bench_metric_learner_times_the_rotary_operator_and_checks_its_metric_sum_backward(bench_learner, capsys):
    # --rotary alone (no learner cases): per shape the rotary forward and backward for both pair layouts, the copy
    # floor, and the metric-sum backward next to the separate ops, whose results it must reproduce
    report = bench_learner.main(["--device", "cpu", "--cases", "--compiled", "none", "--rotary", "2x16,1x24",
                                 "--d", "16", "--heads", "2"])
    assert json.loads(capsys.readouterr().out) == report
    assert report["results"] == {} and list(report["rotary"]) == ["2x16", "1x24"]
    for shape in report["rotary"].values():
        assert shape["clone_us"] > 0 and shape["metric_sum_bwd_us"] > 0 and shape["separate_bwd_us"] > 0
        for pairs in ("interleaved", "half_split"):
            assert shape[pairs]["fwd_us"] > 0 and shape[pairs]["bwd_us"] > 0
        assert shape["max_rel_diff"] < 1e-6  # (float32 on CPU: the same sums)
    with pytest.raises(SystemExit, match="--rotary takes BATCHxSEQ"):
        bench_learner.main(["--device", "cpu", "--cases", "--compiled", "none", "--rotary", "16x1024x2"])
    with pytest.raises(SystemExit, match=r"--cases takes rows:mode"):
        bench_learner.main(["--device", "cpu", "--cases", "512", "--compiled", "none"])
