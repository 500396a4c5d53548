"""A description of the machine and software a result file was produced on."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Callable

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


def side_by_side(out: Path, results: dict, lengths: list[int], runs: dict[str, Callable[[int], object]],
                 table: Callable[[dict], str]) -> Path:
    """Per length, each of `runs` (a name → its measurement at that length) one after another,
    with the 1-minute load before and after; `results.json` and `table(results)` as `results.md`
    are written after each length, so a run cut short keeps the lengths it finished."""
    for length in lengths:
        entry = {"load_before": os.getloadavg()[0]}
        for name, run in runs.items():
            entry[name] = run(length)
        entry["load_after"] = os.getloadavg()[0]
        results["lengths"][str(length)] = entry
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results, indent=1))
        (out / "results.md").write_text(table(results))
    return out / "results.md"
