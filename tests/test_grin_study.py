"""benchmarks/grin_study.py: its statistics against values worked out by hand, and launched runs end to end."""
import json
import statistics
import subprocess
import sys

import pytest
from conftest import REPO, launch_env

sys.path.insert(0, str(REPO / "benchmarks"))
import grin_study  # noqa: E402

T4 = 2.776  # Student's t, 95% two-sided, 4 degrees of freedom


def run(arm, seed, final, steps=(100, 200, 300, 400), load=0.5):
    """A finished run whose validation loss falls linearly from final + 0.3 to ``final`` over ``steps``."""
    n = len(steps)
    curve = [{"step": s, "val_loss": final + 0.3 * (n - 1 - i) / (n - 1)} for i, s in enumerate(steps)]
    k = grin_study.ARMS[arm][0]
    return {"arm": arm, "seed": seed, "k": k, "curve": curve, "tokens": 1000,
            "load": [{"step": s, "tokens": 10 * s, "max_mean_load": load, "entropy": 1.0} for s in steps]}


NOISE = [0.00, 0.03, -0.02, 0.01, -0.01]  # per seed, shared by every arm: pairing removes it


def study(shift: dict, jitter=(0.0, 0.004, -0.004, 0.002, -0.002)):
    """Runs of every arm at both k over 5 seeds: final loss 3 + NOISE[seed] + shift[arm] (+ jitter on the
    SparseMixer-global arms, so that their intervals have a width)."""
    runs = []
    for arm in grin_study.ARMS:
        for seed in range(5):
            extra = jitter[seed] if arm.endswith("v2+global") or arm == "sparsemixer+global" else 0.0
            runs.append(run(arm, seed, 3.0 + NOISE[seed] + shift.get(arm, 0.0) + extra))
    return runs


def test_effects_and_paired_deltas_are_the_2x2_by_hand():
    shift = {"switch+global": 0.01, "sparsemixer+local": -0.02, "sparsemixer+global": -0.05,
             "gshard+global": -0.03, "sparsemixer-v2+local": 0.0, "sparsemixer-v2+global": -0.01}
    summary = grin_study.summarize(study(shift))
    top1 = summary["effects"][1]
    # router: ((sl - bl) + (sg - bg)) / 2 = (-0.02 + (-0.05 - 0.01)) / 2; balance: ((bg - bl) + (sg - sl)) / 2;
    # interaction: (sg - bg) - (sl - bl). The jitter on sparsemixer+global enters each with weight 1/2, 1/2, 1.
    jitter = [0.0, 0.004, -0.004, 0.002, -0.002]
    sd = statistics.stdev(jitter)
    for name, mean, weight in (("router", -0.04, 0.5), ("balance", -0.01, 0.5), ("interaction", -0.04, 1.0)):
        assert top1[name]["mean"] == pytest.approx(mean, abs=1e-12)
        assert top1[name]["ci95"] == pytest.approx(T4 * weight * sd / 5 ** 0.5, rel=1e-9)
        assert top1[name]["seeds"] == 5
    top2 = summary["effects"][2]
    assert top2["router"]["mean"] == pytest.approx((0.0 + (-0.01 + 0.03)) / 2, abs=1e-12)
    assert top2["balance"]["mean"] == pytest.approx((-0.03 + -0.01) / 2, abs=1e-12)
    grin_pair = summary["arms"]["sparsemixer-v2+global"]
    assert grin_pair["delta"] == pytest.approx(-0.01, abs=1e-12) and grin_pair["paired_seeds"] == 5
    assert grin_pair["delta_ci95"] == pytest.approx(T4 * sd / 5 ** 0.5, rel=1e-9)
    plain = summary["arms"]["sparsemixer+local"]
    assert plain["delta"] == pytest.approx(-0.02, abs=1e-12) and plain["delta_ci95"] == pytest.approx(0, abs=1e-12)
    assert "delta" not in summary["arms"]["switch+local"], "a baseline has no delta to itself"
    finals = [3.0 + n for n in NOISE]
    assert summary["arms"]["switch+local"]["final_mean"] == pytest.approx(statistics.fmean(finals))
    assert summary["arms"]["switch+local"]["final_std"] == pytest.approx(statistics.stdev(finals))


def test_simple_effects_pair_the_seeds_their_two_arms_share():
    shift = {"switch+global": 0.01, "sparsemixer+local": -0.02, "sparsemixer+global": -0.05}
    runs = study(shift)
    # An extension gave the two SparseMixer arms seeds 5 and 6: global - local is -0.03 + jitter there too.
    extra = {5: (3.10, 3.07 + 0.006), 6: (2.95, 2.92 - 0.006)}
    for seed, (local, global_) in extra.items():
        runs += [run("sparsemixer+local", seed, local), run("sparsemixer+global", seed, global_)]
    summary = grin_study.summarize(runs)
    simple = summary["simple"][1]
    diffs = [-0.03 + j for j in (0.0, 0.004, -0.004, 0.002, -0.002, 0.006, -0.006)]
    sparse = simple["balance with sparsemixer"]
    assert sparse["seeds"] == 7 and sparse["mean"] == pytest.approx(statistics.fmean(diffs), abs=1e-12)
    assert sparse["ci95"] == pytest.approx(2.447 * statistics.stdev(diffs) / 7 ** 0.5, rel=1e-9)  # t, 6 dof
    assert simple["balance with switch"] == pytest.approx({"mean": 0.01, "ci95": 0.0, "seeds": 5}, abs=1e-12)
    assert simple["router with local balance"]["mean"] == pytest.approx(-0.02, abs=1e-12)
    assert simple["router with global balance"]["mean"] == pytest.approx(-0.05 - 0.01, abs=1e-12)
    assert simple["router with global balance"]["seeds"] == 5
    assert summary["effects"][1]["balance"]["seeds"] == 5, "the 2 x 2 keeps to the seeds all four arms share"
    assert "| balance with sparsemixer | -0.0300 ± " in grin_study.report(summary, runs)


