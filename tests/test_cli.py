"""`parallelcomp ask` end to end on a tiny model saved to disk (from_pretrained path)."""

from __future__ import annotations

import importlib.metadata
import io
import json
import os

import pytest
import torch
import transformers

from parallelcomp.cli import main



def test_ask_reads_files_and_directories_and_reports_sources(tmp_path, model_dir, capsys):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("The river runs north past the copper garden.")
    (docs / "b.txt").write_text("Seven stones lie under the purple cloud.")
    (docs / "empty.txt").write_text("   ")
    extra = tmp_path / "c.txt"
    extra.write_text("The window faces the delta.")

    code = main(["ask", "--model", str(model_dir), "--keep-chunks", "1", "--chunk-tokens", "20",
                 "--max-new-tokens", "4", "--json", "Where does the river run?", str(docs), str(extra)])
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    assert [s["document"] for s in report["sources"]] == [str(docs / "a.txt"), str(docs / "b.txt"), str(extra)]
    assert sum(s["kept"] for s in report["sources"]) == 1
    assert report["stats"]["n_documents"] == 3 and report["stats"]["n_kept"] == 1


def test_ask_lexical_weight_reaches_the_ranking(tmp_path, model_dir, capsys):
    args = ["ask", "--model", str(model_dir), "--keep-chunks", "1", "--chunk-tokens", "16", "--max-new-tokens", "2",
            "--json", "Where is the copper garden?", *_docs(tmp_path)]
    assert main(args) == 0
    assert {c["lexical"] for c in json.loads(capsys.readouterr().out)["chunks"]} == {0.0}  # off by default
    assert main(args[:1] + ["--lexical-weight", "100"] + args[1:]) == 0
    chunks = json.loads(capsys.readouterr().out)["chunks"]
    assert [c["kept"] for c in chunks] == [c["lexical"] == 1.0 for c in chunks] == [True, False, False]


def test_ask_lexical_fold_case_reaches_the_match(tmp_path, model_dir, capsys):
    # " Confederation" is one token, the question's " confederation" two: only folding matches them
    docs = _docs(tmp_path)
    (tmp_path / "b.txt").write_text("In 1806 a Confederation formed.")
    args = ["ask", "--model", str(model_dir), "--keep-chunks", "1", "--chunk-tokens", "16", "--max-new-tokens", "2",
            "--lexical-weight", "100", "--json", "when was the confederation?", *docs]
    lexical = {}
    for fold in ("--no-lexical-fold-case", "--lexical-fold-case"):
        assert main(args[:1] + [fold] + args[1:]) == 0
        lexical[fold] = [c["lexical"] for c in json.loads(capsys.readouterr().out)["chunks"]]
    assert lexical["--lexical-fold-case"][1] == 1.0 > lexical["--no-lexical-fold-case"][1]


