"""The grid: one subprocess per cell (model × task × method × length), so peak RSS is the cell's
own. Results are merged into `results.json` after every cell; cells already there are skipped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm
from transformers import AutoTokenizer, GenerationConfig

from parallelcomp import ParallelCompConfig
from parallelcomp.prompts import end_of_turn_ids

from . import cellio, kvpress_env, machine, report, scoring, worker
from .prompting import generation_input
from .tasks import make_samples

REPO = Path(__file__).resolve().parent.parent
PPL_METHODS = ("full", "truncate")  # topk and kvpress have no perplexity setting
CAPPED = ("full", "kvpress")  # attend the whole input: skipped above --full-max-length
# Room for the instruct model's full sentence before the answer ("The special magic number for
# <key> mentioned in the provided text is 1234567."): tighter caps cut answers off mid-number.
MAX_NEW_TOKENS = {"niah": 64, "passkey": 32, "kv_retrieval": 128, "qa": 48, "hotpotqa": 48}


@dataclass(frozen=True)
class Cell:
    model: str
    task: str
    method: str
    length: int

    @property
    def key(self) -> str:
        return f"{self.model}|{self.task}|{self.method}|{self.length}"


def plan(models, tasks, methods, presets, lengths) -> list[Cell]:
    """Cells in run order; `methods` may name `parallelcomp` (expanded to one per preset)."""
    expanded = [m2 for m in methods
                for m2 in ([f"parallelcomp:{p}" for p in presets] if m == "parallelcomp" else [m])]
    return [Cell(model, task, method, length)
            for model in models for task in tasks for method in expanded for length in lengths
            if task != "ppl" or method.startswith("parallelcomp:") or method in PPL_METHODS]


class Results:
    """results.json: {"machine", "runs": [...], "cells": {key: entry}}."""

    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.exists() else {"runs": [], "cells": {}}

    def done(self, cell: Cell, n: int) -> bool:
        entry = self.data["cells"].get(cell.key)
        return bool(entry) and entry["status"] in ("ok", "skipped") and entry["n"] >= n

    def finished_samples(self, cell: Cell) -> list[dict]:
        """Records of a cell that ran cleanly: a larger --samples run only adds the missing ones
        (sample i is the same for every n, see `tasks.make_samples`)."""
        entry = self.data["cells"].get(cell.key)
        return entry["samples"] if entry and entry["status"] == "ok" else []

    def put(self, cell: Cell, entry: dict) -> None:
        self.data["cells"][cell.key] = {**vars(cell), **entry}
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        tmp.replace(self.path)


def model_dir(name: str) -> str:
    """A local HF directory, or the name of an embedded model (converted once)."""
    if Path(name).is_dir():
        return str(Path(name).resolve())
    from parallelcomp.default_model import embedded_model_dir

    return str(embedded_model_dir(name))


def run(opts) -> Path:
    """Run every missing cell of the grid described by `opts` (see `__main__`), then report."""
    started = time.time()
    if "parallelcomp" in opts.methods:
        for preset in opts.presets:  # a typo fails here, not in every cell
            worker.preset_config(preset)
    results = Results(Path(opts.out) / "results.json")
    results.data["machine"] = {**results.data.get("machine", {}), **machine.describe(opts.dtype)}
    cells = [c for c in plan(opts.models, opts.tasks, opts.methods, opts.presets, opts.lengths)
             if not results.done(c, opts.samples)]
    kvpress = None
    bar = tqdm(cells, desc="bench", unit="cell", file=sys.stderr)
    for cell in bar:
        bar.set_postfix_str(f"{cell.task} {cell.method} {cell.length}")
        if cell.method == "kvpress" and kvpress is None:
            kvpress = kvpress_env.ensure(Path(opts.kvpress_venv), create=opts.kvpress_setup)
            results.data["machine"]["kvpress_env"] = kvpress[1]
        results.put(cell, CellRun(cell, opts, kvpress, results.finished_samples(cell)).run())
    if cells:
        results.data["runs"].append({"argv": sys.argv[1:], "cells_run": len(cells),
                                     "wall_seconds": round(time.time() - started, 1)})
    results.save()
    report.write(Path(opts.out), results.data)
    return results.path


class CellRun:
    """Build a cell's samples and inputs in this process, run them in a worker process."""

    _samples: dict = {}
    _tokenizers: dict = {}

    def __init__(self, cell: Cell, opts, kvpress, finished: list[dict]):
        self.cell, self.opts, self.kvpress, self.finished = cell, opts, kvpress, finished
        self.dir = model_dir(cell.model)
        if self.dir not in self._tokenizers:
            self._tokenizers[self.dir] = AutoTokenizer.from_pretrained(self.dir)
        self.tokenizer = self._tokenizers[self.dir]
        key = (self.dir, cell.task, cell.length, opts.samples)
        if key not in self._samples:
            self._samples[key] = make_samples(cell.task, self.tokenizer, cell.length, opts.samples,
                                              ppl_target=opts.ppl_target_tokens)
        self.samples = self._samples[key][len(finished):]
        self.max_new_tokens = opts.max_new_tokens or MAX_NEW_TOKENS.get(cell.task, 0)

    def run(self) -> dict:
        start = time.time()
        method = self.cell.method
        if method == "kvpress" and self.kvpress[0] is None:
            return {"status": "unavailable", "reason": self.kvpress[1], "n": 0, "samples": []}
        if method in CAPPED and self.cell.length > self.opts.full_max_length:
            reason = f"length {self.cell.length} > --full-max-length {self.opts.full_max_length}"
            return {"status": "skipped", "reason": reason, "n": len(self.samples), "samples": []}
        inputs = [self.full_input(s) for s in self.samples] if method == "kvpress" else []
        records, error = self.spawn(inputs)
        for sample, rec in zip(self.samples, records):
            rec["score"] = (rec["ppl"] if sample.task == "ppl"
                            else scoring.score(sample.task, rec["output"], sample.references))
        records = self.finished + records
        peaks = [r["peak_rss_mb"] for r in records if r.get("peak_rss_mb") is not None]
        entry = {"status": "error" if error else "ok", "n": len(records), "samples": records,
                 "peak_rss_mb": max(peaks, default=None),
                 "wall_seconds": round(time.time() - start, 1)}
        return entry | ({"reason": error} if error else {})

    def full_input(self, sample) -> list[int]:
        """The whole prompt as `full` feeds it (kvpress gets it from here)."""
        ids, _ = generation_input("full", self.tokenizer, sample, ParallelCompConfig(),
                                  self.window(), self.max_new_tokens)
        return ids

    def window(self) -> int:
        config = json.loads((Path(self.dir) / "config.json").read_text())
        return config.get("text_config", config)["max_position_embeddings"]

    def spawn(self, inputs) -> tuple[list[dict], str | None]:
        spec = {"model_dir": self.dir, "dtype": self.opts.dtype, "method": self.cell.method,
                "max_new_tokens": self.max_new_tokens}
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
               "TQDM_DISABLE": "1"}
        if self.cell.method == "kvpress":
            python, module = str(self.kvpress[0]), "benchmarks.kvpress_worker"
            spec |= {"kvpress_ratio": self.opts.kvpress_ratio, "eos_ids": sorted(self.eos_ids()),
                     "samples": [{"id": s.id, "input_ids": i} for s, i in zip(self.samples, inputs)]}
            env["PYTHONPATH"] = str(REPO)
        else:
            python, module = sys.executable, "benchmarks.worker"
            spec["samples"] = [s.to_dict() for s in self.samples]
            spec["kv_store_dir"] = self.opts.kv_store
            env["PYTHONPATH"] = os.pathsep.join([str(REPO / "core"), str(REPO)])
        if self.opts.inline and self.cell.method != "kvpress":
            records: list[dict] = []
            worker.run_spec(spec, records.append)
            return records, None
        proc = subprocess.run([python, "-m", module], input=json.dumps(spec), capture_output=True,
                              text=True, cwd=REPO, env=env)
        records = cellio.parse(proc.stdout)
        if proc.returncode or len(records) != len(self.samples):
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            return records, f"worker exited {proc.returncode}: {last}"
        return records, None

    def eos_ids(self) -> set[int]:
        try:
            ids = GenerationConfig.from_pretrained(self.dir).eos_token_id
        except OSError:  # no generation_config.json
            ids = None
        ids = set(ids if isinstance(ids, list) else [] if ids is None else [ids])
        return ids | {self.tokenizer.eos_token_id} | end_of_turn_ids(self.tokenizer)
