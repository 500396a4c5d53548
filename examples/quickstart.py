"""The core API in a dozen lines: answer over many documents with the embedded SmolLM2-135M.

    python examples/quickstart.py            # offline; converts the embedded model once (~20 s)
"""

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from parallelcomp import ParallelComp, ParallelCompConfig  # noqa: E402

docs = [p.read_text() for p in sorted(Path("/usr/share/common-licenses").glob("*")) if p.is_file()]
pc = ParallelComp.from_pretrained(config=ParallelCompConfig.preset("fast", keep_chunks=1))
out = pc.generate("Who is the license steward of the Mozilla Public License 2.0?", documents=docs,
                  max_new_tokens=48, progress=True)
print(out.text)
for chunk in out.kept_chunks:
    print(f"kept chunk {chunk.index}: documents {chunk.documents}, question NLL {chunk.score:.3f}")
print(out.stats)
