"""Where training records come from: a JSONL/JSON, Parquet, CSV or Arrow file, a folder in
mlx-lm's layout (train.* / valid.* / test.*), a folder written by `datasets.save_to_disk`,
or a Hugging Face Hub dataset id read through `datasets` (its cache, HF_HUB_OFFLINE).

Every source is read as a stream of entries `(where, record, problem)`, in order, so a set
larger than memory can be read: JSONL line by line, Parquet in row groups, CSV in blocks,
Arrow memory-mapped. `where` names the record the way a user finds it: `file:line`,
`file:record N` (a JSON list), `file:row N` (Parquet/CSV/Arrow, counted from 1) or
`dataset[split][i]` (a saved or Hub dataset, indexed from 0, as `ds[split][i]` reads it).
Nothing here knows record formats: core/data.py validates what comes out.
"""

from __future__ import annotations

import codecs
import json
import os
from pathlib import Path
from typing import Iterator, NamedTuple

from lorafit.core.errors import LorafitError

MAX_REASON = 200  # characters of a third-party error message kept in a problem line
FILE_KINDS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv",
              ".arrow": "arrow"}
ROWS_PER_READ = 256  # rows converted to Python at a time (Arrow sources)
VALID_SPLITS = ("valid", "validation")  # mlx-lm's name first, then the Hub's


class Where(NamedTuple):
    """A record's place, kept as (template, number) so a million examples do not each hold
    a string; str() gives the text used in every message."""
    template: str
    number: int

    def __str__(self) -> str:
        return self.template.format(self.number)