def test_ask_reports_bad_input_as_an_error_line(tmp_path, model_dir, capsys):
    assert main(["ask", "Q?", str(tmp_path / "missing.txt")]) == 2
    assert "no such file or directory" in capsys.readouterr().err
    assert main(["ask", "--model", str(tmp_path / "no-model"), "  ", *_docs(tmp_path)]) == 2  # before any loading
    assert capsys.readouterr().err == "error: question is empty\n"
    assert main(["ask", "--model", str(model_dir), "--device", "gpu", "Q?", *_docs(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: device 'gpu' is not a torch device name")
    assert main(["ask", "--model", str(model_dir), "--chunk-tokens", "5", "Q?", *_docs(tmp_path)]) == 2
    assert "--chunk-tokens: Input should be greater than or equal to 16 (got 5)" in capsys.readouterr().err
    assert main(["ask", "--model", str(model_dir), "--threads", "100000", "Q?", *_docs(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: --threads must be an integer from 1 to")


def test_version_names_the_packages_a_bug_report_needs(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    line = capsys.readouterr().out
    assert line.startswith(f"parallelcomp {importlib.metadata.version('parallelcomp')} (")
    assert f"torch {torch.__version__}" in line and f"transformers {transformers.__version__}" in line


def test_help_and_argument_errors_do_not_wait_for_torch():
    """The package's names load on first use (parallelcomp/__init__.py), so the command's --help and
    its argument errors come back without importing torch or transformers; every exported name and
    a submodule still resolve."""
    import subprocess
    import sys

    code = ("import sys, parallelcomp.cli\n"
            "heavy = {'torch', 'transformers'} & set(sys.modules)\n"
            "assert not heavy, heavy\n"
            "import parallelcomp\n"
            "assert all(getattr(parallelcomp, name) for name in parallelcomp.__all__)\n"
            "assert parallelcomp.hardware.available_cores() >= 1\n"
            "try:\n    parallelcomp.no_such_name\nexcept AttributeError:\n    pass\n"
            "else:\n    raise SystemExit('no AttributeError')\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    help_ = subprocess.run([sys.executable, "-m", "parallelcomp.cli", "--help"], capture_output=True, text=True,
                           timeout=120)
    assert help_.returncode == 0 and "{ask,chat}" in help_.stdout


def test_ask_says_when_the_answer_stopped_at_max_new_tokens(tmp_path, model_dir, capsys):
    args = ["ask", "--model", str(model_dir), "--chunk-tokens", "16", "--max-new-tokens", "3",
            "Where does the river run?", *_docs(tmp_path)]
    assert main(args[:1] + ["--json"] + args[1:]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["stats"]["finish_reason"], report["stats"]["new_tokens"]) == ("length", 3)
    assert main(args) == 0
    captured = capsys.readouterr()
    assert captured.out == report["answer"] + "\n"  # stdout holds the answer alone: `ask ... > answer.txt`
    err = captured.err
    assert err.index("[cut at --max-new-tokens 3: raise it for a longer answer]") < err.index("Kept documents") \
        < err.index("Stats: ")


def test_a_reader_that_goes_away_ends_the_run_quietly(tmp_path, model_dir):
    import subprocess
    import sys

    run = subprocess.run(
        f"{sys.executable} -m parallelcomp.cli ask --model {model_dir} --chunk-tokens 16 --max-new-tokens 64 "
        f"--threads 1 'Where does the river run?' {' '.join(_docs(tmp_path))} | head -c 3",
        shell=True, capture_output=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert len(run.stdout) == 3 and b"Traceback" not in run.stderr and b"BrokenPipeError" not in run.stderr


def _docs(tmp_path):
    for name, body in [("a.txt", "The river runs north past the copper garden."),
                       ("b.txt", "Seven stones lie under the purple cloud."),
                       ("c.txt", "The window faces the delta of the slow river.")]:
        (tmp_path / name).write_text(body)
    return [str(tmp_path / n) for n in ("a.txt", "b.txt", "c.txt")]


def test_ask_with_a_kv_store_reuses_every_chunk_in_a_later_run(tmp_path, model_dir, capsys):
    args = ["ask", "--model", str(model_dir), "--chunk-tokens", "16", "--max-new-tokens", "3", "--json",
            "--kv-store", str(tmp_path / "store"), "Where does the river run?", *_docs(tmp_path)]
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out)
    assert main(args) == 0
    second = json.loads(capsys.readouterr().out)
    n = first["stats"]["n_chunks"]
    assert (first["stats"]["encoded_chunks"], second["stats"]["reused_chunks"], second["stats"]["store_disk_hits"]) == (n, n, n)
    assert (first["stats"]["store_disk_documents"], second["stats"]["store_disk_documents"]) == (0, 3)  # not tokenized again
    assert second["answer"] == first["answer"] and second["sources"] == first["sources"]


def test_chat_encodes_once_and_answers_each_line(tmp_path, model_dir, capsys, monkeypatch):
    """Questions piped from a file: blank lines between them are skipped, end of input quits, and
    each answer follows its question on stdout; sources and timings go to stderr."""
    monkeypatch.setattr("sys.stdin", io.StringIO("Where does the river run?\n\n  \nWhat lies under the cloud?\n"))
    assert main(["chat", "--model", str(model_dir), "--chunk-tokens", "16", "--keep-chunks", "1",
                 "--max-new-tokens", "3", *_docs(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert "Encoded" in captured.err and "3 documents" in captured.err
    lines = captured.out.splitlines()
    assert [line for line in lines if line.startswith("Question: ")] == \
        ["Question: Where does the river run?", "Question: What lies under the cloud?"]
    assert len(lines) == 4 and lines[1] and lines[3]  # an answer after each question
    assert captured.err.count("Kept documents") == 2
    assert captured.err.count("3 of 3 chunks reused") == 2


def test_chat_answers_each_question_after_the_conversation_so_far(tmp_path, model_dir, capsys, monkeypatch):
    """Each answer is the engine's answer with the earlier questions and answers as its history,
    over the chunks encoded once; without --history each question is answered alone."""
    from parallelcomp import ParallelComp, ParallelCompConfig
    from parallelcomp.cli import read_documents

    questions = ["Where does the river run?", "What lies under the cloud?", "Which way does the window face?"]
    flags = ["--model", str(model_dir), "--chunk-tokens", "16", "--keep-chunks", "1", "--max-new-tokens", "3"]
    pc = ParallelComp.from_pretrained(str(model_dir), config=ParallelCompConfig.preset("paper", chunk_tokens=16,
                                                                                        keep_chunks=1))
    _, docs = read_documents(_docs(tmp_path))
    for extra in (["--history"], []):
        monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(questions) + "\n"))
        assert main(["chat", *flags, *extra, *_docs(tmp_path)]) == 0
        captured = capsys.readouterr()
        answers = [line.strip() for line in captured.out.splitlines() if not line.startswith("Question: ")]
        history, expected = [], []
        for question in questions:
            out = pc.generate(question, documents=docs, history=history if extra else [], max_new_tokens=3)
            expected.append(out.text.strip())
            history += [{"role": "user", "content": question}, {"role": "assistant", "content": out.text}]
        assert answers == expected and all(expected)
        assert captured.err.count("3 of 3 chunks reused") == 3
        assert ("after 1 earlier turn)" in captured.err and "after 2 earlier turns)" in captured.err) == bool(extra)


def test_chat_leaves_out_the_oldest_turns_the_window_cannot_hold(tmp_path, model_dir):
    from parallelcomp import ParallelComp, ParallelCompConfig
    from parallelcomp.cli import _recent_turns, read_documents

    pc = ParallelComp.from_pretrained(str(model_dir), config=ParallelCompConfig(chunk_tokens=16))
    corpus = pc.encode(read_documents(_docs(tmp_path))[1])
    turns = [{"role": role, "content": f"{role} turn {i}"} for i in range(3) for role in ("user", "assistant")]
    longest = max(len(c.token_ids) for c in corpus.chunks)
    parts = pc.prompt_parts("Why?", True, turns[-2:])
    room = pc.window - len(parts.prefix_ids) - longest - len(parts.question_ids)  # max_new_tokens for one turn
    assert _recent_turns(pc, corpus, turns, "Why?", room) == (turns[-2:], 2)
    assert _recent_turns(pc, corpus, turns, "Why?", room + 1) == ([], 3)
    assert _recent_turns(pc, corpus, turns, "Why?", 8) == (turns, 0)


def test_read_documents_skips_binary_repeated_and_unreadable_input_with_a_note(tmp_path, capsys, monkeypatch):
    from pathlib import Path

    import pytest

    from parallelcomp import InputError
    from parallelcomp.cli import read_documents

    (tmp_path / "a.txt").write_bytes(b"\xef\xbb\xbfThe river runs north.")  # a byte-order mark is no text
    (tmp_path / "zeros.dat").write_bytes(b"\0" * 200)
    (tmp_path / "utf16.txt").write_bytes("The river runs north.".encode("utf-16-le"))
    (tmp_path / "doc.pdf").write_bytes(b"%PDF-1.4\n1 0 obj << >> endobj\n")
    (tmp_path / "latin1.txt").write_bytes("Caf\xe9 by the river.".encode("latin-1"))
    names, texts = read_documents([str(tmp_path), str(tmp_path / "a.txt"), str(tmp_path / ".." / tmp_path.name)])
    assert (names, texts) == ([str(tmp_path / "a.txt")], ["The river runs north."])
    err = capsys.readouterr().err
    for name in ("zeros.dat", "utf16.txt"):
        assert f"skipping {tmp_path / name}: binary, not text" in err
    assert f"skipping {tmp_path / 'doc.pdf'}: a PDF, not text; extract its text first" in err
    assert f"skipping {tmp_path / 'a.txt'}: the same file was read already\n" in err
    assert f"skipping {tmp_path / '..' / tmp_path.name / 'a.txt'}: the same file was read already as " in err
    assert f"skipping {tmp_path / 'latin1.txt'}: not UTF-8 text" in err and "iconv" in err
    with pytest.raises(InputError, match="reading the corpus from stdin is not supported"):
        read_documents(["-"])

    def locked(self):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "is_dir", locked)  # a file inside a directory this user may not enter
    with pytest.raises(InputError, match=r"secret.txt: cannot open \(Permission denied\)"):
        read_documents([str(tmp_path / "locked" / "secret.txt")])
    monkeypatch.undo()
    assert main(["ask", "--model", str(tmp_path), "Q?", str(tmp_path / "a.txt")]) == 2
    assert "holds no config.json, so it is not a Hugging Face model directory" in capsys.readouterr().err


def test_ctrl_c_and_warnings_are_one_line_each(monkeypatch, capsys):
    import warnings

    import parallelcomp.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt

    def warns(args):
        warnings.warn("KV store: cannot write /ro: Read-only file system; this run answers without it")
        return 0

    for run, code, err in [(interrupted, 130, "\ninterrupted\n"),
                           (warns, 0, "warning: KV store: cannot write /ro: Read-only file system; this run "
                                      "answers without it\n")]:
        monkeypatch.setattr(cli, "_ask", run)
        assert main(["ask", "Q?", "x.txt"]) == code
        assert capsys.readouterr().err == err


def test_ctrl_c_keeps_the_chunks_encoded_so_far_in_the_kv_store(tmp_path, model_dir, capsys, monkeypatch):
    """The store is written after the answer, so Ctrl-C while decoding used to lose the prefill."""
    from parallelcomp import ParallelComp

    answer = ParallelComp.stream

    def interrupted(self, *args, **kwargs):
        for delta in answer(self, *args, **kwargs):
            yield delta
            raise KeyboardInterrupt  # after the first answer token: every chunk is encoded

    store = tmp_path / "store"
    args = ["ask", "--model", str(model_dir), "--chunk-tokens", "16", "--max-new-tokens", "3", "--kv-store",
            str(store), "Where does the river run?", *_docs(tmp_path)]
    with monkeypatch.context() as patch:
        patch.setattr(ParallelComp, "stream", interrupted)
        assert main(args) == 130
    err = capsys.readouterr().err
    assert main([*args, "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)["stats"]
    assert f"saving {stats['n_chunks']} encoded chunks to {store}" in err and stats["n_chunks"] > 1
    assert (stats["reused_chunks"], stats["encoded_chunks"]) == (stats["n_chunks"], 0)


def test_chat_reports_what_the_kv_store_rejected_while_encoding(tmp_path, model_dir, capsys, monkeypatch):
    store = tmp_path / "store"
    args = ["--model", str(model_dir), "--chunk-tokens", "16", "--max-new-tokens", "2", "--kv-store", str(store)]
    assert main(["ask", *args, "--json", "Where does the river run?", *_docs(tmp_path)]) == 0
    victim = sorted(store.rglob("*.safetensors"))[0]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    capsys.readouterr()
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert main(["chat", *args, *_docs(tmp_path)]) == 0
    assert "KV store: 1 damaged, foreign or old-format files rejected (unreadable 1) and recomputed" in \
        capsys.readouterr().err
