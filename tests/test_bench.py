"""The benchmark harness: exact scorer checks on hand-made examples, sample generators, and a
smoke run of the whole grid (every task and method, one cell each) on a tiny random model."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from benchmarks.__main__ import main as bench_main
from benchmarks.prompting import bm25_select, middle_truncate
from benchmarks.scoring import score, spans_kept, string_match_all, string_match_part
from benchmarks.tasks import Sample, make_samples

@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random Llama with the SmolLM2 tokenizer, saved as a local HF directory."""
    from parallelcomp.default_model import embedded_model_dir

    tok = AutoTokenizer.from_pretrained(embedded_model_dir())
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(cfg).eval().save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tok(tiny_dir):
    return AutoTokenizer.from_pretrained(tiny_dir)


def test_string_match_all_needs_every_reference():
    assert string_match_all("The special magic number is 7431290.", ["7431290"]) == 1.0
    assert string_match_all("The special magic number is 7431209.", ["7431290"]) == 0.0
    assert string_match_all("keys: ABC-1 and abc-2", ["abc-1", "ABC-2"]) == 1.0
    assert string_match_all("only abc-1", ["abc-1", "abc-2"]) == 0.5


def test_string_match_part_needs_any_answer():
    assert string_match_part("It was rollo.", ["Rollo", "Rollo the Walker"]) == 1.0
    assert string_match_part("It was William.", ["Rollo", "Rollo the Walker"]) == 0.0
    assert score("qa", "France", ["France"]) == 1.0
    assert score("niah", "", ["1234567"]) == 0.0


def test_spans_kept_requires_overlap_in_the_same_document():
    gold = [(1, 10, 20)]
    assert spans_kept(gold, [(0, 0, 100), (1, 15, 40)])
    assert not spans_kept(gold, [(0, 10, 20), (1, 20, 40)])
    assert not spans_kept([(0, 0, 5), (1, 0, 5)], [(0, 0, 5)])


def test_middle_truncate_keeps_both_ends():
    assert middle_truncate(list(range(10)), 4) == [0, 1, 8, 9]
    assert middle_truncate(list(range(10)), 5) == [0, 1, 7, 8, 9]
    assert middle_truncate([1, 2], 4) == [1, 2]


def test_bm25_selects_the_passage_with_the_question_words(tok):
    filler = "The weather was mild and nothing happened. " * 30
    needle = "The secret code of the purple elephant is 4412."
    sample = Sample("niah", "x", question="What is the secret code of the purple elephant?",
                    context=filler + needle + " " + filler, references=["4412"])
    start = sample.context.index(needle)
    sample.gold = [(0, start, start + len(needle))]
    chosen = bm25_select(tok, sample, budget=200, sep="\n\n")
    assert any(needle in text for _, text in chosen)
    assert spans_kept(sample.gold, [span for span, _ in chosen])


@pytest.mark.parametrize("task", ["ppl", "niah", "passkey", "kv_retrieval", "qa", "hotpotqa"])
def test_samples_hit_the_length_and_hold_their_answer(tok, task):
    (sample,) = make_samples(task, tok, 2048, 1, ppl_target=256)
    n = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in sample.texts())
    if task == "ppl":
        n += len(tok(sample.target, add_special_tokens=False)["input_ids"])
        assert abs(n - 2048) <= 8
        return
    assert 0.85 * 2048 <= n <= 1.15 * 2048
    golds = sample.gold_texts()
    assert golds and all(golds)
    if task == "hotpotqa":  # multi-hop: the supporting paragraphs, the answer may be "yes"/"no"
        assert len(golds) == len(set(golds)) >= 1 and sample.references[0]
    else:
        assert any(ref in g for ref in sample.references for g in golds)


