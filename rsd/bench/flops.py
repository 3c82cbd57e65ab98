"""FLOPs per stage and per chunk, counted with `torch.utils.flop_counter.FlopCounterMode` on the meta device.

The model is built on the meta device (no weights, no memory), so the `openvla-7b` figures come out on any CPU in
about a minute. The stages are those the speculative engine runs: vision (backbones, projector or MoE router,
embeddings), prefix (LLM layers `0 .. k-1`), draft (at layer k), suffix (layers `k .. N-1` and the final norm) and
the RFSQ head. Per chunk:

- plain forward (what `MainOnlyPolicy` runs): `vision + prefix + suffix + head`;
- early exit at acceptance p: `vision + prefix + draft + (1 - p) * (suffix + head)`.

Matrix products and attention are counted (a multiply-add is 2 FLOPs; attention is counted over the whole
`S × S` score matrix whatever the mask); norms, activations, top-k and gathers are not, nor is decoding tokens to
actions (a few small MLPs). Configurations follow the seed's debug order (`rsd.models.cogvla.debug_order`): plain →
+aggregation → +FiLM → +MoE → +LFP → +CAtten, each row adding one module to the row above.

Usage:
    report = flops_report("openvla-7b", exit_layer=16, acceptance=0.7)
    print(format_flops(report))
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from rsd.config import CogVLAConfig, DraftConfig, VLAConfig, to_dict
from rsd.errors import ConfigError
from rsd.models.cogvla import debug_order
from rsd.models.draft import DraftHead
from rsd.models.heads import RFSQHead
from rsd.models.vla import PrismaticVLA
from rsd.presets import get_preset

STAGES = ("vision", "prefix", "draft", "suffix", "head")
FLOP_PROMPT_TOKENS = 24  # prompt tokens of the counted forward (a short LIBERO instruction in OpenVLA's template)


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of running `fn()` (matrix products and attention; see the module docstring)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


@torch.no_grad()
def stage_flops(config: VLAConfig, draft_width: int, draft_heads: int, draft_ffn: int, exit_layer: int,
                prompt_tokens: int = FLOP_PROMPT_TOKENS) -> dict[str, Any]:
    """FLOPs of each stage `{vision, prefix, draft, suffix, head}` for one observation, with the LLM's token counts."""
    if not 0 <= exit_layer <= config.llm.num_layers:
        raise ConfigError(f"exit_layer: expected an int in 0..{config.llm.num_layers}, got {exit_layer!r}.")
    with torch.device("meta"):
        vla = PrismaticVLA(config).eval()
        head = RFSQHead(config.llm.hidden_size, config.tokenizer)
        draft = DraftHead(DraftConfig(hidden_size=config.llm.hidden_size, exit_layer=exit_layer, tokenizer=config.tokenizer,
                                      width=draft_width, num_heads=draft_heads, ffn_size=draft_ffn)).eval()
    inputs = vla.processor.random_inputs(1, prompt_tokens).to("meta")
    states: dict[str, Any] = {}
    flops = {
        "vision": count_flops(lambda: states.update(embed=vla.embed(inputs))),
        "prefix": count_flops(lambda: states.update(exit=vla.advance(states["embed"], exit_layer))),
        "draft": count_flops(lambda: draft.forward_logits(states["exit"].query_hidden)),
        "suffix": count_flops(lambda: states.update(hidden=vla.resume(states["exit"]))),
        "head": count_flops(lambda: head(states["hidden"])),
    }
    return {"flops": flops, "tokens_in": states["embed"].hidden.shape[1], "tokens_at_exit": states["exit"].hidden.shape[1],
            "num_patches": vla.vision_backbone.num_patches}


def chunk_flops(flops: dict[str, int], acceptance: float) -> dict[str, float]:
    """FLOPs per chunk of the plain forward and of early exit at `acceptance` from stage FLOPs."""
    if not 0.0 <= acceptance <= 1.0:
        raise ConfigError(f"acceptance: expected a value in [0, 1], got {acceptance}.")
    plain = flops["vision"] + flops["prefix"] + flops["suffix"] + flops["head"]
    early = flops["vision"] + flops["prefix"] + flops["draft"] + (1.0 - acceptance) * (flops["suffix"] + flops["head"])
    return {"full": float(plain), "early_exit": early}


