"""Builds and loads the C kernels (decode_kernel.c, attention_kernel.c, layer_kernel.c) with the
system's C compiler.

Each source is compiled once per source, compiler and flags into the user cache, and the shared
library is loaded into the process, so it is never trusted blindly: its SHA-256 is written next
to it when built and checked before every load; a library that fails the check is rebuilt. Builds
go to a temporary name and are renamed into place, so concurrent processes never load a
half-written file.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import threading
from pathlib import Path

_log = logging.getLogger(__name__)


def load(source: Path, flags: tuple[str, ...], cpu_flags: frozenset[str], what: str) -> tuple[ctypes.CDLL | None, str]:
    """The library of `source` (`build`), loaded, or None and why not: a CPU that is not x86-64 or
    lacks one of `cpu_flags` (hardware.cpu_flags), no compiler, a failed build. A failed build is
    logged as a warning that `what` (the kernels) is unavailable."""
    from .hardware import cpu_flags as flags_here

    missing = cpu_flags - flags_here()
    if platform.machine() not in ("x86_64", "AMD64") or missing:
        return None, f"the CPU ({platform.machine()}) lacks {', '.join(sorted(missing)) or 'x86-64'}"
    try:
        return ctypes.CDLL(str(build(source, flags))), ""
    except (OSError, subprocess.SubprocessError) as exc:  # no compiler, a failed build, a cache we cannot load from
        _log.warning("%s unavailable: %s", what, exc)
        return None, str(exc)


def build(source: Path, flags: tuple[str, ...]) -> Path:
    """The library compiled from `source` with `flags` in the user cache, rebuilt when missing or
    when its checksum fails. OSError (no compiler, a failed build) or SubprocessError."""
    from .default_model import cache_root

    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        raise OSError(f"no C compiler {os.environ.get('CC', 'cc')!r} found (set CC or install gcc/clang)")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30, check=True).stdout
    text = source.read_bytes()
    key = hashlib.sha256(b"\0".join([text, " ".join(flags).encode(), version.encode()])).hexdigest()[:16]
    path = cache_root() / "kernels" / f"{source.stem}-{key}.so"
    digest = path.with_suffix(".sha256")
    if path.is_file() and digest.is_file() and digest.read_text().strip() == _sha256(path):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}.{threading.get_ident()}"  # two threads of one process build at once too
    tmp = path.with_name(f".{path.name}.{tag}.tmp")
    tmp_digest = digest.with_name(f".{digest.name}.{tag}.tmp")
    try:
        subprocess.run([compiler, *flags, "-o", str(tmp), str(source), "-lm"], capture_output=True, text=True,
                       timeout=120, check=True)
        tmp_digest.write_text(_sha256(tmp))
        os.replace(tmp, path)
        os.replace(tmp_digest, digest)
    except subprocess.CalledProcessError as exc:
        raise OSError(f"{compiler} failed: {exc.stderr.strip()[-500:]}") from exc
    finally:
        tmp.unlink(missing_ok=True)
        tmp_digest.unlink(missing_ok=True)
    return path


def source_digest(source: Path) -> str:
    """The first 12 hex digits of the SHA-256 of a kernel's source text. Chunk KV made with a C
    kernel is stored under its name and this digest (engine._model_identity), so KV made by an
    older version of the kernel, whose rounding may differ, is recomputed, never reused."""
    return hashlib.sha256(source.read_bytes()).hexdigest()[:12]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
