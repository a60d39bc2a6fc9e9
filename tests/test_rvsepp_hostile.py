"""The RVSE++ pipeline under hostile use: no wrong result, no lost run, and every user mistake
a clear error that names its flag or file (no traceback)."""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import selhn
from examples.rvsepp import cli, evaluate, synthetic
from examples.rvsepp import train as train_module
from examples.rvsepp.data import DataError, PrecompDataset, read_captions
from examples.rvsepp.evaluate import check_unit, load_checkpoint, ranks
from examples.rvsepp.vocab import Vocabulary
from examples.selection_study import compare

SMOKE = ["--preset", "smoke", "--tensorboard", "off"]


def run(args: list[str]) -> dict:
    return train_module.train(train_module.parse_args(args))


@pytest.fixture(scope="module")
def finished(data_root, tmp_path_factory) -> Path:
    """A finished smoke run (with its test evaluation); tests copy it before changing it."""
    out = tmp_path_factory.mktemp("finished")
    run([*SMOKE, "--root", str(data_root), "--out", str(out)])
    return out


def copy_run(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    (target / train_module.LOCK_FILE).unlink(missing_ok=True)
    return target


def exit_message(main, argv: list[str]) -> str:
    """A command line's one-line message when it exits with a user error ('' when it succeeds)."""
    try:
        main(argv)
    except SystemExit as exit_:
        return str(exit_.code)
    return ""


def evaluate_main(argv: list[str]) -> str:
    return exit_message(evaluate.main, argv)


# ------------------------------------------------------------------ wrong results
def test_non_finite_embeddings_are_never_ranked(finished, data_root, tmp_path):
    """A NaN similarity compares neither higher nor lower than anything: it used to rank every
    target first, so a NaN-weight checkpoint printed rsum 600, and one huge feature raised rsum."""
    with pytest.raises(ValueError, match=r"1 of 3 image embeddings are not finite \(first rows: \[1\]\)"):
        ranks([torch.tensor([[1.0, 0.0], [math.nan, 0.0], [0.0, 1.0]])], [torch.eye(2).repeat(8, 1)[:15]])
    checkpoint = torch.load(finished / "best.pth", weights_only=True)
    checkpoint["model"] = {
        k: torch.full_like(v, math.nan) if v.is_floating_point() else v for k, v in checkpoint["model"].items()
    }
    torch.save(checkpoint, tmp_path / "nan.pth")
    message = evaluate_main(["--root", str(data_root), "--checkpoint", str(tmp_path / "nan.pth")])
    assert "test_ims.npy and its captions: 20 of 20 image embeddings are not finite" in message
    root = tmp_path / "data"
    shutil.copytree(data_root, root)
    features = np.load(root / "synthetic_precomp" / "test_ims.npy")
    features[3, 0] = 3e38  # finite, but the encoder overflows on it
    np.save(root / "synthetic_precomp" / "test_ims.npy", features)
    message = evaluate_main(["--root", str(root), "--checkpoint", str(finished / "best.pth")])
    assert "1 of 20 image embeddings are not finite (first rows: [3])" in message


def test_zero_embeddings_are_never_ranked(finished, data_root, tmp_path):
    """A zero embedding scores 0 against everything: it was ranked by the order of its ties (an
    overflow that ended in zeros moved rsum 121 -> 136; a model of zeros was evaluated)."""
    with pytest.raises(
        ValueError, match=r"1 of 3 caption embeddings are zero vectors, not unit ones \(first rows: \[2\]\)"
    ):
        check_unit(torch.cat([torch.eye(2), torch.zeros(1, 2)]), "caption embeddings")
    checkpoint = torch.load(finished / "best.pth", weights_only=True)
    checkpoint["model"] = {
        k: torch.zeros_like(v) if v.is_floating_point() else v for k, v in checkpoint["model"].items()
    }
    torch.save(checkpoint, tmp_path / "zeros.pth")
    message = evaluate_main(["--root", str(data_root), "--checkpoint", str(tmp_path / "zeros.pth")])
    assert "image embeddings are zero vectors" in message or "caption embeddings are zero vectors" in message


def test_the_per_caption_layout_must_group_each_images_rows(tmp_path):
    """One image row per caption: the 5 rows of an image must be consecutive and equal, or the
    evaluation pairs captions with the wrong images (it used to give a wrong rsum silently)."""
    folder = tmp_path / "tiny_precomp"
    folder.mkdir()
    rows = np.random.default_rng(0).random((2, 3, 4)).astype(np.float32)
    grouped = np.repeat(rows, 5, axis=0)
    vocab = Vocabulary.build(["a dog"] * 4)
    (folder / "test_caps.txt").write_text("a dog\n" * 10)
    np.save(folder / "test_ims.npy", grouped)
    PrecompDataset(tmp_path, "tiny", "test", vocab).check_evaluation_layout()
    np.save(folder / "test_ims.npy", np.tile(rows, (5, 1, 1)))  # image 0, image 1, image 0, ...: not grouped
    with pytest.raises(DataError, match=r"test_ims.npy: each caption has its own image row, but rows 0-4 differ"):
        PrecompDataset(tmp_path, "tiny", "test", vocab).check_evaluation_layout()


# ------------------------------------------------------------------ lost or mixed runs
def test_overwrite_keeps_the_old_run_when_the_new_one_fails_to_start(finished, data_root, tmp_path, monkeypatch):
    """--overwrite clears the folder only once everything before the first step has worked:
    here the model cannot be built (a device out of memory)."""
    out = copy_run(finished, tmp_path / "run")
    before = (out / "last.pth").read_bytes()

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")

    monkeypatch.setattr(train_module, "RVSEPP", out_of_memory)
    with pytest.raises(train_module.RunError, match=r"cannot build the model on cpu .*: CUDA out of memory"):
        run([*SMOKE, "--root", str(data_root), "--out", str(out), "--overwrite"])
    assert (out / "last.pth").read_bytes() == before and (out / "results.json").is_file()


def test_overwrite_keeps_the_old_run_until_the_new_one_has_a_checkpoint(finished, data_root, tmp_path, monkeypatch):
    """Bad data found in the first batch used to leave only .lock: the old run had been deleted
    before the new one trained a step. It is set aside until the new run's first checkpoint."""
    out = copy_run(finished, tmp_path / "run")
    before = {name: (out / name).read_bytes() for name in ("last.pth", "best.pth", "results.json", "dev.jsonl")}

    def bad_batch(self, batch):
        raise DataError("train_ims.npy: row 7 is all zeros")

    monkeypatch.setattr(train_module.Run, "step", bad_batch)
    with pytest.raises(DataError, match="row 7 is all zeros"):
        run([*SMOKE, "--root", str(data_root), "--out", str(out), "--overwrite"])
    assert {name: (out / name).read_bytes() for name in before} == before
    assert not (out / train_module.PREVIOUS_RUN).exists()
    monkeypatch.undo()
    run([*SMOKE, "--root", str(data_root), "--out", str(out), "--overwrite", "--max-steps", "2", "--no-eval-test"])
    assert (out / "last.pth").read_bytes() != before["last.pth"] and not (out / train_module.PREVIOUS_RUN).exists()


def test_a_set_aside_run_left_by_a_killed_process_is_the_one_kept(finished, tmp_path):
    """A process killed between setting the old run aside and its first checkpoint leaves
    .previous-run: that is the last run with a checkpoint, and the next attempt keeps it."""
    out = copy_run(finished, tmp_path / "run")
    kept = (out / "last.pth").read_bytes()
    train_module.set_aside_previous_run(out)
    (out / "steps.csv").write_text("step\n")  # the killed attempt's leftovers
    train_module.set_aside_previous_run(out)  # the next --overwrite
    assert not (out / "steps.csv").exists() and (out / train_module.PREVIOUS_RUN / "last.pth").read_bytes() == kept
    train_module.restore_previous_run(out)
    assert (out / "last.pth").read_bytes() == kept and not (out / train_module.PREVIOUS_RUN).exists()


def test_a_second_run_into_a_folder_in_use_is_refused(data_root, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    with open(out / train_module.LOCK_FILE, "a+") as held:  # another process's lock
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("pid 12345")
        held.flush()
        with pytest.raises(train_module.RunError, match=r"run is in use by another run \(pid 12345\)"):
            run([*SMOKE, "--root", str(data_root), "--out", str(out), "--max-steps", "1"])
        assert not (out / "last.pth").exists()
    run([*SMOKE, "--root", str(data_root), "--out", str(out), "--max-steps", "1", "--no-eval-test"])
    assert (out / "last.pth").is_file()
    assert not (out / train_module.LOCK_FILE).exists()  # a finished run leaves no .lock behind
    (out / train_module.LOCK_FILE).write_text("pid 99999")  # a stale lock that nobody holds: no obstacle
    run([*SMOKE, "--root", str(data_root), "--out", str(out), "--resume", "--max-steps", "2", "--no-eval-test"])
    assert not (out / train_module.LOCK_FILE).exists()


def test_compare_reuses_a_finished_run_only_for_the_same_arguments(finished, data_root, tmp_path):
    out = copy_run(finished, tmp_path / "run")
    argv = [*SMOKE, "--root", str(data_root), "--out", str(out)]
    compare.check_reusable([(out, argv)])  # the same run: reused
    with pytest.raises(SystemExit, match=r"run: --margin 0.2 \(asked: 0.5\)"):
        compare.check_reusable([(out, [*argv, "--margin", "0.5"])])
    with pytest.raises(SystemExit, match=r"--seed 0 \(asked: 3\)"):
        compare.check_reusable([(out, [*argv, "--seed", "3"])])
    compare.check_reusable([(out, [*argv, "--workers", "1"])])  # how it runs is no other run


def test_runs_from_before_a_flag_existed_resume_and_are_reused(finished, data_root, tmp_path):
    """A checkpoint without the backbone's flags ran as their defaults do: it resumes and compare
    reuses it (both refused it: "--backbone None, not False"); a flag it has still counts."""
    out = copy_run(finished, tmp_path / "run")
    checkpoint = torch.load(out / "last.pth", weights_only=True)
    for key in [k for k in checkpoint["args"] if k.startswith("backbone") or k == "embedding_warmup_epochs"]:
        del checkpoint["args"][key]
    torch.save(checkpoint, out / "last.pth")
    argv = [*SMOKE, "--root", str(data_root), "--out", str(out)]
    compare.check_reusable([(out, argv)])
    with pytest.raises(SystemExit, match=r"--backbone False \(asked: True\)"):
        compare.check_reusable([(out, [*argv, "--backbone", "--embedding-warmup-epochs", "0"])])
    run([*argv, "--resume", "--no-eval-test"])


def test_a_refused_resume_touches_no_data(finished, data_root, tmp_path):
    """The stored arguments are compared before the data are loaded: a resume with another
    --synthetic-seed used to regenerate the data set first, then refuse."""
    root = tmp_path / "data"
    shutil.copytree(data_root, root)
    out = copy_run(finished, tmp_path / "run")
    features = root / "synthetic_precomp" / "test_ims.npy"
    before = features.read_bytes()
    common = [*SMOKE, "--out", str(out), "--resume", "--synthetic-seed", "9"]
    with pytest.raises(train_module.RunError, match="belongs to a run with --synthetic-seed 0, not 9"):
        run([*common, "--root", str(root)])
    assert features.read_bytes() == before


def test_resuming_a_finished_run_keeps_its_results(finished, data_root, tmp_path):
    """results.json keeps what the resumed process did not measure again: the test metrics
    (with --no-eval-test), the step time, and what trained the run and when (no step was trained)."""
    out = copy_run(finished, tmp_path / "run")
    text = (out / "results.json").read_text()
    before = json.loads(text)
    assert before["test_rsum"] is not None and before["step_seconds"] is not None
    assert isinstance(before["test_i2t_medr"], int)
    run([*SMOKE, "--root", str(data_root), "--out", str(out), "--resume", "--no-eval-test"])
    # byte for byte: no commit, machine or time rewritten by a process that measured nothing, medr still an int
    assert (out / "results.json").read_text() == text
    run([*SMOKE, "--root", str(data_root), "--out", str(out), "--resume"])
    after = json.loads((out / "results.json").read_text())
    assert after["step_seconds"] == before["step_seconds"] and after["test_rsum"] == before["test_rsum"]


def test_the_monitors_state_survives_a_resume_and_old_checkpoints_still_resume(finished, data_root, tmp_path):
    """The alarm's state is checkpointed (a resumed run reported its collapse a second time);
    a checkpoint from before it was kept still resumes, with where the alarm fired."""
    out = copy_run(finished, tmp_path / "run")
    checkpoint = torch.load(out / "last.pth", weights_only=True)
    steps = checkpoint["state"]["global_step"]
    checkpoint["state"]["monitor"] = {"steps": steps, "alarm_steps": [1], "alarm": {"streak": 4, "fired": True}}
    torch.save(checkpoint, out / "last.pth")
    run([*SMOKE, "--root", str(data_root), "--out", str(out), "--resume", "--epochs", "2", "--no-eval-test"])
    resumed = torch.load(out / "last.pth", weights_only=True)["state"]
    assert resumed["monitor"]["alarm_steps"][:1] == [1] and resumed["monitor"]["steps"] > steps
    assert json.loads((out / "results.json").read_text())["alarm_steps"][:1] == [1]
    old = copy_run(finished, tmp_path / "old")
    checkpoint = torch.load(old / "last.pth", weights_only=True)
    checkpoint["state"].pop("monitor", None)
    checkpoint["state"]["alarm_steps"] = [2]
    torch.save(checkpoint, old / "last.pth")
    run([*SMOKE, "--root", str(data_root), "--out", str(old), "--resume", "--no-eval-test"])
    assert json.loads((old / "results.json").read_text())["alarm_steps"] == [2]
    checkpoint["state"]["monitor"] = {"steps": "many"}
    torch.save(checkpoint, old / "last.pth")
    with pytest.raises(train_module.RunError, match=r"last.pth: TrainingMonitor state lacks 'alarm_steps'"):
        run([*SMOKE, "--root", str(data_root), "--out", str(old), "--resume", "--no-eval-test"])


def test_a_full_disk_loses_no_checkpoint_and_leaves_no_temporary_file(finished, data_root, tmp_path, monkeypatch):
    out = copy_run(finished, tmp_path / "run")
    before = (out / "last.pth").read_bytes()

    def disk_full(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(train_module.torch, "save", disk_full)
    with pytest.raises(
        train_module.RunError, match="could not write .*last.pth: No space left on device; the previous"
    ):
        run([*SMOKE, "--root", str(data_root), "--out", str(out), "--resume", "--epochs", "2", "--no-eval-test"])
    assert (out / "last.pth").read_bytes() == before
    assert not list(out.glob("*.tmp"))


def test_a_torn_last_line_of_dev_jsonl_does_not_stop_a_resume(finished, data_root, tmp_path):
    out = copy_run(finished, tmp_path / "run")
    with open(out / "dev.jsonl", "a") as handle:
        handle.write('{"epoch": 1, "global_st')  # the process died while writing it
    run([*SMOKE, "--root", str(data_root), "--out", str(out), "--resume", "--no-eval-test"])
    assert all(json.loads(line) for line in (out / "dev.jsonl").read_text().splitlines())
    (out / "dev.jsonl").write_text('{"epoch": 0\n{"epoch": 0, "global_step": 3}\n')
    with pytest.raises(train_module.RunError, match=r"dev.jsonl, line 1: not a JSON record"):
        run([*SMOKE, "--root", str(data_root), "--out", str(out), "--resume", "--no-eval-test"])


# ------------------------------------------------------------------ clear errors
@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--seed", "-5"], "--seed: expected an integer from 0 to 4294967295, got -5"),
        (["--seed", str(2**32)], "--seed: expected an integer from 0 to 4294967295, got 4294967296"),
        (["--device", "foo"], "--device: expected auto, cpu, cuda or cuda:N, got 'foo'"),
        (["--device", "meta"], "--device: meta tensors hold no values"),
        (["--synthetic-dev", "0"], "--synthetic-dev 0: the dev split would be empty"),
        (["--synthetic-test", "0"], "--synthetic-test 0: the test split would be empty"),
    ],
)
def test_bad_flags_are_refused_by_name(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        train_module.parse_args([*SMOKE, *flags])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    train_module.parse_args([*SMOKE, "--synthetic-test", "0", "--no-eval-test"])  # no test split needed


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_refused(capsys):
    with pytest.raises(SystemExit):
        train_module.parse_args([*SMOKE, "--device", "cuda"])
    assert "--device: 'cuda': CUDA is not available here" in capsys.readouterr().err


def test_tensorboard_on_without_tensorboard_is_refused(monkeypatch, capsys):
    monkeypatch.setattr(cli, "tensorboard_available", lambda: False)
    with pytest.raises(SystemExit):
        train_module.parse_args(["--preset", "smoke", "--tensorboard", "on"])
    assert "--tensorboard on needs the tensorboard package" in capsys.readouterr().err
    assert train_module.parse_args(["--preset", "smoke"]).tensorboard == "auto"  # auto just goes without


def test_out_that_is_not_a_folder(data_root, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(train_module.RunError, match="--out .*file is a file, not a folder"):
        run([*SMOKE, "--root", str(data_root), "--out", str(tmp_path / "file")])
    os.symlink(tmp_path / "loop", tmp_path / "loop")
    with pytest.raises(train_module.RunError, match="--out .*loop is a symbolic link that leads to no folder"):
        run([*SMOKE, "--root", str(data_root), "--out", str(tmp_path / "loop")])


def test_help_shows_every_default_and_the_presets(capsys):
    with pytest.raises(SystemExit):
        train_module.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag, default in [
        ("--epsilon", "0.01"),
        ("--margin", "0.2"),
        ("--lr", "0.0005"),
        ("--epochs", "30"),
        ("--lr-decay-epoch", "15"),
        ("--grad-clip", "2.0"),
        ("--embed-size", "1024"),
        ("--tensorboard", "auto"),
    ]:
        # the flag's own help (the text up to the next flag) ends with its default
        assert re.search(rf"{flag} \S+ (?:(?! --).)+ \(default: {re.escape(default)}\)", text), flag
    assert "(default: None)" not in text and "smoke seconds: a test of the whole pipeline" in text
    with pytest.raises(SystemExit):  # the study's own presets are listed by the study's command lines
        compare.parse_train(["--help"])
    assert "calibrated-stall the same with bottom-up-like features" in " ".join(capsys.readouterr().out.split())
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "repeat for an ensemble" in text and "split to evaluate" in text and "folder holding" in text
    assert evaluate.parse_args(["--checkpoint", "x", "--name", "coco"]).split == "testall"  # as train.py


def test_evaluate_names_every_bad_input(finished, data_root, tmp_path):
    best = str(finished / "best.pth")
    assert "missing split file" in evaluate_main(["--root", str(data_root), "--checkpoint", best, "--split", "nosuch"])
    folder = tmp_path / "synthetic_precomp"
    shutil.copytree(data_root / "synthetic_precomp", folder)
    np.save(folder / "empty_ims.npy", np.zeros((0, 6, 32), dtype=np.float32))
    (folder / "empty_caps.txt").write_text("")
    assert "the empty split of synthetic" in evaluate_main(
        ["--root", str(tmp_path), "--checkpoint", best, "--split", "empty"]
    )
    features = np.load(folder / "test_ims.npy")
    np.save(folder / "zero_ims.npy", np.concatenate([np.zeros_like(features[:1]), features[1:]]))
    shutil.copy(folder / "test_caps.txt", folder / "zero_caps.txt")
    assert "every region of image row 0 is zero" in evaluate_main(
        ["--root", str(tmp_path), "--checkpoint", best, "--split", "zero"]
    )
    np.save(folder / "wide_ims.npy", np.ones((20, 6, 40), dtype=np.float32))
    shutil.copy(folder / "test_caps.txt", folder / "wide_caps.txt")
    assert "has 40-d region features, but" in evaluate_main(
        ["--root", str(tmp_path), "--checkpoint", best, "--split", "wide"]
    )
    shutil.copy(folder / "test_ims.npy", folder / "latin_ims.npy")
    (folder / "latin_caps.txt").write_bytes((folder / "test_caps.txt").read_bytes().replace(b"a ", b"\xe0 ", 1))
    assert "latin_caps.txt, line 1: not UTF-8 text" in evaluate_main(
        ["--root", str(tmp_path), "--checkpoint", best, "--split", "latin"]
    )
    np.save(folder / "objects_ims.npy", np.array([[["x"]]], dtype=object), allow_pickle=True)
    (folder / "objects_caps.txt").write_text("a dog\n")
    assert "objects_ims.npy is not a numeric .npy array" in evaluate_main(
        ["--root", str(tmp_path), "--checkpoint", best, "--split", "objects"]
    )


def test_checkpoints_with_wrong_entries_or_an_older_format(finished, tmp_path):
    checkpoint = torch.load(finished / "last.pth", weights_only=True)
    damaged = {
        "model is a list": {**checkpoint, "model": [1, 2]},
        "a word is a number": {**checkpoint, "vocab": [*checkpoint["vocab"][:-1], 7]},
        "epoch is a string": {**checkpoint, "state": {**checkpoint["state"], "epoch": "3"}},
        "config without embed": {**checkpoint, "model_config": {"vocab_size": 10, "img_dim": 32, "word_dim": 16}},
    }
    messages = {
        "model is a list": "its 'model' is a list, expected a dict",
        "a word is a number": "its 'vocab' must be a list of words",
        "epoch is a string": r"its training state needs 'epoch' \(int\), got str '3'",
        "config without embed": "its 'model_config' needs a positive integer 'embed', got None",
    }
    for name, content in damaged.items():
        torch.save(content, tmp_path / "bad.pth")
        with pytest.raises(ValueError, match=messages[name]):
            load_checkpoint(tmp_path / "bad.pth")
    older = {key: value for key, value in checkpoint.items() if key not in ("rng", "optimizer")}
    older["state"] = {k: v for k, v in checkpoint["state"].items() if k != "pending_eval"}
    torch.save(older, tmp_path / "older.pth")
    load_checkpoint(tmp_path / "older.pth")  # still evaluates
    with pytest.raises(ValueError, match="older.pth has no 'optimizer': it was written by an older version"):
        load_checkpoint(tmp_path / "older.pth", resumable=True)


def test_data_files_that_cannot_be_read_are_named(tmp_path):
    (tmp_path / "caps.txt").write_bytes(b"a dog\na caf\xe9\n")
    with pytest.raises(DataError, match=r"caps.txt, line 2: not UTF-8 text"):
        read_captions(tmp_path / "caps.txt")
    (tmp_path / "caps.txt").write_bytes(b"a dog\rrunning\r\na cat\n")  # a lone \r ends no caption
    assert read_captions(tmp_path / "caps.txt") == ["a dog\rrunning", "a cat"]
    vocab = tmp_path / "vocab.json"
    Vocabulary.build(["a dog"] * 4).save(vocab)
    data = json.loads(vocab.read_text())
    del data["idx2word"]["2"]
    vocab.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"vocab.json: 'idx2word' must map every index .* index 2 is missing"):
        Vocabulary.load(vocab)
    vocab.write_text('{"idx2word": {"0": "<pad>"')
    with pytest.raises(ValueError, match="vocab.json is not a readable vocabulary"):
        Vocabulary.load(vocab)


# ------------------------------------------------------------------ damaged records: one line, never a traceback
def train_main(argv: list[str]) -> str:
    return exit_message(train_module.main, argv)


DAMAGED_RECORDS = [
    ("dev.jsonl", '{"epoch": 0, "kind": "epoch"}\n{"epoch": 0, "global_step": 1}\n', r"dev.jsonl, line 1: no step"),
    ("dev.jsonl", '{"global_step": "7"}\n{"global_step": 1}\n', r"dev.jsonl, line 1: no step number >= 0: .*'7'"),
    ("dev.jsonl", "[1, 2]\n{}\n", r"dev.jsonl, line 1: not a record \(an object\)"),
    ("dev.jsonl", '{"global_step": -4}\n{"global_step": 1}\n', r"dev.jsonl, line 1: no step number >= 0: .*-4"),
    ("dev.jsonl", b'{"global_step": 1, "x": "\xff"}\n', r"dev.jsonl: not UTF-8 text \(byte 25\)"),
    ("steps.csv", "step,loss\n1,0.5\nseven,0.4\n", r"steps.csv, line 3: step 'seven' is no number"),
    ("steps.csv", "loss\n0.5\n", r"steps.csv: no 'step' column"),
]


@pytest.mark.parametrize(("name", "content", "message"), DAMAGED_RECORDS)
def test_a_damaged_record_stops_a_resume_with_one_line(finished, data_root, tmp_path, name, content, message):
    out = copy_run(finished, tmp_path / "run")
    path = out / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    said = train_main([*SMOKE, "--root", str(data_root), "--out", str(out), "--resume", "--no-eval-test"])
    assert re.search(message, said), said
    assert said.startswith("error: ") and "\n" not in said and "damaged" in said


@pytest.mark.parametrize(
    ("entry", "value", "message"),
    [
        ("step_in_epoch", 10_000, r"'step_in_epoch' is 10000, but an epoch of this run has \d+ steps"),
        ("global_step", -3, r"'global_step' must be an int >= 0, got -3"),
        ("epoch", -1, r"'epoch' must be an int >= 0, got -1"),
    ],
)
def test_a_checkpoint_out_of_place_is_refused_by_entry(finished, data_root, tmp_path, entry, value, message):
    out = copy_run(finished, tmp_path / "run")
    checkpoint = torch.load(out / "last.pth", weights_only=True)
    checkpoint["state"][entry] = value
    torch.save(checkpoint, out / "last.pth")
    said = train_main([*SMOKE, "--root", str(data_root), "--out", str(out), "--resume", "--no-eval-test"])
    assert re.search(message, said) and "last.pth" in said, said


def test_a_corrupt_best_checkpoint_at_the_final_test_is_named(finished, data_root, tmp_path):
    out = copy_run(finished, tmp_path / "run")
    (out / "best.pth").write_bytes(b"not a checkpoint")
    said = train_main([*SMOKE, "--root", str(data_root), "--out", str(out), "--resume"])
    assert re.search(r"the final test cannot read .*best.pth .*last.pth holds the run", said), said


def test_a_root_that_cannot_be_written_is_named(tmp_path, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(synthetic, "generate", read_only)
    said = train_main([*SMOKE, "--root", str(tmp_path / "ro"), "--out", str(tmp_path / "run")])
    assert re.search(r"cannot write the synthetic data set to .*ro.synthetic_precomp: Read-only file system", said)


def test_a_full_disk_while_recording_an_evaluation_is_one_line(finished, data_root, tmp_path, monkeypatch):
    out = copy_run(finished, tmp_path / "run")
    real_open = open

    def full_disk(path, mode="r", *args, **kwargs):
        if str(path).endswith("dev.jsonl") and "a" in mode:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(train_module, "open", full_disk, raising=False)
    said = train_main([*SMOKE, "--root", str(data_root), "--out", str(out), "--resume", "--epochs", "2"])
    assert re.search(r"could not append the evaluation to .*dev.jsonl: No space left on device; the last", said)


# ------------------------------------------------------------------ settings that cannot apply
@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--backbone-lr-factor", "0.5"],
            r"--backbone-lr-factor 0.5: the backbone's settings apply only with --backbone",
        ),
        (["--backbone-blocks", "2"], r"--backbone-blocks 2: .* only with --backbone"),
    ],
)
def test_backbone_settings_that_cannot_apply_are_refused(flags, message, capsys):
    with pytest.raises(SystemExit):
        train_module.parse_args(["--preset", "smoke", *flags])
    assert re.search(message, capsys.readouterr().err)


