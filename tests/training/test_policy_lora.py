"""train-policy with CogVLA's modules: from scratch, and LoRA fine-tuning of a trained policy into the three-part checkpoint."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from click.testing import CliRunner

from rsd.cli import main
from rsd.config import AdapterConfig, CogVLAConfig, PolicyTrainConfig
from rsd.data.hdf5 import read_demos
from rsd.envs.demos import generate_demos
from rsd.models.lora import load_lora_checkpoint
from rsd.models.main import MainModel
from rsd.presets import get_preset
from rsd.training.policy import train_policy
from rsd.training.tokenizer import train_tokenizer

COG = CogVLAConfig(aggregation_tokens=4, film=True, lfp_layers=(2, 4), action_tokens=4)
BY_VAL = PolicyTrainConfig(select_by="val_l1")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Six tabletop demonstrations, a tokenizer (2 epochs) and a plain tiny-vit policy trained on them for one epoch."""
    root = tmp_path_factory.mktemp("lora")
    generate_demos("tabletop", episodes=6, out=root / "demos.hdf5", progress=False)
    spec = get_preset("tiny-vit")
    episodes = read_demos(root / "demos.hdf5")
    train_tokenizer([e.actions for e in episodes], spec.tokenizer, dataclasses.replace(spec.tokenizer_train, epochs=2), root / "tokenizer",
                    [e.episode_id for e in episodes], progress=False)
    train = dataclasses.replace(spec.policy_train, epochs=1, batch_size=64, val_fraction=0.34)
    train_policy(root / "demos.hdf5", root / "tokenizer", root / "base", "tiny-vit", train, progress=False, options=BY_VAL)
    return root, train


def test_lora_fine_tuning_writes_three_parts_and_a_merged_policy_and_keeps_vision_frozen(trained) -> None:
    root, train = trained
    out = root / "cog"
    summary = train_policy(root / "demos.hdf5", root / "tokenizer", out, "tiny-vit", train, progress=False, options=BY_VAL, cogvla=COG,
                           adapter=AdapterConfig(rank=4, alpha=4.0), base=root / "base")
    assert summary["cogvla"]["lfp_layers"] == [2, 4] and summary["adapter"]["rank"] == 4
    base, policy = MainModel.load(root / "base"), MainModel.load(out)
    assert policy.vla.config.cogvla == COG and policy.fingerprint == summary["fingerprint"]
    ours, theirs = policy.vla.state_dict(), base.vla.state_dict()
    assert all(torch.equal(ours[k], v) for k, v in theirs.items() if k.startswith("vision_backbone."))  # frozen
    assert not torch.equal(ours["language_model.model.layers.0.self_attn.q_proj.weight"],
                           theirs["language_model.model.layers.0.self_attn.q_proj.weight"])  # adapters trained and merged
    assert torch.equal(ours["language_model.model.embed_tokens.weight"], theirs["language_model.model.embed_tokens.weight"])
    loaded = load_lora_checkpoint(out / "lora")
    images = torch.randint(0, 256, (1, 1, 64, 64, 3), dtype=torch.uint8).numpy()
    with torch.inference_mode():
        x = policy.prepare(images, ["pick up the red block"], torch.zeros(1, 8).numpy())
        torch.testing.assert_close(loaded.head(loaded.vla(x)), policy.head(policy.vla(x)), atol=1e-5, rtol=0)


def test_cogvla_modules_train_from_scratch_and_lora_needs_a_base(trained, tmp_path) -> None:
    root, train = trained
    summary = train_policy(root / "demos.hdf5", root / "tokenizer", tmp_path / "scratch", "tiny-vit", train, progress=False, options=BY_VAL,
                           cogvla=COG)
    assert summary["adapter"] is None and MainModel.load(tmp_path / "scratch").vla.config.cogvla == COG
    assert not (tmp_path / "scratch" / "lora").exists()
    result = CliRunner().invoke(main, [
        "train-policy", "--data", str(root / "demos.hdf5"), "--tokenizer", str(root / "tokenizer"), "--out", str(tmp_path / "x"),
        "--preset", "tiny-vit", "--lora-rank", "4", "--aggregation-tokens", "4"])
    assert result.exit_code != 0 and "--base" in result.output
