"""prepare's throughput (MB of text per second) with 1 and 2 workers: the stdlib sources as text files, the
same documents as a JSONL.gz and a Parquet file, with the bytes tokenizer and a BPE given as tokenizer.json
(trained once first, timed on its own). The speedup column is the 2-worker rate over the 1-worker rate.

    python benchmarks/prepare.py
    python benchmarks/prepare.py --smoke
"""
import argparse
import gzip
import json
import shutil
import tempfile
import time
from pathlib import Path

from sparsemixer_ds.data.corpus import default_corpus
from sparsemixer_ds.data.prepare import prepare
from sparsemixer_ds.data.prepare import default_workers


def make_inputs(files: list, root: Path) -> dict:
    """Input name -> paths: the text files, a JSONL.gz and a Parquet of the same texts."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    texts = [p.read_bytes().decode("utf-8", errors="replace") for p in files]
    lines = "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()
    (root / "corpus.jsonl.gz").write_bytes(gzip.compress(lines, compresslevel=6))
    pq.write_table(pa.table({"text": texts}), root / "corpus.parquet", row_group_size=64)
    return {"text files": files, "jsonl.gz": [root / "corpus.jsonl.gz"], "parquet": [root / "corpus.parquet"]}


def timed(inputs: list, out: Path, **kwargs) -> float:
    start = time.perf_counter()
    prepare([str(p) for p in inputs], out, progress=False, encoding_errors="replace", **kwargs)
    seconds = time.perf_counter() - start
    shutil.rmtree(out)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab-size", type=int, default=8192, help="of the BPE trained first")
    parser.add_argument("--repeats", type=int, default=2, help="best of this many runs per cell")
    parser.add_argument("--smoke", action="store_true", help="100 files, a BPE of 300, one run per cell")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/prepare.json"))
    args = parser.parse_args()
    files = default_corpus()
    if args.smoke:
        files, args.vocab_size, args.repeats = files[:100], 300, 1
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        inputs = make_inputs(files, root)
        # Every input holds the same text: its size makes the rates of compressed and plain inputs comparable.
        size = sum(p.stat().st_size for p in files)
        start = time.perf_counter()
        prepare([str(p) for p in files], root / "bpe", tokenizer="bpe", vocab_size=args.vocab_size,
                progress=False, encoding_errors="replace", workers=1)
        bpe_seconds = time.perf_counter() - start  # training, then encoding with one worker
        tokenizer = str(root / "tokenizer.json")
        shutil.copy(root / "bpe" / "tokenizer.json", tokenizer)
        rows = []
        for name, paths in inputs.items():
            for tok_name, tok in (("bytes", "bytes"), (f"bpe {args.vocab_size}", tokenizer)):
                seconds = {w: min(timed(paths, root / "out", tokenizer=tok, workers=w) for _ in range(args.repeats))
                           for w in (1, 2)}
                rows.append({"input": name, "tokenizer": tok_name, "mb": size / 1e6,
                             "mb_per_s_1": size / 1e6 / seconds[1], "mb_per_s_2": size / 1e6 / seconds[2],
                             "speedup": seconds[1] / seconds[2]})
    print(f"prepare throughput, MB of text per second (best of {args.repeats}; {default_workers()} cores; "
          f"BPE {args.vocab_size} trained + encoded once, 1 worker: {bpe_seconds:.1f} s)")
    print(f"| {'input':<10} | {'tokenizer':<9} | {'MB':>6} | {'1 worker':>8} | {'2 workers':>9} | speedup |")
    print(f"|{'-' * 12}|{'-' * 11}|{'-' * 8}|{'-' * 10}|{'-' * 11}|{'-' * 9}|")
    for r in rows:
        print(f"| {r['input']:<10} | {r['tokenizer']:<9} | {r['mb']:6.1f} | {r['mb_per_s_1']:8.1f} | "
              f"{r['mb_per_s_2']:9.1f} | {r['speedup']:6.2f}x |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"cores": default_workers(), "vocab_size": args.vocab_size,
                                     "bpe_train_seconds": bpe_seconds, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
