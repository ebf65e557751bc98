"""Token taxonomy: peak/valley tokens and the first-order effect of a policy-gradient step.

docs/math.md#token-taxonomy. For the logits `z` (at the sampling temperature) of the position
that sampled token `s`, with `p = softmax(z)`:

    logp  = log p_s                 entropy H = −Σ_k p_k log p_k
    C     = Σ_k p_k² = exp(LSE(2z) − 2·LSE(z))          (collision probability)
    peak  ⇔ p_s ≥ C,  valley ⇔ p_s < C
    pred_dlogp    = 1 − 2p_s + C                            (Δ log p_s per unit ηA)
    pred_dentropy = −[p_s(log p_s + H) − Σ_k p_k²(log p_k + H)]   (ΔH per unit ηA)

for the logit step `Δz_k = ηA(1[k=s] − p_k)` of one policy-gradient update on that token.

Two paths compute the same fields:
- `token_stats(logits, tokens)` from full logits, for small problems and as the reference;
- `chunked_token_stats(hidden, head, tokens)` from the final hidden states and the output
  head (`OutputHead`: the output layer and the model's scaling or soft-capping of its logits),
  a chunk of positions at a time, so peak extra memory grows with the chunk size and not with
  tokens × vocabulary. Its `logp` is differentiable (w.r.t. hidden, weight, bias) through a
  custom backward that recomputes each chunk's logits instead of storing them.
Only `logp` carries gradient; the other fields are detached diagnostics.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

BINS = ("pos_peak", "pos_valley", "neg_peak", "neg_valley", "zero")


@dataclass(frozen=True)
class TokenStats:
    """Per-token fields, each shaped like `tokens`."""

    logp: Tensor
    """log p_s at the temperature; differentiable."""
    entropy: Tensor
    collision: Tensor
    is_peak: Tensor
    """bool: p_s ≥ Σ_k p_k²."""
    pred_dlogp: Tensor
    pred_dentropy: Tensor


@dataclass(frozen=True)
class OutputHead:
    """A causal LM's output layer and what its forward applies to the layer's output.

        logits = c·tanh(s·(h·Wᵀ + b) / c)    with softcap c (Gemma 2's `final_logit_softcapping`)
        logits = s·(h·Wᵀ + b)               without (softcap None)

    weight (V, d), bias (V,) or None. The scale s is Cohere's `logit_scale` (×) or 1 / Granite's
    `logits_scaling` (÷). The sampling temperature divides these logits, as the sampler divides
    `model(...).logits`. `wapo.models.output_head(model)` builds it for a loaded model.
    """

    weight: Tensor
    bias: Tensor | None = None
    scale: float = 1.0
    softcap: float | None = None

    def __post_init__(self):
        if not self.scale > 0:
            raise ValueError(f"OutputHead.scale must be > 0, got {self.scale}")
        if self.softcap is not None and not self.softcap > 0:
            raise ValueError(f"OutputHead.softcap must be > 0 or None, got {self.softcap}")


def _fields_from_sums(logp: Tensor, entropy: Tensor, collision: Tensor, p2logp: Tensor) -> TokenStats:
    """Derive the taxonomy from log p_s, H, C and Σ p² log p (all detached but `logp`)."""
    p_s = logp.detach().exp()
    log_p_s = logp.detach()
    pred_dentropy = -(p_s * (log_p_s + entropy) - (p2logp + collision * entropy))
    return TokenStats(
        logp=logp,
        entropy=entropy,
        collision=collision,
        is_peak=p_s >= collision,
        pred_dlogp=1 - 2 * p_s + collision,
        pred_dentropy=pred_dentropy,
    )


def _log_softmax_(logits: Tensor, out: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """LSE(z) (n,) and p = softmax(z) (n, V) of logits (n, V), overwriting `logits` with log p.

    p is written into `out` (n, V) when given (a buffer reused across calls). One (n, V) buffer
    besides the logits, and `_moments_` then needs none: for a chunk of 1,024 positions × 150k
    vocabulary each such buffer is 600 MB, and a fresh one costs its page faults too.
    """
    top = logits.amax(-1, keepdim=True)
    p = torch.sub(logits, top, out=out).exp_()
    total = p.sum(-1, keepdim=True)
    p.div_(total)
    lse = top + total.log()
    logits.sub_(lse)
    return lse.squeeze(-1), p


def _moments_(logp: Tensor, p: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(H, C, Σ p² log p) per row of log p and p (n, V), overwriting both (scratch afterwards).

    H = −Σ p log p, C = Σ p² (= exp(LSE(2z) − 2·LSE(z))), Σ p² log p = Σ p·(p log p).
    """
    plogp = logp.mul_(p)
    entropy = -plogp.sum(-1)
    p2logp = plogp.mul_(p).sum(-1)
    collision = p.square_().sum(-1)
    return entropy, collision, p2logp


def token_stats(logits: Tensor, tokens: Tensor) -> TokenStats:
    """Taxonomy fields from full logits `(..., V)` (already divided by the temperature).

    tokens: `(...)` long, the sampled token at each position. Computed in float32 (float64 if
    the logits are float64). Memory: a few `(..., V)` tensors; prefer `chunked_token_stats`.
    """
    z = logits if logits.dtype == torch.float64 else logits.float()
    logp = torch.log_softmax(z, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        logp_all = z.detach().clone()
        _, p = _log_softmax_(logp_all)
        entropy, collision, p2logp = _moments_(logp_all, p)
    return _fields_from_sums(logp, entropy, collision, p2logp)


def chunked_token_stats(hidden: Tensor, head: OutputHead | Tensor, tokens: Tensor, *, temperature: float = 1.0,
                        chunk_size: int = 1024) -> TokenStats:
    """Taxonomy fields from hidden states, chunk by chunk, of the logits `head(hidden) / temperature`.

    hidden (N, d); head an `OutputHead` (a (V, d) weight alone means `OutputHead(weight)`);
    tokens (N,) long. Peak extra memory is a few `(chunk_size, V)` buffers (float32, or
    float64 for float64 inputs), forward and backward; `logp` backpropagates into `hidden`,
    the weight and the bias by recomputing each chunk's logits.
    """
    head = head if isinstance(head, OutputHead) else OutputHead(head)
    weight = head.weight
    if hidden.dim() != 2 or tokens.shape != hidden.shape[:1] or weight.shape[1] != hidden.shape[1]:
        raise ValueError(
            f"expected hidden (N, d), weight (V, d), tokens (N,); got {tuple(hidden.shape)}, "
            f"{tuple(weight.shape)}, {tuple(tokens.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    logp, entropy, collision, p2logp = _ChunkedLogProb.apply(
        hidden, weight, head.bias, tokens, float(head.scale), head.softcap and float(head.softcap),
        float(temperature), int(chunk_size)
    )
    return _fields_from_sums(logp, entropy, collision, p2logp)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half/bf16/float32 inputs (softmax sums need it), float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)


def _chunk_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None, scale: float, softcap: float | None,
                  temperature: float) -> Tensor:
    """The chunk's logits `OutputHead(weight, bias, scale, softcap)(hidden) / temperature`.

    In float32 (float64 for float64 inputs), with autocast off: forward and backward must
    compute the same logits, and backward runs outside any autocast region, so the forward may
    not use autocast's bf16 matmul either (p would not sum to 1). Call without grad: the
    scaling is done in place.
    """
    dtype = _compute_dtype(torch.promote_types(hidden.dtype, weight.dtype))
    with torch.autocast(hidden.device.type, enabled=False):
        logits = hidden.to(dtype) @ weight.to(dtype).T
        if bias is not None:
            logits += bias.to(dtype)
    if softcap is not None:
        logits.mul_(scale / softcap).tanh_().mul_(softcap)
    elif scale != 1:
        logits.mul_(scale)
    return logits.div_(temperature)


