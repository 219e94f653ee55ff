"""Hugging Face checkpoints out of and into model.family hf runs (sparsemixer_ds.models.hf_checkpoint).

``export --format hf`` writes a directory that transformers loads without DeepSpeed, computing what the
trained model computed; ``train --init-from`` starts a run from one on any ep_size. Three tiny runs
(PhiMoE heun3 and Mixtral heun3 under ZeRO-3, each on 2 ranks with ep_size 2 through launch/local.sh;
PhiMoE midpoint on one rank) train at once, and two --init-from runs after them.
"""
import json
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import REPO, free_port, launch_env, run_metrics
from safetensors.torch import load_file

from sparsemixer_ds.cli import main as cli_main
from sparsemixer_ds.config import ConfigError, config_dict, load_config
from sparsemixer_ds.data.loader import eval_batches
from sparsemixer_ds.data.prepare import prepare
from sparsemixer_ds.data.prepared import open_split
from sparsemixer_ds.data.tokenizer import BpeTokenizer, ByteTokenizer
from sparsemixer_ds.export import load_checkpoint_model
from sparsemixer_ds.models.hf_checkpoint import export_hf, write_tokenizer
from sparsemixer_ds.routing.estimator import sparsemixer
from sparsemixer_ds.train import evaluate, preflight

COMMON = {"hidden_size": 32, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "num_local_experts": 4, "num_experts_per_tok": 2}
HF = {"phimoe": {"model_type": "phimoe", "router_jitter_noise": 0.01, **COMMON},
      "mixtral": {"model_type": "mixtral", **COMMON}}
STEPS = 3
TEXTS = ["def main(argv):\n\treturn 0\n", "  héllo wörld, naïve café — 日本語 🎉\r\n", "<|endoftext|> is text here",
         "a\x00b\x7f\u0085\u2028c", ""]


def write_config(path: Path, corpus, model_type, hf=None, ds_config="cpu.json", **sections) -> Path:
    values = {"run_dir": str(path.parent / path.stem), "ds_config": str(REPO / "ds_configs" / ds_config),
              "model": {"family": "hf", "seq_len": 32, "hf": {**HF[model_type], **(hf or {})}},
              "moe": {"router": "sparsemixer-v2", "ep_size": 1, "balance": "global"},
              "data": {"path": str(corpus)},
              "train": {"micro_batch": 4, "steps": STEPS, "lr": 0.01, "warmup_steps": 1},
              "eval": {"interval": STEPS, "batches": 2, "batch_size": 4},
              "checkpoint": {"interval": STEPS, "keep": 1},
              "logging": {"interval": 1, "progress": False, "plot": False}}
    for section, changes in sections.items():
        values[section].update(changes)
    path.write_text(yaml.safe_dump(values))
    return path


