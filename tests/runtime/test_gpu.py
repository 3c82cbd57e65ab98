"""CUDA paths (skipped without CUDA): segmented forward, draft, speculative engine and bundle engines on the GPU vs the CPU."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import make_observation, make_tiny_main, save_tiny_draft_sources

from rsd.export import export_draft
from rsd.models.draft import DraftHead
from rsd.presets import get_preset
from rsd.runtime.bundle import load_bundle_engines
from rsd.runtime.engines import TorchDecoderEngine, TorchDraftEngine
from rsd.runtime.gate import Gate
from rsd.runtime.policy import MainOnlyPolicy, SpeculativePolicy
from rsd.runtime.speculative import SpeculativeEngine

pytestmark = pytest.mark.gpu


def _on(main, device, dtype):
    main.vla.to(device, dtype)
    main.head.to(device, dtype)
    main.tokenizer.to(device)
    return main


@pytest.mark.parametrize(("dtype", "atol"), [(torch.float32, 1e-4), (torch.float16, 5e-2), (torch.bfloat16, 2e-1)])
def test_prefix_resume_on_cuda_matches_full_forward(dtype, atol):
    main = _on(make_tiny_main(), "cuda", dtype)
    obs = make_observation()
    with torch.inference_mode():
        inputs = main.prepare(obs["image"][None, None], [obs["instruction"]], obs["proprio"][None]).to("cuda")
        full = main.vla(inputs)
        for k in range(main.num_layers + 1):
            resumed = main.vla.resume(main.vla.prefix(inputs, k))
            assert torch.allclose(resumed.float(), full.float(), atol=atol), k


def test_cuda_fp32_matches_cpu():
    cpu = make_tiny_main()
    gpu = _on(make_tiny_main(), "cuda", torch.float32)
    obs = make_observation()
    with torch.inference_mode():
        a = cpu.vla(cpu.prepare(obs["image"][None, None], [obs["instruction"]], obs["proprio"][None]))
        b = gpu.vla(gpu.prepare(obs["image"][None, None], [obs["instruction"]], obs["proprio"][None]).to("cuda"))
    assert torch.allclose(a, b.cpu(), atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_speculative_engine_on_cuda(dtype):
    main = _on(make_tiny_main(), "cuda", dtype)
    torch.manual_seed(1)
    draft = DraftHead(get_preset("tiny").draft(3)).to("cuda", dtype).eval()
    tok = main.tokenizer.config
    decoders = {c: TorchDecoderEngine(main.tokenizer.decoder_module(), c) for c in (tok.coarse_layers, tok.num_layers)}
    reject = SpeculativePolicy(main, SpeculativeEngine(main, TorchDraftEngine(draft), decoders, 3, Gate(tau=math.inf)))
    accept = SpeculativePolicy(main, SpeculativeEngine(main, TorchDraftEngine(draft), decoders, 3, Gate(tau=0.0)))
    baseline = MainOnlyPolicy(main)
    obs = make_observation()
    assert np.array_equal(reject.predict_chunk(obs).actions, baseline.predict_chunk(obs).actions)
    chunk = accept.predict_chunk(obs)
    assert chunk.accepted and np.isfinite(chunk.actions).all()
    assert chunk.timings["prefix"] > 0


def test_draft_cuda_matches_cpu():
    torch.manual_seed(0)
    draft = DraftHead(get_preset("tiny").draft(3)).eval()
    x = torch.randn(4, draft.config.hidden_size)
    with torch.inference_mode():
        cpu = draft.forward_logits(x)
        gpu = draft.to("cuda").forward_logits(x.cuda())
    assert torch.allclose(cpu, gpu.cpu(), atol=1e-4)


def test_bundle_built_on_cuda_matches_the_cpu_bundle(tmp_path):
    sources = save_tiny_draft_sources(tmp_path, "gpu-fp")
    export_draft(sources["draft"], sources["tokenizer"], tmp_path / "cpu", formats=("torchscript",))
    export_draft(sources["draft"], sources["tokenizer"], tmp_path / "cuda", formats=("torchscript",), device="cuda")
    cpu_main, gpu_main = make_tiny_main(), _on(make_tiny_main(), "cuda", torch.float32)
    cpu_main.fingerprint = gpu_main.fingerprint = "gpu-fp"
    cpu = load_bundle_engines(tmp_path / "cpu", cpu_main, engine="torchscript")
    gpu = load_bundle_engines(tmp_path / "cuda", gpu_main, engine="torchscript")
    hidden = torch.randn(16, cpu_main.hidden_size, generator=torch.Generator().manual_seed(0))
    full = torch.randint(0, 7, (16, 8, 16, 8), generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        (want_logits, want_tokens), (logits, tokens) = cpu.draft(hidden), gpu.draft(hidden.cuda())
        assert tokens.is_cuda and torch.equal(tokens.cpu(), want_tokens)
        assert (logits.cpu() - want_logits).abs().max() < 1e-4
        for c in (3, 8):
            assert (gpu.decoders[c](full[..., :c].cuda()).cpu() - cpu.decoders[c](full[..., :c])).abs().max() < 1e-5


def test_replicas_in_one_batch_on_cuda_act_as_policies_alone():
    """`act_batch` on CUDA (fp32): four episodes side by side get the actions each gets alone."""
    from rsd.runtime.policy import act_batch

    main = _on(make_tiny_main(), "cuda", torch.float32)
    streams = [[make_observation(10 * slot + step) for step in range(6)] for slot in range(4)]
    alone = []
    for stream in streams:
        policy = MainOnlyPolicy(main, replan_every=3)
        alone.append(np.stack([policy.act(obs) for obs in stream]))
    first = MainOnlyPolicy(main, replan_every=3)
    replicas = [first] + [first.replica() for _ in range(3)]
    together = np.stack([act_batch(replicas, [stream[step] for stream in streams]) for step in range(6)], axis=1)
    np.testing.assert_allclose(together, np.stack(alone), atol=1e-4)