def test_smoke_grid_every_task_and_method(tiny_dir, tmp_path):
    out = tmp_path / "results"
    args = ["run", "--inline", "--models", str(tiny_dir), "--presets", "paper",
            "--tasks", "ppl", "niah", "passkey", "kv_retrieval", "qa", "hotpotqa",
            "--methods", "parallelcomp", "full", "truncate", "topk", "kvpress",
            "--lengths", "700", "--max-new-tokens", "4", "--ppl-target-tokens", "64",
            "--no-kvpress-setup", "--kvpress-venv", str(tmp_path / "no-venv"), "--out", str(out)]
    bench_main(args)
    data = json.loads((out / "results.json").read_text())
    cells = data["cells"].values()
    by_method = {}
    for cell in cells:
        by_method.setdefault(cell["method"], []).append(cell)
    assert sorted(by_method) == ["full", "kvpress", "parallelcomp:paper", "topk", "truncate"]
    assert len(by_method["parallelcomp:paper"]) == len(by_method["full"]) == 6
    assert len(by_method["topk"]) == len(by_method["kvpress"]) == 5  # no perplexity setting
    for cell in cells:
        if cell["method"] == "kvpress":
            assert cell["status"] == "unavailable" and "no kvpress environment" in cell["reason"]
            continue
        assert cell["status"] == "ok", cell.get("reason")
        (rec,) = cell["samples"]
        assert rec["prefill_seconds"] > 0 and rec["peak_rss_mb"] > 0 and rec["tokens_in"] > 0
        if cell["task"] == "ppl":
            assert rec["score"] == pytest.approx(rec["ppl"]) and rec["ppl"] > 1
        else:
            assert rec["score"] in (0.0, 1.0) and "output" in rec
    assert data["machine"]["torch"] == torch.__version__
    md = (out / "results.md").read_text()
    assert "### niah: score" in md and "unavailable" in md
    assert sorted(p.name for p in out.glob("*.png")) == ["tiny-llama0-score.png",
                                                         "tiny-llama0-time-memory.png"]

    bench_main(args)  # resumable: only the unavailable kvpress cells are tried again
    data = json.loads((out / "results.json").read_text())
    assert data["runs"][-1]["cells_run"] == 5


def test_full_attention_is_skipped_above_the_cap(tiny_dir, tmp_path):
    out = tmp_path / "results"
    bench_main(["run", "--inline", "--models", str(tiny_dir), "--tasks", "passkey",
                "--methods", "full", "--lengths", "700", "--full-max-length", "600",
                "--out", str(out)])
    (cell,) = json.loads((out / "results.json").read_text())["cells"].values()
    assert cell["status"] == "skipped" and "--full-max-length 600" in cell["reason"]
    assert "skipped" in (out / "results.md").read_text()


def test_more_samples_only_runs_the_missing_ones(tiny_dir, tmp_path):
    out = tmp_path / "results"
    args = ["run", "--inline", "--models", str(tiny_dir), "--tasks", "passkey",
            "--methods", "truncate", "--lengths", "700", "--max-new-tokens", "2", "--out", str(out)]
    bench_main(args + ["--samples", "1"])
    (first,) = json.loads((out / "results.json").read_text())["cells"].values()
    bench_main(args + ["--samples", "3"])
    data = json.loads((out / "results.json").read_text())
    (cell,) = data["cells"].values()
    assert cell["n"] == 3 and [r["id"] for r in cell["samples"]] == [
        "passkey-700-0", "passkey-700-1", "passkey-700-2"]
    assert cell["samples"][0] == first["samples"][0]  # kept, not rerun
    bench_main(args + ["--samples", "3"])  # nothing left to run
    assert len(json.loads((out / "results.json").read_text())["runs"]) == 2


