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
