"""Draft training (KL 0.8 + acceptance 0.3) raises acceptance; the AR-mode policy and its draft train on demonstrations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from decoding_fixtures import ar_policy_dir, text_files, text_lm_dir  # noqa: F401  (session fixtures)

from rsd.errors import ConfigError
from rsd.models.ar_actions import ARActionModel
from rsd.models.layer_draft import LayerDraft
from rsd.models.text_lm import load_text_lm
from rsd.runtime.decoding import HFCausalLM, generate_plain
from rsd.training.layer_draft import (
    DraftTrainConfig,
    draft_loss,
    knowledge_tokens,
    train_layer_draft,
    train_layer_draft_ar,
    train_layer_draft_text,
    write_continuations,
)


def test_draft_loss_is_kl_plus_rejection_probability() -> None:
    target = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    draft = torch.log(torch.tensor([[0.5, 0.25, 0.25]]))
    loss, metrics = draft_loss(draft, target)
    kl = float((torch.tensor([0.7, 0.2, 0.1]) * (torch.log(torch.tensor([0.7, 0.2, 0.1])) - torch.log(torch.tensor([0.5, 0.25, 0.25])))).sum())
    accept = 0.5 + 0.2 + 0.1  # sum of min(p, q)
    assert metrics["accept"] == pytest.approx(accept) and metrics["greedy_agreement"] == 1.0
    assert float(loss) == pytest.approx(0.8 * kl + 0.3 * (1 - accept), rel=1e-6)
    assert float(draft_loss(target, target)[0]) == pytest.approx(0.0, abs=1e-6)


def test_text_draft_training_raises_acceptance(text_lm_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    train = DraftTrainConfig(steps=30, batch_size=4, seq_len=48, lr=1e-2, val_batches=2)
    summary = train_layer_draft_text(text_lm_dir, tmp_path / "draft", (0, 3), train, transition_size=16, files=text_files())
    assert summary["val"]["accept"] > summary["val_before"]["accept"]
    assert summary["val"]["kl"] < summary["val_before"]["kl"]
    lm = load_text_lm(text_lm_dir)
    draft = LayerDraft.load(tmp_path / "draft", lm.model, lm.fingerprint)
    assert draft.config.layers == (0, 3)
    assert json.loads((tmp_path / "draft" / "metrics.json").read_text())["steps"] == 30


def test_self_distilled_draft_trains_on_what_the_target_writes(text_lm_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    train = DraftTrainConfig(steps=20, batch_size=4, seq_len=40, prompt_tokens=16, self_distill=8, lr=1e-2, val_batches=1)
    summary = train_layer_draft_text(text_lm_dir, tmp_path / "draft", (0, 3), train, transition_size=16, files=text_files())
    assert summary["val"]["kl"] < summary["val_before"]["kl"]


def test_written_continuations_are_the_targets_greedy_output(text_lm_dir: Path) -> None:  # noqa: F811
    lm = load_text_lm(text_lm_dir, dtype=torch.float64)
    prompts = torch.randint(0, lm.config.vocab_size, (3, 10), generator=torch.Generator().manual_seed(0))
    written = write_continuations(lm.model, prompts, 12, 0.0, torch.Generator(), batch_size=2)
    assert written.shape == (3, 22) and torch.equal(written[:, :10], prompts)
    for row in range(3):
        assert written[row, 10:].tolist() == generate_plain(HFCausalLM(lm.model), prompts[row : row + 1], 12).tokens


def test_knowledge_draft_trains_its_gate(text_lm_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    train = DraftTrainConfig(steps=8, batch_size=2, seq_len=32, memory_tokens=48, lr=1e-2, val_batches=1)
    train_layer_draft_text(text_lm_dir, tmp_path / "draft", (0, 3), train, transition_size=16, knowledge=True, files=text_files())
    lm = load_text_lm(text_lm_dir)
    draft = LayerDraft.load(tmp_path / "draft", lm.model, lm.fingerprint)
    assert draft.config.knowledge and float(draft.cross_attention.gate.detach().abs()) > 0.0  # the cross-attention got gradient


def test_knowledge_tokens_come_from_outside_the_window() -> None:
    stream = torch.arange(100).numpy()
    memory = knowledge_tokens(stream, 40, 20, 30)
    assert memory.tolist() == list(range(25, 40)) + list(range(60, 75))
    assert knowledge_tokens(stream, 90, 10, 30).tolist() == list(range(60, 90))  # nothing after: all from before


def test_ar_policy_and_its_draft_train_on_demonstrations(ar_policy_dir: tuple[Path, Path], tmp_path: Path) -> None:  # noqa: F811
    policy, demos = ar_policy_dir
    metrics = json.loads((policy / "metrics.json").read_text())
    assert metrics["best"]["val_token_accuracy"] > 1.0 / 256  # better than chance after one epoch
    model = ARActionModel.load(policy)
    assert model.vla.config.layout == "openvla" and model.tokenizer.config.token_offset == model.vla.config.llm.vocab_size - 256
    train = DraftTrainConfig(steps=12, batch_size=16, lr=1e-2, val_batches=2)
    summary = train_layer_draft_ar(policy, demos, tmp_path / "draft", (0, 5), train, transition_size=32, val_fraction=0.25)
    assert summary["val"]["kl"] < summary["val_before"]["kl"]
    draft = LayerDraft.load(tmp_path / "draft", model.vla.language_model, model.fingerprint)
    assert draft.vocab_size == 256


def test_draft_config_errors() -> None:
    with pytest.raises(ConfigError):
        DraftTrainConfig(kl_weight=0.0, accept_weight=0.0)
    with pytest.raises(ConfigError):
        DraftTrainConfig(steps=0)


def test_train_layer_draft_command_trains_an_ar_draft_and_refuses_mismatched_options(ar_policy_dir: tuple[Path, Path], text_lm_dir: Path,  # noqa: F811
                                                                                      tmp_path: Path) -> None:
    from click.testing import CliRunner

    from rsd.cli import main

    policy, demos = ar_policy_dir
    result = CliRunner().invoke(main, ["train-layer-draft", "--target", str(policy), "--data", str(demos), "--layers", "0,5", "--steps", "2",
                                       "--batch-size", "8", "--transition-size", "8", "--out", str(tmp_path / "draft")])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.strip().splitlines()[-1])["steps"] == 2
    assert LayerDraft.load(tmp_path / "draft", ARActionModel.load(policy).vla.language_model).config.layers == (0, 5)
    with pytest.raises(ConfigError, match="needs its demonstrations"):
        train_layer_draft(policy, tmp_path / "other", (0, 5))
    with pytest.raises(ConfigError, match="drop --data"):
        train_layer_draft(text_lm_dir, tmp_path / "other", (0, 3), data=demos)


def test_a_draft_folder_is_replaced_only_with_overwrite(text_lm_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    train = DraftTrainConfig(steps=1, batch_size=2, seq_len=32, val_batches=1)
    first = train_layer_draft_text(text_lm_dir, tmp_path / "draft", (0, 3), train, transition_size=8, files=text_files())
    with pytest.raises(ConfigError, match="overwrite"):
        train_layer_draft_text(text_lm_dir, tmp_path / "draft", (0, 3), train, transition_size=8, files=text_files())
    second = train_layer_draft_text(text_lm_dir, tmp_path / "draft", (0, 2), train, transition_size=8, files=text_files(), overwrite=True)
    lm = load_text_lm(text_lm_dir)
    assert first["config"]["layers"] == [0, 3] and second["config"]["layers"] == [0, 2]
    assert LayerDraft.load(tmp_path / "draft", lm.model, lm.fingerprint).config.layers == (0, 2)
    assert [p.name for p in tmp_path.iterdir()] == ["draft"]  # no staging folder left behind
