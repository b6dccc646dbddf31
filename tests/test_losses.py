"""losses.py against brute-force formulas, chunked against unchunked (value and gradient),
padding and masking invariances, and what the chunked path keeps for backward."""
import math

import pytest
import torch
import torch.nn.functional as F

from losses import KINDS, cached_kd_loss, cosine_loss, hard_loss, kd_loss, soft_loss

torch.set_num_threads(1)


def logits(*shape, seed=0, scale=3.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def brute(student, teacher, kind, T, beta=0.5, mask=None):
    """Explicit loops over rows and columns in float64 Python floats."""
    rows = []
    for n, (s, t) in enumerate(zip(student.tolist(), teacher.tolist())):
        zs = sum(math.exp(x / T) for x in s)
        zt = sum(math.exp(x / T) for x in t)
        ps = [math.exp(x / T) / zs for x in s]
        pt = [math.exp(x / T) / zt for x in t]
        if kind == "forward_kl":
            d = sum(a * math.log(a / b) for a, b in zip(pt, ps))
        elif kind == "reverse_kl":
            d = sum(b * math.log(b / a) for a, b in zip(pt, ps))
        else:
            m = [beta * a + (1 - beta) * b for a, b in zip(pt, ps)]
            d = (beta * sum(a * math.log(a / c) for a, c in zip(pt, m))
                 + (1 - beta) * sum(b * math.log(b / c) for b, c in zip(ps, m)))
        rows.append((d, 1.0 if mask is None else float(mask[n])))
    return T * T * sum(d * c for d, c in rows) / sum(c for _, c in rows)


def value_and_grad(s, t, **kw):
    s = s.detach().clone().requires_grad_(True)
    loss = soft_loss(s, t, **kw)
    loss.backward()
    return loss.detach(), s.grad


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T", [1.0, 0.5, 2.0, 4.0])
@pytest.mark.parametrize("masked", [False, True])
def test_matches_brute_force(kind, T, masked):
    s, t = logits(7, 11, seed=1), logits(7, 11, seed=2)
    mask = torch.tensor([1, 0, 1, 1, 0, 1, 1]) if masked else None
    beta = 0.3 if kind == "jsd" else 0.5  # an asymmetric beta catches a swapped convention
    got = soft_loss(s, t, kind=kind, temperature=T, jsd_beta=beta, mask=mask)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(brute(s, t, kind, T, beta, mask), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_zero_when_student_equals_teacher(kind):
    t = logits(2, 5, 11, seed=3)
    assert abs(soft_loss(t.clone(), t, kind=kind).item()) < 1e-6


def test_jsd_symmetry_and_log2_bound():
    s, t = logits(7, 11, seed=4), logits(7, 11, seed=5)
    a = soft_loss(s, t, kind="jsd", temperature=1.0)
    assert a.item() == pytest.approx(soft_loss(t, s, kind="jsd", temperature=1.0).item(), rel=1e-6)
    # generalised: JSD_b(P||Q) = JSD_(1-b)(Q||P)
    b = soft_loss(s, t, kind="jsd", jsd_beta=0.2)
    assert b.item() == pytest.approx(soft_loss(t, s, kind="jsd", jsd_beta=0.8).item(), rel=1e-6)
    # disjoint one-hot-like distributions reach the bound without NaN or overshoot
    s, t = torch.full((3, 11), -1e4), torch.full((3, 11), -1e4)
    s[:, 0], t[:, 1] = 1e4, 1e4
    for T in (1.0, 3.0):
        j = soft_loss(s, t, kind="jsd", temperature=T) / T ** 2
        assert math.log(2) - 1e-5 < j.item() <= math.log(2) + 1e-6


@pytest.mark.parametrize("beta", [0.0, 1.0, -0.1, 1.5])
def test_jsd_beta_must_be_inside(beta):
    with pytest.raises(ValueError, match="jsd_beta"):
        soft_loss(logits(3, 5), logits(3, 5), kind="jsd", jsd_beta=beta)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="unknown kd loss"):
        soft_loss(logits(3, 5), logits(3, 5), kind="kl")
    with pytest.raises(ValueError, match="vocab_size"):
        soft_loss(logits(3, 5), logits(3, 4), vocab_size=5)
    with pytest.raises(ValueError, match="mask"):
        soft_loss(logits(3, 5), logits(3, 5), mask=torch.ones(4))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("chunk", [1, 3, 4, 7])
def test_chunked_equals_unchunked(kind, chunk):
    # B=2, T=5 -> N=10 rows; no chunk size divides it except 1. Student padded 13, teacher 11.
    s, t = logits(2, 5, 13, seed=6), logits(2, 5, 11, seed=7)
    mask = torch.tensor([[1, 1, 0, 1, 1], [0, 1, 1, 0, 1]], dtype=torch.bool)
    kw = dict(kind=kind, temperature=2.0, jsd_beta=0.3, mask=mask, vocab_size=11)
    ref, ref_grad = value_and_grad(s, t, **kw)
    got, got_grad = value_and_grad(s, t, chunk_rows=chunk, **kw)
    assert abs(got - ref) < 1e-6
    assert torch.allclose(got_grad, ref_grad, atol=1e-6, rtol=0)
    assert ref_grad.abs().max() > 1e-3  # the comparison is not of two zero tensors
    # the analytic gradient follows the upstream gradient (here loss * 3)
    s2 = s.clone().requires_grad_(True)
    (3 * soft_loss(s2, t, chunk_rows=chunk, **kw)).backward()
    assert torch.allclose(s2.grad, 3 * ref_grad, atol=3e-6, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("chunk", [None, 3, 1])  # 1: 10 rows in two blocks of teacher logits
def test_teacher_hidden_and_head_equal_its_logits(kind, chunk):
    # the teacher's logits formed chunk by chunk from its hidden states (B=2, T=5, C=6) and padded
    # head (13 rows, 11 real) give the loss and gradient of the logits formed all at once
    s, h, head = logits(2, 5, 13, seed=30), logits(2, 5, 6, seed=31, scale=1.0), logits(13, 6, seed=32)
    kw = dict(kind=kind, temperature=2.0, vocab_size=11, chunk_rows=chunk)
    ref, ref_grad = value_and_grad(s, h @ head.T, **kw)
    got, got_grad = value_and_grad(s, h, teacher_head=head, **kw)
    assert abs(got - ref) < 1e-5 and ref > 0.1
    assert torch.allclose(got_grad, ref_grad, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="exceeds"):
        soft_loss(s, h, teacher_head=head[:10], vocab_size=11)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T,alpha,eps", [(1.0, 0.5, 0.0), (2.0, 0.3, 0.1), (2.0, 0.0, 0.0), (1.0, 1.0, 0.1)])
def test_fused_kd_loss_equals_ce_plus_soft(kind, T, alpha, eps):
    # the chunked one-pass hybrid against alpha * hard_loss + (1 - alpha) * soft_loss composed by
    # autograd: loss, both logged parts and the gradient; targets of -1 count in neither part
    s, h, head = logits(2, 5, 13, seed=33), logits(2, 5, 6, seed=34, scale=1.0), logits(13, 6, seed=35)
    y = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(1))
    y[0, 1] = y[1, 3] = -1
    s1, s2 = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    soft = soft_loss(s1, h @ head.T, kind=kind, temperature=T, jsd_beta=0.3, mask=y >= 0, vocab_size=11)
    hard = hard_loss(s1, y, 11, label_smoothing=eps)
    (alpha * hard + (1 - alpha) * soft).backward()
    loss, got_hard, got_soft = kd_loss(s2, h, y, alpha, kind=kind, temperature=T, jsd_beta=0.3,
                                       vocab_size=11, chunk_rows=3, teacher_head=head, label_smoothing=eps)
    (2 * loss).backward()
    assert abs(got_hard - hard) < 1e-5 and abs(got_soft - soft) < 1e-5
    assert abs(loss - (alpha * hard + (1 - alpha) * soft)) < 1e-5
    assert torch.allclose(s2.grad, 2 * s1.grad, atol=1e-6, rtol=0) and s1.grad.abs().max() > 1e-3
    assert torch.all(s2.grad[:, :, 11:] == 0) and torch.all(s2.grad[0, 1] == 0)
    with torch.no_grad():  # the chunked value without a graph, and the unchunked path
        for chunk in (3, None):
            again = kd_loss(s, h, y, alpha, kind=kind, temperature=T, jsd_beta=0.3, vocab_size=11,
                            chunk_rows=chunk, teacher_head=head, label_smoothing=eps)
            assert all(abs(a - b) < 1e-5 for a, b in zip(again, (loss, got_hard, got_soft)))


def top_k_cache(teacher_logits, k):
    """What cache_teacher.py stores of teacher logits: top-k log-probs + the rest's log-mass, ids."""
    log_p = F.log_softmax(teacher_logits, -1)
    top, ids = log_p.topk(k, -1)
    rest = log_p.scatter(-1, ids, float("-inf")).logsumexp(-1, keepdim=True)
    return torch.cat([top, rest], -1), ids


def buckets(logits, ids, V):
    """The (support, rest) coarse-graining by autograd: the reference for the analytic gradient."""
    log_p = F.log_softmax(logits[..., :V].double(), -1)
    rest = log_p.scatter(-1, ids, float("-inf")).logsumexp(-1, keepdim=True)
    return torch.cat([log_p.gather(-1, ids), rest], -1)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T,alpha,eps", [(1.0, 0.0, 0.0), (2.0, 0.3, 0.1), (0.5, 0.5, 0.0), (2.0, 1.0, 0.0)])
@pytest.mark.parametrize("chunk", [None, 3])
def test_top_k_cache_loss_is_the_coarse_grained_divergence(kind, T, alpha, eps, chunk):
    # against autograd through the coarse-graining in float64: soft_loss over the k + 1 bucket
    # log-probabilities of both sides (which tempers them as k + 1 outcomes), plus the CE
    s, t = logits(2, 5, 13, seed=40), logits(2, 5, 11, seed=41)
    cached, ids = top_k_cache(t, 4)
    y = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(2))
    y[1, 2] = -1
    ref_s = s.double().requires_grad_(True)
    soft = soft_loss(buckets(ref_s, ids, 11), cached.double(), kind=kind, temperature=T, jsd_beta=0.3,
                     mask=y >= 0)
    hard = hard_loss(ref_s, y, 11, label_smoothing=eps)
    (alpha * hard + (1 - alpha) * soft).backward()
    got_s = s.clone().requires_grad_(True)
    loss, got_hard, got_soft = cached_kd_loss(got_s, cached, ids, y, alpha, kind, T, 0.3, 11, chunk, eps)
    loss.backward()
    assert abs(got_soft - soft.item()) < 1e-5 and abs(got_hard - hard.item()) < 1e-5
    assert abs(loss.item() - (alpha * hard + (1 - alpha) * soft).item()) < 1e-5
    assert torch.allclose(got_s.grad.double(), ref_s.grad, atol=1e-6, rtol=0) and ref_s.grad.abs().max() > 1e-3
    assert torch.all(got_s.grad[..., 11:] == 0) and torch.all(got_s.grad[1, 2] == 0)


