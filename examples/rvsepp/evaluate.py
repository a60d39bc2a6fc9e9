"""Cross-modal retrieval evaluation (the VSE++ / VSE-infinity protocol), in blocks.

All captions and every image row (one per 5 captions) are encoded; the similarity of N
images and 5N captions is never held whole: it is computed on the device block by block,
so COCO 5K (5,000 x 25,000) fits in memory.

* i2t: the rank of image ``i`` is the best position of any of its 5 captions in its row
  sorted by descending score; t2i: the rank of caption ``5i + k`` is the position of image
  ``i`` in its column.
* Ties are broken by index (a stable descending sort): an item's position is the number of
  items scoring strictly higher plus the number scoring the same with a lower index.
* R@K = 100 x the share of ranks < K (0-based); medr = floor(median) + 1; meanr = mean + 1;
  rsum = the sum of the six recalls.
* Flickr30K: ``test`` (1,000 images); COCO 1K: five folds of 1,000 images of ``testall``,
  metrics averaged; COCO 5K: all of ``testall``. Ensembles average the similarity matrices.

Run: ``python -m examples.rvsepp.evaluate --checkpoint runs/x/best.pth --root data
--name coco --split testall --fold5`` (add more ``--checkpoint`` for an ensemble).
"""

from __future__ import annotations

import argparse
import math
import pickle
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from examples.rvsepp import cli
from examples.rvsepp.data import DataError, PrecompDataset, collate
from examples.rvsepp.model import RVSEPP


def _positions(scores: Tensor, targets: Tensor) -> Tensor:
    """Position of column ``targets[r]`` in row ``r`` of ``scores`` under a stable descending sort."""
    target = scores.gather(1, targets.unsqueeze(1))
    columns = torch.arange(scores.shape[1], device=scores.device).unsqueeze(0)
    higher = (scores > target).sum(dim=1)
    tied_before = ((scores == target) & (columns < targets.unsqueeze(1))).sum(dim=1)
    return higher + tied_before


