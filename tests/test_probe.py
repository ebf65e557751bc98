"""`wapo probe`: the exact logit step against the forecast, and real updates on the tiny model."""

from __future__ import annotations

import json
import math

import pytest
import torch

from wapo import config as cfg
from wapo.cli import main
from wapo.probe import PROBE_BINS, logit_step_deltas, probe
from wapo.taxonomy import token_stats


def test_logit_step_on_two_tokens_by_hand():
    # V = 2, z = (0, 0), s = 0: p = (1/2, 1/2), C = 1/2, pred_dlogp = 1 − 2·(1/2) + 1/2 = 1/2, pred_dentropy = 0.
    # The step ηA = 0.1 moves z by 0.1·(1/2, −1/2): the gap z_0 − z_1 becomes 0.1, p_s = σ(0.1) = 0.524979,
    # Δ log p_s = log 0.524979 − log 0.5 = −0.644397 + 0.693147 = 0.048751 (forecast 0.1 · 1/2 = 0.05);
    # ΔH = H(σ(0.1)) − log 2 = −0.001248 (second order: the forecast is 0)
    dlogp, dentropy = logit_step_deltas(torch.zeros(1, 2, dtype=torch.float64), torch.tensor([0]),
                                        torch.tensor([0.1], dtype=torch.float64))
    p = 1 / (1 + math.exp(-0.1))
    assert dlogp.item() == pytest.approx(math.log(p) - math.log(0.5), abs=1e-12)
    assert dlogp.item() == pytest.approx(0.048751, abs=1e-6)
    assert dentropy.item() == pytest.approx(-(p * math.log(p) + (1 - p) * math.log(1 - p)) - math.log(2), abs=1e-12)
    assert dentropy.item() == pytest.approx(-0.001248, abs=1e-6)


