"""SpeculativePolicy and MainOnlyPolicy on the tiny preset: the gate rule, exactness, the queue, bad input."""

from __future__ import annotations

import dataclasses
import gc
import math

import numpy as np
import pytest
import torch
from conftest import make_observation
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays

from rsd.errors import ConfigError, DataError, RsdError
from rsd.models.draft import DraftHead
from rsd.runtime.compiled import Segments
from rsd.runtime.engines import TorchDecoderEngine, TorchDraftEngine
from rsd.runtime.gate import Gate
from rsd.runtime.policy import MainOnlyPolicy, SpeculativePolicy
from rsd.runtime.speculative import EngineResult, SpeculativeEngine
from rsd.tokenizer import layers_to_tokens

EXIT = 3


def speculative(main, tau, verify="never", exit_layer=EXIT, replan_every=None, gate=None):
    """A speculative policy with a seeded random draft (the runtime's logic does not depend on its training)."""
    torch.manual_seed(1)
    from rsd.presets import get_preset

    draft = DraftHead(get_preset("tiny").draft(exit_layer)).eval()
    tok = main.tokenizer.config
    decoders = {c: TorchDecoderEngine(main.tokenizer.decoder_module(), c) for c in (tok.coarse_layers, tok.num_layers)}
    engine = SpeculativeEngine(main, TorchDraftEngine(draft), decoders, exit_layer, gate or Gate(tau=tau), verify)
    return SpeculativePolicy(main, engine, replan_every), draft


def test_tau_zero_returns_the_decoded_draft_tokens(tiny_main):
    policy, draft = speculative(tiny_main, 0.0)
    obs = make_observation()
    chunk = policy.predict_chunk(obs)
    assert chunk.accepted
    with torch.inference_mode():
        inputs = tiny_main.prepare(obs["image"][None, None], [obs["instruction"]], obs["proprio"][None])
        exit_hidden = tiny_main.vla.prefix(inputs, EXIT).query_hidden
        out = draft(exit_hidden)
        tok = tiny_main.tokenizer.config
        expected = tiny_main.tokenizer.decode(layers_to_tokens(out.tokens, tok.chunk_len, tok.latent_dim))
    assert np.array_equal(chunk.actions, expected[0].numpy())
    top = torch.softmax(out.logits.float(), dim=-1).amax(dim=-1)  # the default gate: the mean max-softmax probability
    assert chunk.confidence == pytest.approx(float(top[0].mean()))
    assert set(chunk.timings) >= {"vision", "prefix", "draft", "gate", "decode"}
    assert "suffix" not in chunk.timings


def test_tau_inf_returns_exactly_the_main_only_chunk(tiny_main):
    policy, _ = speculative(tiny_main, math.inf)
    baseline = MainOnlyPolicy(tiny_main)
    for seed in range(3):
        obs = make_observation(seed)
        chunk = policy.predict_chunk(obs)
        assert not chunk.accepted
        assert np.array_equal(chunk.actions, baseline.predict_chunk(obs).actions)
        assert set(chunk.timings) >= {"vision", "prefix", "draft", "gate", "suffix", "head", "decode"}


def test_rejected_call_runs_every_layer_exactly_once(tiny_main):
    policy, _ = speculative(tiny_main, math.inf)
    calls = [0] * len(tiny_main.vla.layers)
    hooks = [layer.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1)) for i, layer in enumerate(tiny_main.vla.layers)]
    policy.predict_chunk(make_observation())
    for hook in hooks:
        hook.remove()
    assert calls == [1] * len(tiny_main.vla.layers)


def test_accepted_call_skips_the_upper_layers(tiny_main):
    policy, _ = speculative(tiny_main, 0.0)
    calls = [0] * len(tiny_main.vla.layers)
    hooks = [layer.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1)) for i, layer in enumerate(tiny_main.vla.layers)]
    policy.predict_chunk(make_observation())
    for hook in hooks:
        hook.remove()
    assert calls == [1] * EXIT + [0] * (len(calls) - EXIT)


