"""A synthetic image-text data set in the SCAN / VSE-infinity "precomp" layout.

Images are scenes of 2-4 objects, each with a category, a colour, a size and a position.
Each image becomes ``regions`` region vectors of ``dim`` features, like bottom-up-attention
features: two or three regions per object (the whole object and parts of it), the rest
background regions of the scene. Five captions per image describe some of its objects with
varied wording and synonyms, so a caption often fits more than one image; and a quarter of
the images are *confusable twins* of another image of the same split, differing in one
object's colour, size or category.

Two knobs make the set behave like real captioned images (see the Results docs page):
``specific`` is the share of captions that describe the whole scene (every object with its
size, colour and position, and the scene), as COCO / Flickr30K captions do, so that they
rarely fit another image; ``variants`` is the number of near-duplicates made of a twinned
scene, so that the top of the ranking is decided by one attribute, as between real
near-duplicate photos. :func:`false_negatives` measures how often an in-batch negative's
image is described by the anchor's caption just as well (a *false negative*).

The features have the statistics that decide whether hard negatives stall (see the
"Does SelHN help?" docs page): they are non-negative (post-ReLU), share a large mean
component (dimensions that are on in every region, whatever it shows), are sparse (most
content dimensions are zero), and include background regions that carry little about the
caption. ``shared`` scales the shared component and ``noise`` the per-region noise.

Files written under ``<root>/<name>_precomp/``: ``{train,dev,test}_ims.npy`` (float32,
N x regions x dim), ``{split}_caps.txt`` (5 consecutive lines per image), ``{split}_ids.txt``,
``{split}_content.json`` (each image's scene and what each caption says of it) and
``config.json``. A regenerated set removes the ``vocab.json`` built from the previous one.

Run: ``python -m examples.rvsepp.synthetic --root data --train 1000 --dev 100 --test 100``;
``--measure`` prints the in-batch false-negative rates of the set at ``--batch-size``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from examples.rvsepp.data import DataError

NOUNS = [
    ("dog", "puppy"),
    ("cat", "kitten"),
    ("car", "vehicle"),
    ("bus", "coach"),
    ("bicycle", "bike"),
    ("horse", "pony"),
    ("bird", "bird"),
    ("boat", "ship"),
    ("chair", "seat"),
    ("table", "desk"),
    ("cup", "mug"),
    ("ball", "ball"),
    ("umbrella", "parasol"),
    ("kite", "kite"),
    ("bench", "bench"),
    ("tree", "tree"),
    ("lamp", "light"),
    ("bag", "backpack"),
    ("hat", "cap"),
    ("clock", "clock"),
    ("vase", "pot"),
    ("truck", "lorry"),
    ("sheep", "lamb"),
    ("cow", "calf"),
]
COLOURS = ["red", "blue", "green", "yellow", "black", "white", "brown", "orange"]
SIZES = [("small", "little"), ("large", "big"), ("tiny", "small")]
POSITIONS = [
    ("on the left", "at the left"),
    ("on the right", "at the right"),
    ("at the top", "up high"),
    ("at the bottom", "down low"),
    ("in the middle", "in the center"),
]
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
    specific: float = 0.0
    variants: int = 1

    def __post_init__(self) -> None:
        for name in ("train", "dev", "test", "regions", "dim", "variants"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name in SPLITS else 1):
                low = "a non-negative" if name in SPLITS else "a positive"
                raise ValueError(f"synthetic {name} must be {low} integer, got {value!r}")
        for name in ("shared", "noise"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"synthetic {name} must be a finite number >= 0, got {value!r}")
        for name in ("twins", "specific"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"synthetic {name} is a probability, so in [0, 1], got {value!r}")


@dataclass(frozen=True)
class Mention:
    """What one caption says: per object phrase the values each attribute's word allows
    (``None``: not mentioned), and the scenes its scene word allows (``None``: no scene).

    Words are sets because synonyms overlap ("small" names two sizes): a caption fits an
    image when each phrase is matched by one of its objects and the scene is allowed.
    """

    phrases: tuple[tuple[frozenset[int] | None, ...], ...]
    scene: frozenset[int] | None = None

    def to_json(self) -> dict:
        def plain(values: frozenset[int] | None) -> list[int] | None:
            return None if values is None else sorted(values)

        return {"phrases": [[plain(v) for v in p] for p in self.phrases], "scene": plain(self.scene)}

    @staticmethod
    def from_json(data: dict) -> Mention:
        def sets(values: list[int] | None) -> frozenset[int] | None:
            return None if values is None else frozenset(values)

        return Mention(tuple(tuple(sets(v) for v in p) for p in data["phrases"]), sets(data["scene"]))


ATTRIBUTES = ("noun", "colour", "size", "pos")


def _meanings(table: list) -> dict[str, frozenset[int]]:
    """word -> the indices of every entry of ``table`` that the word can name."""
    out: dict[str, set[int]] = {}
    for index, entry in enumerate(table):
        for word in (entry,) if isinstance(entry, str) else entry:
            out.setdefault(word, set()).add(index)
    return {word: frozenset(indices) for word, indices in out.items()}


_NOUN, _COLOUR, _SIZE = _meanings(NOUNS), _meanings(COLOURS), _meanings(SIZES)
_POS, _SCENE = _meanings(POSITIONS), _meanings(SCENES)


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


def _phrase(obj: dict, rng: random.Random, full: bool = False) -> tuple[str, tuple[frozenset[int] | None, ...]]:
    """An object phrase and what it says; ``full``: size, colour and position always."""
    words = []
    size = colour = pos = None
    if full or rng.random() < 0.5:
        words.append(rng.choice(SIZES[obj["size"]]))
        size = _SIZE[words[-1]]
    if full or rng.random() < 0.8:
        words.append(COLOURS[obj["colour"]])
        colour = _COLOUR[words[-1]]
    words.append(rng.choice(NOUNS[obj["noun"]]))
    noun = _NOUN[words[-1]]
    text = rng.choice(["a", "one", "a", "the"]) + " " + " ".join(words)
    if full or rng.random() < 0.4:
        where = rng.choice(POSITIONS[obj["pos"]])
        text += " " + where
        pos = _POS[where]
    return text, (noun, colour, size, pos)


def describe(scene: dict, rng: random.Random, specific: float = 0.0) -> tuple[str, Mention]:
    """One caption and what it says. With probability ``specific`` it describes the whole
    scene (every object, in random order, with size, colour and position, and the scene);
    otherwise 1-3 of the objects with a random subset of their attributes. Varied wording."""
    full = specific > 0 and rng.random() < specific
    if full:
        objects = list(scene["objects"])
        rng.shuffle(objects)
    else:
        objects = rng.sample(scene["objects"], rng.randint(1, min(3, len(scene["objects"]))))
    phrases = [_phrase(o, rng, full) for o in objects]
    body = phrases[0][0]
    for text, _ in phrases[1:]:
        body += " " + rng.choice(["and", "next to", "with", "beside", "near"]) + " " + text
    where = None
    if full or rng.random() < 0.4:
        preposition = rng.choice(["in a", "on a", "at a"])
        word = rng.choice(SCENES[scene["scene"]])
        body += " " + preposition + " " + word
        where = _SCENE[word]
    opening = rng.choice(["", "there is ", "a photo of ", "this picture shows ", "an image with ", "we see "])
    text = opening + body
    return text[0].upper() + text[1:] + rng.choice([".", " .", ""]), Mention(tuple(p for _, p in phrases), where)


def caption(scene: dict, rng: random.Random, specific: float = 0.0) -> str:
    """One caption of ``scene`` (see :func:`describe`)."""
    return describe(scene, rng, specific)[0]


def fits(mention: Mention, scene: dict) -> bool:
    """Whether a caption that says ``mention`` describes ``scene`` (literal definition)."""
    if mention.scene is not None and scene["scene"] not in mention.scene:
        return False
    return all(
        any(
            all(allowed is None or obj[attr] in allowed for attr, allowed in zip(ATTRIBUTES, phrase, strict=True))
            for obj in scene["objects"]
        )
        for phrase in mention.phrases
    )


def fit_matrix(mentions: list[Mention], scenes: list[dict]) -> np.ndarray:
    """(len(mentions), len(scenes)) bool: caption i fits image j (:func:`fits`, vectorised)."""
    slots = max((len(s["objects"]) for s in scenes), default=0)
    values = np.full((len(scenes), slots, len(ATTRIBUTES)), -1, dtype=np.int64)
    for j, s in enumerate(scenes):
        for k, obj in enumerate(s["objects"]):
            values[j, k] = [obj[a] for a in ATTRIBUTES]
    present = values[:, :, 0] >= 0
    scene_of = np.array([s["scene"] for s in scenes], dtype=np.int64)
    sizes = [len(NOUNS), len(COLOURS), len(SIZES), len(POSITIONS)]
    out = np.ones((len(mentions), len(scenes)), dtype=bool)
    for i, mention in enumerate(mentions):
        row = out[i]
        if mention.scene is not None:
            row &= np.isin(scene_of, list(mention.scene))
        for phrase in mention.phrases:
            match = present.copy()
            for a, allowed in enumerate(phrase):
                if allowed is not None:
                    table = np.zeros(sizes[a] + 1, dtype=bool)  # the last entry: index -1, no object
                    table[list(allowed)] = True
                    match &= table[values[:, :, a]]
            row &= match.any(axis=1)
    return out


def false_negatives(
    mentions: list[Mention], scenes: list[dict], batch_size: int = 128, per_image: int = 5
) -> dict[str, float]:
    """In-batch false negatives of a split under uniformly shuffled batches of captions.

    Caption ``c`` belongs to image ``c // per_image``. A batch is ``batch_size`` captions drawn
    without replacement (as :class:`~examples.rvsepp.data.EpochSampler` does); every other
    caption of the batch gives the anchor a negative (its image, or itself for an image
    anchor). Exact expectations, no sampling:

    * ``negative_share``: share of those negatives whose image the anchor's caption fits
      although it is another image (content false negatives);
    * ``same_image_share``: share that are another caption of the anchor's own image (what
      ``--mask-duplicates`` removes);
    * ``captions_with_one``: share of captions whose batch holds at least one content false
      negative;
    * ``per_caption``: expected number of content false negatives in a caption's batch.
    """
    if len(mentions) != per_image * len(scenes):
        raise ValueError(f"{len(mentions)} captions for {len(scenes)} images: expected {per_image} per image")
    if not 2 <= batch_size <= len(mentions):
        raise ValueError(f"batch_size must be in [2, {len(mentions)}] (the captions of the split), got {batch_size}")
    fit = fit_matrix(mentions, scenes)
    own = np.arange(len(mentions)) // per_image
    if not fit[np.arange(len(mentions)), own].all():
        raise ValueError("a caption does not fit its own image: the mentions and scenes do not belong together")
    fit[np.arange(len(mentions)), own] = False
    others = len(mentions) - 1
    bad = per_image * fit.sum(axis=1).astype(np.float64)  # other captions whose image the anchor fits
    none_in_batch = np.ones_like(bad)
    for k in range(batch_size - 1):
        none_in_batch *= np.clip(others - bad - k, 0, None) / (others - k)
    return {
        "negative_share": float(bad.mean() / others),
        "same_image_share": (per_image - 1) / others,
        "captions_with_one": float(1.0 - none_in_batch.mean()),
        "per_caption": float((batch_size - 1) * bad.mean() / others),
    }


def load_content(folder: str | Path, split: str) -> tuple[list[Mention], list[dict]]:
    """The captions' mentions and the scenes of a generated split."""
    data = json.loads((Path(folder) / f"{split}_content.json").read_text())
    return [Mention.from_json(m) for m in data["mentions"]], data["scenes"]


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
    (folder / "config.json").unlink(missing_ok=True)  # a half-written set never looks complete
    (folder / "vocab.json").unlink(missing_ok=True)  # built from the previous captions
    for split in SPLITS:
        count = getattr(config, split)
        scenes: list[dict] = []
        while len(scenes) < count:
            scene = _sample_scene(rng)
            scenes.append(scene)
            if len(scenes) < count and rng.random() < config.twins:
                for _ in range(config.variants):
                    if len(scenes) < count:
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
        described = [describe(scene, rng, config.specific) for scene in scenes for _ in range(5)]
        (folder / f"{split}_caps.txt").write_text("".join(text + "\n" for text, _ in described))
        content = {"scenes": scenes, "mentions": [m.to_json() for _, m in described]}
        (folder / f"{split}_content.json").write_text(json.dumps(content, separators=(",", ":")))
        (folder / f"{split}_ids.txt").write_text("".join(f"{i}\n" for i in range(count)))
    (folder / "config.json").write_text(json.dumps(asdict(config), indent=1))
    return folder