def start(config: Path, *args, nproc: int):
    """A training job, not waited for: 2 ranks through launch/local.sh, or one rank started directly."""
    env = launch_env()
    if nproc == 1:
        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        cmd = [sys.executable, "-m", "sparsemixer_ds.cli", "train", "--config", str(config), *args]
    else:
        cmd = ["bash", str(REPO / "launch" / "local.sh"), "--config", str(config), "--nproc", str(nproc),
               "--master-port", str(free_port()), "--", *args]
    return cmd, subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(job, timeout=500):
    cmd, proc = job
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{out[-3000:]}\n{err[-5000:]}"
    return out + err


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus):
    """Finished runs, each with its export (name -> (config, run directory, export directory)):
    PhiMoE heun3 on 2 ranks with ep_size 2 (ZeRO-2: a file per expert), PhiMoE with the midpoint
    estimator on one rank (top-1, omega) and Mixtral heun3 on 2 ranks with ep_size 2 under ZeRO-3 (each
    rank's partitions), STEPS steps each, a checkpoint at the end; then, from the PhiMoE export, one step with
    --init-from on 2 ranks with ep_size 2 (init2) and on one rank (init1). Jobs overlap where they can."""
    tmp = tmp_path_factory.mktemp("hf_runs")
    configs = {
        "phimoe": write_config(tmp / "phimoe.yaml", corpus, "phimoe", moe={"ep_size": 2}),
        "midpoint": write_config(tmp / "midpoint.yaml", corpus, "phimoe", hf={"num_experts_per_tok": 1},
                                 moe={"router": "sparsemixer"}, train={"lr": 0.05}),
        "mixtral": write_config(tmp / "mixtral.yaml", corpus, "mixtral", ds_config="cpu_zero3.json",
                                moe={"jitter_eps": 0.1, "ep_size": 2}),
        "init2": write_config(tmp / "init2.yaml", corpus, "phimoe", moe={"ep_size": 2}, train={"steps": 1}),
        "init1": write_config(tmp / "init1.yaml", corpus, "phimoe", train={"steps": 1}),
    }
    jobs = {name: start(configs[name], nproc=1 if name == "midpoint" else 2) for name in ("phimoe", "midpoint", "mixtral")}
    exports = {}

    def export(name):
        finish(jobs[name])
        exports[name] = tmp / f"{name}-hf"
        notes = export_hf(tmp / name, exports[name])
        assert bool(notes) == (name != "phimoe"), notes  # HF's own forward is the trained eval rule for PhiMoE top-2

    export("phimoe")
    for ep in (2, 1):
        jobs[f"init{ep}"] = start(configs[f"init{ep}"], "--init-from", str(exports["phimoe"]), nproc=ep)
    export("midpoint")
    export("mixtral")
    for ep in (2, 1):
        finish(jobs[f"init{ep}"])
    return {name: (config, tmp / name, exports.get(name)) for name, config in configs.items()}


def hf_model(path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True).eval()


def val_batches(cfg, world: int):
    """The validation batches of every rank of a world of ``world``, as the trainer's evaluation takes them."""
    tokens = open_split(Path(cfg.data.path), "val")
    return [batch for rank in range(world)
            for batch in eval_batches(tokens, cfg.model.seq_len, cfg.eval.batch_size, rank, world, cfg.eval.batches)]


def val_loss(model, cfg, world: int = 1) -> float:
    return evaluate(model, val_batches(cfg, world), cfg.train.seed, 0, 0, torch.device("cpu"))["val_loss"]


def _sparsemixer_eval_route(router, top_k, jitter_eps, hidden_states):
    """SparseMixer's eval rule (argmax of the jitter-masked softmax, its probability; top_k rounds) in
    place of an HF TopKRouter's forward: (router logits, weights [T, K], experts [T, K])."""
    logits = F.linear(hidden_states.reshape(-1, router.weight.shape[1]), router.weight)
    experts, weights = sparsemixer(logits, top_k, jitter_eps, training=False, estimator="heun3")
    return logits, weights.to(logits.dtype), experts


def route_like_sparsemixer(model, top_k, jitter_eps):
    """An HF MoE model (PhiMoE, Mixtral) routed by SparseMixer's eval rule instead of its own."""
    routers = [m for m in model.modules() if type(m).__name__.endswith("TopKRouter")]
    assert len(routers) == model.config.num_hidden_layers
    for router in routers:
        router.forward = partial(_sparsemixer_eval_route, router, top_k, jitter_eps)
    return model


def logits_of(model, cfg):
    with torch.no_grad():
        return torch.cat([model(x).logits for x, _ in val_batches(cfg, 1)])


def test_exported_phimoe_computes_the_trained_models_logits(runs):
    """from_pretrained, HF's own PhiMoE forward (SparseMixer-v2's eval rule): the trained model's eval
    logits, from a run on 2 ranks with ep_size 2, and the validation loss that run logged."""
    _, run_dir, out = runs["phimoe"]
    trained, cfg = load_checkpoint_model(run_dir)
    exported = hf_model(out)
    assert type(exported).__name__ == "PhimoeForCausalLM"
    want, got = logits_of(trained, cfg), logits_of(exported, cfg)
    print(f"phimoe heun3: max |logit difference| {float((want - got).abs().max()):.3g}")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    logged = [m for m in run_metrics(run_dir) if "val_loss" in m][-1]
    assert logged["step"] == STEPS
    assert val_loss(exported, cfg, world=2) == pytest.approx(logged["val_loss"], rel=1e-5)
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == 257 and config["output_router_logits"] is False
    assert config["eos_token_id"] == 256 and config["architectures"] == ["PhimoeForCausalLM"]


