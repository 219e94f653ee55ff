"""sparsemixer_ds.models.flops against counts made another way: parameters of the built models, one expert's
parameters from the built module, and torch's FlopCounterMode on a forward and backward."""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from sparsemixer_ds.config import load_config
from sparsemixer_ds.models import hf
from sparsemixer_ds.models.families import get_family
from sparsemixer_ds.models.flops import measure_peak, peak_flops
from sparsemixer_ds.run.metrics import Utilisation
from sparsemixer_ds.testing import TINY

V = 50
CASES = {
    "native": (None, TINY + [f"model.vocab_size={V}", "moe.moe_every=1"]),
    "native-top2-learned": (None, TINY + [f"model.vocab_size={V}", "moe.router=sparsemixer-v2", "moe.top_k=2",
                                          "model.positions=learned", "model.n_layers=3"]),
    "native-midpoint-all": (None, TINY + [f"model.vocab_size={V}", "moe.router=midpoint-all"]),  # omega too
    "qwen3_moe-dense-layer": ("configs/cpu_qwen3_moe.yaml", [f"model.vocab_size={V}", "model.hf.mlp_only_layers=[1]"]),
    "qwen3_moe-midpoint": ("configs/cpu_qwen3_moe.yaml", [f"model.vocab_size={V}", "moe.router=sparsemixer",
                                                          "model.hf.num_experts_per_tok=1"]),
    "phimoe-biases-untied": ("configs/cpu_phimoe.yaml", [f"model.vocab_size={V}", "model.hf.attention_bias=true",
                                                         "model.hf.lm_head_bias=true",
                                                         "model.hf.tie_word_embeddings=false"]),
    "mixtral": ("configs/cpu_mixtral.yaml", [f"model.vocab_size={V}"]),
}


def config(name):
    path, sets = CASES[name]
    return load_config(path, sets)


@pytest.mark.parametrize("name", CASES)
def test_total_and_active_parameters_are_the_built_models(name):
    cfg = config(name)
    family = get_family(cfg)
    cost = family.cost(cfg)
    model = family.build(cfg)
    assert cost.total == sum(p.numel() for p in model.parameters())
    # One expert's parameters, from the module: native experts are modules, HF's a fused [E, ...] tensor.
    if cfg.model.family == "native":
        moe_block = next(b.ffn for b in model.blocks if hasattr(b.ffn, "deepspeed_moe"))
        one = sum(p.numel() for p in moe_block.deepspeed_moe.experts.deepspeed_experts[0].parameters())
        experts = sum(p.numel() for n, p in model.named_parameters() if "deepspeed_experts" in n)
    else:
        one = sum(p[0].numel() for n, p in model.named_parameters() if ".layers.0.mlp.experts." in n)
        experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert cost.expert == experts
    assert cost.active == cost.total - cost.moe_layers * (cost.num_experts - cost.top_k) * one


