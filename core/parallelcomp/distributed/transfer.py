"""Chunk KV between processes as numpy arrays, which Ray's object store hands over without a copy
(the reader maps the writer's shared memory; Ray docs, "Serialization: numpy arrays"). A torch
tensor would be pickled and copied instead. bfloat16 has no numpy dtype, so its bits travel as
int16 and are viewed back on arrival; nothing is converted.

Received arrays are read-only: the driver only reads them (kv.decode_cache and kv.concat copy
them into the merged KV).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from ..kv import LayerKV


def pack(kv: list[LayerKV]) -> list[np.ndarray]:
    """[k0, v0, k1, v1, …] of a batch-1 KV as numpy arrays (CPU)."""
    return [_array(t) for pair in kv for t in pair]


def unpack(arrays: list[np.ndarray], dtype: torch.dtype, device: torch.device) -> list[LayerKV]:
    tensors = [_tensor(a, dtype, device) for a in arrays]
    return list(zip(tensors[0::2], tensors[1::2]))


def n_bytes(arrays: list[np.ndarray]) -> int:
    return sum(a.nbytes for a in arrays)


def _array(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu().contiguous()
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()


def _tensor(a: np.ndarray, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    with warnings.catch_warnings():  # read-only shared memory, only ever read (module docstring)
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        t = torch.from_numpy(a)
    return (t.view(torch.bfloat16) if dtype == torch.bfloat16 else t).to(device)