@pytest.mark.parametrize("kind", KINDS)
def test_top_k_cache_loss_is_zero_for_the_teacher_itself(kind):
    t = logits(6, 50, seed=42, scale=5.0)
    cached, ids = top_k_cache(t, 3)
    s = t.clone().requires_grad_(True)
    loss, _, soft = cached_kd_loss(s, cached, ids, torch.zeros(6, dtype=torch.long), 0.0, kind, 2.0)
    loss.backward()
    assert abs(soft.item()) < 1e-6 and s.grad.abs().max() < 1e-6
    # a support holding nearly all the mass: the rest is taken from its own terms, not 1 - sum
    sharp = logits(6, 50, seed=43, scale=1.0)
    sharp[:, :3] += 40.0
    cached, ids = top_k_cache(sharp, 3)
    assert torch.isfinite(cached).all() and (cached[:, 3] < -30).all()
    assert abs(cached_kd_loss(sharp, cached, ids, torch.zeros(6, dtype=torch.long), 0.0, kind)[2].item()) < 1e-6


def test_chunked_bf16_gradient_kept_in_bf16():
    s, t = logits(10, 11, seed=8).bfloat16(), logits(10, 11, seed=9).bfloat16()
    ref, ref_grad = value_and_grad(s.float(), t)
    got, got_grad = value_and_grad(s, t, chunk_rows=3)
    assert got.dtype == torch.float32 and got_grad.dtype == torch.bfloat16
    assert abs(got - ref) < 1e-5
    assert torch.allclose(got_grad.float(), ref_grad, atol=1e-3, rtol=1e-2)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("chunk", [None, 3])