def test_a_backbone_that_never_unfreezes_is_said_not_silent(capsys):
    """A frozen backbone for the whole run is a configuration of its own (it reproduces the run
    without one), but it was accepted silently where a user expected an unfreezing."""
    train_module.parse_args(["--preset", "smoke", "--backbone", "--embedding-warmup-epochs", "5", "--epochs", "1"])
    assert "note: --embedding-warmup-epochs 5 with --epochs 1: the backbone stays frozen" in capsys.readouterr().err


def test_a_vocabulary_with_a_word_twice_is_refused(tmp_path):
    table = {str(i): word for i, word in enumerate(["<pad>", "<start>", "<end>", "<unk>", "dog", "cat", "dog"])}
    (tmp_path / "vocab.json").write_text(json.dumps({"idx2word": table}))
    with pytest.raises(ValueError, match=r"the word 'dog' has two indices \(4 and 6\)"):
        Vocabulary.load(tmp_path / "vocab.json")


def test_a_criterion_factory_must_return_a_loss_module(data_root, tmp_path):
    criteria = {**train_module.CRITERIA, "plain": lambda args: selhn.functional.selhn_loss}
    args = train_module.parse_args(
        [*SMOKE, "--root", str(data_root), "--out", str(tmp_path), "--loss", "plain"], criteria=criteria
    )
    with pytest.raises(train_module.RunError, match=r"--loss plain returned a function, not a selhn loss module"):
        train_module.train(args, criteria)
    assert not (tmp_path / "last.pth").exists()


