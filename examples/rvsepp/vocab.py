"""Vocabulary in the SCAN / VSE-infinity JSON format, and a tokeniser that needs no downloads.

The JSON file holds ``word2idx``, ``idx2word`` (keys are the indices as strings) and ``idx``
(the size). ``<pad>`` = 0, ``<start>`` = 1, ``<end>`` = 2, ``<unk>`` = 3 come first; words
of the train and dev captions with count >= 4 follow; ``<mask>`` (the token augmentation's
mask) is appended when a vocabulary is loaded, as VSE-infinity's loader does.

:func:`tokenize` lower-cases and splits words from punctuation with one regular expression.
It differs from nltk's ``word_tokenize`` (which needs its "punkt" data, not available
offline) in three places: contractions stay whole ("don't" is one token, nltk gives "do",
"n't"), quotes stay plain '"' (nltk turns them into `` and ''), and a period inside a
sentence is always split off (nltk keeps "mr." and "e.g." together). On image captions these
cases are rare: a vocabulary built here differs from nltk's only in those few tokens, and a
vocabulary file built with nltk still loads (its words are looked up as they are; the rare
split contraction parts map to ``<unk>``).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

PAD, START, END, UNK, MASK = "<pad>", "<start>", "<end>", "<unk>", "<mask>"
SPECIALS = (PAD, START, END, UNK)

_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)*|[^\sa-z0-9]")


def tokenize(text: str) -> list[str]:
    """Lower-cased word and punctuation tokens: ``"A dog, running."`` -> a dog , running ."""
    return _TOKEN.findall(text.lower())


class Vocabulary:
    """Word <-> index maps in the SCAN JSON format."""

    def __init__(self, words: Iterable[str]) -> None:
        self.word2idx: dict[str, int] = {}
        self.idx2word: dict[int, str] = {}
        for word in words:
            self.add(word)

    def add(self, word: str) -> int:
        if word not in self.word2idx:
            index = len(self.word2idx)
            self.word2idx[word] = index
            self.idx2word[index] = word
        return self.word2idx[word]

    def __len__(self) -> int:
        return len(self.word2idx)

    def __call__(self, word: str) -> int:
        return self.word2idx.get(word, self.word2idx[UNK])

    def encode(self, caption: str) -> list[int]:
        """``<start>`` + token indices + ``<end>``."""
        return [self.word2idx[START], *(self(w) for w in tokenize(caption)), self.word2idx[END]]

    def signature(self) -> list[str]:
        """The words in index order (stored in checkpoints to detect a mismatching vocabulary)."""
        return [self.idx2word[i] for i in range(len(self))]

    @classmethod
    def build(cls, captions: Iterable[str], threshold: int = 4) -> Vocabulary:
        """Words with count >= ``threshold``, most frequent first (ties alphabetical)."""
        counts = Counter(word for caption in captions for word in tokenize(caption))
        words = sorted((w for w, c in counts.items() if c >= threshold), key=lambda w: (-counts[w], w))
        return cls([*SPECIALS, *(w for w in words if w not in SPECIALS)])

    def save(self, path: str | Path) -> None:
        """Write the SCAN JSON format (without ``<mask>``, which loading appends)."""
        words = [w for w in self.signature() if w != MASK]
        data = {
            "word2idx": {w: i for i, w in enumerate(words)},
            "idx2word": {str(i): w for i, w in enumerate(words)},
            "idx": len(words),
        }
        Path(path).write_text(json.dumps(data))

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        """Read a SCAN JSON vocabulary and append ``<mask>``."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"vocabulary file not found: {path}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{path} is not a readable vocabulary (not UTF-8 JSON: {error})") from None
        if not isinstance(data, dict) or not isinstance(data.get("idx2word"), dict):
            raise ValueError(f"{path} is not a SCAN-format vocabulary (no 'idx2word' map)")
        table = data["idx2word"]
        words = []
        for index in range(len(table)):
            word = table.get(str(index))
            if not isinstance(word, str):
                raise ValueError(
                    f"{path}: 'idx2word' must map every index from 0 to {len(table) - 1} to a word, "
                    f"but index {index} {'is missing' if word is None else f'maps to {word!r}'}"
                )
            words.append(word)
        missing = [s for s in SPECIALS if s not in words]
        if missing:
            raise ValueError(f"{path} lacks the special tokens {missing}")
        first_index: dict[str, int] = {}
        for index, word in enumerate(words):
            if word in first_index:  # one index per word, or every later word's index shifts
                raise ValueError(
                    f"{path}: the word {word!r} has two indices ({first_index[word]} and {index}); a vocabulary "
                    "maps each word to one index"
                )
            first_index[word] = index
        vocab = cls(words)
        vocab.add(MASK)
        return vocab
