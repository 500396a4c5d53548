"""`python -m benchmarks run ...` runs a grid; `python -m benchmarks report` redraws tables/plots;
`python -m benchmarks decode` times decoding over a merged KV (decode_speed.py);
`python -m benchmarks ray-scaling` compares 1 and 2 Ray workers with one process (ray_scaling.py);
`python -m benchmarks grammar` times grammar-constrained decoding (grammar_overhead.py);
`python -m benchmarks rerank` re-ranks a finished cell's chunks from its recorded NLLs (rerank.py);
`python -m benchmarks cuda` times the runtime on a CUDA GPU per attention implementation (cuda.py);
`python -m benchmarks long-question` times a prompt with no corpus against transformers' forward
(long_question.py)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from . import report  # noqa: E402
from .ray_scaling import SETUPS  # noqa: E402
from .tasks import TASKS  # noqa: E402
from parallelcomp.config import PRESETS  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the missing cells of a grid, then write the report")
    run.add_argument("--models", nargs="+", default=["smollm2-135m-instruct"],
                     help="embedded model names (e.g. qwen2.5-coder-0.5b-instruct) or local HF dirs")
    run.add_argument("--tasks", nargs="+", default=["ppl", "niah", "qa"], choices=TASKS)
    run.add_argument("--methods", nargs="+", default=["parallelcomp", "full", "truncate", "topk",
                                                      "kvpress"],
                     choices=["parallelcomp", "full", "truncate", "topk", "kvpress"])
    run.add_argument("--presets", nargs="+", default=["paper"],
                     help="ParallelCompConfig presets, one parallelcomp method each; "
                          "NAME,field=value,... overrides fields (e.g. paper,keep_chunks=1)")
    run.add_argument("--lengths", nargs="+", type=int, default=[8192, 16384, 32768])
    run.add_argument("--samples", type=int, default=1, help="samples per cell")
    run.add_argument("--max-new-tokens", type=int, default=None,
                     help="for every task (default: niah 64, passkey 32, kv_retrieval 128, qa and hotpotqa 48)")
    run.add_argument("--full-max-length", type=int, default=16384,
                     help="full attention and kvpress run only at lengths up to this")
    run.add_argument("--ppl-target-tokens", type=int, default=512,
                     help="ppl: tokens in the scored final window")
    run.add_argument("--inline", action="store_true",
                     help="run cells in this process (fast smoke tests; peak RSS is then shared)")
    run.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    run.add_argument("--kv-store", default=None, metavar="DIR",
                     help="disk tier of the chunk KV store shared by the cells (exact reuse: "
                          "scores are unchanged, times fall where haystacks repeat)")
    run.add_argument("--kvpress-ratio", type=float, default=0.5,
                     help="SnapKVPress compression_ratio (fraction of the KV removed)")
    run.add_argument("--kvpress-venv", default=str(Path(__file__).resolve().parent / ".kvpress-venv"))
    run.add_argument("--no-kvpress-setup", dest="kvpress_setup", action="store_false",
                     help="do not create the kvpress environment; report kvpress as unavailable")
    run.add_argument("--out", default=str(DEFAULT_OUT))
    job = sub.add_parser("main-job", help="time `make ask` per dtype against its prefill FLOP bound")
    job.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    job.add_argument("--max-bound-seconds", type=float, default=600,
                     help="do not run a dtype whose FLOP bound alone is longer than this")
    job.add_argument("--out", default=str(DEFAULT_OUT / "main-job"))
    rq = sub.add_parser("repeat-query", help="cold question, then 4 more and a fresh process over one corpus")
    rq.add_argument("--lengths", nargs="+", type=int, default=[32768, 65536, 131072])
    rq.add_argument("--repeats", type=int, default=1, choices=range(1, 21), metavar="N",
                    help="processes that ask the cold and the 2nd question (the first also asks 3-5); "
                         "the table gives each one's ratio and their median")
    rq.add_argument("--preset", default="retrieval", choices=sorted(PRESETS),
                    help="the engine's preset (default: retrieval, what `make ask` runs)")
    rq.add_argument("--conversation", action="store_true",
                    help="ask the five questions as one conversation, the history after and before the documents "
                         "side by side (default --out: results/conversation)")
    rq.add_argument("--out")
    sc = sub.add_parser("prefill-scaling", help="cold prefill per context length against its FLOP bound; peak RSS per store tier")
    sc.add_argument("--lengths", nargs="+", type=int, default=[8192, 16384, 32768, 65536, 131072])
    sc.add_argument("--stores", nargs="+", default=["memory", "disk"], choices=["memory", "disk"])
    sc.add_argument("--batch-tokens", nargs="+", type=int,
                    help="prefill_batch_tokens values, one row each (default: the config's default)")
    sc.add_argument("--attention-kernels", nargs="+", default=["auto"], choices=["auto", "fused", "matmul", "amx", "avx512"],
                    help="attention_kernel values, one row each (fused and matmul: side by side)")
    sc.add_argument("--layer-kernels", nargs="+", default=["auto"], choices=["auto", "torch"],
                    help="layer_kernel values, one row each (auto and torch: side by side)")
    sc.add_argument("--pack-weights", nargs="+", default=["on"], choices=["on", "off"],
                    help="pack_weights values, one row each (on and off: side by side)")
    sc.add_argument("--repeats", type=int, default=1, choices=range(1, 11), metavar="N",
                    help="fresh processes per cell; the row is the one with the median ratio to its bound")
    sc.add_argument("--out", default=str(DEFAULT_OUT / "prefill-scaling"))
    lq = sub.add_parser("long-question",
                        help="a prompt with no corpus (all question step) against transformers' forward")
    lq.add_argument("--lengths", nargs="+", type=int, default=[2048, 4096, 7680])
    lq.add_argument("--out", default=str(DEFAULT_OUT / "long-question"))
    rs = sub.add_parser("ray-scaling", help="encode and question times with 1 and 2 Ray workers vs one process")
    rs.add_argument("--lengths", nargs="+", type=int, default=[32768, 65536])
    rs.add_argument("--setups", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    rs.add_argument("--out", default=str(DEFAULT_OUT / "ray-scaling"))
    prof = sub.add_parser("profile", help="top CPU operators of a cold encode and of a reused question")
    prof.add_argument("--length", type=int, default=16384)
    prof.add_argument("--out", default=str(DEFAULT_OUT / "profile"))
    mem = sub.add_parser("memory", help="the resource guard's estimate next to measured peak RSS growth")
    mem.add_argument("--out", default=str(DEFAULT_OUT / "memory"))
    mem.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                     help="auto: the machine's default (docs/hardware.md)")
    rep = sub.add_parser("report", help="rewrite results.md and the plots from results.json")
    rep.add_argument("--out", default=str(DEFAULT_OUT))
    dec = sub.add_parser("decode", help="decode tok/s over merged KVs: old path, new path, bandwidth bound")
    dec.add_argument("--kv-tokens", nargs="+", type=int, default=[8192, 24576, 98304])
    dec.add_argument("--tokens", nargs="+", type=int, default=[6, 4, 3],
                     help="timed one-token steps per KV size (after one warm-up step)")
    dec.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    dec.add_argument("--out", default=str(DEFAULT_OUT / "decode"))
    gram = sub.add_parser("grammar", help="decode ms/token with and without a grammar; mask fill/apply µs")
    gram.add_argument("--repeats", type=int, default=3)
    gram.add_argument("--max-new-tokens", type=int, default=64)
    gram.add_argument("--out", default=str(DEFAULT_OUT / "grammar"))
    rr = sub.add_parser("rerank", help="a finished cell's gold kept under other ranking settings, from its recorded NLLs")
    rr.add_argument("results", help="the run's --out directory (holds results.json)")
    rr.add_argument("--cell", required=True, help="the cell's key in results.json (model|task|method|length)")
    rr.add_argument("--variants", nargs="+", default=[],
                    help="field=value,... over the cell's preset (lexical_weight, lexical_fold_case, keep_chunks)")
    rr.add_argument("--out", default=None, help="where the table goes (default: the results directory)")
    gpu = sub.add_parser("cuda", help="cold, reused and decode times on a CUDA GPU per attention implementation")
    gpu.add_argument("--lengths", nargs="+", type=int, default=[8192, 32768, 131072])
    gpu.add_argument("--attn", nargs="+", default=["sdpa", "eager", "flash_attention_2"],
                     choices=["sdpa", "eager", "flash_attention_2"])
    gpu.add_argument("--model", default=None, help="a local HF directory (default: the embedded SmolLM2-135M)")
    gpu.add_argument("--random-weights", action="store_true",
                     help="the model's architecture with random weights (times and exactness only)")
    gpu.add_argument("--out", default=str(DEFAULT_OUT / "cuda"))
    opts = parser.parse_args(argv)
    if opts.command == "cuda":
        from .cuda import run as run_cuda

        print(run_cuda(opts.lengths, opts.attn, opts.model, opts.random_weights, Path(opts.out)))
        return
    if opts.command == "rerank":
        from .rerank import main as run_rerank

        run_rerank(opts.results, opts.cell, opts.variants, opts.out or opts.results)
        return
    if opts.command == "grammar":
        from .grammar_overhead import run as run_grammar

        print(run_grammar(opts.repeats, opts.max_new_tokens, Path(opts.out)))
    elif opts.command == "decode":
        from .decode_speed import run as run_decode

        if len(opts.tokens) != len(opts.kv_tokens):
            parser.error("give one --tokens count per --kv-tokens size")
        print(run_decode(opts.kv_tokens, opts.tokens, opts.threads, Path(opts.out)))
    elif opts.command == "run":
        from .runner import run as run_grid

        print(run_grid(opts))
    elif opts.command == "main-job":
        from .main_job import run as run_main_job

        print(run_main_job(opts.dtypes, Path(opts.out), opts.max_bound_seconds))
    elif opts.command == "prefill-scaling":
        from .prefill_scaling import run as run_scaling

        print(run_scaling(opts.lengths, opts.stores, opts.batch_tokens, Path(opts.out), opts.attention_kernels,
                          opts.layer_kernels, opts.repeats, [p == "on" for p in opts.pack_weights]))
    elif opts.command == "long-question":
        from .long_question import run as run_long_question

        print(run_long_question(opts.lengths, Path(opts.out)))
    elif opts.command == "memory":
        from .memory_estimate import run as run_memory

        print(run_memory(Path(opts.out), opts.dtype))
    elif opts.command == "profile":
        from .hotspots import run as run_profile

        print(run_profile(opts.length, Path(opts.out)))
    elif opts.command == "ray-scaling":
        from .ray_scaling import run as run_ray_scaling

        print(run_ray_scaling(opts.lengths, opts.setups, Path(opts.out)))
    elif opts.command == "repeat-query":
        from .repeat_query import run as run_repeat_query, run_conversation

        if opts.conversation:
            print(run_conversation(opts.lengths, Path(opts.out or DEFAULT_OUT / "conversation"), opts.preset))
        else:
            print(run_repeat_query(opts.lengths, Path(opts.out or DEFAULT_OUT / "repeat-query"), opts.repeats, opts.preset))
    else:
        out = Path(opts.out)
        report.write(out, json.loads((out / "results.json").read_text()))
        print(out / "results.md")


if __name__ == "__main__":
    main()
