from setuptools import find_packages, setup

setup(
    name="sparsemixer_ds",
    version="0.1.0",
    description="Expert-parallel MoE pre-training on DeepSpeed with SparseMixer routing",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["sparsemixer_ds", "sparsemixer_ds.*"]),
    python_requires=">=3.9",
    # torch: a range that the CPU build 2.13.0 satisfies, so pip never swaps in a CUDA build.
    # deepspeed: 0.19.4 is the first release whose MOELayer asks gates for sparse routes; the
    # gate serves the older dense contract too, but the tests run on the 0.19 series.
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.19.4,<0.20",
        "pyyaml>=6.0",
        "numpy>=1.24",
        "tqdm>=4.60",
        "psutil>=5.9",  # resident memory in the metrics
        "tokenizers>=0.19",  # BPE trained locally, or loaded from a local tokenizer.json
        "pyarrow>=14",  # prepare reads Parquet corpora (the text column, row group by row group)
        "zstandard>=0.22",  # prepare reads zstd-compressed JSONL (.jsonl.zst, .zst)
        "matplotlib>=3.7",  # the end-of-run plot
        "tensorboard>=2.14",  # DeepSpeed's TensorBoard monitor
        "safetensors>=0.4",  # exports: weights in a format that cannot carry code
        # Hugging Face MoE models (model.family hf) under DeepSpeed 0.19's AutoEP, which works with these
        # releases only (sparsemixer_ds.hf.TRANSFORMERS_RANGE says the same and names a wrong one).
        "transformers>=5.0,<5.23,!=5.4.0",
    ],
    entry_points={"console_scripts": ["sparsemixer-ds = sparsemixer_ds.cli:main"]},
    extras_require={
        "mpi": ["mpi4py>=4.0", "openmpi>=5.0"],
        # pytest-xdist: make test runs the test files on two workers (launched jobs leave the cores half idle).
        "test": ["pytest>=8.0", "pytest-xdist>=3.5"],
    },
)