def test_padded_columns_never_matter(kind, chunk):
    s, t = logits(7, 13, seed=10), logits(7, 11, seed=11)
    kw = dict(kind=kind, vocab_size=11, chunk_rows=chunk)
    a, ga = value_and_grad(s, t, **kw)
    s2 = s.clone()
    s2[:, 11:] = 1e4  # would dominate any softmax that saw them
    b, gb = value_and_grad(s2, t, **kw)
    assert torch.equal(a, b) and torch.equal(ga, gb)
    assert torch.all(ga[:, 11:] == 0)
    # without vocab_size the narrower width (the teacher's) is the real vocab
    assert torch.equal(soft_loss(s2, t, kind=kind, chunk_rows=chunk), a)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("chunk", [None, 2])
def test_masked_positions_do_not_matter(kind, chunk):
    s, t = logits(2, 4, 11, seed=12), logits(2, 4, 11, seed=13)
    mask = torch.tensor([[1, 0, 1, 1], [0, 0, 1, 0]])
    kw = dict(kind=kind, mask=mask, chunk_rows=chunk)
    a, ga = value_and_grad(s, t, **kw)
    s2, t2 = s.clone(), t.clone()
    s2[mask == 0], t2[mask == 0] = 50.0, -50.0
    b, gb = value_and_grad(s2, t2, **kw)
    assert abs(a - b) < 1e-6 and torch.allclose(ga, gb, atol=1e-7)
    assert torch.all(ga[mask == 0] == 0)
    # a fully masked duplicate sequence of garbage changes nothing: the mean is per counted token
    s3, t3 = torch.cat([s, logits(2, 4, 11, seed=14)]), torch.cat([t, logits(2, 4, 11, seed=15)])
    m3 = torch.cat([mask, torch.zeros_like(mask)])
    c, _ = value_and_grad(s3, t3, kind=kind, mask=m3, chunk_rows=chunk)
    assert abs(a - c) < 1e-6


