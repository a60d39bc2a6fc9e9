"""The RVSE++ reference pipeline in examples/rvsepp, at smoke scale on the CPU."""

from __future__ import annotations

import datetime
import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from examples.rvsepp import synthetic
from examples.rvsepp import train as train_module
from examples.rvsepp.data import MAX_TOKENS, DataError, EpochSampler, PrecompDataset, collate
from examples.rvsepp.evaluate import evaluate_embeddings, load_model, ranks
from examples.rvsepp.model import GPO, RVSEPP
from examples.rvsepp.vocab import MASK, Vocabulary, tokenize
from tests.profiles import examples

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ["--preset", "smoke", "--tensorboard", "off", "--no-eval-test"]
SMOKE_TESTED = SMOKE[:-1]  # with the final test evaluation


def run(args: list[str]) -> dict:
    return train_module.train(train_module.parse_args(args))


# ------------------------------------------------------------------ training
def test_smoke_trains_and_evaluates(data_root, tmp_path):
    results = run(["--preset", "smoke", "--root", str(data_root), "--out", str(tmp_path), "--tensorboard", "off"])
    assert results["test_rsum"] > 0 and math.isfinite(results["best_dev_rsum"])
    assert (tmp_path / "best.pth").is_file() and (tmp_path / "last.pth").is_file()
    stored = json.loads((tmp_path / "results.json").read_text())
    assert stored["test_rsum"] == results["test_rsum"] and stored["commit"] and stored["machine"]
    started, finished = (datetime.datetime.fromisoformat(stored[key]) for key in ("started", "finished"))
    assert started.tzinfo is not None and started <= finished  # when the run ran, in UTC
    header = (tmp_path / "steps.csv").read_text().splitlines()[0]
    assert "i2t/vanishing_fraction" in header and "image_grad_norm" in header


@pytest.mark.parametrize("loss", ["hn", "sum", "warmup"])
def test_every_loss_trains(data_root, tmp_path, loss):
    run(
        [
            *SMOKE,
            "--root",
            str(data_root),
            "--out",
            str(tmp_path),
            "--loss",
            loss,
            "--max-steps",
            "2",
            "--mask-duplicates",
        ]
    )
    assert (tmp_path / "last.pth").is_file()


def test_warmup_uses_the_sum_of_hinges_in_epoch_zero_only():
    """VSE-infinity's schedule through its own switch: the criterion is ContrastiveLoss, flipped
    by set_epoch; every loss keeps its code base's scale."""
    from selhn.rules import MaxViolation, SelHN, SumOfHinges

    args = train_module.parse_args(["--loss", "warmup"])
    criterion = train_module.make_criterion(args)
    assert [train_module.loss_for_step(args, epoch) for epoch in (0, 1)] == ["sum", "hn"]
    train_module.set_epoch(criterion, args, 0)
    assert isinstance(criterion.rule, SumOfHinges) and criterion.reduction == "sum"
    train_module.set_epoch(criterion, args, 1)
    assert isinstance(criterion.rule, MaxViolation)
    selhn_criterion = train_module.make_criterion(train_module.parse_args([]))
    assert isinstance(selhn_criterion.rule, SelHN) and selhn_criterion.reduction == "mean"
    assert (
        train_module.make_criterion(train_module.parse_args(["--loss", "hn", "--reduction", "mean"])).reduction
        == "mean"
    )


def final_weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path / "last.pth", weights_only=False)["model"]


def test_resume_reproduces_an_uninterrupted_run(data_root, tmp_path):
    common = [*SMOKE, "--root", str(data_root), "--epochs", "2"]
    run([*common, "--out", str(tmp_path / "straight")])
    run([*common, "--out", str(tmp_path / "split"), "--max-steps", "20"])  # 18 steps per epoch: stops in epoch 1
    state = torch.load(tmp_path / "split" / "last.pth", weights_only=False)["state"]
    assert state["epoch"] == 1 and state["step_in_epoch"] == 2
    run([*common, "--out", str(tmp_path / "split"), "--resume"])
    straight, split = final_weights(tmp_path / "straight"), final_weights(tmp_path / "split")
    for key in straight:
        assert torch.equal(straight[key], split[key]), key