def test_samples_of_a_cell_share_one_chunk_store(tiny_dir, tmp_path):
    """Passkey filler repeats, so later samples reuse chunks from earlier ones (and from the disk
    tier given by --kv-store); every answer equals a fresh engine's."""
    from benchmarks import worker

    worker._ENGINES.clear()
    out, store = tmp_path / "results", tmp_path / "store"
    method = "parallelcomp:paper-retrieval,chunk_tokens=64"
    bench_main(["run", "--inline", "--models", str(tiny_dir), "--tasks", "passkey",
                "--methods", "parallelcomp", "--presets", method.split(":", 1)[1],
                "--lengths", "700", "--samples", "3", "--max-new-tokens", "3",
                "--kv-store", str(store), "--out", str(out)])
    (cell,) = json.loads((out / "results.json").read_text())["cells"].values()
    recs = cell["samples"]
    assert all(r["reused_chunks"] >= r["n_chunks"] - 2 for r in recs[1:])  # only the needle's chunks are new
    assert list(store.rglob("*.safetensors"))

    model, tokenizer = worker.load(str(tiny_dir), "float32")
    spec = {"method": method, "max_new_tokens": 3}
    for i, (raw, rec) in enumerate(zip(make_samples("passkey", tokenizer, 700, 3), recs)):
        worker._ENGINES.clear()
        fresh = worker.run_parallelcomp(spec, model, tokenizer, raw)  # repeats within the sample only
        if i == 0:
            assert fresh["reused_chunks"] == rec["reused_chunks"]
        else:  # the cell's engine also holds the earlier samples' chunks
            assert fresh["reused_chunks"] < rec["reused_chunks"]
        assert (fresh["output"], fresh["gold_kept"]) == (rec["output"], rec["gold_kept"])


def test_rerank_from_recorded_nlls_equals_running_the_other_ranking(tiny_dir, tmp_path):
    """`rerank` re-ranks a finished cell with another λ / term rule / K from the NLLs it recorded;
    the chunks it keeps and its gold-kept count equal a real run of that ranking. For a task of
    documents (qa) and one of a single context (niah)."""
    from benchmarks.rerank import rerank

    base = "qa,chunk_tokens=64"
    variants = ["lexical_weight=0", "lexical_fold_case=false,lexical_weight=50", "keep_chunks=1"]
    out = tmp_path / "results"
    args = ["run", "--inline", "--models", str(tiny_dir), "--tasks", "qa", "niah", "--methods", "parallelcomp",
            "--lengths", "700", "--samples", "3", "--max-new-tokens", "2", "--out", str(out), "--presets"]
    bench_main(args + [base] + [f"{base},{v}" for v in variants])
    cells = json.loads((out / "results.json").read_text())["cells"]
    for task in ("qa", "niah"):
        key = f"{tiny_dir}|{task}|parallelcomp:{{}}|700"
        got = rerank(out / "results.json", key.format(base), variants)
        for row, variant in zip(got["rows"], [base] + [f"{base},{v}" for v in variants]):
            ran = cells[key.format(variant)]["samples"]
            assert row["kept"] == {r["id"]: [i for i, c in enumerate(r["chunks"]) if c[2]] for r in ran}, variant
            assert row["gold_kept"] == sum(r["gold_kept"] for r in ran)
        assert len({json.dumps(r["kept"]) for r in got["rows"]}) > 2, task  # the variants do move chunks
    with pytest.raises(SystemExit, match="only"):
        rerank(out / "results.json", key.format(base), ["chunk_tokens=32"])  # would change the NLLs


def test_preset_overrides_parse_and_fail_loudly():
    from benchmarks.worker import preset_config
    from parallelcomp import ConfigError

    config = preset_config("fast,keep_chunks=1,gqa_reduce=max,kv_budget_ratio=0.25")
    assert (config.keep_chunks, config.gqa_reduce, config.kv_budget_ratio) == (1, "max", 0.25)
    assert config.chunk_tokens == 2048  # the rest of the preset stays
    for bad in ("nope", "paper,no_such_field=1", "paper,keep_chunks=0"):
        with pytest.raises(ConfigError):
            preset_config(bad)


def test_decode_benchmark_writes_every_path_and_its_table(tmp_path):
    with pytest.raises(SystemExit):  # one timed-token count per KV size
        bench_main(["decode", "--kv-tokens", "64", "128", "--tokens", "1", "--out", str(tmp_path)])
    bench_main(["decode", "--kv-tokens", "64", "--tokens", "2", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "decode_speed.json").read_text())
    [row] = result["rows"]
    assert row["kv_tokens"] == 64 and row["bound_tok_s"] > 0 and result["uptime_before"]
    for path in ("old", "preallocated", "torch", "kernel"):
        assert len(row[path]["wall_seconds"]) == 2 and len(row[path]["ids"]) == 3
    assert row["preallocated"]["ids"] == row["old"]["ids"]  # the cache alone changes no number
    assert "| 64 |" in (tmp_path / "decode_speed.md").read_text()


