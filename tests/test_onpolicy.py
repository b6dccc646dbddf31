"""On-policy distillation: the student's own rows (continue_rows, OnPolicyData), their loss weighed
per token against a float64 reference, per-part means over their own tokens, exact resume after a
SIGKILL, DDP equal to one process, prompts from JSONL, the own-samples KL, and bad input."""
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import engine
import evaluation
import trainer
from configurator import run
from conftest import ROOT, read_metrics, run_script
from data import BinDataset
from model import GPT, GPTConfig
from onpolicy import OnPolicyData, continue_rows, on_policy_loss_fn, read_prompts
from runtime import Runtime
from test_faults import assert_same_run, final_state, killed_run_resumes_bit_exact

STUDENT = ["n_layer=1", "n_head=2", "n_embd=32", "block_size=32", "batch_size=4", "eval_iters=2",
           "log_interval=1", "warmup_iters=3", "learning_rate=3e-3", "min_lr=3e-4", "final_eval=False",
           "on_policy=0.5", "prompt_len=8", "kd_loss=jsd", "alpha=0.3"]


@pytest.fixture(scope="module")
def teacher(char_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    run_script("train.py", f"dataset={char_data}", f"out_dir={out}", "n_layer=2", "n_head=2", "n_embd=32",
               "block_size=32", "batch_size=8", "max_iters=40", "eval_interval=1000", "eval_iters=2",
               "learning_rate=3e-3", "warmup_iters=5", "final_eval=False")
    return str(out)


def tiny(seed, block_size=16, vocab_size=20, n_layer=1):
    torch.manual_seed(seed)
    return GPT(GPTConfig(n_layer=n_layer, n_head=2, n_embd=16, block_size=block_size, vocab_size=vocab_size))


def gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


# ---------------------------------------------------------------- the student's rows


def test_continue_rows_layout_determinism_and_groups(monkeypatch):
    model = tiny(0)
    prompts = [[1, 2, 3], [4] * 9, [5, 6, 7, 8, 9], [10, 11, 12, 13, 14]]
    prefills = []
    real = engine._prefill
    monkeypatch.setattr(engine, "_prefill", lambda *a: prefills.append(a[-1]) or real(*a))
    x, y = continue_rows(model, prompts, 16, gens(range(4)))
    # T = the context: no spare column, so only the two 5-token prompts share a call, and nothing
    # slides (one prefill per call)
    assert len(prefills) == 3
    for i, p in enumerate(prompts):
        assert x[i, :len(p)].tolist() == p
        assert (y[i, :len(p) - 1] == -1).all() and y[i, -1] == -1
        assert torch.equal(y[i, len(p) - 1:-1], x[i, len(p):])
    again = continue_rows(model, prompts, 16, gens(range(4)))
    assert torch.equal(again[0], x) and torch.equal(again[1], y)
    # a row depends on its prompt and generator, not on the rows generated beside it
    for i, p in enumerate(prompts):
        alone = continue_rows(model, [p], 16, gens([i]))[0]
        assert torch.equal(alone[0], x[i])
    # with 7 spare positions all four share one call, and still no window slides
    prefills.clear()
    wide = tiny(0, block_size=22)
    continue_rows(wide, prompts, 16, gens(range(4)))
    assert len(prefills) == 1
    assert not torch.equal(continue_rows(model, prompts, 16, gens(range(4, 8)))[0], x)


def test_on_policy_data_rows_are_drawn_from_seed_step_and_place(char_data):
    data = BinDataset(char_data)
    rt = Runtime(dict(device="cpu", dtype="float32"))
    student = tiny(0, block_size=32, vocab_size=data.vocab_size)
    own = OnPolicyData(data, student, rows=3, prompt_len=8, prompts=None, temperature=1.0, rt=rt)
    x0, y0 = data.batch("train", 5, 32, 7, 4, 1, 2, 1)
    x, y, k = own.batch("train", 5, 32, 7, 4, 1, 2, 1)
    assert int(k) == 3 and torch.equal(x[3:], x0[3:]) and torch.equal(y[3:], y0[3:])
    assert torch.equal(x[:3, :8], x0[:3, :8]) and (y[:3, :7] == -1).all() and (y[:3, 7:-1] >= 0).all()
    again = own.batch("train", 5, 32, 7, 4, 1, 2, 1)
    assert torch.equal(again[0], x)
    # micro 0 of 2 ranks' rank 1 is micro 1 of one rank: the same rows, the same text
    assert torch.equal(own.batch("train", 5, 32, 7, 4, 0, 2, 1)[0], own.batch("train", 5, 32, 7, 4, 1, 1, 0)[0])
    assert not torch.equal(own.batch("train", 5, 32, 7, 5, 1, 2, 1)[0][:3, 8:], x[:3, 8:])
    assert len(own.batch("val", 5, 32, 7, 4, 0)) == 2  # evaluation sees the dataset alone
    assert own.vocab_size == data.vocab_size and own.tokens is data.tokens


def test_prompts_from_jsonl(char_data, tmp_path):
    data = BinDataset(char_data)
    path = tmp_path / "prompts.jsonl"
    texts = ["ORSINO:", "If music be the food of love", "VIOLA: What country"]
    path.write_text("".join(json.dumps(dict(prompt=t, id=i)) + "\n" for i, t in enumerate(texts)) + "\n")
    prompts = read_prompts(str(path), data.tokenizer, 32)
    chars = data.meta["chars"]
    assert ["".join(chars[i] for i in p) for p in prompts] == texts
    rt = Runtime(dict(device="cpu", dtype="float32"))
    own = OnPolicyData(data, tiny(0, 32, data.vocab_size), 4, 8, prompts, 1.0, rt)
    x, y, _ = own.batch("train", 6, 32, 3, 0, 0)
    starts = []
    for row, target in zip(x[:4].tolist(), y[:4].tolist()):
        p = next(p for p in prompts if row[:len(p)] == p)
        assert target[:len(p) - 1] == [-1] * (len(p) - 1) and target[len(p) - 1] == row[len(p)]
        starts.append(len(p))
    assert len(set(starts)) > 1  # prompts of different lengths in one batch


# ---------------------------------------------------------------- the loss


def reference_loss(s_logits, t_logits, y, k, alpha, kind, T, beta):
    """float64: (1 - alpha) * divergence * T^2 on every counted token, alpha * CE on rows k: only,
    averaged over all counted tokens; and the per-part means."""
    s, t = s_logits.double(), t_logits.double()
    ls, lt = (s / T).log_softmax(-1), (t / T).log_softmax(-1)
    ps, pt = ls.exp(), lt.exp()
    if kind == "forward_kl":
        div = (pt * (lt - ls)).sum(-1)
    elif kind == "reverse_kl":
        div = (ps * (ls - lt)).sum(-1)
    else:
        lm = (beta * pt + (1 - beta) * ps).log()
        div = beta * (pt * (lt - lm)).sum(-1) + (1 - beta) * (ps * (ls - lm)).sum(-1)
    div = div * T * T
    ce = -s.log_softmax(-1).gather(-1, y.clamp(min=0)[..., None])[..., 0]
    counted = (y >= 0).double()
    data_rows = torch.zeros_like(counted)
    data_rows[k:] = 1
    per_token = (1 - alpha) * div + alpha * ce * data_rows
    loss = (per_token * counted).sum() / counted.sum()
    mean = lambda v, w: float((v.detach() * w).sum() / w.sum())
    own = counted * (1 - data_rows)
    return loss, dict(soft_own=mean(div, own), soft=mean(div, counted * data_rows),
                      hard=mean(ce, counted * data_rows))


@pytest.mark.parametrize("kind,T,alpha,k,chunk", [
    ("reverse_kl", 1.0, 0.0, 2, 0), ("jsd", 2.0, 0.3, 1, 5), ("forward_kl", 1.5, 0.5, 3, 7),
    ("reverse_kl", 1.0, 0.4, 4, 0)])  # k = 4: every row the student's
def test_loss_weighs_every_counted_token_alike(kind, T, alpha, k, chunk):
    student, teacher = tiny(1, vocab_size=13), tiny(2, vocab_size=13, n_layer=2).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 13, (4, 10), generator=g)
    y = torch.randint(0, 13, (4, 10), generator=g)
    y[:k, :3] = -1  # prompts
    y[:, -1] = -1
    y[k:, 4] = -1  # a masked target on the dataset's rows
    loss_fn = on_policy_loss_fn(teacher, 13, alpha, kind, T, 0.4, chunk_rows=chunk)
    loss, parts = loss_fn(student, x, y, torch.tensor(k))
    loss.backward()
    got = {n: p.grad.clone() for n, p in student.named_parameters()}
    student.zero_grad()
    logits = student(x)[0][..., :13], teacher(x)[0][..., :13]
    want, want_parts = reference_loss(*logits, y, k, alpha, kind, T, 0.4)
    want.backward()
    assert loss.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-6)
    for n, p in student.named_parameters():
        torch.testing.assert_close(got[n], p.grad, atol=1e-5, rtol=1e-4)
    counts = dict(soft_own=int((y[:k] >= 0).sum()), soft=int((y[k:] >= 0).sum()), hard=int((y[k:] >= 0).sum()))
    assert set(parts) == ({"soft_own"} if k == 4 else set(counts))
    for name, (mean, n) in parts.items():
        assert n == counts[name] and float(mean) == pytest.approx(want_parts[name], rel=1e-5, abs=1e-6)


