"""The main question, end to end on a CPU: does distillation beat training the small model alone,
for the same compute?

    make demo                                   # embedded Shakespeare, char-level
    python demo.py dataset=data/mytext out=out/mydemo student_iters=2000

Train large once, distil many times. Stages (each reused on rerun while its inputs and the stages
it reads are unchanged, unless force=True): prepare the corpus, train the teacher, cache its
distributions once (cache_teacher.py), train the CE student and the distilled student from the
cache (same init, windows, steps and schedule: only the loss differs), train a CE student for as
many seconds as the distilled one trained, evaluate all on the whole val split, and write
report.md, report.json and val_loss.png: the students compared at equal steps and at equal
training seconds, the teacher and its cache shown apart as the costs paid once.
"""
import json
import os
import subprocess
import sys
import time

from configurator import OUT_DIR, UserError, run
from demo_report import plot, report, run_metrics
from losses import KINDS

ROOT = os.path.dirname(os.path.abspath(__file__))

DEFAULTS = dict(
    dataset="",  # a prepared dataset folder; empty: the embedded Shakespeare corpus, char-level
    out="out/demo",  # the demo's folder: one folder per stage, report.md, report.json, val_loss.png
    force=False,  # rerun every stage, even those finished before with the same inputs
    device="auto",  # auto (cuda if available, else cpu), cpu, cuda, cuda:N, mps
    compile=False,  # torch.compile the models (on 2 CPU cores it compiles for a minute and runs no faster)
    seed=1337,  # seed of every stage (the students start from the same weights and draw the same windows)
    block_size=128,  # tokens per row, for every model
    batch_size=32,  # rows per step
    eval_interval=100,  # steps between val loss estimates (the plot's points)
    eval_iters=10,  # batches per val loss estimate
    # sizes and settings from a sweep on the embedded corpus (README, "The demo")
    teacher_n_layer=4, teacher_n_head=4, teacher_n_embd=128,  # the teacher: blocks, heads, width
    teacher_iters=1200,  # the teacher's training steps
    teacher_lr=3e-3,  # the teacher's peak learning rate (min_lr is a tenth of it)
    top_k=0,  # tokens the cache keeps per target; 0: the whole distribution (exact)
    cache_windows=16384,  # the cache holds the first N windows of block_size (at most all): the students' data
    student_n_layer=3, student_n_head=4, student_n_embd=96,  # the students: blocks, heads, width
    student_iters=600,  # the students' training steps
    student_lr=3e-3,  # the students' peak learning rate (min_lr is a tenth of it)
    distill_type="hybrid",  # logit: soft loss only; hybrid: alpha x CE + (1 - alpha) x soft
    alpha=0.1,  # weight of the hard (CE) loss in hybrid mode
    temperature=1.0,  # softens both distributions; the soft loss is scaled by T^2
    kd_loss="forward_kl",  # the soft loss: forward_kl, reverse_kl or jsd
    equal_time=True,  # also train a CE student for as many seconds as the distilled one trained
    ensemble=False,  # also train a second teacher (seed + 1) and distil from it alone and from both
)
LIMITS = dict(
    out=OUT_DIR, seed="[0, inf)", block_size="[1, inf)", batch_size="[1, inf)", eval_interval="[1, inf)",
    eval_iters="[1, inf)", teacher_n_layer="[1, inf)", teacher_n_head="[1, inf)", teacher_n_embd="[1, inf)",
    teacher_iters="[1, inf)", teacher_lr="(0, inf)", top_k="[0, inf)", cache_windows="[0, inf)",
    student_n_layer="[1, inf)", student_n_head="[1, inf)", student_n_embd="[1, inf)",
    student_iters="[1, inf)", student_lr="(0, inf)", distill_type=("logit", "hybrid"), alpha="[0, 1]",
    temperature="(0, inf)", kd_loss=KINDS,
)


def stage(title):
    print(f"\n=== {title} " + "=" * max(0, 70 - len(title)), flush=True)


