"""ParallelComp on a Ray cluster (docs/distributed.md): chunks and their KV spread over workers by
content key; per question only scores and the K kept chunks' KV travel.

    from parallelcomp.distributed import RayParallelComp
    pc = RayParallelComp.from_pretrained(None, num_workers=2)   # starts a local Ray if none runs
    out = pc.generate("Who wrote it?", documents=docs)

Needs the optional extra: `pip install "parallelcomp[ray]"`. This package imports Ray only when an
engine is made; the rest of parallelcomp never imports it.
"""

from .engine import RayParallelComp

__all__ = ["RayParallelComp"]
