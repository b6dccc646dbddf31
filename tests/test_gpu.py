"""What only a CUDA machine exercises: bf16 autocast, fp16 with the GradScaler, compile, fused
AdamW, NCCL and bench.py on the GPU. `make gpu-check` runs these (pytest -m gpu); without CUDA
they skip, and `make test` runs everything else."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from checkpoint import load
from conftest import ROOT, TINY, read_metrics, run_script, step_losses

DEVICE = "cuda"
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

RUN = [*TINY, f"device={DEVICE}", "max_iters=40", "eval_interval=20", "final_eval=False"]


def learned(out_dir, steps=40):
    """Every step logged with a finite loss, and the last ones below the first ones."""
    losses = step_losses(out_dir)
    assert sorted(losses) == list(range(1, steps + 1)), sorted(losses)
    assert all(math.isfinite(v) for v in losses.values()), losses
    first, last = [losses[s] for s in (1, 2, 3)], [losses[s] for s in (steps - 2, steps - 1, steps)]
    assert max(last) < min(first) - 0.3, (first, last)
    return losses


@pytest.fixture(scope="module")
def teacher(char_data, tmp_path_factory):
    """A bf16 run on the GPU; it also serves as the distillation teacher."""
    out = tmp_path_factory.mktemp("gpu_teacher")
    p = run_script("train.py", *RUN, f"dataset={char_data}", f"out_dir={out}", "dtype=bfloat16")
    return str(out), p.stdout


def test_train_bf16_autocast(teacher):
    out, stdout = teacher
    assert f"{DEVICE} bfloat16" in stdout
    learned(out)
    assert load(out)["scaler"] == {}  # bf16 needs no loss scaling


def test_distill_bf16_autocast(char_data, teacher, tmp_path):
    out = tmp_path / "student"
    run_script("distill.py", *RUN, "n_layer=1", f"dataset={char_data}", f"teacher={teacher[0]}",
               f"out_dir={out}", "dtype=bfloat16", "distill_type=hybrid", "chunk_rows=32")
    learned(out)
    records = [r for r in read_metrics(out) if "soft" in r]
    assert records and all(r["soft"] > 0 and math.isfinite(r["hard"]) for r in records)


def test_fp16_with_grad_scaler(char_data, tmp_path):
    out = tmp_path / "fp16"
    p = run_script("train.py", *RUN, f"dataset={char_data}", f"out_dir={out}", "dtype=float16")
    assert "float16" in p.stdout
    learned(out)
    scaler = load(out)["scaler"]
    assert scaler["scale"] > 0 and scaler["_growth_tracker"] >= 0  # an enabled scaler's state


def test_compiled_train_and_distill(char_data, teacher, tmp_path):
    run_script("train.py", *RUN, f"dataset={char_data}", f"out_dir={tmp_path / 'ce'}", "dtype=bfloat16",
               "compile=True", timeout=900)
    learned(tmp_path / "ce")
    run_script("distill.py", *RUN, "n_layer=1", f"dataset={char_data}", f"teacher={teacher[0]}",
               f"out_dir={tmp_path / 'kd'}", "dtype=bfloat16", "compile=True", timeout=900)
    learned(tmp_path / "kd")


def test_fused_adamw_matches_the_reference_step():
    from model import GPT, GPTConfig
    from optim import make_optimizer
    from trainer import DEFAULTS
    torch.manual_seed(0)
    fused_model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=32, vocab_size=100)).to(DEVICE)
    plain_model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=32, vocab_size=100)).to(DEVICE)
    plain_model.load_state_dict(fused_model.state_dict())
    cfg = dict(DEFAULTS, weight_decay=0.0)  # one setting for every group, as the reference's
    fused = make_optimizer(fused_model, cfg, DEVICE)
    assert fused.defaults["fused"]
    plain = torch.optim.AdamW(plain_model.parameters(), lr=cfg["learning_rate"], weight_decay=0.0,
                              betas=(cfg["beta1"], cfg["beta2"]), foreach=False)
    idx = torch.randint(0, 100, (4, 32), device=DEVICE)
    for model, opt in ((fused_model, fused), (plain_model, plain)):
        for _ in range(3):
            model(idx, idx)[1].backward()
            opt.step()
            opt.zero_grad()
    want = dict(plain_model.named_parameters())
    for n, p in fused_model.named_parameters():
        torch.testing.assert_close(p, want[n], atol=1e-5, rtol=0)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_ddp_two_ranks(char_data, tmp_path):
    """2 NCCL ranks x 1 micro-step against 1 GPU x 2 micro-steps (float32; TF32 matmuls keep the
    two apart by more than on CPU)."""
    common = [*RUN, f"dataset={char_data}", "gradient_accumulation_steps=2", "dtype=float32"]
    run_script("train.py", *common, f"out_dir={tmp_path / 'one'}")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "train.py", *common, f"out_dir={tmp_path / 'two'}"], cwd=ROOT, capture_output=True,
                       text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "world size 2" in p.stdout
    one, two = learned(tmp_path / "one"), learned(tmp_path / "two")
    assert all(abs(one[s] - two[s]) < 1e-2 for s in one), (one, two)


def test_bench_on_the_gpu(tmp_path):
    out = tmp_path / "bench.json"
    run_script("bench.py", "n_layer=2", "n_head=2", "n_embd=64", "block_size=64", "batch_size=4",
               "teacher_n_layer=2", "teacher_n_head=2", "teacher_n_embd=64", "chunk_rows=32",
               "warmup=1", "repeats=2", "gen_tokens=16,", "prompt_len=4", f"device={DEVICE}", f"out={out}",
               timeout=900)
    res = json.loads(out.read_text())
    assert res["env"]["device"].startswith(DEVICE)
    assert res["env"]["dtype"] == ("bfloat16" if torch.cuda.is_bf16_supported() else "float16")
    assert res["peak_flops"] > 0 and res["train"]["ours"]["tokens_per_s"]["median"] > 0
    assert res["distill"]["distill_step"]["seconds"]["median"] > 0
    assert all(res["memory"][v]["step_bytes"] > 0 for v in ("ce", "chunked", "unchunked"))
    assert res["generate"]["decode"]["16"]["engine"]["median"] > 0
    assert res["generate"]["batch"]["engine"]["median"] > 0 and res["generate"]["bound_tokens_per_s"] > 0


def test_teacher_cache_on_the_gpu(char_data, teacher, tmp_path):
    """cache_teacher.py in bf16 autocast on CUDA caches what float32 on the CPU caches (to bf16
    rounding of the teacher's matmuls), and distill.py trains from it on the GPU."""
    import numpy as np

    from teacher_cache import TeacherCache
    common = [f"teacher={teacher[0]}", f"dataset={char_data}", "block_size=32", "top_k=8", "batch_size=64"]
    p = run_script("cache_teacher.py", *common, f"out={tmp_path / 'gpu'}", f"device={DEVICE}", timeout=900)
    assert "wrote" in p.stdout
    run_script("cache_teacher.py", *common, f"out={tmp_path / 'cpu'}", "device=cpu")
    gpu, cpu = TeacherCache(str(tmp_path / "gpu")), TeacherCache(str(tmp_path / "cpu"))
    windows = np.arange(0, gpu.windows, 97)
    (vg, ig), (vc, ic) = gpu.rows(windows), cpu.rows(windows)
    assert (ig[..., 0] == ic[..., 0]).float().mean() > 0.95
    assert (vg[..., 0].float() - vc[..., 0].float()).abs().mean() < 0.1
    out = tmp_path / "student"
    run_script("distill.py", *RUN, "n_layer=1", f"dataset={char_data}", f"teacher_cache={gpu.folder}",
               f"out_dir={out}", "dtype=bfloat16", "chunk_rows=32")
    learned(out)
    assert all(r["soft"] > 0 for r in read_metrics(out) if "soft" in r)
