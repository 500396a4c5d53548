"""`parallelcomp ask "QUESTION" FILE_OR_DIR...`: answer over files with the embedded model or yours.
`parallelcomp chat FILE_OR_DIR...`: encode the files once, then answer questions from stdin.
`--kv-store DIR` keeps every chunk's KV on disk, so a later run over the same files skips it.
`--workers N` (and `--ray-address ADDR` for a cluster) spreads the chunks over N Ray workers
(parallelcomp.distributed, docs/distributed.md; needs `pip install "parallelcomp[ray]"`).

Each file is one document; directories are read recursively in sorted order. The answer streams
to stdout, and only the answer (`ask ... > answer.txt`; `--json` for everything as one object);
the progress bar, the kept documents with their scores, the run statistics, notes and warnings go
to stderr.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import re
import resource
import stat
import sys
import time
import warnings
from pathlib import Path

from .chunking import check_question
from .config import DTYPE_NAMES, PRESETS, ParallelCompConfig
from .errors import InputError, ParallelCompError
from .output import ReuseStats, RunStats


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        with warnings.catch_warnings():  # restores Python's own display when main returns
            warnings.showwarning = _warning
            return args.run(args)
    except ParallelCompError as err:
        print(f"error: {_OPTION_NAME.sub(lambda m: _OPTIONS[m[0]], str(err))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: the KV store holds only whole, checksummed files (docs/store.md)
        print("\ninterrupted", file=sys.stderr)
        _keep_encoded(getattr(args, "engine", None))
        return 130
    except BrokenPipeError:  # the reader went away (`| head`): no traceback (Python docs, "Note on SIGPIPE")
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


_OPTIONS = {"keep_chunks": "--keep-chunks", "chunk_tokens": "--chunk-tokens", "kv_budget_ratio": "--kv-budget-ratio",
            "lexical_weight": "--lexical-weight", "kv_store_dir": "--kv-store", "max_new_tokens": "--max-new-tokens",
            "repetition_penalty": "--repetition-penalty", "num_workers": "--workers", "threads": "--threads"}
"""The settings behind the CLI's options, named in errors as the options a user typed."""
_OPTION_NAME = re.compile(r"\b(" + "|".join(_OPTIONS) + r")\b")


def _keep_encoded(pc) -> None:
    """After Ctrl-C: write the chunks encoded so far to the --kv-store directory, which a call
    writes only once its answer is complete (docs/store.md, "Written behind"), so the next run
    starts from them; a second Ctrl-C skips it."""
    if pc is None or pc.store.disk_dir is None or not pc.store.unwritten:
        return
    print(f"saving {_count(pc.store.unwritten, 'encoded chunk')} to {pc.store.disk_dir} (Ctrl-C again to skip)",
          file=sys.stderr)
    try:
        pc.write_behind(RunStats())
    except KeyboardInterrupt:
        print("skipped", file=sys.stderr)


