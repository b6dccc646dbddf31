"""evaluate.py: every token scored once, equal to brute force, and the CLI on our and HF models."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from checkpoint import save
from conftest import run_script
from evaluate import evaluate_model
from model import GPT, GPTConfig


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=40)).eval()


TOKENS = np.random.default_rng(0).integers(0, 40, size=203)


def brute_force(model, tokens, context):
    """Each target predicted from the longest history the context allows, one forward per target."""
    nll = []
    for t in range(len(tokens) - 1):
        ctx = torch.tensor(tokens[max(0, t + 1 - context):t + 1])[None]
        with torch.no_grad():
            logp = F.log_softmax(model(ctx)[0][0, -1, :40], -1)
        nll.append(-logp[tokens[t + 1]].item())
    return np.array(nll)


def test_stride_one_equals_brute_force(tiny):
    r = evaluate_model(tiny, TOKENS, 16, 1, 8, "cpu")
    ref = brute_force(tiny, TOKENS, 16)
    assert r["tokens"] == len(TOKENS) - 1
    assert abs(r["loss"] - ref.mean()) < 1e-5


def test_non_overlapping_equals_stride_context(tiny):
    a = evaluate_model(tiny, TOKENS, 16, 16, 4, "cpu")
    # independent reference: consecutive chunks of 16 targets, each from the start of its chunk
    nll = []
    for s in range(0, len(TOKENS) - 1, 16):
        x = torch.tensor(TOKENS[s:s + 16])[None]
        y = torch.tensor(TOKENS[s + 1:s + 17])
        x = x[:, :len(y)]
        with torch.no_grad():
            nll += F.cross_entropy(tiny(x)[0][0, :, :40], y, reduction="none").tolist()
    # the last partial chunk is scored inside a full window that ends at the text's end: more history
    assert a["tokens"] == len(TOKENS) - 1 == len(nll)
    head = (len(TOKENS) - 1) // 16 * 16
    b = evaluate_model(tiny, TOKENS[:head + 1], 16, 16, 4, "cpu")
    assert abs(b["loss"] - np.mean(nll[:head])) < 1e-6


@pytest.mark.parametrize("stride", [3, 8, 15])
def test_sliding_scores_each_token_once_with_history(tiny, stride):
    r = evaluate_model(tiny, TOKENS, 16, stride, 5, "cpu")
    assert r["tokens"] == len(TOKENS) - 1
    # every window after the first keeps at least context - stride tokens of history: never worse
    # than the non-overlapping score by much, and bounded by the full-history brute force
    full = brute_force(tiny, TOKENS, 16).mean()
    assert r["loss"] >= full - 0.05


def test_cli_on_checkpoint_and_hf_folder(tmp_path, char_data):
    transformers = pytest.importorskip("transformers")
    run_script("train.py", f"dataset={char_data}", f"out_dir={tmp_path / 'ours'}", "n_layer=1", "n_head=2",
               "n_embd=32", "block_size=32", "batch_size=4", "max_iters=3", "eval_iters=1")
    p = run_script("evaluate.py", f"models=mine={tmp_path / 'ours'}", f"dataset={char_data}",
                   f"out={tmp_path / 'e.json'}")
    res = json.loads((tmp_path / "e.json").read_text())["results"]["mine"]
    val = np.fromfile(f"{char_data}/val.bin", dtype=np.uint16)
    assert res["tokens"] == len(val) - 1 and res["ppl"] > 1 and "| mine |" in p.stdout
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=64))
    hf.save_pretrained(tmp_path / "hf")
    (tmp_path / "t.txt").write_text("It was the best of times, it was the worst of times. " * 20)
    run_script("evaluate.py", f"models={tmp_path / 'hf'}", f"text={tmp_path / 't.txt'}", "stride=32",
               f"out={tmp_path / 'h.json'}")
    r = json.loads((tmp_path / "h.json").read_text())["results"]["hf"]
    from tokenizer import get_tokenizer
    assert r["tokens"] == len(get_tokenizer("gpt2").encode((tmp_path / "t.txt").read_text())) - 1
    assert r["stride"] == 32 and r["block_size"] == 64
    p = run_script("evaluate.py", f"models={tmp_path / 'hf'}", f"dataset={char_data}", check=False)
    assert p.returncode == 2 and "uses tokenizer gpt2" in p.stderr and len(p.stderr.strip().splitlines()) == 1
