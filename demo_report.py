"""demo.py's output: report.md, report.json and val_loss.png from the finished stages."""
import json
import os

# the demo's targets on the embedded corpus (2 CPU cores): what report.md checks, met or missed
GOAL_STEPS_PCT, GOAL_TIME_PCT, GOAL_TOTAL_S = 15.0, 5.0, 600.0

# the models table: (header, key in a run's results, format); a run without the key shows blank
COLUMNS = [("params", "params", lambda v: f"{v / 1e6:.2f}M"), ("steps", "steps", str),
           ("train s", "train_s", lambda v: f"{v:.0f}"), ("val loss", "val_loss", lambda v: f"{v:.4f}"),
           ("val PPL", "val_ppl", lambda v: f"{v:.3f}"),
           ("KL from teacher", "kl_from_teacher", lambda v: f"{v:.4f}"),
           ("top-1 agreement", "agreement", lambda v: f"{v:.1%}"), ("ECE", "val_ece", lambda v: f"{v:.4f}")]
LABELS = dict(teacher="teacher", teacher_2="second teacher (seed + 1)", baseline="CE student",
              distilled="distilled student", baseline_equal_time="CE student, equal seconds",
              distilled_2="distilled from the second teacher", distilled_both="distilled from both teachers")


def lower_pct(ref, new):
    """How much lower new's perplexity is than ref's, in percent of ref's."""
    return 100 * (ref["val_ppl"] - new["val_ppl"]) / ref["val_ppl"]