def test_mean_is_per_token_not_per_sequence():
    # sequence 0 counts 1 token, sequence 1 counts 4: a per-sequence mean would weight them 1:1
    s, t = logits(2, 4, 11, seed=16), logits(2, 4, 11, seed=17)
    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 1]])
    got = soft_loss(s, t, temperature=1.0, mask=mask)
    assert got.item() == pytest.approx(brute(s.view(8, 11), t.view(8, 11), "forward_kl", 1.0,
                                             mask=mask.view(-1)), rel=1e-5)


@pytest.mark.parametrize("chunk", [None, 2])
def test_nothing_counted_is_zero_with_a_graph(chunk):
    s, t = logits(2, 3, 11, seed=18), logits(2, 3, 11, seed=19)
    loss, grad = value_and_grad(s, t, mask=torch.zeros(2, 3), chunk_rows=chunk)
    assert loss.item() == 0.0 and torch.all(grad == 0)
    h = logits(2, 3, 8).requires_grad_(True)
    c = cosine_loss(h, logits(2, 3, 8, seed=1), mask=torch.zeros(2, 3))
    c.backward()
    assert c.item() == 0.0 and torch.all(h.grad == 0)


@pytest.mark.parametrize("chunk", [None, 2])
def test_teacher_gets_no_gradient(chunk):
    s, t = logits(5, 11).requires_grad_(True), logits(5, 11, seed=1).requires_grad_(True)
    soft_loss(s, t, kind="jsd", chunk_rows=chunk).backward()
    assert t.grad is None and s.grad is not None


