"""wapo: stable RL with verifiable rewards for language models (WAPO and its baselines).

The public API (see README.md):

    wapo.compute_advantages(name, rewards, group_size)          # advantages.py
    wapo.policy_loss(name, logprobs, old_logprobs, advantages, mask, max_len=..., ...)  # losses.py
    wapo.kl_penalty(logprobs, ref_logprobs, mask, beta=..., estimator="k3")
    wapo.token_stats(logits, tokens)                             # taxonomy.py
    wapo.chunked_token_stats(hidden, head, tokens, ...)            # head: wapo.OutputHead or a weight
    wapo.taxonomy_bins(stats, advantages, mask)
    wapo.LOSSES, wapo.ADVANTAGES                                 # registries
"""

from wapo.advantages import ADVANTAGES, compute_advantages
from wapo.losses import DEFAULT_ADVANTAGE, LOSSES, LossOutput, kl_penalty, policy_loss
from wapo.registry import Registry
from wapo.taxonomy import BINS, OutputHead, TokenStats, chunked_token_stats, taxonomy_bins, token_stats

__version__ = "0.1.0"

__all__ = [
    "ADVANTAGES",
    "BINS",
    "DEFAULT_ADVANTAGE",
    "LOSSES",
    "LossOutput",
    "OutputHead",
    "Registry",
    "TokenStats",
    "chunked_token_stats",
    "compute_advantages",
    "kl_penalty",
    "policy_loss",
    "taxonomy_bins",
    "token_stats",
]
