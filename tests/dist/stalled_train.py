"""``sparsemixer-ds train`` with one fault injected: a rank that hangs, alive, outside any collective.

Started by the deepspeed launcher (tests/test_stall.py) with the trainer's own arguments. From the
environment: STALL_RANK, the rank that hangs; STALL_STEP, the 0-based optimizer step whose forward
never returns on that rank (it sleeps in a loop, so its threads and signal handlers keep running);
STALL_MARK, a file written when the hang begins. Everything else is the real trainer, DeepSpeed
engine and launcher.
"""
import os
import sys
import time
from pathlib import Path

from sparsemixer_ds import cli
from sparsemixer_ds.run.comm import exit_rank
from sparsemixer_ds.models.native import MoELM

RANK, STEP, MARK = int(os.environ["STALL_RANK"]), int(os.environ["STALL_STEP"]), Path(os.environ["STALL_MARK"])
clean_forward = MoELM.forward
calls = {"train": 0}


def hang_outside_collectives() -> None:
    MARK.write_text(f"{time.time()}\n")
    while True:
        time.sleep(0.1)


def stalling_forward(self, tokens, targets=None):
    if self.training and int(os.environ["RANK"]) == RANK:
        if calls["train"] == STEP:  # one micro-step per optimizer step in these tests
            hang_outside_collectives()
        calls["train"] += 1
    return clean_forward(self, tokens, targets)


MoELM.forward = stalling_forward
exit_rank(cli.main(sys.argv[1:]))  # as python -m sparsemixer_ds.cli ends