def test_sigterm_saves_and_resume_continues(data_root, tmp_path):
    command = [
        sys.executable,
        "-m",
        "examples.rvsepp.train",
        *SMOKE,
        "--root",
        str(data_root),
        "--epochs",
        "40",
        "--out",
        str(tmp_path),
    ]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert process.stdout is not None
    for line in process.stdout:  # wait until training is under way
        if line.startswith("epoch 0:"):
            break
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 128 + signal.SIGTERM, output
    assert "saved" in output and "--resume" in output
    state = torch.load(tmp_path / "last.pth", weights_only=False)["state"]
    assert state["global_step"] > 3
    run([*SMOKE, "--root", str(data_root), "--epochs", str(state["epoch"] + 1), "--out", str(tmp_path), "--resume"])


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(data_root, tmp_path, monkeypatch):
    common = [*SMOKE, "--root", str(data_root), "--out", str(tmp_path), "--epochs", "2"]
    run([*common, "--max-steps", "3"])
    before = (tmp_path / "last.pth").read_bytes()
    real = train_module.compute_loss

    def poisoned(*args, **kwargs):  # the 5th step's loss (the 2nd after the resume) is NaN
        loss = real(*args, **kwargs)
        calls.append(1)
        return loss * float("nan") if len(calls) == 2 else loss

    calls: list[int] = []
    monkeypatch.setattr(train_module, "compute_loss", poisoned)
    # read on the next logging step (every 10) or checkpoint, not at once: no device sync per step
    with pytest.raises(
        SystemExit,
        match=r"non-finite loss \(nan\) at training step 5 \(epoch 0\): stopping. The last good checkpoint is",
    ):
        run([*common, "--resume"])
    assert len(calls) == 7  # stopped at step 10, the first logging step after the bad one
    assert (tmp_path / "last.pth").read_bytes() == before