def test_main_job_flop_count_matches_the_model_parameters(tokenizer):
    """The dense part of `prefill_flops` is 2 FLOPs per weight of the decoder layers per token."""
    from benchmarks.main_job import phase2_work, prefill_flops, question_flops

    from .conftest import tiny_model

    model = tiny_model("qwen3", len(tokenizer))  # head_dim differs from hidden/heads: a real check
    cfg = model.config.to_dict()
    weights = sum(m.weight.numel() for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear))
    vocab_row = 2 * cfg["hidden_size"] * cfg["vocab_size"]
    one_token = prefill_flops(cfg, prefix=0, question=0, chunks=[1])
    layers, qd = cfg["num_hidden_layers"], cfg["num_attention_heads"] * cfg["head_dim"]
    assert one_token == 2 * weights + 2 * layers * qd + vocab_row
    assert prefill_flops(cfg, 0, 0, [1, 1]) == 2 * one_token  # chunks add up independently
    # a reused question costs phase 2 alone: one question token over a 1-token chunk, and the
    # difference a question makes to a cold prefill
    assert question_flops(cfg, prefix=0, question=1, chunks=[1]) == 2 * weights + 4 * layers * qd + vocab_row
    assert prefill_flops(cfg, 5, 3, [4, 7]) - prefill_flops(cfg, 5, 0, [4, 7]) == question_flops(cfg, 5, 3, [4, 7])
    assert question_flops(cfg, prefix=0, question=1, chunks=[1], logits=0) == 2 * weights + 4 * layers * qd
    # phase 2 runs the question before its last scored token; phase 1 scored the first token
    assert phase2_work((4, 21)) == (20, 17) and phase2_work((0, 21)) == (20, 20)
    assert phase2_work((4, 21), carried=4) == (16, 16)  # the 4 head tokens and the row after them
    assert phase2_work((30, 47), carried=26) == (20, 17)  # a conversation's turn: 26 of 30 head tokens carried


def test_profile_command_writes_the_top_operators(tmp_path, monkeypatch, tokenizer):
    """`python -m benchmarks profile` on the tiny model: both tables, shares that sum to at most 1."""
    import json

    from benchmarks import hotspots
    from benchmarks.__main__ import main as bench_main
    from parallelcomp import ParallelComp

    from .conftest import tiny_model

    monkeypatch.setattr(hotspots, "CONFIG", {"keep_chunks": 1, "chunk_tokens": 128})
    monkeypatch.setattr(ParallelComp, "from_pretrained",
                        classmethod(lambda cls, path, config: cls(tiny_model("llama", len(tokenizer)), tokenizer, config)))
    bench_main(["profile", "--length", "600", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "results.json").read_text())
    for part in ("encode", "reused_question"):
        shares = [o["share"] for o in result[part]["ops"]]
        assert shares and sum(shares) <= 1.0 + 1e-6 and shares == sorted(shares, reverse=True)
        # what the operators do not cover: at most the rest of the call, and what the operators left of it
        inside = sum(o["self_cpu_s"] for o in result[part]["ops"])
        assert 0 <= result[part]["outside_s"] <= result[part]["wall_s"] - inside + 0.01
    assert result["reused_question"]["reused_chunks"] == result["encode"]["chunks"] > 1
    # the kernel rates: one fp32 row for an fp32 model, over prefix + one chunk
    [kernels] = result["kernels"]
    assert kernels["dtype"] == "float32" and kernels["tokens"] > 128
    assert kernels["gemm_gflops"] > 0 and kernels["attention_gflops"] > 0 and kernels["matmul_attention_gflops"] > 0
    text = (tmp_path / "results.md").read_text()
    assert "## Reused question" in text and "| float32 | 2 × " in text
    assert text.count("| outside torch's operators: C kernels, Python |") == 2