def _random_positions(n=400, vocab=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(n, vocab, generator=g, dtype=torch.float64)
    tokens = torch.multinomial(torch.softmax(logits, -1), 1, generator=g).squeeze(-1)
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.25], dtype=torch.float64).repeat(n // 4)
    return logits, tokens, advantages


@pytest.mark.parametrize("eta", [1e-3, 0.1, 1.0, 3.0])
def test_the_logit_step_moves_log_p_with_the_sign_of_a_at_any_eta(eta):
    # every gap z_s − z_k grows by ηA·(1 − p_s + p_k), whose sign is A's: p_s moves with A, however far
    logits, tokens, advantages = _random_positions()
    dlogp, _ = logit_step_deltas(logits, tokens, eta * advantages)
    assert bool((dlogp * advantages > 0).all())


def test_the_logit_step_matches_the_forecast_to_first_order():
    logits, tokens, advantages = _random_positions()
    forecast = token_stats(logits, tokens)

    def error(eta):  # largest gap between the real change per unit ηA and the forecast
        dlogp, dentropy = logit_step_deltas(logits, tokens, eta * advantages)
        step = eta * advantages
        return ((dlogp / step - forecast.pred_dlogp).abs().max().item(),
                (dentropy / step - forecast.pred_dentropy).abs().max().item())

    coarse, fine = error(1e-4), error(1e-5)
    assert max(fine) < 1e-4
    for c, f in zip(coarse, fine):  # the gap is O(η): ten times smaller for a ten times smaller step
        assert 8 < c / f < 12


@pytest.fixture
def probe_config(tiny_model_dir, tmp_path):
    return cfg.from_dict({
        "model": {"model": tiny_model_dir, "bf16": "false", "bf16_sampling": "false"},
        "env": {"env": "test_digit"},
        "sampling": {"prompts_per_step": 2, "samples_per_prompt": 4, "max_new_tokens": 6, "temperature": 3.0},
        "algorithm": {"loss": "grpo"},
        "optim": {"lr": 1e-3, "micro_batch_size": 3},
        "run": {"seed": 1, "progress": False},
    })


def test_an_update_with_zero_step_changes_nothing_so_every_sign_disagrees(probe_config):
    # SGD at lr 0: the re-scored tokens equal the first scoring bit for bit (Δ = 0 everywhere), so the
    # restore and the two passes add no noise of their own; "real · forecast > 0" then never holds
    rows = probe(probe_config, batches=1, sgd_lr=0.0, updates=("sgd",))
    assert {r["bin"] for r in rows} == set(PROBE_BINS)
    by_bin = {r["bin"]: r for r in rows}
    assert by_bin["all"]["tokens"] == sum(by_bin[b]["tokens"] for b in PROBE_BINS if b != "all") > 0
    for r in rows:
        if r["tokens"]:
            assert r["dlogp_agree"] == 0 and r["dentropy_agree"] == 0 and r["mean_dlogp"] == 0


def test_probe_command_reports_every_update_kind(probe_config, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "probe.json"
    assert main(["probe", "--model", tiny_model_dir, "--env", "test_digit", "--prompts-per-step", "2",
                 "--samples-per-prompt", "4", "--max-new-tokens", "6", "--temperature", "3.0", "--loss", "grpo",
                 "--seed", "1", "--batches", "2", "--logit-eta", "1e-3", "--sgd-lr", "0.5", "--lr", "1e-3",
                 "--json", str(out)]) == 0
    assert "Δlogp sign" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["loss"] == "grpo" and result["batches"] == 2
    rows = {(r["update"], r["bin"]): r for r in result["rows"]}
    assert {u for u, _ in rows} == {"logits", "sgd", "adamw"}
    for (update, name), r in rows.items():
        assert r["tokens"] == rows[("logits", name)]["tokens"]  # the same tokens under every update
        if r["tokens"] and update == "logits":
            assert r["dlogp_agree"] == 1.0  # the theorem: Δ log p_s has the sign of A
            assert r["dentropy_agree"] > 0.9  # first order at η = 1e-3 (not a theorem where ΔH's forecast ≈ 0)
        if r["tokens"]:
            assert 0 <= r["dlogp_agree"] <= 1 and r["mean_dlogp"] != 0  # the real updates moved the tokens
    assert rows[("sgd", "all")]["tokens"] > 0


def _probe_json(path, loss: str, tokens: list[int], shift: float, lr: float = 2e-5):
    """A `wapo probe --json` file. Bin k (pos peak, pos valley, neg peak, neg valley, all) holds tokens[k]
    tokens (all: their sum); under update j (logits, sgd, adamw) Δ log p agrees for 0.5 + shift·k + 0.1·j
    of them and ΔH for 0.25 + 0.1·j; mean Δ log p is −0.01·(k + 1) − j, mean ΔH shift − 0.1·j."""
    bins = ("pos_peak", "pos_valley", "neg_peak", "neg_valley", "all")
    rows = [{"update": u, "bin": b, "tokens": n, "dlogp_agree": 0.5 + shift * k + 0.1 * j,
             "dentropy_agree": 0.25 + 0.1 * j, "mean_dlogp": -0.01 * (k + 1) - j, "mean_dentropy": shift - 0.1 * j}
            for j, u in enumerate(("logits", "sgd", "adamw"))
            for k, (b, n) in enumerate(zip(bins, tokens + [sum(tokens)]))]
    path.write_text(json.dumps({"model": "m", "env": "arithmetic", "loss": loss, "batches": 5, "logit_eta": 0.01,
                                "sgd_lr": 0.1, "lr": lr, "rows": rows}))
    return path


def test_the_probe_tables_print_shares_and_refuse_probes_of_other_batches(tmp_path, benchmark_script):
    table = benchmark_script("probe_table")
    grpo = table.load(_probe_json(tmp_path / "g.json", "grpo", [20, 10, 40, 30], 0.1))
    wapo = table.load(_probe_json(tmp_path / "w.json", "wapo", [20, 10, 40, 30], 0.05))
    lines = table.agreement_table(grpo[1])
    # pos valley (k = 1): 10 of 100 tokens; Δ log p agreement 0.5 + 0.1 · 1 + 0.1 · j = 60%, 70%, 80% under
    # logits, SGD, AdamW; ΔH 25%, 35%, 45%
    assert lines[3] == "| pos valley (10%) | 60% | 70% | 80% | 25% | 35% | 45% |"
    lines = table.change_table(grpo, wapo)
    # neg peak (k = 2): Δ log p −0.03 − 1 (SGD) and −0.03 − 2 (AdamW) on both sides; ΔH under SGD
    # 0.1 − 0.1 = 0 against 0.05 − 0.1 = −0.05, under AdamW 0.1 − 0.2 = −0.1 against 0.05 − 0.2 = −0.15
    assert lines[4] == "| neg peak | 40 | -1.030 / -1.030 | +0.000 / -0.050 | -2.030 / -2.030 | -0.100 / -0.150 |"
    assert lines[6] == "| all | 100 | -1.050 / -1.050 | +0.000 / -0.050 | -2.050 / -2.050 | -0.100 / -0.150 |"
    other = table.load(_probe_json(tmp_path / "o.json", "wapo", [21, 10, 39, 30], 0.05))
    with pytest.raises(SystemExit, match="different batches"):
        table.change_table(grpo, other)


def test_the_probe_tables_refuse_other_step_sizes_and_show_what_rounding_would_hide(tmp_path, benchmark_script):
    table = benchmark_script("probe_table")
    grpo = table.load(_probe_json(tmp_path / "g.json", "grpo", [20, 10, 40, 30], 0.1))
    # the same tokens under another AdamW rate: the mean changes would compare step sizes, not objectives
    other_lr = table.load(_probe_json(tmp_path / "w.json", "wapo", [20, 10, 40, 30], 0.05, lr=1e-4))
    with pytest.raises(SystemExit, match="differ in lr"):
        table.change_table(grpo, other_lr)
    _, rows = grpo
    # 1 − 1/1671 = 99.94%: "100%" would read as every token; an exact 1 stays "100%", a bin without a token "—"
    rows[("logits", "pos_peak")].update(dlogp_agree=1.0, dentropy_agree=1 - 1 / 1671)
    rows[("sgd", "neg_peak")].update(dlogp_agree=0.0004, dentropy_agree=0.0)
    rows[("adamw", "pos_valley")].update(tokens=0, dlogp_agree=None, dentropy_agree=None,
                                         mean_dlogp=None, mean_dentropy=None)
    lines = table.agreement_table(rows)
    # pos peak (k = 0): Δ log p 1.0, 0.6, 0.7; ΔH 99.94%, 35%, 45%
    assert lines[2] == "| pos peak (20%) | 100% | 60% | 70% | 99.9% | 35% | 45% |"
    assert lines[3] == "| pos valley (10%) | 60% | 70% | — | 25% | 35% | — |"
    # neg peak (k = 2): Δ log p 0.7, 0.04%, 0.9; ΔH 25%, 0, 45%
    assert lines[4] == "| neg peak (40%) | 70% | 0.0% | 90% | 25% | 0% | 45% |"
    assert table.change_table(grpo, grpo)[3] == "| pos valley | 10 | -1.020 / -1.020 | +0.000 / +0.000 | — / — | — / — |"


def test_each_update_starts_from_the_same_weights(probe_config):
    # SGD first, then AdamW: the weights SGD moved are restored, so AdamW's changes are those of
    # AdamW alone (the batches are the same: an update draws no random numbers)
    both = probe(probe_config, batches=2, sgd_lr=0.5, updates=("sgd", "adamw"))
    alone = probe(probe_config, batches=2, updates=("adamw",))
    assert [r for r in both if r["update"] == "adamw"] == alone
    assert any(r["mean_dlogp"] for r in alone)


def test_the_adamw_update_takes_the_configured_rate_whatever_the_warmup(probe_config):
    # the probe's AdamW step is at optim.lr, as it prints and records: a warm-up (whose first step would
    # be at lr / 4 in training) does not shrink it
    warm = cfg.from_dict({"optim": {"warmup_steps": 4}}, probe_config)
    assert probe(warm, batches=1, updates=("adamw",)) == probe(probe_config, batches=1, updates=("adamw",))
