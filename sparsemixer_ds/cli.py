"""The ``sparsemixer-ds`` command: prepare | check | plan | train | export | generate.

    sparsemixer-ds prepare [INPUT ...] --out data/stdlib-bytes        # no INPUT: the stdlib sources
    sparsemixer-ds check --config configs/cpu_small.yaml --world-size 2  # what a launch script runs first
    sparsemixer-ds plan --config configs/gpu_grin.yaml --world-size 32    # memory per rank, FLOPs, all-to-all
    deepspeed --num_gpus 2 --module sparsemixer_ds.cli train --config configs/cpu_small.yaml
    sparsemixer-ds export --run runs/cpu_small --out runs/cpu_small/model.safetensors
    sparsemixer-ds export --run runs/cpu_phimoe --format hf --out runs/cpu_phimoe/hf  # transformers' from_pretrained
    sparsemixer-ds generate --export runs/cpu_small/model.safetensors --prompt "def main("
"""
import argparse
import os
import sys
from pathlib import Path
from typing import List, Optional

from .config import ConfigError, RunError


def _prepare(args: argparse.Namespace) -> None:
    from .data.prepare import prepare
    if args.workers is not None and args.workers < 1:
        raise ValueError(f"--workers must be >= 1 (processes that read and tokenize); got {args.workers}")
    meta = prepare(args.inputs or None, Path(args.out), tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                   val_fraction=args.val_fraction, seed=args.seed, text_field=args.text_field,
                   progress=not args.quiet, encoding_errors=args.encoding_errors, skip_malformed=args.skip_malformed,
                   workers=args.workers)
    not_text, malformed = meta["not_text_documents"], meta["malformed_records"]
    handled = "left out" if meta["encoding_errors"] == "skip" else "kept with U+FFFD for each invalid byte"
    print(f"{args.out}: {meta['train_tokens']:,} training and {meta['val_tokens']:,} validation tokens "
          f"({meta['tokenizer']} tokenizer, vocabulary {meta['vocab_size']})"
          + (f"; {not_text:,} document(s) not UTF-8 text {handled} (--encoding-errors {meta['encoding_errors']})"
             if not_text else "")
          + (f"; {malformed:,} malformed record(s) skipped (--skip-malformed)" if malformed else ""))


def _train(args: argparse.Namespace) -> None:
    from deepspeed import comm as dist

    from .config import load_config
    from .train import summary, train
    cfg = load_config(Path(args.config) if args.config else None, args.set)
    last = train(cfg, resume=args.resume_tag or args.resume, init_from=args.init_from)
    if dist.get_rank() == 0:
        print(summary(cfg, last), flush=True)


def _check(args: argparse.Namespace) -> None:
    from .config import load_config, total_steps
    from .models.families import get_family
    from .train import preflight
    if args.world_size < 1:
        raise ConfigError(f"--world-size must be >= 1 (the ranks the launch will start); got {args.world_size}")
    if args.master_port is not None:
        from .run.comm import check_master_port, is_this_host
        if not 1 <= args.master_port <= 65535:
            raise ConfigError(f"--master-port must be a TCP port, 1 to 65535; got {args.master_port}")
        if is_this_host(args.master_addr):  # rank 0 listens there; another host's ports are not visible here
            check_master_port(args.master_addr, args.master_port)
    cfg = load_config(Path(args.config) if args.config else None, args.set)
    checked = preflight(cfg, args.world_size, args.resume_tag or args.resume, init_from=args.init_from)
    if checked.resume_tag is not None:
        from .run.rundir import RunDir
        run = RunDir(cfg.run_dir)
        run.store.verified.update((state.tag, state) for state in checked.checkpoints)
        print(run.store.listing(checked.resume_tag))
    if args.lock:
        from .run.runlock import RunLock, launch_token
        lock = RunLock(cfg.run_dir, launch_token(), "launch script", pid=os.getppid()).acquire()
        print(f"lock: {lock.path}")
    print(f"ok: {args.world_size} ranks, {args.world_size // cfg.moe.ep_size} expert-parallel group(s) of "
          f"{cfg.moe.ep_size}, {get_family(cfg).experts_per_layer(cfg)} experts per MoE layer, {total_steps(cfg, args.world_size)} "
          f"steps, run_dir {cfg.run_dir}")
    if cfg.data.sources:
        from .data.loader import data_sources
        sources = data_sources(cfg)
        total = sum(source.weight for source in sources)
        print("data: " + ", ".join(f"{source.name} {source.weight / total:.1%} ({source.path})" for source in sources))


