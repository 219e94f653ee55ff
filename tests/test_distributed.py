"""Expert parallelism on real gloo process groups, started by the real deepspeed launcher."""
import json

import pytest
import torch
from conftest import REPO
from models import EP_CASES, ep_batch, ep_loss, sparsemixer_layer


def assert_close(got, want, what):
    assert got is not None and want is not None, what
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("case", sorted(EP_CASES))
def test_two_ranks_with_ep_size_2_match_one_process_with_ep_size_1(deepspeed_run, case):
    out_dir = deepspeed_run("ep_equivalence.py", 2, "--case", case)
    # The reference: one process holding all four experts routes each rank's batch with that
    # rank's seed. Expert gradients add up over both batches, as the all-to-all's backward does.
    layer = sparsemixer_layer(ep_size=1, seed=0, **EP_CASES[case])
    expert_grads = {}
    ranks = [torch.load(out_dir / f"rank{rank}.pt", weights_only=True) for rank in range(2)]
    for rank, got in enumerate(ranks):
        layer.zero_grad(set_to_none=True)
        torch.manual_seed(100 + rank)
        out, l_aux, exp_counts = layer(ep_batch(rank))
        ep_loss(out, l_aux).backward()
        assert_close(got["out"], out.detach(), f"rank {rank} output")
        assert_close(got["l_aux"], l_aux.detach(), f"rank {rank} balance loss")
        assert torch.equal(got["exp_counts"], exp_counts)
        assert_close(got["router_grad"], layer.gate.wg.weight.grad, f"rank {rank} router gradient")
        if layer.omega is not None:
            assert_close(got["omega_grad"], layer.omega.grad, f"rank {rank} omega gradient")
        for j, expert in enumerate(layer.deepspeed_moe.experts.deepspeed_experts):
            for name, p in expert.named_parameters():
                key = f"{j}.{name}"
                expert_grads[key] = expert_grads.get(key, 0) + p.grad
    seen = set()
    for rank, got in enumerate(ranks):
        for key, grad in got["expert_grads"].items():
            assert_close(grad, expert_grads[key], f"rank {rank} expert {key} gradient")
            seen.add(key)
    assert seen == set(expert_grads), "the two ranks hold all four experts between them"


def test_convert_then_train_with_zero2_on_two_ranks(deepspeed_run):
    out_dir = deepspeed_run("convert_train.py", 2, "--ds-config", str(REPO / "ds_configs" / "cpu.json"))
    for rank in range(2):
        result = json.loads((out_dir / f"rank{rank}.json").read_text())
        assert result["converted"] == 2
        assert result["engine_has_moe_layers"] and result["gate_classes"] == ["SparseMixerGate"]
        assert result["zero_stage"] == 2
        losses = result["losses"]
        first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
        assert last < 0.7 * first, f"rank {rank}: loss {first:.3f} -> {last:.3f} did not fall"
        norms = result["router_grad_norms"]
        assert len(norms) == 2 * len(losses) and all(n > 0 for n in norms), "both routers get a gradient every step"
        assert all(change > 1e-4 for change in result["omega_change"]), "omega trains"