def _warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning as one line on stderr (`warning: ...`), not Python's file:line and source."""
    print(f"warning: {message}", file=sys.stderr)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="parallelcomp", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action=_Version, nargs=0, help="show the versions a bug report needs and exit")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", help="local HF model directory (default: embedded SmolLM2-135M-Instruct)")
    common.add_argument("--preset", choices=sorted(PRESETS), default="paper")
    common.add_argument("--keep-chunks", type=int, help="K chunks kept (overrides the preset)")
    common.add_argument("--chunk-tokens", type=int, help="tokens per chunk (default: derived from the window)")
    common.add_argument("--kv-budget-ratio", type=float, help="per-chunk KV kept, as a fraction")
    common.add_argument("--lexical-weight", type=float,
                        help="nats of BM25 prior on chunk selection (0: question NLL alone; docs/lexical-prior.md)")
    common.add_argument("--lexical-fold-case", action=argparse.BooleanOptionalAction,
                        help="match the BM25 prior over case-folded text (default: the preset's)")
    common.add_argument("--kv-store", metavar="DIR",
                        help="reuse and fill a chunk KV store in DIR across runs (encode once, ask many)")
    common.add_argument("--max-new-tokens", type=int, default=128)
    common.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages loops (1.0 = off)")
    common.add_argument("--device", help="cpu, cuda, … (default: cuda when available)")
    common.add_argument("--dtype", choices=["auto", *DTYPE_NAMES], default="auto",
                        help="auto: bfloat16 on CUDA and on CPUs with fast native bf16, else float32")
    common.add_argument("--threads", type=int, help="torch threads (default: the physical cores available)")
    common.add_argument("--workers", type=int,
                        help="encode and score the chunks on this many Ray workers, one model replica each")
    common.add_argument("--ray-address", metavar="ADDR",
                        help="Ray cluster to run the workers on (e.g. auto); default: a local Ray (implies --workers 2)")
    sub = parser.add_subparsers(required=True)
    ask = sub.add_parser("ask", parents=[common], help="answer a question over files")
    ask.add_argument("question")
    ask.add_argument("paths", nargs="+", metavar="FILE_OR_DIR")
    ask.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    ask.set_defaults(run=_ask)
    chat = sub.add_parser("chat", parents=[common],
                          help="encode files once, then answer questions read line by line from stdin")
    chat.add_argument("paths", nargs="+", metavar="FILE_OR_DIR")
    chat.add_argument("--history", action="store_true",
                      help="answer each question after the earlier questions and answers, as many as the window "
                           "holds (they follow the documents, whose KV is still reused; a small model may copy "
                           "its previous answer: docs/integrations.md)")
    chat.set_defaults(run=_chat)
    return parser


class _Version(argparse.Action):
    """`--version`: parallelcomp's version and the torch and transformers this process imports,
    with torch's build tag (+cpu, +cu130: which wheel is installed). Imports them only when asked."""

    def __call__(self, parser, namespace, values, option_string=None):
        import torch
        import transformers

        try:
            ours = importlib.metadata.version("parallelcomp")
        except importlib.metadata.PackageNotFoundError:  # run from a checkout (PYTHONPATH=core)
            ours = "(not installed)"
        print(f"parallelcomp {ours} (torch {torch.__version__}, transformers {transformers.__version__}; "
              f"Python {sys.version.split()[0]})")
        parser.exit()


def _load(args):
    from .engine import ParallelComp

    distributed = args.workers is not None or args.ray_address is not None
    overrides = {
        key: value
        for key, value in (
            ("keep_chunks", args.keep_chunks),
            ("chunk_tokens", args.chunk_tokens),
            ("kv_budget_ratio", args.kv_budget_ratio),
            ("lexical_weight", args.lexical_weight),
            ("lexical_fold_case", args.lexical_fold_case),
            ("kv_store_dir", args.kv_store),
        )
        if value is not None
    }
    config = ParallelCompConfig.preset(args.preset, **overrides)
    dtype = None if args.dtype == "auto" else args.dtype
    start = time.perf_counter()
    if distributed:
        from .distributed import RayParallelComp

        pc = RayParallelComp.from_pretrained(args.model, config, num_workers=2 if args.workers is None else args.workers,
                                             address=args.ray_address, device=args.device, dtype=dtype,
                                             threads=args.threads)
    else:
        pc = ParallelComp.from_pretrained(args.model, config=config, device=args.device, dtype=dtype,
                                          threads=args.threads)
    args.engine = pc  # for Ctrl-C (_keep_encoded)
    return pc, time.perf_counter() - start


def _answer(pc, args, question: str, **source):
    """Stream one answer to stdout (unless --json); return the GenerationOutput. A note that the
    answer was cut goes to stderr."""
    stream = pc.stream(question, max_new_tokens=args.max_new_tokens, repetition_penalty=args.repetition_penalty,
                       progress=True, **source)
    for delta in stream:  # the prefill bar (stderr) finishes before the first delta
        if not getattr(args, "json", False):
            print(delta, end="", flush=True)
    if not getattr(args, "json", False):
        print(flush=True)
        if stream.output.stats.finish_reason == "length":
            print(f"[cut at --max-new-tokens {args.max_new_tokens}: raise it for a longer answer]", file=sys.stderr)
    return stream.output


