"""Thin adapters that put wapo's objectives, estimators and taxonomy inside other trainers.

    wapo.integrations.trl    `WAPOTrainer` (a `trl.GRPOTrainer`) and `reward_funcs(env)`
    wapo.integrations.verl   registers the advantage estimator and policy loss "wapo" in verl

Each adapter calls the same core functions as `wapo train` (`wapo.policy_loss`,
`wapo.compute_advantages`, `wapo.chunked_token_stats`, `wapo.taxonomy_bins`). The core never
imports this package; each module needs its library (`pip install wapo[trl]`, `wapo[verl]`).
See docs/integrations.md.
"""