def test_verify_always_records_agreement(tiny_main):
    policy, draft = speculative(tiny_main, 0.0, verify="always")
    chunk = policy.predict_chunk(make_observation())
    assert chunk.accepted and chunk.agreement is not None and 0.0 <= chunk.agreement <= 1.0
    baseline = MainOnlyPolicy(tiny_main).predict_chunk(make_observation())
    tok = tiny_main.tokenizer.config
    main_coarse = torch.as_tensor(baseline.tokens[..., : tok.coarse_layers])
    draft_coarse = torch.as_tensor(chunk.tokens[..., : tok.coarse_layers])
    assert chunk.agreement == pytest.approx(float((main_coarse == draft_coarse).float().mean()))
    stats = policy.stats()
    assert stats["calls"] == 1 and stats["acceptance_rate"] == 1.0 and stats["agreement"] == pytest.approx(chunk.agreement)


def test_batch_rows_gate_independently(tiny_main):
    """With a threshold between two rows' confidences, one row is accepted and the other resumes the main model."""
    policy, _ = speculative(tiny_main, 0.0)
    obs = [make_observation(s) for s in (0, 1)]
    images = np.stack([o["image"][None] for o in obs])
    inputs = tiny_main.prepare(images, [o["instruction"] for o in obs], np.stack([o["proprio"] for o in obs]))
    engine = policy.engine
    conf = engine.run(inputs).confidence
    engine.gate = Gate(tau=float(conf.max()))
    result = engine.run(inputs)
    assert result.accepted.tolist() == (conf >= conf.max()).tolist()
    rejected = int(torch.nonzero(~result.accepted)[0])
    baseline = MainOnlyPolicy(tiny_main).predict_chunk(obs[rejected])
    assert torch.allclose(result.actions[rejected], torch.as_tensor(baseline.actions), atol=1e-5)


def _draft_step_confidence(main, draft, obs):
    """The draft's per-step confidence `[H]` for one observation, computed here from its logits."""
    with torch.inference_mode():
        inputs = main.prepare(obs["image"][None, None], [obs["instruction"]], obs["proprio"][None])
        logits = draft.forward_logits(main.vla.prefix(inputs, EXIT).query_hidden)
        tok = main.tokenizer.config
        top = torch.softmax(logits, dim=-1).amax(dim=-1).reshape(1, tok.coarse_layers, tok.chunk_len, tok.latent_dim)
        return top.amin(dim=(1, 3))[0]


def test_prefix_gate_returns_exactly_the_confident_leading_steps_and_the_queue_replans_after_them(tiny_main):
    _, draft = speculative(tiny_main, 0.0)
    horizon = tiny_main.tokenizer.config.chunk_len

    def leading(step, tau):
        count = 0
        while count < horizon and step[count] >= tau:
            count += 1
        return count

    # an observation and a threshold at which 2 <= k < H leading steps of the (random) draft pass
    candidates = ((make_observation(seed), _draft_step_confidence(tiny_main, draft, make_observation(seed)).tolist()) for seed in range(10))
    obs, step, tau, k = next((o, s, t, leading(s, t)) for o, s in candidates for t in sorted(s) if 2 <= leading(s, t) < horizon)
    gate = Gate(tau=tau, mode="prefix", statistic="step", min_steps=2)
    policy, _ = speculative(tiny_main, 0.0, gate=gate)
    draft_chunk = speculative(tiny_main, 0.0)[0].predict_chunk(obs)
    chunk = policy.predict_chunk(obs)
    assert chunk.accepted and chunk.steps == k
    assert np.array_equal(chunk.actions[:k], draft_chunk.actions[:k])
    assert chunk.confidence == pytest.approx(min(step[:2]))
    actions = [policy.act(obs) for _ in range(k)]
    assert np.array_equal(np.stack(actions), chunk.actions[:k]) and policy.stats()["calls"] == 2
    policy.act(obs)  # step k + 1 comes from a new chunk
    assert policy.stats()["calls"] == 3
    stats = policy.stats()
    assert stats["accepted"] == 3 and stats["mean_accepted_steps"] == k and stats["acceptance_rate"] == 1.0

    rejected, _ = speculative(tiny_main, 0.0, gate=dataclasses.replace(gate, min_steps=k + 1))
    main_chunk = MainOnlyPolicy(tiny_main).predict_chunk(obs)
    chunk = rejected.predict_chunk(obs)
    assert not chunk.accepted and chunk.steps == horizon and np.array_equal(chunk.actions, main_chunk.actions)