def test_parts_over_their_own_tokens_are_exact_means_over_the_step():
    """A (mean, n) part averages over its own n targets across micro-batches; a plain part over all."""
    rt = Runtime(dict(device="cpu", dtype="float32"))
    model = tiny(0)
    own = [(2.0, 3), (5.0, 1)]

    def loss_fn(m, x, y, i):
        mean, n = own[int(i)]
        return m(x)[0].mean(), dict(own=(torch.tensor(mean), n), plain=torch.tensor(float(i) + 1))

    x = torch.zeros(2, 4, dtype=torch.long)
    y0, y1 = torch.zeros(2, 4, dtype=torch.long), torch.tensor([[0, 0, 0, -1], [-1, -1, -1, -1]])
    batches = [(x, y0, 0, torch.tensor(0)), (x, y1, 1, torch.tensor(1))]  # 8 and 3 counted targets
    _, parts = trainer.forward_backward(model, loss_fn, batches, rt, torch.amp.GradScaler("cpu", enabled=False))
    state = SimpleNamespace(step=1, elapsed=lambda: 0.0)
    speed = SimpleNamespace(rates=lambda step: {})
    record = trainer.step_record(state, 0.0, parts, 0.0, 0.0, speed, rt)
    assert record["own"] == pytest.approx((2.0 * 3 + 5.0 * 1) / 4)
    assert record["plain"] == pytest.approx((1 * 8 + 2 * 3) / 11)


