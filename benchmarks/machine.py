"""A description of the machine and software a result file was produced on."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import psutil
import torch
import transformers


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe(dtype: str) -> dict:
    return {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "dtype": dtype,
    }


def per_length_results(out, dtype: str, config: dict) -> dict:
    """`out/results.json` to add rows to (rows of lengths not measured again are kept), or a new
    one when there is none or it holds another dtype's or config's rows (one file never mixes
    them); its machine record is this machine's."""
    previous = Path(out) / "results.json"
    results = json.loads(previous.read_text()) if previous.exists() else {}
    if results.get("machine", {}).get("dtype") != dtype or results.get("config") != config:
        results = {"config": config, "lengths": {}}
    results["machine"] = describe(dtype)
    return results