def _print_sources(out, names: list[str]) -> None:
    err = sys.stderr
    print("\nKept documents (question NLL, lower = more relevant):", file=err)
    for doc, (score, kept) in sorted(out.document_scores().items(), key=lambda item: item[1][0]):
        if kept:
            print(f"  {score:7.3f}  {names[doc]}", file=err)
    print(f"Evicted: {len(out.stats.evicted_documents)} of {len(names)} documents", file=err)
    store = _store_events(out.stats)
    if store:
        print(f"KV store: {store}", file=err)


def _store_events(s) -> str:
    """What the chunk store dropped, rejected or failed to write in a run (RunStats) or an encode
    (a Corpus's chunking and encoding), or ""."""
    events = [f"{n} damaged, foreign or old-format files rejected ({', '.join(f'{k} {v}' for k, v in sorted(s.store_rejected.items()))}) and recomputed"
              if (n := sum(s.store_rejected.values())) else "",
              f"{s.store_evicted} chunks evicted from memory" if s.store_evicted else "",
              f"{s.store_disk_evicted} files evicted from disk by its byte budget" if s.store_disk_evicted else "",
              f"{s.store_write_errors} files not written" if s.store_write_errors else ""]
    return "; ".join(e for e in events if e)


def _ask(args) -> int:
    check_question(args.question)  # before the files are read and the model loaded
    names, documents = read_documents(args.paths)
    pc, load_seconds = _load(args)
    out = _answer(pc, args, args.question, documents=documents)
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.json:
        sources = [
            {"document": names[d], "score": score, "kept": kept}
            for d, (score, kept) in sorted(out.document_scores().items())
        ]
        chunks = [{"n_tokens": c.n_tokens, "score": c.score, "lexical": c.lexical, "kept": c.kept} for c in out.chunks]
        report = {"answer": out.text, "sources": sources, "chunks": chunks, "stats": out.stats.to_dict()}
        report.update(load_seconds=load_seconds, peak_rss_mb=peak_rss_mb)
        print(json.dumps(report, indent=2))
        return 0
    _print_sources(out, names)
    s = out.stats
    reused = f"; reused {_count(s.reused_chunks, 'chunk')} from the KV store" if s.reused_chunks else ""
    if s.workers:
        reused += f"; {_count(s.workers, 'Ray worker')}, {s.transfer_bytes / 2**20:.1f} MiB of kept KV moved"
    steps = f" ({s.kernel_steps} steps whole in one call)" if s.kernel_steps else ""
    if s.packed_weight_bytes:
        steps += f", linear weights packed ({s.packed_weight_bytes / 2**20:.0f} MiB)"
    print(
        f"Stats: {s.tokens_in} context tokens in {s.n_chunks} chunks of ≤{s.chunk_tokens}, kept {s.n_kept}{reused}; "
        f"KV {s.kv_bytes / 2**20:.1f} MiB ({s.kv_tokens} tokens); {s.dtype}, {s.attention_kernel} attention, {s.layer_kernel} layer, {s.decode_kernel} decode kernels{steps}, {s.threads} threads; chunking {s.chunk_seconds:.1f} s, prefill {s.prefill_seconds:.1f} s, "
        f"first token after {s.first_token_seconds:.1f} s more, decode {s.decode_seconds:.1f} s ({s.new_tokens} tokens); model load {load_seconds:.1f} s; "
        f"peak RSS {peak_rss_mb:.0f} MiB", file=sys.stderr
    )
    return 0


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _chat(args) -> int:
    names, documents = read_documents(args.paths)
    pc, _ = _load(args)
    corpus = pc.encode(documents, progress=True)
    found = ReuseStats()  # the store's work for this corpus: its documents' chunking, then its chunks
    for part in (corpus.chunking, corpus.encoding):
        found.add(part)
    store = _store_events(found)
    store = f"; KV store: {store}" if store else ""
    print(f"Encoded {corpus.n_tokens} tokens of {len(names)} documents in {len(corpus.chunks)} chunks "
          f"({corpus.encode_seconds:.1f} s, {corpus.reused_chunks} chunks reused{store}). Ask away, one question "
          "per line; end of input (Ctrl-D) quits.", file=sys.stderr)
    interactive = sys.stdin.isatty()
    turns: list[dict[str, str]] = []  # with --history, the conversation so far: user and assistant messages
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            return 0
        if not line.strip():  # blank lines (between questions in a file) are no questions
            continue
        question = line.strip()
        if not interactive:  # piped questions: each answer follows its question on stdout
            print(f"Question: {question}", flush=True)
        try:
            history, left_out = (_recent_turns(pc, corpus, turns, question, args.max_new_tokens) if args.history
                                 else ([], 0))
            out = _answer(pc, args, question, corpus=corpus, history=history)
        except InputError as err:  # a bad question ends that question, not the session
            print(f"error: {err}", file=sys.stderr)
            continue
        _print_sources(out, names)
        s = out.stats
        after = f"; after {_count(len(history) // 2, 'earlier turn')}" if history or left_out else ""
        after += f", {left_out} older left out (the window holds no more)" if left_out else ""
        if args.history and out.text.strip():
            turns += [{"role": "user", "content": question}, {"role": "assistant", "content": out.text}]
        print(f"(time to first token {s.ttft_seconds:.1f} s, {s.reused_chunks} of "
              f"{s.n_chunks} chunks reused{after})\n", file=sys.stderr, flush=True)


