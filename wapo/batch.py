"""A sampled batch as tensors, and the policy's per-token statistics on any subset of its rows.

Rows keep their prompt and completion token ids as lists; each micro-batch is padded only to
its own longest row. Log-probabilities and the taxonomy come from the memory-safe chunked path
(`wapo.taxonomy.chunked_token_stats`) applied to the hidden states of the completion's
trained positions and the policy's output head (`wapo.models.output_head`: its output layer
with any logit scaling or soft-capping): no (tokens × vocabulary) logits are ever materialised.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from wapo.models import cache_argument, decoder, output_head
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
    sampler_stats: TokenStats | None = None  # (B, T) fields: the taxonomy recorded while sampling

    @classmethod
    def from_episodes(cls, episodes: list[Episode], advantages: Tensor) -> RolloutBatch:
        width = max((len(e.completion_ids) for e in episodes), default=1) or 1
        n = len(episodes)
        ids = torch.zeros(n, width, dtype=torch.long)
        mask = torch.zeros(n, width, dtype=torch.bool)
        old = torch.zeros(n, width)
        recorded = bool(episodes) and all(e.behaviour_stats is not None for e in episodes)
        stats = {f.name: torch.zeros(n, width, dtype=torch.bool if f.name == "is_peak" else torch.float32)
                 for f in dataclasses.fields(TokenStats)} if recorded else None
        for i, e in enumerate(episodes):
            k = len(e.completion_ids)
            ids[i, :k] = torch.as_tensor(e.completion_ids, dtype=torch.long)
            mask[i, :k] = torch.as_tensor(e.completion_mask, dtype=torch.bool)
            old[i, :k] = torch.as_tensor(e.behaviour_logprobs, dtype=torch.float32)
            for name, values in (stats or {}).items():
                values[i, :k] = getattr(e.behaviour_stats, name)
        return cls([e.prompt_ids for e in episodes], ids, mask, old, advantages.float(),
                   [len(e.completion_ids) for e in episodes], TokenStats(**stats) if recorded else None)

    def recorded_stats(self, rows: list[int]) -> TokenStats | None:
        """The sampler's taxonomy of `rows` ((len(rows), T) fields), or None when it was not recorded."""
        if self.sampler_stats is None:
            return None
        return TokenStats(**{f.name: getattr(self.sampler_stats, f.name)[rows]
                             for f in dataclasses.fields(TokenStats)})

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def micro_batches(self, rows: list[int], size: int) -> list[list[int]]:
        """`rows` cut into chunks of `size`, ordered by prompt then completion length.

        Rows of one prompt land together (their prompt is run once per chunk) and each chunk
        is padded only to its own longest completion.
        """
        ordered = sorted(rows, key=lambda i: (len(self.prompt_ids[i]), self.prompt_ids[i], self.lengths[i]))
        return [ordered[i:i + size] for i in range(0, len(ordered), size)]


def row_token_stats(model, batch: RolloutBatch, rows: list[int], *, temperature: float, chunk_size: int,
                    autocast_dtype: torch.dtype | None = None, share_prompts: bool = True) -> TokenStats:
    """Per-token statistics (len(rows), T) of the policy on `rows`, zero outside the mask.

    `logp` is differentiable when called with grad enabled; the other fields are detached.
    `share_prompts` runs each distinct prompt once (see `_hidden_shared_prompts`).
    """
    device = next(model.parameters()).device
    mask = batch.mask[rows]
    r_idx, j_idx = mask.nonzero(as_tuple=True)
    body = decoder(model)
    hidden_of = _hidden_full if not share_prompts or _checkpointing(body) else _hidden_shared_prompts
    with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        hidden = hidden_of(body, batch, rows, r_idx, j_idx, device)
        stats = chunked_token_stats(hidden, output_head(model), batch.completion_ids[rows][r_idx, j_idx].to(device),
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


def _hidden_full(body, batch: RolloutBatch, rows: list[int], r_idx: Tensor, j_idx: Tensor, device) -> Tensor:
    """Final hidden states that predict completion tokens (r_idx, j_idx), one full sequence a row.

    Rows are right-padded prompt + completion; completion token j of row r sits at index
    p_r + j and is predicted by the hidden state at p_r + j − 1.
    """
    seqs = [batch.prompt_ids[i] + batch.completion_ids[i, : batch.lengths[i]].tolist() for i in rows]
    width = max(map(len, seqs))
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    attention = torch.zeros(len(rows), width, dtype=torch.long)
    for r, s in enumerate(seqs):
        input_ids[r, : len(s)] = torch.as_tensor(s)
        attention[r, : len(s)] = 1
    hidden = body(input_ids=input_ids.to(device), attention_mask=attention.to(device), use_cache=False).last_hidden_state
    prompt_lens = torch.as_tensor([len(batch.prompt_ids[i]) for i in rows])
    return hidden[r_idx.to(device), (prompt_lens[r_idx] + j_idx - 1).to(device)]


def _hidden_shared_prompts(body, batch: RolloutBatch, rows: list[int], r_idx: Tensor, j_idx: Tensor,
                           device) -> Tensor:
    """The same hidden states as `_hidden_full`, running each distinct prompt only once.

    The G samples of a prompt share it, so the prompts are run once (left-padded, as when
    sampling) and their KV cache is gathered per row for one pass over the completions;
    gradients flow through the cache into the prompt pass. With prompts longer than the
    completions, as in short-answer RLVR, this cuts the tokens of a training pass ~2-3×.
    """
    distinct: dict[tuple[int, ...], int] = {}
    row_prompt = torch.as_tensor([distinct.setdefault(tuple(batch.prompt_ids[i]), len(distinct)) for i in rows])
    prompts = list(distinct)
    width = max(map(len, prompts))
    p_ids = torch.zeros(len(prompts), width, dtype=torch.long)
    p_mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for u, p in enumerate(prompts):
        p_ids[u, width - len(p):] = torch.as_tensor(p)
        p_mask[u, width - len(p):] = 1
    cache_arg = cache_argument(body)
    out = body(input_ids=p_ids.to(device), attention_mask=p_mask.to(device),
               position_ids=(p_mask.cumsum(-1) - 1).clamp(min=0).to(device), use_cache=True)
    cache = getattr(out, cache_arg)
    cache.batch_select_indices(row_prompt.to(device))  # (U, ...) -> one copy per row, differentiable
    length = max(batch.lengths[i] for i in rows)
    c_ids = batch.completion_ids[rows][:, :length]
    c_mask = (torch.arange(length) < torch.as_tensor([batch.lengths[i] for i in rows]).unsqueeze(-1)).long()
    prompt_lens = torch.as_tensor([len(p) for p in prompts])[row_prompt]
    positions = prompt_lens.unsqueeze(-1) + torch.arange(length)
    completion = body(input_ids=c_ids.to(device), attention_mask=torch.cat([p_mask[row_prompt], c_mask], -1).to(device),
                      position_ids=positions.to(device), use_cache=True, **{cache_arg: cache}).last_hidden_state
    # completion token 0 is predicted by the prompt's last state, token j > 0 by completion state j − 1
    predicting = torch.cat([out.last_hidden_state[row_prompt.to(device), -1:], completion[:, :-1]], dim=1)
    return predicting[r_idx.to(device), j_idx.to(device)]


def _checkpointing(body) -> bool:
    """Gradient checkpointing drops the KV cache inside layers: the shared-prompt path needs it."""
    return any(getattr(m, "gradient_checkpointing", False) for m in body.modules())