def test_the_gate_reads_only_the_coarse_layers_it_names_and_caps_the_executed_steps(tiny_main):
    _, draft = speculative(tiny_main, 0.0)
    obs = make_observation(3)
    tok = tiny_main.tokenizer.config
    with torch.inference_mode():
        inputs = tiny_main.prepare(obs["image"][None, None], [obs["instruction"]], obs["proprio"][None])
        top = torch.softmax(draft.forward_logits(tiny_main.vla.prefix(inputs, EXIT).query_hidden), dim=-1).amax(dim=-1)
    coarsest = top[:, :1].reshape(tok.chunk_len, tok.latent_dim).amin(dim=1)  # [H] per step, layer 0 only
    gate = Gate(tau=float(coarsest[:3].min()), mode="prefix", statistic="step", min_steps=3, max_steps=3, layers=1)
    chunk = speculative(tiny_main, 0.0, gate=gate)[0].predict_chunk(obs)
    assert chunk.accepted and chunk.steps == 3 and chunk.confidence == pytest.approx(float(coarsest[:3].min()))
    assert float(_draft_step_confidence(tiny_main, draft, obs)[:3].min()) <= chunk.confidence  # all layers: never above
    with pytest.raises(ConfigError, match="at most the draft's 3 coarse layers, got layers 4"):
        speculative(tiny_main, 0.0, gate=dataclasses.replace(gate, layers=tok.coarse_layers + 1))


def test_prefix_gate_at_tau_zero_and_inf_keeps_the_exact_equivalences(tiny_main):
    obs = make_observation(2)
    prefix = Gate(tau=0.0, mode="prefix", statistic="step", min_steps=8)
    full = speculative(tiny_main, 0.0, gate=prefix)[0].predict_chunk(obs)
    assert full.accepted and full.steps == 8
    assert np.array_equal(full.actions, speculative(tiny_main, 0.0)[0].predict_chunk(obs).actions)
    never = speculative(tiny_main, 0.0, gate=dataclasses.replace(prefix, tau=math.inf, min_steps=1))[0].predict_chunk(obs)
    assert not never.accepted and never.steps == 8
    assert np.array_equal(never.actions, MainOnlyPolicy(tiny_main).predict_chunk(obs).actions)


class ScriptedEngine:
    """Chunk c has actions[h] = (c, h, 0, ...) and executes `steps[c]` leading steps; it ignores its inputs."""

    def __init__(self, main, steps, horizon=8, action_dim=7, latent_dim=16, layers=8):
        self.steps, self.horizon, self.action_dim, self.shape = steps, horizon, action_dim, (1, horizon, latent_dim, layers)
        self.segments = Segments(main)  # eager: the policy reads what runs the main model for its stats
        self.calls = 0

    def run(self, inputs):
        c = self.calls
        self.calls += 1
        actions = torch.zeros(1, self.horizon, self.action_dim)
        actions[0, :, 0] = c
        actions[0, :, 1] = torch.arange(self.horizon)
        k = self.steps[c]
        return EngineResult(actions=actions, accepted=torch.tensor([k < self.horizon]), steps=torch.tensor([k]),
                            confidence=torch.tensor([1.0]), tokens=torch.zeros(self.shape, dtype=torch.int64), timings={"draft": 0.1})


@pytest.mark.parametrize("replan_every", [None, 3])
def test_partial_acceptance_never_executes_a_step_twice_or_skips_one(tiny_main, replan_every):
    steps = [3, 8, 1, 5, 8, 2, 7, 4, 8, 6]
    policy = SpeculativePolicy(tiny_main, ScriptedEngine(tiny_main, steps), replan_every)
    obs = make_observation()
    executed = [tuple(int(v) for v in policy.act(obs)[:2]) for _ in range(24)]
    limit = 8 if replan_every is None else replan_every
    expected = [(c, h) for c, k in enumerate(steps) for h in range(min(k, limit))][:24]
    assert executed == expected
    assert policy.stats()["calls"] == len({c for c, _ in expected})


def test_same_observation_same_chunk(tiny_main):
    policy, _ = speculative(tiny_main, 0.5)
    obs = make_observation(4)
    assert np.array_equal(policy.predict_chunk(obs).actions, policy.predict_chunk(obs).actions)


