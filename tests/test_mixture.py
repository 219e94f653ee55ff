"""Weighted mixtures of prepared data (data.sources): the schedule, the loader, the checks, and launched runs."""
import json
import shutil
import subprocess

import numpy as np
import pytest
from conftest import REPO, TINY, assert_resumed_as_uninterrupted, free_port, launch_env, run_metrics
from test_errors import cli, error_line

from sparsemixer_ds.config import ConfigError, load_config
from sparsemixer_ds.data.corpus import default_corpus
from sparsemixer_ds.data.loader import BLOCK, Mixture, _schedule, check_sources
from sparsemixer_ds.data.prepare import prepare
from sparsemixer_ds.data.prepared import open_split

CPU_JSON = REPO / "ds_configs" / "cpu.json"


@pytest.fixture(scope="module")
def second(tmp_path_factory):
    """Another byte-level source: the next stdlib files after the conftest corpus's 60."""
    out = tmp_path_factory.mktemp("data") / "second"
    prepare([str(p) for p in default_corpus()[60:90]], out, tokenizer="bytes", val_fraction=0.1, progress=False)
    return out


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A source of a few hundred tokens per split: a run of a few steps goes through it more than once."""
    root = tmp_path_factory.mktemp("small")
    for i in range(40):
        (root / f"doc{i:02d}.txt").write_text(f"document {i}: " + "tiny words " * 3 + "\n")
    out = root / "data"
    prepare([str(root)], out, tokenizer="bytes", val_fraction=0.5, seed=1, progress=False)
    return out


def sources_arg(*items) -> str:
    """A --set value for data.sources: (path, weight, name) triples."""
    return "data.sources=[" + ", ".join(f"{{path: '{p}', weight: {w}, name: {n}}}" for p, w, n in items) + "]"


# ---- the schedule ----

@pytest.mark.parametrize("weights", [[3, 1], [1, 1, 1], [0.7, 0.2, 0.1], [5, 1e-9], [1, 2, 3, 4, 5, 6, 7]])
def test_schedule_holds_each_share_in_every_prefix(weights):
    n, source_at, index_at = _schedule(np.array(weights, dtype=np.float64), BLOCK)
    share = np.array(weights) / sum(weights)
    assert n.sum() == BLOCK and (n >= 1).all()
    assert np.abs(n / BLOCK - share).max() <= 1.0 / BLOCK + 1e-12, "shares rounded to the block's resolution"
    for s in range(len(weights)):
        positions = np.flatnonzero(source_at == s)
        assert len(positions) == n[s]
        assert (index_at[positions] == np.arange(n[s])).all(), "each source's draws numbered in order"
        prefix = np.cumsum(source_at == s)  # draws of s among the first r + 1 positions
        ideal = np.arange(1, BLOCK + 1) * n[s] / BLOCK
        assert np.abs(prefix - ideal).max() <= 1.0, "every prefix within one draw of the share"


def mixture(files, weights, rank=0, world=2, micro=4, accum=2, seed=3, seq_len=32):
    return Mixture([open_split(f, "train") for f in files], weights, seq_len, micro, rank, world, accum, seed,
                   [f.name for f in files])


def test_one_source_reads_its_windows_in_a_fresh_permutation_per_epoch(corpus):
    """data.path's loader: draw g is window permutation(seed, g // N)[g % N], as runs before mixtures read."""
    N = (len(open_split(corpus, "train")) - 1) // 32
    for rank in range(2):
        m = mixture([corpus], [1.0], rank=rank)
        epoch_steps = N // 16 + 2  # past the first wrap-around
        for step in list(range(epoch_steps)) + [10 * epoch_steps + 1]:
            for micro in range(2):
                sources, windows = m.windows(step, micro)
                first = ((step * 2 + micro) * 2 + rank) * 4
                expect = [np.random.default_rng([3, g // N]).permutation(N)[g % N] for g in range(first, first + 4)]
                assert (sources == 0).all() and windows.tolist() == expect


def test_draws_split_by_weight_walk_each_source_and_count(corpus, second, small):
    files, weights = [corpus, second, small], [3.0, 2.0, 1.0]
    world, micro, accum, steps = 2, 4, 2, 40
    ranks = [mixture(files, weights, rank=r, world=world, micro=micro, accum=accum) for r in range(world)]
    streams = {s: [] for s in range(3)}  # each source's windows in draw order, all ranks together
    for step in range(steps):
        in_step = set()
        for micro_step in range(accum):
            for m in ranks:
                sources, windows = m.windows(step, micro_step)
                for s, w in zip(sources, windows):
                    epoch = len(streams[int(s)]) // m.num_windows[s]
                    streams[int(s)].append(int(w))
                    in_step.add((int(s), int(epoch), int(w)))
        drawn = np.array([len(streams[s]) for s in range(3)])
        assert len(in_step) == world * micro * accum, "the ranks' sequences of a step differ (within an epoch)"
        assert (ranks[0].drawn(ranks[0].draws_before(step + 1)) == drawn).all(), "the closed form counts the draws"
        G = drawn.sum()
        assert np.abs(drawn - G * np.array(weights) / sum(weights)).max() <= 1.0 + G / BLOCK
    seen = ranks[1].seen(steps)
    for s, f in enumerate(files):
        N = (len(open_split(f, "train")) - 1) // 32  # windows of the source, from its file alone
        assert seen[f.name] == {"tokens": len(streams[s]) * 32, "epochs": pytest.approx(len(streams[s]) / N)}
        stream = np.array(streams[s])
        for e in range(len(stream) // N):  # every full epoch of a source reads each of its windows once
            assert sorted(stream[e * N:(e + 1) * N]) == list(range(N))
    assert seen[small.name]["epochs"] > 2, "the small source wrapped around"


def test_batches_hold_the_drawn_windows_of_each_source(corpus, second):
    m = mixture([corpus, second], [1.0, 1.0], micro=8)
    data = [open_split(f, "train").data for f in (corpus, second)]
    for step, micro in ((0, 0), (7, 1), (123, 0)):
        x, y = m.get(step, micro)
        sources, windows = m.windows(step, micro)
        assert len(set(sources.tolist())) == 2, "both sources in one micro-batch"
        for row, (s, w) in enumerate(zip(sources, windows)):
            expect = np.asarray(data[s][w * 32: w * 32 + 33], dtype=np.int64)
            assert x[row].tolist() == expect[:-1].tolist() and y[row].tolist() == expect[1:].tolist()
        again = mixture([corpus, second], [1.0, 1.0], micro=8).get(step, micro)
        assert (again[0] == x).all(), "a pure function of (seed, step, micro, rank)"


# ---- checks before work ----

def test_config_refuses_bad_sources():
    cases = {
        "data.sources=[{path: a, weight: 0}]": "data.sources[0] (a): weight must be a positive number",
        "data.sources=[{path: a, weight: -2}]": "got -2.0",
        "data.sources=[{path: a, weight: .nan}]": "weight must be a positive number",
        "data.sources=[{path: a, weight: many}]": "'data.sources[0].weight' must be a number; got 'many'",
        "data.sources=[{path: a}, {path: b/a}]": "data.sources[0] and data.sources[1] are both named 'a'",
        "data.sources=[{path: ''}]": "data.sources[0]: path must name a directory",
        "data.sources=[{path: 'my data'}]": "the name 'my data'",
        "data.sources=[{path: a, wieght: 1}]": "did you mean 'data.sources[0].weight'",
        "data.sources={path: a}": "'data.sources' must be a list of sources",
    }
    for override, needle in cases.items():
        with pytest.raises(ConfigError) as err:
            load_config(None, [override])
        assert needle in str(err.value), (override, str(err.value))
    with pytest.raises(ConfigError, match="data.path='d' and data.sources are both set"):
        load_config(None, ["data.path=d", "data.sources=[{path: a}]"])


def check_with(*sources):
    return check_sources(load_config(None, [sources_arg(*sources)]))


def test_sources_checked_against_each_other_and_the_vocabulary(tmp_path, corpus, second):
    assert check_with((corpus, 1, "a"), (second, 1, "b")) == 257
    with pytest.raises(ConfigError) as err:
        check_with((corpus, 1, "a"), (tmp_path / "nothing", 1, "b"))
    assert "data.sources[1] (b): " in str(err.value) and "has no meta.json; prepare it first" in str(err.value)
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("some text to train a byte-level BPE on, with enough pairs to merge " * 50)
    bpe = tmp_path / "bpe"
    prepare([str(docs)], bpe, tokenizer="bpe", vocab_size=270, val_fraction=0.0, progress=False)
    with pytest.raises(ConfigError) as err:
        check_with((corpus, 1, "a"), (bpe, 1, "b"))
    assert ("data.sources[1] (b) (" in str(err.value) and "a bpe tokenizer with vocabulary" in str(err.value)
            and "data.sources[0] (a) a bytes one with 257" in str(err.value)
            and "must share one tokenizer" in str(err.value))
    # The same kind and size of vocabulary, other merges: trained on other text.
    (docs / "a.txt").write_text("quite different words make other merges: zebra quartz jukebox " * 50)
    other = tmp_path / "bpe2"
    prepare([str(docs)], other, tokenizer="bpe", vocab_size=270, val_fraction=0.0, progress=False)
    assert json.loads((other / "meta.json").read_text())["vocab_size"] == 270 == json.loads(
        (bpe / "meta.json").read_text())["vocab_size"]
    with pytest.raises(ConfigError, match="was prepared with another tokenizer.json; all sources of a mixture must "
                                          "share one tokenizer"):
        check_with((bpe, 1, "a"), (other, 1, "b"))
    assert check_with((bpe, 1, "a"), (bpe, 2, "b")) >= 257, f"one tokenizer.json: {bpe}"
    # A token file whose ids lie outside the vocabulary of its meta.json.
    bad = tmp_path / "bad"
    shutil.copytree(second, bad)
    ids = np.fromfile(bad / "train.bin", dtype="<u2")
    ids[5] = 300
    ids.tofile(bad / "train.bin")
    with pytest.raises(ConfigError) as err:
        check_with((corpus, 1, "a"), (bad, 1, "b"))
    assert str(err.value).startswith("data.sources[1] (b): ") and "holds token id 300" in str(err.value)


def test_check_refuses_a_mixture_before_any_rank_starts(tmp_path, corpus):
    settings = TINY + [f"run_dir={tmp_path / 'run'}", f"ds_config={CPU_JSON}",
                       sources_arg((corpus, 1, "code"), (tmp_path / "web", 1, "web"))]
    proc = cli("check", "--world-size", "2", *[a for s in settings for a in ("--set", s)], cwd=tmp_path)
    error_line(proc, "check", "data.sources[1] (web): ", "has no meta.json")
    assert not (tmp_path / "run").exists(), "nothing written"
    settings[-1] = sources_arg((corpus, 1, "code"), (corpus, 3, "again"))
    proc = cli("check", "--world-size", "2", *[a for s in settings for a in ("--set", s)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"data: code 25.0% ({corpus}), again 75.0% ({corpus})" in proc.stdout


# ---- launched runs ----

def launch_mixture(run_dir, *overrides, extra=()):
    cmd = ["bash", str(REPO / "launch" / "local.sh"), "--nproc", "2", "--master-port", str(free_port()),
           "--ds-config", str(CPU_JSON), "--"]
    settings = TINY + [f"run_dir={run_dir}", *overrides]
    cmd += [a for s in settings for a in ("--set", s)] + list(extra)
    proc = subprocess.run(cmd, cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


MIXED = ["train.steps=8", "checkpoint.interval=4", "checkpoint.keep=3", "eval.interval=4", "eval.batch_size=2",
         "moe.eval_capacity_factor=4.0", "logging.plot=false"]


def test_a_launched_mixture_reports_each_source_and_resumes_exactly(tmp_path, corpus, small):
    sources = sources_arg((corpus, 1, "code"), (small, 3, "small"))
    full = tmp_path / "full"
    proc = launch_mixture(full, sources, *MIXED)
    records = run_metrics(full)
    train = [m for m in records if "loss" in m]
    windows = {name: (len(open_split(path, "train")) - 1) // 32 for name, path in (("code", corpus), ("small", small))}
    for m in train:
        by_source = m["tokens_by_source"]
        assert sum(by_source.values()) == m["tokens"] == m["step"] * 4 * 2 * 32
        sequences = {name: tokens // 32 for name, tokens in by_source.items()}
        assert abs(sequences["small"] - 0.75 * m["tokens"] / 32) <= 1.0, "3:1, within one sequence"
        for name in sequences:
            assert m["epochs_by_source"][name] == pytest.approx(sequences[name] / windows[name])
    # The small source ran out and wrapped around: said, and recorded at the step it happened.
    wraps = [m for m in records if "source" in m]
    assert wraps and all(m["source"] == "small" for m in wraps)
    first = wraps[0]
    before, at = [m for m in train if m["step"] in (first["step"] - 1, first["step"])]
    assert before["epochs_by_source"]["small"] < 1 <= at["epochs_by_source"]["small"] and first["epoch"] == 2
    assert f"step {first['step']}: data source 'small' ran out and wrapped around: epoch 2" in proc.stdout
    evals = [m for m in records if "val_loss" in m]
    for m in evals:
        losses = m["val_loss_by_source"]
        assert set(losses) == {"code", "small"}
        assert m["val_loss"] == pytest.approx(0.25 * losses["code"] + 0.75 * losses["small"], rel=1e-12)
    assert "tokens per source: code " in proc.stdout and "validation loss per source: code " in proc.stdout
    monitor = full / "monitor"
    assert any(monitor.rglob("Data_small_tokens.csv")) and any(monitor.rglob("Eval_loss_code.csv"))

    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    (resumed / "LOCK").unlink(missing_ok=True)
    launch_mixture(resumed, sources, *MIXED, extra=["--resume-tag", "step_00000004"])
    assert_resumed_as_uninterrupted(resumed, full, 4)
    after = run_metrics(resumed)
    mark = [i for i, m in enumerate(after) if m.get("resumed")][0]
    want = [m for m in records if m["step"] > 4]
    for w, g in zip(want, after[mark + 1:]):
        for key in ("tokens_by_source", "epochs_by_source", "source", "epoch"):
            assert g.get(key) == w.get(key), (w["step"], key)
        if "val_loss_by_source" in w:
            assert g["val_loss_by_source"] == pytest.approx(w["val_loss_by_source"], rel=1e-6)
