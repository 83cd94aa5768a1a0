"""Run under torchrun by tests/test_train.py: the command line's ``lstmkit train`` with the
flags given (its own entry point and exit code), then this process's weights saved as
``RUN_DIR/rank{RANK}.pt``, so that the test can check that every process ends with the same
weights."""

import os
import sys
from pathlib import Path

import torch

from lstmkit.__main__ import main
from lstmkit.train import loop

models = []
train = loop.train


def keeping_the_model(*args, **kwargs):
    outcome = train(*args, **kwargs)
    models.append(outcome.model)
    return outcome


loop.train = keeping_the_model  # the command line calls loop.train: this rank's model kept
code = main(["train", *sys.argv[1:]])
run_dir = Path(sys.argv[sys.argv.index("--run-dir") + 1])
torch.save(models[0].state_dict(), run_dir / f"rank{os.environ['RANK']}.pt")
sys.exit(code)
