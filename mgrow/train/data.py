"""Byte-level corpus in megatron-core's indexed dataset format, and the batches cut from it.

The default text is the licence collection every Debian machine ships in
/usr/share/common-licenses (about 260 KB of English): nothing is downloaded.
A folder source is read recursively for files matching ``pattern`` (``.gz``
files are decompressed), leaving out paths with an ``exclude`` part: the
efficiency study's corpus is the kernel documentation of Debian's
``linux-doc-6.1`` (``*.rst.gz`` without ``translations``, 21 MB of English).
Tokens are bytes (vocab 256); each document ends with byte 0, which no text uses.
``build_corpus`` writes ``<prefix>_train`` and ``<prefix>_valid`` (.bin/.idx); the
last ``valid_fraction`` of every document goes to validation.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import numpy as np

from mgrow.core.errors import ConfigError

if TYPE_CHECKING:  # torch is imported where tensors are made: checking a config's data paths does not need it
    import torch

DEFAULT_SOURCES = ["/usr/share/common-licenses"]
EOD = 0
BYTE_VOCAB = 256


def _text_files(sources: Iterable[str], pattern: str = "*", exclude: Iterable[str] = ()) -> list[Path]:
    files: list[Path] = []
    exclude = set(exclude)
    for source in sources:
        path = Path(source)
        if path.is_dir():
            files.extend(p.resolve() for p in path.rglob(pattern)
                         if p.is_file() and not exclude & set(p.relative_to(path).parts))
        elif path.is_file():
            files.append(path.resolve())
        else:
            raise ConfigError("data.sources", f"{source} is neither a file nor a folder")
    unique = sorted(set(files))  # folders hold symlinks to the same licence
    if not unique:
        raise ConfigError("data.sources", "no text files found")
    return unique


def _read(path: Path) -> bytes:
    return gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()


def build_corpus(prefix: str, sources: Iterable[str] = DEFAULT_SOURCES, valid_fraction: float = 0.05,
                 pattern: str = "*", exclude: Iterable[str] = ()) -> str:
    """Tokenize ``sources`` into ``prefix``_train/_valid indexed datasets; returns ``prefix``."""
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    builders = {split: IndexedDatasetBuilder(f"{prefix}_{split}.bin", dtype=np.uint8) for split in ("train", "valid")}
    for path in _text_files(sources, pattern, exclude):
        data = np.frombuffer(_read(path).replace(b"\x00", b""), dtype=np.uint8)
        cut = int(len(data) * (1 - valid_fraction))
        for split, part in (("train", data[:cut]), ("valid", data[cut:])):
            builders[split].add_document(torch.from_numpy(np.append(part, EOD).astype(np.uint8)), [len(part) + 1])
    for split, builder in builders.items():
        builder.finalize(f"{prefix}_{split}.idx")
    return prefix


def ensure_corpus(prefix: str, sources: Iterable[str] = DEFAULT_SOURCES) -> None:
    """Build the corpus once (rank 0 of a job calls this before the others read it)."""
    if not all(os.path.exists(f"{prefix}_{s}.{ext}") for s in ("train", "valid") for ext in ("bin", "idx")):
        tmp = f"{prefix}.tmp{os.getpid()}"
        build_corpus(tmp, sources)
        for split in ("train", "valid"):
            for ext in ("bin", "idx"):
                os.replace(f"{tmp}_{split}.{ext}", f"{prefix}_{split}.{ext}")


def check_corpus(prefix: str, field: str = "data.path") -> None:
    for split in ("train", "valid"):
        for ext in ("bin", "idx"):
            path = f"{prefix}_{split}.{ext}"
            if not os.path.exists(path):
                raise ConfigError(field, f"missing data file {path} (run `mgrow data --out {prefix}`)")
            if not os.path.isfile(path):
                raise ConfigError(field, f"data file {path} is not a file")


class TokenWindows:
    """Fixed-length training samples from one split, in a seeded shuffled order.

    Sample ``i`` is ``seq_length + 1`` consecutive tokens of the concatenated
    split; windows do not overlap, and the order is reshuffled every epoch. The
    position in the stream is a plain sample count, so a run can resume or
    change its batch size without repeating or skipping data.
    """

    def __init__(self, prefix: str, split: str, seq_length: int, seed: int):
        import torch
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        dataset = IndexedDataset(f"{prefix}_{split}")
        self.tokens = torch.from_numpy(np.concatenate([dataset[i] for i in range(len(dataset))]).astype(np.int64))
        self.seq_length = seq_length
        self.windows = (len(self.tokens) - 1) // seq_length
        if self.windows < 1:
            raise ConfigError("train.seq_length", f"{seq_length} is longer than the {split} split")
        self.seed = seed
        self._orders: dict[int, torch.Tensor] = {}

    def _order(self, epoch: int) -> torch.Tensor:
        import torch

        if epoch not in self._orders:
            generator = torch.Generator(device="cpu").manual_seed(self.seed + epoch)
            self._orders[epoch] = torch.randperm(self.windows, generator=generator, device="cpu")
        return self._orders[epoch]

    def samples(self, start: int, count: int) -> torch.Tensor:
        """Samples ``start .. start+count-1`` of the stream as a [count, seq_length+1] tensor."""
        import torch

        rows = []
        for i in range(start, start + count):
            epoch, j = divmod(i, self.windows)
            w = int(self._order(epoch)[j])
            rows.append(self.tokens[w * self.seq_length : w * self.seq_length + self.seq_length + 1])
        return torch.stack(rows)
