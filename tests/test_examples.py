"""The README's example scripts run (shortened)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_runs_and_learns():
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "quickstart.py"),
            "--methods",
            "ew",
            "--steps",
            "150",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    ).stdout
    row = next(line for line in out.splitlines() if line.startswith("ew "))
    digit_acc, parity_acc = float(row.split()[1]), float(row.split()[2])
    assert digit_acc > 0.6 and parity_acc > 0.6, out  # chance is 0.1 and 0.5
