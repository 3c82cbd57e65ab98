"""Lossless speculative decoding for causal LMs with a KV cache (text LMs and OpenVLA-style action tokens).

A draft model proposes `gamma` tokens one at a time; the target scores the last emitted token and all `gamma`
proposals in one pass; the longest acceptable prefix is kept, one more token comes from the target, and both
KV caches are rolled back to what was kept. With the standard rule (Leviathan et al. 2023, Chen et al. 2023)
the output is exactly the target's: greedy output token for token, sampled output in distribution. The
relaxed rule (`SamplingConfig.relaxed_distance`, Spec-VLA's idea for action bins) is lossy and says so.

The decoder knows nothing about tokenizers, images or robots: a model is anything with the `DecodingLM`
methods (`HFCausalLM` wraps transformers' Llama/Qwen3 `*ForCausalLM`; `rsd.models.layer_draft.LayerDraftLM`
wraps a layer-sampled draft; tests use table models whose logits are known). One sequence at a time (B = 1).

Usage:
    target, draft = HFCausalLM(qwen3), LayerDraftLM(layer_draft)
    decoder = SpeculativeDecoder(draft, target, gamma=5)
    result = decoder.generate(prompt_ids, max_new_tokens=128)          # prompt_ids int64 [1, S]
    plain = generate_plain(target, prompt_ids, max_new_tokens=128)     # result.tokens == plain.tokens (greedy)
    decoder.stats.summary()        # tokens per target pass, acceptance per draft position
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache

from rsd.errors import ConfigError, ShapeError
from rsd.models.layer_draft import LayerDraft, causal_mask


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen from the target's logits."""

    temperature: float = 0.0  # 0: greedy (argmax); > 0: sample from softmax(logits / temperature)
    top_p: float = 1.0  # nucleus: keep the smallest set of tokens whose probability reaches top_p (1: all)
    relaxed_distance: int = 0  # LOSSY, greedy only: also accept a draft token within this many ids of the target's argmax

    def __post_init__(self) -> None:
        if not self.temperature >= 0.0:
            raise ConfigError(f"SamplingConfig.temperature: expected a float >= 0, got {self.temperature!r}.")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"SamplingConfig.top_p: expected a float in (0, 1], got {self.top_p!r}.")
        if not isinstance(self.relaxed_distance, int) or self.relaxed_distance < 0:
            raise ConfigError(f"SamplingConfig.relaxed_distance: expected an int >= 0, got {self.relaxed_distance!r}.")
        if self.relaxed_distance and self.temperature > 0:
            raise ConfigError("SamplingConfig.relaxed_distance: expected 0 when sampling (temperature > 0); "
                              f"the relaxed rule compares with the target's argmax, got {self.relaxed_distance}.")

    @property
    def greedy(self) -> bool:
        """Whether tokens are the argmax (temperature 0)."""
        return self.temperature == 0.0

    @property
    def lossless(self) -> bool:
        """Whether speculative output is exactly the target's (no relaxed acceptance)."""
        return self.relaxed_distance == 0


GREEDY = SamplingConfig()


class DecodingLM(Protocol):
    """What the decoder needs from a model: a cache it can extend and roll back, and logits over V tokens."""

    vocab_size: int  # V: size of the token space the decoder works in

    def new_cache(self) -> Any:
        """An empty KV cache for one sequence."""
        ...

    def prefill(self, prompt: torch.Tensor, cache: Any) -> torch.Tensor:
        """Run the prompt (ids `[1, S]` or embeddings `[1, S, D]`) into `cache`; logits `[1, V]` at its last position."""
        ...

    def forward(self, tokens: torch.Tensor, cache: Any) -> torch.Tensor:
        """Append tokens `[1, T]` (ids in 0..V-1) to `cache`; logits `[1, T, V]` (position t predicts token t+1)."""
        ...

    def cache_length(self, cache: Any) -> int:
        """Positions held by `cache`."""
        ...

    def rollback(self, cache: Any, length: int) -> None:
        """Drop every position of `cache` past the first `length`."""
        ...


def crop_cache(cache: DynamicCache, current: int, length: int) -> None:
    """Roll a transformers cache holding `current` positions back to `length` (DynamicCache.crop with a negative count)."""
    if length > current or length < 0:
        raise ShapeError(f"rollback: expected a length in 0..{current}, got {length}.")
    if length < current:  # crop(-n) removes n positions in every transformers release; crop(0) would empty it in some
        cache.crop(length - current)


