"""CogVLA's modules: shapes and masks, the keep schedule, the segmented forward with pruning, and the routers' NaN guards."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import two_vit_config

from rsd.config import CogVLAConfig
from rsd.errors import ConfigError, ShapeError
from rsd.models.cogvla import MoERouter, debug_order, instruction_condition, keep_schedule
from rsd.models.lora import transfer_weights
from rsd.models.vla import PrismaticVLA
from rsd.presets import get_preset

INSTRUCTIONS = ["pick up the red block", "put the blue block next to the green block on the left"]
ALL = CogVLAConfig(aggregation_tokens=8, film=True, moe=True, lfp_layers=(1, 3), action_tokens=4)


def build(cogvla: CogVLAConfig, seed: int = 0) -> PrismaticVLA:
    torch.manual_seed(seed)
    return PrismaticVLA(two_vit_config(cogvla)).eval()


def inputs(vla: PrismaticVLA, batch: int = 2, seed: int = 0):
    images = np.random.default_rng(seed).integers(0, 256, size=(batch, 1, 64, 64, 3), dtype=np.uint8)
    return vla.encode_inputs(images, INSTRUCTIONS[:batch], torch.linspace(-0.5, 0.5, batch * 8).reshape(batch, 8))


def test_every_module_is_off_by_default_and_openvla_keeps_its_shapes() -> None:
    config = get_preset("openvla-7b").model
    assert config.cogvla == CogVLAConfig() and not config.cogvla.enabled
    with torch.device("meta"):
        vla = PrismaticVLA(config)
    assert vla.cogvla is None and vla.projector is not None
    assert vla.describe()["cogvla"] == 0
    assert vla.describe()["total"] - vla.action_query.numel() == 7_541_237_184  # OpenVLA-7B's count (rsd's layout adds the query)


def test_config_refuses_modules_the_model_cannot_take() -> None:
    tiny = get_preset("tiny").model  # conv backbone
    with pytest.raises(ConfigError, match="ViT backbones only"):
        dataclasses.replace(tiny, cogvla=CogVLAConfig(aggregation_tokens=4))
    with pytest.raises(ConfigError, match="two ViT backbones"):
        dataclasses.replace(get_preset("tiny-vit").model, cogvla=CogVLAConfig(moe=True))
    with pytest.raises(ConfigError, match="below num_layers=6"):
        dataclasses.replace(tiny, cogvla=CogVLAConfig(lfp_layers=(2, 6)))
    with pytest.raises(ConfigError, match="strictly increasing"):
        CogVLAConfig(lfp_layers=(4, 2))
    with pytest.raises(ConfigError, match="0 < last <= first <= 1"):
        CogVLAConfig(lfp_keep=(0.2, 0.8))
    with pytest.raises(ConfigError, match="an int >= 2"):
        CogVLAConfig(action_tokens=1)
    oft = dataclasses.replace(tiny, layout="oft", query_summary=False, prompt_end_id=5)
    with pytest.raises(ConfigError, match="action_block"):
        dataclasses.replace(oft, cogvla=CogVLAConfig(action_tokens=4))


def test_keep_schedule_is_the_shifted_cosine_at_the_routing_layers_midpoints() -> None:
    cog = CogVLAConfig(lfp_layers=(5, 10, 15, 20, 25, 30))
    # 192 visual tokens (CogVLA's three images): 0.85 → 0.15, mean ratio 0.5 (CogVLA's lfp_average_factor)
    assert keep_schedule(cog, 192) == [161, 144, 113, 79, 48, 31]
    assert keep_schedule(cog, 64) == [54, 48, 38, 26, 16, 10]
    assert keep_schedule(CogVLAConfig(lfp_layers=(3,)), 10) == [5]
    assert keep_schedule(CogVLAConfig(lfp_layers=(1, 2, 3)), 2) == [2, 1, 1]  # at least one visual token stays


def test_debug_order_adds_one_module_per_row() -> None:
    rows = debug_order(get_preset("openvla-7b").model, num_patches=256)
    assert [name for name, _ in rows] == ["plain", "+aggregation", "+FiLM", "+MoE", "+LFP", "+CAtten"]
    last = rows[-1][1].cogvla
    assert last == CogVLAConfig(aggregation_tokens=64, film=True, moe=True, lfp_layers=(5, 10, 15, 20, 25, 30), action_tokens=8)
    assert [name for name, _ in debug_order(get_preset("tiny").model, num_patches=16)] == ["plain", "+LFP", "+CAtten"]


@torch.inference_mode()
def test_zero_film_is_the_identity_and_the_hand_written_vit_pass_equals_timms() -> None:
    plain, film = build(CogVLAConfig()), build(CogVLAConfig(film=True))
    new = transfer_weights(plain, film)
    assert new and all(key.startswith("cogvla.vision.film.") for key in new)
    x = inputs(plain)
    torch.testing.assert_close(film(x), plain(x), atol=1e-6, rtol=0)  # FiLM starts at zero: timm's forward_intermediates path
    with torch.no_grad():
        for layer in film.cogvla.vision.film[0]:
            layer.weight.normal_(0.0, 0.05)
    changed = film.embed(x).hidden[:, 1:17]
    assert not torch.allclose(changed, plain.embed(x).hidden[:, 1:17], atol=1e-4)


@torch.inference_mode()
def test_aggregation_tokens_replace_the_patches_and_read_them() -> None:
    vla = build(CogVLAConfig(aggregation_tokens=3))
    x = inputs(vla)
    state = vla.embed(x)
    prompt = x.input_ids.shape[1]
    assert state.hidden.shape[1] == 1 + 3 + 1 + prompt + 1  # BOS, 3 aggregation tokens, proprio, prompt, query
    assert vla.query_summary.in_features == 3 * vla.config.llm.hidden_size
    other = inputs(vla, seed=1)
    assert not torch.allclose(vla.embed(other).hidden[:, 1:4], state.hidden[:, 1:4])  # they attend to the (new) patches


@torch.inference_mode()
def test_moe_router_mixes_the_two_experts_by_the_instruction() -> None:
    vla = build(CogVLAConfig(moe=True))
    assert vla.projector is None
    moe = vla.cogvla.moe
    prompts = vla.language_model.model.embed_tokens(inputs(vla).input_ids)
    mask = inputs(vla).text_mask
    condition = instruction_condition(prompts, mask)
    weights = moe.mixing(condition)
    assert weights.shape == (2, 2) and torch.allclose(weights.sum(dim=1), torch.ones(2))
    assert not torch.allclose(weights[0], weights[1])  # two instructions, two mixtures
    first, second = torch.randn(2, 16, 96), torch.randn(2, 16, 64)
    expected = weights[:, :1, None] * moe.featurizer_proj(first) + weights[:, 1:, None] * moe.fused_featurizer_proj(second)
    torch.testing.assert_close(moe((first, second), condition), expected)


@torch.inference_mode()
def test_lfp_keeps_bos_proprio_text_and_actions_and_the_top_scored_visual_tokens() -> None:
    vla = build(CogVLAConfig(lfp_layers=(1, 3)))
    x = inputs(vla, batch=1)
    state = vla.advance(vla.embed(x), 1)  # about to enter routing layer 1 with 16 visual tokens
    length = state.hidden.shape[1]
    scores = vla.cogvla.lfp["1"](state.hidden[:, 1:17], state.pruning.condition)
    pruned = vla.cogvla.prune(state, 1)
    keep = vla.cogvla.keep[0]
    assert keep == 12 and pruned.hidden.shape[1] == length - (16 - keep) and pruned.pruning.visual == keep
    kept = pruned.position_ids[0].tolist()  # one unpadded row: position id = index before pruning
    top = sorted((scores[0].topk(keep).indices + 1).tolist())
    assert kept == [0, *top, *range(17, length)]
    torch.testing.assert_close(pruned.hidden[0, keep + 1 :], state.hidden[0, 17:])  # everything after the visual tokens, unchanged
    assert pruned.readout.tolist() == [[pruned.hidden.shape[1] - 1]]  # the query still, at its new position
    # non-visual tokens are never scored, so even a router that would rank them first cannot drop one
    with torch.no_grad():
        vla.cogvla.lfp["1"].score.bias.fill_(-1e30)
    assert vla.cogvla.prune(state, 1).position_ids[0, keep + 1 :].tolist() == list(range(17, length))


@torch.inference_mode()
def test_catten_is_bidirectional_among_the_action_tokens_and_causal_elsewhere() -> None:
    vla = build(CogVLAConfig(action_tokens=4))
    state = vla.embed(inputs(vla, batch=1))
    length = state.hidden.shape[1]
    allowed = (state.attention_mask[0, 0] == 0).numpy()
    expected = np.tril(np.ones((length, length), dtype=bool))
    expected[-4:, -4:] = True
    assert (allowed == expected).all()
    assert state.readout.tolist() == [list(range(length - 4, length))]
    # the first action token reads the last one: change the last token's offset, the first token's output moves
    before = vla.resume(state)
    first = vla.final_readout(state)[:, 0]
    with torch.no_grad():
        vla.cogvla.action_offsets[-1].add_(1.0)
    again = vla.embed(inputs(vla, batch=1))
    assert not torch.allclose(vla.final_readout(again)[:, 0], first, atol=1e-5)
    assert not torch.allclose(vla.resume(again), before, atol=1e-5)


@torch.inference_mode()
def test_segmented_forward_with_every_module_equals_the_plain_forward_for_every_exit_layer() -> None:
    vla = build(ALL)
    x = inputs(vla)
    full = vla(x)
    lengths = []
    for k in range(vla.config.llm.num_layers + 1):
        state = vla.prefix(x, k)
        lengths.append(state.hidden.shape[1])
        size = state.hidden.shape[1]
        assert state.readout.tolist() == [list(range(size - 4, size))] * 2  # the draft reads the action tokens at layer k
        torch.testing.assert_close(state.query_hidden, state.hidden[:, -4:].mean(dim=1))
        torch.testing.assert_close(vla.resume(state), full, atol=1e-5, rtol=0)
    start = 1 + 8 + 1 + x.input_ids.shape[1] + 4
    assert lengths == [start, start, start - 2, start - 2, start - 6, start - 6, start - 6]  # 8 → 6 → 2 visual tokens
    images = np.random.default_rng(0).integers(0, 256, size=(2, 1, 64, 64, 3), dtype=np.uint8)
    proprio = torch.linspace(-0.5, 0.5, 16).reshape(2, 8)
    for row in range(2):  # a batched row equals the row alone (padding is never routed)
        single = vla(vla.encode_inputs(images[row : row + 1], INSTRUCTIONS[row : row + 1], proprio[row : row + 1]))
        torch.testing.assert_close(single[0], full[row], atol=1e-5, rtol=0)


def test_moe_router_stays_finite_in_fp16_where_a_plain_fp16_router_overflows() -> None:
    torch.manual_seed(0)
    moe = MoERouter([96, 64], 128)
    with torch.no_grad():  # the weights a run at a too-high learning rate leaves behind
        moe.router_in.weight.mul_(2000.0)
        moe.router_out.weight.mul_(2000.0)
    moe = moe.half().eval()
    condition = torch.nn.functional.layer_norm(torch.randn(4, 128), (128,))
    naive = moe.router_out(torch.nn.functional.gelu(moe.router_in(condition.half())))
    assert not torch.isfinite(torch.softmax(naive.float(), dim=-1)).all()  # what fp16 routing would give
    weights = moe.mixing(condition)
    assert torch.isfinite(weights).all() and torch.allclose(weights.sum(dim=1), torch.ones(4))


def test_a_diverged_router_stops_training_with_its_name() -> None:
    vla = build(ALL).train()
    x = inputs(vla)
    with torch.no_grad():
        vla.cogvla.lfp["3"].down.weight[0, 0] = float("nan")
    with pytest.raises(ShapeError, match="LFP router before layer 3.*lower the learning rate"):
        vla(x)
    vla = build(ALL).train()
    with torch.no_grad():
        vla.cogvla.moe.router_in.bias.fill_(float("inf"))
    with pytest.raises(ShapeError, match="MoE router"):
        vla(x)


def test_routers_stay_finite_and_learn_at_a_high_learning_rate() -> None:
    vla = build(ALL).train()
    x = inputs(vla)
    routers = [p for name, p in vla.named_parameters() if ".moe." in name or ".lfp." in name]
    before = [p.detach().clone() for p in routers]
    optimizer = torch.optim.AdamW(vla.parameters(), lr=1.0)
    target = torch.randn(2, vla.config.llm.hidden_size)
    for _ in range(3):
        loss = (vla(x) - target).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vla.parameters(), 1.0)
        optimizer.step()
    assert all(torch.isfinite(p).all() for p in routers)
    assert all(not torch.equal(a, b) for a, b in zip(before, routers, strict=True))  # every router got a gradient (LFP: straight-through)
    assert torch.isfinite(vla(x)).all()
