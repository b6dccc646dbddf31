"""demo.py end to end on a tiny configuration: every stage, the report, and reuse on rerun."""
import json
import math

from conftest import run_script

TINY_DEMO = ["block_size=32", "batch_size=8", "eval_interval=5", "eval_iters=2",
             "teacher_n_layer=2", "teacher_n_head=2", "teacher_n_embd=32", "teacher_iters=20",
             "student_n_layer=1", "student_n_head=2", "student_n_embd=16", "student_iters=10"]


def test_demo_report_and_reuse(char_data, tmp_path):
    out = tmp_path / "demo"
    p = run_script("demo.py", f"dataset={char_data}", f"out={out}", *TINY_DEMO)
    for stage in ("=== teacher", "=== baseline student (CE)", "=== distilled student", "=== evaluate"):
        assert stage in p.stdout
    report = json.loads((out / "report.json").read_text())
    for name in ("teacher", "baseline", "distilled", "baseline_equal_time"):
        r = report[name]
        assert r["params"] > 0 and r["train_s"] > 0 and abs(math.exp(r["val_loss"]) - r["val_ppl"]) < 1e-6 * r["val_ppl"]
    b, d, t = report["baseline"], report["distilled"], report["teacher"]
    assert abs(report["ppl_reduction_pct"] - 100 * (b["val_ppl"] - d["val_ppl"]) / b["val_ppl"]) < 1e-9
    assert abs(report["gap_recovered_pct"]
               - 100 * (b["val_loss"] - d["val_loss"]) / (b["val_loss"] - t["val_loss"])) < 1e-9
    assert b["params"] == d["params"] < t["params"] and report["total_s"] > 0
    md = (out / "report.md").read_text()
    assert "| teacher |" in md and "| improvement |" in md and "Equal wall-clock" in md
    assert "KL from teacher | top-1 agreement | ECE" in md
    for name in ("baseline", "distilled", "baseline_equal_time"):  # students against the teacher
        assert report[name]["kl_from_teacher"] > 0 and 0 <= report[name]["agreement"] <= 1
    assert "kl_from_teacher" not in t and 0 <= t["val_ece"] <= 1
    assert (out / "val_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # only the loss differs between the two students: same seed (init and data order), steps, schedule
    from checkpoint import load
    cb, cd = load(out / "baseline")["config"], load(out / "distilled")["config"]
    for key in ("seed", "dataset", "max_iters", "learning_rate", "min_lr", "warmup_iters", "batch_size",
                "n_layer", "n_embd"):
        assert cb[key] == cd[key], key
    again = run_script("demo.py", f"dataset={char_data}", f"out={out}", *TINY_DEMO)
    assert again.stdout.count("reusing") == 4
    assert json.loads((out / "report.json").read_text())["distilled"]["val_loss"] == d["val_loss"]
    # a changed student setting retrains the students but keeps the teacher
    changed = run_script("demo.py", f"dataset={char_data}", f"out={out}", *TINY_DEMO, "student_iters=12",
                         "equal_time=False")
    assert changed.stdout.count("reusing") == 1 and "reusing " + str(out / "teacher") in changed.stdout
    assert load(out / "distilled")["step"] == 12
