"""Speculative decoding is exact: greedy output token for token, sampled output in distribution, caches rolled back.

Greedy tests run transformers' Qwen3 and Llama in float64 (so a near-tie cannot flip an argmax between a one-token
and a (gamma+1)-token pass) against drafts that do get rejected. The distribution tests use Markov-chain "table"
models whose next-token distribution depends only on the last token, so the exact law of a short continuation is a
product of table rows; a chi-square test compares it with many speculative samples, and the same test rejects a
deliberately wrong rule (accept every draft token).
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

import rsd.runtime.decoding as decoding
from rsd.errors import ConfigError, ShapeError
from rsd.models.layer_draft import LayerDraft, LayerDraftConfig
from rsd.runtime.decoding import (
    HFCausalLM,
    LayerDraftLM,
    SamplingConfig,
    SpeculativeDecoder,
    generate_plain,
    sampling_probs,
    verify_greedy,
)

VOCAB = 48


def qwen3(seed: int, layers: int = 4, vocab: int = VOCAB) -> Qwen3ForCausalLM:
    """A random float64 Qwen3 LM (QK-norm, GQA, tied embeddings); large weights, so its greedy output does not just repeat."""
    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=8, tie_word_embeddings=True, initializer_range=0.3, attn_implementation="sdpa")
    return Qwen3ForCausalLM(config).double().eval()


def llama(seed: int, layers: int = 4) -> LlamaForCausalLM:
    """A random float64 Llama LM with larger weights, so its greedy output does not just repeat the input."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=4, initializer_range=0.3, attn_implementation="sdpa")
    return LlamaForCausalLM(config).double().eval()


def scrambled_draft(target: torch.nn.Module, layers: tuple[int, ...], seed: int) -> LayerDraft:
    """A layer draft whose transitions have random (non-identity) weights, so some of its tokens are rejected."""
    draft = LayerDraft(LayerDraftConfig.for_target(target, layers, transition_size=16), target)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for transition in draft.transitions:
            if hasattr(transition, "up"):
                transition.up.weight.copy_(torch.randn(transition.up.weight.shape, generator=generator, dtype=torch.float64) * 0.5)
    return draft.eval()


@pytest.mark.parametrize("gamma", [1, 3, 5])
@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_greedy_speculative_equals_greedy_target(family: str, gamma: int) -> None:
    build = qwen3 if family == "qwen3" else llama
    target = build(0)
    prompt = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(1))
    plain = generate_plain(HFCausalLM(target), prompt, 40)
    for draft in (HFCausalLM(build(7, layers=1)), LayerDraftLM(scrambled_draft(target, (0, 2), seed=3))):
        decoder = SpeculativeDecoder(draft, HFCausalLM(target), gamma=gamma)
        result = decoder.generate(prompt, 40)
        assert result.tokens == plain.tokens
        summary = result.stats.summary()
        assert summary["generated"] == 40 and summary["target_passes"] < 40 + 1
        assert 0.0 < summary["acceptance_rate"] < 1.0, "the test should exercise both accepted and rejected drafts"
        assert len(summary["acceptance_by_position"]) == gamma


def test_greedy_exact_on_trained_lm(tmp_path: Any) -> None:
    from rsd.models.text_lm import load_text_lm
    from rsd.training.text_lm import TextTrainConfig, stdlib_sources, train_text_lm

    files = stdlib_sources()[:40]
    train_text_lm(tmp_path / "lm", "qwen3-test", TextTrainConfig(steps=30, seq_len=64, batch_size=8, val_windows=2), files=files, progress=False)
    lm = load_text_lm(tmp_path / "lm", dtype=torch.float64)
    prompt = lm.encode("import os\nimport sys\n\n\ndef main(argv):\n    ")
    plain = generate_plain(HFCausalLM(lm.model), prompt, 48)
    draft = scrambled_draft(lm.model, (0, 3), seed=0)
    result = SpeculativeDecoder(LayerDraftLM(draft), HFCausalLM(lm.model), gamma=4).generate(prompt, 48)
    assert result.tokens == plain.tokens
    assert result.stats.acceptance_rate < 1.0


def test_eos_stops_both_decoders_at_the_same_token() -> None:
    target = llama(0)
    prompt = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(4))
    full = generate_plain(HFCausalLM(target), prompt, 30).tokens
    eos = full[11]
    plain = generate_plain(HFCausalLM(target), prompt, 30, eos_id=eos).tokens
    spec = SpeculativeDecoder(HFCausalLM(llama(5, layers=1)), HFCausalLM(target), gamma=4).generate(prompt, 30, eos_id=eos).tokens
    assert spec == plain == full[: full.index(eos) + 1]


