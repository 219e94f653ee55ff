"""The native gates' global balance loss (GRIN) on real gloo process groups, started by the deepspeed launcher.

The one-process checks (global equals local without a process group, refused modes, DeepSpeed's own
l_aux for the baselines) are in tests/test_gate.py.
"""
import torch

CASES = ["sparsemixer-midpoint-k1", "sparsemixer-heun3-k2", "switch-k1"]  # tests/dist/balance_check.py


def assert_close(got, want, what):
    torch.testing.assert_close(got.double(), want.double(), rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}: {m}")


def test_global_balance_takes_route_shares_over_both_ranks(deepspeed_run):
    out_dir = deepspeed_run("balance_check.py", 2)
    for rank in range(2):
        results = torch.load(out_dir / f"rank{rank}.pt", weights_only=True)
        assert sorted(results) == sorted(CASES)
        for case, got in results.items():
            what = f"rank {rank}, {case}"
            assert got["same_routes"], f"{what}: local and global runs must route alike"
            counts_RE = got["counts_RE"]
            assert not torch.equal(counts_RE[0], counts_RE[1]), f"{what}: the ranks' batches must route differently"
            assert_close(got["global_R"], got["expect_R"], f"{what}: global balance, both ranks")
            assert_close(got["local"], got["local_expect"], f"{what}: local balance")
            assert abs(float(got["global_R"][rank]) - float(got["local"])) > 1e-2, \
                f"{what}: global {float(got['global_R'][rank]):.4f} should differ from local {float(got['local']):.4f}"
            assert_close(got["grad"], got["grad_expect"], f"{what}: router gradient of the global balance")
