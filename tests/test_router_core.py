"""The router contract both MoE paths share (sparsemixer_ds.routing.core), its one options check, and the
import seam: reading a config loads neither torch nor DeepSpeed."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, launch_env
from transformers import PhimoeConfig, PhimoeForCausalLM

from sparsemixer_ds import SparseMixerGate
from sparsemixer_ds.config import ConfigError, load_config
from sparsemixer_ds.models import autoep
from sparsemixer_ds.routing.core import sparsemixer_routes
from sparsemixer_ds.routing.registry import ESTIMATORS, RouterOptionError, RouterOptions

# (option, bad value, what the refusal says after the option's name)
BAD_OPTIONS = [
    ("jitter_eps", -0.1, "must be a finite number >= 0"),
    ("balance_coef", -0.5, "must be a finite number >= 0"),
    ("z_loss_coef", -1.0, "must be a finite number >= 0"),
    ("balance", "median", "must be one of local, global"),
    ("routing_impl", "triton", "must be one of auto, eager, fused"),
    ("estimator", "reinmax", "must be one of midpoint, heun3"),
]


@pytest.mark.parametrize("option, value, says", BAD_OPTIONS)
def test_every_path_refuses_a_bad_router_option_with_the_same_words(option, value, says):
    """One check, four doors: the options themselves, the run config, the DeepSpeed gate and AutoEP's
    use_sparsemixer all refuse the same value saying the same thing."""
    with pytest.raises(RouterOptionError) as direct:
        RouterOptions(**{option: value}).check()
    message = str(direct.value)
    assert message.startswith(f"{option} {says}") and repr(value) in message
    if option != "estimator":  # the run config names a router, not an estimator
        with pytest.raises(ConfigError) as cfg:
            load_config(None, [f"moe.{option}={value}"])
        assert str(cfg.value) == f"moe.{message}"
    with pytest.raises(ValueError) as gate:
        SparseMixerGate(8, 4, **{option: value})
    assert str(gate.value) == message
    model = PhimoeForCausalLM(PhimoeConfig(vocab_size=32, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                                           num_attention_heads=2, num_key_value_heads=1, num_local_experts=4))
    ds = {"expert_parallel": {"enabled": True, "autoep_size": 1}}
    with pytest.raises(autoep.AutoEPError) as via_autoep:
        autoep.use_sparsemixer(model, ds, **{option: value})
    assert str(via_autoep.value) == message


def test_the_output_scale_belongs_to_the_rule():
    """omega is a property of the estimator's rule, read the same way by the layer, AutoEP and the cost model."""
    assert {name for name, rule in ESTIMATORS.items() if rule.omega} == {"midpoint", "midpoint-all"}
    assert RouterOptions(estimator="midpoint-all").omega and not RouterOptions(estimator=None).omega


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("z_loss_coef", [0.0, 1e-3])
def test_routes_counts_and_losses_from_logits(top_k, z_loss_coef):
    """sparsemixer_routes against its parts computed another way: counts by bincount over the routed tokens,
    Switch's balance and ST-MoE's z-loss in float64, l_aux with the coefficients applied."""
    torch.manual_seed(0)
    logits = torch.randn(200, 8, dtype=torch.float64, requires_grad=True)
    routed_S = torch.rand(200) < 0.8
    options = RouterOptions(estimator="heun3", balance_coef=0.01, z_loss_coef=z_loss_coef).check()
    got = sparsemixer_routes(logits, top_k, options, training=True, routed_S=routed_S)
    assert got.experts_SK.shape == got.weights_SK.shape == (200, top_k)
    want_counts = torch.bincount(got.experts_SK[routed_S].reshape(-1), minlength=8)
    assert torch.equal(got.counts_E, want_counts)
    probs = torch.softmax(logits.detach(), dim=1)
    balance = 8 * (probs.mean(0) * want_counts.double() / (200 * top_k)).sum()
    z = torch.logsumexp(logits.detach(), dim=1).square().mean()
    assert got.terms.balance.item() == pytest.approx(balance.item(), rel=1e-6)
    assert got.terms.z.item() == (pytest.approx(z.item(), rel=1e-6) if z_loss_coef else 0.0)
    assert got.l_aux.item() == pytest.approx(0.01 * balance.item() + z_loss_coef * z.item() * bool(z_loss_coef),
                                             rel=1e-6)
    # l_aux carries the gradient of the balance loss through the mean probabilities (counts carry none).
    got.l_aux.backward()
    want = torch.autograd.grad(0.01 * 8 * (F.softmax(logits, 1).mean(0) * want_counts / (200 * top_k)).sum()
                               + z_loss_coef * torch.logsumexp(logits, 1).square().mean(), logits)[0]
    np.testing.assert_allclose(logits.grad.numpy(), want.numpy(), rtol=1e-5, atol=1e-9)


def run_quietly(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in launch_env().items() if k != "DS_ACCELERATOR"}  # as a user's shell has it
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)


def test_reading_a_config_loads_neither_torch_nor_deepspeed():
    proc = run_quietly("import sys; import sparsemixer_ds; from sparsemixer_ds.config import load_config; "
                       "load_config('configs/cpu_small.yaml'); print(sorted(m for m in ('torch', 'deepspeed') "
                       "if m in sys.modules))")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_the_command_s_help_prints_no_deepspeed_line():
    bin_dir = os.path.dirname(sys.executable)
    proc = run_quietly(f"import subprocess; subprocess.run([{os.path.join(bin_dir, 'sparsemixer-ds')!r}, '--help'])")
    assert proc.returncode == 0 and "usage: sparsemixer-ds" in proc.stdout
    assert "accelerator" not in proc.stdout + proc.stderr and "DeepSpeed" not in proc.stderr, proc.stderr


def test_the_public_names_import_from_where_the_readme_shows_them():
    readme = (REPO / "README.md").read_text()
    for line in ("from sparsemixer_ds import sparsemixer, SparseMixerGate, SparseMixerMoE, convert",
                 "from sparsemixer_ds import autoep"):
        assert line in readme, line
    from sparsemixer_ds import SparseMixerGate as gate_class
    from sparsemixer_ds import SparseMixerMoE, convert, sparsemixer
    from sparsemixer_ds import autoep as autoep_module
    from sparsemixer_ds.models import moe
    from sparsemixer_ds.routing import estimator
    assert (gate_class, SparseMixerMoE, convert) == (moe.SparseMixerGate, moe.SparseMixerMoE, moe.convert)
    assert sparsemixer is estimator.sparsemixer and autoep_module is autoep
    assert autoep_module.use_sparsemixer is __import__("sparsemixer_ds").use_sparsemixer