def ensure(root: str | Path, name: str = "synthetic", config: Config | None = None) -> Path:
    """Generate the data set unless it is already on disk; a data set made with other settings
    is refused, never rewritten: runs trained on it would evaluate to other numbers."""
    config = config or Config()
    folder = Path(root) / f"{name}_precomp"
    stored = folder / "config.json"
    if stored.is_file():
        try:
            on_disk = json.loads(stored.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise DataError(f"{stored}: cannot be read as the data set's settings ({error})") from None
        if on_disk == asdict(config):
            return folder
        wanted = asdict(config)
        differ = sorted(k for k in set(wanted) | set(on_disk) if on_disk.get(k) != wanted.get(k))
        listed = ", ".join(f"{k} {on_disk.get(k)!r} there, {wanted.get(k)!r} asked" for k in differ[:6])
        raise DataError(
            f"{folder} holds the synthetic data set made with other settings ({listed}): runs trained on it "
            "would evaluate to other numbers if it were rewritten. Give this run another --root, or delete the "
            "folder to regenerate it."
        )
    print(f"generating the synthetic data set in {folder} ({config.train}/{config.dev}/{config.test} images)")
    try:
        return generate(root, name, config)
    except OSError as error:  # a read-only or full --root
        raise DataError(
            f"cannot write the synthetic data set to {folder}: {error.strerror or error}; give a writable --root"
        ) from None


def report(folder: str | Path, batch_size: int = 128) -> str:
    """One line per split: its in-batch false-negative rates (:func:`false_negatives`)."""
    lines = []
    for split in SPLITS:
        mentions, scenes = load_content(folder, split)
        if len(mentions) < batch_size:
            lines.append(f"{split}: fewer than {batch_size} captions")
            continue
        r = false_negatives(mentions, scenes, batch_size)
        lines.append(
            f"{split}: at batch {batch_size}, {100 * r['negative_share']:.2f}% of in-batch negatives are "
            f"false (the anchor's caption fits them), {100 * r['captions_with_one']:.1f}% of captions have at "
            f"least one ({r['per_caption']:.2f} on average); {100 * r['same_image_share']:.2f}% are another "
            "caption of the same image"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--root", default="data")
    parser.add_argument("--name", default="synthetic")
    parser.add_argument("--measure", action="store_true", help="print the in-batch false-negative rates")
    parser.add_argument("--batch-size", type=int, default=128, help="the batch size of --measure")
    for name, value in asdict(Config()).items():
        parser.add_argument(f"--{name}", type=type(value), default=value)
    args = parser.parse_args(argv)
    try:
        config = Config(**{k: getattr(args, k) for k in asdict(Config())})
    except ValueError as error:
        parser.error(str(error))
    folder = ensure(args.root, args.name, config)
    print(folder)
    if args.measure:
        print(report(folder, args.batch_size))


if __name__ == "__main__":
    main()
