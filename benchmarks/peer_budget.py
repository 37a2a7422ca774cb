"""CPU budget of the comparison's peers: wall seconds of each peer's training steps, as `tsgm compare` recorded them in
W/demo_steps.json, against the budget that lets a user rerun the comparison overnight (detection cost: the comparison
table's NFE and seconds per volume).

    python benchmarks/peer_budget.py --work_dirs runs/real runs/demo --out peer_budget_cpu

One column per work dir. Seconds are wall time of whole bundle commands (start-up included) on the machine that ran
them, with whatever else it ran at the time: the record says how many comparisons ran side by side (--note).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, command_line, save_report  # noqa: E402

from tsgm_components.comparison import PEERS  # noqa: E402
from tsgm_components.pipeline import STEPS_RECORD  # noqa: E402

BUDGET_HOURS = 3.0  # issue target: all six peers' CPU training at the CPU scale


def training_seconds(record: dict[str, dict], peer: str) -> tuple[float | None, bool]:
    """Seconds of every ``<peer>: training*`` step (None when the record has none: not trained by `tsgm compare` in
    that work dir, or not finished) and whether one of them resumed an interrupted run (``--resume True``: the record
    then holds only the resumed part's time)."""
    entries = [entry for name, entry in record.items() if name.startswith(f"{peer}: training")]
    resumed = any("--resume True" in entry["command"] for entry in entries)
    return (float(sum(entry["seconds"] for entry in entries)) if entries else None), resumed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dirs", nargs="+", required=True)
    parser.add_argument("--out", default="peer_budget_cpu")
    parser.add_argument("--out_dir", default=str(RESULTS))
    parser.add_argument("--note", default="")
    args = parser.parse_args()
    records = {str(w): json.loads((Path(w) / STEPS_RECORD).read_text()) for w in args.work_dirs}
    table = {w: {peer: training_seconds(record, peer) for peer in PEERS} for w, record in records.items()}

    def minutes(value: tuple[float | None, bool]) -> str:
        seconds, resumed = value
        return "not recorded" if seconds is None else f"{seconds / 60:.1f}" + (" (resumed part only)" if resumed else "")

    head = "| peer | " + " | ".join(f"training min ({Path(w).name})" for w in table) + " |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for peer in PEERS:
        lines.append(f"| {peer} | " + " | ".join(minutes(t[peer]) for t in table.values()) + " |")
    sums = []
    for w, t in table.items():
        trained = [t[p][0] for p in PEERS if t[p][0] is not None]
        resumed = sum(t[p][1] for p in PEERS)
        sums.append(
            f"{Path(w).name}: {len(trained)} of {len(PEERS)} peers trained, {sum(trained) / 3600:.2f} h of training recorded"
            + (f" ({resumed} of them resumed: their earlier parts are not in it)" if resumed else "")
        )
    markdown = (
        f"# Peer methods: CPU training time in `tsgm compare`\n\n`{command_line(__file__)}`\n\n{args.note}\n\n"
        + "\n".join(lines)
        + f"\n\nTraining budget target: all six peers ≤ {BUDGET_HOURS:.0f} h on 2 cores. "
        + "; ".join(sums)
        + ".\n"
    )
    print(markdown)
    save_report(markdown, {"command": command_line(__file__), "note": args.note, "seconds": table}, args.out_dir, args.out)


if __name__ == "__main__":
    main()
