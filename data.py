"""Data for training and evaluation: a byte corpus and passkey documents, nothing downloaded.

The default corpus is the source text of the Python standard library that every Python
installation carries, read as bytes (vocabulary 256), split into train and validation by file
(a CRC32 of the relative path, so the split is the same on every machine with the same Python).
`--data` takes the user's own text files instead (split the same way when several are given;
a single file is split 95 / 5 by position).

Passkey documents follow the YaRN repository's protocol (after Landmark Attention), adapted to
bytes: filler text, the line "The pass key is N. Remember it. N is the pass key." at a chosen
depth, and the question "What is the pass key? The pass key is N" at the end.

Multi-stream data for a Moshi-format model: pre-encoded token arrays, `.npy` files of shape
[K, T] (the text stream, then the audio codebooks, as moshi-finetune stacks them; encode_dataset.py
writes them from moshi-finetune's audio dataset), split by file like text.
"""
import hashlib
import os
import sysconfig
import zlib
from dataclasses import dataclass

import numpy as np
import torch

VAL_EVERY = 20  # one file in 20 (by CRC32 of its path) is validation
KEY_DIGITS = 5


@dataclass
class Corpus:
    train: np.ndarray  # uint8 bytes
    val: np.ndarray
    files: int
    sha256: str  # of the sorted relative paths and contents: record it with every result

    def longest(self) -> int:
        """The longest training sequence both splits can give (one more byte is its target)."""
        return min(len(self.train), len(self.val)) - 1


def stdlib_files() -> tuple[str, list[str]]:
    """(root, sorted relative paths) of the standard library's .py files, site-packages excluded."""
    root = sysconfig.get_paths()["stdlib"]
    paths = []
    for directory, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in ("site-packages", "dist-packages", "__pycache__"))
        paths += [os.path.relpath(os.path.join(directory, f), root) for f in files if f.endswith(".py")]
    return root, sorted(paths)


def load_corpus(paths: list[str] | None = None) -> Corpus:
    """Reads the corpus: the given text files, or the standard library when `paths` is None.

    Raises ValueError with the offending path on unreadable, empty or non-UTF-8 files.
    """
    if paths is None:
        root, rel = stdlib_files()
        files = [(r, os.path.join(root, r)) for r in rel]
    else:
        files = [(os.path.basename(p), p) for p in paths]
    digest = hashlib.sha256()
    train, val = [], []
    for name, path in files:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise ValueError(f"cannot read data file {path}: {e.strerror}") from None
        if paths is not None:
            if not data:
                raise ValueError(f"data file {path} is empty")
            try:
                data.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"data file {path} is not UTF-8 text (byte {e.start})") from None
        digest.update(name.encode() + b"\0" + data + b"\0")
        is_val = zlib.crc32(name.encode()) % VAL_EVERY == 0
        (val if is_val else train).append(data)
    if paths is not None and len(files) == 1:  # one file: split by position
        data = train[0] if train else val[0]
        cut = int(len(data) * 0.95)
        train, val = [data[:cut]], [data[cut:]]
    join = lambda parts: np.frombuffer(b"\n".join(parts), dtype=np.uint8)
    corpus = Corpus(join(train), join(val), len(files), digest.hexdigest())
    if len(corpus.train) < 2 or len(corpus.val) < 2:
        raise ValueError(f"the corpus is too small: {len(corpus.train)} train and "
                         f"{len(corpus.val)} validation bytes")
    return corpus