class _ChunkedLogProb(torch.autograd.Function):
    """log p_s and the taxonomy sums chunk by chunk; backward recomputes each chunk's logits.

    With r = h·Wᵀ + b the output layer's output and z = logits / τ, d log p_s / dz = onehot − p,
    and dz/dr = s/τ (no softcap) or (s/τ)·(1 − tanh²(s·r/c)) = (s/τ)·(1 − (τz/c)²) (softcap c),
    elementwise. For upstream g (per position), δ = g·(onehot − p)·dz/dr:
        dL/dhidden = δ·W,   dL/dW = Σ_n δᵀ hidden,   dL/db = Σ_n δ.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, tokens, scale, softcap, temperature, chunk_size):
        n, dtype = hidden.shape[0], _compute_dtype(torch.promote_types(hidden.dtype, weight.dtype))
        logp, entropy, collision, p2logp, lse_all = (
            torch.empty(n, device=hidden.device, dtype=dtype) for _ in range(5)
        )
        with torch.no_grad():
            for start in range(0, n, chunk_size):
                sl = slice(start, start + chunk_size)
                logits = _chunk_logits(hidden[sl], weight, bias, scale, softcap, temperature)
                lse_all[sl], p = _log_softmax_(logits)  # logits now hold log p
                logp[sl] = logits.gather(-1, tokens[sl].unsqueeze(-1)).squeeze(-1)
                entropy[sl], collision[sl], p2logp[sl] = _moments_(logits, p)
                del logits, p
        ctx.save_for_backward(hidden, weight, bias, tokens, lse_all)
        ctx.head = (scale, softcap, temperature)
        ctx.chunk_size = chunk_size
        ctx.mark_non_differentiable(entropy, collision, p2logp)
        return logp, entropy, collision, p2logp

    @staticmethod
    def backward(ctx, grad_logp, *_unused):
        hidden, weight, bias, tokens, lse_all = ctx.saved_tensors
        scale, softcap, temperature = ctx.head
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.zeros_like(hidden) if need_h else None
        dtype = lse_all.dtype
        grad_w = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=dtype, device=weight.device) if need_b else None
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            sl = slice(start, start + ctx.chunk_size)
            g = grad_logp[sl].to(dtype)
            with torch.no_grad():
                z = _chunk_logits(hidden[sl], weight, bias, scale, softcap, temperature)
                if softcap is None:  # p built in place over the logits buffer
                    p, slope = z.sub_(lse_all[sl].unsqueeze(-1)).exp_(), None
                else:  # one more buffer: 1 − tanh² = 1 − (τz/c)², in place over z
                    p = (z - lse_all[sl].unsqueeze(-1)).exp_()
                    slope = z.mul_(temperature / softcap).square_().neg_().add_(1)
                # δ = g·(onehot − p)·dz/dr, built in place over p
                delta = p.mul_(-g.unsqueeze(-1))
                delta.scatter_add_(-1, tokens[sl].unsqueeze(-1), g.unsqueeze(-1))
                if slope is not None:
                    delta.mul_(slope)
                delta.mul_(scale / temperature)
                if need_h:
                    grad_h[sl] = (delta @ weight.to(dtype)).to(hidden.dtype)
                if need_w:
                    grad_w += delta.T @ hidden[sl].to(dtype)
                if need_b:
                    grad_b += delta.sum(0)
                del z, p, slope, delta
        grad_w = grad_w.to(weight.dtype) if need_w else None
        grad_b = grad_b.to(bias.dtype) if need_b else None
        return grad_h, grad_w, grad_b, None, None, None, None, None


def taxonomy_bins(stats: TokenStats, advantages: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """Counts, fractions and mean `pred_dentropy` of the bins crossed with the advantage sign.

    stats fields (B, T); advantages (B,); mask (B, T) bool. Keys, for each bin in `BINS`:
    `{bin}_count`, `{bin}_frac` (of all masked tokens), `{bin}_pred_dentropy` (NaN when the
    bin is empty). Detached tensors.
    """
    with torch.no_grad():
        sign = advantages.sign().unsqueeze(-1).expand_as(mask)
        peak = stats.is_peak
        cells = {
            "pos_peak": (sign > 0) & peak,
            "pos_valley": (sign > 0) & ~peak,
            "neg_peak": (sign < 0) & peak,
            "neg_valley": (sign < 0) & ~peak,
            "zero": sign == 0,
        }
        total = mask.sum().clamp(min=1)
        out: dict[str, Tensor] = {}
        for name, cell in cells.items():
            cell = cell & mask
            count = cell.sum()
            out[f"{name}_count"] = count
            out[f"{name}_frac"] = count / total
            dent = torch.where(cell, stats.pred_dentropy.float(), torch.zeros_like(stats.pred_dentropy.float()))
            out[f"{name}_pred_dentropy"] = dent.sum() / count  # 0/0 = NaN for an empty bin
        return out
