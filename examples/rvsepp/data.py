"""Precomputed region features and captions (the SCAN / VSE-infinity "precomp" layout).

``<root>/<name>_precomp/<split>_ims.npy`` holds float32 (N_images, K, D) region features,
memory-mapped (COCO's train features are about 33 GB); ``<split>_caps.txt`` one caption per
line, 5 consecutive lines per image row. If the image rows equal the caption rows, each
caption has its own row (some copies of Flickr30K dev do this). The dev split is cut to its
first 5,000 captions. A region row that is all zeros is padding.

Training-time augmentation (VSE-infinity's): each region is dropped with probability 0.2
(at least one is kept); each caption token, start and end included, is perturbed with
probability 0.2: it becomes ``<mask>`` (50%), a random word (10%) or is deleted (40%).
The randomness of item ``i`` in epoch ``e`` comes from ``(seed, e, i)`` alone, so a run
resumed mid-epoch draws exactly what an uninterrupted one would, whatever the workers.

Captions are split on newlines alone (``\n`` or ``\r\n``; a lone ``\r`` and other Unicode line
separators stay inside a caption) and cut to ``MAX_TOKENS`` tokens, start and end included, so that one
runaway line cannot take minutes and gigabytes per step (real captions have at most about 80
words). An image whose regions are all zeros, or that holds a NaN or infinite feature, raises
a :class:`DataError` that names the file and the row.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from examples.rvsepp.vocab import MASK, Vocabulary

DEV_CAPTIONS = 5000
#: tokens kept per caption, <start> and <end> included
MAX_TOKENS = 128


class DataError(ValueError):
    """A data file that cannot be used as it is; the message names the file."""


def read_captions(path: Path) -> list[str]:
    """One caption per line; only ``\n`` (or ``\r\n``) ends a line: a lone ``\r`` or another
    Unicode line separator stays inside its caption. A file that is not UTF-8 raises a
    :class:`DataError` naming it and the line."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise DataError(
            f"{path}, line {line}: not UTF-8 text ({error.reason} at byte {error.start}); save the captions as UTF-8"
        ) from None
    lines = text.split("\n")  # no newline translation: str.splitlines and text mode would split at a lone \r too
    if lines and lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


class PrecompDataset(Dataset):
    """Pairs (regions of an image, one of its captions) of one split.

    Args:
        root: folder holding ``<name>_precomp``.
        name: data set name (``f30k``, ``coco``, ``synthetic``...).
        split: ``train``, ``dev``, ``test``, ``testall``...
        vocab: the vocabulary.
        train: apply the augmentations.
        seed: seed of the augmentations.
    """

    def __init__(
        self,
        root: str | Path,
        name: str,
        split: str,
        vocab: Vocabulary,
        *,
        train: bool = False,
        seed: int = 0,
        region_drop: float = 0.2,
        token_perturb: float = 0.2,
    ) -> None:
        folder = Path(root) / f"{name}_precomp"
        ims_path, caps_path = folder / f"{split}_ims.npy", folder / f"{split}_caps.txt"
        for path in (ims_path, caps_path):
            if not path.is_file():
                raise FileNotFoundError(
                    f"missing split file {path} (expected the precomp layout <root>/<name>_precomp/)"
                )
        try:
            self.images = np.load(ims_path, mmap_mode="r")  # never unpickles: allow_pickle stays False
        except (ValueError, OSError, EOFError) as error:
            raise DataError(
                f"{ims_path} is not a numeric .npy array of region features (an object array, or a damaged "
                f"file): {error}"
            ) from None
        if self.images.dtype.kind not in "fiu":
            raise DataError(f"{ims_path} must hold numbers (float32 features), got dtype {self.images.dtype}")
        if self.images.ndim != 3:
            raise DataError(f"{ims_path} must hold (N, regions, dim) features, got shape {self.images.shape}")
        self.ims_path = ims_path
        self.captions = read_captions(caps_path)
        n_images, n_captions = self.images.shape[0], len(self.captions)
        if n_images == n_captions:
            self.per_image = 1
        elif n_captions == 5 * n_images:
            self.per_image = 5
        else:
            raise DataError(
                f"{ims_path.name} has {n_images} image rows but {caps_path.name} has {n_captions} captions: "
                "expected 5 captions per image row, or one image row per caption"
            )
        if split == "dev" and n_captions > DEV_CAPTIONS:
            self.captions = self.captions[:DEV_CAPTIONS]
        self.vocab = vocab
        self.layout_checked = False
        self.train = train
        self.seed = seed
        self.epoch = 0
        self.region_drop = region_drop
        self.token_perturb = token_perturb
        self.tokens = [self._capped(vocab.encode(c)) for c in self.captions]

    def check_evaluation_layout(self) -> None:
        """Evaluation reads 5 captions per image. Where each caption has its own image row,
        the 5 captions of an image must follow each other with 5 equal rows; anything else
        would pair captions with the wrong images and give a wrong recall without a word.
        Checked once per data set, in chunks (the features stay memory-mapped)."""
        if self.layout_checked:
            return
        count = len(self.captions)
        if count % 5:
            raise DataError(f"{self.ims_path.parent}: {count} captions in this split, not 5 per image")
        if self.per_image == 1:
            chunk = 5 * 256
            for start in range(0, count, chunk):
                rows = np.asarray(self.images[start : min(start + chunk, count)])
                groups = rows.reshape(-1, 5, *rows.shape[1:])
                differ = (groups != groups[:, :1]).reshape(groups.shape[0], -1).any(axis=1)
                if differ.any():
                    first = start + 5 * int(np.argmax(differ))
                    raise DataError(
                        f"{self.ims_path}: each caption has its own image row, but rows {first}-{first + 4} differ; "
                        "the 5 captions of an image must be consecutive, with equal rows (or store one row per "
                        "image and 5 captions per row)"
                    )
        self.layout_checked = True

    @property
    def feature_dim(self) -> int:
        return int(self.images.shape[2])

    def __len__(self) -> int:
        return len(self.captions)

    @staticmethod
    def _capped(tokens: list[int]) -> list[int]:
        return tokens if len(tokens) <= MAX_TOKENS else tokens[: MAX_TOKENS - 1] + tokens[-1:]

    def image_index(self, caption_index: int) -> int:
        return caption_index // self.per_image

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, int, int]:
        image = self.image_index(index)
        regions = torch.from_numpy(np.array(self.images[image], dtype=np.float32))
        if not torch.isfinite(regions).all():
            raise DataError(f"{self.ims_path}: image row {image} holds NaN or infinite features")
        regions = regions[regions.abs().sum(dim=1) > 0]  # drop zero padding
        if regions.shape[0] == 0:
            raise DataError(
                f"{self.ims_path}: every region of image row {image} is zero (padding only); give it at least one "
                "region or remove it from the split"
            )
        tokens = list(self.tokens[index])
        if self.train:
            rng = random.Random(hash((self.seed, self.epoch, index)))
            regions = self._drop_regions(regions, rng)
            tokens = self._perturb_tokens(tokens, rng)
        return regions, torch.tensor(tokens, dtype=torch.long), index, image

    def _drop_regions(self, regions: Tensor, rng: random.Random) -> Tensor:
        keep = [i for i in range(regions.shape[0]) if rng.random() >= self.region_drop]
        if not keep:
            keep = [rng.randrange(regions.shape[0])]
        return regions[keep]

    def _perturb_tokens(self, tokens: list[int], rng: random.Random) -> list[int]:
        out = []
        for token in tokens:
            if rng.random() >= self.token_perturb:
                out.append(token)
                continue
            draw = rng.random()
            if draw < 0.5:
                out.append(self.vocab(MASK))
            elif draw < 0.6:
                out.append(rng.randrange(len(self.vocab)))
            # else: deleted
        return out or tokens[:1]


