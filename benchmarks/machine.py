"""The machine description every benchmark result records (timings on a shared machine mean
little without the thread count and the load around the run)."""

from __future__ import annotations

import os
import platform
import sys
from typing import Any, Sequence

import torch


def machine_info(load_before: Sequence[float]) -> dict[str, Any]:
    """CPU, cores, torch threads and versions, and the load average before and after the run."""
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }
