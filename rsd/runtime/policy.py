"""Policies for the control loop: observation dict → action chunk → one action per step.

`SpeculativePolicy` pairs the frozen main model with a bundle's draft and decoder engines
(`rsd.runtime.speculative.SpeculativeEngine`); `MainOnlyPolicy` is the baseline with the same interface.
Both validate observations, keep an action queue (all H actions of a chunk are executed unless
`replan_every` says otherwise; docs/pitfalls.md #7), and return their own timing. When the gate accepts only
the draft's leading k steps ("prefix" mode, `rsd.runtime.gate`), the queue holds those k and the policy replans
after them: no step is executed twice or skipped.

Neither policy is thread-safe: the action queue and the statistics are per instance, so give each
control loop (thread) its own policy object; the model weights may be shared read-only.

Before the processor sees an observation, `check_observation` refuses what it cannot name well: a value that is
not numbers (proprio of strings, an image of objects), a NaN or inf in proprio (with its index), and a prompt longer
than `MAX_PROMPT_TOKENS` tokens (a long instruction makes every call slower; no robot task needs one).

With `compile=` ("auto", "aot", "inductor", "reduce-overhead" or a `CompileConfig`) the main model's segments
and the torch engines are compiled with static shapes and warmed up when the policy is built (`rsd.runtime.compiled`).

Usage:
    policy = SpeculativePolicy.from_bundle("runs/demo/bundle", main="runs/demo/policy", compile="auto")
    policy.reset()
    action = policy.act({"image": rgb_uint8_hw3, "instruction": "pick up the red block", "proprio": p})
    policies = [policy] + [policy.replica() for _ in range(7)]   # 8 episodes side by side, one batch per replan
    actions = act_batch(policies, observations)
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rsd.device import resolve_device_dtype
from rsd.errors import ConfigError, ObservationError, ShapeError
from rsd.models.main import MainModel
from rsd.models.processor import observation_batch
from rsd.runtime.bundle import load_bundle_engines
from rsd.runtime.compiled import CompileConfig, make_segments
from rsd.runtime.engines import TorchDecoderEngine
from rsd.runtime.gate import Gate
from rsd.runtime.speculative import MainOnlyEngine, SpeculativeEngine, Verify
from rsd.runtime.timing import RollingStats

log = logging.getLogger(__name__)

MAX_PROMPT_TOKENS = 128  # prompt tokens (template + instruction) a policy accepts; LIBERO's longest instructions need about 40


@dataclass
class ActionChunk:
    """One predicted chunk and how it was produced."""

    actions: np.ndarray  # [H, A] un-normalised actions
    accepted: bool  # the draft's chunk (or its leading steps) was returned
    steps: int  # leading steps of `actions` to execute (H unless a prefix of the draft was accepted)
    confidence: float  # the draft's gate statistic (nan for the main-only policy)
    tokens: np.ndarray  # [H, d, L] the decoded tokens (layers past C are the zero level when accepted)
    timings: dict[str, float]  # ms per stage: vision, prefix, draft, gate, suffix, head, decode (or llm); of the whole call in `act_batch`
    agreement: float | None = None  # share of coarse tokens where draft == main (verify="always")

    @property
    def total_ms(self) -> float:
        """Sum of the stage times."""
        return float(sum(self.timings.values()))


class _ChunkPolicy:
    """Shared control-loop behaviour: observation checks, the action queue, per-stage statistics."""

    def __init__(self, main: MainModel, engine: MainOnlyEngine | SpeculativeEngine, replan_every: int | None) -> None:
        chunk_len = main.tokenizer.config.chunk_len
        replan = chunk_len if replan_every is None else replan_every
        if not 1 <= replan <= chunk_len:
            raise ConfigError(f"replan_every: expected an int in 1..{chunk_len}, got {replan_every}.")
        self.main = main
        self.engine = engine
        self.replan_every = replan
        self._queue: deque[np.ndarray] = deque()
        self._since_plan = 0
        self._stats = RollingStats()
        self._calls = 0
        self._accepted = 0
        self._accepted_steps = 0
        self._agreements: deque[float] = deque(maxlen=2000)

    def predict_chunk(self, obs: dict[str, Any]) -> ActionChunk:
        """Check one observation (through the model's processor) and predict its action chunk `[H, A]`."""
        chunk = self._predict([obs])[0]
        self._record(chunk, latency=True)
        return chunk

    def _predict(self, observations: Sequence[dict[str, Any]]) -> list[ActionChunk]:
        """The chunks of `observations` (each checked as `predict_chunk` checks one) from one engine call on their batch,
        unrecorded; every chunk carries the call's stage timings."""
        proprio_dim = self.main.vla.config.proprio_dim
        for obs in observations:
            check_observation(obs, proprio_dim)
        parts = [observation_batch(obs, proprio_dim) for obs in observations]
        shapes = {part[0].shape[1:] for part in parts}
        if len(shapes) != 1:
            raise ObservationError(f"observations of one batch: expected frames of one shape [N, H, W, 3], got {sorted(shapes)}.")
        if len({part[2] is None for part in parts}) != 1:
            raise ObservationError("observations of one batch: expected proprio in all of them or in none, got a mix.")
        proprio = None if parts[0][2] is None else np.concatenate([part[2] for part in parts])
        inputs = self.main.prepare(np.concatenate([part[0] for part in parts]), [part[1][0] for part in parts], proprio)
        prompt_tokens = int(inputs.text_mask.sum(dim=1).max())
        if prompt_tokens > MAX_PROMPT_TOKENS:
            raise ObservationError(f"observation['instruction']: expected at most {MAX_PROMPT_TOKENS} prompt tokens (MAX_PROMPT_TOKENS: the "
                                   f"instruction in the prompt template), got {prompt_tokens}. Shorten the instruction.")
        result = self.engine.run(inputs)
        actions, tokens = result.actions.float().cpu().numpy(), result.tokens.cpu().numpy()
        return [ActionChunk(
            actions=actions[row],
            accepted=bool(result.accepted[row]),
            steps=int(result.steps[row]),
            confidence=float(result.confidence[row]),
            tokens=tokens[row],
            timings=result.timings,
            agreement=None if result.agreement is None else float(result.agreement[row]),
        ) for row in range(len(parts))]

    def _record(self, chunk: ActionChunk, latency: bool) -> None:
        """Count a chunk; its stage timings join the latency statistics only when they are its own (`latency`)."""
        self._calls += 1
        self._accepted += int(chunk.accepted)
        self._accepted_steps += chunk.steps if chunk.accepted else 0
        if chunk.agreement is not None:
            self._agreements.append(chunk.agreement)
        if latency:
            self._stats.add({**chunk.timings, "total": chunk.total_ms})

    def _needs_chunk(self) -> bool:
        """Whether the next action needs a new chunk (the queue is empty or `replan_every` steps were executed)."""
        return not self._queue or self._since_plan >= self.replan_every

    def _start(self, chunk: ActionChunk) -> None:
        """Queue a new chunk's executable steps (at most `replan_every`)."""
        self._queue = deque(chunk.actions[: min(self.replan_every, chunk.steps)])
        self._since_plan = 0

    def _pop(self) -> np.ndarray:
        """The next queued action `[A]`."""
        self._since_plan += 1
        return self._queue.popleft()

    def act(self, obs: dict[str, Any]) -> np.ndarray:
        """One action `[A]`: from the queue, replanning when it is empty (after the chunk's executable steps, at
        most `replan_every`)."""
        if self._needs_chunk():
            self._start(self.predict_chunk(obs))
        return self._pop()

    def replica(self) -> _ChunkPolicy:
        """A policy of the same class on the same model and engine with its own action queue and statistics: one per
        episode played side by side (`act_batch`)."""
        twin = object.__new__(type(self))
        _ChunkPolicy.__init__(twin, self.main, self.engine, self.replan_every)
        return twin

    def reset(self) -> None:
        """Forget queued actions (start of an episode); statistics are kept."""
        self._queue.clear()
        self._since_plan = 0

    def stats(self) -> dict[str, Any]:
        """Calls, accepted chunks and their steps, acceptance rate, agreement (verify="always"), per-stage ms."""
        return {
            "calls": self._calls,
            "accepted": self._accepted,
            "accepted_steps": self._accepted_steps,
            "acceptance_rate": self._accepted / self._calls if self._calls else math.nan,
            "mean_accepted_steps": self._accepted_steps / self._accepted if self._accepted else math.nan,
            "agreement": float(np.mean(self._agreements)) if self._agreements else None,
            "stages": self._stats.summary(),
            "compile": self.engine.segments.describe(),
        }


class MainOnlyPolicy(_ChunkPolicy):
    """The baseline policy: the whole main model for every chunk (no draft)."""

    def __init__(self, main: MainModel, replan_every: int | None = None, decoder: Any = None,
                 compile: CompileConfig | str = "none") -> None:
        tok = main.tokenizer.config
        full_decoder = decoder or TorchDecoderEngine(main.tokenizer.decoder_module(), tok.num_layers)
        super().__init__(main, MainOnlyEngine(main, full_decoder, make_segments(main, compile)), replan_every)
        if self.engine.segments.compiled:
            self.engine.warm_up()  # every graph compiled (and CUDA graphs captured) before the first observation

    @classmethod
    def from_pretrained(cls, policy_dir: str | Path, device: str | None = None, dtype: str | None = None, replan_every: int | None = None,
                        compile: CompileConfig | str = "none") -> MainOnlyPolicy:
        """Load a policy folder and wrap it as the baseline policy (`compile`: see `rsd.runtime.compiled`)."""
        return cls(load_main(policy_dir, device, dtype), replan_every, compile=compile)


class SpeculativePolicy(_ChunkPolicy):
    """The main model with an early-exit draft: accepted chunks skip the main model's upper layers."""

    def __init__(self, main: MainModel, engine: SpeculativeEngine, replan_every: int | None = None) -> None:
        super().__init__(main, engine, replan_every)

    @classmethod
    def from_bundle(
        cls,
        bundle: str | Path,
        main: str | Path | MainModel,
        device: str | None = None,
        dtype: str | None = None,
        engine: str = "auto",
        verify: Verify = "never",
        tau: float | None = None,
        replan_every: int | None = None,
        gate: Gate | None = None,
        compile: CompileConfig | str = "none",
    ) -> SpeculativePolicy:
        """Pair a bundle's engines with the main model it was made for (checked by fingerprint and shapes).

        The bundle's calibrated gate is used unless `gate` replaces it; `tau` replaces the threshold of either.
        `compile` compiles the main model's segments and the torch engines (`rsd.runtime.compiled`), warmed up here.
        """
        main_model = main if isinstance(main, MainModel) else load_main(main, device, dtype)
        loaded = load_bundle_engines(bundle, main_model, engine=engine)
        chosen = loaded.gate if gate is None else gate
        if tau is not None:
            chosen = dataclasses.replace(chosen, tau=float(tau))
        source = "from the bundle" if gate is None and tau is None else "given"
        log.info("speculative policy: exit layer %d, %s (%s), draft engine %s, verify=%s",
                 loaded.exit_layer, chosen.describe(), source, loaded.draft.name, verify)
        spec = SpeculativeEngine(main_model, loaded.draft, loaded.decoders, loaded.exit_layer, chosen, verify,
                                 make_segments(main_model, compile))
        if spec.segments.compiled:
            spec.warm_up()  # every graph compiled (and CUDA graphs captured) before the first observation
        return cls(main_model, spec, replan_every)


def act_batch(policies: Sequence[_ChunkPolicy], observations: Sequence[dict[str, Any]]) -> list[np.ndarray]:
    """One action `[A]` per policy for its observation, as each policy's `act` would return it; the chunks of all the
    policies that replan come from one engine call on their batch, so the policies must share one engine (`replica`).

    The stage timings of a batched call are not one chunk's latency: they stay out of the policies' statistics
    (calls and acceptance are counted).
    """
    if len(policies) != len(observations):
        raise ShapeError(f"act_batch: expected one observation per policy, got {len(observations)} for {len(policies)} policies.")
    if not policies:
        return []
    engine = policies[0].engine
    if any(policy.engine is not engine for policy in policies):
        raise ConfigError("act_batch: expected policies on one engine (made by `policy.replica()`), got policies on different engines.")
    replanning = [row for row, policy in enumerate(policies) if policy._needs_chunk()]
    if replanning:
        for row, chunk in zip(replanning, policies[0]._predict([observations[row] for row in replanning]), strict=True):
            policies[row]._record(chunk, latency=False)
            policies[row]._start(chunk)
    return [policy._pop() for policy in policies]


def check_observation(obs: Any, proprio_dim: int) -> None:
    """Refuse an observation whose image or proprio is not numbers, or whose proprio is not `proprio_dim` finite values."""
    if not isinstance(obs, dict):
        raise ObservationError(f"observation: expected a dict with 'image' and 'instruction', got {type(obs).__name__}.")
    if not isinstance(obs.get("instruction", ""), str):
        raise ObservationError(f"observation['instruction']: expected a non-empty string, got {type(obs['instruction']).__name__}.")
    raw = obs.get("image")
    for index, frame in enumerate(raw if isinstance(raw, (list, tuple)) else [] if "image" not in obs else [raw]):
        array = _numbers(frame, f"observation['image']{'' if not isinstance(raw, (list, tuple)) else f'[{index}]'}")
        if array.dtype != np.uint8 and not np.issubdtype(array.dtype, np.floating):
            raise ObservationError(f"observation['image']: expected uint8 frames [H, W, 3] (or float in [0, 1]), got dtype {array.dtype}.")
    if proprio_dim == 0 or obs.get("proprio") is None:
        return
    proprio = _numbers(obs["proprio"], "observation['proprio']")
    if proprio.shape != (proprio_dim,):
        raise ObservationError(f"observation['proprio']: expected {proprio_dim} numbers [{proprio_dim}], got shape {proprio.shape}.")
    bad = np.flatnonzero(~np.isfinite(proprio.astype(np.float64)))
    if bad.size:
        raise ObservationError(f"observation['proprio']: expected finite values, got {proprio[bad[0]]} at index {int(bad[0])}"
                               f"{f' (and {bad.size - 1} more)' if bad.size > 1 else ''}.")


def _numbers(value: Any, what: str) -> np.ndarray:
    """`value` as a numeric array (bool excluded), else an ObservationError naming `what` and what arrived."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    try:
        array = np.asarray(value)
    except (ValueError, TypeError) as error:
        raise ObservationError(f"{what}: expected an array of numbers, got {type(value).__name__} that is not one ({error}).") from error
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise ObservationError(f"{what}: expected an array of numbers, got {type(value).__name__} of dtype {array.dtype}.")
    return array


def load_main(policy_dir: str | Path, device: str | None, dtype: str | None) -> MainModel:
    """Load a policy folder on the resolved device and dtype (resolved once and logged)."""
    torch_device, torch_dtype = resolve_device_dtype(device, dtype)
    return MainModel.load(policy_dir, device=torch_device, dtype=torch_dtype)
