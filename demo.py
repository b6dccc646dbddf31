"""The main job, end to end on a CPU: teacher -> CE baseline vs distilled student -> report.

    make demo                                   # embedded Shakespeare, char-level
    python demo.py dataset=data/mytext out=out/mydemo student_iters=2000

Stages (each reused on rerun unless force=True): prepare the corpus, train the teacher, train the
CE baseline student, distil the same student (same init seed, data order, steps and schedule:
only the loss differs), train a CE baseline for the distillation's wall-clock time, evaluate
all on the whole val split (loss, calibration, and each student's KL from the teacher and top-1
agreement with it), write report.md, report.json and val_loss.png.
"""
import json
import os
import subprocess
import sys
import time

from configurator import OUT_DIR, UserError, run
from losses import KINDS

ROOT = os.path.dirname(os.path.abspath(__file__))

DEFAULTS = dict(
    dataset="",  # a prepared dataset folder; empty: the embedded Shakespeare corpus, char-level
    out="out/demo",  # the demo's folder: one run per stage, report.md, report.json, val_loss.png
    force=False,  # rerun every stage, even those finished before with the same arguments
    device="auto",  # auto (cuda if available, else cpu), cpu, cuda, cuda:N, mps
    compile=False,  # torch.compile the models
    seed=1337,  # seed of every stage (the two students start from the same weights)
    block_size=128,  # tokens per row, for every model
    batch_size=32,  # rows per step
    eval_interval=100,  # steps between val loss estimates
    eval_iters=10,  # batches per val loss estimate
    # sizes and settings from a sweep on the embedded corpus (README, "The demo"): students 2-4
    # layers x 64-128 wide, alpha 0.1-0.5, T 1-2; both students get the same lr and schedule
    teacher_n_layer=4, teacher_n_head=4, teacher_n_embd=128,  # the teacher: blocks, heads, width
    teacher_iters=800,  # the teacher's training steps
    teacher_lr=3e-3,  # the teacher's peak learning rate (min_lr is a tenth of it)
    student_n_layer=3, student_n_head=4, student_n_embd=96,  # both students: blocks, heads, width
    student_iters=600,  # each student's training steps
    student_lr=3e-3,  # the students' peak learning rate (min_lr is a tenth of it)
    distill_type="hybrid",  # logit: soft loss only; hybrid: alpha x CE + (1 - alpha) x soft
    alpha=0.1,  # weight of the hard (CE) loss in hybrid mode
    temperature=1.0,  # softens both distributions; the soft loss is scaled by T^2
    kd_loss="forward_kl",  # the soft loss: forward_kl, reverse_kl or jsd
    equal_time=True,  # also train a CE baseline for as long as the distillation took
)
LIMITS = dict(
    out=OUT_DIR, seed="[0, inf)", block_size="[1, inf)", batch_size="[1, inf)", eval_interval="[1, inf)",
    eval_iters="[1, inf)", teacher_n_layer="[1, inf)", teacher_n_head="[1, inf)", teacher_n_embd="[1, inf)",
    teacher_iters="[1, inf)", teacher_lr="(0, inf)", student_n_layer="[1, inf)", student_n_head="[1, inf)",
    student_n_embd="[1, inf)", student_iters="[1, inf)", student_lr="(0, inf)",
    distill_type=("logit", "hybrid"), alpha="[0, 1]", temperature="(0, inf)",
    kd_loss=KINDS,
)


def stage(title):
    print(f"\n=== {title} " + "=" * max(0, 70 - len(title)), flush=True)


def run_stage(cfg, title, script, out_dir, args):
    """Run one training script as a user would; reuse a run finished with the same arguments
    unless force=True."""
    stage(title)
    cmd = [sys.executable, os.path.join(ROOT, script), *args, f"out_dir={out_dir}", "overwrite=True",
           "final_eval=False", f"device={cfg['device']}", f"compile={cfg['compile']}", f"seed={cfg['seed']}"]
    state_path = os.path.join(out_dir, "demo_stage.json")
    if not cfg["force"] and os.path.exists(state_path):
        with open(state_path) as f:
            state = json.load(f)
        if state.get("args") == cmd[2:]:
            print(f"reusing {out_dir} (force=True retrains)")
            return state
    print("$ " + " ".join(os.path.relpath(c, ROOT) if c.startswith(ROOT) else c for c in cmd[1:]), flush=True)
    t = time.perf_counter()
    if subprocess.run(cmd, cwd=ROOT).returncode != 0:
        raise UserError(f"stage '{title}' failed; see the output above")
    state = dict(args=cmd[2:], train_s=time.perf_counter() - t)
    with open(state_path, "w") as f:
        json.dump(state, f)
    return state


