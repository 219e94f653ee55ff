"""Each benchmark script runs end to end in its smoke size and writes the JSON its table came from."""
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, launch_env, run_metrics


def run_script(*args, timeout=300):
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=REPO, env=launch_env(), capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_gate_benchmark_smoke(tmp_path):
    out = tmp_path / "gate.json"
    stdout = run_script(REPO / "benchmarks" / "gate.py", "--smoke", "--json", out)
    rows = json.loads(out.read_text())["rows"]
    assert [row["k"] for row in rows] == [1, 2]
    for row in rows:
        assert row["topk_ms"] > 0 and row["sparsemixer_ms"] > 0 and row["fused_ms"] > 0 and row["floor_ms"] > 0
        assert row["vs_topk"] == row["sparsemixer_ms"] / row["topk_ms"]
        assert row["fused_vs_floor"] == row["fused_ms"] / row["floor_ms"]
        assert f"{row['vs_topk']:.2f}x" in stdout and f"{row['fused_vs_floor']:.2f}x" in stdout
    sizes = tmp_path / "sizes" / "gate.json"
    stdout = run_script(REPO / "benchmarks" / "gate.py", "--sizes", "--smoke", "--json", sizes)
    rows = json.loads(sizes.with_name("gate_sizes.json").read_text())["rows"]
    assert [(r["tokens"], r["experts"], r["k"]) for r in rows] == [(256, 8, 1), (256, 8, 2)]
    assert all(f"{r['fused_vs_eager']:.2f}x" in stdout for r in rows)


def test_gate_profile_names_the_routing_node(tmp_path):
    stdout = run_script(REPO / "benchmarks" / "gate.py", "--profile", "256,16,8,2", "--json", tmp_path / "unused.json")
    assert "S=256 d=16 E=8 k=2" in stdout
    assert "_Rounds" in stdout and "aten::mm" in stdout  # the routing rounds' autograd node and the router matmul
    assert not (tmp_path / "unused.json").exists()
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gate.py"), "--profile", "256,16"], cwd=REPO,
                          env=launch_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "--profile takes S,d,E,k" in proc.stderr and "'256,16'" in proc.stderr


def test_fidelity_smoke_bears_out_the_estimators_facts(tmp_path):
    out = tmp_path / "fidelity.json"
    run_script(REPO / "benchmarks" / "fidelity.py", "--smoke", "--json", out)
    results = json.loads(out.read_text())["results"]
    # The midpoint rule is exact for a quadratic: with the coin on every draw, no bias at all.
    assert results["quadratic"]["midpoint-all"]["max_bias"] < 1e-10
    # heun3 leaves out the gating term (GRIN App. A.2): biased although its quadrature is exact for a cubic.
    assert results["cubic"]["heun3"]["bias"] > 0.1
    # Draws through the real routing function agree with the enumeration of D and the coin.
    for loss in results.values():
        for arm, row in loss.items():
            assert row["max_sampling_error"] < 5.0, (arm, row)


def test_moe_layer_smoke(tmp_path):
    out = tmp_path / "layer.json"
    stdout = run_script(REPO / "benchmarks" / "moe_layer.py", "--smoke", "--out", out)
    rows = json.loads(out.read_text())["rows"]
    assert [(r["baseline"], r["k"]) for r in rows] == [("switch", 1), ("gshard", 2)]
    for r in rows:
        assert r["ratio"] == r["sparsemixer_ms"] / r["deepspeed_ms"] and f"{r['ratio']:.2f}x" in stdout