def test_reach_step_and_its_bootstrap_interval():
    # The baseline ends at 3.0 + noise (mean 3.002); an arm 0.1 lower everywhere reaches that a third of the way
    # between its evaluations at 300 and 400: its curve falls 0.1 per 100 steps.
    runs = study({"sparsemixer+local": -0.1, "sparsemixer+global": -0.5, "switch+global": 0.05})
    rows = grin_study.summarize(runs)["arms"]
    row = rows["sparsemixer+local"]
    assert row["reach_step"] == pytest.approx(300.0, abs=1e-6)
    assert row["reach_share"] == 1.0 and row["reach_lo"] == pytest.approx(300.0) == row["reach_hi"], \
        "the same shift on every seed: every resample reaches it at the same step"
    assert rows["sparsemixer+global"]["reach_step"] == 100, "lower than the target from the first evaluation"
    late = rows["switch+global"]
    assert late["reach_step"] is None and late["reach_share"] == 0.0 and late["reach_hi"] is None


def test_undecided_arms_get_more_seeds():
    decided = grin_study.summarize(study({"sparsemixer+global": -0.05}))
    assert "sparsemixer+global" not in grin_study.undecided(decided)
    noisy = study({"sparsemixer+global": -0.01}, jitter=(0.0, 0.03, -0.03, 0.02, -0.02))
    summary = grin_study.summarize(noisy)
    row = summary["arms"]["sparsemixer+global"]
    assert abs(row["delta"]) > 0.005 and abs(row["delta"]) <= row["delta_ci95"]
    assert grin_study.undecided(summary) == ["sparsemixer+global"]


def test_read_run_takes_the_last_record_of_each_step_and_skips_the_resumed_evaluation():
    layer = {"max_mean_load": 2.0, "entropy": 1.0}
    records = [{"step": 1, "tokens": 10, "layers": [layer, {"max_mean_load": 4.0, "entropy": 2.0}]},
               {"step": 2, "tokens": 20, "layers": [layer]}, {"step": 2, "val_loss": 5.0},
               {"step": 2, "resumed": True, "val_loss": 4.9},
               {"step": 2, "tokens": 20, "layers": [{"max_mean_load": 3.0, "entropy": 0.5}]},
               {"step": 2, "val_loss": 4.8}]
    got = grin_study.read_run(records)
    assert got["curve"] == [{"step": 2, "val_loss": 4.8}]
    assert got["load"] == [{"step": 1, "tokens": 10, "max_mean_load": 3.0, "entropy": 1.5},
                           {"step": 2, "tokens": 20, "max_mean_load": 3.0, "entropy": 0.5}]
    assert got["tokens"] == 20


def test_study_smoke_launched_and_resumable(tmp_path, corpus):
    out = tmp_path / "grin"
    args = [sys.executable, str(REPO / "benchmarks" / "grin_study.py"), "--smoke", "--set", f"data.path={corpus}",
            "--out", str(out)]
    proc = subprocess.run(args, cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = {p.name: json.loads(p.read_text()) for p in out.glob("*-seed*.json")}
    assert set(runs) == {"switch+local-seed0.json", "sparsemixer+global-seed0.json"}
    for result in runs.values():
        assert [p["step"] for p in result["curve"]] == [2, 4] and [p["step"] for p in result["load"]] == [1, 2, 3, 4]
        assert result["tokens"] == 4 * 4 * 2 * 32, "4 steps of 4 sequences of 32 tokens on each of 2 ranks"
        assert all(p["max_mean_load"] >= 1.0 and p["entropy"] > 0 for p in result["load"])
    assert runs["sparsemixer+global-seed0.json"]["balance"] == "global"
    assert not (out / "runs").exists() or not any((out / "runs").iterdir()), "finished run directories removed"
    summary = json.loads((out / "summary.json").read_text())
    row = summary["arms"]["sparsemixer+global"]
    assert row["paired_seeds"] == 1 and row["delta"] == pytest.approx(
        runs["sparsemixer+global-seed0.json"]["curve"][-1]["val_loss"] - runs["switch+local-seed0.json"]["curve"][-1][
            "val_loss"])
    assert "| sparsemixer+global | 1 |" in (out / "report.md").read_text()
    assert (out / "study.png").stat().st_size > 10000
    again = subprocess.run(args, cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "final val_loss" not in again.stdout, "finished runs are not repeated"
    assert json.loads((out / "summary.json").read_text()) == summary
