"""bench.py end to end on a tiny config: every section is measured and lands in the JSON."""
import json
import os

from conftest import run_script

TINY_BENCH = ["n_layer=2", "n_head=2", "n_embd=64", "block_size=32", "batch_size=2",
              "teacher_n_layer=2", "teacher_n_head=2", "teacher_n_embd=64", "chunk_rows=16",
              "warmup=1", "repeats=1", "gen_tokens=8,", "gen_batch=3", "gen_batch_tokens=5", "prompt_len=4",
              "serve_clients=3", "serve_requests=2", "serve_tokens=4", "device=cpu", "dtype=float32"]


def positive(d, *path):
    for key in path:
        d = d[key]
    assert isinstance(d, (int, float)) and d > 0, f"{'.'.join(path)} = {d!r}"


def test_bench_tiny_writes_every_section(tmp_path):
    out = tmp_path / "bench.json"
    p = run_script("bench.py", *TINY_BENCH, f"out={out}")
    res = json.loads(out.read_text())
    positive(res, "peak_flops")
    for impl in ("ours", "transformers"):
        positive(res, "train", impl, "tokens_per_s", "median")
        positive(res, "train", impl, "mfu", "median")
    positive(res, "train", "ratio_ours_over_hf")
    for name in ("distill_step", "student_step", "teacher_forward"):
        positive(res, "distill", name, "seconds", "median")
    positive(res, "distill", "ratio_distill_over_sum")
    assert res["distill"]["kd"]["chunked"]
    for variant in ("ce", "ce_checkpointed", "chunked", "unchunked"):
        positive(res, "memory", variant, "step_bytes")
    for name in ("engine", "transformers"):
        positive(res, "generate", "decode", "8", name, "median")
        positive(res, "generate", "batch", name, "median")
    for key in ("weight_bytes", "bandwidth", "bound_tokens_per_s"):
        positive(res, "generate", key)
    positive(res, "generate", "decode", "8", "engine_over_bound")
    positive(res, "generate", "batch", "ratio_engine_over_hf")
    assert res["generate"]["batch"]["engine"]["n"] == 1 and res["generate"]["batch"]["rows"] == 3
    for name in ("cached_step", "ce_step"):
        positive(res, "cached", name, "seconds", "median")
    positive(res, "cached", "ratio_cached_over_ce")
    for name in ("cache_write", "teacher_forward"):
        positive(res, "cache_write", name, "tokens_per_s", "median")
    assert res["cache_write"]["cache"]["bytes_per_token"] == 65 * 2 + 64 * 2
    assert "ours / transformers" in p.stdout and "chunked / CE" in p.stdout
    assert "cached distill / CE step" in p.stdout and "cache writing / bare forward" in p.stdout
    assert "batch 3 x 5 new: engine / transformers" in p.stdout and "% of the bound" in p.stdout
    for key in ("requests_per_s", "tokens_per_s", "wall_s"):
        positive(res, "serve", key)
    positive(res, "serve", "latency_s", "p99")
    assert res["serve"]["requests"] == 6 and res["serve"]["failed"] == 0
    assert "serving: 3 clients x 2 completions of 4 new tokens" in p.stdout and "0 failed" in p.stdout


def test_bench_runs_just_the_cache_parts(tmp_path):
    out = tmp_path / "bench.json"
    run_script("bench.py", *TINY_BENCH, "parts=cached,cache_write", "top_k=0", "vocab_size=300",
               f"cache_dir={tmp_path}", f"out={out}")
    res = json.loads(out.read_text())
    assert {"cached", "cache_write"} <= set(res) and not {"train", "distill", "generate", "memory", "serve"} & set(res)
    positive(res, "cached", "ratio_cached_over_ce")
    positive(res, "cache_write", "ratio_write_over_forward")
    assert os.listdir(tmp_path) == ["bench.json"]  # the timed cache is removed