@torch.no_grad()
def ranks(
    images: Sequence[Tensor], captions: Sequence[Tensor], per_image: int = 5, block: int = 1024
) -> tuple[Tensor, Tensor]:
    """i2t ranks (N,) and t2i ranks (per_image N,), 0-based, from one or several models'
    embeddings (an ensemble averages their similarity matrices)."""
    n_images = images[0].shape[0]
    n_captions = captions[0].shape[0]
    if n_captions != per_image * n_images:
        raise ValueError(f"{n_captions} captions for {n_images} images: expected {per_image} per image")
    for kind, embeddings in (("image", images), ("caption", captions)):
        for model, emb in enumerate(embeddings):
            check_finite(emb, f"{kind} embeddings" + (f" of model {model}" if len(embeddings) > 1 else ""))
    device = images[0].device

    def sims(rows: slice, transpose: bool) -> Tensor:
        total = None
        for img, cap in zip(images, captions, strict=True):
            block_sims = cap[rows] @ img.t() if transpose else img[rows] @ cap.t()
            total = block_sims.float() if total is None else total + block_sims.float()
        assert total is not None
        return total / len(images)

    i2t = torch.empty(n_images, dtype=torch.long, device=device)
    for start in range(0, n_images, block):
        rows = slice(start, min(start + block, n_images))
        s = sims(rows, transpose=False)
        image_ids = torch.arange(rows.start, rows.stop, device=device)
        best = None
        for k in range(per_image):
            position = _positions(s, image_ids * per_image + k)
            best = position if best is None else torch.minimum(best, position)
        assert best is not None
        i2t[rows] = best
    t2i = torch.empty(n_captions, dtype=torch.long, device=device)
    for start in range(0, n_captions, block):
        rows = slice(start, min(start + block, n_captions))
        s = sims(rows, transpose=True)
        t2i[rows] = _positions(s, torch.arange(rows.start, rows.stop, device=device) // per_image)
    return i2t, t2i


def check_finite(embeddings: Tensor, what: str) -> None:
    """Refuse NaN or infinite embeddings: compared with a NaN, every score reads neither higher
    nor lower, so a NaN model would rank every target first and report a perfect recall."""
    bad = ~torch.isfinite(embeddings).all(dim=1)
    if bool(bad.any()):
        rows = bad.nonzero().flatten().tolist()
        raise ValueError(
            f"{len(rows)} of {embeddings.shape[0]} {what} are not finite (first rows: {rows[:5]}): the model's weights "
            "hold NaN or inf, or the features overflow it; no recall can be computed from them"
        )


def check_unit(embeddings: Tensor, what: str) -> None:
    """Refuse a model's zero embeddings. The model L2-normalises what it outputs, so a usable
    embedding has norm 1; a zero one (features that overflow the encoder into zeros, an output
    layer of zeros) scores 0 against everything and would be ranked by the order of its ties."""
    empty = embeddings.norm(dim=1) < 0.5
    if bool(empty.any()):
        rows = empty.nonzero().flatten().tolist()
        raise ValueError(
            f"{len(rows)} of {embeddings.shape[0]} {what} are zero vectors, not unit ones (first rows: {rows[:5]}): "
            "the model outputs nothing for them (features that overflow it, or an output layer of zeros); no recall "
            "can be computed from them"
        )


def metrics(rank: Tensor) -> dict[str, float]:
    """R@1/5/10 in percent, medr and meanr (1-based) of 0-based ranks."""
    rank = rank.double().cpu()
    return {
        "r1": 100.0 * float((rank < 1).double().mean()),
        "r5": 100.0 * float((rank < 5).double().mean()),
        "r10": 100.0 * float((rank < 10).double().mean()),
        "medr": math.floor(float(rank.quantile(0.5))) + 1,  # the median, mean of the middle two if even
        "meanr": float(rank.mean()) + 1,
    }


def evaluate_embeddings(
    images: Sequence[Tensor], captions: Sequence[Tensor], *, fold5: bool = False, per_image: int = 5
) -> dict[str, float]:
    """Both directions' metrics and rsum; with ``fold5``, the mean over five 1/5 folds."""
    if fold5:
        n = images[0].shape[0]
        if n % 5:
            raise ValueError(f"5-fold evaluation needs a multiple of 5 images, got {n}")
        size = n // 5
        folds = [
            evaluate_embeddings(
                [img[f * size : (f + 1) * size] for img in images],
                [cap[f * size * per_image : (f + 1) * size * per_image] for cap in captions],
                per_image=per_image,
            )
            for f in range(5)
        ]
        return {key: sum(fold[key] for fold in folds) / 5 for key in folds[0]}
    i2t, t2i = ranks(images, captions, per_image)
    out = {f"i2t_{k}": v for k, v in metrics(i2t).items()}
    out.update({f"t2i_{k}": v for k, v in metrics(t2i).items()})
    out["rsum"] = sum(out[f"{d}_{k}"] for d in ("i2t", "t2i") for k in ("r1", "r5", "r10"))
    return out


@torch.no_grad()
def encode(
    model: RVSEPP, dataset: PrecompDataset, device: torch.device, batch_size: int = 256, amp: bool = False
) -> tuple[Tensor, Tensor]:
    """Embeddings of the image of every 5 captions (N, D) and of every caption (5N, D).

    The image of captions ``5i..5i+4`` is the row of caption ``5i``: the same row for all five
    in the usual layout, and the first of five identical rows where each caption has its own.
    """
    dataset.check_evaluation_layout()
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    caps, imgs = [], {}
    for batch in loader:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            img, cap = model(
                batch["regions"].to(device),
                batch["region_lengths"].to(device),
                batch["tokens"].to(device),
                batch["token_lengths"].to(device),
            )
        caps.append(cap.float())
        for row, index in enumerate(batch["index"].tolist()):
            if index % 5 == 0:
                imgs[index // 5] = img[row].float()
    images = torch.stack([imgs[i] for i in sorted(imgs)])
    captions = torch.cat(caps)
    try:
        for embeddings, what in ((images, "image embeddings"), (captions, "caption embeddings")):
            check_finite(embeddings, what)
            check_unit(embeddings, what)
    except ValueError as error:
        raise DataError(f"{dataset.ims_path} and its captions: {error}") from None
    return images, captions


def format_table(results: dict[str, float], title: str = "") -> str:
    """The layout of the published tables: i2t R1 R5 R10 | t2i R1 R5 R10 | rsum."""
    row = " ".join(f"{results[f'i2t_{k}']:5.1f}" for k in ("r1", "r5", "r10"))
    row += " | " + " ".join(f"{results[f't2i_{k}']:5.1f}" for k in ("r1", "r5", "r10"))
    row += f" | {results['rsum']:6.1f}"
    ranks_row = (
        f"medr i2t {results['i2t_medr']:.0f} t2i {results['t2i_medr']:.0f}, "
        f"meanr i2t {results['i2t_meanr']:.1f} t2i {results['t2i_meanr']:.1f}"
    )
    head = "   i2t R1    R5   R10 |   t2i R1    R5   R10 |   rsum"
    return "\n".join(line for line in (title, head, "   " + row, "   " + ranks_row) if line)


#: what every checkpoint holds, and the type of each
CHECKPOINT_KEYS: dict[str, type] = {"model": dict, "model_config": dict, "vocab": list, "state": dict, "args": dict}
#: what a checkpoint that a run continues from (``--resume``) holds too
RESUME_KEYS: dict[str, type] = {"optimizer": dict, "scheduler": dict, "rng": dict}
#: the training state's entries and their types
STATE_KEYS: dict[str, tuple[type, ...]] = {
    "epoch": (int,),
    "step_in_epoch": (int,),
    "global_step": (int,),
    "best_rsum": (int, float),
    "pending_eval": (bool,),
    "eval_epoch": (int,),
}
MODEL_CONFIG_KEYS = ("vocab_size", "img_dim", "embed", "word_dim")


def load_checkpoint(path: str | Path, *, resumable: bool = False) -> dict:
    """A checkpoint of examples/rvsepp/train.py, loaded with ``weights_only=True`` and checked.

    Checkpoints hold tensors, numbers, strings and plain containers only, so loading one
    never runs code from the file (``weights_only=False`` would unpickle anything, and a
    crafted file could execute code). A missing, corrupt or foreign file, one whose entries
    have the wrong types, or (with ``resumable``) one that lacks what a resumed run needs,
    such as a checkpoint of an older format, raises a ``ValueError`` that names the file and
    the entry.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no checkpoint at {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{path} is not a checkpoint that loads as plain data: it is corrupt, from another program, or holds "
            "objects that a weights-only load refuses (unpickling them could run code from the file)"
        ) from error
    except (EOFError, RuntimeError, OSError) as error:
        raise ValueError(f"{path} is not a readable checkpoint (truncated or corrupt?): {error}") from error
    if not isinstance(checkpoint, dict) or not all(key in checkpoint for key in CHECKPOINT_KEYS):
        raise ValueError(f"{path} is not an RVSE++ checkpoint written by examples/rvsepp/train.py")
    expected = {**CHECKPOINT_KEYS, **(RESUME_KEYS if resumable else {})}
    for key, kind in expected.items():
        if key not in checkpoint:
            raise ValueError(
                f"{path} has no '{key}': it was written by an older version of train.py or only for evaluation, so a "
                "run cannot continue from it (evaluate it with examples.rvsepp.evaluate, or start a new run)"
            )
        if not isinstance(checkpoint[key], kind):
            raise ValueError(f"{path}: its '{key}' is a {type(checkpoint[key]).__name__}, expected a {kind.__name__}")
    _check_entries(path, checkpoint, resumable)
    return checkpoint


def _check_entries(path: Path, checkpoint: dict, resumable: bool) -> None:
    """The parts of a checkpoint that are read by name: their types."""
    if not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in checkpoint["model"].items()):
        raise ValueError(f"{path}: its 'model' must map parameter names to tensors")
    config = checkpoint["model_config"]
    for key in MODEL_CONFIG_KEYS:
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{path}: its 'model_config' needs a positive integer '{key}', got {value!r}")
    unknown = sorted(set(config) - set(MODEL_CONFIG_KEYS) - {"backbone_blocks"})
    if unknown:
        raise ValueError(f"{path}: its 'model_config' holds entries no model has: {', '.join(map(str, unknown))}")
    blocks = config.get("backbone_blocks", 1)
    if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 1:
        raise ValueError(f"{path}: its 'model_config' 'backbone_blocks' must be a positive integer, got {blocks!r}")
    if not all(isinstance(word, str) for word in checkpoint["vocab"]):
        raise ValueError(f"{path}: its 'vocab' must be a list of words (strings)")
    state = checkpoint["state"]
    for key, kinds in STATE_KEYS.items():
        if key not in state and not resumable and key in ("pending_eval", "eval_epoch"):
            continue  # read only by a resumed run
        if key not in state or isinstance(state[key], bool) != (bool in kinds) or not isinstance(state[key], kinds):
            got = "nothing" if key not in state else f"{type(state[key]).__name__} {state[key]!r}"
            names = " or ".join(kind.__name__ for kind in kinds)
            raise ValueError(
                f"{path}: its training state needs '{key}' ({names}), got {got}"
                + (" (a checkpoint of an older train.py cannot be resumed)" if key not in state else "")
            )
    if resumable and not {"python", "numpy", "torch"} <= set(checkpoint["rng"]):
        raise ValueError(
            f"{path}: its 'rng' lacks a generator's state (python, numpy, torch), so the run cannot resume"
        )


def load_model(path: str | Path, device: torch.device) -> tuple[RVSEPP, dict]:
    """A model from a training checkpoint, with clear errors for a foreign file."""
    checkpoint = load_checkpoint(path)
    model = RVSEPP(**checkpoint["model_config"])
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as error:
        raise ValueError(f"{path} holds a model of another shape than {checkpoint['model_config']}: {error}") from error
    return model.to(device), checkpoint


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=cli.HelpFormatter,
        allow_abbrev=False,
    )
    add = parser.add_argument
    add("--checkpoint", action="append", required=True, help="a checkpoint of train.py; repeat for an ensemble")
    add("--root", default="data", help="folder holding <name>_precomp")
    add("--name", default="synthetic", help="data set: synthetic, f30k, coco, ...")
    add("--split", default=None, help="split to evaluate (when not given: test, and testall for coco, as train.py)")
    add("--fold5", action="store_true", help="COCO 1K: the mean over five folds of 1,000 images of the split")
    add("--device", type=cli.device, default="auto", help="auto: cuda if available, else cpu")
    args = parser.parse_args(argv)
    if args.split is None:
        args.split = cli.default_test_split(args.name)
    return args


def evaluate_checkpoints(args: argparse.Namespace) -> dict[str, float]:
    """The metrics of ``args.checkpoint`` (one model or an ensemble) on ``args.split``."""
    from examples.rvsepp.vocab import Vocabulary

    device = cli.resolve_device(args.device)
    images, captions = [], []
    for path in args.checkpoint:
        model, checkpoint = load_model(path, device)
        vocab = Vocabulary(checkpoint["vocab"])
        dataset = PrecompDataset(args.root, args.name, args.split, vocab)
        if len(dataset) == 0:
            raise DataError(f"the {args.split} split of {args.name} under {args.root} is empty: nothing to evaluate")
        if dataset.feature_dim != model.config["img_dim"]:
            raise DataError(
                f"{dataset.ims_path} has {dataset.feature_dim}-d region features, but {path} was trained on "
                f"{model.config['img_dim']}-d ones"
            )
        img, cap = encode(model, dataset, device, amp=device.type == "cuda")
        images.append(img)
        captions.append(cap)
    return evaluate_embeddings(images, captions, fold5=args.fold5)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        results = evaluate_checkpoints(args)
    except (FileNotFoundError, ValueError) as error:  # DataError and a decoding error are ValueErrors
        raise SystemExit(f"error: {error}") from None
    label = f"{args.name} {args.split}" + (" (5-fold 1K)" if args.fold5 else "")
    ensemble = f", ensemble of {len(args.checkpoint)}" if len(args.checkpoint) > 1 else ""
    print(format_table(results, label + ensemble))


if __name__ == "__main__":
    main()
