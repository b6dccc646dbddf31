"""Teacher-written data end to end: prompts -> teacher JSONL -> masked dataset -> distilled student."""
import json

import numpy as np
import torch

from checkpoint import load, save
from conftest import read_metrics, run_script
from model import GPT, GPTConfig


def test_prompts_to_distilled_student(tmp_path):
    torch.manual_seed(0)
    teacher = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=64, vocab_size=50257, pad_vocab_to=1))
    save(dict(model=teacher.state_dict(), model_args=teacher.config.to_dict(), config={}, step=0,
              best_val_loss=float("inf"), tokenizer={"tokenizer": "gpt2", "vocab_size": 50257}),
         str(tmp_path / "teacher"), 0)
    words = ["the king", "a rose", "my lord", "good night", "fair lady", "the sea", "sweet love", "o time"]
    (tmp_path / "prompts.txt").write_text("\n".join(f"{w} {i}" for i in range(5) for w in words))
    run_script("sample.py", f"source={tmp_path / 'teacher'}", f"prompts={tmp_path / 'prompts.txt'}",
               f"out={tmp_path / 'teacher.jsonl'}", "num_samples=1", "max_new_tokens=12", "top_k=50")
    records = [json.loads(line) for line in (tmp_path / "teacher.jsonl").read_text().splitlines()]
    assert len(records) == 40 and all(r["prompt"] and "response" in r for r in records)
    # the sampler may emit end-of-text at once: keep records with a response, as a user would
    good = [r for r in records if r["response"].strip()]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in good) + "not json\n")
    p = run_script("prepare/jsonl.py", f"input={tmp_path / 'pairs.jsonl'}", f"out={tmp_path / 'data'}",
                   "num_proc=1")
    assert "not JSON" in p.stderr  # the broken line is reported, not silently dropped
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    assert meta["has_mask"] and meta["tokenizer"] == "gpt2"
    mask = np.fromfile(tmp_path / "data" / "train.mask.bin", dtype=np.uint8)
    assert 0 < mask.mean() < 1
    common = [f"dataset={tmp_path / 'data'}", "n_layer=1", "n_head=2", "n_embd=32", "block_size=16",
              "batch_size=4", "max_iters=4", "eval_iters=1", "log_interval=1", "eval_interval=100"]
    run_script("distill.py", *common, "distill_type=output", f"out_dir={tmp_path / 'out_student'}")
    ck = load(tmp_path / "out_student")
    assert ck["step"] == 4 and ck["tokenizer"]["tokenizer"] == "gpt2"
    # hybrid on the same data adds the teacher's distributions over the responses only
    run_script("distill.py", *common, "distill_type=hybrid", f"teacher={tmp_path / 'teacher'}",
               f"out_dir={tmp_path / 'hybrid_student'}")
    soft = [r["soft"] for r in read_metrics(tmp_path / "hybrid_student") if "soft" in r]
    assert len(soft) == 4 and all(s > 0 for s in soft)