def _recent_turns(pc, corpus, turns: list[dict[str, str]], question: str, max_new_tokens: int
                  ) -> tuple[list[dict[str, str]], int]:
    """(the most recent whole turns that fit, how many older turns are left out). The turns follow
    the chunks (prompts.documents_turn), so they fit when the prefix, the corpus's longest chunk,
    the turns with the question, and the answer fit the model's window: no token of the answer
    then sits past the positions the model was trained on."""
    from .guard import fits_window  # torch is loaded with the engine by now

    longest = max(len(c.token_ids) for c in corpus.chunks)
    kept = 0
    for start in range(len(turns) - 2, -1, -2):
        parts = pc.prompt_parts(question, True, turns[start:])
        if not fits_window(pc.window, len(parts.prefix_ids) + longest, len(parts.question_ids), max_new_tokens):
            break
        kept = len(turns) - start
    return turns[len(turns) - kept:], (len(turns) - kept) // 2


def read_documents(paths: list[str], max_chars: int | None = None) -> tuple[list[str], list[str]]:
    """(names, texts) of every readable text file under `paths`, in the order given.

    Only regular files are read. A path named on the command line that is not one (a FIFO, a
    device such as /dev/zero, a /proc or /sys pseudo-file whose size is not known in advance) is
    an error; inside a directory such entries, and symlinks that lead out of the directory, are
    skipped with a note on stderr, as are unreadable directories, binary files (a NUL byte, a PDF)
    and a file already read under another name. Sizes are checked before reading: a UTF-8
    character is at most 4 bytes, so more than 4 × `max_chars` bytes in all (default:
    ParallelCompConfig's max_input_chars) is refused without reading further.
    """
    max_bytes = 4 * (max_chars or ParallelCompConfig.model_fields["max_input_chars"].default)
    files: list[tuple[Path, bool]] = []  # (path, named on the command line)
    for raw in paths:
        path = Path(raw)
        try:
            is_dir, found = path.is_dir(), path.exists() or path.is_symlink()
        except OSError as err:  # a file inside a directory we may not enter
            raise InputError(f"{raw}: cannot open ({err.strerror})") from None
        if is_dir:
            files.extend((p, False) for p in _walk(path))
        elif found:
            files.append((path, True))
        elif raw == "-":
            raise InputError("-: reading the corpus from stdin is not supported; pass files or directories")
        else:
            raise InputError(f"{raw}: no such file or directory")
    names, texts, total, seen = [], [], 0, {}
    for path, named in files:
        real = path.resolve()
        if real in seen:
            also = f" as {seen[real]}" if seen[real] != path else ""
            print(f"skipping {path}: the same file was read already{also}", file=sys.stderr)
            continue
        seen[real] = path
        data = _read_regular(path, max_bytes - total, named)
        if data is None:
            continue
        total += len(data)
        if data.startswith(b"%PDF-"):
            print(f"skipping {path}: a PDF, not text; extract its text first (e.g. pdftotext)", file=sys.stderr)
            continue
        if b"\0" in data[:8192]:  # what git and grep call binary
            print(f"skipping {path}: binary, not text", file=sys.stderr)
            continue
        try:
            text = data.decode("utf-8-sig")  # a leading byte-order mark is no text
        except UnicodeDecodeError as err:
            print(f"skipping {path}: not UTF-8 text ({err.reason} at byte {err.start}); convert it, e.g. "
                  f"iconv -f latin1 -t utf-8", file=sys.stderr)
            continue
        if text.strip():
            names.append(os.fspath(path))
            texts.append(text)
        else:
            print(f"skipping {path}: empty", file=sys.stderr)
    if not texts:
        raise InputError(f"no readable, non-empty text files in {paths}")
    return names, texts


