"""demo.py end to end on a tiny configuration: every stage, the report's figures and goals, the
students' shared windows, and which stages a rerun reuses."""
import json
import math

from checkpoint import load
from conftest import run_script
from data import BinDataset

TINY_DEMO = ["block_size=32", "batch_size=8", "eval_interval=5", "eval_iters=2",
             "teacher_n_layer=2", "teacher_n_head=2", "teacher_n_embd=32", "teacher_iters=20",
             "student_n_layer=1", "student_n_head=2", "student_n_embd=16", "student_iters=10",
             "cache_windows=300"]


def reused(p):
    return [line.split()[1] for line in p.stdout.splitlines() if line.startswith("reusing ")]


def check_report(out, data, student_iters):
    report = json.loads((out / "report.json").read_text())
    b, d, t = report["baseline"], report["distilled"], report["teacher"]
    for r in (t, b, d):
        assert r["params"] > 0 and r["train_s"] > 0 and abs(math.exp(r["val_loss"]) - r["val_ppl"]) < 1e-6 * r["val_ppl"]
    assert b["steps"] == d["steps"] == student_iters and b["params"] == d["params"] < t["params"]
    assert abs(report["ppl_reduction_pct"] - 100 * (b["val_ppl"] - d["val_ppl"]) / b["val_ppl"]) < 1e-9
    assert abs(report["gap_recovered_pct"]
               - 100 * (b["val_loss"] - d["val_loss"]) / (b["val_loss"] - t["val_loss"])) < 1e-9
    assert abs(report["step_cost_ratio"] - d["train_s"] / b["train_s"]) < 1e-9
    # the cache: the first 300 windows, the whole distribution over the characters in float16
    V = BinDataset(data).vocab_size
    assert report["cache"]["cache"] == dict(windows=300, tokens=300 * 32, top_k=0, bytes_per_token=V * 2,
                                            bytes=300 * 32 * V * 2)
    assert set(report["paid_once_s"]) >= {"teacher", "cache"} and min(report["paid_once_s"].values()) > 0
    goals = {g["goal"]: g["met"] for g in report["goals"]}
    assert goals["distilled PPL >= 15% below CE at equal steps"] == (report["ppl_reduction_pct"] >= 15)
    return report


def test_demo_report_and_reuse(char_data, tmp_path):
    out = tmp_path / "demo"
    p = run_script("demo.py", f"dataset={char_data}", f"out={out}", *TINY_DEMO)
    for stage in ("=== teacher", "=== cache", "=== baseline:", "=== distilled", "=== baseline_equal_time",
                  "=== evaluate"):
        assert stage in p.stdout
    report = check_report(out, char_data, 10)
    b, d, e, t = report["baseline"], report["distilled"], report["baseline_equal_time"], report["teacher"]
    # the CE student given the distilled student's training seconds
    assert e["steps"] == max(1, round(10 * d["train_s"] / b["train_s"]))
    assert abs(report["equal_time_ppl_reduction_pct"] - 100 * (e["val_ppl"] - d["val_ppl"]) / e["val_ppl"]) < 1e-9
    goals = {g["goal"]: g["met"] for g in report["goals"]}
    assert goals["teacher's val loss below the equal-seconds CE student's"] == (t["val_loss"] < e["val_loss"])
    assert goals["whole demo <= 600 s (2 CPU cores, nothing reused)"] == (report["total_s"] <= 600)
    md = (out / "report.md").read_text()
    assert "| teacher |" in md and "| cache |" in md and "**Equal student-training seconds**" in md
    assert ("MISSED" in md) == (False in goals.values())
    assert "| KL from teacher | top-1 agreement | ECE |" in md
    for name in ("baseline", "distilled", "baseline_equal_time"):  # students against the teacher
        assert report[name]["kl_from_teacher"] > 0 and 0 <= report[name]["agreement"] <= 1
    assert "kl_from_teacher" not in t and 0 <= t["val_ece"] <= 1
    assert (out / "val_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # only the loss differs between the two students: same init, windows, steps and schedule
    cb, cd = load(out / "baseline")["config"], load(out / "distilled")["config"]
    for key in ("seed", "dataset", "train_windows", "max_iters", "learning_rate", "min_lr", "warmup_iters",
                "batch_size", "n_layer", "n_embd"):
        assert cb[key] == cd[key], key
    assert cb["train_windows"] == 300 and cd["teacher_cache"] == str(out / "cache")

    again = run_script("demo.py", f"dataset={char_data}", f"out={out}", *TINY_DEMO)
    assert len(reused(again)) == 5
    rerun = json.loads((out / "report.json").read_text())
    assert rerun["distilled"]["val_loss"] == d["val_loss"] and len(rerun["reused"]) == 5
    assert {g["goal"]: g["met"] for g in rerun["goals"]}["whole demo <= 600 s (2 CPU cores, nothing reused)"] is None

    # a changed student setting retrains the students but keeps the teacher and its cache
    changed = run_script("demo.py", f"dataset={char_data}", f"out={out}", *TINY_DEMO, "student_iters=12",
                         "equal_time=False")
    assert reused(changed) == [str(out / "teacher"), str(out / "cache")]
    assert load(out / "distilled")["step"] == 12

    # a retrained teacher: a new cache and distilled student though their arguments are unchanged;
    # with a second teacher, students of each and of their mixture
    ensemble = run_script("demo.py", f"dataset={char_data}", f"out={out}", *TINY_DEMO, "student_iters=12",
                          "equal_time=False", "teacher_iters=22", "ensemble=True")
    assert reused(ensemble) == [str(out / "baseline")]
    report = check_report(out, char_data, 12)
    assert load(out / "teacher")["step"] == 22 and load(out / "teacher_2")["config"]["seed"] == 1338
    for name in ("teacher_2", "distilled_2", "distilled_both"):
        assert report[name]["val_ppl"] > 0
    best = "distilled" if report["teacher"]["val_loss"] <= report["teacher_2"]["val_loss"] else "distilled_2"
    gain = 100 * (report[best]["val_ppl"] - report["distilled_both"]["val_ppl"]) / report[best]["val_ppl"]
    assert abs(report["ensemble_vs_best_teacher_pct"] - gain) < 1e-9
    assert "**Two teachers**" in (out / "report.md").read_text()