@pytest.mark.parametrize(
    "command", ["examples.rvsepp.train", "examples.rvsepp.evaluate", "examples.selection_study.compare"]
)
def test_help_never_prints_an_empty_default(command):
    import subprocess
    import sys

    text = subprocess.run([sys.executable, "-m", command, "--help"], capture_output=True, text=True, check=True).stdout
    assert "(default: None)" not in text and "(default: False)" not in text


def test_the_epoch_progress_bar_shows_on_a_terminal_that_reports_no_size(monkeypatch):
    """Inside an epoch nothing was shown on consoles that report a size of 0 x 0 (tqdm sized the
    bar to 0 columns and hid it below row 0); a log (no terminal) stays quiet."""
    import io
    import pty
    import select
    import sys

    master, follower = pty.openpty()  # a new terminal reports 0 x 0 until someone sets its size
    with os.fdopen(follower, "w") as terminal:
        monkeypatch.setattr(sys, "stderr", terminal)
        for _ in train_module.progress_bar(range(3), "epoch 0 (selhn)", disable=False):
            pass
        terminal.flush()
        readable, _, _ = select.select([master], [], [], 5.0)  # nothing written: fail, never hang
        shown = os.read(master, 65536).decode(errors="replace") if readable else ""
    os.close(master)
    assert "epoch 0 (selhn)" in shown and "step/s" in shown and "/3 [" in shown
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    for _ in train_module.progress_bar(range(3), "epoch 0 (selhn)", disable=False):
        pass
    assert log.getvalue() == ""