def models_table(results):
    header = "| model | " + " | ".join(h for h, _, _ in COLUMNS) + " |"
    lines = [header, "| --- |" + " ---: |" * len(COLUMNS)]
    for name, r in results.items():
        cells = [fmt(r[key]) if key in r else "" for _, key, fmt in COLUMNS]
        lines.append(f"| {LABELS.get(name, name)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cache_meta(folder):
    with open(os.path.join(folder, "meta.json")) as f:
        meta = json.load(f)
    return dict(windows=meta["windows"], tokens=meta["tokens"], top_k=meta["top_k"],
                bytes_per_token=meta["bytes_per_token"], bytes=sum(meta["files"].values()))


def paid_once_table(cfg, results, demo):
    lines = ["| paid once | what | s |", "| --- | --- | ---: |"]
    for name, seconds in demo.paid_once.items():
        if name in demo.caches:
            m = cache_meta(demo.caches[name])
            what = (f"{m['windows']:,} windows ({m['tokens']:,} tokens), top_k={m['top_k']}, "
                    f"{m['bytes_per_token']} bytes a token, {m['bytes'] / 2**20:,.0f} MiB")
        else:
            r = results[name]
            what = (f"{cfg['teacher_n_layer']}x{cfg['teacher_n_embd']}, {r['steps']} steps, "
                    f"val loss {r['val_loss']:.4f} (PPL {r['val_ppl']:.3f})")
        lines.append(f"| {name} | {what} | {seconds:.0f} |")
    return "\n".join(lines)


def goal(text, measured, met):
    return dict(goal=text, measured=measured, met=met)


def comparisons(results, demo, total_s):
    """(notes for report.md, figures for report.json, goals)"""
    t, b, d = results["teacher"], results["baseline"], results["distilled"]
    gap = b["val_loss"] - t["val_loss"]
    fig = dict(ppl_reduction_pct=lower_pct(b, d),
               gap_recovered_pct=100 * (b["val_loss"] - d["val_loss"]) / gap if gap > 0 else float("nan"),
               step_cost_ratio=(d["train_s"] / d["steps"]) / (b["train_s"] / b["steps"]))
    notes = [f"**Equal steps** ({b['steps']}): the distilled student's val PPL is {d['val_ppl']:.3f} against "
             f"the CE student's {b['val_ppl']:.3f}, {fig['ppl_reduction_pct']:.1f}% lower; it closes "
             f"{fig['gap_recovered_pct']:.0f}% of the loss gap between the CE student and the teacher."]
    goals = [goal(f"distilled PPL >= {GOAL_STEPS_PCT:.0f}% below CE at equal steps",
                  f"{fig['ppl_reduction_pct']:.1f}%", fig["ppl_reduction_pct"] >= GOAL_STEPS_PCT)]
    if "baseline_equal_time" in results:
        e = results["baseline_equal_time"]
        fig["equal_time_ppl_reduction_pct"] = lower_pct(e, d)
        notes.append(
            f"**Equal student-training seconds**: a distilled step reads the cache instead of running "
            f"the teacher and costs {fig['step_cost_ratio']:.2f}x a CE step, so the CE student trained "
            f"for the distilled student's {d['train_s']:.0f} s ran {e['steps']} steps ({e['train_s']:.0f} s) "
            f"and reached PPL {e['val_ppl']:.3f}: the distilled student's is "
            f"{fig['equal_time_ppl_reduction_pct']:.1f}% lower.")
        notes.append(f"**The teacher** (val loss {t['val_loss']:.4f}) against what the student reaches alone "
                     f"in the same seconds ({e['val_loss']:.4f}): "
                     f"{'lower' if t['val_loss'] < e['val_loss'] else 'NOT lower'}.")
        goals += [goal(f"distilled PPL >= {GOAL_TIME_PCT:.0f}% below CE at equal student seconds",
                       f"{fig['equal_time_ppl_reduction_pct']:.1f}%",
                       fig["equal_time_ppl_reduction_pct"] >= GOAL_TIME_PCT),
                  goal("teacher's val loss below the equal-seconds CE student's",
                       f"{t['val_loss']:.4f} vs {e['val_loss']:.4f}", t["val_loss"] < e["val_loss"])]
    once = sum(demo.paid_once[n] for n in ("teacher", "cache"))
    notes.append(f"**Paid once**: the teacher and its cache took {once:.0f} s; every student distilled from "
                 f"the cache reuses them and costs its own {d['train_s']:.0f} s. One student alone, with no "
                 f"teacher at hand, would carry all {once + d['train_s']:.0f} s.")
    if "distilled_both" in results:
        fig.update(ensemble_notes(results, notes))
    cores = len(os.sched_getaffinity(0))
    judged = not demo.stages.reused
    notes.append(f"**Whole demo**: {total_s:.0f} s wall on {cores} CPU cores"
                 + ("." if judged else f", reusing {', '.join(demo.stages.reused)} (not a timing of the whole run)."))
    goals.append(goal(f"whole demo <= {GOAL_TOTAL_S:.0f} s (2 CPU cores, nothing reused)",
                      f"{total_s:.0f} s" + ("" if judged else " (stages reused)"),
                      total_s <= GOAL_TOTAL_S if judged else None))
    return notes, fig, goals


def ensemble_notes(results, notes):
    """Whether the student of the two teachers' mixture beats the better single teacher's student."""
    best = min(("teacher", "teacher_2"), key=lambda n: results[n]["val_loss"])
    alone = results["distilled" if best == "teacher" else "distilled_2"]
    both = results["distilled_both"]
    gain = lower_pct(alone, both)
    notes.append(f"**Two teachers**: val loss {results['teacher']['val_loss']:.4f} and "
                 f"{results['teacher_2']['val_loss']:.4f}; the student of their mixture reaches PPL "
                 f"{both['val_ppl']:.3f} against {alone['val_ppl']:.3f} from the better teacher alone: "
                 f"{abs(gain):.1f}% {'lower' if gain > 0 else 'higher'}, "
                 f"{'it beats' if gain > 0 else 'it does not beat'} the better teacher.")
    return dict(ensemble_vs_best_teacher_pct=gain)


def report(cfg, results, demo, total_s):
    notes, fig, goals = comparisons(results, demo, total_s)
    mark = {True: "met", False: "MISSED", None: "not judged"}
    goal_lines = ["| goal | measured | |", "| --- | ---: | --- |"]
    goal_lines += [f"| {g['goal']} | {g['measured']} | {mark[g['met']]} |" for g in goals]
    md = "\n\n".join([
        "# nanodistill demo: distillation against training the student alone",
        "Students from the same initialisation, on the same windows with the same steps and schedule: only "
        f"the loss differs. Val loss over the whole val split of {cfg['dataset']}.",
        models_table(results), paid_once_table(cfg, results, demo), *notes, "\n".join(goal_lines),
        "![val loss](val_loss.png)"]) + "\n"
    with open(os.path.join(cfg["out"], "report.md"), "w") as f:
        f.write(md)
    summary = dict(results, **fig, paid_once_s=demo.paid_once, goals=goals, reused=demo.stages.reused,
                   total_s=total_s, cache={n: cache_meta(p) for n, p in demo.caches.items()}, config=cfg)
    with open(os.path.join(cfg["out"], "report.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print("\n" + md)
    print(f"wrote {cfg['out']}/report.md, report.json, val_loss.png in {total_s:.0f} s")


def run_metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def val_curve(out_dir):
    return [(r["step"], r["time"], r["val_loss"]) for r in run_metrics(out_dir) if "val_loss" in r]


def plot(runs, teachers, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (name, out_dir) in enumerate(runs.items()):
        steps, secs, losses = zip(*val_curve(out_dir))
        label = LABELS.get(name, name)
        a.plot(steps, losses, label=label, color=f"C{i}")  # one colour per run in both panels
        if name not in teachers:
            b.plot(secs, losses, label=label, color=f"C{i}")
    a.set(xlabel="step", ylabel="val loss (sampled batches)", title="val loss vs steps")
    b.set(xlabel="training seconds", ylabel="val loss", title="students vs their training seconds")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