def _walk(root: Path) -> list[Path]:
    """Files under `root` in sorted order; symlinks are followed only to files inside `root`."""
    base = root.resolve()
    out = []
    for path in [root, *sorted(root.rglob("*"))]:
        if path.is_dir() and not path.is_symlink() and not os.access(path, os.R_OK | os.X_OK):
            print(f"skipping {path}: cannot open (Permission denied)", file=sys.stderr)  # rglob skips it silently
            continue
        if path == root:
            continue
        if path.is_symlink():
            try:
                target = path.resolve(strict=True)
            except (OSError, RuntimeError) as err:  # a dangling link, a loop (RuntimeError before 3.13)
                print(f"skipping {path}: {err}", file=sys.stderr)
                continue
            if not target.is_relative_to(base):
                print(f"skipping {path}: symlink to {target}, outside {root}", file=sys.stderr)
                continue
            if target.is_dir():
                continue  # its files are under root already
        elif path.is_dir():
            continue
        out.append(path)
    return out


def _read_regular(path: Path, allowance: int, named: bool) -> bytes | None:
    """The bytes of a regular file of at most `allowance` bytes; None (with a note) for something
    else inside a directory; InputError for something else named on the command line."""

    def refuse(why: str) -> None:
        if named:
            raise InputError(f"{path}: {why}")
        print(f"skipping {path}: {why}", file=sys.stderr)

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # O_NONBLOCK: opening a FIFO never waits
    except OSError as err:
        return refuse(f"cannot open ({err.strerror})")
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return refuse(f"not a regular file ({_kind(info.st_mode)}); pass text files or directories")
        if info.st_size > allowance:
            raise InputError(
                f"{path}: {info.st_size:,} bytes would take the input past {allowance:,} more bytes, more than "
                "max_input_chars characters even at 4 bytes each; pass fewer or smaller files"
            )
        data = f.read(info.st_size + 1)
    if len(data) > info.st_size:
        return refuse("its size is not known in advance (a /proc or /sys pseudo-file?); copy it to a file first")
    return data


def _kind(mode: int) -> str:
    kinds = {stat.S_ISFIFO: "a FIFO", stat.S_ISCHR: "a character device", stat.S_ISBLK: "a block device",
             stat.S_ISSOCK: "a socket", stat.S_ISDIR: "a directory"}
    return next((name for test, name in kinds.items() if test(mode)), "not a regular file")


if __name__ == "__main__":
    sys.exit(main())