class HFCausalLM:
    """A transformers `*ForCausalLM` (Llama, Qwen3, PrismaticVLA's language model) as a `DecodingLM`.

    `token_offset` / `vocab_size` restrict the output to a slice of the vocabulary: OpenVLA's action mode decodes
    over the last 256 ids only, so the decoder's token t is the model's id `token_offset + t`.
    """

    def __init__(self, model: nn.Module, token_offset: int = 0, vocab_size: int | None = None) -> None:
        full = int(model.get_output_embeddings().weight.shape[0])
        size = full - token_offset if vocab_size is None else vocab_size
        if token_offset < 0 or size <= 0 or token_offset + size > full:
            raise ConfigError(f"HFCausalLM: expected a vocabulary slice inside 0..{full}, got offset {token_offset} size {vocab_size}.")
        self.model = model
        self.base = model.get_decoder()
        self.token_offset = token_offset
        self.vocab_size = size
        weight = model.get_output_embeddings().weight
        self.head_weight = weight if size == full else weight[token_offset : token_offset + size]

    def new_cache(self) -> DynamicCache:
        """An empty DynamicCache shaped by the model's config."""
        return DynamicCache(config=self.model.config)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits `[..., V]` over the slice from final hidden states `[..., D]`."""
        return F.linear(hidden, self.head_weight)

    def prefill(self, prompt: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
        """Run the prompt (ids `[1, S]` or embeddings `[1, S, D]`) into `cache`; logits `[1, V]` at its last position."""
        check_prompt(prompt)
        if prompt.dtype.is_floating_point:
            hidden = self.base(inputs_embeds=prompt, cache=cache, use_cache=True).last_hidden_state
        else:
            hidden = self.base(input_ids=prompt, cache=cache, use_cache=True).last_hidden_state
        return self.logits(hidden[:, -1])

    def forward(self, tokens: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
        """Append tokens `[1, T]` (slice ids) to `cache`; logits `[1, T, V]`."""
        embeds = self.base.embed_tokens(tokens + self.token_offset)
        return self.logits(self.base(inputs_embeds=embeds, cache=cache, use_cache=True).last_hidden_state)

    def cache_length(self, cache: DynamicCache) -> int:
        """Positions held by `cache`."""
        return cache.get_seq_length()

    def rollback(self, cache: DynamicCache, length: int) -> None:
        """Drop every position past the first `length`."""
        crop_cache(cache, cache.get_seq_length(), length)


class LayerDraftLM:
    """A `LayerDraft` as a `DecodingLM` (rsd.runtime.decoding): its own DynamicCache over the sampled layers."""

    def __init__(self, draft: LayerDraft) -> None:
        self.draft = draft
        self.vocab_size = draft.vocab_size
        self._first_layer = draft.config.layers[0]

    def new_cache(self) -> DynamicCache:
        """An empty cache with a slot per target layer (only the sampled ones fill)."""
        return DynamicCache(config=self.draft.target.config)

    def cache_length(self, cache: DynamicCache) -> int:
        """Positions held by `cache`."""
        return cache.get_seq_length(self._first_layer)

    def rollback(self, cache: DynamicCache, length: int) -> None:
        """Drop every position past the first `length`."""
        crop_cache(cache, self.cache_length(cache), length)

    def _run(self, embeds: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
        """Final hidden states `[1, T, D]` of embeddings `[1, T, D]` appended to `cache`."""
        past, length = self.cache_length(cache), embeds.shape[1]
        positions = torch.arange(past, past + length, device=embeds.device).unsqueeze(0)
        mask = None if length == 1 or past == 0 else causal_mask(past, length, embeds.device)  # None: SDPA's own causal rule
        return self.draft.hidden(embeds, positions, mask, cache)

    def prefill(self, prompt: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
        """Run the prompt (target ids `[1, S]` or embeddings `[1, S, D]`) into `cache`; logits `[1, V]` at its end."""
        check_prompt(prompt)
        embeds = prompt if prompt.dtype.is_floating_point else self.draft.target.get_input_embeddings()(prompt)
        return self.draft.logits(self._run(embeds, cache)[:, -1])

    def forward(self, tokens: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
        """Append tokens `[1, T]` (ids counted from the draft's token offset) to `cache`; logits `[1, T, V]`."""
        embeds = self.draft.target.get_input_embeddings()(tokens + self.draft.config.token_offset)
        return self.draft.logits(self._run(embeds, cache))


def check_prompt(prompt: torch.Tensor) -> None:
    """Refuse anything but one non-empty prompt: ids `[1, S]` or embeddings `[1, S, D]`."""
    ok = prompt.ndim == (3 if prompt.dtype.is_floating_point else 2) and prompt.shape[0] == 1 and prompt.shape[1] > 0
    if not ok:
        raise ShapeError(f"decoding: expected one prompt, ids [1, S] or embeddings [1, S, D] with S > 0, got {prompt.dtype} {tuple(prompt.shape)}.")


def sampling_probs(logits: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """The distribution `[..., V]` tokens are drawn from: softmax(logits / T), then the top-p nucleus renormalised."""
    probs = torch.softmax(logits.double() / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # drop a token when the tokens ranked above it already reach top_p (the most likely token always stays)
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= sampling.top_p
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def choose(logits: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator | None) -> int:
    """One token from logits `[V]`: the argmax (greedy) or a draw from `sampling_probs`."""
    if sampling.greedy:
        return int(logits.argmax())
    return int(torch.multinomial(sampling_probs(logits, sampling), 1, generator=generator))


def verify_greedy(draft_tokens: torch.Tensor, target_logits: torch.Tensor, relaxed_distance: int = 0) -> tuple[int, int]:
    """Greedy acceptance: `(accepted count n, next token)` for draft tokens `[G]` and target logits `[G + 1, V]`."""
    target_choice = target_logits.argmax(dim=-1)  # [G + 1]: the target's own token at every drafted position and after
    # accept draft token i when it is the target's argmax there, i.e. what plain greedy decoding would emit;
    # LOSSY relaxed rule: also when it is within `relaxed_distance` ids of it (adjacent action bins)
    ok = (draft_tokens - target_choice[:-1]).abs() <= relaxed_distance
    n = int(ok.long().cumprod(dim=0).sum())  # length of the accepted prefix
    # the next token is the target's argmax after the accepted prefix: its correction at the first rejection,
    # or the bonus token after all G were accepted
    return n, int(target_choice[n])


def verify_sampled(draft_tokens: torch.Tensor, draft_probs: torch.Tensor, target_probs: torch.Tensor,
                   generator: torch.Generator | None) -> tuple[int, int]:
    """Speculative sampling: `(accepted count n, next token)` for draft tokens `[G]` drawn from `draft_probs [G, V]`.

    `target_probs [G + 1, V]` are the target's distributions at the drafted positions and after them; every emitted
    token is then distributed exactly as if it had been drawn from the target.
    """
    steps = torch.arange(draft_tokens.shape[0])
    p = target_probs[steps, draft_tokens]  # p_i(x_i)
    q = draft_probs[steps, draft_tokens]  # q_i(x_i) > 0: the draft drew x_i
    # accept x_i with probability min(1, p_i(x_i) / q_i(x_i)): u < p/q with u ~ U[0, 1)
    u = torch.rand(draft_tokens.shape[0], generator=generator, dtype=target_probs.dtype)
    accepted = u * q < p
    n = int(accepted.long().cumprod(dim=0).sum())
    if n == draft_tokens.shape[0]:
        # all G accepted: the bonus token is a plain draw from the target after the last draft token
        return n, int(torch.multinomial(target_probs[n], 1, generator=generator))
    # rejected at n: draw from the residual norm(max(0, p_n - q_n)); P(accept x) + P(reject) * residual(x) = p_n(x)
    residual = (target_probs[n] - draft_probs[n]).clamp_min(0.0)
    total = residual.sum()
    # total == 0 only when p_n == q_n, where rejection has probability 0 and p_n is the exact limit
    weights = residual / total if total > 0 else target_probs[n]
    return n, int(torch.multinomial(weights, 1, generator=generator))


@dataclass
class DecodeStats:
    """Counters over generate calls: target/draft passes, tokens, and acceptance per draft position."""

    gamma: int  # draft tokens per round
    generated: int = 0  # tokens emitted
    target_passes: int = 0  # target forward calls, the prefill included
    draft_passes: int = 0  # draft forward calls, the prefill included
    rounds: int = 0  # draft-then-verify rounds
    drafted: int = 0  # draft tokens proposed
    reached: list[int] = field(default_factory=list)  # [gamma]: rounds whose draft token i was checked (all before it accepted)
    accepted: list[int] = field(default_factory=list)  # [gamma]: rounds whose draft token i was accepted
    histogram: list[int] = field(default_factory=list)  # [gamma + 1]: rounds by the number of draft tokens accepted

    def __post_init__(self) -> None:
        self.reached = self.reached or [0] * self.gamma
        self.accepted = self.accepted or [0] * self.gamma
        self.histogram = self.histogram or [0] * (self.gamma + 1)

    def record_round(self, gamma: int, accepted: int) -> None:
        """Count one round that drafted `gamma` tokens and accepted the first `accepted`."""
        self.rounds += 1
        self.drafted += gamma
        self.histogram[accepted] += 1
        for position in range(min(gamma, accepted + 1)):  # positions up to the first rejection were checked
            self.reached[position] += 1
            self.accepted[position] += int(position < accepted)

    def add(self, other: DecodeStats) -> None:
        """Add another call's counters to these."""
        self.generated += other.generated
        self.target_passes += other.target_passes
        self.draft_passes += other.draft_passes
        self.rounds += other.rounds
        self.drafted += other.drafted
        self.reached = [a + b for a, b in zip(self.reached, other.reached, strict=True)]
        self.accepted = [a + b for a, b in zip(self.accepted, other.accepted, strict=True)]
        self.histogram = [a + b for a, b in zip(self.histogram, other.histogram, strict=True)]

    @property
    def acceptance_rate(self) -> float:
        """Accepted over drafted tokens (nan before any draft token)."""
        return sum(self.accepted) / self.drafted if self.drafted else float("nan")

    def summary(self) -> dict[str, Any]:
        """JSON-ready: tokens per target pass, acceptance overall and per position, mean accepted per round.

        `acceptance_by_position[i]` is the share of rounds reaching draft token i (tokens < i accepted) that accept it;
        `accepted_histogram[n]` counts the rounds that accepted exactly n draft tokens.
        """
        return {
            "gamma": self.gamma,
            "generated": self.generated,
            "target_passes": self.target_passes,
            "draft_passes": self.draft_passes,
            "rounds": self.rounds,
            "tokens_per_target_pass": self.generated / self.target_passes if self.target_passes else float("nan"),
            "acceptance_rate": self.acceptance_rate,
            "acceptance_by_position": [a / r if r else float("nan") for a, r in zip(self.accepted, self.reached, strict=True)],
            "accepted_histogram": list(self.histogram),
            "mean_accepted_per_round": sum(self.accepted) / self.rounds if self.rounds else float("nan"),
        }


@dataclass
class Generation:
    """The tokens of one generate call and its counters."""

    tokens: list[int]  # emitted tokens, prompt excluded
    stats: DecodeStats  # this call only


def _finish(tokens: list[int], max_new_tokens: int, eos_id: int | None) -> tuple[list[int], bool]:
    """Tokens cut at `max_new_tokens` and after the first `eos_id`; whether generation is over."""
    if eos_id is not None and eos_id in tokens:
        return tokens[: tokens.index(eos_id) + 1], True
    return tokens[:max_new_tokens], len(tokens) >= max_new_tokens


@torch.inference_mode()
def generate_plain(target: DecodingLM, prompt: torch.Tensor, max_new_tokens: int, sampling: SamplingConfig = GREEDY,
                   generator: torch.Generator | None = None, eos_id: int | None = None) -> Generation:
    """Plain autoregressive decoding: one target pass per token (the baseline the speculative output must equal)."""
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens: expected an int >= 1, got {max_new_tokens}.")
    stats = DecodeStats(gamma=0)
    cache = target.new_cache()
    tokens = [choose(target.prefill(prompt, cache)[0], sampling, generator)]
    stats.target_passes = 1
    tokens, done = _finish(tokens, max_new_tokens, eos_id)
    while not done:
        logits = target.forward(torch.tensor([[tokens[-1]]]), cache)
        stats.target_passes += 1
        tokens, done = _finish([*tokens, choose(logits[0, -1], sampling, generator)], max_new_tokens, eos_id)
    stats.generated = len(tokens)
    return Generation(tokens, stats)


class SpeculativeDecoder:
    """Draft `gamma` tokens, verify them in one target pass, keep the accepted prefix, roll back both caches."""

    def __init__(self, draft: DecodingLM, target: DecodingLM, gamma: int = 5, sampling: SamplingConfig = GREEDY) -> None:
        if not isinstance(gamma, int) or gamma < 1:
            raise ConfigError(f"SpeculativeDecoder.gamma: expected an int >= 1, got {gamma!r}.")
        if draft.vocab_size != target.vocab_size:
            raise ShapeError(f"SpeculativeDecoder: expected draft and target over one vocabulary, got {draft.vocab_size} and {target.vocab_size} tokens.")
        self.draft = draft
        self.target = target
        self.gamma = gamma
        self.sampling = sampling
        self.stats = DecodeStats(gamma)  # over every call since construction

    def _draft_round(self, feed: list[int], gamma: int, cache: Any, generator: torch.Generator | None
                     ) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """Propose `gamma` tokens after feeding the unseen tokens `feed`: (tokens `[G]`, their q `[G, V]` or None, passes)."""
        tokens, probs = [], []
        for _ in range(gamma):
            logits = self.draft.forward(torch.tensor([feed]), cache)[0, -1]
            if self.sampling.greedy:
                tokens.append(int(logits.argmax()))
            else:
                q = sampling_probs(logits, self.sampling)
                probs.append(q)
                tokens.append(int(torch.multinomial(q, 1, generator=generator)))
            feed = tokens[-1:]
        return torch.tensor(tokens, dtype=torch.int64), (torch.stack(probs) if probs else None), gamma

    @torch.inference_mode()
    def generate(self, prompt: torch.Tensor, max_new_tokens: int, generator: torch.Generator | None = None,
                 eos_id: int | None = None) -> Generation:
        """Generate up to `max_new_tokens` after `prompt` (ids `[1, S]` or embeddings `[1, S, D]`), stopping after `eos_id`."""
        if max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens: expected an int >= 1, got {max_new_tokens}.")
        stats = DecodeStats(self.gamma)
        target_cache, draft_cache = self.target.new_cache(), self.draft.new_cache()
        tokens = [choose(self.target.prefill(prompt, target_cache)[0], self.sampling, generator)]
        self.draft.prefill(prompt, draft_cache)
        stats.target_passes, stats.draft_passes = 1, 1
        unseen = [tokens[-1]]  # emitted tokens the draft's cache does not hold yet (1, or 2 after a full acceptance)
        tokens, done = _finish(tokens, max_new_tokens, eos_id)
        while not done:
            # Invariant: the target's cache holds the prompt and every emitted token but the last one.
            kept = self.target.cache_length(target_cache)
            gamma = min(self.gamma, max_new_tokens - len(tokens) - 1)  # never draft past what is still wanted
            drafted, draft_probs, passes = self._draft_round(unseen, gamma, draft_cache, generator)
            stats.draft_passes += passes
            # verify: one target pass over the last emitted token and the gamma drafted ones -> gamma + 1 positions
            logits = self.target.forward(torch.cat([torch.tensor(tokens[-1:]), drafted]).unsqueeze(0), target_cache)[0]
            stats.target_passes += 1
            if self.sampling.greedy:
                n, following = verify_greedy(drafted, logits, self.sampling.relaxed_distance)
            elif gamma == 0:
                n, following = 0, int(torch.multinomial(sampling_probs(logits[0], self.sampling), 1, generator=generator))
            else:
                n, following = verify_sampled(drafted, draft_probs, sampling_probs(logits, self.sampling), generator)
            if gamma:  # a last round with nothing left to draft is a plain step, not a drafting round
                stats.record_round(gamma, n)
            # roll back: the target keeps the last emitted token and the n accepted drafts (its next input is `following`)
            self.target.rollback(target_cache, kept + 1 + n)
            if n == gamma:  # the draft never saw its own last proposal (or, with gamma 0, anything this round)
                unseen = [*(unseen if gamma == 0 else drafted[-1:].tolist()), following]
            else:  # the draft saw proposals it must forget: keep what the target kept
                self.draft.rollback(draft_cache, kept + 1 + n)
                unseen = [following]
            tokens, done = _finish([*tokens, *drafted[:n].tolist(), following], max_new_tokens, eos_id)
        stats.generated = len(tokens)
        self.stats.add(stats)
        return Generation(tokens, stats)