def sizes(cfg, who):
    return [f"n_layer={cfg[who + '_n_layer']}", f"n_head={cfg[who + '_n_head']}",
            f"n_embd={cfg[who + '_n_embd']}", f"learning_rate={cfg[who + '_lr']}",
            f"min_lr={cfg[who + '_lr'] / 10}"]


def evaluate_all(runs, dataset, block_size, device):
    """Exact loss and calibration over the whole val split for each run's final checkpoint, all
    over the same windows in one pass, and each student against the teacher: KL(teacher || student)
    per token and top-1 agreement."""
    from checkpoint import load_model
    from data import BinDataset
    from evaluation import evaluate_models
    from runtime import resolve_device
    device = resolve_device(device)
    models = {name: load_model(out_dir, device)[0] for name, out_dir in runs.items()}
    scores = evaluate_models(models, BinDataset(dataset), block_size, 0, 64, device,
                             reference="teacher")
    results = {}
    for name, r in scores.items():
        results[name] = dict(params=r["params"], val_loss=r["loss"], val_ppl=r["ppl"],
                             val_tokens=r["tokens"], val_ece=r["ece"])
        against = ""
        if "kl" in r:
            results[name].update(kl_from_teacher=r["kl"], agreement=r["agreement"])
            against = f"  KL from teacher {r['kl']:.4f}  agreement {r['agreement']:.1%}"
        print(f"{name:>22}: val loss {r['loss']:.4f}  ppl {r['ppl']:.3f}  ECE {r['ece']:.4f}{against}  "
              f"({r['tokens']:,} tokens)")
    return results


def val_curve(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f if line.strip()]
    return [(r["step"], r["time"], r["val_loss"]) for r in recs if "val_loss" in r]


