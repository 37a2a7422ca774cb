"""Wall time of the documented single-subject command, start-up included, and where it goes:

    python -m monai.bundle run inference --config_file bundles/vejp_anomaly/configs/inference.yaml --subject_dir CASE

    python benchmarks/single_subject_inference.py --subject_dir DATA/Brats18_2013_11_1 --repeats 3 \
        --checkouts . /tmp/tsgm-before --out single_subject_inference_cpu

Each checkout's command runs ``--repeats`` times, interleaved (checkout 1, 2, 1, 2, ...) so that a busy machine slows
every checkout alike; the table gives each one's median wall seconds, the in-process seconds its detection record
reports (reconstruction: preprocessing, sampling and the maps; total: everything after start-up) and the ratio to the
first checkout. ``--checkouts`` are folders holding this repository at some commit (e.g. ``git worktree add``); the
command runs from each with its ``tsgm_components`` first on ``PYTHONPATH``. Output goes to a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, command_line, machine, save_report  # noqa: E402

TARGET_SECONDS = 10.0  # the single-subject command on a 2-core CPU, start-up included


def commit_of(checkout: Path) -> str:
    """The checkout's commit, with ``+changes`` when its tracked files differ from it."""
    head = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(checkout), "diff", "--quiet", "HEAD"]).returncode != 0
    return head + ("+changes" if dirty else "")


def run_once(checkout: Path, subject_dir: Path, threads: int) -> dict[str, float]:
    """One run of the command from ``checkout``; its wall seconds and its detection record's seconds."""
    with tempfile.TemporaryDirectory() as out:
        command = [
            sys.executable,
            "-m",
            "monai.bundle",
            "run",
            "inference",
            "--config_file",
            str(checkout / "bundles" / "vejp_anomaly" / "configs" / "inference.yaml"),
            "--subject_dir",
            str(subject_dir),
            "--detection_dir",
            out,
        ]
        env = dict(os.environ, PYTHONPATH=str(checkout), OMP_NUM_THREADS=str(threads))
        start = time.perf_counter()
        result = subprocess.run(command, cwd=checkout, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if result.returncode != 0:
            raise SystemExit(f"single_subject_inference.py: the command failed from {checkout}:\n{result.stderr[-3000:]}")
        record = json.loads(next(Path(out).glob("*/*_detection.json")).read_text())
    return {"wall": wall, **{f"in_process_{key}": float(value) for key, value in record["seconds"].items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subject_dir", required=True, help="a BraTS-layout case folder")
    parser.add_argument("--checkouts", nargs="+", default=["."], help="repository folders to time (the first is the reference)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--note", default="", help="what else ran on the machine meanwhile")
    parser.add_argument("--out", default="single_subject_inference_cpu")
    parser.add_argument("--out_dir", default=str(RESULTS))
    args = parser.parse_args()
    checkouts = [Path(c).resolve() for c in args.checkouts]
    runs: dict[str, list[dict[str, float]]] = {str(c): [] for c in checkouts}
    for repeat in range(args.repeats):
        for checkout in checkouts:
            runs[str(checkout)].append(run_once(checkout, Path(args.subject_dir).resolve(), args.threads))
            print(f"repeat {repeat + 1}, {checkout}: {runs[str(checkout)][-1]}", flush=True)
    medians = {c: {key: statistics.median(r[key] for r in runs[c]) for key in runs[c][0]} for c in runs}
    reference = medians[str(checkouts[0])]["wall"]
    rows = [
        f"| {commit_of(c)} (`{c.name}`) | {medians[str(c)]['wall']:.1f} | {medians[str(c)]['in_process_total']:.1f} | "
        f"{medians[str(c)]['in_process_reconstruction']:.1f} | {medians[str(c)]['wall'] / reference:.2f} |"
        for c in checkouts
    ]
    info = machine()
    table = (
        f"# Single-subject inference, start-up included ({info['processor']}, {args.threads} threads)\n\n"
        f"`{command_line(__file__)}`\n\n"
        f"Median of {args.repeats} interleaved runs of `python -m monai.bundle run inference --config_file "
        f"bundles/vejp_anomaly/configs/inference.yaml --subject_dir {Path(args.subject_dir).name}` per checkout (the "
        f"shipped weights and calibration). Target: ≤ {TARGET_SECONDS:.0f} s wall. {args.note}\n\n"
        "| checkout | wall s | in-process s (after start-up) | of which reconstruction and maps | wall / first |\n"
        "|---|---:|---:|---:|---:|\n" + "\n".join(rows) + "\n"
    )
    print(table)
    path = save_report(table, {"machine": info, "command": command_line(__file__), "runs": runs, "medians": medians}, args.out_dir, args.out)
    print(f"wrote {path}.md")


if __name__ == "__main__":
    main()