def _layer_caches(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers if layer.is_initialized]


def _assert_same_cache(a: DynamicCache, b: DynamicCache) -> None:
    first, second = _layer_caches(a), _layer_caches(b)
    assert len(first) == len(second) > 0
    for (k1, v1), (k2, v2) in zip(first, second, strict=True):
        assert k1.shape == k2.shape
        torch.testing.assert_close(k1, k2, rtol=0, atol=1e-12)
        torch.testing.assert_close(v1, v2, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", ["target", "layer_draft"])
def test_rollback_equals_a_fresh_pass(kind: str) -> None:
    target = qwen3(0)
    model = HFCausalLM(target) if kind == "target" else LayerDraftLM(scrambled_draft(target, (1, 3), seed=2))
    ids = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(3))
    rolled = model.new_cache()
    model.prefill(ids[:, :10], rolled)
    model.forward(torch.tensor([[5, 6, 7, 8, 9]]), rolled)  # tokens that are then rejected
    model.rollback(rolled, 10)
    after = model.forward(ids[:, 10:16], rolled)
    fresh = model.new_cache()
    expected = torch.cat([model.prefill(ids[:, :10], fresh)[:, None], model.forward(ids[:, 10:16], fresh)], dim=1)
    assert model.cache_length(rolled) == model.cache_length(fresh) == 16
    _assert_same_cache(rolled, fresh)
    torch.testing.assert_close(after, expected[:, 1:], rtol=0, atol=1e-12)
    with pytest.raises(ShapeError):
        model.rollback(rolled, 17)


class Recording:
    """A DecodingLM wrapper that keeps the caches it hands out."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.vocab_size = inner.vocab_size
        self.caches: list[Any] = []

    def new_cache(self) -> Any:
        self.caches.append(self.inner.new_cache())
        return self.caches[-1]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_caches_after_generation_equal_a_fresh_prefill() -> None:
    target = qwen3(0)
    recorded_target = Recording(HFCausalLM(target))
    recorded_draft = Recording(LayerDraftLM(scrambled_draft(target, (0, 2), seed=5)))
    prompt = torch.randint(0, VOCAB, (1, 7), generator=torch.Generator().manual_seed(9))
    tokens = SpeculativeDecoder(recorded_draft, recorded_target, gamma=3).generate(prompt, 25).tokens
    for recorded, lag in ((recorded_target, 1), (recorded_draft, 3)):
        cache = recorded.caches[-1]
        held = recorded.cache_length(cache) - prompt.shape[1]
        # the target holds every emitted token but the last; the draft may also lack its last proposal and the final
        # round's tokens (the last round drafts nothing when one token is left)
        assert len(tokens) - lag <= held <= len(tokens) - 1
        fresh = recorded.inner.new_cache()
        recorded.inner.prefill(torch.cat([prompt, torch.tensor([tokens[:held]])], dim=1), fresh)
        _assert_same_cache(cache, fresh)


class TableLM:
    """A Markov-chain LM: the next-token distribution is `softmax(table[last token])`; the cache is the token list."""

    def __init__(self, table: torch.Tensor) -> None:
        self.table = table
        self.vocab_size = table.shape[0]

    def new_cache(self) -> list[int]:
        return []

    def prefill(self, prompt: torch.Tensor, cache: list[int]) -> torch.Tensor:
        cache.extend(prompt[0].tolist())
        return self.table[cache[-1]].unsqueeze(0)

    def forward(self, tokens: torch.Tensor, cache: list[int]) -> torch.Tensor:
        cache.extend(tokens[0].tolist())
        return self.table[tokens[0]].unsqueeze(0)

    def cache_length(self, cache: list[int]) -> int:
        return len(cache)

    def rollback(self, cache: list[int], length: int) -> None:
        del cache[length:]


def _chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's chi-square p-value of observed counts against probabilities (cells with expectation < 5 pooled).

    A count in a cell of probability 0 (a token outside the top-p nucleus) gives p-value 0.
    """
    if counts[probs == 0].sum() > 0:
        return 0.0
    counts, probs = counts[probs > 0], probs[probs > 0]
    expected = probs * counts.sum()
    small = expected < 5
    observed = torch.cat([counts[~small], counts[small].sum().view(1)]) if small.any() else counts
    expected = torch.cat([expected[~small], expected[small].sum().view(1)]) if small.any() else expected
    statistic = float(((observed - expected) ** 2 / expected).sum())
    dof = observed.numel() - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), torch.tensor(statistic / 2, dtype=torch.float64)))


