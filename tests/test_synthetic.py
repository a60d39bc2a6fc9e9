"""The synthetic data set's knobs and its in-batch false-negative measure (examples/rvsepp/synthetic.py)."""

from __future__ import annotations

import hashlib
import itertools
import json
import random
from pathlib import Path

import numpy as np
import pytest

from examples.rvsepp import synthetic
from examples.rvsepp.data import DataError

TINY = {"train": 12, "dev": 4, "test": 4, "regions": 6, "dim": 16}


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_default_knobs_reproduce_the_captions_of_earlier_releases(tmp_path):
    # the captions of Config(train=300, dev=50, test=50, regions=6, dim=32) as selhn 0.1.0 wrote them:
    # the new knobs at their defaults draw nothing, so every earlier benchmark's data set is unchanged
    folder = synthetic.generate(tmp_path, "synthetic", synthetic.Config(train=300, dev=50, test=50, regions=6, dim=32))
    assert hashlib.md5((folder / "train_caps.txt").read_bytes()).hexdigest() == "95ec5695719013958aec295f5be6dd46"
    assert hashlib.md5((folder / "test_caps.txt").read_bytes()).hexdigest() == "3d02d5669b57595e3d871ba4c7c4129f"


def test_new_knobs_are_deterministic_per_seed(tmp_path):
    config = synthetic.Config(**TINY, specific=0.7, twins=0.5, variants=3, noise=1.0, seed=3)
    a = digest(synthetic.generate(tmp_path / "a", "synthetic", config))
    b = digest(synthetic.generate(tmp_path / "b", "synthetic", config))
    assert a == b
    other = digest(synthetic.generate(tmp_path / "c", "synthetic", synthetic.Config(**{**vars(config), "seed": 4})))
    assert other["train_caps.txt"] != a["train_caps.txt"] and other["train_ims.npy"] != a["train_ims.npy"]


def test_specific_captions_describe_the_whole_scene(tmp_path):
    folder = synthetic.generate(tmp_path, "synthetic", synthetic.Config(**TINY, specific=1.0))
    mentions, scenes = synthetic.load_content(folder, "train")
    assert len(mentions) == 5 * len(scenes)
    for index, mention in enumerate(mentions):
        scene = scenes[index // 5]
        assert len(mention.phrases) == len(scene["objects"]) and mention.scene is not None
        assert all(value is not None for phrase in mention.phrases for value in phrase)
        assert synthetic.fits(mention, scene)
    partial = synthetic.load_content(synthetic.generate(tmp_path / "p", "synthetic", synthetic.Config(**TINY)), "train")
    assert any(None in phrase for m in partial[0] for phrase in m.phrases)  # the default: partial captions


def one_attribute_apart(a: dict, b: dict) -> bool:
    if a["scene"] != b["scene"] or len(a["objects"]) != len(b["objects"]):
        return False
    diffs = sum(x[k] != y[k] for x, y in zip(a["objects"], b["objects"], strict=True) for k in synthetic.ATTRIBUTES)
    return diffs == 1


@pytest.mark.parametrize("variants", [1, 3])
def test_variants_make_families_of_near_duplicates(tmp_path, variants):
    config = synthetic.Config(train=40, dev=4, test=4, regions=6, dim=16, twins=1.0, variants=variants)
    _, scenes = synthetic.load_content(synthetic.generate(tmp_path, "synthetic", config), "train")
    # twins keep the object order; each image has `variants` near-duplicates made from one base scene
    # (the base and each variant are one attribute apart; variants of one base are two apart at most)
    neighbours = [sum(one_attribute_apart(s, t) for t in scenes if t is not s) for s in scenes]
    bases = sum(n >= variants for n in neighbours)
    assert bases >= 40 // (variants + 1) - 1
    assert max(neighbours) >= variants


def test_data_made_with_other_settings_is_refused_never_rewritten(tmp_path):
    """Runs trained on a data set would evaluate to other numbers once it was rewritten in place
    (121 -> 137): ensure refuses, naming the settings that differ, and touches nothing; an
    explicit generate still replaces the data and removes the stale vocabulary."""
    folder = synthetic.generate(tmp_path, "synthetic", synthetic.Config(**TINY))
    (folder / "vocab.json").write_text("{}")
    before = (folder / "train_ims.npy").read_bytes()
    synthetic.ensure(tmp_path, "synthetic", synthetic.Config(**TINY))  # same configuration: kept
    assert (folder / "vocab.json").is_file()
    with pytest.raises(DataError, match=r"made with other settings \(specific 0.0 there, 1.0 asked\).*another --root"):
        synthetic.ensure(tmp_path, "synthetic", synthetic.Config(**TINY, specific=1.0))
    assert (folder / "vocab.json").is_file() and (folder / "train_ims.npy").read_bytes() == before
    synthetic.generate(tmp_path, "synthetic", synthetic.Config(**TINY, specific=1.0))  # asked for: replaced
    assert not (folder / "vocab.json").exists()
    assert json.loads((folder / "config.json").read_text())["specific"] == 1.0
    (folder / "config.json").write_text("{not json")
    with pytest.raises(DataError, match=r"config.json: cannot be read as the data set's settings"):
        synthetic.ensure(tmp_path, "synthetic", synthetic.Config(**TINY))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("specific", 1.5, "probability"),
        ("twins", -0.1, "probability"),
        ("variants", 0, "positive integer"),
        ("noise", float("nan"), "finite"),
        ("train", -1, "non-negative integer"),
        ("dim", 0, "positive integer"),
    ],
)
def test_config_refuses_bad_knobs_by_name(field, value, message):
    with pytest.raises(ValueError, match=f"synthetic {field} .*{message}"):
        synthetic.Config(**{field: value})


