"""results.json → results.md (tables) and PNG plots (score, prefill time and peak RSS vs length)."""

from __future__ import annotations

import re
from pathlib import Path
from statistics import mean

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SCORE_NOTE = {
    "ppl": "perplexity of the final 512-token window given all text before it (lower is better)",
    "niah": "RULER niah_single_2, string_match_all (1 = the value is in the answer)",
    "passkey": "passkey in repeated filler, string_match_all",
    "kv_retrieval": "RULER niah_multikey_3 (UUID pairs), string_match_all",
    "qa": "SQuAD v2 gold paragraph among distractors, string_match_part (any answer in the output)",
    "hotpotqa": "HotpotQA supporting paragraphs among distractors, string_match_part; gold_kept needs all of them",
}
METRICS = ("n", "score", "gold_kept", "prefill_seconds", "ttft_seconds", "decode_tok_s",
           "peak_rss_mb", "kv_mb", "tokens_in", "n_kept", "n_chunks", "reused_chunks")


def summarize(entry: dict) -> dict:
    """Means over a cell's samples (peak RSS: the maximum)."""
    recs = entry.get("samples", [])

    def avg(key):
        vals = [float(r[key]) for r in recs if r.get(key) is not None]
        return mean(vals) if vals else None

    # Decode speed after the first token: parallelcomp's decode_seconds include the question's
    # forward (first_token_seconds); the baselines' prompt forward, question included, is prefill.
    decode = sum(r.get("decode_seconds", 0) - r.get("first_token_seconds", 0) for r in recs)
    new = sum(max(r.get("new_tokens", 0) - 1, 0) for r in recs)
    kv = avg("kv_bytes")
    # Time to first token: the baselines' prefill already includes the question.
    ttft = [r["prefill_seconds"] + r.get("first_token_seconds", 0) for r in recs if "output" in r]
    return {"n": len(recs), "score": avg("score"), "gold_kept": avg("gold_kept"),
            "prefill_seconds": avg("prefill_seconds"), "ttft_seconds": mean(ttft) if ttft else None,
            "decode_tok_s": new / decode if decode > 0 and new else None,
            "peak_rss_mb": entry.get("peak_rss_mb"), "kv_mb": kv / 2**20 if kv else None,
            "tokens_in": avg("tokens_in"), "n_kept": avg("n_kept"), "n_chunks": avg("n_chunks"),
            # phase-1 KV from the chunk store (--kv-store, earlier samples): exact, but faster
            "reused_chunks": avg("reused_chunks")}