def _plan(args: argparse.Namespace) -> None:
    from .config import load_config
    from .plan import GiB, check_fits, format_plan, make_plan
    if not args.device_memory_gb > 0:
        raise ConfigError(f"--device-memory-gb must be > 0 (GiB per rank); got {args.device_memory_gb}")
    cfg = load_config(Path(args.config) if args.config else None, args.set)
    plan = make_plan(cfg, args.world_size, int(args.device_memory_gb * GiB))
    print(format_plan(cfg, plan))
    check_fits(cfg, plan)


def _export(args: argparse.Namespace) -> None:
    from .run.rundir import RunDir
    family = RunDir(args.run).saved_config().model.family if Path(args.run, "config.yaml").is_file() else None
    if args.format is None:  # a Hugging Face model goes out as one, this project's own as one file
        args.format = "hf" if family == "hf" else "safetensors"
    if args.format == "safetensors" and family == "hf":
        raise ConfigError(f"--format safetensors: {args.run} trained a Hugging Face model (model.family hf); export "
                          "it with --format hf, a directory transformers' from_pretrained loads")
    if args.format == "hf":
        from .models.hf_checkpoint import export_hf
        for note in export_hf(Path(args.run), Path(args.out), tag=args.tag):
            print(f"note: {note}", file=sys.stderr)
        print(f"wrote {args.out} (transformers: AutoModelForCausalLM.from_pretrained, AutoTokenizer.from_pretrained)")
        return
    from .export import export
    path = export(Path(args.run), Path(args.out), tag=args.tag)
    print(f"wrote {path}")