def plot(runs, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (name, out_dir) in enumerate(runs.items()):
        steps, secs, losses = zip(*val_curve(out_dir))
        a.plot(steps, losses, label=name, color=f"C{i}")  # one colour per run in both panels
        if name != "teacher":
            b.plot(secs, losses, label=name, color=f"C{i}")
    a.set(xlabel="step", ylabel="val loss (sampled batches)", title="val loss vs steps")
    b.set(xlabel="training seconds", ylabel="val loss", title="students vs wall-clock")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(cfg, results, timings, total_s, out):
    t, b, d = results["teacher"], results["baseline"], results["distilled"]
    ppl_red = 100 * (b["val_ppl"] - d["val_ppl"]) / b["val_ppl"]
    gap = b["val_loss"] - t["val_loss"]
    gap_rec = 100 * (b["val_loss"] - d["val_loss"]) / gap if gap > 0 else float("nan")
    for name in results:
        results[name]["train_s"] = timings[name]
    rows = [("teacher", t), ("baseline (CE)", b), ("distilled", d)]
    if "baseline_equal_time" in results:
        rows.append((f"baseline (CE, equal time)", results["baseline_equal_time"]))
    lines = ["| model | params | val loss | val PPL | KL from teacher | top-1 agreement | ECE | train s |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {n} | {r['params'] / 1e6:.2f}M | {r['val_loss']:.4f} | {r['val_ppl']:.3f} | "
              + (f"{r['kl_from_teacher']:.4f} | {r['agreement']:.1%} | " if "agreement" in r else "- | - | ")
              + f"{r['val_ece']:.4f} | {r['train_s']:.0f} |" for n, r in rows]
    lines.append(f"| improvement | | {d['val_loss'] - b['val_loss']:+.4f} | "
                 f"{d['val_ppl'] - b['val_ppl']:+.3f} ({-ppl_red:+.1f}%) | "
                 f"{d['kl_from_teacher'] - b['kl_from_teacher']:+.4f} | "
                 f"{100 * (d['agreement'] - b['agreement']):+.1f} pts | | |")
    table = "\n".join(lines)
    notes = [f"Distilled vs CE baseline at equal steps ({cfg['student_iters']}): perplexity "
             f"{ppl_red:.1f}% lower; {gap_rec:.0f}% of the baseline-to-teacher loss gap recovered."]
    if "baseline_equal_time" in results:
        e = results["baseline_equal_time"]
        notes.append(f"Equal wall-clock: a CE baseline trained {e['steps']} steps "
                     f"({e['train_s']:.0f} s, as long as the distillation's {d['train_s']:.0f} s, which "
                     f"includes the teacher's forward passes) reaches val loss {e['val_loss']:.4f} "
                     f"(PPL {e['val_ppl']:.3f}) against the distilled {d['val_loss']:.4f}. The "
                     f"teacher's own training ({t['train_s']:.0f} s) is excluded.")
    md = (f"# nanodistill demo\n\n{table}\n\n" + "\n\n".join(notes)
          + f"\n\nData: {cfg['dataset']}, whole val split. Total wall time {total_s:.0f} s.\n\n"
          f"![val loss](val_loss.png)\n")
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(md)
    summary = dict(results, ppl_reduction_pct=ppl_red, gap_recovered_pct=gap_rec, total_s=total_s,
                   config=cfg)
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print("\n" + table + "\n\n" + "\n".join(notes))
    print(f"\nwrote {out}/report.md, report.json, val_loss.png in {total_s:.0f} s")


def main(cfg):
    t0 = time.perf_counter()
    out = cfg["out"]
    os.makedirs(out, exist_ok=True)
    if not cfg["dataset"]:
        cfg["dataset"] = os.path.join("data", "shakespeare_char")
        stage("prepare: the embedded Shakespeare corpus, char-level")
        if cfg["force"] or not os.path.exists(os.path.join(cfg["dataset"], "meta.json")):
            subprocess.run([sys.executable, os.path.join(ROOT, "prepare", "shakespeare.py"),
                            f"out={cfg['dataset']}"], cwd=ROOT, check=True)
        else:
            print(f"reusing {cfg['dataset']}")
    from data import BinDataset
    BinDataset(cfg["dataset"])  # fail now, with a clear message, not inside a stage
    common = [f"dataset={cfg['dataset']}", f"block_size={cfg['block_size']}", f"batch_size={cfg['batch_size']}",
              f"eval_interval={cfg['eval_interval']}", f"eval_iters={cfg['eval_iters']}", "log_interval=10"]
    student = common + sizes(cfg, "student") + [f"warmup_iters={max(1, cfg['student_iters'] // 20)}"]
    runs = {"teacher": os.path.join(out, "teacher"), "baseline": os.path.join(out, "baseline"),
            "distilled": os.path.join(out, "distilled")}
    timings = {}
    timings["teacher"] = run_stage(cfg, "teacher", "train.py", runs["teacher"], common + sizes(cfg, "teacher") + [
        f"max_iters={cfg['teacher_iters']}", f"warmup_iters={max(1, cfg['teacher_iters'] // 20)}"])["train_s"]
    timings["baseline"] = run_stage(cfg, "baseline student (CE)", "train.py", runs["baseline"],
                                    student + [f"max_iters={cfg['student_iters']}"])["train_s"]
    timings["distilled"] = run_stage(cfg, "distilled student", "distill.py", runs["distilled"], student + [
        f"max_iters={cfg['student_iters']}", f"teacher={runs['teacher']}", f"distill_type={cfg['distill_type']}",
        f"alpha={cfg['alpha']}", f"temperature={cfg['temperature']}", f"kd_loss={cfg['kd_loss']}"])["train_s"]
    eq_steps = None
    if cfg["equal_time"]:
        eq_steps = max(1, round(cfg["student_iters"] * timings["distilled"] / timings["baseline"]))
        runs["baseline_equal_time"] = os.path.join(out, "baseline_equal_time")
        timings["baseline_equal_time"] = run_stage(
            cfg, f"baseline student (CE), equal wall-clock: {eq_steps} steps", "train.py",
            runs["baseline_equal_time"], student + [f"max_iters={eq_steps}"])["train_s"]
    stage("evaluate: whole val split")
    results = evaluate_all(runs, cfg["dataset"], cfg["block_size"], cfg["device"])
    if eq_steps:
        results["baseline_equal_time"]["steps"] = eq_steps
    plot(runs, os.path.join(out, "val_loss.png"))
    report(cfg, results, timings, time.perf_counter() - t0, out)


if __name__ == "__main__":
    run(main, DEFAULTS, LIMITS)
