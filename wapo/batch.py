"""A sampled batch as tensors, and the policy's per-token statistics on any subset of its rows.

Rows keep their prompt and completion token ids as lists; each micro-batch is padded only to
its own longest row. Log-probabilities and the taxonomy come from the memory-safe chunked path
(`wapo.taxonomy.chunked_token_stats`) applied to the hidden states of the completion's
trained positions only: no (tokens × vocabulary) logits are ever materialised.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from wapo.models import decoder, output_layer
from wapo.sampling import Episode
from wapo.taxonomy import TokenStats, chunked_token_stats


@dataclass
class RolloutBatch:
    """B episodes in groups of G adjacent rows; completion tensors are (B, T)."""

    prompt_ids: list[list[int]]
    completion_ids: Tensor  # (B, T) long, 0 past each row's end
    mask: Tensor  # (B, T) bool: model tokens (environment tokens and padding are False)
    old_logprobs: Tensor  # (B, T) behaviour log-probabilities
    advantages: Tensor  # (B,)
    lengths: list[int]  # completion length of each row (model + environment tokens)

    @classmethod
    def from_episodes(cls, episodes: list[Episode], advantages: Tensor) -> RolloutBatch:
        width = max((len(e.completion_ids) for e in episodes), default=1) or 1
        n = len(episodes)
        ids = torch.zeros(n, width, dtype=torch.long)
        mask = torch.zeros(n, width, dtype=torch.bool)
        old = torch.zeros(n, width)
        for i, e in enumerate(episodes):
            k = len(e.completion_ids)
            ids[i, :k] = torch.as_tensor(e.completion_ids, dtype=torch.long)
            mask[i, :k] = torch.as_tensor(e.completion_mask, dtype=torch.bool)
            old[i, :k] = torch.as_tensor(e.behaviour_logprobs, dtype=torch.float32)
        return cls([e.prompt_ids for e in episodes], ids, mask, old, advantages.float(),
                   [len(e.completion_ids) for e in episodes])

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def micro_batches(self, rows: list[int], size: int) -> list[list[int]]:
        """`rows` sorted by total length and cut into chunks of `size` (less padding per chunk)."""
        ordered = sorted(rows, key=lambda i: len(self.prompt_ids[i]) + self.lengths[i])
        return [ordered[i:i + size] for i in range(0, len(ordered), size)]


def row_token_stats(model, batch: RolloutBatch, rows: list[int], *, temperature: float,
                    chunk_size: int, autocast_dtype: torch.dtype | None = None) -> TokenStats:
    """Per-token statistics (len(rows), T) of the policy on `rows`, zero outside the mask.

    `logp` is differentiable when called with grad enabled; the other fields are detached.
    """
    device = next(model.parameters()).device
    mask = batch.mask[rows]
    seqs = [batch.prompt_ids[i] + batch.completion_ids[i, : batch.lengths[i]].tolist() for i in rows]
    width = max(map(len, seqs))
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    attention = torch.zeros(len(rows), width, dtype=torch.long)
    for r, s in enumerate(seqs):
        input_ids[r, : len(s)] = torch.as_tensor(s)
        attention[r, : len(s)] = 1
    # completion token (r, j) sits at sequence index p_r + j and is predicted at p_r + j - 1
    r_idx, j_idx = mask.nonzero(as_tuple=True)
    prompt_lens = torch.as_tensor([len(batch.prompt_ids[i]) for i in rows])
    pos = prompt_lens[r_idx] + j_idx - 1
    with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        hidden = decoder(model)(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                                use_cache=False).last_hidden_state
        weight, bias = output_layer(model)
        stats = chunked_token_stats(hidden[r_idx.to(device), pos.to(device)], weight,
                                    batch.completion_ids[rows][r_idx, j_idx].to(device), bias=bias,
                                    temperature=temperature, chunk_size=chunk_size)
    shape = mask.shape

    def scatter(values: Tensor, dtype=torch.float32) -> Tensor:
        out = torch.zeros(shape, dtype=dtype, device=values.device)
        return out.index_put((r_idx.to(values.device), j_idx.to(values.device)), values.to(dtype))

    return TokenStats(
        logp=scatter(stats.logp),
        entropy=scatter(stats.entropy),
        collision=scatter(stats.collision),
        is_peak=scatter(stats.is_peak, torch.bool),
        pred_dlogp=scatter(stats.pred_dlogp),
        pred_dentropy=scatter(stats.pred_dentropy),
    )
