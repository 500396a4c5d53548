"""`parallelcomp ask` end to end on a tiny model saved to disk (from_pretrained path)."""

from __future__ import annotations

import json

from parallelcomp.cli import main

from .conftest import tiny_model


def test_ask_reads_files_and_directories_and_reports_sources(tmp_path, tokenizer, capsys):
    model_dir = tmp_path / "model"
    tiny_model("llama", len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
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


def test_ask_reports_bad_input_as_an_error_line(tmp_path, capsys):
    assert main(["ask", "Q?", str(tmp_path / "missing.txt")]) == 2
    assert "no such file or directory" in capsys.readouterr().err