def test_an_ep_size_2_run_exports_every_expert_as_its_checkpoint_files_hold_it(runs):
    """Each expert file of the 2-rank run (experts 0-1 saved by rank 0, 2-3 by rank 1) against the
    exported model's gate_up_proj [E, 2I, M] (gate rows first) and down_proj [E, M, I]."""
    _, run_dir, out = runs["phimoe"]
    tensors = hf_model(out).state_dict()
    tag = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    inner = COMMON["intermediate_size"]
    for layer in range(COMMON["num_hidden_layers"]):
        gate_up = tensors[f"model.layers.{layer}.mlp.experts.gate_up_proj"]
        down = tensors[f"model.layers.{layer}.mlp.experts.down_proj"]
        assert gate_up.shape == (4, 2 * inner, 32) and down.shape == (4, 32, inner)
        for expert in range(4):
            saved = torch.load(tag / f"layer_{layer}_expert_{expert}_mp_rank_00_model_states.pt", weights_only=True)
            w = {name.split(".")[-2]: tensor.float() for name, tensor in saved.items()}
            assert torch.equal(gate_up[expert, :inner], w["w1"]) and torch.equal(gate_up[expert, inner:], w["w3"])
            assert torch.equal(down[expert], w["w2"])
        assert f"model.layers.{layer}.mlp.router.weight" in tensors


def test_midpoint_omega_folds_into_down_proj(runs):
    """The midpoint run's omega is no parameter of the export, and the export computes the trained
    logits (routed by SparseMixer's top-1 eval rule: HF's PhiMoE always routes top-2, as the export notes)."""
    _, run_dir, out = runs["midpoint"]
    trained, cfg = load_checkpoint_model(run_dir)
    omega = trained.get_submodule("model.layers.0.mlp_omega").omega.detach()
    assert float((omega - 1).abs().max()) > 1e-3, "omega trained away from 1: the fold is tested"
    assert not [name for name in load_file(str(out / "model.safetensors")) if "omega" in name]
    assert not [name for name in hf_model(out).state_dict() if "omega" in name]
    exported = route_like_sparsemixer(hf_model(out), 1, 0.01)
    want, got = logits_of(trained, cfg), logits_of(exported, cfg)
    print(f"phimoe midpoint: max |logit difference| {float((want - got).abs().max()):.3g}")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    unfolded = route_like_sparsemixer(hf_model(out), 1, 0.01)
    with torch.no_grad():
        for layer in range(COMMON["num_hidden_layers"]):
            scale = trained.get_submodule(f"model.layers.{layer}.mlp_omega").omega
            unfolded.get_submodule(f"model.layers.{layer}.mlp.experts").down_proj.div_(scale[None, :, None])
    assert not torch.allclose(logits_of(unfolded, cfg), want, rtol=1e-5, atol=1e-5), "without omega: other logits"


def test_exported_mixtral_holds_the_trained_weights_and_its_loss_under_hf_routing(runs, capsys):
    """Mixtral's HF router (softmax top-2, renormalised) is not SparseMixer's eval rule: with that rule
    patched in, the export of a ZeRO-3 run on 2 ranks with ep_size 2 computes the trained model's logits
    and its logged validation loss (every expert, names and gate/up/down layout right); under HF's own
    routing its validation loss is measured against the trained model's."""
    _, run_dir, out = runs["mixtral"]
    trained, cfg = load_checkpoint_model(run_dir)
    tensors = hf_model(out).state_dict()
    assert "model.layers.0.mlp.gate.weight" in tensors and not [n for n in tensors if "router" in n]
    patched = route_like_sparsemixer(hf_model(out), 2, cfg.moe.jitter_eps)
    torch.testing.assert_close(logits_of(patched, cfg), logits_of(trained, cfg), rtol=1e-5, atol=1e-5)
    logged = [m for m in run_metrics(run_dir) if "val_loss" in m][-1]
    assert val_loss(patched, cfg, world=2) == pytest.approx(logged["val_loss"], rel=1e-5)
    own, sparse = val_loss(hf_model(out), cfg, world=2), val_loss(trained, cfg, world=2)
    with capsys.disabled():
        print(f"\nmixtral val loss: HF's own routing {own:.4f}, SparseMixer's eval rule {sparse:.4f}")
    assert abs(own - sparse) < 1.0


