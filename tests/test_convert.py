"""convert.py both ways, proven by logits against transformers (the round trip litgpt tests by)."""
import json
import os

import numpy as np
import pytest
import torch

import checkpoint
from conftest import run_script
import hf as hf_folder
from model import GPT, GPTConfig

transformers = pytest.importorskip("transformers")


def random_hf(folder, safe=True):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=3, n_embd=96, n_head=3, vocab_size=50257, n_positions=64)
    m = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # HF starts biases at 0 and LayerNorms at 1: randomise so they are checked
        for name, p in m.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    m.save_pretrained(folder)
    if not safe:  # the older format; this transformers writes safetensors only, so write the .bin as it did
        os.remove(os.path.join(folder, "model.safetensors"))
        torch.save(m.state_dict(), os.path.join(folder, "pytorch_model.bin"))
    return m


def tokens(V=50257, T=40):
    return torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(1))


def assert_same_logits(ours, hf, V=50257, T=40):
    idx = tokens(V, T)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(idx)[0][..., :V], hf.eval()(idx).logits, atol=1e-4, rtol=0)


def test_round_trip_through_our_checkpoint(tmp_path):
    hf = random_hf(tmp_path / "hf")
    ours_dir, back = tmp_path / "ours", tmp_path / "back"
    p = run_script("convert.py", "to=ours", f"source={tmp_path / 'hf'}", f"out_dir={ours_dir}")
    assert "init_from=" in p.stdout
    model, tok, ckpt = checkpoint.load_model(str(ours_dir))
    assert tok == {"tokenizer": "gpt2", "vocab_size": 50257}
    assert ckpt["step"] == 0 and ckpt["best_val_loss"] == float("inf")
    assert model.config.padded_vocab_size == 50304  # padded for speed, padding never read
    assert_same_logits(model, hf)

    run_script("convert.py", "to=hf", f"source={ours_dir}", f"out={back}")
    assert_same_logits(model, transformers.GPT2LMHeadModel.from_pretrained(back))
    assert_same_logits(hf_folder.load(str(back)), hf)


def test_pytorch_model_bin_is_read(tmp_path):
    hf = random_hf(tmp_path / "hf", safe=False)
    assert sorted(f for f in os.listdir(tmp_path / "hf") if "model" in f) == ["pytorch_model.bin"]
    run_script("convert.py", "to=ours", f"source={tmp_path / 'hf'}", f"out_dir={tmp_path / 'o'}")
    assert_same_logits(checkpoint.load_model(str(tmp_path / "o"))[0], hf)


def test_bad_sources_and_overwrite_are_one_line_errors(tmp_path):
    empty = tmp_path / "noweights"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1, "n_head": 1,
                                                   "n_embd": 8, "n_positions": 8, "vocab_size": 10}))
    p = run_script("convert.py", "to=ours", f"source={empty}", f"out_dir={tmp_path / 'o'}", check=False)
    assert p.returncode == 2 and "holds no weights" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr
    assert not os.path.exists(tmp_path / "o" / "ckpt.pt")
    p = run_script("convert.py", "to=hf", f"source={tmp_path / 'missing'}", f"out={tmp_path / 'x'}", check=False)
    assert p.returncode == 2 and "checkpoint not found" in p.stderr

    random_hf(tmp_path / "hf")
    run_script("convert.py", "to=ours", f"source={tmp_path / 'hf'}", f"out_dir={tmp_path / 'o'}")
    before = os.stat(tmp_path / "o" / "ckpt.pt").st_mtime_ns
    p = run_script("convert.py", "to=ours", f"source={tmp_path / 'hf'}", f"out_dir={tmp_path / 'o'}", check=False)
    assert p.returncode == 2 and "overwrite=True" in p.stderr
    assert os.stat(tmp_path / "o" / "ckpt.pt").st_mtime_ns == before
    run_script("convert.py", "to=ours", f"source={tmp_path / 'hf'}", f"out_dir={tmp_path / 'o'}", "overwrite=True")
    assert sorted(os.listdir(tmp_path / "o")) == ["ckpt.pt", "ckpt_00000000.pt"]


def test_converted_checkpoint_fine_tunes(tmp_path):
    random_hf(tmp_path / "hf")
    run_script("convert.py", "to=ours", f"source={tmp_path / 'hf'}", f"out_dir={tmp_path / 'base'}")
    data = tmp_path / "data"
    data.mkdir()
    ids = np.random.default_rng(0).integers(0, 50257, 3000).astype(np.uint16)
    ids[:2700].tofile(data / "train.bin")
    ids[2700:].tofile(data / "val.bin")
    (data / "meta.json").write_text(json.dumps(dict(tokenizer="gpt2", vocab_size=50257, dtype="uint16",
                                                    train_tokens=2700, val_tokens=300, has_mask=False)))
    run_script("train.py", f"init_from={tmp_path / 'base'}", f"dataset={data}", f"out_dir={tmp_path / 'ft'}",
               "block_size=32", "batch_size=2", "max_iters=2", "eval_iters=1", "warmup_iters=0")
    before = checkpoint.load(str(tmp_path / "base"))["model"]
    after = checkpoint.load(str(tmp_path / "ft"))
    assert after["step"] == 2 and after["model_args"]["n_embd"] == 96
    assert not torch.equal(before["transformer.h.0.attn.c_attn.weight"],
                           after["model"]["transformer.h.0.attn.c_attn.weight"])


def test_char_model_exports_weights_with_a_note(tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=11))
    chars = "\n abcdefghi"
    checkpoint.save(dict(model=model.state_dict(), model_args=model.config.to_dict(), config={}, step=0,
                         best_val_loss=float("inf"), tokenizer=dict(tokenizer="char", vocab_size=11, chars=chars)),
                    str(tmp_path / "char"), step=0, keep_last=1)
    p = run_script("convert.py", "to=hf", f"source={tmp_path / 'char'}", f"out={tmp_path / 'hfc'}")
    assert "char tokenizer" in p.stdout and "only the weights" in p.stdout
    assert_same_logits(model, transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hfc"), V=11, T=16)