# ---------------------------------------------------------------- runs: kill and resume, DDP, prompts


def test_on_policy_run_killed_resumes_bit_exact(char_data, teacher, tmp_path):
    argv = [*STUDENT, f"dataset={char_data}", f"teacher={teacher}", "max_iters=40", "eval_interval=5"]
    out = killed_run_resumes_bit_exact("distill.py", argv, tmp_path, 12, 40)
    records = [r for r in read_metrics(out) if "loss" in r]
    assert len(records) == 40 and all(r["soft_own"] > 0 and r["hard"] > 0 for r in records)


def test_ddp_equals_one_process(char_data, teacher, tmp_path):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    common = [*STUDENT, f"dataset={char_data}", f"teacher={teacher}", "max_iters=4", "eval_interval=100",
              "gradient_accumulation_steps=2"]
    run_script("distill.py", *common, f"out_dir={single}")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "distill.py", *common, f"out_dir={ddp}"], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    one, two = read_metrics(single), read_metrics(ddp)
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3, 4, 4]
    for a, b in zip(one, two):
        for key in ("loss", "soft_own", "soft", "hard"):
            if key in a:
                assert abs(a[key] - b[key]) < 1e-5, (a["step"], key, a[key], b[key])
    assert_same_run(final_state(ddp), final_state(single), atol=1e-5)


def test_prompts_file_run_and_final_own_kl(char_data, teacher, tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps(dict(prompt=t)) for t in ["DUKE:", "O, when mine eyes", "CLOWN: Sir"]))
    run_script("distill.py", *STUDENT, f"dataset={char_data}", f"teacher={teacher}", f"prompts={path}",
               f"out_dir={tmp_path / 's'}", "max_iters=3", "eval_interval=100", "final_eval=True",
               "final_own_kl=6", "eval_iters=1")
    final = read_metrics(tmp_path / "s")[-1]
    assert final["final_own_tokens"] == 6 * (32 - 8)
    assert final["final_own_reverse_kl"] > 0 and final["final_own_forward_kl"] > 0
    assert all(r["soft_own"] > 0 for r in read_metrics(tmp_path / "s") if "loss" in r)


# ---------------------------------------------------------------- the own-samples KL