def flops_report(preset: str, exit_layer: int | None = None, acceptance: float = 0.7, prompt_tokens: int = FLOP_PROMPT_TOKENS) -> dict[str, Any]:
    """FLOPs per stage and per chunk for each configuration of the debug order on `preset`'s shapes."""
    spec = get_preset(preset)
    k = spec.model.default_exit_layer if exit_layer is None else exit_layer
    sizes = (spec.draft_width, spec.draft_heads, spec.draft_ffn, k, prompt_tokens)
    plain = stage_flops(dataclasses.replace(spec.model, cogvla=CogVLAConfig()), *sizes)
    rows = []
    for name, config in debug_order(spec.model, plain["num_patches"]):
        counted = plain if name == "plain" else stage_flops(config, *sizes)
        rows.append({"config": name, "cogvla": to_dict(config.cogvla), **counted, **chunk_flops(counted["flops"], acceptance)})
    base = rows[0]["full"]
    for previous, row in zip([None, *rows], rows, strict=False):
        row["full_share"] = row["full"] / base
        row["early_exit_share"] = row["early_exit"] / base
        row["module_saves"] = 0.0 if previous is None else (previous["full"] - row["full"]) / base
    return {"preset": preset, "exit_layer": k, "acceptance": acceptance, "prompt_tokens": prompt_tokens, "rows": rows}


def format_flops(report: dict[str, Any]) -> str:
    """The FLOP table as markdown: GFLOPs per stage and per chunk, each row's share of the plain forward, and a summary line."""
    k, p = report["exit_layer"], report["acceptance"]
    lines = [f"## FLOPs per chunk ({report['preset']} shapes, 1 observation, {report['prompt_tokens']}-token prompt; "
             f"early exit at layer {k}, acceptance {p})", "",
             "| configuration | LLM tokens (in → at exit) | vision | prefix | draft | suffix | head | full forward | % of plain "
             "| this module | early exit | % of plain |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in report["rows"]:
        f = row["flops"]
        stages = " | ".join(f"{f[s] / 1e9:.4g}" for s in STAGES)
        change = "—" if row is report["rows"][0] else f"{-100 * row['module_saves']:+.1f} %"
        lines.append(f"| {row['config']} | {row['tokens_in']} → {row['tokens_at_exit']} | {stages} | {row['full'] / 1e9:.4g} | "
                     f"{100 * row['full_share']:.1f} % | {change} | {row['early_exit'] / 1e9:.4g} | {100 * row['early_exit_share']:.1f} % |")
    first, last = report["rows"][0], report["rows"][-1]
    lines += ["", f"GFLOPs (a multiply-add is 2). vision = backbones + projector or MoE + embeddings; prefix = LLM layers 0..{k - 1}; "
              f"suffix = layers {k}..N-1 + final norm; early exit = vision + prefix + draft + (1 - p)(suffix + head); "
              "'this module' = the change of the full forward against the row above, in % of plain.", "",
              f"Plain forward {first['full'] / 1e12:.2f} TFLOPs; every module of the last row with early exit: "
              f"{last['early_exit'] / 1e12:.2f} TFLOPs per chunk ({100 * last['early_exit_share']:.1f} % of plain)."]
    return "\n".join(lines) + "\n"


def flops_json_line(report: dict[str, Any]) -> str:
    """The one-line JSON summary printed last: TFLOPs per chunk of each configuration, full and with early exit."""
    def tflops(value: float) -> float:
        return float(f"{value / 1e12:.5g}")

    rows = {row["config"]: {"full_tflops": tflops(row["full"]), "early_exit_tflops": tflops(row["early_exit"]),
                            "early_exit_share": round(row["early_exit_share"], 4)} for row in report["rows"]}
    return json.dumps({"preset": report["preset"], "exit_layer": report["exit_layer"], "acceptance": report["acceptance"], "flops": rows})