class Stages:
    """What each stage ran with, when, and for how long ({out}/stages.json). A stage is reused
    while its arguments, the runs of the stages it reads and its product are unchanged: a
    retrained teacher means a new cache and new students, though their arguments are the same."""

    def __init__(self, out, force):
        self.path = os.path.join(out, "stages.json")
        self.done = {}
        if not force and os.path.exists(self.path):
            with open(self.path) as f:
                self.done = json.load(f)
        self.reused = []

    def run(self, name, title, script, args, product, after=()):
        stage(title)
        inputs = [*args, *(self.done[a]["ran"] for a in after)]
        old = self.done.get(name)
        if old and old["inputs"] == inputs and os.path.exists(product):
            print(f"reusing {os.path.dirname(product)} (force=True reruns)")
            self.reused.append(name)
            return old
        print("$ python " + " ".join([script, *args]), flush=True)
        t = time.perf_counter()
        if subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=ROOT).returncode:
            raise UserError(f"stage '{title}' failed; see the output above")
        self.done[name] = dict(inputs=inputs, ran=time.time(), seconds=time.perf_counter() - t)
        with open(self.path + ".tmp", "w") as f:
            json.dump(self.done, f, indent=1)
        os.replace(self.path + ".tmp", self.path)
        return self.done[name]


def trained_seconds(out_dir):
    """Seconds of the training loop itself (the trainer's clock: no start-up, no final eval)."""
    return [r["time"] for r in run_metrics(out_dir) if "time" in r][-1]


class Demo:
    """The stages, in the order main runs them; each returns what the next one needs."""

    def __init__(self, cfg, windows):
        self.cfg, self.windows, self.out = cfg, windows, cfg["out"]
        self.stages = Stages(self.out, cfg["force"])
        self.runs, self.paid_once, self.caches = {}, {}, {}
        c = cfg
        self.common = [f"dataset={c['dataset']}", f"block_size={c['block_size']}", f"batch_size={c['batch_size']}",
                       f"eval_interval={c['eval_interval']}", f"eval_iters={c['eval_iters']}", "log_interval=10",
                       "overwrite=True", "final_eval=False", f"device={c['device']}", f"compile={c['compile']}"]
        self.student = [*self.common, *self.sizes("student"), f"train_windows={windows}", f"seed={c['seed']}",
                        f"warmup_iters={max(1, c['student_iters'] // 20)}"]

    def sizes(self, who):
        c = self.cfg
        return [f"n_layer={c[who + '_n_layer']}", f"n_head={c[who + '_n_head']}", f"n_embd={c[who + '_n_embd']}",
                f"learning_rate={c[who + '_lr']}", f"min_lr={c[who + '_lr'] / 10}"]

    def train(self, name, title, script, args, after=()):
        out_dir = os.path.join(self.out, name)
        self.runs[name] = out_dir
        return self.stages.run(name, title, script, [*args, f"out_dir={out_dir}"],
                               os.path.join(out_dir, "ckpt.pt"), after)

    def teacher(self, name, seed):
        c = self.cfg
        done = self.train(name, f"{name}: trained once", "train.py", [
            *self.common, *self.sizes("teacher"), f"max_iters={c['teacher_iters']}", f"seed={seed}",
            f"warmup_iters={max(1, c['teacher_iters'] // 20)}"])
        self.paid_once[name] = done["seconds"]

    def cache(self, name, teachers):
        """One cache_teacher.py run over the students' windows; teachers: names of trained teachers."""
        c = self.cfg
        folder = os.path.join(self.out, name)
        done = self.stages.run(name, f"{name}: {' + '.join(teachers)} cached once", "cache_teacher.py", [
            "teacher=" + ",".join(self.runs[t] for t in teachers), f"dataset={c['dataset']}",
            f"block_size={c['block_size']}", f"top_k={c['top_k']}", f"windows={self.windows}", f"out={folder}",
            "overwrite=True", f"device={c['device']}", f"compile={c['compile']}"],
            os.path.join(folder, "meta.json"), after=teachers)
        self.paid_once[name] = done["seconds"]
        self.caches[name] = folder

    def ce_student(self, name, title, steps):
        self.train(name, title, "train.py", [*self.student, f"max_iters={steps}"])
        return trained_seconds(self.runs[name])

    def distilled_student(self, name, cache):
        c = self.cfg
        self.train(name, f"{name}: the same student, distilled from {cache}", "distill.py", [
            *self.student, f"max_iters={c['student_iters']}", f"teacher_cache={self.caches[cache]}",
            f"distill_type={c['distill_type']}", f"alpha={c['alpha']}", f"temperature={c['temperature']}",
            f"kd_loss={c['kd_loss']}"], after=[cache])
        return trained_seconds(self.runs[name])