def test_own_samples_kl_is_exact_and_deterministic(char_data, monkeypatch):
    data = BinDataset(char_data)
    student, teacher = tiny(3, 32, data.vocab_size), tiny(4, 32, data.vocab_size, n_layer=2)
    val = data.tokens["val"]
    rows = []
    real = evaluation.continue_rows
    monkeypatch.setattr(evaluation, "continue_rows", lambda *a: rows.append(real(*a)) or rows[-1])
    got = evaluation.own_samples_kl(student, teacher, val, 5, 6, 32, seed=1, batch_size=2)
    assert len(rows) == 3 and got["tokens"] == 5 * 26
    x, y = torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows])
    V = data.vocab_size
    with torch.no_grad():
        ls = student(x)[0][..., :V].double().log_softmax(-1)
        lt = teacher(x)[0][..., :V].double().log_softmax(-1)
    m, sampled = y >= 0, y.clamp(min=0)[..., None]
    want = dict(reverse_kl=(ls.exp() * (ls - lt)).sum(-1)[m].mean(),
                forward_kl=(lt.exp() * (lt - ls)).sum(-1)[m].mean(),
                teacher_nll=-lt.gather(-1, sampled)[..., 0][m].mean(),
                student_nll=-ls.gather(-1, sampled)[..., 0][m].mean())
    for key, value in want.items():
        assert got[key] == pytest.approx(float(value), rel=1e-5), key
    starts = np.linspace(0, len(val) - 6, 5).astype(int)
    assert (x[:, :6].numpy() == np.stack([val[s:s + 6] for s in starts])).all()
    torch.manual_seed(123)  # the global RNG does not enter
    assert evaluation.own_samples_kl(student, teacher, val, 5, 6, 32, seed=1, batch_size=2) == got
    assert evaluation.own_samples_kl(student, teacher, val, 5, 6, 32, seed=2, batch_size=2) != got
    itself = evaluation.own_samples_kl(student, student, val, 5, 6, 32, seed=1)
    assert itself["reverse_kl"] == itself["forward_kl"] == 0.0
    assert itself["teacher_nll"] == itself["student_nll"] == pytest.approx(got["student_nll"], rel=1e-5)


# ---------------------------------------------------------------- bad input


LONG = '{"prompt": "%s"}' % ("a" * 40)


def bad_prompts(tmp, lines):
    path = tmp / "prompts.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    return f"prompts={path}"


BAD = {
    "above_one": (lambda tmp: ["on_policy=1.5"], "on_policy=1.5: must be in [0, 1]"),
    "negative": (lambda tmp: ["on_policy=-0.25"], "on_policy=-0.25: must be in [0, 1]"),
    "prompt_len_fills_the_context": (lambda tmp: ["prompt_len=32"],
                                     "prompt_len=32 leaves nothing of block_size=32"),
    "prompt_longer_than_context": (lambda tmp: [bad_prompts(tmp, ['{"prompt": "Hi"}', LONG])],
                                   "prompts.jsonl:2: the prompt is 40 tokens"),
    "prompt_as_long_as_context": (lambda tmp: [bad_prompts(tmp, [json.dumps(dict(prompt="a" * 32))])],
                                  "the prompt is 32 tokens"),
    "empty_prompt_file": (lambda tmp: [bad_prompts(tmp, [])], "holds no prompts"),
    "blank_prompt": (lambda tmp: [bad_prompts(tmp, ['{"prompt": "  "}'])], "prompts.jsonl:1: empty prompt"),
    "prompt_outside_the_vocabulary": (lambda tmp: [bad_prompts(tmp, ['{"prompt": "caf\\u00e9 \\u2603"}'])],
                                      "prompts.jsonl:1: character"),
    "missing_prompt_file": (lambda tmp: [f"prompts={tmp / 'none.jsonl'}"], "file not found"),
    "prompts_without_on_policy": (lambda tmp: ["on_policy=0.0", bad_prompts(tmp, ['{"prompt": "Hi"}'])],
                                  "set on_policy above 0"),
    "no_row": (lambda tmp: ["on_policy=0.1"], "on_policy=0.1 of batch_size=4 rows rounds to no row"),
    "output_distillation": (lambda tmp: ["distill_type=output"], "distill_type=output runs none"),
    "teacher_cache": (lambda tmp: [f"teacher_cache={tmp}"], "on_policy needs a live teacher"),
    "own_kl_from_cache": (lambda tmp: ["on_policy=0.0", "final_own_kl=4", f"teacher_cache={tmp}"],
                          "final_own_kl needs a live teacher"),
    "own_kl_without_final_eval": (lambda tmp: ["final_own_kl=4"], "final_own_kl is part of the final eval"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line(case, char_data, teacher, tmp_path, capsys):
    import distill
    args, message = BAD[case]
    out = tmp_path / "out"
    argv = [*STUDENT, f"dataset={char_data}", f"teacher={teacher}", f"out_dir={out}", "max_iters=2",
            *args(tmp_path)]
    with pytest.raises(SystemExit) as e:
        run(distill.main, distill.DEFAULTS, distill.LIMITS, argv=argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not out.exists()


def test_bad_input_from_the_command_line(char_data, teacher, tmp_path):
    p = run_script("distill.py", *STUDENT, f"dataset={char_data}", f"teacher={teacher}",
                   f"out_dir={tmp_path / 'out'}", bad_prompts(tmp_path, []), check=False)
    want = (f"error: prompts={tmp_path}/prompts.jsonl holds no prompts: write one JSON object with a "
            f"'prompt' per line")
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [want]
    assert not (tmp_path / "out").exists()