# ------------------------------------------------------------------ evaluation
def brute_force(sims: np.ndarray, per_image: int = 5) -> tuple[list[int], list[int]]:
    """The protocol, literally: sort each row / column (stable, descending) and find the target."""
    n = sims.shape[0]
    i2t, t2i = [], []
    for i in range(n):
        order = sorted(range(sims.shape[1]), key=lambda j: (-sims[i, j], j))
        i2t.append(min(order.index(per_image * i + k) for k in range(per_image)))
    for j in range(sims.shape[1]):
        order = sorted(range(n), key=lambda i: (-sims[i, j], i))
        t2i.append(order.index(j // per_image))
    return i2t, t2i


@examples(15)
@given(n=st.integers(1, 12), seed=st.integers(0, 1000), levels=st.sampled_from([None, 2]))
def test_ranks_match_brute_force_including_ties(n, seed, levels):
    sims = torch.randn(n, 5 * n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    if levels:
        sims = torch.round(sims * levels) / levels  # many ties
    # images = identity, captions = sims^T, so that img @ cap.T == sims
    i2t, t2i = ranks([torch.eye(n, dtype=torch.float64)], [sims.t().contiguous()], block=3)
    expected = brute_force(sims.numpy())
    assert i2t.tolist() == expected[0] and t2i.tolist() == expected[1]


def test_metrics_and_five_fold_slicing():
    n = 10
    sims = torch.randn(n, 5 * n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    img, cap = [torch.eye(n, dtype=torch.float64)], [sims.t().contiguous()]
    whole = evaluate_embeddings(img, cap)
    i2t, t2i = brute_force(sims.numpy())
    assert whole["i2t_r1"] == pytest.approx(100 * np.mean(np.array(i2t) < 1))
    assert whole["t2i_r10"] == pytest.approx(100 * np.mean(np.array(t2i) < 10))
    assert whole["i2t_medr"] == math.floor(np.median(i2t)) + 1 and whole["t2i_meanr"] == pytest.approx(np.mean(t2i) + 1)
    folds = evaluate_embeddings(img, cap, fold5=True)
    per_fold = []
    for f in range(5):  # fold f: images 2f, 2f+1 and their 10 captions, scored among themselves
        block = sims[2 * f : 2 * f + 2, 10 * f : 10 * f + 10].numpy()
        a, b = brute_force(block)
        per_fold.append(100 * np.mean(np.array(a) < 1) + 100 * np.mean(np.array(b) < 1))
    assert folds["i2t_r1"] + folds["t2i_r1"] == pytest.approx(np.mean(per_fold))
    # an ensemble of one model twice is that model
    assert evaluate_embeddings(img * 2, cap * 2)["rsum"] == pytest.approx(whole["rsum"])


def test_evaluation_of_a_larger_problem_in_blocks():
    generator = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(300, 16, generator=generator), dim=1)
    cap = torch.nn.functional.normalize(
        img.repeat_interleave(5, 0) + 0.3 * torch.randn(1500, 16, generator=generator), dim=1
    )
    small, large = ranks([img], [cap], block=7), ranks([img], [cap], block=4096)
    assert torch.equal(small[0], large[0]) and torch.equal(small[1], large[1])


# ------------------------------------------------------------------ data and errors
def test_dataset_layouts_and_errors(data_root, tmp_path):
    vocab = Vocabulary.build((data_root / "synthetic_precomp" / "train_caps.txt").read_text().splitlines())
    dataset = PrecompDataset(data_root, "synthetic", "dev", vocab)
    assert len(dataset) == 100 and dataset.per_image == 5 and dataset.feature_dim == 32
    regions, tokens, _, image = dataset[7]
    assert regions.shape == (6, 32) and tokens[0] == vocab("<start>") and tokens[-1] == vocab("<end>") and image == 1
    batch = collate([dataset[0], dataset[9]])
    assert batch["regions"].shape[0] == 2 and batch["token_lengths"].tolist() == [
        len(dataset[0][1]),
        len(dataset[9][1]),
    ]
    # one image row per caption
    folder = tmp_path / "rows_precomp"
    folder.mkdir()
    np.save(folder / "dev_ims.npy", np.ones((10, 3, 4), dtype=np.float32))
    (folder / "dev_caps.txt").write_text("a dog\n" * 10)
    assert PrecompDataset(tmp_path, "rows", "dev", vocab).per_image == 1
    (folder / "dev_caps.txt").write_text("a dog\n" * 7)
    with pytest.raises(ValueError, match="10 image rows but dev_caps.txt has 7 captions"):
        PrecompDataset(tmp_path, "rows", "dev", vocab)
    with pytest.raises(FileNotFoundError, match="missing split file .*test_ims.npy"):
        PrecompDataset(tmp_path, "rows", "test", vocab)


def test_dev_is_cut_to_5000_captions(tmp_path):
    folder = tmp_path / "big_precomp"
    folder.mkdir()
    np.save(folder / "dev_ims.npy", np.ones((1100, 2, 3), dtype=np.float32))
    (folder / "dev_caps.txt").write_text("a cat\n" * 5500)
    assert len(PrecompDataset(tmp_path, "big", "dev", Vocabulary.build(["a cat"] * 4))) == 5000


def test_augmentations_are_deterministic_per_epoch_and_index(data_root):
    vocab = Vocabulary.load(_vocab(data_root))
    dataset = PrecompDataset(
        data_root, "synthetic", "train", vocab, train=True, seed=3, region_drop=0.5, token_perturb=0.5
    )
    first = dataset[4]
    again = dataset[4]
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    dataset.epoch = 1
    changed = [
        not torch.equal(dataset[i][1], PrecompDataset(data_root, "synthetic", "train", vocab)[i][1]) for i in range(20)
    ]
    assert any(changed)
    assert all(dataset[i][0].shape[0] >= 1 for i in range(20))


def _vocab(root: Path) -> Path:
    path = root / "synthetic_precomp" / "vocab.json"
    if not path.is_file():
        Vocabulary.build((root / "synthetic_precomp" / "train_caps.txt").read_text().splitlines()).save(path)
    return path


def test_checkpoint_errors(data_root, tmp_path):
    run([*SMOKE, "--root", str(data_root), "--out", str(tmp_path), "--max-steps", "1"])
    checkpoint = torch.load(tmp_path / "last.pth", weights_only=False)
    checkpoint["vocab"] = [*checkpoint["vocab"], "zebra"]
    torch.save(checkpoint, tmp_path / "last.pth")
    with pytest.raises(train_module.RunError, match="trained with another vocabulary"):
        run([*SMOKE, "--root", str(data_root), "--out", str(tmp_path), "--resume"])
    checkpoint["model_config"] = {**checkpoint["model_config"], "embed": 64}
    torch.save(checkpoint, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="holds a model of another shape"):
        load_model(tmp_path / "other.pth", torch.device("cpu"))
    torch.save({"weights": 1}, tmp_path / "foreign.pth")
    with pytest.raises(ValueError, match="is not an RVSE\\+\\+ checkpoint"):
        load_model(tmp_path / "foreign.pth", torch.device("cpu"))
    with pytest.raises(train_module.RunError, match="--resume: no checkpoint"):
        run([*SMOKE, "--root", str(data_root), "--out", str(tmp_path / "empty"), "--resume"])


def test_sampler_shards_the_single_process_batches():
    whole = list(EpochSampler(20, 4, seed=1))
    shards = [list(EpochSampler(20, 4, seed=1, rank=r, world_size=2)) for r in range(2)]
    assert [a + b for a, b in zip(*shards, strict=True)] == whole
    resumed = EpochSampler(20, 4, seed=1)
    resumed.set_epoch(0, start=2)
    assert list(resumed) == whole[2:]
    with pytest.raises(ValueError, match="divisible by the world size"):
        EpochSampler(20, 5, world_size=2)


# ------------------------------------------------------------------ model
def test_gpo_weights_depend_only_on_the_set_size():
    torch.manual_seed(0)
    gpo = GPO()
    lengths = torch.tensor([3, 5, 3])
    weights = gpo.weights(lengths, 5)
    torch.testing.assert_close(weights[0], weights[2])
    torch.testing.assert_close(weights[0, :3], gpo.weights(torch.tensor([3]), 3)[0])
    assert torch.all(weights[0, 3:] == 0)
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(3))


def test_gpo_reduces_to_max_and_mean_pooling():
    torch.manual_seed(0)
    features = torch.randn(2, 4, 6)
    lengths = torch.tensor([4, 2])
    one_hot = torch.tensor([[1.0, 0, 0, 0], [1.0, 0, 0, 0]])
    uniform = torch.tensor([[0.25] * 4, [0.5, 0.5, 0, 0]])
    torch.testing.assert_close(GPO.pool(features, lengths, one_hot)[0], features[0].max(dim=0).values)
    torch.testing.assert_close(GPO.pool(features, lengths, one_hot)[1], features[1, :2].max(dim=0).values)
    torch.testing.assert_close(GPO.pool(features, lengths, uniform)[0], features[0].mean(dim=0))
    torch.testing.assert_close(GPO.pool(features, lengths, uniform)[1], features[1, :2].mean(dim=0))


def test_model_outputs_unit_embeddings_and_ignores_padding():
    torch.manual_seed(0)
    model = RVSEPP(vocab_size=20, img_dim=8, embed=16, word_dim=6).eval()
    regions = torch.rand(2, 5, 8)
    padded = regions.clone()
    padded[1, 3:] = 7.0  # garbage in the padded slots of item 1
    tokens = torch.randint(1, 20, (2, 6))
    img_a, txt_a = model(regions, torch.tensor([5, 3]), tokens, torch.tensor([6, 4]))
    img_b, _ = model(padded, torch.tensor([5, 3]), tokens, torch.tensor([6, 4]))
    torch.testing.assert_close(img_a.norm(dim=1), torch.ones(2))
    torch.testing.assert_close(txt_a.norm(dim=1), torch.ones(2))
    torch.testing.assert_close(img_a, img_b)


# ------------------------------------------------------------------ vocabulary and synthetic data
def test_tokenizer_and_scan_vocabulary_round_trip(tmp_path):
    assert tokenize("A Dog, running on the beach.") == ["a", "dog", ",", "running", "on", "the", "beach", "."]
    assert tokenize("It's the dog's ball") == ["it's", "the", "dog's", "ball"]
    vocab = Vocabulary.build(["a dog runs"] * 4 + ["a cat sleeps"] * 3)
    assert vocab.signature()[:4] == ["<pad>", "<start>", "<end>", "<unk>"] and "dog" in vocab.word2idx
    assert "cat" not in vocab.word2idx  # count 3 < 4
    vocab.save(tmp_path / "vocab.json")
    data = json.loads((tmp_path / "vocab.json").read_text())
    assert set(data) == {"word2idx", "idx2word", "idx"} and data["idx2word"]["0"] == "<pad>"
    loaded = Vocabulary.load(tmp_path / "vocab.json")
    assert loaded.signature()[-1] == MASK and len(loaded) == len(vocab) + 1
    assert loaded.encode("a cat") == [1, loaded("a"), 3, 2]
    (tmp_path / "bad.json").write_text(json.dumps({"word2idx": {}}))
    with pytest.raises(ValueError, match="not a SCAN-format vocabulary"):
        Vocabulary.load(tmp_path / "bad.json")


def test_synthetic_features_have_the_statistics_of_region_features(data_root):
    images = np.load(data_root / "synthetic_precomp" / "train_ims.npy")
    assert images.dtype == np.float32 and images.shape == (60, 6, 32)
    regions = images.reshape(-1, 32)
    assert regions.min() >= 0  # post-ReLU
    assert 0.3 < (regions == 0).mean() < 0.9  # sparse
    mean = regions.mean(axis=0)
    cosine = (regions @ mean) / (np.linalg.norm(regions, axis=1) * np.linalg.norm(mean) + 1e-12)
    assert np.median(cosine) > 0.5  # a large shared component
    captions = (data_root / "synthetic_precomp" / "train_caps.txt").read_text().splitlines()
    assert len(captions) == 300
    again = synthetic.generate(
        data_root / "again", "synthetic", synthetic.Config(train=60, dev=20, test=20, regions=6, dim=32)
    )
    assert np.array_equal(np.load(again / "train_ims.npy"), images)  # seeded


def test_demo_runs(capsys):
    sys.path.insert(0, str(ROOT / "examples"))
    import demo

    demo.main()
    out = capsys.readouterr().out
    assert "max violation" in out and "SelHN" in out and "duplicate distance" in out


# ------------------------------------------------------------------ reliability under hostile use
class Payload:
    """Unpickling this runs code: what a crafted checkpoint would do."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path(self.marker).write_text, ("pwned",))


def test_checkpoints_load_without_running_code_from_the_file(data_root, tmp_path):
    run([*SMOKE, "--root", str(data_root), "--out", str(tmp_path / "run"), "--max-steps", "1"])
    checkpoint = torch.load(tmp_path / "run" / "last.pth", weights_only=True)  # plain data only
    assert {"model", "optimizer", "scheduler", "state", "args", "rng"} <= set(checkpoint)
    marker = tmp_path / "marker"
    torch.save({**checkpoint, "extra": Payload(str(marker))}, tmp_path / "crafted.pth")
    with pytest.raises(ValueError, match=r"crafted.pth is not a checkpoint that loads as plain data"):
        load_model(tmp_path / "crafted.pth", torch.device("cpu"))
    assert not marker.exists()
    (tmp_path / "run" / "last.pth").write_bytes((tmp_path / "crafted.pth").read_bytes())
    with pytest.raises(train_module.RunError, match="last.pth is not a checkpoint that loads as plain data"):
        run([*SMOKE, "--root", str(data_root), "--out", str(tmp_path / "run"), "--resume"])
    assert not marker.exists()


def test_corrupt_and_foreign_files_are_named(tmp_path):
    good = tmp_path / "good.pth"
    torch.save({"model": {}, "model_config": {}}, good)
    (tmp_path / "truncated.pth").write_bytes(good.read_bytes()[:40])
    (tmp_path / "noise.pth").write_bytes(bytes(range(256)) * 4)
    for name in ("truncated.pth", "noise.pth"):
        with pytest.raises(ValueError, match=f"{name} is not a (readable checkpoint|checkpoint that loads as plain)"):
            load_model(tmp_path / name, torch.device("cpu"))
    with pytest.raises(ValueError, match="good.pth is not an RVSE\\+\\+ checkpoint"):
        load_model(good, torch.device("cpu"))
    with pytest.raises(ValueError, match="no checkpoint at .*missing.pth"):
        load_model(tmp_path / "missing.pth", torch.device("cpu"))


def test_a_new_run_refuses_a_folder_that_holds_a_run(data_root, tmp_path):
    common = [*SMOKE, "--root", str(data_root), "--out", str(tmp_path), "--max-steps", "1"]
    run(common)
    before = (tmp_path / "last.pth").read_bytes()
    with pytest.raises(train_module.RunError, match=r"already holds a run \(.*last.pth.*\): pass --resume"):
        run(common)
    assert (tmp_path / "last.pth").read_bytes() == before  # untouched
    run([*common, "--overwrite", "--seed", "3"])
    assert torch.load(tmp_path / "last.pth", weights_only=True)["args"]["seed"] == 3
    assert len((tmp_path / "dev.jsonl").read_text().splitlines()) == 1  # the old run's records are gone
    with pytest.raises(SystemExit):
        train_module.parse_args([*common, "--overwrite", "--resume"])


def test_resume_appends_each_record_exactly_once(data_root, tmp_path):
    common = [*SMOKE, "--root", str(data_root), "--log-every", "1", "--eval-steps", "2", "--epochs", "2"]
    run([*common, "--out", str(tmp_path / "straight")])
    run([*common, "--out", str(tmp_path / "split"), "--max-steps", "23"])  # into epoch 1
    run([*common, "--out", str(tmp_path / "split"), "--resume"])
    straight = (tmp_path / "straight" / "steps.csv").read_text()
    split = (tmp_path / "split" / "steps.csv").read_text()
    assert [r.split(",")[0] for r in split.splitlines()[1:]] == [str(float(s)) for s in range(1, 37)]
    assert split == straight  # the same rows, each once, step numbers continued
    steps = [json.loads(line)["global_step"] for line in (tmp_path / "split" / "dev.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and len(steps) == len(set(steps)) + 2  # +2: each epoch's end at an --eval-steps step


def test_resume_cuts_records_written_after_the_checkpoint(tmp_path):
    with open(tmp_path / "steps.csv", "w") as handle:
        handle.write("step,loss\n1.0,0.5\n2.0,0.4\n3.0,0.3\n")
    lines = [
        {"global_step": 2, "kind": "steps"},
        {"global_step": 4, "kind": "epoch"},
        {"global_step": 4, "kind": "steps"},
        {"global_step": 5, "kind": "steps"},
    ]
    (tmp_path / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    rows = train_module.records_until(tmp_path, 2, pending_eval=False)
    assert [r["step"] for r in rows] == ["1.0", "2.0"]
    assert [json.loads(x)["global_step"] for x in (tmp_path / "dev.jsonl").read_text().splitlines()] == [2]
    (tmp_path / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    train_module.records_until(tmp_path, 4, pending_eval=True)  # killed after the epoch's dev record
    kept = [json.loads(x) for x in (tmp_path / "dev.jsonl").read_text().splitlines()]
    assert [(r["global_step"], r["kind"]) for r in kept] == [(2, "steps"), (4, "steps")]


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--loss", "hn"),
        ("--seed", "5"),
        ("--lr", "0.001"),
        ("--batch-size", "8"),
        ("--synthetic-noise", "0.9"),
        ("--margin", "0.3"),
    ],
)
def test_resume_refuses_another_run_by_flag(data_root, tmp_path, flag, value):
    common = [*SMOKE, "--root", str(data_root), "--out", str(tmp_path), "--max-steps", "1"]
    run(common)
    with pytest.raises(train_module.RunError, match=f"belongs to a run with {flag} .*, not"):
        run([*common, "--resume", flag, value])


def test_resume_accepts_more_epochs(data_root, tmp_path):
    common = [*SMOKE, "--root", str(data_root), "--out", str(tmp_path), "--no-eval-test"]
    run(common)
    run([*common, "--resume", "--epochs", "2"])
    assert torch.load(tmp_path / "last.pth", weights_only=True)["state"]["epoch"] == 2


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--batch-size", "0"], "--batch-size: expected an integer >= 2, got 0"),
        (["--epochs", "-1"], "--epochs: expected an integer >= 1, got -1"),
        (["--lr", "nan"], "--lr: expected a finite number > 0"),
        (["--margin", "-0.2"], "--margin: expected a finite number >= 0"),
        (["--synthetic-twins", "2"], "--synthetic-twins is a probability"),
    ],
)
def test_bad_arguments_are_refused_before_anything_runs(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        train_module.parse_args([*SMOKE, *flags])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def write_split(root: Path, split: str, images: np.ndarray, captions: list[str]) -> None:
    folder = root / "tiny_precomp"
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / f"{split}_ims.npy", images.astype(np.float32))
    (folder / f"{split}_caps.txt").write_text("".join(c + "\n" for c in captions))


def tiny_data(root: Path, n_train: int = 8, dev_dim: int = 6, n_test: int = 2) -> None:
    rng = np.random.default_rng(0)
    words = ["a", "dog", "cat", "runs", "on", "the", "grass", "red", "ball"]
    for split, count, dim in (("train", n_train, 6), ("dev", 2, dev_dim), ("test", n_test, 6)):
        captions = [" ".join(rng.choice(words, 5)) for _ in range(5 * count)]
        write_split(root, split, rng.random((count, 3, dim)), captions)


@pytest.mark.parametrize(
    ("data", "flags", "message"),
    [
        ({"n_train": 2}, [], "has 10 captions, fewer than --batch-size 16"),
        ({"dev_dim": 4}, [], "the dev split of tiny has 4-d region features, the train split 6-d"),
        ({"n_test": 0}, [], "the test split of tiny is empty"),
    ],
)
def test_runs_that_would_train_or_test_nothing_are_refused(tmp_path, data, flags, message):
    tiny_data(tmp_path, **data)
    with pytest.raises(train_module.RunError, match=message):
        run([*SMOKE_TESTED, "--root", str(tmp_path), "--name", "tiny", "--out", str(tmp_path / "run"), *flags])
    assert not (tmp_path / "run" / "last.pth").exists()
    # --overwrite of a good run by a run that fails its checks keeps the good run
    (tmp_path / "run" / "last.pth").write_bytes(b"the old run")
    with pytest.raises(train_module.RunError, match=message):
        run([*SMOKE_TESTED, "--root", str(tmp_path), "--name", "tiny", "--out", str(tmp_path / "run"), "--overwrite"])
    assert (tmp_path / "run" / "last.pth").read_bytes() == b"the old run"


def test_bad_images_and_captions(tmp_path):
    tiny_data(tmp_path)
    vocab = Vocabulary.build(["a dog"] * 4)
    images = np.random.default_rng(1).random((2, 3, 6))
    images[1] = 0.0
    write_split(tmp_path, "dev", images, ["a dog"] * 10)
    dataset = PrecompDataset(tmp_path, "tiny", "dev", vocab)
    with pytest.raises(DataError, match=r"dev_ims.npy: every region of image row 1 is zero"):
        dataset[5]
    images[1, 0, 0] = np.nan
    write_split(tmp_path, "dev", images, ["a dog"] * 10)
    with pytest.raises(DataError, match=r"dev_ims.npy: image row 1 holds NaN or infinite features"):
        PrecompDataset(tmp_path, "tiny", "dev", vocab)[5]
    # a Unicode line separator inside a caption does not split it; a runaway caption is capped
    captions = ["a dog\u2028on grass", *["a dog"] * 8, " ".join(["dog"] * 10_000)]
    write_split(tmp_path, "dev", np.random.default_rng(2).random((2, 3, 6)), captions)
    dataset = PrecompDataset(tmp_path, "tiny", "dev", vocab)
    assert len(dataset) == 10 and len(dataset[9][1]) == MAX_TOKENS and dataset[9][1][-1] == vocab("<end>")


def test_a_bad_image_during_training_is_a_clear_error(tmp_path, capsys):
    tiny_data(tmp_path, n_train=4)
    images = np.random.default_rng(3).random((4, 3, 6))
    images[2] = np.inf
    write_split(tmp_path, "train", images, ["a dog runs"] * 20)
    with pytest.raises(SystemExit) as exit_:
        train_module.main([*SMOKE, "--root", str(tmp_path), "--name", "tiny", "--out", str(tmp_path / "run")])
    assert "train_ims.npy: image row 2 holds NaN or infinite features" in str(exit_.value.code)


def signal_inside(monkeypatch, calls: int) -> None:
    """SIGTERM from inside the ``calls``-th evaluation (no timing involved)."""
    count = {"n": 0}
    real = train_module.encode

    def encode(*args, **kwargs):
        count["n"] += 1
        if count["n"] == calls:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "encode", encode)


def test_sigterm_during_the_epochs_evaluation_stops_and_resume_redoes_only_it(data_root, tmp_path, monkeypatch):
    common = [*SMOKE_TESTED, "--root", str(data_root), "--out", str(tmp_path), "--epochs", "2"]
    signal_inside(monkeypatch, calls=1)  # the first epoch's dev evaluation
    with pytest.raises(SystemExit) as exit_:
        run(common)
    assert exit_.value.code == 128 + signal.SIGTERM
    state = torch.load(tmp_path / "last.pth", weights_only=True)["state"]
    assert state["pending_eval"] and state["epoch"] == 1 and not (tmp_path / "dev.jsonl").exists()
    monkeypatch.undo()
    run([*common, "--resume"])
    records = [json.loads(line) for line in (tmp_path / "dev.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["global_step"]) for r in records] == [(0, 18), (1, 36)]
    assert json.loads((tmp_path / "results.json").read_text())["test_rsum"] > 0


def test_sigterm_during_the_final_test_stops_without_results(data_root, tmp_path, monkeypatch):
    common = [*SMOKE_TESTED, "--root", str(data_root), "--out", str(tmp_path)]
    signal_inside(monkeypatch, calls=2)  # dev at the epoch's end, then the test
    with pytest.raises(SystemExit) as exit_:
        run(common)
    assert exit_.value.code == 128 + signal.SIGTERM and not (tmp_path / "results.json").exists()
    monkeypatch.undo()
    run([*common, "--resume"])  # nothing left to train: only the test
    assert json.loads((tmp_path / "results.json").read_text())["test_rsum"] > 0


def test_sigterm_during_set_up_stops_at_once(tmp_path, monkeypatch, capsys):
    def generate(*args, **kwargs):  # the signal arrives while the data set is being generated
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("the signal did not stop the set-up")

    monkeypatch.setattr(train_module.synthetic, "ensure", generate)
    with pytest.raises(SystemExit) as exit_:
        run([*SMOKE, "--root", str(tmp_path / "data"), "--out", str(tmp_path / "run")])
    assert exit_.value.code == 128 + signal.SIGTERM
    assert "nothing was trained yet" in capsys.readouterr().out


def test_results_json_is_strict_json():
    assert train_module.finite_or_none({"a": 1.0, "b": math.nan, "c": math.inf}) == {"a": 1.0, "b": None, "c": None}
    assert train_module.finite_or_none({"commit": "abc", "n": 3}) == {"commit": "abc", "n": 3}


def test_a_run_records_the_code_and_the_machine_that_produced_it(monkeypatch, tmp_path):
    """results.json names the commit (this checkout's, +dirty when tracked files were edited) and
    the machine; outside a git checkout the commit is 'unknown' rather than an error."""
    from examples.rvsepp import cli

    version = cli.code_version()
    assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", version), version
    machine = cli.machine_description(torch.device("cpu"))
    assert f"{os.cpu_count()} cores" in machine and "CPU" in machine

    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(cli.subprocess, "run", no_git)
    assert cli.code_version() == "unknown"


def test_a_user_rule_trains_through_the_pipeline_and_the_monitor_reads_its_own_scores(data_root, tmp_path, monkeypatch):
    """A rule written outside the package, given to train through a criterion factory; the
    monitor reads the scores and mask the loss saw (ids included), not a second matmul."""
    import selhn
    from selhn.rules import SelectionRule

    class Easiest(SelectionRule):
        def weights(self, anchors):
            lowest = anchors.scores.masked_fill(~anchors.negatives, math.inf).argmin(dim=1)
            return anchors.one_hot(lowest)

    criteria = {**train_module.CRITERIA, "easiest": lambda args: selhn.RuleLoss(Easiest(), args.margin)}
    seen = []
    real_step = selhn.diagnostics.TrainingMonitor.step

    def spy(monitor, scores=None, loss=None, *, mask=None):
        seen.append((scores, mask))
        return real_step(monitor, scores, loss, mask=mask)

    monkeypatch.setattr(selhn.diagnostics.TrainingMonitor, "step", spy)
    argv = [*SMOKE, "--root", str(data_root), "--out", str(tmp_path), "--loss", "easiest", "--max-steps", "2"]
    results = train_module.train(train_module.parse_args([*argv, "--mask-duplicates"], criteria=criteria), criteria)
    assert math.isfinite(results["best_dev_rsum"]) and (tmp_path / "last.pth").is_file()
    assert len(seen) == 2 and all(mask is not None and scores.shape == (16, 16) for scores, mask in seen)
    assert "i2t/vanishing_fraction" in (tmp_path / "steps.csv").read_text().splitlines()[0]
