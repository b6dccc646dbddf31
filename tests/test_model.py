"""GPT-2 exactly: logits against transformers both ways, the cache protocol (generation itself is
test_engine.py's), and the pieces distillation relies on (all-position logits, padded vocab,
gradient checkpointing)."""
import pytest
import torch

import engine
import hf
from model import GPT, GPTConfig

transformers = pytest.importorskip("transformers")
# what a test of either family changes in a small GPT-2 config
FAMILIES = [dict(family="gpt2"), dict(family="llama", n_head=4, n_kv_head=2, bias=False)]


def hf_model(tmp_path, n_layer=3, n_embd=96, n_head=3, vocab=50257, n_positions=128, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=vocab,
                                  n_positions=n_positions, attn_implementation="sdpa")
    m = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # HF inits biases and LayerNorms to 0/1: randomise them so they are checked
        for name, p in m.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    folder = tmp_path / "hf"
    m.save_pretrained(folder)
    return m, folder


def tokens(B=2, T=37, V=50257, seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def test_import_matches_transformers(tmp_path):
    ref_model, folder = hf_model(tmp_path)
    ours = hf.load(str(folder)).eval()
    idx = tokens()
    with torch.no_grad():
        ref = ref_model(idx).logits
        got, _ = ours(idx)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


def test_export_round_trip(tmp_path):
    torch.manual_seed(0)
    ours = GPT(GPTConfig(n_layer=2, n_head=3, n_embd=48, block_size=64, vocab_size=50257)).eval()
    assert ours.config.padded_vocab_size == 50304
    hf.export(ours, tmp_path / "exp")
    theirs = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "exp").eval()
    idx = tokens(T=20)
    with torch.no_grad():
        torch.testing.assert_close(theirs(idx).logits, ours(idx)[0][..., :50257], atol=1e-4, rtol=0)
    back = hf.load(str(tmp_path / "exp")).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(idx)[0], ours(idx)[0][..., :50257], atol=1e-5, rtol=0)


def test_export_without_bias(tmp_path):
    torch.manual_seed(0)
    ours = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=100, bias=False)).eval()
    hf.export(ours, tmp_path / "nb")
    theirs = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "nb").eval()
    idx = tokens(T=10, V=100)
    with torch.no_grad():
        torch.testing.assert_close(theirs(idx).logits, ours(idx)[0][..., :100], atol=1e-4, rtol=0)


def test_logits_every_position_and_loss_ignores_padding():
    torch.manual_seed(0)
    m = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=10))
    idx = torch.randint(0, 10, (3, 12))
    logits, loss = m(idx, idx)
    assert logits.shape == (3, 12, 64)
    ref = torch.nn.functional.cross_entropy(logits[..., :10].reshape(-1, 10), idx.reshape(-1))
    torch.testing.assert_close(loss, ref)


def test_init_and_tying():
    m = GPT(GPTConfig(n_layer=4, n_head=4, n_embd=256, block_size=64, vocab_size=1000))
    assert m.lm_head.weight is m.transformer.wte.weight
    std = m.transformer.h[0].attn.c_proj.weight.std().item()
    assert abs(std - 0.02 / (2 * 4) ** 0.5) < 0.002
    assert abs(m.transformer.h[0].mlp.c_fc.weight.std().item() - 0.02) < 0.002


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_checkpointing_same_gradients(family):
    torch.manual_seed(0)
    m = GPT(GPTConfig(**dict(dict(n_layer=3, n_head=2, n_embd=32, block_size=32, vocab_size=50), **family)))
    idx = torch.randint(0, 50, (2, 16))
    grads = []
    for ckpt in (False, True):
        m.zero_grad()
        m.gradient_checkpointing = ckpt
        m(idx, idx)[1].backward()
        grads.append([p.grad.clone() for p in m.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_compile_matches_eager(family):
    torch.manual_seed(0)
    m = GPT(GPTConfig(**dict(dict(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=50), **family))).eval()
    idx = torch.randint(0, 50, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(m)(idx)[0], m(idx)[0], atol=1e-5, rtol=0)


def test_hf_folder_without_weights(tmp_path):
    _, folder = hf_model(tmp_path, n_layer=1, n_embd=24, n_head=2, vocab=100)
    (folder / "model.safetensors").unlink()
    with pytest.raises(Exception, match="holds no weights"):
        hf.load(str(folder))


@pytest.mark.parametrize("family", FAMILIES)
def test_cache_protocol_chunks_and_left_padding(family):
    """Prefill in two chunks then one token at a time through the engine's cache, with the second
    row left-padded by 3 tokens: every real position's hidden state equals the no-cache forward of
    its own row."""
    torch.manual_seed(0)
    m = GPT(GPTConfig(**dict(dict(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=50), **family))).eval()
    a, b = torch.randint(0, 50, (1, 12)), torch.randint(0, 50, (1, 9))
    pad = 3
    idx = torch.cat([a, torch.cat([torch.zeros(1, pad, dtype=torch.long), b], 1)])
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[1, :pad] = False
    positions = torch.stack([torch.arange(12), (torch.arange(12) - pad).clamp(min=0)])
    hidden = []  # every position's, where the cache hands back only each chunk's last
    forward = m.hidden_states
    m.hidden_states = lambda *args: hidden.append(forward(*args)) or hidden[-1]
    cache = engine.KVCache(m, 2, 12, "cpu")
    with torch.no_grad():
        for s, e in [(0, 6), (6, 10), (10, 11), (11, 12)]:
            cache.forward(m, idx[:, s:e], positions[:, s:e], valid[:, s:e])
        del m.hidden_states
        h = torch.cat(hidden, 1)
        torch.testing.assert_close(h[:1], m.hidden_states(a), atol=1e-5, rtol=0)
        torch.testing.assert_close(h[1:, pad:], m.hidden_states(b), atol=1e-5, rtol=0)
        torch.testing.assert_close(m.logits(h[:1]), m(a)[0], atol=1e-5, rtol=0)
