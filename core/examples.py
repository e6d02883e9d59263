"""Tokenized examples stored flat: one token array, one loss-mask array and offsets, so a
data set costs ~5 bytes a token (not a Python object per example or a padded array per
epoch). A large set is spilled to a temporary file and memory-mapped, so host memory stays
far below the set's size; batches are cut from it on demand (core/data.py).

An `ExampleSet` is a sequence of `Example` views; subsets (the validation split) are index
arrays over the same storage."""

from __future__ import annotations

import os
import tempfile
from array import array
from dataclasses import dataclass

import numpy as np

SPILL_TOKENS = 1 << 18  # tokens kept in memory (~1.3 MiB) before the store moves to disk


@dataclass
class Example:
    input_ids: np.ndarray  # int32 (L,)
    loss_mask: np.ndarray  # bool (L,): token i is a target (predicted from tokens < i)
    source: str  # "file:line"


class ExampleSet:
    """Examples `index[k]` of flat storage: tokens[offsets[i]:offsets[i + 1]] with its mask;
    sources kept as (template id, number) pairs, formatted when asked."""

    def __init__(self, tokens, mask, offsets, templates, where_t, where_n, index=None):
        self.tokens, self.mask, self.offsets = tokens, mask, offsets
        self.templates = templates
        self.where_t, self.where_n = where_t, where_n
        self.index = np.arange(len(offsets) - 1, dtype=np.int64) if index is None else index

    @classmethod
    def from_examples(cls, examples) -> "ExampleSet":
        if isinstance(examples, ExampleSet):
            return examples
        b = ExampleSetBuilder()
        for e in examples:
            b.add(e.input_ids, e.loss_mask, e.source)
        return b.finish()

    def __len__(self) -> int:
        return int(self.index.size)

    def lengths(self) -> np.ndarray:
        """Tokens of each example, in this set's order (int64)."""
        return self.offsets[self.index + 1] - self.offsets[self.index]

    def lengths_of(self, ks) -> np.ndarray:
        """Tokens of examples ks."""
        i = self.index[ks]
        return self.offsets[i + 1] - self.offsets[i]

    def span(self, k: int) -> tuple[int, int]:
        i = int(self.index[k])
        return int(self.offsets[i]), int(self.offsets[i + 1])

    def source(self, k: int) -> str:
        i = int(self.index[k])
        t, n = self.templates[self.where_t[i]], int(self.where_n[i])
        return t.format(n) if n >= 0 else t

    def __getitem__(self, k) -> Example:
        if isinstance(k, slice):
            return self.subset(np.arange(len(self))[k])
        if k < 0:
            k += len(self)
        if not 0 <= k < len(self):
            raise IndexError(k)
        a, b = self.span(k)
        return Example(np.asarray(self.tokens[a:b]), np.asarray(self.mask[a:b]), self.source(k))

    def __iter__(self):
        return (self[k] for k in range(len(self)))

    def subset(self, ks) -> "ExampleSet":
        """Examples ks of this set (in that order), sharing the storage."""
        return ExampleSet(self.tokens, self.mask, self.offsets, self.templates, self.where_t,
                          self.where_n, self.index[np.asarray(ks, dtype=np.int64)])

    def token_range(self) -> tuple[int, int]:
        """(lowest, highest) token id of the examples, or (0, -1) when there are none."""
        if not len(self):
            return 0, -1
        if len(self) == len(self.offsets) - 1:
            ids = self.tokens
            return (int(ids.min()), int(ids.max())) if ids.size else (0, -1)
        lo, hi = None, None
        for k in range(len(self)):
            a, b = self.span(k)
            if b > a:
                part = self.tokens[a:b]
                lo = int(part.min()) if lo is None else min(lo, int(part.min()))
                hi = int(part.max()) if hi is None else max(hi, int(part.max()))
        return (0, -1) if lo is None else (lo, hi)

    def n_tokens(self) -> int:
        return int(self.lengths().sum())

    def n_loss_tokens(self) -> int:
        if len(self) == len(self.offsets) - 1:
            return int(np.count_nonzero(self.mask))
        return sum(int(np.count_nonzero(self.mask[slice(*self.span(k))]))
                   for k in range(len(self)))


class ExampleSetBuilder:
    """Appends examples to growing arrays; every `spill` tokens they are written to a
    temporary file, memory-mapped when finished (and unlinked at once where the system
    allows), so building a set never holds more than `spill` tokens in memory."""

    def __init__(self, spill: int | None = None):
        self.spill = SPILL_TOKENS if spill is None else spill
        self.tokens, self.mask = array("i"), array("b")
        self.offsets = array("q", [0])
        self.where_t, self.where_n = array("i"), array("q")
        self.templates: list[str] = []
        self._template_ids: dict[str, int] = {}
        self._files = None  # (token file, mask file) once spilled
        self._written = 0

    def add(self, ids, mask, where) -> None:
        ids = np.asarray(ids, dtype=np.int32)
        mask = np.asarray(mask, dtype=bool)
        self.tokens.frombytes(ids.tobytes())
        self.mask.frombytes(mask.view(np.int8).tobytes())
        self.offsets.append(self.offsets[-1] + ids.size)
        template, number = (where.template, where.number) if hasattr(where, "template") \
            else (str(where), -1)
        t = self._template_ids.get(template)
        if t is None:
            t = self._template_ids[template] = len(self.templates)
            self.templates.append(template)
        self.where_t.append(t)
        self.where_n.append(number)
        if len(self.tokens) >= self.spill:
            self._flush()

    def _flush(self) -> None:
        if self._files is None:
            self._files = tuple(tempfile.NamedTemporaryFile(prefix=f"lorafit-{k}-", delete=False)
                                for k in ("tokens", "mask"))
        self._files[0].write(self.tokens.tobytes())
        self._files[1].write(self.mask.tobytes())
        self._written += len(self.tokens)
        self.tokens, self.mask = array("i"), array("b")

    def finish(self) -> ExampleSet:
        offsets = np.frombuffer(self.offsets, dtype=np.int64).copy()
        where_t = np.frombuffer(self.where_t, dtype=np.int32).copy()
        where_n = np.frombuffer(self.where_n, dtype=np.int64).copy()
        if self._files is None:
            tokens = np.frombuffer(self.tokens, dtype=np.int32).copy()
            mask = np.frombuffer(self.mask, dtype=np.int8).astype(bool)
        else:
            self._flush()
            tokens, mask = (self._map(f, dt) for f, dt in zip(self._files, (np.int32, np.bool_)))
        self.tokens, self.mask = array("i"), array("b")
        return ExampleSet(tokens, mask, offsets, self.templates, where_t, where_n)

    def _map(self, f, dtype):
        f.close()
        if self._written == 0:
            os.unlink(f.name)
            return np.zeros(0, dtype)
        m = np.memmap(f.name, dtype=dtype, mode="r")
        try:
            os.unlink(f.name)  # the mapping keeps the data until the set is freed
        except OSError:
            pass  # Windows: left in the temporary folder
        return m
