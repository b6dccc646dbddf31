"""The shared loop through train.py: exact resume, DDP equivalence, checkpoints, bad input."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, TINY, read_metrics, run_script, step_losses
from checkpoint import load


def weights(out_dir):
    return load(out_dir)["model"]


def test_resume_is_bit_exact(char_data, tmp_path):
    a, b = tmp_path / "straight", tmp_path / "resumed"
    common = [*TINY, f"dataset={char_data}", "eval_interval=10", "lr_decay_iters=40"]
    run_script("train.py", *common, f"out_dir={a}", "max_iters=40")
    run_script("train.py", *common, f"out_dir={b}", "max_iters=20")
    run_script("train.py", *common, f"out_dir={b}", "max_iters=40", "init_from=resume")
    la, lb = step_losses(a), step_losses(b)
    assert sorted(la) == list(range(1, 41)) and la == lb
    wa, wb = weights(a), weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_from_checkpoint_with_rng_entry(char_data, tmp_path):
    """Older checkpoints carry the global RNG states and a data_step: they resume as well."""
    a, b = tmp_path / "straight", tmp_path / "old"
    common = [*TINY, f"dataset={char_data}", "eval_interval=4", "lr_decay_iters=8", "dropout=0.1"]
    run_script("train.py", *common, f"out_dir={a}", "max_iters=8")
    run_script("train.py", *common, f"out_dir={b}", "max_iters=4")
    ck = load(b)
    assert "rng" not in ck and "data_step" not in ck
    np_state = np.random.get_state()
    ck.update(data_step=4, rng=dict(python=[3, list(range(625)), None], torch=torch.get_rng_state(),
                                    numpy=[np_state[0], np_state[1].tolist(), *np_state[2:]]))
    torch.save(ck, os.path.realpath(b / "ckpt.pt"))
    run_script("train.py", *common, f"out_dir={b}", "max_iters=8", "init_from=resume")
    assert step_losses(a) == step_losses(b)
    wa, wb = weights(a), weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_checkpoints_kept_and_linked(char_data, tmp_path):
    out = tmp_path / "ck"
    run_script("train.py", *TINY, f"dataset={char_data}", f"out_dir={out}", "max_iters=12",
               "eval_interval=3", "keep_last=2")
    steps = sorted(f for f in os.listdir(out) if f.startswith("ckpt_"))
    assert steps == ["ckpt_00000009.pt", "ckpt_00000012.pt"]
    assert os.path.samefile(out / "ckpt.pt", out / "ckpt_00000012.pt")
    ck = load(out)
    assert ck["step"] == 12 and ck["config"]["max_iters"] == 12
    assert ck["config"]["device"] == ck["config"]["dtype"] == "auto"  # as the user gave them
    assert ck["tokenizer"]["tokenizer"] == "char"
    assert os.path.exists(out / "best.pt")


def test_ddp_matches_single_process(char_data, tmp_path):
    """2 ranks x 1 micro-step = 1 rank x 2 micro-steps, dropout masks included: like its rows, a
    micro-batch's masks depend on its place in the global batch, not on who computes it."""
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    common = [*TINY, f"dataset={char_data}", "max_iters=6", "eval_interval=100",
              "gradient_accumulation_steps=2", "final_eval=False", "dropout=0.1"]
    run_script("train.py", *common, f"out_dir={single}")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node=2", "train.py", *common, f"out_dir={ddp}"],
                       cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("model:") == 1  # only rank 0 speaks
    ls, ld = step_losses(single), step_losses(ddp)
    assert sorted(ld) == list(range(1, 7))
    for s in ls:
        assert abs(ls[s] - ld[s]) < 1e-5, (s, ls[s], ld[s])
    assert sorted(f for f in os.listdir(ddp) if f.startswith("ckpt_")) == ["ckpt_00000006.pt"]
    ws, wd = weights(single), weights(ddp)
    for k in ws:
        torch.testing.assert_close(ws[k], wd[k], atol=1e-5, rtol=0)


def test_learns_below_unigram_entropy(char_data, tmp_path):
    out = tmp_path / "learn"
    run_script("train.py", f"dataset={char_data}", f"out_dir={out}", "n_layer=2", "n_head=4",
               "n_embd=64", "block_size=64", "batch_size=16", "max_iters=150", "eval_interval=1000",
               "eval_iters=4", "learning_rate=3e-3", "warmup_iters=10", "min_lr=3e-4")
    counts = np.bincount(np.fromfile(os.path.join(char_data, "val.bin"), dtype=np.uint16))
    p = counts[counts > 0] / counts.sum()
    unigram = float(-(p * np.log(p)).sum())
    final = [r for r in read_metrics(out) if "final_val_loss" in r][0]["final_val_loss"]
    assert final < unigram - 0.4, (final, unigram)


BAD = [
    (["nonsense_key=3"], "unknown config key 'nonsense_key'"),
    (["max_iter=3"], "did you mean max_iters"),
    (["max_iters=fast"], "max_iters='fast' is a str, expected an int"),
    (["missing_config.py"], "config file not found"),
    (["dataset=/nonexistent/data"], "data folder not found"),
    (["block_size=100000"], "lower block_size"),
    (["train_windows=100000"], "train_windows=100000 exceeds the"),
    (["gradient_accumulation_steps=3", "decay=sideways"], "decay='sideways'"),
]


@pytest.mark.parametrize("args,message", BAD)
def test_bad_input_one_line(char_data, tmp_path, args, message):
    out = tmp_path / "bad"
    p = run_script("train.py", *TINY, f"dataset={char_data}", f"out_dir={out}", "max_iters=2",
                   *args, check=False)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], p.stderr
    assert not os.path.exists(out / "ckpt.pt")


def test_vocab_mismatch_and_overwrite_refused(char_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(char_data, data)
    out = tmp_path / "run"
    run_script("train.py", *TINY, f"dataset={data}", f"out_dir={out}", "max_iters=2")
    before = open(out / "ckpt.pt", "rb").read()
    p = run_script("train.py", *TINY, f"dataset={data}", f"out_dir={out}", "max_iters=2", check=False)
    assert p.returncode == 2 and "already holds a run's checkpoint" in p.stderr
    assert open(out / "ckpt.pt", "rb").read() == before
    meta = (data / "meta.json").read_text().replace('"vocab_size": ', '"vocab_size": 1')
    (data / "meta.json").write_text(meta)
    p = run_script("train.py", *TINY, f"dataset={data}", f"out_dir={out}", "init_from=resume",
                   "max_iters=4", check=False)
    assert p.returncode == 2 and "different vocab sizes" in p.stderr and len(p.stderr.strip().splitlines()) == 1
