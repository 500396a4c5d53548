"""Shared fixtures: tiny random models of several families (built from configs, offline) that
share the embedded SmolLM2 tokenizer, and the embedded SmolLM2 model itself for slow tests.

PARALLELCOMP_TEST_DEVICE (default "cpu") is where the tiny models live: scripts/cuda-check.sh
runs the core tests with it set to "cuda" on a GPU machine. CI runs them on the CPU."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch
from transformers import (
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from parallelcomp import ParallelComp, ParallelCompConfig

DEVICE = torch.device(os.environ.get("PARALLELCOMP_TEST_DEVICE", "cpu"))

# Small but not degenerate: a larger init spread makes greedy outputs vary token to token, so
# token-for-token comparisons are meaningful. GQA (4 query heads, 2 KV heads) everywhere.
_COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    initializer_range=0.2,
    bos_token_id=1,
    eos_token_id=2,
)
FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM, dict(tie_word_embeddings=True)),
    "mistral": (MistralConfig, MistralForCausalLM, dict(sliding_window=None)),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, dict(use_sliding_window=False)),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, dict(head_dim=16, use_sliding_window=False)),
}

# Mistral-7B-Instruct-v0.1's chat template (Llama-2's and Gemma-2's are alike): user and
# assistant turns must alternate, and a system or tool turn raises.
STRICT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token + ' ' }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)


def with_template(tokenizer, template: str):
    """A copy of `tokenizer` with another chat template."""
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = template
    return tok


@pytest.fixture(scope="session")
def smol_dir():
    from parallelcomp.default_model import embedded_model_dir

    return embedded_model_dir()


@pytest.fixture(scope="session")
def tokenizer(smol_dir):
    return AutoTokenizer.from_pretrained(smol_dir)


def tiny_model(family: str, vocab_size: int, seed: int = 0, attn: str = "sdpa", **overrides):
    config_cls, model_cls, extra = FAMILIES[family]
    config = config_cls(vocab_size=vocab_size, **{**_COMMON, **extra, **overrides})
    config._attn_implementation = attn
    torch.manual_seed(seed)
    return model_cls(config).eval().to(DEVICE)


@pytest.fixture(scope="session", params=sorted(FAMILIES))
def family(request):
    return request.param


@pytest.fixture(scope="session")
def tiny_llama(tokenizer):
    return tiny_model("llama", len(tokenizer))


@pytest.fixture
def make_engine(tokenizer):
    """make_engine(family="llama", **config) → ParallelComp over a fresh tiny model."""

    def make(family: str = "llama", model=None, **config):
        model = model if model is not None else tiny_model(family, len(tokenizer))
        return ParallelComp(model, tokenizer, ParallelCompConfig(**config))

    return make


@pytest.fixture
def model_dir(tmp_path, tokenizer):
    """A tiny random Llama saved as a local HF directory (the from_pretrained / CLI path)."""
    path = tmp_path / "model"
    tiny_model("llama", len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def smol_engine(smol_dir):
    return ParallelComp.from_pretrained(smol_dir)
