"""Token taxonomy: float64 reference, finite-difference check, chunked path equality, bins."""

import math

import pytest
import torch

import wapo


def _reference(z: torch.Tensor, s: torch.Tensor):
    """Straight from the definitions, in float64 with an explicit softmax."""
    z = z.double()
    p = torch.softmax(z, -1)
    ps = p.gather(-1, s[:, None]).squeeze(-1)
    logp_all = torch.log(p)
    h = -(p * logp_all).sum(-1)
    c = (p**2).sum(-1)
    dent = -(ps * (torch.log(ps) + h) - (p**2 * (logp_all + h[:, None])).sum(-1))
    return torch.log(ps), h, c, ps >= c, 1 - 2 * ps + c, dent


def _random_problem(seed, n=64, v=50, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, v, generator=gen, dtype=torch.float64) * scale
    s = torch.multinomial(torch.softmax(z, -1), 1, generator=gen).squeeze(-1)
    return z, s


def test_hand_worked_distribution():
    # p = [0.5, 0.25, 0.25]: C = 0.25 + 0.0625 + 0.0625 = 0.375, H = 1.5 ln 2
    z = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.5, 0.25, 0.25]], dtype=torch.float64))
    st = wapo.token_stats(z, torch.tensor([0, 1]))
    torch.testing.assert_close(st.collision, torch.tensor([0.375, 0.375], dtype=torch.float64))
    torch.testing.assert_close(st.entropy, torch.full((2,), 1.5 * math.log(2), dtype=torch.float64))
    assert st.is_peak.tolist() == [True, False]  # 0.5 >= 0.375 > 0.25
    # pred_dlogp = 1 - 2 p_s + C: 1 - 1 + 0.375 = 0.375 and 1 - 0.5 + 0.375 = 0.875
    torch.testing.assert_close(st.pred_dlogp, torch.tensor([0.375, 0.875], dtype=torch.float64))


def test_token_stats_matches_float64_reference():
    z, s = _random_problem(0)
    st = wapo.token_stats(z.float(), s)
    ref = _reference(z, s)
    for got, want in zip((st.logp, st.entropy, st.collision, st.pred_dlogp, st.pred_dentropy), ref[:2] + ref[2:3] + ref[4:]):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
    # is_peak may only disagree where p_s and C are within float32 rounding of each other
    ps = ref[0].exp()
    disagree = st.is_peak != ref[3]
    assert torch.all((ps[disagree] - ref[2][disagree]).abs() < 1e-6)


