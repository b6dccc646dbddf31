"""engine.py on every family model.py builds: greedy equal to a full recompute (window sliding
included), batched rows equal to each prompt alone, one prefill per prompt, reproducible sampling
that follows the distribution it claims, stop tokens, streaming, log-probs and train-mode models."""
import math

import pytest
import torch

import engine
from model import GPT, GPTConfig

FAMILIES = [dict(family="gpt2"), dict(family="llama", n_kv_head=1, bias=False)]  # RoPE, RMSNorm, SwiGLU, GQA
FAMILY_IDS = [f["family"] for f in FAMILIES]
BLOCK, V = 16, 50
# lengths 3, 1, 20 and 6: left padding of up to 19 columns, and a prompt beyond the context
PROMPTS = [[1, 2, 3], [5], list(range(20)), [7, 8, 9, 10, 11, 12]]


def tiny(family, vocab_size=V, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(n_layer=2, n_head=2, n_embd=32, block_size=BLOCK, vocab_size=vocab_size, **kw)
    return GPT(GPTConfig(**cfg, **family)).eval()


@torch.no_grad()
def recompute(model, prompt, n):
    """Greedy tokens and the log-softmax rows they were chosen from, each from a plain forward of
    the last block_size tokens: the definition the cache must reproduce."""
    idx, rows = torch.tensor([prompt]), []
    for _ in range(n):
        lp = model(idx[:, -BLOCK:])[0][0, -1, :model.config.vocab_size].log_softmax(-1)
        rows.append(lp)
        idx = torch.cat([idx, lp.argmax()[None, None]], 1)
    return idx[0, len(prompt):].tolist(), torch.stack(rows)


def per_row(seed, rows):
    return [torch.Generator().manual_seed(seed * 1000 + r) for r in rows]


@pytest.mark.parametrize("family", FAMILIES, ids=FAMILY_IDS)
def test_greedy_equals_full_recompute_past_the_context(family):
    m = tiny(family)
    out = engine.generate(m, PROMPTS, 25, temperature=0, logprobs=3)  # 25 new tokens slide past 16
    assert [(c.prompt_index, c.sample, c.finish_reason) for c in out] == [(i, 0, "length") for i in range(4)]
    for prompt, c in zip(PROMPTS, out):
        tokens, lp = recompute(m, prompt, 25)
        assert c.tokens == tokens
        torch.testing.assert_close(torch.tensor(c.logprobs), lp[torch.arange(25), tokens], atol=1e-5, rtol=0)
        top = lp.topk(3)
        assert [[i for i, _ in alts] for alts in c.top_logprobs] == top.indices.tolist()
        torch.testing.assert_close(torch.tensor([[v for _, v in alts] for alts in c.top_logprobs]),
                                   top.values, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES, ids=FAMILY_IDS)
def test_batched_rows_equal_each_prompt_alone(family):
    m = tiny(family)
    kw = dict(temperature=1.0, top_k=20, top_p=0.9)
    batched = engine.generate(m, PROMPTS, 12, num_samples=2, generator=per_row(7, range(8)), **kw)
    for row, c in enumerate(batched):
        alone = engine.generate(m, [PROMPTS[c.prompt_index]], 12, generator=per_row(7, [row]), **kw)[0]
        assert c.tokens == alone.tokens
        torch.testing.assert_close(c.logprobs, alone.logprobs, atol=1e-5, rtol=0)  # batched matmuls round
    assert all(batched[2 * i].tokens != batched[2 * i + 1].tokens for i in range(4))


def test_seeded_sampling_is_reproducible():
    m = tiny({})

    def draw(seed):
        return [c.tokens for c in engine.generate(m, PROMPTS, 10, num_samples=3, temperature=1.5,
                                                  generator=torch.Generator().manual_seed(seed))]
    a = draw(0)
    assert draw(0) == a and draw(1) != a
    assert len({tuple(t) for t in a}) == 12


@pytest.mark.parametrize("family", FAMILIES, ids=FAMILY_IDS)
def test_one_prefill_per_prompt_and_samples_share_it(family):
    m = tiny(family)
    calls = []
    forward = m.hidden_states
    m.hidden_states = lambda idx, cache=None, positions=None: calls.append(tuple(idx.shape)) or \
        forward(idx, cache, positions)
    out = engine.generate(m, PROMPTS[:2], 5, num_samples=4, temperature=0)
    assert calls == [(2, 3)] + [(8, 1)] * 4  # 2 prompts prefilled once, then 8 rows decoded
    del m.hidden_states
    alone = [engine.generate(m, [p], 5, temperature=0)[0].tokens for p in PROMPTS[:2]]
    assert [c.tokens for c in out] == [alone[0]] * 4 + [alone[1]] * 4


def test_stop_tokens_cut_rows_and_streaming_sees_each_token_once():
    m = tiny({}, vocab_size=8)
    kw = dict(temperature=2.0, num_samples=4)
    full = engine.generate(m, PROMPTS, 6, generator=torch.Generator().manual_seed(3), **kw)
    streamed = {}
    out = engine.generate(m, PROMPTS, 6, generator=torch.Generator().manual_seed(3), stop_tokens=[3, 5],
                          on_token=lambda row, tok, lp: streamed.setdefault(row, []).append((tok, lp)), **kw)
    assert {c.finish_reason for c in out} == {"stop", "length"}
    for row, (a, b) in enumerate(zip(full, out)):
        cut = next((k for k, t in enumerate(a.tokens) if t in (3, 5)), None)
        if cut is None:
            assert (b.tokens, b.finish_reason) == (a.tokens, "length")
            assert streamed[row] == list(zip(a.tokens, a.logprobs))
        else:  # the same draws up to the stop token; it is streamed, and nothing after it
            assert (b.tokens, b.logprobs, b.finish_reason) == (a.tokens[:cut], a.logprobs[:cut], "stop")
            assert streamed[row] == list(zip(a.tokens[:cut + 1], a.logprobs[:cut + 1]))

    calls = []
    forward = m.hidden_states
    m.hidden_states = lambda *a: calls.append(1) or forward(*a)
    out = engine.generate(m, PROMPTS, 30, stop_tokens=range(8))
    assert len(calls) == 1 and all(c.tokens == [] and c.finish_reason == "stop" for c in out)


def test_on_token_gets_the_top_alternatives_when_asked_and_can_end_rows():
    m = tiny({})
    kw = dict(num_samples=2, temperature=1.0, logprobs=3)
    full = engine.generate(m, PROMPTS, 8, generator=per_row(4, range(8)), **kw)
    seen = {}

    def on_token(row, tok, lp, top):
        seen.setdefault(row, []).append((tok, lp, top))
        return row % 2 == 1 and len(seen[row]) == 3  # odd rows end at their third token
    out = engine.generate(m, PROMPTS, 8, generator=per_row(4, range(8)), on_token=on_token, stream_top=True, **kw)
    for row, (a, b) in enumerate(zip(full, out)):
        n = 3 if row % 2 else 8
        assert (b.tokens, b.finish_reason) == (a.tokens[:n], "stop" if row % 2 else "length")
        assert seen[row] == list(zip(b.tokens, b.logprobs, b.top_logprobs))
        assert b.top_logprobs == a.top_logprobs[:n]

    # without stream_top the callback is as it always was; only True (not any truthy value) ends a row
    seen = []
    out = engine.generate(m, PROMPTS, 8, generator=per_row(4, range(8)), logprobs=3, num_samples=2,
                          on_token=lambda row, tok, lp: seen.append(row) or [row])
    assert [c.tokens for c in out] == [c.tokens for c in full] and len(seen) == 64

    calls = []
    forward = m.hidden_states
    m.hidden_states = lambda *a: calls.append(1) or forward(*a)
    out = engine.generate(m, PROMPTS, 30, on_token=lambda *a: True)
    assert len(calls) == 1 and all(len(c.tokens) == 1 and c.finish_reason == "stop" for c in out)


def test_padded_vocab_never_drawn_and_narrow_filters_are_greedy():
    m = tiny({}, vocab_size=10)
    assert m.config.padded_vocab_size == 64
    prompts = [[t % 10 for t in p] for p in PROMPTS]
    greedy = [c.tokens for c in engine.generate(m, prompts, 20, temperature=0)]
    with torch.no_grad():  # make the padding columns irresistible: they must still never be drawn
        m.lm_head.weight[10:] = 10.0
    for top_k, top_p in ((0, 1.0), (50, 0.99), (0, 0.5)):
        out = engine.generate(m, prompts, 20, num_samples=4, top_k=top_k, top_p=top_p, logprobs=2,
                              generator=torch.Generator().manual_seed(0))
        assert all(0 <= t < 10 for c in out for t in c.tokens)
        assert all(i < 10 for c in out for alts in c.top_logprobs for i, _ in alts)
    for top_k, top_p in ((1, 1.0), (0, 1e-6)):
        out = engine.generate(m, prompts, 20, temperature=1.5, top_k=top_k, top_p=top_p)
        assert [c.tokens for c in out] == greedy


def expected_probs(logits, temperature, top_k, top_p):
    """The sampling distribution written out plainly, one row at a time, to check engine.sample."""
    order = sorted(range(len(logits)), key=lambda i: -logits[i])
    kept = order[:top_k] if top_k else order
    w = [math.exp((logits[i] - logits[order[0]]) / temperature) for i in kept]
    p = [x / sum(w) for x in w]
    nucleus, mass = [], 0.0
    for i, q in zip(kept, p):
        if mass >= top_p:
            break
        nucleus.append((i, q))
        mass += q
    return {i: q / mass for i, q in nucleus}


@pytest.mark.parametrize("V_, scale, temperature, top_k, top_p", [
    (12, 2.0, 1.0, 0, 1.0), (12, 2.0, 0.5, 0, 1.0), (12, 2.0, 1.0, 4, 1.0), (12, 2.0, 1.0, 0, 0.7),
    (12, 2.0, 2.0, 6, 0.8),
    (600, 0.3, 1.0, 0, 0.9)])  # a flat row whose nucleus is wider than the first 256 candidates
def test_sampler_follows_the_distribution(V_, scale, temperature, top_k, top_p):
    """Inverse-CDF sampling over an even grid of N numbers in [0, 1) draws each token N*p times,
    to within one draw."""
    logits = torch.randn(2, V_, generator=torch.Generator().manual_seed(V_)) * scale
    N = 20000 if V_ < 100 else 4000
    u = (torch.arange(N) + 0.5) / N
    for row in range(2):
        drawn = engine.sample(logits[row].expand(N, V_).contiguous(), temperature, top_k, top_p, u)
        counts = torch.bincount(drawn, minlength=V_)
        want = expected_probs(logits[row].tolist(), temperature, top_k, top_p)
        if V_ > 256:
            assert len(want) > 256
        assert set(counts.nonzero()[:, 0].tolist()) <= set(want)
        assert all(abs(counts[i].item() - N * q) <= 1.5 for i, q in want.items())


def test_a_model_in_train_mode_is_generated_from_in_eval_mode():
    m = tiny({}, dropout=0.5)
    ref = [c.tokens for c in engine.generate(m, PROMPTS, 10, temperature=0)]
    m.train()
    m.transformer.h[1].eval()  # a module the caller keeps in eval stays so
    assert [c.tokens for c in engine.generate(m, PROMPTS, 10, temperature=0)] == ref
    assert m.training and m.transformer.h[0].training and not m.transformer.h[1].training


def test_bfloat16_autocast_runs_through_the_cache():
    m = tiny({})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = engine.generate(m, PROMPTS, 20, num_samples=2, temperature=0, logprobs=1)
    assert all(len(c.tokens) == 20 and all(0 <= t < V for t in c.tokens) for c in out)
    assert all(lp <= 0 and math.isfinite(lp) for c in out for lp in c.logprobs)


@pytest.mark.parametrize("family", FAMILIES, ids=FAMILY_IDS)
def test_prompt_logprobs_score_every_token_after_the_first(family):
    m = tiny(family)
    ids = [4, 8, 15, 16, 23, 42, 7, 1, 0, 9, 3]
    with torch.no_grad():
        lp = m(torch.tensor([ids]))[0][0, :-1, :V].log_softmax(-1)
    chosen, top = engine.prompt_logprobs(m, ids, k=2)
    torch.testing.assert_close(torch.tensor(chosen), lp[torch.arange(10), ids[1:]], atol=1e-5, rtol=0)
    assert [[i for i, _ in alts] for alts in top] == lp.topk(2).indices.tolist()
    torch.testing.assert_close(torch.tensor([[v for _, v in alts] for alts in top]), lp.topk(2).values,
                               atol=1e-5, rtol=0)
    assert engine.prompt_logprobs(m, ids[:1], k=0) == ([], None)
    # the last token is scored, never fed: a full context plus one
    assert len(engine.prompt_logprobs(m, list(range(17)))[0]) == 16
    with pytest.raises(ValueError, match="block_size \\+ 1 = 17"):
        engine.prompt_logprobs(m, list(range(18)))


def test_bad_arguments():
    m = tiny({})
    for kw in (dict(prompts=[[1], []]), dict(prompts=[]), dict(max_new_tokens=0), dict(num_samples=0),
               dict(generator=per_row(0, range(3)))):
        with pytest.raises(ValueError):
            engine.generate(m, **dict(dict(prompts=PROMPTS[:2], max_new_tokens=3), **kw))


def test_greedy_equals_transformers_generate(tmp_path):
    transformers = pytest.importorskip("transformers")
    import checkpoint
    torch.manual_seed(0)
    theirs = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=3, n_embd=96, n_head=3, vocab_size=500, n_positions=128, attn_implementation="sdpa")).eval()
    theirs.save_pretrained(tmp_path / "hf")
    ours = checkpoint.load_model(str(tmp_path / "hf"))[0]
    prompt = torch.randint(0, 500, (3, 9), generator=torch.Generator().manual_seed(3))
    ref = theirs.generate(prompt, max_new_tokens=64, do_sample=False, min_new_tokens=64,
                          attention_mask=torch.ones_like(prompt), pad_token_id=0)
    assert [c.tokens for c in engine.generate(ours, prompt.tolist(), 64, temperature=0)] == ref[:, 9:].tolist()
