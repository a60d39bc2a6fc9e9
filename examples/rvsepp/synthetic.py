"""A synthetic image-text data set in the SCAN / VSE-infinity "precomp" layout.

Images are scenes of 2-4 objects, each with a category, a colour, a size and a position.
Each image becomes ``regions`` region vectors of ``dim`` features, like bottom-up-attention
features: two or three regions per object (the whole object and parts of it), the rest
background regions of the scene. Five captions per image describe some of its objects with
varied wording and synonyms, so a caption often fits more than one image; and a quarter of
the images are *confusable twins* of another image of the same split, differing in one
object's colour, size or category.

The features have the statistics that decide whether hard negatives stall (see the
"Does SelHN help?" docs page): they are non-negative (post-ReLU), share a large mean
component (dimensions that are on in every region, whatever it shows), are sparse (most
content dimensions are zero), and include background regions that carry little about the
caption. ``shared`` scales the shared component and ``noise`` the per-region noise.

Files written under ``<root>/<name>_precomp/``: ``{train,dev,test}_ims.npy`` (float32,
N x regions x dim), ``{split}_caps.txt`` (5 consecutive lines per image), ``{split}_ids.txt``.

Run: ``python -m examples.rvsepp.synthetic --root data --train 1000 --dev 100 --test 100``.
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

NOUNS = [
    ("dog", "puppy"), ("cat", "kitten"), ("car", "vehicle"), ("bus", "coach"), ("bicycle", "bike"),
    ("horse", "pony"), ("bird", "bird"), ("boat", "ship"), ("chair", "seat"), ("table", "desk"),
    ("cup", "mug"), ("ball", "ball"), ("umbrella", "parasol"), ("kite", "kite"), ("bench", "bench"),
    ("tree", "tree"), ("lamp", "light"), ("bag", "backpack"), ("hat", "cap"), ("clock", "clock"),
    ("vase", "pot"), ("truck", "lorry"), ("sheep", "lamb"), ("cow", "calf"),
]  # fmt: skip
COLOURS = ["red", "blue", "green", "yellow", "black", "white", "brown", "orange"]
SIZES = [("small", "little"), ("large", "big"), ("tiny", "small")]
POSITIONS = [
    ("on the left", "at the left"), ("on the right", "at the right"), ("at the top", "up high"),
    ("at the bottom", "down low"), ("in the middle", "in the center"),
]  # fmt: skip
SCENES = [
    ("street", "road"),
    ("park", "garden"),
    ("beach", "shore"),
    ("kitchen", "kitchen"),
    ("field", "meadow"),
    ("room", "hall"),
]
SPLITS = ("train", "dev", "test")


@dataclass
class Config:
    """Everything that determines a generated data set (stored beside it as config.json)."""

    train: int = 1000
    dev: int = 100
    test: int = 100
    regions: int = 36
    dim: int = 2048
    shared: float = 1.0
    noise: float = 0.6
    twins: float = 0.25
    seed: int = 0


def _sample_scene(rng: random.Random) -> dict:
    count = rng.randint(2, 4)
    positions = rng.sample(range(len(POSITIONS)), count)
    return {
        "scene": rng.randrange(len(SCENES)),
        "objects": [
            {
                "noun": rng.randrange(len(NOUNS)),
                "colour": rng.randrange(len(COLOURS)),
                "size": rng.randrange(len(SIZES)),
                "pos": p,
            }
            for p in positions
        ],
    }


def _twin(scene: dict, rng: random.Random) -> dict:
    """The same scene with one attribute of one object changed."""
    twin = {"scene": scene["scene"], "objects": [dict(o) for o in scene["objects"]]}
    obj = rng.choice(twin["objects"])
    field, choices = rng.choice([("colour", len(COLOURS)), ("size", len(SIZES)), ("noun", len(NOUNS))])
    obj[field] = rng.choice([v for v in range(choices) if v != obj[field]])
    return twin


def _phrase(obj: dict, rng: random.Random) -> str:
    words = []
    if rng.random() < 0.5:
        words.append(rng.choice(SIZES[obj["size"]]))
    if rng.random() < 0.8:
        words.append(COLOURS[obj["colour"]])
    words.append(rng.choice(NOUNS[obj["noun"]]))
    text = rng.choice(["a", "one", "a", "the"]) + " " + " ".join(words)
    if rng.random() < 0.4:
        text += " " + rng.choice(POSITIONS[obj["pos"]])
    return text


def caption(scene: dict, rng: random.Random) -> str:
    """One caption: 1-3 of the objects, a random subset of their attributes, varied wording."""
    objects = rng.sample(scene["objects"], rng.randint(1, min(3, len(scene["objects"]))))
    phrases = [_phrase(o, rng) for o in objects]
    body = phrases[0]
    for phrase in phrases[1:]:
        body += " " + rng.choice(["and", "next to", "with", "beside", "near"]) + " " + phrase
    if rng.random() < 0.4:
        body += " " + rng.choice(["in a", "on a", "at a"]) + " " + rng.choice(SCENES[scene["scene"]])
    opening = rng.choice(["", "there is ", "a photo of ", "this picture shows ", "an image with ", "we see "])
    text = opening + body
    return text[0].upper() + text[1:] + rng.choice([".", " .", ""])


class _Prototypes:
    """Sparse non-negative content directions, and the shared always-on component."""

    def __init__(self, config: Config, generator: torch.Generator) -> None:
        dim = config.dim

        def sparse(rows: int, density: float, scale: float) -> torch.Tensor:
            on = torch.rand(rows, dim, generator=generator) < density
            values = torch.empty(rows, dim).log_normal_(0.0, 0.5, generator=generator) * scale
            return values * on

        self.noun = sparse(len(NOUNS), 0.04, 1.6)
        self.colour = sparse(len(COLOURS), 0.03, 1.2)
        self.size = sparse(len(SIZES), 0.02, 1.0)
        self.pos = sparse(len(POSITIONS), 0.02, 0.8)
        self.part = sparse(3, 0.03, 0.8)  # whole object / part / other part
        self.scene = sparse(len(SCENES), 0.06, 1.0)
        self.background = sparse(12, 0.05, 1.0)
        # a quarter of the dimensions are on in every region (the shared mean), the rest are
        # biased below zero so that the ReLU leaves them sparse
        always = torch.rand(dim, generator=generator) < 0.25
        level = torch.empty(dim).log_normal_(0.0, 0.4, generator=generator) * config.shared
        self.bias = torch.where(always, level, torch.full((dim,), -0.5))


def _features(
    scenes: list[dict], protos: _Prototypes, config: Config, generator: torch.Generator, rng: random.Random
) -> torch.Tensor:
    """(len(scenes), regions, dim) float32 region features, built with index arithmetic."""
    obj_flag, noun, colour, size, pos, part, scene, background, scale = ([] for _ in range(9))
    for s in scenes:
        rows = 0
        for obj in s["objects"]:
            for p in range(rng.randint(2, 3)):
                if rows < config.regions:
                    obj_flag.append(1.0)
                    noun.append(obj["noun"]), colour.append(obj["colour"]), size.append(obj["size"])
                    pos.append(obj["pos"]), part.append(p), background.append(0), scale.append(1.0 if p == 0 else 0.6)
                    scene.append(s["scene"])
                    rows += 1
        for _ in range(config.regions - rows):
            obj_flag.append(0.0)
            noun.append(0), colour.append(0), size.append(0), pos.append(0), part.append(0)
            background.append(rng.randrange(len(protos.background))), scale.append(rng.uniform(0.3, 1.0))
            scene.append(s["scene"])

    def take(table: torch.Tensor, index: list[int]) -> torch.Tensor:
        return table.index_select(0, torch.tensor(index))

    is_object = torch.tensor(obj_flag).unsqueeze(1)
    factor = torch.tensor(scale).unsqueeze(1)
    objects = factor * (
        take(protos.noun, noun) + take(protos.colour, colour) + take(protos.size, size) + take(protos.pos, pos)
    )
    objects = objects + take(protos.part, part)
    backgrounds = take(protos.scene, scene) + take(protos.background, background) * factor
    content = is_object * objects + (1 - is_object) * backgrounds
    content += protos.bias
    content += torch.randn(content.shape, generator=generator) * config.noise
    return torch.relu_(content).view(len(scenes), config.regions, config.dim)


def generate(root: str | Path, name: str = "synthetic", config: Config | None = None, chunk: int = 256) -> Path:
    """Write a data set; returns its ``<root>/<name>_precomp`` folder."""
    config = config or Config()
    folder = Path(root) / f"{name}_precomp"
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(config.seed)
    rng = random.Random(config.seed)
    protos = _Prototypes(config, generator)
    for split in SPLITS:
        count = getattr(config, split)
        scenes: list[dict] = []
        while len(scenes) < count:
            scene = _sample_scene(rng)
            scenes.append(scene)
            if len(scenes) < count and rng.random() < config.twins:
                scenes.append(_twin(scene, rng))
        order = list(range(count))
        rng.shuffle(order)  # twins are not neighbours
        scenes = [scenes[i] for i in order]
        images = np.lib.format.open_memmap(
            folder / f"{split}_ims.npy.tmp", mode="w+", dtype=np.float32, shape=(count, config.regions, config.dim)
        )
        for start in range(0, count, chunk):
            images[start : start + chunk] = _features(
                scenes[start : start + chunk], protos, config, generator, rng
            ).numpy()
        images.flush()
        del images
        (folder / f"{split}_ims.npy.tmp").replace(folder / f"{split}_ims.npy")
        lines = [caption(scene, rng) for scene in scenes for _ in range(5)]
        (folder / f"{split}_caps.txt").write_text("\n".join(lines) + "\n")
        (folder / f"{split}_ids.txt").write_text("\n".join(str(i) for i in range(count)) + "\n")
    (folder / "config.json").write_text(json.dumps(asdict(config), indent=1))
    return folder


def ensure(root: str | Path, name: str = "synthetic", config: Config | None = None) -> Path:
    """Generate the data set unless the same configuration is already on disk."""
    config = config or Config()
    folder = Path(root) / f"{name}_precomp"
    stored = folder / "config.json"
    if stored.is_file() and json.loads(stored.read_text()) == asdict(config):
        return folder
    print(f"generating the synthetic data set in {folder} ({config.train}/{config.dev}/{config.test} images)")
    return generate(root, name, config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="data")
    parser.add_argument("--name", default="synthetic")
    for field, value in asdict(Config()).items():
        parser.add_argument(f"--{field}", type=type(value), default=value)
    args = parser.parse_args()
    config = Config(**{k: getattr(args, k) for k in asdict(Config())})
    print(generate(args.root, args.name, config))


if __name__ == "__main__":
    main()
