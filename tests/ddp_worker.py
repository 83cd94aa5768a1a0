"""Run under torchrun by tests/test_train.py: train with the ``lstmkit train`` flags given,
then save this process's weights as ``RUN_DIR/rank{RANK}.pt``, so that the test can check
that every process ends with the same weights."""

import os
import sys

import torch

from lstmkit.__main__ import parser
from lstmkit.train import cli, loop

task, run_dir, resume = cli.configure(parser().parse_args(["train", *sys.argv[1:]]))
outcome = loop.train(task, run_dir, resume=resume, quiet=True)
torch.save(outcome.model.state_dict(), run_dir / f"rank{os.environ['RANK']}.pt")
