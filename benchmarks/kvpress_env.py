"""NVIDIA kvpress pins transformers<5.3, so it runs from its own virtual environment
(benchmarks/.kvpress-venv, gitignored): torch pinned to this venv's version first, then kvpress."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

KVPRESS = "kvpress==0.5.5"
DEFAULT_VENV = Path(__file__).resolve().parent / ".kvpress-venv"
_CHECK = ("import importlib.metadata as m; "
          "print(' '.join(f'{p}={m.version(p)}' for p in ('kvpress', 'torch', 'transformers')))")


def ensure(venv: Path = DEFAULT_VENV, create: bool = True) -> tuple[Path | None, str]:
    """(the venv's python, its package versions) or (None, why kvpress is unavailable)."""
    python = venv / "bin" / "python"
    if not python.exists():
        if not create:
            return None, f"no kvpress environment at {venv} (creating it was not requested)"
        torch_pin = "torch==" + torch.__version__.split("+")[0]
        try:
            _run([sys.executable, "-m", "venv", str(venv)])
            _run([str(python), "-m", "pip", "install", "-q", torch_pin])
            _run([str(python), "-m", "pip", "install", "-q", KVPRESS, torch_pin])
        except subprocess.CalledProcessError as err:
            return None, f"creating {venv} failed: {err.stderr.strip()[-400:]}"
    check = subprocess.run([str(python), "-c", _CHECK], capture_output=True, text=True)
    if check.returncode:
        return None, f"kvpress does not import in {venv}: {check.stderr.strip()[-400:]}"
    return python, check.stdout.strip()


def _run(cmd: list[str]) -> None:
    print("kvpress setup:", " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, capture_output=True, text=True)