# ------------------------------------------------------------------ the false-negative measure
def random_split(seed: int, images: int, specific: float, twins: float) -> tuple[list, list]:
    rng = random.Random(seed)
    scenes: list[dict] = []
    while len(scenes) < images:
        scenes.append(synthetic._sample_scene(rng))
        if rng.random() < twins and len(scenes) < images:
            scenes.append(synthetic._twin(scenes[-1], rng))
    mentions = [synthetic.describe(s, rng, specific)[1] for s in scenes for _ in range(5)]
    return mentions, scenes


@pytest.mark.parametrize("seed", range(4))
def test_fit_matrix_is_the_literal_definition(seed):
    mentions, scenes = random_split(seed, 30, specific=0.3, twins=0.6)
    expected = np.array([[synthetic.fits(m, s) for s in scenes] for m in mentions])
    assert np.array_equal(synthetic.fit_matrix(mentions, scenes), expected)
    assert expected[np.arange(150), np.arange(150) // 5].all()  # a caption fits its own image


def brute_force(mentions: list, scenes: list, batch_size: int) -> dict[str, float]:
    """Every batch that holds the anchor caption, enumerated; every count from `fits`."""
    n = len(mentions)
    negatives = false = same = with_one = batches = 0
    for anchor in range(n):
        others = [c for c in range(n) if c != anchor]
        for rest in itertools.combinations(others, batch_size - 1):
            batches += 1
            bad = 0
            for c in rest:
                negatives += 1
                if c // 5 == anchor // 5:
                    same += 1
                elif synthetic.fits(mentions[anchor], scenes[c // 5]):
                    bad += 1
            false += bad
            with_one += bad > 0
    return {
        "negative_share": false / negatives,
        "same_image_share": same / negatives,
        "captions_with_one": with_one / batches,
        "per_caption": false / batches,
    }


@pytest.mark.parametrize(("seed", "batch_size"), [(0, 2), (1, 3), (2, 3), (3, 4), (5, 3)])
def test_false_negative_rates_match_a_brute_force_count(seed, batch_size):
    mentions, scenes = random_split(seed, 3, specific=0.0, twins=1.0)
    got = synthetic.false_negatives(mentions, scenes, batch_size)
    want = brute_force(mentions, scenes, batch_size)
    assert got == pytest.approx(want, rel=1e-12, abs=1e-12)


def test_brute_force_sets_have_false_negatives():
    # the sets above would test nothing if no caption fitted another image
    assert sum(synthetic.false_negatives(*random_split(s, 3, 0.0, 1.0), 3)["negative_share"] > 0 for s in range(6)) >= 3


def test_specific_captions_remove_nearly_every_false_negative():
    partial = synthetic.false_negatives(*random_split(0, 400, specific=0.0, twins=0.5), 128)
    specific = synthetic.false_negatives(*random_split(0, 400, specific=1.0, twins=0.5), 128)
    assert partial["captions_with_one"] > 0.1
    assert specific["captions_with_one"] < 0.1 * partial["captions_with_one"]


def test_false_negatives_refuses_bad_arguments():
    mentions, scenes = random_split(0, 3, 0.0, 0.0)
    with pytest.raises(ValueError, match="batch_size"):
        synthetic.false_negatives(mentions, scenes, 16)
    with pytest.raises(ValueError, match="5 per image"):
        synthetic.false_negatives(mentions[:-1], scenes, 3)
    with pytest.raises(ValueError, match="does not fit its own image"):
        synthetic.false_negatives(mentions[5:] + mentions[:5], scenes, 3)


def test_measure_from_the_command_line(tmp_path, capsys):
    synthetic.main(
        [
            "--root",
            str(tmp_path),
            "--train",
            "40",
            "--dev",
            "30",
            "--test",
            "30",
            "--regions",
            "4",
            "--dim",
            "8",
            "--measure",
            "--batch-size",
            "16",
        ]
    )
    out = capsys.readouterr().out
    assert "train: at batch 16" in out and "false" in out and "dev: at batch 16" in out