def test_init_from_an_export_on_ep_size_2_and_1_starts_from_its_loss(runs):
    """The exported PhiMoE as a new run's weights, through the launch script on 2 ranks (ep_size 2) and
    on one rank (ep_size 1): the first evaluation, before any step, is the export's validation loss
    computed here in one process with transformers alone; the start record names the directory."""
    out = runs["phimoe"][2]
    exported = hf_model(out)
    for ep in (2, 1):
        config, run_dir, _ = runs[f"init{ep}"]
        first = run_metrics(run_dir)[0]
        assert first["step"] == 0 and first["init_from"] == str(out.resolve())
        want = val_loss(exported, load_config(config), world=ep)
        print(f"--init-from on ep_size {ep}: step-0 val_loss {first['val_loss']:.6f}, the export's {want:.6f}")
        assert first["val_loss"] == pytest.approx(want, rel=1e-5)
        assert f'"init_from": "{out.resolve()}"' in (run_dir / "starts" / "start_001.yaml").read_text()
        assert [m["step"] for m in run_metrics(run_dir) if "loss" in m] == [1]


def test_tokenizer_of_byte_data_has_the_byte_ids(corpus, tmp_path):
    from transformers import AutoTokenizer
    write_tokenizer(corpus, tmp_path, 4096)
    tok, ref = AutoTokenizer.from_pretrained(str(tmp_path)), ByteTokenizer()
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == 256 and len(tok) == 257
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == ref.encode(text), text
        assert tok.decode(ids + [256], skip_special_tokens=True) == ref.decode(ids + [256]) == text
    assert tok.decode(list(range(256))) == ref.decode(list(range(256)))


def test_tokenizer_of_bpe_data_is_the_datas(tmp_path):
    from transformers import AutoTokenizer
    sources = [str(p) for p in sorted((REPO / "sparsemixer_ds").glob("*.py"))[:6]]
    data = tmp_path / "bpe"
    prepare(sources, data, tokenizer="bpe", vocab_size=300, val_fraction=0.2, progress=False)
    write_tokenizer(data, tmp_path / "out", 4096)
    tok, ref = AutoTokenizer.from_pretrained(str(tmp_path / "out")), BpeTokenizer.from_file(data / "tokenizer.json")
    assert tok.eos_token_id == ref.eos_id and len(tok) == ref.vocab_size
    for text in TEXTS + [Path(sources[0]).read_text()[:2000]]:
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == ref.encode(text), text
        assert tok.decode(ids, skip_special_tokens=True) == ref.decode(ids) == text


# ------------------------------------------------------------------------------------ refused before work