def _generate(args: argparse.Namespace) -> None:
    import math

    import torch

    if args.tokens < 0:
        raise ConfigError(f"--tokens must be >= 0 (new tokens to sample); got {args.tokens}")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise ConfigError(f"--temperature must be a finite number >= 0 (0: greedy, 1: the model's own "
                          f"distribution); got {args.temperature}")
    if args.top_k < 0:
        raise ConfigError(f"--top-k must be >= 0 (0: sample among all tokens); got {args.top_k}")
    from .data.loader import tokenizer_dir
    from .data.prepared import tokenizer_record
    from .data.tokenizer import BpeTokenizer, ByteTokenizer
    from .export import load_checkpoint_model, load_export
    from .models.native import sample
    if args.export and Path(args.export).is_dir():
        raise ConfigError(f"--export {args.export} is a directory: a Hugging Face export (export --format hf), "
                          "which transformers samples from (AutoModelForCausalLM.from_pretrained(DIR).generate); "
                          "generate reads a safetensors export file, or a run with --run")
    if args.export:
        model, cfg, record = load_export(Path(args.export))
    else:
        model, cfg = load_checkpoint_model(Path(args.run), args.tag)
        record = tokenizer_record(tokenizer_dir(cfg))
    tokenizer = ByteTokenizer() if record["kind"] == "bytes" else BpeTokenizer.from_json(record["json"])
    torch.manual_seed(args.seed)
    prompt = tokenizer.encode(args.prompt) or [tokenizer.eos_id]
    out = sample(model, torch.tensor([prompt]), args.tokens, cfg.model.seq_len, args.temperature, args.top_k,
                 tokenizer.eos_id)
    print(tokenizer.decode(out[0].tolist()))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparsemixer-ds", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    # The deepspeed launcher passes --local_rank before the subcommand unless told --no_local_rank;
    # LOCAL_RANK in the environment carries the same number, so it is accepted and not needed.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=0, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="text files, directories, globs, JSONL (.gz, .zst) or Parquet -> token files "
                                       "+ meta.json")
    p.add_argument("inputs", nargs="*", help="files, directories or glob patterns (default: the stdlib sources)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--tokenizer", default="bytes", help="bytes | bpe | path to a tokenizer.json")
    p.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size to train")
    p.add_argument("--val-fraction", type=float, default=0.01, help="share of documents held out")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/validation split")
    p.add_argument("--text-field", default="text", help="the text field of JSONL records, the text column of Parquet")
    p.add_argument("--encoding-errors", choices=("strict", "replace", "skip"),
                   help="a document that is not UTF-8 text (or holds a NUL byte): strict refuses it, replace keeps "
                        "it with U+FFFD for each invalid byte, skip leaves it out; replaced and skipped ones are "
                        "counted (default: strict; replace for the stdlib sources)")
    p.add_argument("--skip-malformed", action="store_true",
                   help="leave out malformed records (bad JSON, no string text field, a null Parquet text, the rest "
                        "of a damaged .gz/.zst), counted, instead of refusing the corpus")
    p.add_argument("--workers", type=int, default=None,
                   help="processes that read and tokenize (default: the cores available; 1 for the bytes tokenizer, "
                        "which two do not speed up); the output is the same for any number")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_prepare)

    p = sub.add_parser("train", help="pre-train (run it under the deepspeed launcher)")
    p.add_argument("--config", help="YAML run config (configs/*.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.steps=50 (repeatable)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest intact checkpoint in run_dir (damaged newer ones are skipped)")
    p.add_argument("--resume-tag", metavar="TAG",
                   help="continue from exactly this checkpoint, e.g. step_00000400, or stop if it is damaged "
                        "(implies --resume)")
    p.add_argument("--init-from", metavar="DIR",
                   help="start a new model.family hf run from the weights of a local Hugging Face model directory "
                        "(sparsemixer-ds export --format hf, or save_pretrained) whose config.json fixes the same "
                        "shapes; not with --resume")
    p.set_defaults(func=_train)

    p = sub.add_parser("check", help="check a run's configs, data and run directory for a world size; start nothing")
    p.add_argument("--config", help="YAML run config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="as for train")
    p.add_argument("--resume", action="store_true", help="as for train; lists the checkpoints and their state")
    p.add_argument("--resume-tag", metavar="TAG", help="as for train")
    p.add_argument("--init-from", metavar="DIR", help="as for train")
    p.add_argument("--world-size", type=int, required=True, help="total number of ranks the launch will start")
    p.add_argument("--lock", action="store_true",
                   help="take run_dir's lock for the launch that runs this check (the parent process), until its "
                        "rank 0 takes it over (the launch scripts do)")
    p.add_argument("--master-addr", default="127.0.0.1", help="rank 0's host, where the ranks meet")
    p.add_argument("--master-port", type=int,
                   help="the port they meet at: refused if MASTER_ADDR is this host and the port is not free here")
    p.set_defaults(func=_check)

    p = sub.add_parser("plan", help="memory per rank, FLOPs and all-to-all volume of a run from its configs; "
                                    "exits non-zero if it does not fit")
    p.add_argument("--config", help="YAML run config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="as for train")
    p.add_argument("--world-size", type=int, required=True, help="total number of ranks the launch will start")
    p.add_argument("--device-memory-gb", type=float, default=80.0,
                   help="memory of one rank's device in GiB (default 80: an 80 GB A100/H100)")
    p.set_defaults(func=_plan)

    p = sub.add_parser("export", help="a checkpoint -> one consolidated file (all experts) + config, or a Hugging "
                                      "Face model directory")
    p.add_argument("--run", required=True, help="run directory")
    p.add_argument("--tag", help="checkpoint tag (default: the newest)")
    p.add_argument("--format", choices=("safetensors", "hf"), default=None,
                   help="safetensors: one file for sparsemixer-ds generate (native runs' default); hf: a directory "
                        "that transformers' from_pretrained loads (model.family hf runs' default and only format)")
    p.add_argument("--out", required=True,
                   help="output file, e.g. model.safetensors; with --format hf a new or empty directory")
    p.set_defaults(func=_export)

    p = sub.add_parser("generate", help="sample text from a checkpoint or an export")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="run directory (newest checkpoint unless --tag)")
    source.add_argument("--export", help="an export file")
    p.add_argument("--tag", help="checkpoint tag, with --run")
    p.add_argument("--prompt", default="", help="text to continue")
    p.add_argument("--tokens", type=int, default=200, help="new tokens to sample")
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_generate)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"sparsemixer-ds {args.command}: error: {err}", file=sys.stderr)
        return 2
    except RunError as err:
        if str(err):
            sys.stderr.write(f"sparsemixer-ds {args.command}: stopped: {err}\n")  # one write: ranks share the stream
        return getattr(err, "exit_code", 1)
    return 0


if __name__ == "__main__":
    from .run.comm import exit_rank
    exit_rank(main())  # how a rank started as python -m sparsemixer_ds.cli ends (see exit_rank)
