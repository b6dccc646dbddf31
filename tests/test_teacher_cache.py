"""cache_teacher.py and distill.py teacher_cache=: a real teacher checkpoint cached on disk, the
exactness of top_k=0 against online distillation, kill -9 and torchrun writing byte-identical
caches, ensembles, the refusals, and exact resume and DDP of a cached distillation."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from random import Random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import checkpoint
from conftest import ROOT, make_char_dataset, read_metrics, run_script, step_losses
from data import BinDataset
from losses import KINDS, cached_kd_loss_fn, kd_loss_fn
from model import GPT, GPTConfig
from teacher_cache import CachedDataset, TeacherCache, parse_teachers

T = 32
STUDENT = ["n_layer=1", "n_head=2", "n_embd=32", f"block_size={T}", "batch_size=8", "eval_iters=2",
           "log_interval=1", "warmup_iters=3", "learning_rate=3e-3", "min_lr=3e-4"]
ENV = dict(os.environ, OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def data(char_data, tmp_path_factory):
    """A third of the play: enough windows for hundreds of blocks, few enough to cache in seconds."""
    text = "".join(BinDataset(char_data).meta["chars"][i] for i in np.fromfile(
        os.path.join(char_data, "train.bin"), dtype=np.uint16)[:40000])
    return make_char_dataset(str(tmp_path_factory.mktemp("cache_data") / "d"), text)


def train_teacher(data, out, *args):
    run_script("train.py", f"dataset={data}", f"out_dir={out}", "n_head=2", "block_size=64",
               "batch_size=8", "eval_interval=1000", "eval_iters=1", "learning_rate=3e-3",
               "warmup_iters=5", "final_eval=False", *args)
    return str(out)


@pytest.fixture(scope="module")
def teachers(data, tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    return (train_teacher(data, root / "a", "n_layer=2", "n_embd=48", "max_iters=60"),
            train_teacher(data, root / "b", "n_layer=1", "n_embd=32", "max_iters=30", "seed=5"))


def cache(data, teacher, out, *args, check=True):
    return run_script("cache_teacher.py", f"teacher={teacher}", f"dataset={data}", f"block_size={T}",
                      f"out={out}", *args, check=check)


@pytest.fixture(scope="module")
def full_cache(data, teachers, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("caches") / "full")
    cache(data, teachers[0], out, "top_k=0", "cache_dtype=float32")
    return out


@pytest.fixture(scope="module")
def topk_cache(data, teachers, tmp_path_factory):
    """The reference for the byte-identity tests: top-8, float16, 2 windows a block."""
    out = str(tmp_path_factory.mktemp("caches") / "top8")
    cache(data, teachers[0], out, "top_k=8", "batch_size=2")
    return out


def teacher_log_probs(source, x, V):
    model, _, _ = checkpoint.load_model(source)
    with torch.no_grad():
        return F.log_softmax(model(x)[0][..., :V].double(), -1)


def read(folder, name):
    with open(os.path.join(folder, name), "rb") as f:
        return f.read()


def assert_same_files(a, b):
    names = sorted(os.listdir(a))
    assert names == sorted(os.listdir(b)) == ["ids.bin", "logp.bin", "meta.json"]
    for name in names:
        assert read(a, name) == read(b, name), name


# ---------------------------------------------------------------- what is cached


def test_topk_cache_holds_the_teachers_top_k_and_rest(data, teachers, topk_cache):
    c = TeacherCache(topk_cache)
    meta = c.meta
    assert meta["top_k"] == 8 and meta["windows"] == (36000 - 1) // T and meta["bytes_per_token"] == 9 * 2 + 8 * 2
    tokens = BinDataset(data).tokens["train"]
    windows = np.array([0, 5, c.windows - 1])
    x = torch.from_numpy(np.stack([tokens[i * T:(i + 1) * T] for i in windows]).astype(np.int64))
    values, ids = c.rows(windows)
    assert values.dtype == torch.float16 and ids.shape == (3, T, 8)
    ref = teacher_log_probs(teachers[0], x, meta["vocab_size"])
    top = ref.gather(-1, ids)
    assert torch.allclose(values[..., :8].double(), top, atol=5e-3, rtol=2e-3)
    # the ids are the top 8 (up to float16 ties) in descending order
    eighth = ref.topk(8, -1).values[..., -1:]
    assert (top >= eighth - 1e-3).all() and (values[..., :8].diff(dim=-1) <= 0).all()
    rest = torch.log1p(-top.exp().sum(-1))
    assert torch.allclose(values[..., 8].double(), rest, atol=5e-3, rtol=2e-3)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("alpha", [0.0, 0.4])  # logit and hybrid
def test_full_float32_cache_equals_online_distillation(data, teachers, full_cache, kind, temperature, alpha):
    """top_k=0 in float32: the loss, its parts and the student's gradient equal online
    distillation from the same teacher to 1e-5, masked targets included."""
    ds = CachedDataset(data, TeacherCache(full_cache))
    x, y, cached = ds.batch("train", 4, T, seed=3, step=7, micro=0)
    y[0, :5] = -1
    V = ds.vocab_size
    teacher, _, _ = checkpoint.load_model(teachers[0])
    teacher.eval().requires_grad_(False)
    torch.manual_seed(0)
    student = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=T, vocab_size=V))
    kw = dict(kind=kind, temperature=temperature, jsd_beta=0.3, label_smoothing=0.1, chunk_rows=40)
    online = kd_loss_fn(teacher, V, alpha, **kw)(student, x, y)
    online[0].backward()
    grads = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()
    cached_out = cached_kd_loss_fn(V, alpha, **kw)(student, x, y, cached)
    cached_out[0].backward()
    assert abs(cached_out[0].item() - online[0].item()) < 1e-5 and online[1]["soft"] > 0.01
    for part in ("hard", "soft"):
        assert abs(cached_out[1][part].item() - online[1][part].item()) < 1e-5
    for p, g in zip(student.parameters(), grads):
        torch.testing.assert_close(p.grad, g, atol=1e-5, rtol=0)
    assert max(g.abs().max() for g in grads) > 1e-3


def test_ensemble_caches_the_weighted_mixture(data, teachers, tmp_path):
    out = tmp_path / "mix"
    cache(data, f"{teachers[0]},{teachers[1]},3,1", out, "top_k=0", "cache_dtype=float32")
    c = TeacherCache(str(out))
    assert c.meta["teacher"]["weights"] == [0.75, 0.25] and len(c.meta["teacher"]["sha256"]) == 2
    windows = np.array([2, 40])
    tokens = BinDataset(data).tokens["train"]
    x = torch.from_numpy(np.stack([tokens[i * T:(i + 1) * T] for i in windows]).astype(np.int64))
    V = c.meta["vocab_size"]
    mixture = 0.75 * teacher_log_probs(teachers[0], x, V).exp() + 0.25 * teacher_log_probs(teachers[1], x, V).exp()
    got = c.rows(windows)[0].double().exp()
    torch.testing.assert_close(got, mixture, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got.sum(-1), torch.ones(2, T, dtype=torch.float64), atol=1e-6, rtol=0)
    assert parse_teachers("a,b") == (["a", "b"], [0.5, 0.5])
    assert parse_teachers("a, b, 0.7, 0.3")[1] == pytest.approx([0.7, 0.3])


def test_partial_cache_and_a_ce_run_draw_the_same_windows(data, teachers, topk_cache, tmp_path):
    """windows=N caches the first N windows, byte for byte the whole cache's first rows; a CE run
    with train_windows=N draws, step for step, the very rows a distillation from it draws."""
    out = tmp_path / "first10"
    cache(data, teachers[0], out, "top_k=8", "batch_size=2", "windows=10")
    part, whole = TeacherCache(str(out)), TeacherCache(topk_cache)
    assert part.windows == 10 < whole.windows and part.meta["id"] != whole.meta["id"]
    for name, row_bytes in (("logp.bin", 9 * 2), ("ids.bin", 8 * 2)):
        assert read(out, name) == read(topk_cache, name)[:10 * T * row_bytes]
    tokens = BinDataset(data).tokens["train"]
    first = np.stack([tokens[i * T:(i + 1) * T] for i in range(10)])
    plain, seen = BinDataset(data, train_windows=10), set()
    for cached in (CachedDataset(data, part), CachedDataset(data, whole, train_windows=10)):
        for step in range(4):
            x, y, values, ids = cached.batch("train", 8, T, seed=5, step=step, micro=0)
            px, py = plain.batch("train", 8, T, 5, step, 0)
            assert torch.equal(x, px) and torch.equal(y, py)
            for row in x.numpy():
                match = np.flatnonzero((first == row).all(1))  # one of the first 10 windows
                assert len(match) == 1
                seen.add(int(match[0]))
    assert len(seen) > 3


# ---------------------------------------------------------------- killed, resumed, several ranks


def test_killed_cache_finishes_byte_identical(data, teachers, topk_cache, tmp_path):
    out = str(tmp_path / "killed")
    argv = [sys.executable, os.path.join(ROOT, "cache_teacher.py"), f"teacher={teachers[0]}",
            f"dataset={data}", f"block_size={T}", f"out={out}", "top_k=8", "batch_size=2"]
    blocks = -(-TeacherCache(topk_cache).windows // 2)
    rng = Random(0)
    for target in sorted(rng.uniform(0.1, 0.8) for _ in range(2)):
        p = subprocess.Popen(argv, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             start_new_session=True)
        try:
            while p.poll() is None:
                try:
                    if np.frombuffer(read(out, "progress.bin"), np.uint8).sum() >= target * blocks:
                        break
                except FileNotFoundError:
                    pass
                time.sleep(0.002)
            assert p.poll() is None, f"finished before the kill: {p.stderr.read()[-2000:]}"
            os.killpg(p.pid, signal.SIGKILL)
        finally:
            p.wait()
        assert not json.loads(read(out, "meta.json"))["complete"]
        refused = run_script("distill.py", *STUDENT, f"dataset={data}", f"teacher_cache={out}",
                             f"out_dir={tmp_path / 's'}", check=False)
        assert refused.returncode == 2 and "incomplete" in refused.stderr
    rerun = cache(data, teachers[0], out, "top_k=8", "batch_size=2")
    assert "resuming" in rerun.stdout
    assert_same_files(out, topk_cache)
    again = cache(data, teachers[0], out, "top_k=8", "batch_size=2")
    assert "already holds this cache" in again.stdout


def torchrun(script, *args):
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        script, *map(str, args)], cwd=ROOT, capture_output=True, text=True, env=ENV,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def test_two_ranks_write_the_single_process_cache(data, teachers, topk_cache, tmp_path):
    out = tmp_path / "ddp"
    torchrun("cache_teacher.py", f"teacher={teachers[0]}", f"dataset={data}", f"block_size={T}",
             f"out={out}", "top_k=8", "batch_size=2")
    assert_same_files(str(out), topk_cache)


# ---------------------------------------------------------------- distilling from a cache


def test_cached_distillation_resumes_bit_exact_and_learns(data, topk_cache, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    common = [*STUDENT, f"dataset={data}", f"teacher_cache={topk_cache}", "eval_interval=5",
              "lr_decay_iters=20", "kd_loss=reverse_kl", "temperature=2.0", "chunk_rows=100"]
    run_script("distill.py", *common, f"out_dir={a}", "max_iters=20")
    run_script("distill.py", *common, f"out_dir={b}", "max_iters=10")
    run_script("distill.py", *common, f"out_dir={b}", "max_iters=20", "init_from=resume")
    la, lb = step_losses(a), step_losses(b)
    assert sorted(la) == list(range(1, 21)) and la == lb
    wa, wb = checkpoint.load(a)["model"], checkpoint.load(b)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    soft = [r["soft"] for r in read_metrics(a) if "soft" in r]
    assert all(s > 0 for s in soft) and np.mean(soft[-5:]) < np.mean(soft[:5])


def test_cached_distillation_under_ddp_matches_single_process(data, topk_cache, tmp_path):
    common = [*STUDENT, f"dataset={data}", f"teacher_cache={topk_cache}", "max_iters=4",
              "eval_interval=100", "gradient_accumulation_steps=2", "final_eval=False"]
    run_script("distill.py", *common, f"out_dir={tmp_path / 'single'}")
    torchrun("distill.py", *common, f"out_dir={tmp_path / 'ddp'}")
    ls, ld = step_losses(tmp_path / "single"), step_losses(tmp_path / "ddp")
    assert sorted(ld) == [1, 2, 3, 4]
    for s in ls:
        assert abs(ls[s] - ld[s]) < 1e-5, (s, ls[s], ld[s])


# ---------------------------------------------------------------- refusals


def other_teacher(teachers, tmp_path):
    """The teacher with one weight changed: same architecture and tokenizer, other identity."""
    ckpt = checkpoint.load(teachers[0])
    ckpt["model"]["transformer.ln_f.weight"] += 0.01
    checkpoint.save(ckpt, str(tmp_path / "other_teacher"), ckpt["step"])
    return tmp_path / "other_teacher"


def other_data(data, tmp_path):
    """The same tokenizer and size, other text: two tokens swapped."""
    out = tmp_path / "other_data"
    shutil.copytree(data, out)
    tokens = np.fromfile(out / "train.bin", dtype=np.uint16)
    tokens[[10, 11]] = tokens[[11, 10]] if tokens[10] != tokens[11] else (tokens[10] + 1, tokens[11])
    tokens.tofile(out / "train.bin")
    return out


def damaged(topk_cache, tmp_path, how):
    out = tmp_path / "damaged"
    shutil.copytree(topk_cache, out)
    if how == "truncated":
        with open(out / "logp.bin", "r+b") as f:
            f.truncate(os.path.getsize(out / "logp.bin") - 2)
    elif how == "incomplete":
        meta = json.loads((out / "meta.json").read_text())
        (out / "meta.json").write_text(json.dumps(dict(meta, complete=False)))
    elif how == "no meta":
        os.remove(out / "meta.json")
    return out


REFUSED = {
    "teacher": (lambda c, d, t, tmp: [f"teacher_cache={c}", f"teacher={other_teacher(t, tmp)}"],
                "has other weights"),
    "dataset": (lambda c, d, t, tmp: [f"teacher_cache={c}", f"dataset={other_data(d, tmp)}"],
                "differs from dataset="),
    "tokenizer": (lambda c, d, t, tmp: [f"teacher_cache={c}", "dataset=" + make_char_dataset(
        str(tmp / "abc"), "abcdefgh " * 500)], "uses the char tokenizer (9 characters): different vocab sizes; distill from a cache written"),
    "context": (lambda c, d, t, tmp: [f"teacher_cache={c}", "block_size=16"], "block_size=32, not 16"),
    "truncated": (lambda c, d, t, tmp: [f"teacher_cache={damaged(c, tmp, 'truncated')}"], "truncated"),
    "incomplete": (lambda c, d, t, tmp: [f"teacher_cache={damaged(c, tmp, 'incomplete')}"], "incomplete"),
    "no meta": (lambda c, d, t, tmp: [f"teacher_cache={damaged(c, tmp, 'no meta')}"], "has no meta.json"),
    "missing": (lambda c, d, t, tmp: [f"teacher_cache={tmp / 'nothing'}"], "not found"),
    "output mode": (lambda c, d, t, tmp: [f"teacher_cache={c}", "distill_type=output"], "distill_type=logit"),
    "more windows": (lambda c, d, t, tmp: [f"teacher_cache={c}", "train_windows=5000"],
                     "train_windows=5000 exceeds the 1124 windows"),
}


@pytest.mark.parametrize("case", REFUSED.values(), ids=REFUSED.keys())
def test_mismatched_cache_refused_in_one_line(data, teachers, topk_cache, tmp_path, case):
    make, message = case
    before = {n: read(topk_cache, n) for n in os.listdir(topk_cache)}
    out = tmp_path / "student"
    p = run_script("distill.py", *STUDENT, f"dataset={data}", *make(topk_cache, data, teachers, tmp_path),
                   f"out_dir={out}", "max_iters=2", check=False)
    assert p.returncode == 2 and message in p.stderr, p.stderr[-2000:]
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert not out.exists()
    assert {n: read(topk_cache, n) for n in os.listdir(topk_cache)} == before


def test_cache_teacher_refusals(data, teachers, topk_cache, tmp_path):
    abc = make_char_dataset(str(tmp_path / "abc"), "abcdefgh " * 500)
    stranger = train_teacher(abc, tmp_path / "stranger", "n_layer=1", "n_embd=16", "max_iters=2")
    cases = [
        ([f"teacher={teachers[0]},{stranger}", f"out={tmp_path / 'x'}"], "must share the data's tokenizer"),
        ([f"teacher={teachers[0]},{teachers[1]},1", f"out={tmp_path / 'x'}"], "one positive weight per teacher"),
        ([f"teacher={teachers[0]}", f"out={topk_cache}", "top_k=4", "batch_size=2"],
         "holds a cache of other settings (top_k: 8 (now 4))"),
        ([f"teacher={teachers[0]}", f"out={teachers[1]}"], "not a teacher cache"),
        ([f"teacher={teachers[0]}", "top_k=70", f"out={tmp_path / 'x'}"], "must be below the vocabulary"),
        ([f"teacher={teachers[0]}", "windows=1125", f"out={tmp_path / 'x'}"], "windows=1125 exceeds the 1124"),
    ]
    before = {n: read(topk_cache, n) for n in os.listdir(topk_cache)}
    for args, message in cases:
        p = run_script("cache_teacher.py", f"dataset={data}", f"block_size={T}", *args, check=False)
        assert p.returncode == 2 and message in p.stderr, (args, p.stderr[-2000:])
        assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert not (tmp_path / "x").exists()
    assert {n: read(topk_cache, n) for n in os.listdir(topk_cache)} == before