def test_export_hf_refuses_a_native_run_and_a_used_out_dir(tmp_path, corpus, capsys):
    native = tmp_path / "native"
    native.mkdir()
    cfg = load_config(None, [f"data.path={corpus}", f"run_dir={native}"])
    (native / "config.yaml").write_text(yaml.safe_dump(config_dict(cfg)))
    assert cli_main(["export", "--run", str(native), "--format", "hf", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "--format hf: the run in" in err and "model.family 'native'" in err and "--format safetensors" in err
    used = tmp_path / "used"
    used.mkdir()
    (used / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="already exists and is not an empty directory"):
        export_hf(native, used)
    assert (used / "keep.txt").read_text() == "mine" and not (tmp_path / "out").exists()


def refused(tmp_path, corpus, init_from, resume=False, **changes) -> str:
    config = write_config(tmp_path / "run.yaml", corpus, "phimoe", **changes)
    with pytest.raises(ConfigError) as err:
        preflight(load_config(config), world=1, resume=resume, init_from=str(init_from))
    assert not (tmp_path / "run").exists(), "nothing written"
    return str(err.value)


def hf_dir(tmp_path, name, config=None, weights=True) -> Path:
    path = tmp_path / name
    path.mkdir()
    if config is not None:
        (path / "config.json").write_text(json.dumps(config))
    if weights:
        (path / "model.safetensors").write_bytes(b"")
    return path


def test_init_from_refusals_name_the_thing_the_value_and_the_fix(tmp_path, corpus):
    phimoe = {**HF["phimoe"], "vocab_size": 257}
    message = refused(tmp_path, corpus, hf_dir(tmp_path, "empty"))
    assert "no config.json there" in message and "export --format hf" in message
    message = refused(tmp_path, corpus, hf_dir(tmp_path, "bin", phimoe, weights=False))
    assert "no safetensors weights (model.safetensors or model.safetensors.index.json)" in message
    message = refused(tmp_path, corpus, hf_dir(tmp_path, "mixtral", {**phimoe, "model_type": "mixtral"}))
    assert "its model_type is 'mixtral', the run's is 'phimoe'" in message
    message = refused(tmp_path, corpus, hf_dir(tmp_path, "wide", {**phimoe, "hidden_size": 64, "vocab_size": 300}))
    assert "hidden_size: 64 in the checkpoint, 32 in the run" in message
    assert "vocab_size: 300 in the checkpoint, 257 in the run" in message and "--tokenizer" in message
    assert "intermediate_size" not in message
    same = hf_dir(tmp_path, "same", phimoe)
    assert "--resume continues run_dir's own checkpoints" in refused(tmp_path, corpus, same, resume=True)
    native = tmp_path / "native.yaml"
    cfg = load_config(None, [f"data.path={corpus}", f"run_dir={tmp_path / 'run'}"])
    native.write_text(yaml.safe_dump(config_dict(cfg)))
    with pytest.raises(ConfigError, match="model.family is 'native'; only model.family hf runs"):
        preflight(load_config(native), world=1, resume=False, init_from=str(same))
    plan = preflight(load_config(write_config(tmp_path / "ok.yaml", corpus, "phimoe")), 1, False, str(same))
    assert plan.init_from.path == str(same.resolve())


def test_the_launch_check_takes_init_from(tmp_path, corpus, capsys):
    """launch scripts run `sparsemixer-ds check` with the train arguments: it knows --init-from."""
    config = write_config(tmp_path / "run.yaml", corpus, "phimoe")
    missing = tmp_path / "missing"
    missing.mkdir()
    assert cli_main(["check", "--config", str(config), "--world-size", "1", "--init-from", str(missing)]) == 2
    assert "no config.json there" in capsys.readouterr().err


def test_the_cli_exports_an_hf_run_as_hf_and_generates_from_its_checkpoint(runs, tmp_path):
    """export without --format writes the HF directory, --format safetensors is refused naming the fix,
    and generate --run samples greedily what the trained model's own argmax says."""
    _, run_dir, _ = runs["phimoe"]
    cli = [str(Path(sys.executable).parent / "sparsemixer-ds")]
    env = launch_env()
    refused = subprocess.run(cli + ["export", "--run", str(run_dir), "--format", "safetensors", "--out",
                                    str(tmp_path / "m.safetensors")], capture_output=True, text=True, env=env)
    assert refused.returncode == 2 and "export it with --format hf" in refused.stderr
    assert not (tmp_path / "m.safetensors").exists()
    done = subprocess.run(cli + ["export", "--run", str(run_dir), "--out", str(tmp_path / "hf")],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert type(hf_model(tmp_path / "hf")).__name__ == "PhimoeForCausalLM"
    out = subprocess.run(cli + ["generate", "--run", str(run_dir), "--prompt", "def ", "--tokens", "5",
                                "--temperature", "0"], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    trained, _ = load_checkpoint_model(run_dir)
    tokens = torch.tensor([list(b"def ")])
    for _ in range(5):
        tokens = torch.cat([tokens, trained(tokens).logits[:, -1:].argmax(-1)], dim=1)
    want = bytes(t for t in tokens[0].tolist() if t < 256).decode("utf-8", "replace")
    assert out.stdout.endswith(want + "\n"), (out.stdout[-300:], want)