def test_chunked_without_grad_gives_the_same_value():
    s, t = logits(7, 11, seed=20), logits(7, 11, seed=21)
    with torch.no_grad():
        assert abs(soft_loss(s, t, kind="reverse_kl", chunk_rows=3)
                   - soft_loss(s, t, kind="reverse_kl")) < 1e-6


def _saved_bytes(fn):
    """Bytes autograd keeps for backward: what stays alive between forward and backward."""
    total = [0]

    def pack(x):
        total[0] += x.numel() * x.element_size()
        return x
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        fn()
    return total[0]


def test_chunking_saves_only_the_student_gradient():
    N, Vp, V = 64, 40, 37
    s, t = logits(N, Vp, seed=22).requires_grad_(True), logits(N, V, seed=23)
    for kind in KINDS:
        chunked = _saved_bytes(lambda: soft_loss(s, t, kind=kind, vocab_size=V, chunk_rows=8))
        plain = _saved_bytes(lambda: soft_loss(s, t, kind=kind, vocab_size=V))
        assert chunked == N * Vp * 4  # one float32 gradient the size of the student logits
        assert plain >= 2 * N * V * 4  # autograd keeps float32 log-probs of both sides


def test_hard_loss_is_cross_entropy():
    x = logits(2, 6, 11, seed=24)
    y = torch.randint(0, 11, (2, 6), generator=torch.Generator().manual_seed(0))
    ref = F.cross_entropy(x.view(-1, 11), y.view(-1))
    assert torch.allclose(hard_loss(x, y), ref, atol=1e-6)
    ls = F.cross_entropy(x.view(-1, 11), y.view(-1), label_smoothing=0.1)
    assert torch.allclose(hard_loss(x, y, label_smoothing=0.1), ls, atol=1e-6)
    # padded columns are never seen, -1 targets and mask-0 positions do not count
    xp = torch.cat([x, torch.full((2, 6, 3), 1e4)], dim=-1)
    y2 = y.clone()
    y2[0, :2] = -1
    mask = torch.ones(2, 6)
    mask[1, 3] = 0
    keep = (y2 != -1) & (mask > 0)
    ref = F.cross_entropy(x[keep], y[keep])
    assert torch.allclose(hard_loss(xp, y2, vocab_size=11, mask=mask), ref, atol=1e-6)
    positional = hard_loss(xp, y2, 11, 0.0)  # the (vocab_size, label_smoothing) order callers use
    assert torch.allclose(positional, F.cross_entropy(x[y2 != -1], y[y2 != -1]), atol=1e-6)
    zero = hard_loss(x.requires_grad_(True), torch.full((2, 6), -1))
    assert zero.item() == 0.0
    zero.backward()


