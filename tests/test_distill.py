"""distill.py: the shared loop with a frozen teacher, exact resume, DDP, and a real gain over CE."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, make_char_dataset, read_metrics, run_script, step_losses
from checkpoint import load


@pytest.fixture(scope="module")
def teacher(char_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    run_script("train.py", f"dataset={char_data}", f"out_dir={out}", "n_layer=3", "n_head=4",
               "n_embd=64", "block_size=64", "batch_size=16", "max_iters=250", "eval_interval=1000",
               "eval_iters=2", "learning_rate=3e-3", "warmup_iters=10", "min_lr=3e-4", "final_eval=False")
    return str(out)


STUDENT = ["n_layer=1", "n_head=2", "n_embd=32", "block_size=64", "batch_size=8", "eval_iters=2",
           "log_interval=1", "warmup_iters=3", "learning_rate=3e-3", "min_lr=3e-4"]


def test_teacher_untouched(char_data, teacher, tmp_path):
    before = {k: v.clone() for k, v in load(teacher)["model"].items()}
    digest = open(os.path.join(teacher, "ckpt.pt"), "rb").read()
    run_script("distill.py", *STUDENT, f"dataset={char_data}", f"teacher={teacher}",
               f"out_dir={tmp_path / 's'}", "max_iters=5", "eval_interval=100")
    after = load(teacher)["model"]
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert open(os.path.join(teacher, "ckpt.pt"), "rb").read() == digest
    rec = [r for r in read_metrics(tmp_path / "s") if "soft" in r]
    assert len(rec) == 5 and all(r["soft"] > 0 and r["hard"] > 0 for r in rec)


def test_teacher_gets_no_gradient_and_alpha1_is_ce(char_data, teacher):
    from data import BinDataset
    from distill import DEFAULTS, load_teacher
    from losses import ce_loss_fn, kd_loss_fn
    from runtime import Runtime
    from model import GPT, GPTConfig
    cfg = dict(DEFAULTS, dataset=char_data, teacher=teacher, block_size=64, alpha=1.0, distill_type="hybrid")
    rt = Runtime(cfg)
    data = BinDataset(char_data)
    t = load_teacher(cfg, data, rt)
    torch.manual_seed(0)
    student = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=64, vocab_size=data.vocab_size))
    x, y = data.batch("train", 4, 64, 0, 0, 0)
    grads = []
    for fn in (kd_loss_fn(t, data.vocab_size, alpha=1.0), ce_loss_fn(data.vocab_size)):
        student.zero_grad()
        fn(student, x, y)[0].backward()
        grads.append([p.grad.clone() for p in student.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=0)
    assert all(p.grad is None and not p.requires_grad for p in t.parameters())


def test_resume_is_bit_exact(char_data, teacher, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    common = [*STUDENT, f"dataset={char_data}", f"teacher={teacher}", "eval_interval=5",
              "lr_decay_iters=20", "kd_loss=jsd", "chunk_rows=100"]
    run_script("distill.py", *common, f"out_dir={a}", "max_iters=20")
    run_script("distill.py", *common, f"out_dir={b}", "max_iters=10")
    run_script("distill.py", *common, f"out_dir={b}", "max_iters=20", "init_from=resume")
    la, lb = step_losses(a), step_losses(b)
    assert sorted(la) == list(range(1, 21)) and la == lb
    wa, wb = load(a)["model"], load(b)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_ddp_matches_single_process(char_data, teacher, tmp_path):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    common = [*STUDENT, f"dataset={char_data}", f"teacher={teacher}", "max_iters=4",
              "eval_interval=100", "gradient_accumulation_steps=2", "final_eval=False"]
    run_script("distill.py", *common, f"out_dir={single}")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node=2", "distill.py", *common, f"out_dir={ddp}"],
                       cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    ls, ld = step_losses(single), step_losses(ddp)
    assert sorted(ld) == [1, 2, 3, 4]
    for s in ls:
        assert abs(ls[s] - ld[s]) < 1e-5, (s, ls[s], ld[s])


def test_teacher_layers_copy_and_width_mismatch(char_data, teacher, tmp_path):
    out = tmp_path / "tl"
    p = run_script("distill.py", *STUDENT, "n_layer=2", "n_embd=64", "n_head=4", f"dataset={char_data}",
                   f"teacher={teacher}", f"out_dir={out}", "max_iters=0", "student_init=teacher_layers",
                   "eval_interval=100")  # no step: the checkpoint holds the copied weights
    assert "teacher blocks [0, 2]" in p.stdout
    s, t = load(out)["model"], load(teacher)["model"]
    assert torch.equal(s["transformer.h.1.mlp.c_fc.weight"], t["transformer.h.2.mlp.c_fc.weight"])
    assert torch.equal(s["transformer.ln_f.weight"], t["transformer.ln_f.weight"])
    p = run_script("distill.py", *STUDENT, f"dataset={char_data}", f"teacher={teacher}",
                   f"out_dir={tmp_path / 'bad'}", "max_iters=1", "student_init=teacher_layers", check=False)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1
    assert "needs the teacher's width" in p.stderr


def test_tokenizer_mismatch(char_data, teacher, tmp_path):
    other = make_char_dataset(str(tmp_path / "other"), "abcdefgh " * 500)
    p = run_script("distill.py", *STUDENT, f"dataset={other}", f"teacher={teacher}",
                   f"out_dir={tmp_path / 'x'}", "max_iters=1", check=False)
    assert p.returncode == 2 and "must share one tokenizer" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    p = run_script("distill.py", *STUDENT, f"dataset={char_data}", f"teacher={tmp_path / 'nope'}",
                   f"out_dir={tmp_path / 'y'}", "max_iters=1", check=False)
    assert p.returncode == 2 and "not found" in p.stderr


def test_train_windows_reach_a_live_teacher_run(char_data, teacher, tmp_path):
    """train_windows bounds the rows of every distillation, not only a cached one's."""
    p = run_script("distill.py", *STUDENT, f"dataset={char_data}", f"teacher={teacher}", "train_windows=100000",
                   f"out_dir={tmp_path / 'x'}", "max_iters=1", check=False)
    assert p.returncode == 2 and "train_windows=100000 exceeds the" in p.stderr
    assert not (tmp_path / "x").exists()


def test_distilled_beats_ce_baseline(char_data, teacher, tmp_path):
    common = [*STUDENT, f"dataset={char_data}", "max_iters=120", "eval_interval=1000", "log_interval=20",
              "batch_size=16", "seed=7"]
    run_script("train.py", *common, f"out_dir={tmp_path / 'ce'}")
    run_script("distill.py", *common, f"teacher={teacher}", f"out_dir={tmp_path / 'kd'}",
               "alpha=0.2", "temperature=1.0")
    final = lambda d: [r for r in read_metrics(d) if "final_val_loss" in r][0]["final_val_loss"]
    ce, kd = final(tmp_path / "ce"), final(tmp_path / "kd")
    assert kd < ce - 0.02, (kd, ce)
