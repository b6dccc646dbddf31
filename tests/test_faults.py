"""Faults: SIGKILL at random moments (train, distill, one DDP rank), SIGTERM/SIGINT, NaN steps.

A run killed and resumed any number of times must end bit for bit where an uninterrupted run ends,
every checkpoint on disk must load after every kill, and a dead DDP rank must stop the whole job.
Kill moments come from random.Random(seed) so a failure replays.
"""
import glob
import json
import os
import re
import signal
import subprocess
import sys
import time
from random import Random

import pytest
import torch

import checkpoint
import trainer
from configurator import UserError, load_config
from conftest import ROOT, TINY, read_metrics, run_script, step_losses
from data import BinDataset
from losses import ce_loss_fn
from runtime import Runtime

RUN = [*TINY, "eval_interval=2", "max_iters=40", "final_eval=False"]
STUDENT = ["n_layer=1", *TINY[1:], "distill_type=hybrid", "eval_interval=2", "max_iters=30",
           "final_eval=False"]
DDP = [*TINY, "eval_interval=2", "max_iters=12", "final_eval=False", "gradient_accumulation_steps=2"]
# unbuffered: the "model:" line tells the test that training (not start-up) is under way
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
DDP_HANG_LIMIT_S = 60


# ---------------------------------------------------------------- processes and run folders