@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_hard_loss_equals_cross_entropy(eps, dtype):
    # padded logits (14 wide, 11 real), -1 targets and a mask; value and gradient against
    # F.cross_entropy on the kept rows, and nothing counted still gives 0 with a graph
    x = torch.cat([logits(3, 5, 11, seed=40), torch.full((3, 5, 3), 1e4)], dim=-1).to(dtype)
    y = torch.randint(0, 11, (3, 5), generator=torch.Generator().manual_seed(2))
    y[0, :2] = -1
    mask = torch.ones(3, 5)
    mask[2, 4] = 0
    keep = (y != -1) & (mask > 0)
    a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ref = F.cross_entropy(a[..., :11][keep].float(), y[keep], label_smoothing=eps)
    ref.backward()
    got = hard_loss(b, y, 11, eps, mask=mask, chunk_rows=4)
    got.backward()
    assert got.dtype == torch.float32 and b.grad.dtype == dtype
    assert abs(got - ref) < 1e-5
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert torch.allclose(b.grad.float(), a.grad.float(), atol=tol, rtol=0) and a.grad.abs().max() > 1e-3
    with torch.no_grad():
        assert abs(hard_loss(x, y, 11, eps, mask=mask, chunk_rows=4) - ref) < 1e-5
    zero = hard_loss(x.clone().requires_grad_(True), torch.full((3, 5), -1), 11, chunk_rows=4)
    zero.backward()
    assert zero.item() == 0.0


def test_hard_loss_bf16_in_float32():
    x, y = logits(4, 11, seed=25).bfloat16(), torch.tensor([0, 3, 10, 5])
    got = hard_loss(x, y)
    assert got.dtype == torch.float32
    assert torch.allclose(got, F.cross_entropy(x.float(), y), atol=1e-6)


def test_cosine_loss():
    a, b = logits(2, 3, 8, seed=26), logits(2, 3, 8, seed=27)
    ref = sum(1 - (u @ v) / (u.norm() * v.norm()) for u, v in zip(a.view(-1, 8), b.view(-1, 8))) / 6
    assert torch.allclose(cosine_loss(a, b), ref, atol=1e-6)
    assert cosine_loss(a, 2 * a).item() == pytest.approx(0.0, abs=1e-6)
    mask = torch.tensor([[1, 0, 0], [0, 0, 1]])
    cos = F.cosine_similarity
    ref = (2 - cos(a[0, 0], b[0, 0], dim=0) - cos(a[1, 2], b[1, 2], dim=0)) / 2
    assert torch.allclose(cosine_loss(a, b, mask), ref, atol=1e-6)
    with pytest.raises(ValueError, match="widths"):
        cosine_loss(a, logits(2, 3, 9))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kd", [True, False])
def test_overwrite_logits_keeps_loss_and_gradient(dtype, kd):
    # the logits' storage taken for their gradient: the loss, its parts and the gradient reaching
    # the layer below equal those of a separate gradient tensor, and the logits hold that gradient
    h, W = logits(2, 5, 6, seed=50, scale=1.0), logits(13, 6, seed=51, scale=0.5)
    th, head = logits(2, 5, 6, seed=52, scale=1.0), logits(13, 6, seed=53)
    y = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(3))
    y[0, 2] = -1

    def run(overwrite):
        Wp = W.clone().requires_grad_(True)
        s = (h @ Wp.T).to(dtype)
        s.retain_grad()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
            if kd:
                out = kd_loss(s, th, y, 0.3, temperature=2.0, vocab_size=11, chunk_rows=3,
                              teacher_head=head, label_smoothing=0.1, overwrite_logits=overwrite)
            else:
                out = (hard_loss(s, y, 11, chunk_rows=3, overwrite_logits=overwrite),)
        (2 * out[0]).backward()
        shares = any(x.untyped_storage().data_ptr() == s.untyped_storage().data_ptr() for x in saved)
        return [o.detach() for o in out], Wp.grad, s, shares

    a, ga, sa, shared_a = run(False)
    b, gb, sb, shared_b = run(True)
    assert all(torch.equal(x, z) for x, z in zip(a, b)) and torch.equal(ga, gb) and ga.abs().max() > 1e-3
    assert shared_b and not shared_a
    assert torch.equal(sb.detach(), sa.grad)  # the overwritten logits are their gradient
