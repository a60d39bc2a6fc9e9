"""The backbone stage of the reference pipeline: VSE-infinity's fine-tuning schedule (frozen
for the embedding warm-up, unfrozen block by block from the top, a lower learning rate, the
loss ramp of the first epoch it trains), and that it leaves the paper's recipe unchanged."""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import pytest
import torch

from examples.rvsepp import train as train_module
from examples.rvsepp.evaluate import load_checkpoint, load_model
from examples.rvsepp.model import RVSEPP, Backbone


def smoke(root: Path, out: Path, *extra: str) -> list[str]:
    return ["--preset", "smoke", "--root", str(root), "--out", str(out), "--tensorboard", "off", *extra]


def run(argv: list[str]) -> dict:
    return train_module.train(train_module.parse_args(argv))


def backbone_weights(out: Path) -> list[torch.Tensor]:
    model = load_checkpoint(out / "last.pth")["model"]
    blocks = sorted(k for k in model if k.startswith("image.backbone.blocks.") and k.endswith(".weight"))
    return [model[k] for k in blocks]


def schedule(**values: object) -> argparse.Namespace:
    defaults = train_module.parse_args(["--backbone"])
    return argparse.Namespace(**{**vars(defaults), **values})


def test_the_schedule_is_vse_infinitys():
    """Frozen for the embedding warm-up, then the top block, one more every backbone warm-up
    epochs (train.py of VSE-infinity: unfreeze_backbone(3), (2), (1), then (0))."""
    args = schedule(embedding_warmup_epochs=2, backbone_warmup_epochs=5, backbone_blocks=4)
    trained = [train_module.backbone_blocks_trained(args, epoch) for epoch in range(25)]
    assert trained == [0, 0] + [1] * 5 + [2] * 5 + [3] * 5 + [4] * 8
    args = schedule(embedding_warmup_epochs=1, backbone_warmup_epochs=0, backbone_blocks=4)
    assert [train_module.backbone_blocks_trained(args, epoch) for epoch in range(3)] == [0, 4, 4]
    no_backbone = schedule(backbone=False)
    assert {train_module.backbone_blocks_trained(no_backbone, epoch) for epoch in range(10)} == {0}


def test_the_ramp_scales_the_first_unfrozen_epoch_alone():
    args = schedule(embedding_warmup_epochs=2)
    assert [train_module.loss_scale(args, 2, step, 4) for step in range(4)] == [0.0, 0.25, 0.5, 0.75]
    assert train_module.loss_scale(args, 1, 3, 4) == train_module.loss_scale(args, 3, 0, 4) == 1.0
    assert train_module.loss_scale(schedule(embedding_warmup_epochs=2, backbone_ramp="off"), 2, 0, 4) == 1.0
    assert train_module.loss_scale(schedule(backbone=False, embedding_warmup_epochs=2), 2, 0, 4) == 1.0


def test_the_backbone_starts_as_the_identity_and_costs_the_model_no_random_draws():
    """Pretrained to pass non-negative features through: the model with a backbone computes, and
    starts from, exactly what the model without one does."""
    torch.manual_seed(0)
    plain = RVSEPP(50, 32, 16, 8).eval()
    torch.manual_seed(0)
    with_backbone = RVSEPP(50, 32, 16, 8, backbone_blocks=3).eval()
    regions = torch.rand(4, 6, 32)
    lengths, tokens, token_lengths = (
        torch.tensor([6, 5, 4, 3]),
        torch.randint(1, 50, (4, 7)),
        torch.tensor([7, 6, 5, 4]),
    )
    expected, got = (
        plain(regions, lengths, tokens, token_lengths),
        with_backbone(regions, lengths, tokens, token_lengths),
    )
    assert torch.equal(expected[0], got[0]) and torch.equal(expected[1], got[1])
    assert with_backbone.config["backbone_blocks"] == 3 and "backbone_blocks" not in plain.config
    backbone = with_backbone.image.backbone
    assert isinstance(backbone, Backbone) and plain.image.backbone is None
    backbone.train_top(2)
    assert [block.weight.requires_grad for block in backbone.blocks] == [False, True, True]
    assert backbone.trained_blocks() == 2
    backbone.train_top(10)
    assert backbone.trained_blocks() == 3
    with pytest.raises(ValueError, match="at least one block"):
        Backbone(8, 0)


def test_a_frozen_backbone_leaves_the_run_as_it_is_without_one(data_root, tmp_path):
    """--backbone frozen for the whole run trains exactly the paper's model: the same results,
    the same weights, the backbone untouched (no gradient, no weight decay)."""
    plain = run(smoke(data_root, tmp_path / "plain"))
    frozen = run(smoke(data_root, tmp_path / "frozen", "--backbone", "--embedding-warmup-epochs", "5"))
    assert frozen["test_rsum"] == plain["test_rsum"] and frozen["best_dev_rsum"] == plain["best_dev_rsum"]
    a, b = (
        load_checkpoint(tmp_path / "plain" / "last.pth")["model"],
        load_checkpoint(tmp_path / "frozen" / "last.pth")["model"],
    )
    assert all(torch.equal(a[key], b[key]) for key in a)
    for weight in backbone_weights(tmp_path / "frozen"):
        assert torch.equal(weight, torch.eye(32))