def test_per_length_results_never_mix_dtypes(tmp_path):
    """Rows of other lengths are kept only from a file of the same dtype; another dtype's file
    is replaced, so one table never holds rows measured in two precisions."""
    import json

    from benchmarks import machine

    (tmp_path / "results.json").write_text(json.dumps(
        {"config": {}, "machine": machine.describe("torch.float32"), "lengths": {"8192": {"rows": []}}}))
    assert machine.per_length_results(tmp_path, "torch.float32", {})["lengths"] == {"8192": {"rows": []}}
    fresh = machine.per_length_results(tmp_path, "torch.bfloat16", {"k": 1})
    assert fresh["lengths"] == {} and fresh["config"] == {"k": 1} and fresh["machine"]["dtype"] == "torch.bfloat16"


def test_prefill_scaling_worker_reports_the_bound_and_each_store_tier(monkeypatch, tokenizer):
    """One `prefill-scaling` case in this process, on the tiny model: the FLOPs are those of the
    chunks it prefilled, the disk tier keeps no KV in memory, the memory tier keeps it all; the
    bound uses the GEMM rate measured before the prefill, and the table shows the one after too."""
    import transformers

    from benchmarks import prefill_scaling
    from benchmarks.main_job import prefill_flops
    from parallelcomp import ParallelComp, hardware

    from .conftest import tiny_model

    monkeypatch.setattr(prefill_scaling, "CONFIG", {"keep_chunks": 1, "chunk_tokens": 128})
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda path: tokenizer)
    monkeypatch.setattr(ParallelComp, "from_pretrained",
                        classmethod(lambda cls, path, config: cls(tiny_model("llama", len(tokenizer)), tokenizer, config)))
    probes = iter([400.0, 380.0, 410.0, 390.0])  # before and after each process's prefill
    monkeypatch.setattr(hardware, "measure_gflops", lambda *args, **kwargs: next(probes))
    rows = [prefill_scaling.worker({"model_dir": "tiny", "length": 600, "store": s, "batch_tokens": 256,
                                    "kernel": kernel, "layers": layers})
            for s, kernel, layers in (("memory", "auto", "auto"), ("disk", "matmul", "torch"))]
    memory, disk = rows
    assert (memory["attention_kernel"], disk["attention_kernel"]) == ("sdpa", "matmul")  # auto: fp32 → fused
    assert memory["layer_kernel"] == disk["layer_kernel"] == "torch"  # auto: fp32 → torch's modules
    assert memory["pack"] and memory["packed_weight_bytes"] == 0  # fp32: nothing to pack
    assert memory["n_chunks"] == disk["n_chunks"] > 1 and memory["flops"] == disk["flops"] > 0
    assert disk["store_bytes"] == 0 < memory["store_bytes"]
    assert memory["reused_chunks"] == disk["reused_chunks"] == memory["n_chunks"]  # the 2nd question is phase 2 only
    assert (memory["gemm_gflops"], memory["gemm_gflops_after"], disk["gemm_gflops"]) == (400.0, 380.0, 410.0)
    assert memory["bound_seconds"] == round(memory["flops"] / (400.0 * 1e9), 2)
    assert f"| 400.0 → 380.0 | {memory['bound_seconds']} |" in prefill_scaling.table(rows)
    cfg = tiny_model("llama", len(tokenizer)).config.to_dict()
    assert memory["flops"] > prefill_flops(cfg, 0, 0, [128] * (memory["n_chunks"] - 1))  # every chunk counted
    assert "| memory | 256 | sdpa | torch |" in prefill_scaling.table(rows)
    assert "| disk | 256 | matmul | torch |" in prefill_scaling.table(rows)


