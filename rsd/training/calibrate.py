"""calibrate: choose the gate threshold tau from the draft's coverage/risk curve on held-out episodes.

For a threshold tau the gate accepts a chunk when the draft's confidence >= tau. On the draft's
validation episodes (never seen in its training) this measures, per tau:
- coverage: the share of chunks accepted;
- agreement: the share of coarse tokens equal to the main model's, among accepted chunks;
- risk: the share of accepted chunks whose decoded draft actions (C layers) differ from the main model's
  decoded actions (all L layers) by more than `eps` (max-abs over the chunk, normalised units).
The held-out episodes are split in two by episode: tau is the smallest threshold whose risk stays at or
below `target_risk` for every higher threshold on the calibration half, and the realised coverage and risk
are reported on the other (test) half. The gate statistic (mean or min token confidence) is the one that
gives more calibration coverage at the target risk unless one is named.

Usage:
    rsd calibrate --draft runs/demo/draft --features runs/demo/features --out runs/demo/calibration.json
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from rsd.data.chunks import split_episodes
from rsd.errors import ConfigError
from rsd.models.draft import DraftHead, token_confidence
from rsd.tokenizer import ActionTokenizer, layers_to_tokens
from rsd.training.features import Features, load_features

log = logging.getLogger(__name__)

Statistic = Literal["auto", "mean", "min"]


def chunk_error(tokenizer: ActionTokenizer, draft_layers: torch.Tensor, main_layers: torch.Tensor) -> torch.Tensor:
    """Max-abs difference `[N]` in normalised units between chunks decoded from `[N, C, H*d]` and `[N, L, H*d]`."""
    tok = tokenizer.config
    draft_actions = tokenizer.decode(layers_to_tokens(draft_layers, tok.chunk_len, tok.latent_dim))
    main_actions = tokenizer.decode(layers_to_tokens(main_layers, tok.chunk_len, tok.latent_dim))
    return ((draft_actions - main_actions).abs() * tokenizer.stats.normalized_scale()).amax(dim=(1, 2))


def risk_curve(confidence: np.ndarray, agreement: np.ndarray, bad: np.ndarray, taus: np.ndarray) -> list[dict[str, float]]:
    """Coverage, agreement among accepted and risk among accepted for every threshold in `taus`."""
    curve = []
    for tau in taus:
        accepted = confidence >= tau
        n = int(accepted.sum())
        curve.append(
            {
                "tau": float(tau),
                "coverage": float(accepted.mean()) if len(accepted) else 0.0,
                "agreement": float(agreement[accepted].mean()) if n else math.nan,
                "risk": float(bad[accepted].mean()) if n else 0.0,
                "accepted": n,
            }
        )
    return curve


def choose_tau(curve: list[dict[str, float]], target_risk: float) -> float:
    """The smallest tau whose risk, and the risk of every larger tau, is at most `target_risk` (inf if none)."""
    chosen = math.inf
    for point in sorted(curve, key=lambda p: p["tau"], reverse=True):
        if point["risk"] > target_risk:
            break
        chosen = point["tau"]
    return chosen


@torch.inference_mode()
def calibrate(
    draft: str | Path,
    features: str | Path,
    out: str | Path | None = None,
    eps: float = 0.05,
    target_risk: float = 0.02,
    statistic: Statistic = "auto",
    seed: int = 0,
    plot: bool = True,
) -> dict[str, Any]:
    """Measure the coverage/risk curve of `draft` on held-out feature rows and pick tau; write JSON and a plot."""
    if statistic not in ("auto", "mean", "min"):
        raise ConfigError(f"calibrate --statistic: expected auto, mean or min, got {statistic!r}.")
    if not 0.0 <= target_risk < 1.0 or eps <= 0:
        raise ConfigError(f"calibrate: expected 0 <= target_risk < 1 and eps > 0, got {target_risk}, {eps}.")
    feats = load_features(features)
    head, meta = DraftHead.load(
        draft,
        expect_hidden=int(feats.index["hidden_size"]),
        expect_exit_layer=feats.exit_layer,
        expect_fingerprint=feats.index["main_fingerprint"],
    )
    held_out = np.array(meta["val_episodes"])
    calib_eps, test_eps = split_episodes(held_out, 0.5, seed)
    results = {name: _measure(head, feats, feats.rows(eps_)) for name, eps_ in (("calibration", calib_eps), ("test", test_eps))}
    for measured in results.values():
        measured["bad"] = measured["error"] > eps
    candidates = ["mean", "min"] if statistic == "auto" else [statistic]
    choices = {}
    for stat in candidates:
        cal = results["calibration"]
        taus = _thresholds(cal[stat])
        curve = risk_curve(cal[stat], cal["agreement"], cal["bad"], taus)
        tau = choose_tau(curve, target_risk)
        coverage = float((cal[stat] >= tau).mean())
        choices[stat] = {"tau": tau, "coverage": coverage, "curve": curve}
    best = max(candidates, key=lambda s: choices[s]["coverage"])
    tau = choices[best]["tau"]
    test = results["test"]
    test_point = risk_curve(test[best], test["agreement"], test["bad"], np.array([tau]))[0]
    if math.isinf(tau):
        log.warning("calibrate: no threshold keeps the risk at or below %.3f; tau = inf (the draft is never accepted).", target_risk)
    report = {
        "kind": "calibration",
        "tau": tau,
        "gate_statistic": best,
        "eps": eps,
        "target_risk": target_risk,
        "exit_layer": feats.exit_layer,
        "main_fingerprint": feats.index["main_fingerprint"],
        "calibration": {"episodes": [int(e) for e in calib_eps], "frames": int(len(results["calibration"]["error"])),
                        "coverage": choices[best]["coverage"], "curve": choices[best]["curve"]},
        "test": {"episodes": [int(e) for e in test_eps], "frames": int(len(test["error"])), **test_point},
        "statistics_compared": {s: {"tau": c["tau"], "coverage": c["coverage"]} for s, c in choices.items()},
        "token_agreement_all": float(np.concatenate([r["agreement"] for r in results.values()]).mean()),
    }
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2, allow_nan=True) + "\n")
        if plot:
            plot_curve(report, test, out.with_suffix(".png"))
    return report


def _measure(head: DraftHead, feats: Features, rows: torch.Tensor) -> dict[str, np.ndarray]:
    """Confidence (mean, min), token agreement and chunk error of the draft on feature `rows`."""
    tok = feats.tokenizer.config
    logits = torch.cat([head.forward_logits(feats.exit_hidden[rows[i : i + 512]].float()) for i in range(0, len(rows), 512)])
    tokens, conf_mean, conf_min = token_confidence(logits)
    main = feats.main_tokens[rows]
    agreement = (tokens == main[:, : tok.coarse_layers]).float().flatten(1).mean(1)
    return {
        "mean": conf_mean.numpy(),
        "min": conf_min.numpy(),
        "agreement": agreement.numpy(),
        "error": chunk_error(feats.tokenizer, tokens, main).numpy(),
    }


def _thresholds(confidence: np.ndarray, count: int = 200) -> np.ndarray:
    """Candidate thresholds: 0, quantiles of the observed confidences, and +inf."""
    quantiles = np.quantile(confidence, np.linspace(0.0, 1.0, count)) if len(confidence) else np.array([])
    return np.unique(np.concatenate([[0.0], quantiles, [np.inf]]))


def plot_curve(report: dict[str, Any], test: dict[str, np.ndarray], path: Path) -> None:
    """Coverage, risk and agreement against tau (calibration half), the chosen tau marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = [p for p in report["calibration"]["curve"] if math.isfinite(p["tau"])]
    taus = [p["tau"] for p in curve]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(taus, [p["coverage"] for p in curve], label="coverage (acceptance rate)")
    ax.plot(taus, [p["risk"] for p in curve], label=f"risk (error > {report['eps']})")
    ax.plot(taus, [p["agreement"] for p in curve], label="token agreement | accepted")
    if math.isfinite(report["tau"]):
        ax.axvline(report["tau"], color="k", linestyle="--", label=f"tau = {report['tau']:.3f}")
    ax.axhline(report["target_risk"], color="r", linestyle=":", label="target risk")
    ax.set_xlabel(f"tau ({report['gate_statistic']} token confidence)")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8)
    ax.set_title(f"draft calibration, exit layer {report['exit_layer']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
