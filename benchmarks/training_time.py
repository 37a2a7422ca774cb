"""Training time of each model from its training log: the epochs' own "Time taken" lines (ignite), summed.

    python benchmarks/training_time.py --out real_cpu_training \
        cyclegan=runs/real.log vejp=runs/real.log,runs/vejp.log vejp_unconditional=runs/vejp_unconditional.log ...

Each argument is ``model=LOG[,LOG...]``: the logs of one training run (a resumed run has several; an epoch logged twice
counts once, its last time). Prints and writes ``benchmarks/results/OUT.{md,json}``: epochs, seconds, seconds per
iteration where ``--iterations_per_epoch`` gives it (``model=N``).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import save_report  # noqa: E402

EPOCH = re.compile(r"(\w+Trainer) - INFO - Epoch\[(\d+)\] Complete\. Time taken: (\d+):(\d+):([\d.]+)")


def epoch_seconds(logs: list[Path], trainer: str | None = None) -> dict[int, float]:
    """Epoch -> seconds, from ignite's "Epoch[N] Complete. Time taken: H:M:S" lines of ``trainer`` (any if None)."""
    seconds: dict[int, float] = {}
    for log in logs:
        for line in log.read_text(errors="replace").splitlines():
            match = EPOCH.search(line)
            if match and (trainer is None or match.group(1) == trainer):
                hours, minutes, secs = int(match.group(3)), int(match.group(4)), float(match.group(5))
                seconds[int(match.group(2))] = hours * 3600 + minutes * 60 + secs
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="model=LOG[,LOG...]")
    parser.add_argument("--iterations_per_epoch", nargs="*", default=[], help="model=N")
    parser.add_argument("--note", default="")
    parser.add_argument("--out", default="training_time")
    args = parser.parse_args()
    per_epoch = {k: int(v) for k, v in (item.split("=", 1) for item in args.iterations_per_epoch)}
    rows, record = [], {"command": " ".join(["python benchmarks/training_time.py", *sys.argv[1:]]), "note": args.note, "models": {}}
    for run in args.runs:
        model, logs = run.split("=", 1)
        trainer = "CycleGANTrainer" if model.startswith("cyclegan") else "ScoreMatchingTrainer"
        seconds = epoch_seconds([Path(p) for p in logs.split(",")], trainer)
        total = sum(seconds.values())
        iterations = per_epoch.get(model, 0) * len(seconds)
        record["models"][model] = {
            "epochs": len(seconds),
            "seconds": total,
            "iterations": iterations or None,
            "seconds_per_iteration": total / iterations if iterations else None,
        }
        rate = f"{total / iterations:.3f}" if iterations else "n/a"
        rows.append(f"| {model} | {len(seconds)} | {iterations or 'n/a'} | {total:.0f} | {total / 60:.1f} | {rate} |")
        print(rows[-1])
    table = (
        f"# Training time per model\n\n`{record['command']}`\n\n{args.note}\n\n"
        "| model | epochs | iterations | seconds | minutes | s / iteration |\n|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n"
    )
    print(save_report(table, record, Path(__file__).parent / "results", args.out))


if __name__ == "__main__":
    main()
