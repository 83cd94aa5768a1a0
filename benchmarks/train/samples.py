"""How the main job's runs read: each run's printed sample (its ``output.txt``, the console
output of ``lstmkit train``) measured with ``lstmkit.train.tasks.text_shares``, beside its
validation bits per character, steps and number of evaluations. Run from the repository root
on run directories made by ``lstmkit train --run-dir DIR --seed N > DIR/output.txt``:

    .venv/bin/python benchmarks/train/samples.py DIR [DIR ...] --out OUT

It writes ``OUT/samples.json`` (with the machine each run started on) and ``OUT/samples.md``,
its table as ``python -m lstmkit.bench.render`` renders it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lstmkit.bench.render import render_samples
from lstmkit.train import metrics
from lstmkit.train.tasks import text_shares

MARK = "sample (temperature 0.8):\n"


def measure(run: Path) -> dict:
    """One run's sample shares, last evaluation, steps and evaluations."""
    output = (run / "output.txt").read_text(encoding="utf-8")
    sample = output.split(MARK, 1)[1]
    share, layout = text_shares(sample)
    evaluations = [r for r in metrics.read(run) if "eval_bpc" in r]
    config = json.loads((run / "checkpoint" / "config.json").read_text())
    machine = json.loads((run / metrics.MACHINES).read_text().splitlines()[0])
    return {
        "run": run.name,
        "seed": config["seed"],
        "steps": evaluations[-1]["step"],
        "evaluations": len(evaluations),
        "bpc": evaluations[-1]["eval_bpc"],
        "ordinary_share": share,
        "layout_lines": layout,
        "sample_chars": len(sample),
        "machine": machine,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    rows = [measure(run) for run in args.runs]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "samples.json").write_text(json.dumps(rows, indent=1) + "\n")
    text = render_samples(str(args.out / "samples.json"), Path.cwd()) + "\n"
    (args.out / "samples.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