def test_end_to_end_smoke(tmp_path, corpus):
    out = tmp_path / "e2e.json"
    run_script(REPO / "benchmarks" / "e2e.py", "--smoke", "--data", corpus, "--json", out)
    rows = {r["router"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"sparsemixer", "switch"} and rows["switch"]["vs_switch"] == 1.0
    assert all(r["tokens_per_s"] > 0 for r in rows.values())
    mixer, switch = rows["sparsemixer"], rows["switch"]
    assert mixer["vs_switch_paired"] == mixer["runs"][0] / switch["runs"][0]  # one round: its own ratio


def test_model_step_smoke(tmp_path):
    out = tmp_path / "step.json"
    stdout = run_script(REPO / "benchmarks" / "model_step.py", "--smoke", "--json", out)
    rows = {r["router"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"sparsemixer", "sparsemixer-v2", "switch", "gshard", "sparsemixer without omega"}
    assert rows["switch"]["vs_switch"] == 1.0
    for r in rows.values():
        assert r["ms"] > 0 and r["vs_switch"] == r["ms"] / rows["switch"]["ms"] and f"{r['vs_switch']:.3f}x" in stdout


def test_convergence_smoke_and_resumable(tmp_path, corpus):
    out = tmp_path / "study"
    args = [REPO / "benchmarks" / "convergence.py", "--smoke", "--set", f"data.path={corpus}", "--out", out]
    stdout = run_script(*args)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"switch", "sparsemixer"} and (out / "curves.png").stat().st_size > 5000
    assert summary["switch"]["speedup"] == 1.0, "the baseline reaches its own final loss at its last step"
    assert [p["step"] for p in summary["sparsemixer"]["mean_curve"]] == [3, 6]
    assert "switch seed 0 step 6" in stdout
    again = run_script(*args)
    assert "seed 0 step" not in again, "finished runs are not repeated"
    assert json.loads((out / "summary.json").read_text()) == summary


def test_growth_smoke(tmp_path):
    out = tmp_path / "growth.json"
    run_script(REPO / "benchmarks" / "growth.py", "--smoke", "--json", out)
    rows = json.loads(out.read_text())["rows"]
    assert {(r["gate"], r["k"], r["experts"], r["tokens"]) for r in rows} == {
        (g, k, 4, s) for g in ("topk", "sparsemixer") for k in (1, 2) for s in (512, 1024)}
    assert all(r["ms"] > 0 and r["peak_mb"] >= 0 for r in rows)


def test_plan_check_smoke(tmp_path, corpus):
    out = tmp_path / "plan_check.json"
    stdout = run_script(REPO / "benchmarks" / "plan_check.py", "--smoke", "--data", corpus, "--json", out)
    rows = {r["family"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"native", "hf"}
    for r in rows.values():
        assert r["plan_bytes"] == r["state_bytes"] + r["activation_bytes"] and r["peak_rss_bytes"] > r["framework_bytes"]
        assert r["ratio"] == r["plan_bytes"] / r["peak_rss_bytes"] and f"{r['ratio']:.3f}" in stdout
        assert 0 < r["mfu"] < 1 and r["model_tflops"] > 0


def test_train_options_smoke_and_graph_breaks(tmp_path):
    out = tmp_path / "train_options.json"
    stdout = run_script(REPO / "benchmarks" / "train_options.py", "--smoke", "--json", out)
    rows = {(r["family"], r["option"]): r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {(f, o) for f in ("native", "hf") for o in ("baseline", "compile", "activation_checkpointing")}
    for (family, option), r in rows.items():
        base = rows[family, "baseline"]
        assert r["ms"] > 0 and r["vs_baseline"] == r["ms"] / base["ms"] and f"{r['vs_baseline']:.2f}x" in stdout
        assert r["peak_mib"] > r["base_mib"] > 0 and r["steps_peak_mib"] > r["base_mib"]
        # The same weights, tokens and seed: checkpointing recomputes the same step; compiled routes draw other
        # numbers (inductor's generator), so its loss is only close.
        tolerance = 1e-6 if option != "compile" else 2e-2
        assert abs(r["first_loss"] - base["first_loss"]) <= tolerance * base["first_loss"], (family, option)
    # The gate itself no longer breaks the graph: every break left is DeepSpeed's MoE layer's (innermost frame).
    stdout = run_script(REPO / "benchmarks" / "train_options.py", "--smoke", "--graph-breaks")
    frames = [line.strip() for line in stdout.splitlines() if line.strip().startswith("at ")]
    innermost = frames[1::2]
    assert innermost and all("deepspeed/moe/sharded_moe.py" in f and "C = int(C)" in f for f in innermost), frames


def test_gpu_check_script_runs_its_cpu_parts(tmp_path):
    """benchmarks/gpu_check.sh as a GPU machine runs it, at the CPU configs' size (--smoke): the set-up finds
    everything installed, every part runs, and the tables come from the runs' own records."""
    out = tmp_path / "gpu_check"
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--smoke", "--out", str(out)], cwd=REPO,
                          env={**launch_env(), "PYTHON": sys.executable}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "gpu_check.json").read_text())
    assert [r["k"] for r in result["gate"]["rows"]] == [1, 2] and len(result["gate"]["sizes"]) == 2
    names = [r["name"] for r in result["training"]]
    assert names == ["cpu_small", "cpu_small + activation checkpointing", "cpu_phimoe, ep_size 1"]
    table = (out / "gpu_check.md").read_text()
    for r in result["training"]:
        records = [m for m in run_metrics(Path(r["run_dir"])) if "mfu" in m]
        assert len(records) == 4 and r["mfu"] == statistics.median(m["mfu"] for m in records[1:])
        assert 0 < r["mfu"] < 1 and r["plan_over_peak"] == r["plan_bytes"] / r["peak_mem_bytes"]
        assert f"| {r['name']} |" in table and f"{r['mfu']:.1%}" in table
    # Checkpointing recomputes the same step: the same loss.
    assert result["training"][1]["loss"] == pytest.approx(result["training"][0]["loss"], rel=1e-6)
    # Without a GPU the full check refuses at once, saying what to do; a wrong option is named.
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py")], cwd=REPO, env=launch_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "no CUDA GPU is visible" in proc.stderr and "--smoke" in proc.stderr
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--fast"], cwd=REPO, env=launch_env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown option --fast" in proc.stderr


def test_prepare_benchmark_smoke(tmp_path):
    out = tmp_path / "prepare.json"
    stdout = run_script(REPO / "benchmarks" / "prepare.py", "--smoke", "--json", out)
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [(r["input"], r["tokenizer"]) for r in rows] == [
        (i, t) for i in ("text files", "jsonl.gz", "parquet") for t in ("bytes", "bpe 300")]
    assert result["bpe_train_seconds"] > 0
    for r in rows:
        assert r["mb_per_s_1"] > 0 and r["speedup"] == pytest.approx(r["mb_per_s_2"] / r["mb_per_s_1"])
        assert f"{r['speedup']:.2f}x" in stdout
