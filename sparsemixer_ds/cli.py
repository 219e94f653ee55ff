"""The ``sparsemixer-ds`` command: prepare | check | train | export | generate.

    sparsemixer-ds prepare [INPUT ...] --out data/stdlib-bytes        # no INPUT: the stdlib sources
    sparsemixer-ds check --config configs/cpu_small.yaml --world-size 2  # what a launch script runs first
    deepspeed --num_gpus 2 --module sparsemixer_ds.cli train --config configs/cpu_small.yaml
    sparsemixer-ds export --run runs/cpu_small --out runs/cpu_small/model.safetensors
    sparsemixer-ds generate --export runs/cpu_small/model.safetensors --prompt "def main("
"""
import argparse
import sys
from pathlib import Path
from typing import List, Optional

from .config import ConfigError, RunError


def _prepare(args: argparse.Namespace) -> None:
    from .data import prepare
    meta = prepare(args.inputs or None, Path(args.out), tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                   val_fraction=args.val_fraction, seed=args.seed, text_field=args.text_field,
                   progress=not args.quiet)
    print(f"{args.out}: {meta['train_tokens']:,} training and {meta['val_tokens']:,} validation tokens "
          f"({meta['tokenizer']} tokenizer, vocabulary {meta['vocab_size']})")


def _train(args: argparse.Namespace) -> None:
    from .config import load_config
    from .train import summary, train
    cfg = load_config(Path(args.config) if args.config else None, args.set)
    last = train(cfg, resume=args.resume)
    from deepspeed import comm as dist
    if dist.get_rank() == 0:
        print(summary(cfg, last), flush=True)


def _check(args: argparse.Namespace) -> None:
    from .config import load_config, total_steps
    from .train import preflight
    cfg = load_config(Path(args.config) if args.config else None, args.set)
    preflight(cfg, args.world_size, args.resume)
    print(f"ok: {args.world_size} ranks, {args.world_size // cfg.moe.ep_size} expert-parallel group(s) of "
          f"{cfg.moe.ep_size}, {cfg.moe.num_experts} experts per MoE layer, {total_steps(cfg, args.world_size)} "
          f"steps, run_dir {cfg.run_dir}")


def _export(args: argparse.Namespace) -> None:
    from .export import export
    path = export(Path(args.run), Path(args.out), tag=args.tag)
    print(f"wrote {path}")


def _generate(args: argparse.Namespace) -> None:
    import torch

    from .data import BpeTokenizer, ByteTokenizer, tokenizer_record
    from .export import load_checkpoint_model, load_export
    if args.export:
        model, cfg, record = load_export(Path(args.export))
    else:
        model, cfg = load_checkpoint_model(Path(args.run), args.tag)
        record = tokenizer_record(Path(cfg.data.path))
    tokenizer = ByteTokenizer() if record["kind"] == "bytes" else BpeTokenizer.from_json(record["json"])
    torch.manual_seed(args.seed)
    prompt = tokenizer.encode(args.prompt) or [tokenizer.eos_id]
    out = model.generate(torch.tensor([prompt]), args.tokens, temperature=args.temperature, top_k=args.top_k,
                         stop_id=tokenizer.eos_id)
    print(tokenizer.decode(out[0].tolist()))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparsemixer-ds", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    # The deepspeed launcher passes --local_rank before the subcommand unless told --no_local_rank;
    # LOCAL_RANK in the environment carries the same number, so it is accepted and not needed.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=0, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="text files, directories, globs or JSONL -> token files + meta.json")
    p.add_argument("inputs", nargs="*", help="files, directories or glob patterns (default: the stdlib sources)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--tokenizer", default="bytes", help="bytes | bpe | path to a tokenizer.json")
    p.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size to train")
    p.add_argument("--val-fraction", type=float, default=0.01, help="share of documents held out")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/validation split")
    p.add_argument("--text-field", default="text", help="the text field of JSONL records")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_prepare)

    p = sub.add_parser("train", help="pre-train (run it under the deepspeed launcher)")
    p.add_argument("--config", help="YAML run config (configs/*.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.steps=50 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in run_dir")
    p.set_defaults(func=_train)

    p = sub.add_parser("check", help="check a run's configs, data and run directory for a world size; start nothing")
    p.add_argument("--config", help="YAML run config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="as for train")
    p.add_argument("--resume", action="store_true", help="as for train")
    p.add_argument("--world-size", type=int, required=True, help="total number of ranks the launch will start")
    p.set_defaults(func=_check)

    p = sub.add_parser("export", help="a checkpoint -> one consolidated file (all experts) + config")
    p.add_argument("--run", required=True, help="run directory")
    p.add_argument("--tag", help="checkpoint tag (default: the newest)")
    p.add_argument("--out", required=True, help="output file, e.g. model.safetensors")
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
        sys.stderr.write(f"sparsemixer-ds {args.command}: stopped: {err}\n")  # one write: ranks share the stream
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