def counted_flops(model, tokens):
    """FLOPs torch counts for a forward and backward; attention through the math kernel (the CPU's fused
    one is not in the counter's table), HF experts run one by one (grouped_mm is not either)."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        logits = model(tokens).logits
        logits.float().logsumexp(-1).mean().backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("name", ["qwen3_moe-dense-layer", "phimoe-biases-untied", "mixtral"])
def test_hf_flops_per_token_are_what_torch_counts(name):
    """Dropless top-k experts run exactly top_k experts per token: the count is exact, but for the
    rotary frequencies' tiny matmul (inv_freq x positions), which is not the model's."""
    cfg = config(name)
    cost = get_family(cfg).cost(cfg)
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_config(hf.hf_config(cfg), experts_implementation="eager")
    tokens = torch.randint(0, V, (2, cfg.model.seq_len))
    assert counted_flops(model, tokens) == pytest.approx(cost.flops_per_token * tokens.numel(), rel=1e-5)


def test_native_flops_per_token_are_what_torch_counts_without_moe_layers():
    """The native MoE layer's capacity einsums are matmuls over padded slots, not model FLOPs, so the exact
    comparison is on the same model with no MoE block (moe_every beyond n_layers)."""
    cfg = load_config(None, TINY + [f"model.vocab_size={V}", "moe.moe_every=3"])
    cost = get_family(cfg).cost(cfg)
    assert cost.moe_layers == 0 and cost.router_flops == 0
    model = get_family(cfg).build(cfg)
    tokens = torch.randint(0, V, (2, cfg.model.seq_len))
    assert counted_flops(model, tokens) == cost.flops_per_token * tokens.numel()


def test_flops_formula_worked_by_hand_for_the_tiny_moe_model():
    """TINY, every block MoE: M 32, 2 layers, T 32, 4 experts of width 32, top_1, V 50, tied head."""
    cfg = config("native")
    cost = get_family(cfg).cost(cfg)
    M, L, T, E, Fe = 32, 2, 32, 4, 32
    matmul = L * (4 * M * M + 1 * 2 * M * Fe) + V * M  # attention, one expert, the LM head
    assert cost.matmul_active == matmul
    assert cost.flops_per_token == 6 * matmul + 12 * L * T * M + 6 * L * M * E


def test_peak_is_the_config_value_or_a_measured_matmul():
    cfg = load_config(None, ["train.peak_tflops=312"])
    assert peak_flops(cfg, {}, torch.device("cpu")) == (312e12, "train.peak_tflops")
    measured = measure_peak(torch.device("cpu"), torch.float32, size=256, repeats=2)
    assert measured.flops > 0 and "float32 matmul 256x256 on cpu, best of 2" in measured.source


def test_utilisation_is_model_flops_per_rank_over_the_peak():
    achieved, mfu = Utilisation(flops_per_token=1000, peak_flops=1e6, world=4).of(tokens_per_s=2000.0)
    assert achieved == 1000 * 2000 / 4 and mfu == achieved / 1e6


def test_a_run_logs_model_flops_and_mfu_against_its_recorded_peak(tmp_path, corpus):
    """Two ranks under the launcher: every training record's model TFLOP/s is flops_per_token x tokens/s /
    ranks, its MFU that over the peak the start recorded (measured: no train.peak_tflops), and the CSV
    monitor gets both; the summary says the last MFU."""
    import json
    import subprocess

    from conftest import REPO, free_port, launch_env, run_metrics, set_args
    run_dir = tmp_path / "run"
    cmd = ["bash", str(REPO / "launch" / "local.sh"), "--nproc", "2", "--master-port", str(free_port()), "--",
           "--set", f"run_dir={run_dir}", "--set", f"data.path={corpus}"]
    cmd += set_args("train.steps=4", "logging.interval=2", "eval.interval=4", "logging.plot=false",
                    "train.peak_tflops=0")
    proc = subprocess.run(cmd, cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    header = "".join(line[2:] for line in (run_dir / "starts" / "start_001.yaml").read_text().splitlines()
                     if line.startswith("# "))
    start = json.loads(header)
    assert start["peak"].startswith("measured: float32 matmul 1024x1024 on cpu") and start["peak_tflops"] > 0
    cfg = load_config(run_dir / "config.yaml", [])
    flops_per_token = get_family(cfg).cost(cfg).flops_per_token
    assert start["flops_per_token"] == flops_per_token
    records = [r for r in run_metrics(run_dir) if "loss" in r]
    assert [r["step"] for r in records] == [2, 4]
    for r in records:
        assert r["model_tflops"] == pytest.approx(flops_per_token * r["tokens_per_s"] / 2 / 1e12, rel=1e-12)
        assert r["mfu"] == pytest.approx(r["model_tflops"] / start["peak_tflops"], rel=1e-12)
        assert r["peak_mem_mb"] >= r["rss_mb"] > 0  # on a CPU: the peak resident set, never below the current one
    assert list((run_dir).rglob("Train_mfu.csv")) and list((run_dir).rglob("Train_model_tflops.csv"))
    assert f"model FLOPs utilisation {records[-1]['mfu']:.1%}" in proc.stdout