def test_first_order_predictions_match_a_small_logit_step():
    z, s = _random_problem(1)
    st = wapo.token_stats(z, s)
    eta = 1e-6
    p = torch.softmax(z, -1)
    step = -p
    step[torch.arange(len(s)), s] += 1  # Δz = ηA(onehot(s) − p) with ηA = eta
    z2 = z + eta * step
    after = wapo.token_stats(z2, s)
    torch.testing.assert_close((after.logp - st.logp) / eta, st.pred_dlogp, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close((after.entropy - st.entropy) / eta, st.pred_dentropy, rtol=1e-4, atol=1e-6)
    # other tokens: Δ log p_k / ηA = C − p_s − p_k
    logp2 = torch.log_softmax(z2, -1)
    k = (s + 1) % z.shape[1]
    fd = (logp2.gather(-1, k[:, None]) - torch.log_softmax(z, -1).gather(-1, k[:, None])).squeeze(-1) / eta
    want = st.collision - st.logp.exp() - p.gather(-1, k[:, None]).squeeze(-1)
    torch.testing.assert_close(fd, want, rtol=1e-4, atol=1e-6)


def test_cells_forecast_the_entropy_sign():
    # SPEC.md: valley -> entropy up for every token; peak -> entropy down for most (a forecast).
    # Logits N(0, 3^2) over 50 tokens: every valley agrees, peaks agree 90-95% of the time.
    z, s = _random_problem(2, n=20000)
    st = wapo.token_stats(z, s)
    valley, peak = ~st.is_peak, st.is_peak
    assert torch.all(st.pred_dentropy[valley] > 0)
    assert (st.pred_dentropy[peak] < 0).double().mean() > 0.85
    assert torch.all(st.pred_dlogp >= 0)


HEADS = {  # (bias, scale, softcap) of the output head
    "plain": (False, 1.0, None),
    "bias": (True, 1.0, None),
    "scaled": (False, 0.25, None),  # Granite: logits / logits_scaling
    "softcap": (False, 1.0, 2.0),  # Gemma 2: 2·tanh(r / 2) on logits of std ~3, so the cap bites
    "all": (True, 3.0, 5.0),
}


def _head_problem(name, *, n=64, d=8, v=40, seed=3):
    """hidden (n, d), an OutputHead and its logits built with plain autograd ops, in float64."""
    with_bias, scale, softcap = HEADS[name]
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, d, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(v, generator=gen, dtype=torch.float64, requires_grad=True) if with_bias else None
    head = wapo.OutputHead(weight, bias, scale, softcap)
    logits = scale * (hidden @ weight.T + (bias if with_bias else 0))
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return hidden, head, logits, gen


@pytest.mark.parametrize("chunk_size", [16, 25, 64, 1000])  # divides N=64 or not, or one chunk
@pytest.mark.parametrize("head_name", sorted(HEADS))
def test_chunked_equals_naive_values_and_gradients(chunk_size, head_name):
    hidden, head, logits, gen = _head_problem(head_name)
    temp = 0.7
    tokens = torch.randint(0, logits.shape[1], (logits.shape[0],), generator=gen)
    upstream = torch.randn(logits.shape[0], generator=gen, dtype=torch.float64)

    naive = wapo.token_stats(logits / temp, tokens)
    chunked = wapo.chunked_token_stats(hidden, head, tokens, temperature=temp, chunk_size=chunk_size)
    for field in ("logp", "entropy", "collision", "is_peak", "pred_dlogp", "pred_dentropy"):
        torch.testing.assert_close(getattr(chunked, field).to(getattr(naive, field).dtype),
                                   getattr(naive, field), rtol=1e-5, atol=1e-6)
    params = [hidden, head.weight] + ([head.bias] if head.bias is not None else [])
    g_naive = torch.autograd.grad((naive.logp * upstream).sum(), params)
    g_chunked = torch.autograd.grad((chunked.logp * upstream).sum(), params)
    for a, b in zip(g_chunked, g_naive):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("head_name", ["softcap", "scaled"])
def test_the_transform_changes_the_numbers(head_name):
    # guards the test above: without applying the head's transform, logp would differ
    hidden, head, logits, gen = _head_problem(head_name)
    tokens = torch.randint(0, logits.shape[1], (logits.shape[0],), generator=gen)
    raw = wapo.chunked_token_stats(hidden, head.weight, tokens).logp
    assert (raw - wapo.token_stats(logits, tokens).logp).abs().max() > 0.5


@pytest.mark.parametrize("head_name", ["bias", "all"])
def test_chunked_gradcheck(head_name):
    hidden, head, logits, gen = _head_problem(head_name, n=7, d=3, v=5, seed=4)
    tokens = torch.randint(0, 5, (7,), generator=gen)

    def logp(h, w, b):
        return wapo.chunked_token_stats(h, wapo.OutputHead(w, b, head.scale, head.softcap), tokens,
                                        temperature=1.3, chunk_size=3).logp

    assert torch.autograd.gradcheck(logp, (hidden, head.weight, head.bias))


def test_softcap_gradient_by_hand():
    # one position, V=2, W=I, h=(r, 0), softcap c=1, τ=1: z = (tanh h_0, tanh h_1) = (tanh r, 0),
    # log p_0 = z_0 − LSE(z): d/dh_0 = (1 − p_0)·(1 − tanh² r), d/dh_1 = −p_1·(1 − tanh² 0) = −(1 − p_0)
    # p_0 = σ(tanh 0.8) = σ(0.6640) = 0.6602: grads 0.3398·0.5591 = 0.1900 and −0.3398
    r = 0.8
    hidden = torch.tensor([[r, 0.0]], dtype=torch.float64, requires_grad=True)
    head = wapo.OutputHead(torch.eye(2, dtype=torch.float64), softcap=1.0)
    (grad,) = torch.autograd.grad(wapo.chunked_token_stats(hidden, head, torch.tensor([0])).logp.sum(), hidden)
    p0 = 1 / (1 + math.exp(-math.tanh(r)))
    assert grad[0, 0].item() == pytest.approx((1 - p0) * (1 - math.tanh(r) ** 2), rel=1e-12)
    assert grad[0, 1].item() == pytest.approx(-(1 - p0), rel=1e-12)


def test_output_head_rejects_bad_transforms():
    with pytest.raises(ValueError, match="scale must be > 0"):
        wapo.OutputHead(torch.zeros(5, 3), scale=0.0)
    with pytest.raises(ValueError, match="softcap must be > 0"):
        wapo.OutputHead(torch.zeros(5, 3), softcap=-1.0)


def test_chunked_rejects_bad_shapes():
    with pytest.raises(ValueError, match="expected hidden"):
        wapo.chunked_token_stats(torch.zeros(4, 3), torch.zeros(5, 2), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        wapo.chunked_token_stats(torch.zeros(4, 3), torch.zeros(5, 3), torch.zeros(4, dtype=torch.long), temperature=0)


def test_bins_by_advantage_sign():
    # p = [0.5, 0.25, 0.25] everywhere: token 0 is a peak, tokens 1/2 are valleys
    z = torch.log(torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64)).expand(3, 4, 3)
    tokens = torch.tensor([[0, 1, 0, 2], [1, 1, 0, 0], [0, 1, 2, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    st = wapo.token_stats(z, tokens)
    bins = wapo.taxonomy_bins(st, torch.tensor([1.0, -2.0, 0.0]), mask)
    # row 0 (A>0): peaks at t0,t2; valleys t1,t3. row 1 (A<0): valleys t0,t1; peak t2 (t3 masked)
    # row 2 (A=0): 2 masked-in tokens. Total 9 tokens.
    counts = {b: bins[f"{b}_count"].item() for b in wapo.BINS}
    assert counts == {"pos_peak": 2, "pos_valley": 2, "neg_peak": 1, "neg_valley": 2, "zero": 2}
    assert bins["pos_peak_frac"].item() == pytest.approx(2 / 9)
    # peak: -[0.5(ln .5 + H) - Σp²(ln p + H)], H = 1.5 ln 2, Σp² ln p = .25 ln .5 + .125 ln .25
    h, l2 = 1.5 * math.log(2), math.log(2)
    sum_p2 = 0.25 * (-l2 + h) + 2 * 0.0625 * (-2 * l2 + h)
    assert bins["pos_peak_pred_dentropy"].item() == pytest.approx(-(0.5 * (-l2 + h) - sum_p2))
    assert bins["neg_valley_pred_dentropy"].item() == pytest.approx(-(0.25 * (-2 * l2 + h) - sum_p2))
    empty = wapo.taxonomy_bins(st, torch.tensor([1.0, 1.0, 1.0]), mask)
    assert math.isnan(empty["neg_peak_pred_dentropy"].item()) and empty["neg_peak_count"].item() == 0


def test_chunked_gradient_is_consistent_under_bf16_autocast():
    # forward and backward must both use float32 logits: Σ_k ∂logp/∂b_k = Σ_k (onehot − p)_k = 0
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(64, 16, generator=gen, requires_grad=True)
    weight = torch.randn(50, 16, generator=gen, requires_grad=True)
    bias = torch.zeros(50, requires_grad=True)
    tokens = torch.randint(0, 50, (64,), generator=gen)
    head = wapo.OutputHead(weight, bias)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        stats = wapo.chunked_token_stats(hidden, head, tokens, chunk_size=16)
    (g_bias,) = torch.autograd.grad(stats.logp.sum(), bias)
    assert abs(g_bias.sum().item()) < 1e-4
    plain = wapo.chunked_token_stats(hidden, head, tokens, chunk_size=16)
    torch.testing.assert_close(stats.logp, plain.logp)