def random_windows(data: np.ndarray, length: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` random windows of `length` bytes, [count, length] long."""
    if len(data) < length:
        raise ValueError(f"sequences of {length} bytes need a longer corpus ({len(data)} bytes)")
    starts = torch.randint(0, len(data) - length + 1, (count,), generator=generator)
    windows = [torch.from_numpy(data[s:s + length].astype(np.int64)) for s in starts.tolist()]
    return torch.stack(windows) if windows else torch.empty(0, length, dtype=torch.long)


def needle(key: int) -> bytes:
    return f"\nThe pass key is {key}. Remember it. {key} is the pass key.\n".encode()


def question() -> bytes:
    return b"\nWhat is the pass key? The pass key is "


def passkey_document(length: int, depth: float, key: int, filler: bytes) -> tuple[bytes, int, int]:
    """A passkey document of exactly `length` bytes, its last 5 bytes the answer.

    `depth` in [0, 1] places the needle's start at that fraction of the filler span; `filler`
    (at least the filler span long) is cut to fit. Returns (document, needle start, answer start).
    """
    if not 0 <= depth <= 1:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    if not 10 ** (KEY_DIGITS - 1) <= key < 10 ** KEY_DIGITS:
        raise ValueError(f"key must have {KEY_DIGITS} digits, got {key}")
    fixed = len(needle(key)) + len(question()) + KEY_DIGITS
    span = length - fixed
    if span < 0:
        raise ValueError(f"a passkey document needs at least {fixed} bytes, got length {length}")
    if len(filler) < span:
        raise ValueError(f"filler of {len(filler)} bytes is shorter than the {span} needed")
    at = round(depth * span)
    doc = filler[:at] + needle(key) + filler[at:span] + question() + str(key).encode()
    assert len(doc) == length
    return doc, at, length - KEY_DIGITS


def passkey_batch(data: np.ndarray, length: int, count: int, generator: torch.Generator,
                  depths: list[float] | None = None, max_depth: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` passkey documents with random keys, filler from random windows of `data`, and
    depths uniform in [0, max_depth] (or the given ones, one per document).
    Returns (tokens [count, length] long, keys [count] long)."""
    fixed = len(needle(10000)) + len(question()) + KEY_DIGITS
    filler = random_windows(data, max(length - fixed, 1), count, generator)
    keys = torch.randint(10 ** (KEY_DIGITS - 1), 10 ** KEY_DIGITS, (count,), generator=generator)
    if depths is None:
        depths = (torch.rand(count, generator=generator) * max_depth).tolist()
    docs = []
    for i in range(count):
        doc, _, _ = passkey_document(length, depths[i], int(keys[i]), bytes(filler[i].tolist()))
        docs.append(torch.frombuffer(bytearray(doc), dtype=torch.uint8).long())
    return torch.stack(docs), keys


def training_batch(data: np.ndarray, length: int, count: int, passkey_share: float,
                   generator: torch.Generator, max_depth: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of `length + 1` byte sequences (inputs and shifted targets), a share of them
    passkey documents (needle depths uniform in [0, max_depth]: below 1, only needles further
    from the question), and a mask of the targets that are passkey answer digits.
    Deterministic given the generator's state. Returns (tokens [count, length + 1] long,
    answer mask [count, length] bool)."""
    n_passkey = int(torch.binomial(torch.tensor(float(count)), torch.tensor(passkey_share),
                                   generator=generator)) if passkey_share > 0 else 0
    parts = [random_windows(data, length + 1, count - n_passkey, generator)]
    if n_passkey:
        parts.append(passkey_batch(data, length + 1, n_passkey, generator, max_depth=max_depth)[0])
    answer = torch.zeros(count, length, dtype=torch.bool)
    answer[count - n_passkey:, -KEY_DIGITS:] = True
    order = torch.randperm(count, generator=generator)
    return torch.cat(parts)[order], answer[order]


@dataclass
class TokenCorpus:
    train: list[np.ndarray]  # each [K, T] int64
    val: list[np.ndarray]
    files: int
    sha256: str

    def longest(self) -> int:
        """The longest window both splits can give: the longest array of the shorter split."""
        return min(max(a.shape[1] for a in self.train), max(a.shape[1] for a in self.val))


def load_token_arrays(paths: list[str], num_streams: int) -> TokenCorpus:
    """Reads `.npy` token arrays of shape [num_streams, T]; ValueError naming the bad file."""
    digest, train, val = hashlib.sha256(), [], []
    for path in paths:
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read token array {path}: {str(e).splitlines()[0][:100]}") from None
        if array.ndim != 2 or array.shape[0] != num_streams or array.shape[1] < 2:
            raise ValueError(f"token array {path} has shape {tuple(array.shape)}, expected "
                             f"[{num_streams}, T >= 2] (text stream, then the audio codebooks)")
        if not np.issubdtype(array.dtype, np.integer):
            raise ValueError(f"token array {path} holds {array.dtype}, expected integers")
        digest.update(os.path.basename(path).encode() + b"\0" + array.tobytes())
        is_val = len(paths) > 1 and zlib.crc32(os.path.basename(path).encode()) % VAL_EVERY == 0
        (val if is_val else train).append(array.astype(np.int64))
    if not val and len(train) > 1:  # no file fell in validation: hold out the last one
        val = [train.pop()]
    elif not val:  # a single file: hold out its last tenth
        cut = int(train[0].shape[1] * 0.9)
        val, train = [train[0][:, cut:]], [train[0][:, :cut]]
    return TokenCorpus(train, val, len(paths), digest.hexdigest())


def token_windows(arrays: list[np.ndarray], length: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` random windows of `length` steps from the arrays, [count, K, length] long."""
    usable = [a for a in arrays if a.shape[1] >= length]
    if not usable:
        raise ValueError(f"windows of {length} steps need a token array that long "
                         f"(longest: {max(a.shape[1] for a in arrays)})")
    picks = torch.randint(0, len(usable), (count,), generator=generator).tolist()
    windows = []
    for i in picks:
        start = int(torch.randint(0, usable[i].shape[1] - length + 1, (1,), generator=generator))
        windows.append(torch.from_numpy(usable[i][:, start:start + length]))
    return torch.stack(windows)