def test_prefill_scaling_repeats_keep_the_median_process_and_list_every_ratio():
    """`prefill-scaling --repeats`: the row is the process whose prefill ÷ bound (at its own GEMM
    rate) is the median, and the table lists each process's ratio in the order they ran."""
    from benchmarks.prefill_scaling import median, table

    def process(seconds, gflops, rss):
        return {"length": 8192, "store": "memory", "batch_tokens": 4096, "attention_kernel": "avx512",
                "layer_kernel": "c-avx512", "tokens_in": 7928, "n_chunks": 5, "prefill_seconds": seconds,
                "flops": 2.0e12, "gemm_gflops": gflops, "bound_seconds": round(2.0e12 / (gflops * 1e9), 2),
                "tokens_per_second": round(7928 / seconds, 1), "weights_mb": 257, "loaded_rss_mb": 700,
                "peak_rss_mb": rss, "correct": True, "reused_prefill_seconds": 0.2, "load_before": 1.0,
                "load_after": 1.5}

    # ratios 6.0·400/2000 = 1.2, 6.6·400/2000 = 1.32, 5.5·420/2000 = 1.155: the median is the first
    processes = [process(6.0, 400.0, 1200), process(6.6, 400.0, 1300), process(5.5, 420.0, 1250)]
    row = median(processes)
    assert row["prefill_seconds"] == 6.0 and row["peak_rss_mb"] == 1200
    assert [r["ratio"] for r in row["runs"]] == [1.2, 1.32, 1.155]
    assert "| 6.0 | 2.00 | 400.0 | 5.0 | 1.20× |" in table([row]) and "| 1.20× / 1.32× / 1.16× |" in table([row])
    assert median(processes[:2])["prefill_seconds"] == 6.0  # even count: the lower middle
    processes[2]["correct"] = False  # a wrong answer in any process marks the row
    assert not median(processes)["correct"] and [r["correct"] for r in median(processes)["runs"]] == [True, True, False]
    assert table([median(processes[:1])]).rstrip().endswith("| – |")  # one process: nothing to list
    assert "| avx512 | c-avx512 | 5 |" in table([row])
    assert "| avx512 | c-avx512 + packed linear | 5 |" in table([row | {"packed_weight_bytes": 212336640}])


def test_prefill_scaling_repeats_take_turns_within_a_length(monkeypatch, tmp_path):
    """`prefill-scaling --repeats 3` over two tiers: the tiers of one length alternate, in the
    opposite order each round, and each row is its own tier's median process."""
    from benchmarks import prefill_scaling
    from parallelcomp import default_model

    ran = []

    def spawn(module, spec):
        ran.append((spec["length"], spec["store"]))
        seconds = 5.0 + len(ran)  # each process slower than the one before: a drifting host
        return {"length": spec["length"], "store": spec["store"], "batch_tokens": spec["batch_tokens"],
                "kernel": spec["kernel"], "layers": spec["layers"], "attention_kernel": "avx512",
                "layer_kernel": "c-avx512", "tokens_in": spec["length"], "n_chunks": 1, "dtype": "torch.bfloat16",
                "prefill_seconds": seconds, "flops": 2.0e12, "gemm_gflops": 400.0, "bound_seconds": 5.0,
                "tokens_per_second": 1.0, "weights_mb": 1, "loaded_rss_mb": 1, "peak_rss_mb": 2, "correct": True,
                "reused_prefill_seconds": 0.1, "load_before": 1.0, "load_after": 1.0}

    monkeypatch.setattr(prefill_scaling, "spawn", spawn)
    monkeypatch.setattr(default_model, "embedded_model_dir", lambda progress: tmp_path)
    prefill_scaling.run([100, 200], ["memory", "disk"], [64], tmp_path, repeats=3)
    assert ran == [(100, "memory"), (100, "disk"), (100, "disk"), (100, "memory"), (100, "memory"), (100, "disk"),
                   (200, "memory"), (200, "disk"), (200, "disk"), (200, "memory"), (200, "memory"), (200, "disk")]
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    # 100, memory ran 1st, 4th and 5th (6, 9 and 10 s): its median process is the 4th
    assert {(r["length"], r["store"]): r["prefill_seconds"] for r in rows} == \
        {(100, "memory"): 9.0, (100, "disk"): 8.0, (200, "memory"): 15.0, (200, "disk"): 14.0}


