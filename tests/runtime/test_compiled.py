"""The compiled runtime on the tiny preset (CPU; torch.compile and AOTInductor): parity with eager, the same acceptance
decisions, no recompilation over varying instructions, and the static-shape refusals.

One `CompiledSegments` per mode is built per module and shared by its tests: "inductor" compiles its graphs here
(half a minute on two cores with a warm inductor cache, hence `slow`), "aot" runs the AOTInductor packages of the
session's `tiny_segments` (exported once per run, the same `_compile` path, and read by tests/export/test_segments.py
as well) with the draft and decoders as built; the checks that need no compiled graph run without the mark.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import SEGMENTS_EXIT, SEGMENTS_PROMPT, make_observation, make_tiny_main

from rsd.errors import ConfigError, ObservationError, ShapeError
from rsd.export.parity import ACTION_TOLERANCE, TOLERANCES
from rsd.models.draft import DraftHead
from rsd.models.processor import observation_batch
from rsd.presets import get_preset
from rsd.runtime.compiled import CompileConfig, CompiledSegments, Segments, make_segments
from rsd.runtime.engines import TorchDecoderEngine, TorchDraftEngine
from rsd.runtime.gate import Gate
from rsd.runtime.policy import MainOnlyPolicy, SpeculativePolicy
from rsd.runtime.speculative import MainOnlyEngine, SpeculativeEngine

EXIT = SEGMENTS_EXIT
INSTRUCTIONS = ["pick up the red block", "put the blue block next to the red block", "push the green cube to the left edge of the table",
                "open the drawer", "stack the yellow block on top of the red block and then go back home"]


def _inputs(main, seed: int, instruction: str):
    obs = make_observation(seed, instruction)
    images, instructions, proprio = observation_batch(obs, main.vla.config.proprio_dim)
    return main.prepare(images, instructions, proprio)


@pytest.fixture(scope="module", params=["inductor", "aot"])
def parts(request):
    """The tiny main model, a seeded draft, eager and compiled engines (one CompiledSegments per mode, warmed up once)."""
    torch.set_num_threads(1)
    main = make_tiny_main()
    torch.manual_seed(1)
    draft = TorchDraftEngine(DraftHead(get_preset("tiny").draft(EXIT)).eval())
    tok = main.tokenizer.config
    decoders = {c: TorchDecoderEngine(main.tokenizer.decoder_module(), c) for c in (tok.coarse_layers, tok.num_layers)}
    # tau between the drafts' confidences on these inputs, so both decisions occur
    eager_always = SpeculativeEngine(main, draft, decoders, EXIT, Gate(tau=0.0), verify="always")
    confidences = [float(eager_always.run(_inputs(main, s, INSTRUCTIONS[s % 5])).confidence[0]) for s in range(10)]
    gate = Gate(tau=float(np.median(confidences)))
    packages = str(request.getfixturevalue("tiny_segments")) if request.param == "aot" else None
    segments = CompiledSegments(main, CompileConfig(mode=request.param, prompt_tokens=SEGMENTS_PROMPT, packages=packages))
    compiled = SpeculativeEngine(main, draft, decoders, EXIT, gate, verify="always", segments=segments)
    compiled.warm_up()
    baseline = MainOnlyEngine(main, decoders[tok.num_layers], segments)
    baseline.warm_up()
    return {"main": main, "segments": segments, "compiled": compiled, "baseline": baseline, "gate": gate,
            "eager": SpeculativeEngine(main, draft, decoders, EXIT, gate, verify="always"),
            "eager_baseline": MainOnlyEngine(main, decoders[tok.num_layers])}


@pytest.mark.slow
def test_compiled_matches_eager_and_decides_the_same(parts) -> None:
    main, decisions = parts["main"], set()
    for seed in range(10):
        inputs = _inputs(main, seed, INSTRUCTIONS[seed % 5])
        want, got = parts["eager"].run(inputs), parts["compiled"].run(inputs)
        assert torch.equal(got.accepted, want.accepted) and torch.equal(got.steps, want.steps)
        assert torch.equal(got.tokens, want.tokens)
        assert (got.actions - want.actions).abs().max() <= ACTION_TOLERANCE
        assert (got.confidence - want.confidence).abs().max() <= TOLERANCES["fp32"]["confidence_max_abs"]
        assert torch.equal(got.agreement, want.agreement)
        base_want, base_got = parts["eager_baseline"].run(inputs), parts["baseline"].run(inputs)
        assert torch.equal(base_got.tokens, base_want.tokens) and (base_got.actions - base_want.actions).abs().max() <= ACTION_TOLERANCE
        decisions.add(bool(want.accepted[0]))
    assert decisions == {True, False}  # both paths were compared


@pytest.mark.slow
def test_no_recompilation_over_50_calls_with_varying_instructions(parts) -> None:
    segments, before = parts["segments"], parts["segments"].describe()
    assert before["recompiles"] == 0  # (graphs may be fewer than the 8 segments: dynamo reuses a graph compiled for an equal module)
    policy = SpeculativePolicy(parts["main"], parts["compiled"])
    for call in range(50):
        policy.predict_chunk(make_observation(call, INSTRUCTIONS[call % 5][: 10 + 3 * call % 40]))
    assert segments.describe() == before
    assert policy.stats()["compile"]["recompiles"] == 0 and policy.stats()["calls"] == 50


@pytest.mark.slow
def test_static_shapes_refuse_a_longer_prompt_and_another_batch(parts) -> None:
    main = parts["main"]
    long = " ".join(["pick up the red block"] * 8)
    with pytest.raises(ObservationError, match="expected at most 24 tokens"):
        parts["compiled"].run(_inputs(main, 0, long))
    images = np.stack([make_observation(s)["image"][None] for s in range(2)])
    proprio = np.stack([make_observation(s)["proprio"] for s in range(2)])
    with pytest.raises(ShapeError, match="expected a batch of 1"):
        parts["compiled"].run(main.prepare(images, ["open the drawer"] * 2, proprio))
    assert parts["segments"].recompiles == 0


def test_compile_config_is_validated() -> None:
    with pytest.raises(ConfigError, match="CompileConfig.mode"):
        CompileConfig(mode="max")
    with pytest.raises(ConfigError, match="CompileConfig.prompt_tokens"):
        CompileConfig(mode="inductor", prompt_tokens=0)
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        CompileConfig(mode="reduce-overhead").resolve(torch.device("cpu"))
    assert CompileConfig(mode="auto").resolve(torch.device("cpu")) == "aot"
    assert CompileConfig(mode="auto").resolve(torch.device("cuda")) == "reduce-overhead"
    main = make_tiny_main()
    assert type(make_segments(main, "none")) is Segments and type(make_segments(main, "inductor")) is CompiledSegments
    assert MainOnlyPolicy(main).stats()["compile"] == {"mode": "none"}


def test_padding_the_prompt_leaves_the_eager_result_unchanged() -> None:
    main = make_tiny_main()
    inputs = _inputs(main, 0, "pick up the red block")
    engine = MainOnlyEngine(main, TorchDecoderEngine(main.tokenizer.decoder_module(), main.tokenizer.config.num_layers))
    want, got = engine.run(inputs), engine.run(inputs.pad_prompt(40))
    assert torch.equal(got.tokens, want.tokens) and (got.actions - want.actions).abs().max() <= ACTION_TOLERANCE


@pytest.mark.gpu
def test_cuda_graphs_match_eager_on_cuda() -> None:
    main = make_tiny_main()
    main.vla.to("cuda")
    main.head.to("cuda")
    main.tokenizer.to("cuda")
    compiled = MainOnlyPolicy(main, compile="reduce-overhead")
    eager = MainOnlyPolicy(main)
    for seed in range(5):
        obs = make_observation(seed, INSTRUCTIONS[seed])
        got, want = compiled.predict_chunk(obs), eager.predict_chunk(obs)
        assert np.array_equal(got.tokens, want.tokens) and np.abs(got.actions - want.actions).max() <= 1e-4
    assert compiled.stats()["compile"]["mode"] == "reduce-overhead" and compiled.stats()["compile"]["recompiles"] == 0
    assert not math.isnan(compiled.stats()["stages"]["llm"]["p50"])