def _exact_law(table: torch.Tensor, first: int, sampling: SamplingConfig, horizon: int) -> torch.Tensor:
    """Exact law `[V ** horizon]` of `horizon` tokens after token `first` for a Markov table."""
    step = sampling_probs(table, sampling)
    vocab = step.shape[0]
    law = step[first]  # [V]: the first token
    for _ in range(horizon - 1):
        last = torch.arange(law.numel()) % vocab  # last token of each continuation so far
        law = (law.unsqueeze(-1) * step[last]).flatten()
    return law


def _sample_counts(decoder: SpeculativeDecoder, prompt: torch.Tensor, horizon: int, samples: int) -> torch.Tensor:
    vocab = decoder.target.vocab_size
    counts = torch.zeros(vocab**horizon, dtype=torch.float64)
    generator = torch.Generator().manual_seed(0)
    for _ in range(samples):
        tokens = decoder.generate(prompt, horizon, generator=generator).tokens
        counts[sum(t * vocab ** (horizon - 1 - i) for i, t in enumerate(tokens))] += 1
    return counts


TARGET_TABLE = torch.tensor([[1.5, 0.2, -1.0, 0.3], [0.0, 1.0, 0.5, -0.5], [-0.7, 0.3, 1.2, 0.9], [0.4, -1.2, 0.0, 1.1]], dtype=torch.float64)
DRAFT_TABLE = torch.tensor([[0.0, 1.4, 0.3, -0.6], [1.0, -0.5, 0.2, 0.8], [0.5, 0.5, -1.0, 0.6], [-0.3, 0.9, 1.0, -0.2]], dtype=torch.float64)
HORIZON, SAMPLES = 4, 6000


@pytest.mark.parametrize("sampling", [SamplingConfig(temperature=1.0), SamplingConfig(temperature=1.2, top_p=0.85)])  # nuclei that overlap
def test_speculative_sampling_has_the_targets_distribution(sampling: SamplingConfig) -> None:
    prompt = torch.tensor([[2, 0]])
    decoder = SpeculativeDecoder(TableLM(DRAFT_TABLE), TableLM(TARGET_TABLE), gamma=2, sampling=sampling)
    counts = _sample_counts(decoder, prompt, HORIZON, SAMPLES)
    law = _exact_law(TARGET_TABLE, 0, sampling, HORIZON)
    assert _chi_square_p_value(counts, law) > 1e-3
    assert 0.0 < decoder.stats.acceptance_rate < 1.0
    assert _chi_square_p_value(counts, _exact_law(DRAFT_TABLE, 0, sampling, HORIZON)) < 1e-6  # the test can tell the two laws apart


def test_chi_square_rejects_a_wrong_acceptance_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    def accept_everything(draft_tokens: torch.Tensor, draft_probs: torch.Tensor, target_probs: torch.Tensor,
                          generator: torch.Generator | None) -> tuple[int, int]:
        count = draft_tokens.shape[0]
        return count, int(torch.multinomial(target_probs[count], 1, generator=generator))

    monkeypatch.setattr(decoding, "verify_sampled", accept_everything)
    sampling = SamplingConfig(temperature=1.0)
    decoder = SpeculativeDecoder(TableLM(DRAFT_TABLE), TableLM(TARGET_TABLE), gamma=2, sampling=sampling)
    counts = _sample_counts(decoder, torch.tensor([[2, 0]]), HORIZON, SAMPLES)
    assert _chi_square_p_value(counts, _exact_law(TARGET_TABLE, 0, sampling, HORIZON)) < 1e-6


def _enumerated_law(next_logits: Any, prompt: torch.Tensor, vocab: int, horizon: int, sampling: SamplingConfig) -> torch.Tensor:
    """Exact law `[V ** horizon]` of a model's continuations of `prompt`, by enumerating every prefix."""
    law = torch.ones(1, dtype=torch.float64)
    for length in range(horizon):
        prefixes = torch.tensor(list(itertools.product(range(vocab), repeat=length)), dtype=torch.int64).view(vocab**length, length)
        steps = torch.stack([sampling_probs(next_logits(torch.cat([prompt[0], prefix]).unsqueeze(0)), sampling) for prefix in prefixes])
        law = (law.unsqueeze(-1) * steps).flatten()
    return law