def test_repeat_query_conversation_asks_each_question_after_the_earlier_turns(monkeypatch, tokenizer):
    """`repeat-query --conversation` on the tiny model: each layout's process asks every question
    after the earlier turns; only the history-after-documents layout reuses the chunks."""
    import transformers

    from benchmarks import repeat_query
    from parallelcomp import ParallelComp

    from .conftest import tiny_model

    model = tiny_model("llama", len(tokenizer))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda path: tokenizer)
    monkeypatch.setattr(ParallelComp, "from_pretrained",
                        classmethod(lambda cls, path, config: cls(model, tokenizer, config)))
    entry = {"load_before": 1.0, "load_after": 1.0}
    for name, after in repeat_query.LAYOUTS.items():
        spec = {"model_dir": "tiny", "length": 600, "store": None, "questions": [0, 1, 2], "conversation": True,
                "config": {"history_after_documents": after, "chunk_tokens": 128}}
        rows = entry[name] = repeat_query.worker(spec)["rows"]
        assert [r["history_messages"] for r in rows] == [0, 2, 4] and rows[0]["n_chunks"] > 1
        assert [r["reused_chunks"] == r["n_chunks"] for r in rows] == [False, after, after]
    table = repeat_query.conversation_table({"lengths": {"600": entry}})
    assert "| 600 | history after documents | 3 | 4 |" in table and "| 600 | history before documents | 2 | 2 |" in table


def test_repeat_query_table_gives_each_processs_second_question_ratio_and_their_median():
    from benchmarks.repeat_query import second_question_ratios, table

    def row(question, ttft, reused):
        return {"question": question, "reused_chunks": reused, "n_chunks": 2, "chunk_seconds": 0.1,
                "reused_documents": bool(reused), "prefill_seconds": ttft - 0.05, "flops": 2e12, "ttft_seconds": ttft,
                "decode_tok_s": 50.0, "write_seconds": 0.0, "call_seconds": ttft + 1, "store_bytes": 10**8,
                "peak_rss_mb": 1000, "correct": True, "answer": "7431290"}

    entry = {"same_process": [row(1, 30.0, 0), row(2, 0.6, 2), row(3, 0.7, 2)],
             "fresh_process_disk": [row(1, 3.0, 2)], "fresh_process_both": [row(1, 1.2, 2)],
             "repeats": [[row(1, 36.0, 0), row(2, 0.64, 2)], [row(1, 29.0, 0), row(2, 0.58, 2)]],
             "disk_bytes": 10**8, "load_before": 1.0, "load_after": 1.2, "gemm_gflops": 2500.0}
    assert second_question_ratios(entry) == [(30.0, 0.6, 30.0 / 0.6), (36.0, 0.64, 36.0 / 0.64), (29.0, 0.58, 29.0 / 0.58)]
    text = table({"lengths": {"131072": entry}})
    assert ("2nd question against cold in 3 processes: cold TTFT 30.0 / 36.0 / 29.0 s, 2nd 0.6 / 0.64 / 0.58 s, "
            "ratios 50.0× / 56.2× / 50.0× (median 50.0×)") in text
    del entry["repeats"]  # results written before --repeats: no summary line
    assert "processes" not in table({"lengths": {"131072": entry}})


def test_long_question_times_the_same_prompt_as_transformers_forward(monkeypatch, tokenizer, tmp_path):
    """`long-question` on the tiny model: the engine and transformers' forward run the same prompt
    ids, each twice, and the bound is that forward's FLOPs."""
    from benchmarks import long_question
    from benchmarks.main_job import prefill_flops
    from parallelcomp import ParallelComp, ParallelCompConfig

    from .conftest import tiny_model

    model = tiny_model("llama", len(tokenizer))
    monkeypatch.setattr(long_question, "load_engine", lambda: ParallelComp(model, tokenizer, ParallelCompConfig()))
    results = json.loads((long_question.run([300], tmp_path).parent / "results.json").read_text())
    entry = results["lengths"]["300"]
    ours, theirs = entry["parallelcomp"], entry["transformers again"]
    assert ours["tokens"] == theirs["tokens"] > 300 and not ours["exceeds_window"]
    assert theirs["flops"] == prefill_flops(model.config.to_dict(), 0, 0, [theirs["tokens"]]) and entry["gemm_gflops"] > 0
    assert f"| {ours['tokens']:,} | " in (tmp_path / "results.md").read_text()