class Proc:
    """A script started as a user would, output in files that the test polls while it runs."""

    def __init__(self, argv, log):
        self.log = log
        with open(log + ".out", "w") as out, open(log + ".err", "w") as err:
            self.p = subprocess.Popen(argv, cwd=ROOT, env=ENV, stdout=out, stderr=err,
                                      start_new_session=True)

    def stdout(self):
        with open(self.log + ".out") as f:
            return f.read()

    def tail(self):
        with open(self.log + ".err") as f:
            return self.stdout()[-2000:] + f.read()[-3000:]

    def training(self):
        return "\nmodel: " in self.stdout()

    def wait(self, timeout):
        try:
            return self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running after {timeout}s:\n{self.tail()}") from None

    def cleanup(self):
        """Whatever happened in the test, leave no process of this run behind (torchrun's workers
        share its session)."""
        try:
            os.killpg(self.p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.p.wait()


def script(name, *args):
    return [sys.executable, os.path.join(ROOT, name), *map(str, args)]


def torchrun(*args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "train.py", *map(str, args)]


def until(cond, proc, timeout=120, poll=0.005):
    """True once cond() holds, False if the process ended first."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        if proc.p.poll() is not None:
            return False
        if poll:
            time.sleep(poll)
    raise AssertionError(f"condition not reached in {timeout}s:\n{proc.tail()}")


def last_step(out_dir):
    """Highest step in metrics.jsonl (0 if none yet)."""
    try:
        with open(os.path.join(out_dir, "metrics.jsonl")) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return 0
    steps = [0]
    for line in lines:
        try:
            steps.append(json.loads(line)["step"])
        except ValueError:
            pass  # the line being appended right now
    return max(steps)


def tmp_files(out_dir):
    """Checkpoints being written: ckpt_<step>.pt.tmp -> identity, so a new write is told from one
    an earlier kill left behind."""
    found = {}
    for path in glob.glob(os.path.join(out_dir, "ckpt_*.pt.tmp")):
        try:
            st = os.stat(path)
        except FileNotFoundError:
            continue  # renamed while we looked
        found[path] = (st.st_ino, st.st_mtime_ns, st.st_size)
    return found


def check_checkpoints(out_dir):
    """No torn checkpoint: ckpt.pt loads whenever it exists and is the newest ckpt_<step>.pt, and
    every ckpt_<step>.pt loads. Returns the latest step or None."""
    if not os.path.exists(os.path.join(out_dir, "ckpt.pt")):
        return None
    step = checkpoint.load(out_dir)["step"]
    steps = sorted(glob.glob(os.path.join(out_dir, "ckpt_*.pt")))
    assert steps, os.listdir(out_dir)
    for path in steps:
        assert checkpoint.load(path)["step"] == checkpoint.step_of(path)
    assert os.path.samefile(os.path.join(out_dir, "ckpt.pt"), os.path.join(out_dir, f"ckpt_{step:08d}.pt"))
    return step


def final_state(out_dir):
    return step_losses(out_dir), checkpoint.load(out_dir)["model"]


def assert_same_run(got, want, atol=0.0):
    (lg, wg), (lw, ww) = got, want
    if atol == 0.0:
        assert lg == lw
        assert all(torch.equal(wg[k], ww[k]) for k in ww)
    else:
        assert sorted(lg) == sorted(lw)
        assert all(abs(lg[s] - lw[s]) <= atol for s in lw), [(s, lg[s], lw[s]) for s in lw]
        for k in ww:
            torch.testing.assert_close(wg[k], ww[k], atol=atol, rtol=0)


# ---------------------------------------------------------------- SIGKILL and resume


def kill_at(proc, mode, out_dir, rng, writing):
    """Wait for a moment of the given kind, then SIGKILL. startup: a random time after launch
    (imports, checkpoint load, metrics rewrite, or early training); steps: a random number of
    steps into training plus a random fraction of a step; write: as soon as a new
    ckpt_<step>.pt.tmp appears, i.e. while torch.save is writing it."""
    if mode == "startup":
        deadline = time.monotonic() + rng.uniform(0.2, 3.0)
        reached = until(lambda: time.monotonic() >= deadline, proc)
    elif mode == "steps":
        reached = until(proc.training, proc)
        if reached:
            target = last_step(out_dir) + rng.randint(1, 4)
            reached = until(lambda: last_step(out_dir) >= target, proc, poll=0.001)
            time.sleep(rng.uniform(0.0, 0.02))
    else:
        reached = until(lambda: tmp_files(out_dir).items() - writing.items(), proc, poll=0)
    if reached:
        os.kill(proc.p.pid, signal.SIGKILL)
    return proc.wait(60)


def run_with_kills(argv, out_dir, plan, seed, logs):
    """Run to completion, SIGKILLed at the moments of `plan`, restarting with init_from=resume
    (from scratch while no checkpoint exists). A 'write' kill that lands just after the rename
    is retried (at most twice). Returns (kills, kills that landed in the middle of a checkpoint write)."""
    rng, queue = Random(seed), list(plan)
    kills = torn = retries = 0
    for attempt in range(len(plan) + 10):
        if os.path.exists(os.path.join(out_dir, "ckpt.pt")):
            how = ["init_from=resume"]
        else:
            how = ["init_from=scratch"] + (["overwrite=True"] if attempt else [])
        writing = tmp_files(out_dir)
        proc = Proc(argv + how, os.path.join(logs, f"attempt{attempt}"))
        try:
            if not queue:
                rc = proc.wait(180)
                assert rc == 0, proc.tail()
                return kills, torn
            rc = kill_at(proc, queue[0], out_dir, rng, writing)
        finally:
            proc.cleanup()
        if rc == 0:
            return kills, torn  # finished before the planned moment came
        assert rc == -signal.SIGKILL, proc.tail()
        kills += 1
        tore = bool(tmp_files(out_dir).items() - writing.items())
        torn += tore
        if queue[0] != "write" or tore or retries == 2:
            queue.pop(0)
        else:
            retries += 1
        check_checkpoints(out_dir)
    raise AssertionError("the run never completed")


@pytest.fixture(scope="module")
def reference(char_data, tmp_path_factory):
    """An uninterrupted train.py run: (out_dir, (step losses, final weights)). Its model also
    serves as the distillation teacher."""
    out = tmp_path_factory.mktemp("straight")
    run_script("train.py", *RUN, f"dataset={char_data}", f"out_dir={out}")
    return str(out), final_state(out)


def test_train_killed_anywhere_resumes_bit_exact(char_data, reference, tmp_path):
    out, logs = tmp_path / "run", tmp_path / "logs"
    logs.mkdir()
    plan = ["steps", "write", "startup", "steps", "write", "steps"]
    kills, torn = run_with_kills(script("train.py", *RUN, f"dataset={char_data}", f"out_dir={out}"),
                                 str(out), plan, seed=0, logs=str(logs))
    print(f"\ntrain.py: survived {kills}/{kills} SIGKILLs, {torn} in the middle of a checkpoint write")
    assert kills >= len(plan) and torn >= 1
    assert_same_run(final_state(out), reference[1])


def test_distill_killed_anywhere_resumes_bit_exact(char_data, reference, tmp_path):
    argv = [*STUDENT, f"dataset={char_data}", f"teacher={reference[0]}"]
    straight = tmp_path / "straight"
    run_script("distill.py", *argv, f"out_dir={straight}")
    out, logs = tmp_path / "run", tmp_path / "logs"
    logs.mkdir()
    plan = ["write", "steps", "steps", "write"]
    kills, torn = run_with_kills(script("distill.py", *argv, f"out_dir={out}"), str(out), plan,
                                 seed=1, logs=str(logs))
    print(f"\ndistill.py: survived {kills}/{kills} SIGKILLs, {torn} in the middle of a checkpoint write")
    assert kills >= len(plan) and torn >= 1
    assert_same_run(final_state(out), final_state(straight))
    assert all("soft" in r for r in read_metrics(out) if "loss" in r and not r.get("skipped"))


# ---------------------------------------------------------------- dropout across a kill


DROPOUT = [*TINY, "eval_interval=10", "max_iters=200", "lr_decay_iters=200", "final_eval=False",
           "dropout=0.1"]


def kill_after_checkpoint(argv, out_dir, step, log):
    """SIGKILL a run once it has logged `step` and written a checkpoint (so a resume repeats the
    steps since that checkpoint)."""
    proc = Proc(argv, log)
    try:
        assert until(lambda: last_step(out_dir) >= step and os.path.exists(os.path.join(out_dir, "ckpt.pt")),
                     proc, poll=0.001), proc.tail()
        os.kill(proc.p.pid, signal.SIGKILL)
        assert proc.wait(60) == -signal.SIGKILL, proc.tail()
    finally:
        proc.cleanup()


@pytest.mark.parametrize("adapters", [False, True], ids=["dropout", "lora_dropout"])
def test_dropout_run_killed_resumes_bit_exact(char_data, reference, tmp_path, adapters):
    """Dropout masks after a resume are those the uninterrupted run drew: every step loss and
    weight equal, for the model's dropout and for LoRA's."""
    argv = [*DROPOUT, f"dataset={char_data}"]
    if adapters:
        argv += [f"init_from={reference[0]}", "lora_rank=4", "lora_dropout=0.2"]
    killed_run_resumes_bit_exact("train.py", argv, tmp_path, 15, 200)


def killed_run_resumes_bit_exact(name, argv, tmp_path, kill_at, steps):
    """Run `name` straight; run it again, kill -9 it after its kill_at-th checkpoint and resume it:
    equal step losses and weights. Returns the resumed run's out_dir."""
    straight, out = tmp_path / "straight", tmp_path / "run"
    run_script(name, *argv, f"out_dir={straight}")
    kill_after_checkpoint(script(name, *argv, f"out_dir={out}"), str(out), kill_at, str(tmp_path / "log"))
    assert 10 <= check_checkpoints(out) < steps
    run_script(name, *argv, f"out_dir={out}", "init_from=resume")
    assert_same_run(final_state(out), final_state(straight))
    return out


# ---------------------------------------------------------------- SIGTERM / SIGINT


def test_sigterm_and_sigint_checkpoint_now_and_resume_exactly(char_data, reference, tmp_path):
    out, argv = tmp_path / "run", script("train.py", *RUN, f"dataset={char_data}", f"out_dir={tmp_path / 'run'}")
    for n, (sig, how) in enumerate([(signal.SIGTERM, "init_from=scratch"), (signal.SIGINT, "init_from=resume")]):
        proc = Proc(argv + [how], str(tmp_path / f"log{n}"))
        try:
            assert until(proc.training, proc)
            target = last_step(out) + 5
            assert until(lambda: last_step(out) >= target, proc, poll=0.001)
            proc.p.send_signal(sig)
            assert proc.wait(60) == 0, proc.tail()
        finally:
            proc.cleanup()
        m = re.search(r"stopped by (\w+) at step (\d+)", proc.stdout())
        assert m and m.group(1) == sig.name, proc.tail()
        step = int(m.group(2))
        # the checkpoint holds the step the loop was on, the last one it logged
        assert check_checkpoints(out) == step == last_step(out) < 40
    run_script("train.py", *RUN, f"dataset={char_data}", f"out_dir={out}", "init_from=resume")
    assert_same_run(final_state(out), reference[1])


# ---------------------------------------------------------------- DDP: one rank dies


def workers(pid):
    """{RANK: pid} of the processes torchrun `pid` started."""
    ranks = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid != pid:
                continue
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
        except (OSError, IndexError, ValueError):
            continue  # exited while we looked
        if b"RANK" in env:
            ranks[int(env[b"RANK"])] = int(entry)
    return ranks


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_ddp_rank_killed_stops_job_and_resume_matches(char_data, tmp_path):
    common = [*DDP, f"dataset={char_data}"]
    straight, out = tmp_path / "straight", tmp_path / "run"
    p = subprocess.run(torchrun(*common, f"out_dir={straight}"), cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]

    rng = Random(2)
    proc = Proc(torchrun(*common, f"out_dir={out}"), str(tmp_path / "ddp"))
    try:
        target = rng.randint(3, 8)
        assert until(lambda: last_step(out) >= target and os.path.exists(out / "ckpt.pt"), proc, 240)
        ranks = workers(proc.p.pid)
        assert sorted(ranks) == [0, 1], ranks
        victim = rng.choice([0, 1])
        os.kill(ranks[victim], signal.SIGKILL)
        t0 = time.monotonic()
        rc = proc.wait(DDP_HANG_LIMIT_S)
        hang = time.monotonic() - t0
        survivors = [pid for pid in ranks.values() if alive(pid)]
    finally:
        proc.cleanup()
    print(f"\nDDP: rank {victim} SIGKILLed at step >= {target}; torchrun and the other rank exited "
          f"{hang:.1f}s later (limit {DDP_HANG_LIMIT_S}s)")
    assert rc != 0 and not survivors
    resumed_from = check_checkpoints(out)
    assert resumed_from is not None and resumed_from < 12

    p = subprocess.run(torchrun(*common, f"out_dir={out}", "init_from=resume"), cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert_same_run(final_state(out), final_state(straight), atol=1e-6)


def test_ddp_dropout_stopped_resumes_bit_exact(char_data, tmp_path):
    """SIGTERM to rank 1 alone: both ranks stop at the same step, rank 0 saves, and the resumed
    2-rank run with dropout ends bit for bit where the uninterrupted one does (each rank's masks
    depend on its rank, not on rank 0's RNG state in the checkpoint)."""
    common = [*TINY, f"dataset={char_data}", "eval_interval=10", "max_iters=60", "final_eval=False",
              "gradient_accumulation_steps=2", "dropout=0.1"]
    straight, out = tmp_path / "straight", tmp_path / "run"
    p = subprocess.run(torchrun(*common, f"out_dir={straight}"), cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    proc = Proc(torchrun(*common, f"out_dir={out}"), str(tmp_path / "ddp"))
    try:
        assert until(lambda: last_step(out) >= 5, proc, 240), proc.tail()
        os.kill(workers(proc.p.pid)[1], signal.SIGTERM)
        assert proc.wait(120) == 0, proc.tail()
    finally:
        proc.cleanup()
    m = re.search(r"stopped by a signal to another rank at step (\d+)", proc.stdout())
    assert m, proc.tail()
    assert check_checkpoints(out) == int(m.group(1)) < 60
    p = subprocess.run(torchrun(*common, f"out_dir={out}", "init_from=resume"), cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert_same_run(final_state(out), final_state(straight))


# ---------------------------------------------------------------- non-finite steps, in process


class NaNOn:
    """A loss_fn whose loss is NaN on the chosen calls (1-based; one call per step here). It also
    keeps the weights each call sees: states[s] = the weights after step s."""

    def __init__(self, loss_fn, bad):
        self.loss_fn, self.bad, self.calls, self.states = loss_fn, bad, 0, {}

    def __call__(self, model, x, y):
        self.states[self.calls] = {k: v.clone() for k, v in model.state_dict().items()}
        self.calls += 1
        loss, parts = self.loss_fn(model, x, y)
        if self.bad(self.calls):
            loss = loss * float("nan")  # still in the graph: backward gives NaN gradients
        return loss, parts


@pytest.fixture
def loop(char_data, tmp_path, monkeypatch):
    """(cfg, rt, data, model) of a tiny in-process run; signal handlers restored afterwards."""
    # the MFU ceiling is not under test here and costs seconds of matmuls per run
    monkeypatch.setattr(trainer, "measure_peak_flops", lambda *a, **k: 1e12)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}

    def build(*overrides):
        cfg = load_config(trainer.DEFAULTS, [*TINY, f"dataset={char_data}", f"out_dir={tmp_path / 'run'}",
                                             "final_eval=False", *overrides])
        rt = Runtime(cfg)
        data = BinDataset(cfg["dataset"])
        model, _ = trainer.init_model(cfg, data, rt)
        return cfg, rt, data, model

    yield build
    for s, h in handlers.items():
        signal.signal(s, h)


def same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def test_nan_steps_are_skipped_and_training_goes_on(loop):
    cfg, rt, data, model = loop("max_iters=12", "eval_interval=4")
    bad = {3, 7, 8}
    loss_fn = NaNOn(ce_loss_fn(data.vocab_size), lambda call: call in bad)
    trainer.train(cfg, model, data, loss_fn, rt)
    assert loss_fn.calls == 12
    states = dict(loss_fn.states)
    states[12] = model.state_dict()
    for s in range(1, 13):
        assert same(states[s], states[s - 1]) == (s in bad), s
    records = read_metrics(cfg["out_dir"])
    assert [r["step"] for r in records if r.get("skipped")] == sorted(bad)
    good = step_losses(cfg["out_dir"])
    assert all(torch.isfinite(torch.tensor(good[s])) for s in set(range(1, 13)) - bad)
    ck = checkpoint.load(cfg["out_dir"])
    assert ck["step"] == 12 and same(ck["model"], states[12])
    # AdamW's own step count saw only the applied updates
    assert all(int(st["step"]) == 12 - len(bad) for st in ck["optimizer"]["state"].values())


def test_nan_every_step_ends_run_after_max_bad_steps(loop):
    cfg, rt, data, model = loop("max_iters=40", "eval_interval=2", "max_bad_steps=3")
    loss_fn = NaNOn(ce_loss_fn(data.vocab_size), lambda call: call > 4)
    with pytest.raises(UserError, match=r"^4 non-finite steps in a row at step 8 ") as e:
        trainer.train(cfg, model, data, loss_fn, rt)
    assert "\n" not in str(e.value) and cfg["out_dir"] in str(e.value)
    assert loss_fn.calls == 4 + cfg["max_bad_steps"] + 1
    assert len([r for r in read_metrics(cfg["out_dir"]) if r.get("skipped")]) == 4
    ck = checkpoint.load(cfg["out_dir"])  # step 6 was saved mid-streak, holding step 4's weights
    assert ck["step"] == 6 and same(ck["model"], loss_fn.states[4])
    assert all(torch.isfinite(v).all() for v in ck["model"].values())


def test_signal_handlers_restored_after_train(loop):
    cfg, rt, data, model = loop("max_iters=2", "eval_interval=100")
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    trainer.train(cfg, model, data, ce_loss_fn(data.vocab_size), rt)
    assert {s: signal.getsignal(s) for s in before} == before


def test_resume_survives_torn_metrics_line(char_data, tmp_path):
    out = tmp_path / "run"
    common = [*TINY, f"dataset={char_data}", f"out_dir={out}", "eval_interval=2", "final_eval=False"]
    run_script("train.py", *common, "max_iters=4")
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 3.')
    p = run_script("train.py", *common, "max_iters=6", "init_from=resume", check=False)
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert sorted(step_losses(out)) == list(range(1, 7))