def test_queue_hands_out_the_whole_chunk_before_replanning(tiny_main):
    policy = MainOnlyPolicy(tiny_main)
    obs = make_observation()
    chunk = policy.predict_chunk(obs)
    horizon = tiny_main.tokenizer.config.chunk_len
    actions = [policy.act(obs) for _ in range(2 * horizon + 1)]
    assert policy.stats()["calls"] == 1 + 3
    assert np.array_equal(np.stack(actions[:horizon]), chunk.actions)
    policy.reset()
    replanning = MainOnlyPolicy(tiny_main, replan_every=2)
    for _ in range(5):
        replanning.act(obs)
    assert replanning.stats()["calls"] == 3
    with pytest.raises(ConfigError, match="replan_every"):
        MainOnlyPolicy(tiny_main, replan_every=horizon + 1)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda o: o.pop("image"), "missing"),
        (lambda o: o.update(image=o["image"].astype(np.float32)), "uint8"),
        (lambda o: o.update(image=o["image"][..., :2]), r"\[H, W, 3\]"),
        (lambda o: o.update(image=[o["image"], o["image"]]), "1 camera"),
        (lambda o: o.update(instruction="  "), "non-empty"),
        (lambda o: o.update(instruction=3), "non-empty"),
        (lambda o: o.update(proprio=None), "proprio"),
        (lambda o: o.update(proprio=np.zeros(5, np.float32)), "proprio"),
        (lambda o: o.update(proprio=np.full(8, np.nan, np.float32)), "finite"),
        (lambda o: o.update(proprio=["a"] * 8), r"proprio.*numbers.*dtype <U1"),
        (lambda o: o.update(proprio=[0.1, [0.2, 0.3]] + [0.0] * 6), r"proprio.*array of numbers"),
        (lambda o: o.update(proprio=np.array([0, 0, 0, np.inf, 0, 0, 0, 0])), r"proprio.*finite.*inf at index 3"),
        (lambda o: o.update(proprio=np.zeros((1, 8))), r"proprio.*\[8\], got shape \(1, 8\)"),
        (lambda o: o.update(image="a picture"), r"image.*numbers"),
        (lambda o: o.update(image=None), r"image.*numbers.*NoneType"),
        (lambda o: o.update(image=[None]), r"image'\]\[0\].*numbers"),
        (lambda o: o.update(image=o["image"].astype(np.int64)), r"image.*uint8.*int64"),
        (lambda o: o.update(instruction="pick up the block " * 600), r"at most 128 prompt tokens.*got 2400"),
    ],
)
def test_bad_observations_raise(tiny_main, change, message):
    obs = make_observation()
    change(obs)
    with pytest.raises(DataError, match=message):
        MainOnlyPolicy(tiny_main).predict_chunk(obs)


FRAME = arrays(st.sampled_from([np.uint8, np.int64, np.float32, np.bool_]), array_shapes(min_dims=0, max_dims=4, max_side=70),
               )
VALUES = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20), st.lists(st.floats(), max_size=9),
                   st.lists(st.text(max_size=3), max_size=9), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