def prepare(cfg):
    if cfg["dataset"]:
        return
    cfg["dataset"] = os.path.join("data", "shakespeare_char")
    stage("prepare: the embedded Shakespeare corpus, char-level")
    if cfg["force"] or not os.path.exists(os.path.join(cfg["dataset"], "meta.json")):
        subprocess.run([sys.executable, os.path.join(ROOT, "prepare", "shakespeare.py"),
                        f"out={cfg['dataset']}"], cwd=ROOT, check=True)
    else:
        print(f"reusing {cfg['dataset']}")


def evaluate_all(runs, dataset, block_size, device):
    """Exact loss and calibration over the whole val split for each run's final checkpoint, all
    over the same windows in one pass, and each student against the teacher: KL(teacher || student)
    per token and top-1 agreement. report() shows every column it knows that some run has."""
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
        results[name] = dict(params=r["params"], val_loss=r["loss"], val_ppl=r["ppl"], val_tokens=r["tokens"],
                             val_ece=r["ece"], steps=run_metrics(runs[name])[-1]["step"],
                             train_s=trained_seconds(runs[name]))
        against = ""
        if "kl" in r:
            results[name].update(kl_from_teacher=r["kl"], agreement=r["agreement"])
            against = f"  KL from teacher {r['kl']:.4f}  agreement {r['agreement']:.1%}"
        print(f"{name:>22}: val loss {r['loss']:.4f}  ppl {r['ppl']:.3f}  ECE {r['ece']:.4f}{against}  "
              f"({r['tokens']:,} tokens)")
    return results


def main(cfg):
    t0 = time.perf_counter()
    os.makedirs(cfg["out"], exist_ok=True)
    prepare(cfg)
    from data import BinDataset
    data = BinDataset(cfg["dataset"])  # fail now, with a clear message, not inside a stage
    held = data.windows_of(cfg["block_size"])
    demo = Demo(cfg, min(cfg["cache_windows"] or held, held))
    demo.teacher("teacher", cfg["seed"])
    demo.cache("cache", ["teacher"])
    ce_s = demo.ce_student("baseline", "baseline: the student trained alone (CE)", cfg["student_iters"])
    kd_s = demo.distilled_student("distilled", "cache")
    if cfg["equal_time"]:
        steps = max(1, round(cfg["student_iters"] * kd_s / ce_s))
        demo.ce_student("baseline_equal_time", f"baseline_equal_time: CE for the distilled student's "
                        f"{kd_s:.0f} s: {steps} steps", steps)
    if cfg["ensemble"]:
        demo.teacher("teacher_2", cfg["seed"] + 1)
        demo.cache("cache_2", ["teacher_2"])
        demo.cache("cache_both", ["teacher", "teacher_2"])
        demo.distilled_student("distilled_2", "cache_2")
        demo.distilled_student("distilled_both", "cache_both")
    stage("evaluate: whole val split")
    results = evaluate_all(demo.runs, cfg["dataset"], cfg["block_size"], cfg["device"])
    plot(demo.runs, [r for r in demo.runs if r.startswith("teacher")], os.path.join(cfg["out"], "val_loss.png"))
    report(cfg, results, demo, time.perf_counter() - t0)


if __name__ == "__main__":
    run(main, DEFAULTS, LIMITS)
