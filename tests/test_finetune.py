"""Fine-tuning: LoRA adapters, frozen layers, layer-wise learning rates, masked targets."""
import os

import torch

import lora
from checkpoint import load, load_model
from conftest import TINY, run_script
from model import GPT, GPT2_SIZES, GPTConfig
from optim import freeze, make_optimizer
from trainer import DEFAULTS


def test_lora_trains_only_adapters_and_merges(char_data, tmp_path):
    base, tuned = tmp_path / "base", tmp_path / "lora"
    run_script("train.py", *TINY, f"dataset={char_data}", f"out_dir={base}", "max_iters=5")
    before = open(base / "ckpt.pt", "rb").read()
    p = run_script("train.py", *TINY, f"dataset={char_data}", f"out_dir={tuned}", f"init_from={base}",
                   "lora_rank=4", "lora_alpha=8", "max_iters=8", "learning_rate=1e-2")
    assert "trainable" in p.stdout
    assert open(base / "ckpt.pt", "rb").read() == before  # the base is never written
    ck = load(tuned)
    assert ck["lora"]["rank"] == 4 and set(ck["model"]) == {k for k in ck["model"] if "lora_" in k}
    assert os.path.getsize(tuned / "ckpt.pt") < os.path.getsize(base / "ckpt.pt")
    assert any(v.abs().sum() > 0 for k, v in ck["model"].items() if "lora_B" in k)  # it learned
    # merged model == base + adapters
    base_model, _, _ = load_model(str(base))
    adapted = lora.apply(base_model, 4, 8)
    adapted.load_state_dict(ck["model"], strict=False)
    merged, _, _ = load_model(str(tuned))
    idx = torch.randint(0, base_model.config.vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(merged.eval()(idx)[0], adapted.eval()(idx)[0], atol=1e-5, rtol=0)
    # resume continues the adapters
    run_script("train.py", *TINY, f"dataset={char_data}", f"out_dir={tuned}", "init_from=resume",
               "lora_rank=4", "lora_alpha=8", "max_iters=10")
    assert load(tuned)["step"] == 10


def test_lora_gradients_and_fraction_gpt2_shaped():
    torch.manual_seed(0)
    m = GPT(GPTConfig(**GPT2_SIZES["gpt2"], block_size=64))
    lora.apply(m, rank=8, alpha=16)
    trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
    assert trainable / m.num_params() < 0.01
    with torch.no_grad():  # non-zero B so every adapter gets gradient
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    idx = torch.randint(0, 50257, (1, 8))
    m(idx, idx)[1].backward()
    for n, p in m.named_parameters():
        assert (p.grad is not None) == ("lora_" in n), n


def test_freeze_layers_and_layer_lr_decay():
    torch.manual_seed(0)
    m = GPT(GPTConfig(n_layer=4, n_head=2, n_embd=32, block_size=16, vocab_size=50))
    freeze(m, 2)
    frozen = {n: p.clone() for n, p in m.named_parameters() if not p.requires_grad}
    assert any(".h.1." in n for n in frozen) and not any(".h.2." in n for n in frozen)
    cfg = dict(DEFAULTS, layer_lr_decay=0.5, learning_rate=1.0)
    opt = make_optimizer(m, cfg, "cpu")
    depths = {g["depth"]: g["lr_scale"] for g in opt.param_groups}
    assert depths[5] == 1.0 and depths[4] == 0.5 and depths[3] == 0.25  # ln_f/head, top blocks
    idx = torch.randint(0, 50, (2, 16))
    for _ in range(3):
        m(idx, idx)[1].backward()
        opt.step()
        opt.zero_grad()
    for n, p in m.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


def test_masked_targets_do_not_count(tmp_path):
    """A mask bin turns prompt targets into -1: their labels never change the loss or gradients."""
    import json
    import numpy as np
    from data import BinDataset
    from losses import ce_loss_fn
    tokens = np.random.default_rng(0).integers(0, 50, 400).astype(np.uint16)
    mask = (np.arange(400) % 10 >= 4).astype(np.uint8)  # 4 prompt tokens, 6 response tokens
    for split in ("train", "val"):
        tokens.tofile(tmp_path / f"{split}.bin")
        mask.tofile(tmp_path / f"{split}.mask.bin")
    (tmp_path / "meta.json").write_text(json.dumps(dict(tokenizer="char", vocab_size=50, dtype="uint16",
                                                        has_mask=True, chars="x" * 50)))
    x, y = BinDataset(str(tmp_path)).batch("train", 4, 16, 0, 0, 0)
    starts = [int(np.flatnonzero((np.lib.stride_tricks.sliding_window_view(tokens, 16) == r.numpy()).all(1))[0])
              for r in x]
    for r, s in enumerate(starts):
        assert ((y[r] == -1).numpy() == (mask[s + 1:s + 17] == 0)).all()
    torch.manual_seed(0)
    m = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=50))
    fn = ce_loss_fn(50)

    def loss_and_grad(labels):
        loss = fn(m, x, torch.where(y >= 0, labels, -1))[0]
        return loss, torch.autograd.grad(loss, m.lm_head.weight)[0]
    labels = y.clamp(min=0)
    l1, g1 = loss_and_grad(labels)
    l2, g2 = loss_and_grad(torch.where(y < 0, (labels + 7) % 50, labels))  # change prompt labels
    assert torch.equal(l1, l2) and torch.equal(g1, g2)
    l3, _ = loss_and_grad(torch.where(y >= 0, (labels + 7) % 50, labels))  # change response labels
    assert not torch.equal(l1, l3)
