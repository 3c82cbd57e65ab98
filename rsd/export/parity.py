"""Parity of exported engines: each file loaded back through the runtime's engine class and compared with eager PyTorch.

A compiled graph is only worth running if it computes what the trained PyTorch module computes. So every
engine is loaded back through `rsd.runtime.engines` (what the bundle loader builds) and compared with eager
PyTorch on held-out inputs (logits max |diff|, token agreement — 100 % required in fp32 —, confidences, decoded
actions) at batch sizes 1, 5 and all rows, never the traced one (the batch dimension is dynamic). A figure
outside its tolerance is a ParityError.

Usage:
    hidden, tokens, source = parity_inputs(head, tokenizer, meta, features=None, seed=0)
    figures = draft_parity(reload_engine("onnx", graph, path, device), refs["draft"], refs["draft_fp32"], hidden, "fp32")
    check_parity("draft (onnx, fp32)", figures, "fp32")
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from rsd.device import resolve_dtype
from rsd.errors import CheckpointError, DataError, ParityError
from rsd.export.compile import Graph, copy_draft
from rsd.models.draft import DraftHead
from rsd.runtime.engines import DECODER_ENGINES, DRAFT_ENGINES, TorchDecoderEngine, TorchDraftEngine
from rsd.runtime.gate import top_probability
from rsd.tokenizer import ActionTokenizer, layers_to_tokens

PARITY_ROWS = 64  # held-out rows the draft is checked on (and as many token rows again for the decoders)
TOLERANCES = {
    "fp32": {"logits_max_abs": 1e-3, "confidence_max_abs": 1e-4, "min_token_agreement": 1.0},
    "fp16": {"logits_max_abs": 5e-2, "confidence_max_abs": 1e-2, "min_token_agreement": 0.99},
}
ACTION_TOLERANCE = 1e-4  # decoder max |diff|, relative to max(1, max |action|)


def parity_inputs(head: DraftHead, tok: ActionTokenizer, meta: dict[str, Any], features: str | Path | None,
                   seed: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Exit hidden rows `[N, hidden]` and decoder tokens `[M, H, d, L]` to check parity on, and where they come from."""
    cfg = tok.config
    generator = torch.Generator().manual_seed(seed)
    random_tokens = torch.randint(0, cfg.levels, (PARITY_ROWS, cfg.chunk_len, cfg.latent_dim, cfg.num_layers), generator=generator)
    if features is None:
        hidden = torch.randn(PARITY_ROWS, head.config.hidden_size, generator=generator)
        low, high = (torch.tensor(v, dtype=torch.float32) for v in (tok.stats.q01, tok.stats.q99))
        actions = low + (high - low) * torch.rand(PARITY_ROWS, cfg.chunk_len, cfg.action_dim, generator=generator)
        encoded = tok.encode(actions)
        source = (f"no --features given: seeded random rows (seed {seed}): exit hidden ~ N(0, 1), tokens from encoding uniform "
                  "random actions within q01..q99 and uniform random tokens")
    else:
        from rsd.training.features import load_features

        feats = load_features(features)
        if feats.index.get("main_fingerprint") != meta["main_fingerprint"] or feats.exit_layer != head.config.exit_layer:
            raise CheckpointError(f"{features}: features of main model {feats.index.get('main_fingerprint')!r} at exit layer "
                                  f"{feats.exit_layer}, but the draft was trained for {meta['main_fingerprint']!r} at exit layer "
                                  f"{head.config.exit_layer}. Pass the features the draft was trained on.")
        episodes = [int(e) for e in meta.get("val_episodes", [])]
        rows = feats.rows(episodes)
        if len(rows) == 0:
            raise DataError(f"{features}: expected frames of the draft's held-out episodes {episodes[:10]}, found none. "
                            "Pass the features the draft was trained on, or omit --features to check on random rows.")
        rows = rows[:: max(1, len(rows) // PARITY_ROWS)][:PARITY_ROWS]
        rows = rows.repeat(math.ceil(8 / len(rows)))[: max(8, len(rows))]  # at least 8 rows, so batches 1, 5 and N differ
        hidden = feats.exit_hidden[rows].float()
        encoded = layers_to_tokens(feats.gt_tokens[rows], cfg.chunk_len, cfg.latent_dim)
        source = f"held-out episodes of {features} ({len(episodes)} episodes), ground-truth tokens and uniform random tokens"
    tokens = torch.cat([encoded.to(torch.int64), random_tokens])
    return hidden, tokens, {"source": source, "rows": len(hidden), "decoder_rows": len(tokens), "seed": seed}


def references(head: DraftHead, tok: ActionTokenizer, precision: str, device: torch.device) -> dict[str, Any]:
    """Eager PyTorch engines the exported ones are compared with (the draft in fp32 and in `precision`)."""
    cfg = tok.config
    return {
        "draft": TorchDraftEngine(copy_draft(head, device, resolve_dtype(precision))),
        "draft_fp32": TorchDraftEngine(copy_draft(head, device, torch.float32)),
        **{f"decoder_c{c}": TorchDecoderEngine(tok.decoder_module().to(device), c) for c in (cfg.coarse_layers, cfg.num_layers)},
    }


def reload_engine(fmt: str, graph: Graph, path: Path, device: torch.device) -> Any:
    """Load the exported file through the runtime's engine class (what the bundle loader builds)."""
    if graph.name == "draft":
        return DRAFT_ENGINES[fmt](path, device, resolve_dtype(graph.precision))
    return DECODER_ENGINES[fmt](path, device, graph.example.shape[-1])


def batches(rows: torch.Tensor) -> list[torch.Tensor]:
    """Slices of 1, 5 and all rows: batch sizes other than the traced one."""
    sizes = sorted({1, min(5, len(rows)), len(rows)})
    return [rows[:size] for size in sizes]


@torch.inference_mode()
def draft_parity(engine: Any, reference: Any, reference_fp32: Any, hidden: torch.Tensor, precision: str) -> dict[str, Any]:
    """Logits / token confidence max |diff| and token agreement of a draft engine against eager PyTorch."""
    logits_diff = conf_diff = 0.0
    agree = agree_fp32 = total = 0
    for batch in batches(hidden):
        got, want, want32 = engine(batch), reference(batch), reference_fp32(batch)
        if tuple(got[0].shape) != tuple(want[0].shape) or got[1].dtype != torch.int64:
            raise ParityError(f"draft ({engine.name}): expected logits {tuple(want[0].shape)} and int64 tokens at batch "
                              f"{len(batch)}, got {tuple(got[0].shape)} and {got[1].dtype}; the batch dimension is not dynamic.")
        logits_diff = max(logits_diff, (got[0].float().cpu() - want[0].float().cpu()).abs().max().item())
        conf_diff = max(conf_diff, (top_probability(got[0].cpu()) - top_probability(want[0].cpu())).abs().max().item())
        agree += int((got[1].cpu() == want[1].cpu()).sum())
        agree_fp32 += int((got[1].cpu() == want32[1].cpu()).sum())
        total += got[1].numel()
    figures = {"reference": f"torch eager {precision}", "batch_sizes": [len(b) for b in batches(hidden)],
               "logits_max_abs": logits_diff, "token_agreement": agree / total, "confidence_max_abs": conf_diff,
               "tolerances": TOLERANCES[precision]}
    if precision != "fp32":
        figures["token_agreement_vs_fp32_eager"] = agree_fp32 / total
    return figures


@torch.inference_mode()
def decoder_parity(engine: Any, reference: Any, tokens: torch.Tensor) -> dict[str, Any]:
    """Actions max |diff| of a decoder engine against eager PyTorch on tokens `[M, H, d, c]`."""
    diff = scale = 0.0
    for batch in batches(tokens):
        got, want = engine(batch), reference(batch)
        if tuple(got.shape) != tuple(want.shape):
            raise ParityError(f"{engine.name} decoder: expected actions {tuple(want.shape)} at batch {len(batch)}, "
                              f"got {tuple(got.shape)}; the batch dimension is not dynamic.")
        diff = max(diff, (got.float().cpu() - want.float().cpu()).abs().max().item())
        scale = max(scale, want.abs().max().item())
    return {"reference": "torch eager fp32", "batch_sizes": [len(b) for b in batches(tokens)], "actions_max_abs": diff,
            "tolerance": ACTION_TOLERANCE * max(1.0, scale)}


def check_parity(label: str, parity: dict[str, Any], draft_precision: str | None) -> None:
    """Raise ParityError when a figure is outside its tolerance."""
    failures = []
    if draft_precision is None:
        if not parity["actions_max_abs"] <= parity["tolerance"]:
            failures.append(f"actions max |diff| {parity['actions_max_abs']:.3e} above {parity['tolerance']:.1e}")
    else:
        tol = TOLERANCES[draft_precision]
        if not parity["token_agreement"] >= tol["min_token_agreement"]:
            failures.append(f"token agreement {100 * parity['token_agreement']:.3f} % below {100 * tol['min_token_agreement']:.1f} %")
        if not parity["logits_max_abs"] <= tol["logits_max_abs"]:
            failures.append(f"logits max |diff| {parity['logits_max_abs']:.3e} above {tol['logits_max_abs']:.1e}")
        if not parity["confidence_max_abs"] <= tol["confidence_max_abs"]:
            failures.append(f"token confidence max |diff| {parity['confidence_max_abs']:.3e} above {tol['confidence_max_abs']:.1e}")
    if failures:
        raise ParityError(f"{label}: the exported engine does not compute what PyTorch computes: {'; '.join(failures)}. "
                          "Nothing was written as valid (no manifest). Try another --opset or format, or report the export bug.")