def _fmt(value, digits=2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _label(entry: dict | None, key: str = "score") -> str:
    if entry is None:
        return ""
    if entry["status"] != "ok":
        return entry["status"]
    return _fmt(summarize(entry)[key])


def _grid(cells: dict) -> dict:
    """{model: {task: {method: {length: entry}}}}"""
    out: dict = {}
    for e in cells.values():
        out.setdefault(e["model"], {}).setdefault(e["task"], {}).setdefault(e["method"], {})[
            e["length"]] = e
    return out


def markdown(data: dict) -> str:
    m = data.get("machine", {})
    lines = ["# Benchmark results", "",
             f"Machine: {m.get('cpu')}, {m.get('cores')} cores ({m.get('torch_threads')} torch "
             f"threads), {m.get('ram_gib')} GiB RAM, GPU: {m.get('gpu') or 'none'}; "
             f"python {m.get('python')}, torch {m.get('torch')}, transformers "
             f"{m.get('transformers')}, dtype {m.get('dtype')}.",
             f"kvpress environment: {m.get('kvpress_env', 'not used')}.", "",
             "Runs: " + "; ".join(f"`{' '.join(r['argv'])}` ({r['cells_run']} cells, "
                                  f"{r['wall_seconds']:.0f} s)" for r in data.get("runs", [])), ""]
    for model, tasks in _grid(data["cells"]).items():
        lines += [f"## {model}", ""]
        for task, methods in tasks.items():
            lengths = sorted({n for by_len in methods.values() for n in by_len})
            lines += [f"### {task}: score", "", f"Score: {SCORE_NOTE[task]}.", "",
                      "| method | " + " | ".join(f"{n // 1024}K" for n in lengths) + " | samples |",
                      "|---|" + "---:|" * (len(lengths) + 1)]
            for method, by_len in methods.items():
                samples = "/".join(sorted({str(e["n"]) for e in by_len.values() if e["status"] == "ok"}))
                lines.append(f"| {method} | " + " | ".join(_label(by_len.get(n)) for n in lengths)
                             + f" | {samples} |")
            lines += ["", f"### {task}: all metrics", "",
                      "| method | length | " + " | ".join(METRICS) + " |",
                      "|---|---:|" + "---:|" * len(METRICS)]
            for method, by_len in methods.items():
                for n in lengths:
                    e = by_len.get(n)
                    if e and e["status"] == "ok":
                        s = summarize(e)
                        lines.append(f"| {method} | {n} | "
                                     + " | ".join(_fmt(s[k]) for k in METRICS) + " |")
            lines.append("")
        lines += _efficiency(tasks)
    notes = sorted({f"- {e['method']} ({e['task']} {e['length']}): {e['status']}: {e['reason']}"
                    for e in data["cells"].values() if e["status"] != "ok"}
                   | {f"- {e['method']} ({e['task']} {e['length']}): {e['rss_note']}"
                      for e in data["cells"].values() if e.get("rss_note")})
    if notes:
        lines += ["## Notes on cells", ""] + notes + [""]
    return "\n".join(lines)


def _efficiency(tasks: dict) -> list[str]:
    """Prefill seconds and peak RSS of each parallelcomp preset next to full attention."""
    lines = []
    for task, methods in tasks.items():
        if "full" not in methods:
            continue
        pcs = [m for m in methods if m.startswith("parallelcomp:")]
        lengths = sorted({n for m in pcs + ["full"] for n in methods[m]})
        cols = pcs + ["full"]
        lines += [f"### {task}: prefill seconds / peak RSS MB, parallelcomp vs full", "",
                  "| length | " + " | ".join(cols) + " |", "|---:|" + "---:|" * len(cols)]
        for n in lengths:
            row = [_time_rss(methods[m].get(n)) for m in cols]
            lines.append(f"| {n} | " + " | ".join(row) + " |")
        lines.append("")
    return lines


def _time_rss(entry: dict | None) -> str:
    if entry is None or entry["status"] != "ok":
        return _label(entry)
    s = summarize(entry)
    return f"{_fmt(s['prefill_seconds'])} s / {_fmt(s['peak_rss_mb'])} MB"


def plot(data: dict, out: Path) -> list[Path]:
    """Per model: score vs length, and prefill time / peak RSS vs length, one panel per task."""
    files = []
    for model, tasks in _grid(data["cells"]).items():
        slug = re.sub(r"[^A-Za-z0-9.]+", "-", Path(model).name).strip("-")
        palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        names = sorted({m for methods in tasks.values() for m in methods})
        color = {m: palette[i % len(palette)] for i, m in enumerate(names)}
        panels = [("score", "score"), ("prefill_seconds", "prefill s"), ("peak_rss_mb", "peak RSS MB")]
        for name, keys in (("score", panels[:1]), ("time-memory", panels[1:])):
            fig, axes = plt.subplots(len(keys), len(tasks), squeeze=False,
                                     figsize=(4.2 * len(tasks), 3.4 * len(keys)))
            for col, (task, methods) in enumerate(tasks.items()):
                for row, (key, ylabel) in enumerate(keys):
                    ax = axes[row][col]
                    for method, by_len in methods.items():
                        pts = [(n, summarize(e)[key]) for n, e in sorted(by_len.items())
                               if e["status"] == "ok" and summarize(e)[key] is not None]
                        if pts:
                            ax.plot(*zip(*pts), marker="o", label=method, color=color[method])
                    ax.set_xscale("log", base=2)
                    ax.xaxis.set_major_formatter(lambda x, _: f"{x / 1024:g}K")
                    if key == "prefill_seconds" or (task == "ppl" and key == "score"):
                        ax.set_yscale("log")
                    ax.set_title(task)
                    ax.set_xlabel("input tokens")
                    ax.set_ylabel("perplexity" if task == "ppl" and key == "score" else ylabel)
                    ax.grid(alpha=0.3)
                    if ax.get_legend_handles_labels()[0]:
                        ax.legend(fontsize=7)
            fig.tight_layout()
            path = out / f"{slug}-{name}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            files.append(path)
    return files


def write(out: Path, data: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(markdown(data))
    plot(data, out)