@pytest.mark.slow
@torch.no_grad()
def test_sampled_speculative_decoding_of_a_real_qwen3_has_its_distribution() -> None:
    """transformers' Qwen3 as the target and a layer draft of it, caches rolled back after every rejection."""
    vocab, horizon, samples = 4, 3, 1500
    target = qwen3(0, layers=2, vocab=vocab)
    draft = LayerDraftLM(scrambled_draft(target, (0,), seed=1))
    sampling = SamplingConfig(temperature=1.0)
    prompt = torch.tensor([[1, 3, 2]])
    target_law = _enumerated_law(lambda ids: target(input_ids=ids).logits[0, -1], prompt, vocab, horizon, sampling)
    draft_law = _enumerated_law(lambda ids: draft.forward(ids, draft.new_cache())[0, -1], prompt, vocab, horizon, sampling)
    decoder = SpeculativeDecoder(draft, HFCausalLM(target), gamma=1, sampling=sampling)
    counts = torch.zeros(vocab**horizon, dtype=torch.float64)
    generator = torch.Generator().manual_seed(0)
    for _ in range(samples):
        tokens = decoder.generate(prompt, horizon, generator=generator).tokens
        counts[sum(t * vocab ** (horizon - 1 - i) for i, t in enumerate(tokens))] += 1
    assert 0.0 < decoder.stats.acceptance_rate < 1.0
    assert _chi_square_p_value(counts, target_law) > 1e-3
    assert _chi_square_p_value(counts, draft_law) < 1e-6  # the draft's own law is far enough away to be told apart


def test_plain_sampling_matches_the_exact_law() -> None:
    sampling = SamplingConfig(temperature=0.7, top_p=0.8)
    target = TableLM(TARGET_TABLE)
    generator = torch.Generator().manual_seed(1)
    counts = torch.zeros(4**3, dtype=torch.float64)
    for _ in range(3000):
        a, b, c = generate_plain(target, torch.tensor([[0]]), 3, sampling, generator).tokens
        counts[16 * a + 4 * b + c] += 1
    assert _chi_square_p_value(counts, _exact_law(TARGET_TABLE, 0, sampling, 3)) > 1e-3


def test_top_p_keeps_the_smallest_nucleus() -> None:
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64))
    probs = sampling_probs(logits, SamplingConfig(temperature=1.0, top_p=0.75))
    torch.testing.assert_close(probs, torch.tensor([0.5 / 0.8, 0.3 / 0.8, 0.0, 0.0], dtype=torch.float64))
    assert sampling_probs(logits, SamplingConfig(temperature=1.0, top_p=0.5))[0] == 1.0


def test_relaxed_acceptance_is_lossy_and_greedy_only() -> None:
    logits = torch.full((3, 10), -5.0)
    logits[0, 4] = logits[1, 7] = logits[2, 1] = 5.0  # target argmax 4, then 7, then 1
    assert verify_greedy(torch.tensor([5, 7]), logits) == (0, 4)
    assert verify_greedy(torch.tensor([5, 6]), logits, relaxed_distance=1) == (2, 1)
    with pytest.raises(ConfigError):
        SamplingConfig(temperature=1.0, relaxed_distance=1)


def test_decoder_refuses_mismatched_vocabularies_and_batches() -> None:
    with pytest.raises(ShapeError):
        SpeculativeDecoder(TableLM(DRAFT_TABLE[:3, :3]), TableLM(TARGET_TABLE))
    with pytest.raises(ConfigError):
        SpeculativeDecoder(TableLM(DRAFT_TABLE), TableLM(TARGET_TABLE), gamma=0)
    with pytest.raises(ShapeError):
        SpeculativeDecoder(HFCausalLM(qwen3(1, layers=1)), HFCausalLM(qwen3(0))).generate(torch.zeros(2, 3, dtype=torch.int64), 4)
    assert math.isnan(SpeculativeDecoder(TableLM(DRAFT_TABLE), TableLM(TARGET_TABLE)).stats.acceptance_rate)


def test_acceptance_counters() -> None:
    stats = decoding.DecodeStats(gamma=3)
    stats.record_round(3, 1)  # first accepted, second rejected, third never checked
    stats.record_round(3, 3)
    stats.record_round(2, 0)  # a shortened last round
    assert stats.drafted == 8 and stats.reached == [3, 2, 1] and stats.accepted == [2, 1, 1] and stats.histogram == [1, 1, 0, 1]
    summary = stats.summary()
    assert summary["acceptance_rate"] == pytest.approx(4 / 8)
    assert summary["acceptance_by_position"] == pytest.approx([2 / 3, 1 / 2, 1.0])
    assert summary["mean_accepted_per_round"] == pytest.approx(4 / 3)
    total = decoding.DecodeStats(gamma=3)
    total.add(stats)
    total.add(stats)
    assert total.histogram == [2, 2, 0, 2] and total.summary()["acceptance_by_position"] == summary["acceptance_by_position"]