def test_staged_unfreezing_trains_the_top_blocks_and_leaves_the_frozen_ones_untouched(data_root, tmp_path):
    """One block per epoch from the top: after epoch 0 only the last block moved; after epoch 1
    (a resumed run) the last two; the first, still frozen, is exactly the identity."""
    out = tmp_path / "staged"
    flags = ["--backbone", "--backbone-blocks", "3", "--embedding-warmup-epochs", "0", "--backbone-warmup-epochs", "1"]
    flags += ["--backbone-lr-factor", "1.0"]
    run(smoke(data_root, out, *flags))
    first, second, third = backbone_weights(out)
    assert torch.equal(first, torch.eye(32)) and torch.equal(second, torch.eye(32))
    assert not torch.equal(third, torch.eye(32))
    run(smoke(data_root, out, *flags, "--epochs", "2", "--resume"))
    first, second, third_after = backbone_weights(out)
    assert torch.equal(first, torch.eye(32)) and not torch.equal(second, torch.eye(32))
    assert not torch.equal(third_after, third)


def test_the_backbone_learns_at_its_factor_of_the_learning_rate(data_root, tmp_path):
    args = train_module.parse_args(
        smoke(data_root, tmp_path, "--backbone", "--lr", "0.001", "--backbone-lr-factor", "0.1")
    )
    model = train_module.build_model(args, 30, 32, torch.device("cpu"))
    groups = train_module.parameter_groups(model, args)
    assert [group["lr"] for group in groups] == [0.001, pytest.approx(0.0001)]
    assert sum(len(group["params"]) for group in groups) == len(list(model.parameters()))
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in model.image.backbone.parameters()}
    plain = train_module.parse_args(smoke(data_root, tmp_path))
    assert len(train_module.parameter_groups(train_module.build_model(plain, 30, 32, torch.device("cpu")), plain)) == 1


def test_the_ramp_scales_the_gradients_and_the_monitor_records_the_loss_itself(data_root, tmp_path):
    """With the ramp, the unfreezing epoch's first step has a zero gradient (scale 0) while the
    loss recorded is the loss; without it, the same step has a gradient."""
    flags = ["--backbone", "--embedding-warmup-epochs", "0", "--log-every", "1", "--max-steps", "3"]
    run(smoke(data_root, tmp_path / "ramp", *flags))
    run(smoke(data_root, tmp_path / "no-ramp", *flags, "--backbone-ramp", "off"))

    def first_rows(name: str) -> list[dict[str, str]]:
        with open(tmp_path / name / "steps.csv") as handle:
            return list(csv.DictReader(handle))

    ramp, no_ramp = first_rows("ramp"), first_rows("no-ramp")
    assert float(ramp[0]["image_grad_norm"]) == 0.0 and float(ramp[0]["text_grad_norm"]) == 0.0
    assert float(no_ramp[0]["image_grad_norm"]) > 0.0
    assert float(ramp[0]["loss"]) == float(no_ramp[0]["loss"]) > 0.0  # the same first step, unscaled
    assert float(ramp[1]["image_grad_norm"]) > 0.0


def test_resuming_inside_the_ramp_epoch_is_the_uninterrupted_run(data_root, tmp_path):
    """The ramp divides by the whole epoch's steps: after a resume it divided by the steps left,
    scaling the loss up to 1.89 instead of 0.5-0.94, and the run went elsewhere."""
    flags = ["--backbone", "--embedding-warmup-epochs", "0", "--log-every", "1"]
    run(smoke(data_root, tmp_path / "whole", *flags, "--max-steps", "6"))
    run(smoke(data_root, tmp_path / "parts", *flags, "--max-steps", "3"))
    run(smoke(data_root, tmp_path / "parts", *flags, "--max-steps", "6", "--resume"))
    whole, parts = (load_checkpoint(tmp_path / name / "last.pth")["model"] for name in ("whole", "parts"))
    for key in whole:
        torch.testing.assert_close(parts[key], whole[key], rtol=0, atol=0, msg=key)


def test_a_resumed_run_keeps_its_backbone_schedule(data_root, tmp_path):
    out = tmp_path / "run"
    run(smoke(data_root, out, "--backbone", "--max-steps", "2"))
    for flag in (["--backbone-warmup-epochs", "1"], ["--backbone-lr-factor", "0.5"], ["--backbone-ramp", "off"]):
        with pytest.raises(train_module.RunError, match=flag[0]):
            run(smoke(data_root, out, "--backbone", "--resume", *flag))
    with pytest.raises(train_module.RunError, match="--backbone"):
        run(smoke(data_root, out, "--resume"))


def test_the_backbone_checkpoint_loads_for_evaluation_and_a_bad_config_is_named(data_root, tmp_path):
    out = tmp_path / "run"
    run(smoke(data_root, out, "--backbone", "--max-steps", "2"))
    model, _ = load_model(out / "best.pth", torch.device("cpu"))
    assert model.image.backbone is not None and len(model.image.backbone.blocks) == 4
    checkpoint = torch.load(out / "best.pth", weights_only=True)
    for value, message in ((0, "'backbone_blocks' must be a positive integer"), (True, "'backbone_blocks'")):
        torch.save(
            {**checkpoint, "model_config": {**checkpoint["model_config"], "backbone_blocks": value}}, out / "bad.pth"
        )
        with pytest.raises(ValueError, match=message):
            load_model(out / "bad.pth", torch.device("cpu"))
    torch.save({**checkpoint, "model_config": {**checkpoint["model_config"], "heads": 2}}, out / "bad.pth")
    with pytest.raises(ValueError, match="entries no model has: heads"):
        load_model(out / "bad.pth", torch.device("cpu"))


def test_the_backbone_refuses_several_processes(data_root, tmp_path, monkeypatch):
    monkeypatch.setattr(train_module, "setup_distributed", lambda args: (torch.device("cpu"), 0, 2))
    with pytest.raises(train_module.RunError, match="--backbone is not supported with more than one process"):
        run(smoke(data_root, tmp_path, "--backbone"))
