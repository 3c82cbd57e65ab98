"""Layer-sampled drafts: the seed's layer set, identity at initialisation, the gated knowledge cross-attention, files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from rsd.errors import CheckpointError, ConfigError, ShapeError
from rsd.models.layer_draft import LayerDraft, LayerDraftConfig, build_knowledge_memory, evenly_spaced_layers


def qwen3(layers: int = 6, seed: int = 0) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=8, tie_word_embeddings=True, initializer_range=0.2, attn_implementation="sdpa")
    return Qwen3ForCausalLM(config).double().eval()


def skipped_target_logits(target: Qwen3ForCausalLM, layers: tuple[int, ...], ids: torch.Tensor) -> torch.Tensor:
    """The target run by hand through `layers` only (what a draft with identity transitions computes)."""
    base = target.model
    hidden = base.embed_tokens(ids)
    positions = torch.arange(ids.shape[1]).unsqueeze(0)
    rotary = base.rotary_emb(hidden, positions)
    for index in layers:
        hidden = base.layers[index](hidden, attention_mask=None, position_ids=positions, position_embeddings=rotary)
    return target.lm_head(base.norm(hidden))


def draft_logits(draft: LayerDraft, ids: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(ids.shape[1]).unsqueeze(0)
    return draft.logits(draft.hidden(draft.target.get_input_embeddings()(ids), positions))


def test_evenly_spaced_layers_give_the_seed_set() -> None:
    assert evenly_spaced_layers(28, 6) == (0, 5, 11, 16, 22, 27)
    assert evenly_spaced_layers(28, 4) == (0, 9, 18, 27)
    with pytest.raises(ConfigError):
        evenly_spaced_layers(6, 7)


@pytest.mark.parametrize("layers", [(0, 2, 5), (1, 3), (0, 1, 2, 3, 4, 5)])
@torch.no_grad()
def test_untrained_draft_is_the_target_with_layers_skipped(layers: tuple[int, ...]) -> None:
    target = qwen3()
    draft = LayerDraft(LayerDraftConfig.for_target(target, layers), target)
    ids = torch.randint(0, 40, (2, 11), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(draft_logits(draft, ids), skipped_target_logits(target, layers, ids), rtol=0, atol=1e-12)
    if layers == (0, 1, 2, 3, 4, 5):
        torch.testing.assert_close(draft_logits(draft, ids), target(input_ids=ids).logits, rtol=0, atol=1e-12)
    # transitions where layers are skipped (and before a first layer > 0), none between neighbours
    expected = sum(1 for gap in draft.config.gaps() if gap) + int(layers[0] > 0)
    assert sum(1 for m in draft.modules() if type(m).__name__ == "Transition") == expected


def test_draft_state_holds_only_its_own_weights_and_round_trips(tmp_path: Path) -> None:
    target = qwen3()
    draft = LayerDraft(LayerDraftConfig.for_target(target, (0, 3, 5), knowledge=True), target)
    assert all(not k.startswith(("model.", "lm_head")) for k in draft.state_dict())
    assert all(p.data_ptr() != q.data_ptr() for p in draft.parameters() for q in target.parameters())
    with torch.no_grad():
        for parameter in draft.parameters():
            parameter.add_(0.1)
    draft.save(tmp_path, target_fingerprint="abc")
    loaded = LayerDraft.load(tmp_path, target, target_fingerprint="abc")
    memory = torch.randn(7, 32, dtype=torch.float64)
    draft.set_knowledge(memory)
    loaded.set_knowledge(memory)
    ids = torch.randint(0, 40, (1, 9))
    torch.testing.assert_close(draft_logits(loaded, ids), draft_logits(draft, ids), rtol=0, atol=0)
    with pytest.raises(CheckpointError):
        LayerDraft.load(tmp_path, target, target_fingerprint="another")
    with pytest.raises(ShapeError):
        LayerDraft.load(tmp_path, qwen3(layers=4))


def test_tuned_layers_start_as_the_targets_and_train_alone(tmp_path: Path) -> None:
    target = qwen3()
    target.requires_grad_(False)
    shared = LayerDraft(LayerDraftConfig.for_target(target, (0, 3)), target)
    tuned = LayerDraft(LayerDraftConfig.for_target(target, (0, 3), tune_layers=True), target)
    ids = torch.randint(0, 40, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(draft_logits(tuned, ids), draft_logits(shared, ids), rtol=0, atol=0)
    assert any(k.startswith("layers.1.") for k in tuned.state_dict()) and all(p.requires_grad for p in tuned.parameters())
    draft_logits(tuned, ids).sum().backward()
    assert tuned.layers[1].mlp.down_proj.weight.grad is not None and target.model.layers[3].mlp.down_proj.weight.grad is None
    with torch.no_grad():
        tuned.layers[1].mlp.down_proj.weight.mul_(2.0)
    tuned.save(tmp_path, "t")
    torch.testing.assert_close(LayerDraft.load(tmp_path, target).layers[1].mlp.down_proj.weight, tuned.layers[1].mlp.down_proj.weight)
    assert not torch.equal(target.model.layers[3].mlp.down_proj.weight, tuned.layers[1].mlp.down_proj.weight)


@torch.no_grad()
def test_knowledge_gate_starts_closed_and_reads_the_memory_once_open() -> None:
    target = qwen3()
    plain = LayerDraft(LayerDraftConfig.for_target(target, (0, 3, 5)), target)
    knowing = LayerDraft(LayerDraftConfig.for_target(target, (0, 3, 5), knowledge=True, knowledge_heads=2), target)
    knowing.load_state_dict(plain.state_dict(), strict=False)
    memory = build_knowledge_memory(target, [torch.randint(0, 40, (30,)), torch.randint(0, 40, (12,))], max_tokens=40, chunk=16)
    assert memory.shape == (40, 32)
    ids = torch.randint(0, 40, (1, 8))
    with pytest.raises(ConfigError):
        draft_logits(knowing, ids)  # no knowledge set yet
    knowing.set_knowledge(memory)
    torch.testing.assert_close(draft_logits(knowing, ids), draft_logits(plain, ids), rtol=0, atol=0)  # gate 0: exactly the plain draft
    knowing.cross_attention.gate.fill_(0.5)
    first = draft_logits(knowing, ids)
    assert not torch.allclose(first, draft_logits(plain, ids))
    knowing.set_knowledge(torch.randn(5, 32, dtype=torch.float64))  # another memory (order and scale alone would not change the read)
    assert not torch.allclose(first, draft_logits(knowing, ids))
    with pytest.raises(ConfigError):
        plain.set_knowledge(memory)
    with pytest.raises(ShapeError):
        knowing.set_knowledge(torch.zeros(3, 16, dtype=torch.float64))


def test_bad_configs_are_refused() -> None:
    for layers in ((3, 1), (0, 0), (), (0, 6)):
        with pytest.raises(ConfigError):
            LayerDraftConfig(layers=layers, target_layers=6, hidden_size=32)
    with pytest.raises(ConfigError):
        LayerDraftConfig(layers=(0, 2), target_layers=6, hidden_size=32, knowledge=True, knowledge_heads=5)
    with pytest.raises(ShapeError):
        LayerDraft(LayerDraftConfig(layers=(0, 2), target_layers=6, hidden_size=32, token_offset=30, vocab_size=20), qwen3())
