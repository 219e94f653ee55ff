"""``sparsemixer-ds train`` with one fault injected: non-finite values at chosen steps on one rank.

Started by the deepspeed launcher (tests/test_faults.py) with the trainer's own arguments. From the
environment: POISON_STEPS, the 0-based optimizer steps to poison (comma separated, may be empty);
POISON_RANK; POISON_MODE, ``loss`` (the loss, hence every gradient, turns NaN) or ``grad`` (the
loss stays finite, the gradient flowing back from the logits turns NaN). Everything
else is the real trainer, DeepSpeed engine and launcher.
"""
import os
import sys

from sparsemixer_ds import cli
from sparsemixer_ds.run.comm import exit_rank
from sparsemixer_ds.models.hf import HFLanguageModel
from sparsemixer_ds.models.native import MoELM

STEPS = {int(s) for s in os.environ["POISON_STEPS"].split(",") if s}
RANK = int(os.environ["POISON_RANK"])
MODE = os.environ["POISON_MODE"]
clean_forwards = {MoELM: MoELM.forward, HFLanguageModel: HFLanguageModel.forward}  # both model families
calls = {"train": 0}


def poisoned_forward(self, tokens, targets=None):
    family = MoELM if isinstance(self, MoELM) else HFLanguageModel
    out = clean_forwards[family](self, tokens, targets)
    if not self.training:
        return out
    step = calls["train"]  # one micro-step per optimizer step in these tests
    calls["train"] += 1
    if step not in STEPS or int(os.environ["RANK"]) != RANK:
        return out
    if MODE == "loss":
        return out._replace(loss=out.loss * float("nan"), ce=out.ce * float("nan"))  # NaN, and NaN gradients
    out.logits.register_hook(lambda grad: grad * float("nan"))
    return out


MoELM.forward = HFLanguageModel.forward = poisoned_forward
exit_rank(cli.main(sys.argv[1:]))  # as python -m sparsemixer_ds.cli ends