def one_line(text, limit: int = MAX_REASON) -> str:
    """Third-party messages may span lines; ours are printed on one."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def parse_columns(text: str | None) -> dict[str, str]:
    """`prompt=question,completion=answer` -> {"question": "prompt", "answer": "completion"}
    (the set's column -> the field lorafit reads)."""
    out: dict[str, str] = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        field, sep, column = (s.strip() for s in part.partition("="))
        if not sep or not field or not column:
            raise LorafitError(f"--columns {text!r}: expected FIELD=COLUMN pairs separated by "
                               "commas, e.g. prompt=question,completion=answer")
        if column in out:
            raise LorafitError(f"--columns: column {column!r} is mapped twice")
        out[column] = field
    return out


def _rename(record, columns: dict[str, str]):
    if not columns or not isinstance(record, dict):
        return record
    return {columns.get(k, k): v for k, v in record.items()}


def _drop_nulls(record: dict) -> dict:
    """Arrow stores a struct field for every message, null where a message lacks it
    (`tool_calls: null` on a user turn); a template sees the field as absent, as in JSON."""
    msgs = record.get("messages")
    if isinstance(msgs, list):
        record = dict(record, messages=[{k: v for k, v in m.items() if v is not None or
                                         k == "content"} if isinstance(m, dict) else m
                                        for m in msgs])
    return record


class Records:
    """One source of records: iterate it for (Where, record, problem) entries in order (a
    record that could not be parsed has record None and a problem). It can be iterated
    again (each pass reads the source again); `blank` counts blank lines of the last pass."""

    def __init__(self, name: str, reader, columns: dict[str, str] | None = None):
        self.name = name
        self._reader = reader
        self.columns = columns or {}
        self.blank = 0

    def __iter__(self) -> Iterator[tuple[Where, object, str | None]]:
        self.blank = 0
        for where, record, problem in self._reader(self):
            yield where, _rename(record, self.columns), problem

    def __str__(self) -> str:
        return self.name


# -- JSON and JSONL ---------------------------------------------------------------------------

def _open_checked(path: Path):
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise LorafitError(f"{path}: no such data file") from None
    except IsADirectoryError:
        raise LorafitError(f"{path}: is a folder, not a data file") from None
    except OSError as e:
        raise LorafitError(f"{path}: cannot read ({e.strerror or e})") from None
    head = f.read(4)
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        f.close()
        raise LorafitError(f"{path}: UTF-16 text; save it as UTF-8")
    f.seek(len(codecs.BOM_UTF8) if head.startswith(codecs.BOM_UTF8) else 0)
    return f


def _json_type(value) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number",
             float: "number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _json_list(name: str, data: bytes):
    """A whole-file JSON list (read at once: JSON has no record boundaries to stream on)."""
    try:
        items = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise LorafitError(f"{name}: not UTF-8 text (bad byte at offset {e.start})") from None
    except json.JSONDecodeError as e:
        raise LorafitError(f"{name}:{e.lineno}: malformed JSON ({e.msg})") from None
    except (ValueError, RecursionError) as e:
        raise LorafitError(f"{name}: malformed JSON ({one_line(e)})") from None
    if not isinstance(items, list):
        raise LorafitError(f"{name}: expected a list of records, got {_json_type(items)}")
    return items


def _first_byte(f) -> bytes:
    pos = f.tell()
    while True:
        chunk = f.read(1 << 16)
        if not chunk or chunk.lstrip():
            f.seek(pos)
            return chunk.lstrip()[:1]


def _json_reader(path: Path):
    def read(records: Records):
        with _open_checked(path) as f:
            start = f.tell()
            if _first_byte(f) == b"[":
                data = f.read()
                try:
                    items = _json_list(str(path), data)
                except LorafitError:
                    if path.suffix.lower() == ".json":
                        raise
                    items = None  # a JSONL file whose first record is an array
                if items is not None:
                    template = f"{path}:record {{}}"
                    for i, r in enumerate(items, 1):
                        yield Where(template, i), r, None
                    return
                f.seek(start)
            yield from _jsonl_lines(path, f, records)
    return read


def _jsonl_lines(path: Path, f, records: Records):
    """One entry per non-blank line; splits on \\n only (U+2028 and friends may legally sit
    inside JSON strings). A last line without a newline that is blank is not a line."""
    template = f"{path}:{{}}"
    for lineno, raw in enumerate(f, 1):
        if not raw.strip():
            records.blank += raw.endswith(b"\n")
            continue
        where = Where(template, lineno)
        try:
            yield where, json.loads(raw.decode("utf-8")), None
        except UnicodeDecodeError as e:
            yield where, None, f"not UTF-8 text (bad byte {e.start + 1} of the line)"
        except json.JSONDecodeError as e:
            yield where, None, f"malformed JSON ({e.msg} at column {e.colno})"
        except (ValueError, RecursionError) as e:  # huge numbers, absurd nesting
            yield where, None, f"malformed JSON ({one_line(e)})"


# -- Parquet, CSV, Arrow (through pyarrow, streamed) -----------------------------------------

def _arrow_batches(path: Path, kind: str):
    """Record batches of a file, read a block at a time (Arrow files memory-mapped)."""
    import pyarrow as pa

    if kind == "parquet":
        import pyarrow.parquet as pq

        # one row group at a time, mapped: threads would read ahead and hold many
        yield from pq.ParquetFile(path, memory_map=True).iter_batches(
            batch_size=ROWS_PER_READ, use_threads=False)
    elif kind == "csv":
        import csv

        import pyarrow.csv as pcsv

        with open(path, newline="", encoding="utf-8-sig") as f:
            header = next(csv.reader(f), [])
        # every column as text: a completion "4" stays the string "4"
        convert = pcsv.ConvertOptions(column_types={h: pa.string() for h in header},
                                      strings_can_be_null=False)
        parse = pcsv.ParseOptions(newlines_in_values=True)
        read = pcsv.ReadOptions(use_threads=False)
        yield from pcsv.open_csv(path, read_options=read, parse_options=parse,
                                 convert_options=convert)
    else:
        source = pa.memory_map(str(path))
        try:
            reader = pa.ipc.open_file(source)
            for i in range(reader.num_record_batches):
                yield reader.get_batch(i)
        except pa.ArrowInvalid:
            source.seek(0)
            yield from pa.ipc.open_stream(source)  # datasets' cache files are streams


def _check_columns(name: str, names, columns: dict[str, str]) -> None:
    missing = [c for c in columns if c not in names]
    if missing:
        raise LorafitError(f"{name}: no column {', '.join(missing)} (--columns; the set has "
                           f"{', '.join(map(str, names))})")


def _file_reader(path: Path, kind: str):
    label = {"parquet": "Parquet", "csv": "CSV", "arrow": "Arrow"}[kind]

    def read(records: Records):
        if not path.exists():
            raise LorafitError(f"{path}: no such data file")
        template, row = f"{path}:row {{}}", 0
        try:
            for batch in _arrow_batches(path, kind):
                if row == 0:
                    _check_columns(str(path), batch.schema.names, records.columns)
                for record in batch.to_pylist():
                    row += 1
                    yield Where(template, row), _drop_nulls(record), None
        except LorafitError:
            raise
        except Exception as e:  # pyarrow's errors for corrupt or mistyped files
            raise LorafitError(f"{path}: cannot read as {label} ({one_line(e)})") from None
    return read


# -- datasets: saved folders and the Hub -------------------------------------------------------

def _dataset_reader(ds, name: str, split: str):
    """Rows of a `datasets.Dataset` (memory-mapped Arrow), a block at a time."""
    def read(records: Records):
        _check_columns(name, ds.column_names, records.columns)
        template = f"{name}[{split}][{{}}]"
        i = 0
        for block in ds.iter(batch_size=ROWS_PER_READ):
            keys = list(block)
            for values in zip(*(block[k] for k in keys)):
                yield Where(template, i), _drop_nulls(dict(zip(keys, values))), None
                i += 1
    return read


def _is_saved_dataset(folder: Path) -> bool:
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


def _load_from_disk(folder: Path):
    try:
        import datasets
    except ImportError:
        raise LorafitError(f"{folder}: a saved dataset needs the `datasets` package "
                           "(pip install datasets)") from None
    try:
        return datasets.load_from_disk(str(folder))
    except Exception as e:
        raise LorafitError(f"{folder}: cannot load the saved dataset ({one_line(e)})") from None


def _pick_split(dd, name: str, wanted: str | None, fallback_valid: bool):
    """(train split, validation split or None) of a DatasetDict."""
    splits = list(dd)
    train = wanted or "train"
    if train not in dd:
        raise LorafitError(f"{name}: no split {train!r} (it has {', '.join(splits)}; "
                           "choose one with --data-split)")
    valid = next((s for s in VALID_SPLITS if s in dd), None) if fallback_valid else None
    return train, valid


def _hub_dataset(name: str, split: str | None, config: str | None, revision: str | None):
    try:
        import datasets
    except ImportError:
        raise LorafitError(f"{name}: reading a Hub dataset needs the `datasets` package "
                           "(pip install datasets)") from None
    try:
        return datasets.load_dataset(name, name=config, split=split or "train",
                                     revision=revision)
    except Exception as e:  # offline without a cache, a missing id, split or config
        offline = " (HF_HUB_OFFLINE is set and it is not cached)" \
            if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes") else ""
        raise LorafitError(f"{name}: not a local file or folder, and not readable as a Hub "
                           f"dataset{offline}: {type(e).__name__}: {one_line(e, 160)}") \
            from None


# -- resolving --data ---------------------------------------------------------------------------

def _looks_like_hub_id(text: str) -> bool:
    p = Path(text)
    return (text.count("/") <= 1 and not text.startswith((".", "/", "~"))
            and p.suffix.lower() not in FILE_KINDS and "\\" not in text and text.strip() == text
            and bool(text))


def _file_records(path: Path, columns) -> Records:
    kind = FILE_KINDS.get(path.suffix.lower(), "json")  # other names: JSON lines, as before
    reader = _json_reader(path) if kind == "json" else _file_reader(path, kind)
    return Records(str(path), reader, columns)


def _folder_file(folder: Path, stem: str) -> Path | None:
    found = sorted(p for p in folder.iterdir()
                   if p.stem == stem and p.suffix.lower() in FILE_KINDS and p.is_file())
    if len(found) > 1:
        raise LorafitError(f"{folder}: {len(found)} files named {stem}.* "
                           f"({', '.join(p.name for p in found)}); keep one")
    return found[0] if found else None


def open_data(spec: str, split: str | None = None, config: str | None = None,
              revision: str | None = None, columns: str | None = None,
              with_validation: bool = True) -> tuple[Records, Records | None]:
    """(training records, validation records or None) for a --data value. A folder in
    mlx-lm's layout or a saved DatasetDict brings its `valid`/`validation` split along
    (when `with_validation`); a single file or a Hub split does not."""
    mapping = parse_columns(columns)
    path = Path(spec).expanduser()
    if path.is_dir():
        if _is_saved_dataset(path):
            ds = _load_from_disk(path)
            if hasattr(ds, "column_names") and not isinstance(ds.column_names, dict):
                name = split or "train"
                return Records(str(path), _dataset_reader(ds, str(path), name), mapping), None
            train, valid = _pick_split(ds, str(path), split, with_validation)
            val = None if valid is None else Records(
                f"{path}[{valid}]", _dataset_reader(ds[valid], str(path), valid), mapping)
            return Records(f"{path}[{train}]", _dataset_reader(ds[train], str(path), train),
                           mapping), val
        train_file = _folder_file(path, split or "train")
        if train_file is None:
            raise LorafitError(f"{path}: a folder without {split or 'train'}.jsonl (or .json, "
                               ".parquet, .csv, .arrow) and not a saved dataset")
        valid_file = next((f for f in (_folder_file(path, s) for s in VALID_SPLITS) if f),
                          None) if with_validation else None
        return (_file_records(train_file, mapping),
                None if valid_file is None else _file_records(valid_file, mapping))
    if path.exists() or not _looks_like_hub_id(spec):
        return _file_records(path, mapping), None
    ds = _hub_dataset(spec, split, config, revision)
    return Records(f"{spec}[{split or 'train'}]",
                   _dataset_reader(ds, spec, split or "train"), mapping), None


def open_records(spec: str, **kw) -> Records:
    """The training records of a --data value (its validation split, if any, ignored)."""
    return open_data(spec, with_validation=False, **kw)[0]


def content_hash(spec: str | None, extra: str = "") -> str | None:
    """A SHA-256 of what --data names, for checkpoint fingerprints: a file's bytes, a
    folder's files (names and bytes), or a Hub id with its split/config/revision."""
    if not spec:
        return None
    import hashlib

    h = hashlib.sha256()
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        for p in files:
            h.update(str(p.relative_to(path)).encode() + b"\0")
            _hash_file(h, p)
    elif path.exists() or not _looks_like_hub_id(spec):
        _hash_file(h, path)
    else:
        h.update(f"hub:{spec}:{extra}".encode())
    return h.hexdigest()


def _hash_file(h, path: Path) -> None:
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
