"""Each benchmark script runs end to end in its smoke size and writes the JSON its table came from."""
import json
import subprocess
import sys

from conftest import REPO, launch_env


def test_gate_benchmark_smoke(tmp_path):
    out = tmp_path / "gate.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gate.py"), "--smoke", "--json", str(out)],
                          cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [row["k"] for row in rows] == [1, 2]
    for row in rows:
        assert row["topk_ms"] > 0 and row["sparsemixer_ms"] > 0 and row["floor_ms"] > 0
        assert row["vs_topk"] == row["sparsemixer_ms"] / row["topk_ms"]
        assert f"{row['vs_topk']:.2f}x" in proc.stdout


def test_fidelity_smoke_bears_out_the_estimators_facts(tmp_path):
    out = tmp_path / "fidelity.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "fidelity.py"), "--smoke", "--json", str(out)],
                          cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    # The midpoint rule is exact for a quadratic: with the coin on every draw, no bias at all.
    assert results["quadratic"]["midpoint-all"]["max_bias"] < 1e-10
    # heun3 leaves out the gating term (GRIN App. A.2): biased although its quadrature is exact for a cubic.
    assert results["cubic"]["heun3"]["bias"] > 0.1
    # Draws through the real routing function agree with the enumeration of D and the coin.
    for loss in results.values():
        for arm, row in loss.items():
            assert row["max_sampling_error"] < 5.0, (arm, row)