OBSERVATIONS = st.fixed_dictionaries(
    {},
    optional={
        "image": st.one_of(VALUES, FRAME, st.just(np.zeros((64, 64, 3), np.uint8)), st.lists(FRAME, max_size=2)),
        "instruction": st.one_of(VALUES, st.text(max_size=40), st.just("pick up the red block")),
        "proprio": st.one_of(VALUES, arrays(np.float64, st.integers(0, 10)), arrays(np.float32, 8)),
        "extra": VALUES,
    },
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(obs=st.one_of(OBSERVATIONS, VALUES))
def test_fuzzed_observations_raise_nothing_but_rsd_errors(tiny_main, obs):
    policy = MainOnlyPolicy(tiny_main)
    try:
        action = policy.act(obs)
    except RsdError:
        return
    assert action.shape == (7,) and np.isfinite(action).all()


def test_wrong_image_size_raises(tiny_main):
    obs = make_observation()
    obs["image"] = np.zeros((32, 32, 3), np.uint8)
    with pytest.raises(Exception, match="64"):
        MainOnlyPolicy(tiny_main).predict_chunk(obs)


def test_engine_config_errors(tiny_main):
    tok = tiny_main.tokenizer.config
    decoders = {c: TorchDecoderEngine(tiny_main.tokenizer.decoder_module(), c) for c in (tok.coarse_layers, tok.num_layers)}
    from rsd.presets import get_preset

    draft = TorchDraftEngine(DraftHead(get_preset("tiny").draft(EXIT)))
    with pytest.raises(ConfigError, match="exit_layer"):
        SpeculativeEngine(tiny_main, draft, decoders, 99, Gate(tau=0.5))
    with pytest.raises(ConfigError, match="decoders"):
        SpeculativeEngine(tiny_main, draft, {tok.num_layers: decoders[tok.num_layers]}, EXIT, Gate(tau=0.5))
    with pytest.raises(ConfigError, match="verify"):
        SpeculativeEngine(tiny_main, draft, decoders, EXIT, Gate(tau=0.5), verify="sometimes")
    with pytest.raises(ConfigError, match="expected a rsd.runtime.gate.Gate, got float"):
        SpeculativeEngine(tiny_main, draft, decoders, EXIT, 0.5)
    with pytest.raises(ConfigError, match="at most the chunk length 8, got 9"):
        SpeculativeEngine(tiny_main, draft, decoders, EXIT, Gate(tau=0.5, mode="prefix", statistic="step", min_steps=9))


def test_long_loop_keeps_memory_flat(tiny_main):
    """10,000 control steps (1,250 chunks): resident memory after warm-up grows by less than 5 %."""
    policy, _ = speculative(tiny_main, 0.5, verify="always")
    obs = make_observation()
    for _ in range(800):
        policy.act(obs)
    gc.collect()
    before = _rss_kb()
    for _ in range(10_000):
        policy.act(obs)
    gc.collect()
    after = _rss_kb()
    assert after <= before * 1.05, f"resident memory grew from {before} kB to {after} kB"
    assert policy.stats()["calls"] == (10_800 + 7) // 8


def _rss_kb() -> int:
    """Current resident set size in kB (Linux /proc)."""
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith("VmRSS:"))


@pytest.mark.parametrize("kind", ["main-only", "speculative"])
def test_replicas_acting_in_one_batch_act_as_policies_alone(tiny_main, kind):
    """`act_batch`: four episodes side by side get the actions each gets alone; the batch's timings stay out of the latency."""
    from rsd.runtime.policy import act_batch

    def build():
        return MainOnlyPolicy(tiny_main, replan_every=3) if kind == "main-only" else speculative(tiny_main, 0.5, replan_every=3)[0]

    instructions = ["pick up the red block and place it on the plate", "put the blue block next to the green block"]
    streams = [[make_observation(10 * slot + step, instructions[slot % 2]) for step in range(10)] for slot in range(4)]
    alone = []
    for stream in streams:
        policy = build()
        alone.append([policy.act(obs) for obs in stream])
    first = build()
    replicas = [first] + [first.replica() for _ in range(3)]
    together = [act_batch(replicas, [stream[step] for stream in streams]) for step in range(10)]
    for slot in range(4):
        np.testing.assert_allclose(np.stack([actions[slot] for actions in together]), np.stack(alone[slot]), atol=1e-6)
    assert [p.stats()["calls"] for p in replicas] == [4, 4, 4, 4]  # steps 0, 3, 6, 9 replan
    assert all(p.stats()["stages"] == {} for p in replicas) and first.engine is replicas[3].engine
    replicas[1].reset()
    act_batch(replicas, [stream[0] for stream in streams])
    assert [p.stats()["calls"] for p in replicas] == [4, 5, 4, 4]  # only the reset one replans at step 10


def test_act_batch_refuses_mismatched_arguments(tiny_main):
    from rsd.errors import ShapeError
    from rsd.runtime.policy import act_batch

    policy = MainOnlyPolicy(tiny_main)
    with pytest.raises(ShapeError, match="one observation per policy"):
        act_batch([policy, policy.replica()], [make_observation()])
    with pytest.raises(ConfigError, match="one engine"):
        act_batch([policy, MainOnlyPolicy(tiny_main)], [make_observation(), make_observation(1)])
    small = make_observation(1)
    small["image"] = small["image"][:32, :32]
    with pytest.raises(DataError, match="one shape"):
        act_batch([policy, policy.replica()], [make_observation(), small])
    assert act_batch([], []) == []