def collate(batch: Sequence[tuple[Tensor, Tensor, int, int]]) -> dict[str, Tensor]:
    """Pad regions and tokens; keep lengths, caption indices and image ids."""
    regions, tokens, indices, images = zip(*batch, strict=True)
    region_lengths = torch.tensor([r.shape[0] for r in regions])
    token_lengths = torch.tensor([t.shape[0] for t in tokens])
    padded_regions = torch.zeros(len(batch), int(region_lengths.max()), regions[0].shape[1])
    padded_tokens = torch.zeros(len(batch), int(token_lengths.max()), dtype=torch.long)
    for i, (r, t) in enumerate(zip(regions, tokens, strict=True)):
        padded_regions[i, : r.shape[0]] = r
        padded_tokens[i, : t.shape[0]] = t
    return {
        "regions": padded_regions,
        "region_lengths": region_lengths,
        "tokens": padded_tokens,
        "token_lengths": token_lengths,
        "index": torch.tensor(indices),
        "image_id": torch.tensor(images),
    }


class EpochSampler(Sampler[list[int]]):
    """Batches of a seeded per-epoch permutation, sharded over ranks, resumable mid-epoch.

    The permutation of epoch ``e`` depends on ``(seed, e)`` alone; rank ``r`` of ``w`` takes
    every ``w``-th batch-sized slice's ``r``-th part, so the union of the ranks' batches at a
    step is the single-process batch. ``start`` skips the first batches of the epoch.
    """

    def __init__(
        self,
        size: int,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size % world_size:
            raise ValueError(f"batch size {batch_size} must be divisible by the world size {world_size}")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.shuffle, self.drop_last = shuffle, drop_last
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    @property
    def batches_per_epoch(self) -> int:
        """The batches of a whole epoch (``len`` counts those left after ``start``)."""
        full = self.size // self.batch_size
        return full if self.drop_last or self.size % self.batch_size == 0 else full + 1

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start

    def __iter__(self) -> Iterator[list[int]]:
        if self.shuffle:
            order = torch.randperm(
                self.size, generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            ).tolist()
        else:
            order = list(range(self.size))
        local = self.batch_size // self.world_size
        for b in range(self.start, self.start + len(self)):
            batch = order[b * self.batch_size : (b + 1) * self.batch_size]
            yield batch[self.rank * local : (self.rank + 1) * local] if self.world_size > 1 else batch
