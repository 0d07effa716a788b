"""What a benchmark ran on, for the header of its table."""

from __future__ import annotations

import os
import platform
from typing import Any


def machine(**extra: Any) -> dict[str, Any]:
    """CPU, cores and Python version, then whatever the benchmark adds."""
    cpu = first_field("/proc/cpuinfo", "model name")
    base = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version()}
    return base | extra


def first_field(path: str, name: str) -> str:
    """The value of the first ``name: value`` line of a /proc file."""
    try:
        with open(path) as handle:
            for line in handle:
                if line.startswith(name):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, as printed by uptime."""
    return " ".join(f"{load:.2f}" for load in os.getloadavg())
