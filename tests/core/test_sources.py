"""Data sources: Parquet, CSV, Arrow, mlx-lm folders, saved `datasets` folders and Hub ids
read as one stream of records, with `where: reason` problems and column mapping."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest

from lorafit.core.data import check_dataset_file, load_dataset, read_records
from lorafit.core.errors import LorafitError
from lorafit.core.sources import content_hash, open_data, parse_columns
from lorafit.models.tiny import char_tokenizer

ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789 .,:;?!->\n"
ROWS = [{"prompt": "two plus two ->", "completion": " four"},
        {"prompt": "one plus one ->", "completion": " two"},
        {"prompt": "three ->", "completion": " 3"}]


@pytest.fixture
def chars():
    return char_tokenizer(ALPHABET)


def write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=2)
    return path


def ids_and_masks(examples):
    return [(e.input_ids.tolist(), e.loss_mask.tolist()) for e in examples]


def test_parquet_csv_arrow_and_jsonl_give_the_same_examples(tmp_path, chars):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    parquet = write_parquet(tmp_path / "d.parquet", ROWS)
    csv = tmp_path / "d.csv"
    pcsv.write_csv(pa.Table.from_pylist(ROWS), csv)  # " 3" must stay text, not a number
    arrow = tmp_path / "d.arrow"
    with pa.ipc.new_file(str(arrow), pa.Table.from_pylist(ROWS).schema) as w:
        w.write_table(pa.Table.from_pylist(ROWS))
    stream = tmp_path / "s.arrow"  # the stream format of datasets' cache files
    with pa.ipc.new_stream(str(stream), pa.Table.from_pylist(ROWS).schema) as w:
        w.write_table(pa.Table.from_pylist(ROWS))
    want, _ = load_dataset(jsonl, chars, 64)
    for path in (parquet, csv, arrow, stream):
        got, stats = load_dataset(path, chars, 64)
        assert stats.format == "prompt_completion" and stats.records == 3
        assert ids_and_masks(got) == ids_and_masks(want)
        assert [e.source for e in got] == [f"{path}:row {i}" for i in (1, 2, 3)]


def test_csv_keeps_newlines_inside_quoted_values(tmp_path, chars):
    path = tmp_path / "d.csv"
    path.write_text('prompt,completion\n"line one\nline two ->"," ok"\nb ->, c\n')
    fmt, records, problems, _ = read_records(path)
    assert [r["prompt"] for _, r in records] == ["line one\nline two ->", "b ->"]
    assert not problems


def test_a_bad_parquet_row_is_reported_by_row(tmp_path, chars):
    path = write_parquet(tmp_path / "d.parquet",
                         ROWS[:2] + [{"prompt": "x ->", "completion": ""}] + ROWS[2:])
    with pytest.raises(LorafitError) as err:
        check_dataset_file(path)
    assert str(err.value).startswith(f'{path}:row 3: field "completion" is empty')
    with pytest.raises(LorafitError, match=rf"^{path}:row 3: "):
        load_dataset(path, chars, 64)
    examples, stats = load_dataset(path, chars, 64, on_bad_record="skip")
    assert len(examples) == 3 and stats.problems == [f'{path}:row 3: field "completion" '
                                                     'is empty']


def test_unreadable_files_are_one_line_errors(tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet at all")
    with pytest.raises(LorafitError, match=rf"^{bad}: cannot read as Parquet"):
        check_dataset_file(bad)
    with pytest.raises(LorafitError, match="no such data file"):
        check_dataset_file(tmp_path / "nope.parquet")


def test_column_mapping(tmp_path, chars):
    rows = [{"question": r["prompt"], "answer": r["completion"], "id": i}
            for i, r in enumerate(ROWS)]
    path = write_parquet(tmp_path / "qa.parquet", rows)
    with pytest.raises(LorafitError, match="no record in a known format"):
        check_dataset_file(path)
    train, _ = open_data(str(path), columns="prompt=question,completion=answer")
    examples, stats = load_dataset(train, chars, 64)
    plain, _ = load_dataset(write_parquet(tmp_path / "p.parquet", ROWS), chars, 64)
    assert stats.format == "prompt_completion" and ids_and_masks(examples) == \
        ids_and_masks(plain)
    missing, _ = open_data(str(path), columns="prompt=question,completion=reply")
    with pytest.raises(LorafitError, match=r"qa.parquet: no column reply .*question, answer"):
        check_dataset_file(missing)
    jsonl = tmp_path / "qa.jsonl"  # the same mapping applies to JSON records
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert check_dataset_file(open_data(str(jsonl), columns="prompt=question,"
                                                            "completion=answer")[0]).records == 3
    for bad in ("prompt", "prompt=question,completion=question", "=x"):
        with pytest.raises(LorafitError, match="--columns"):
            parse_columns(bad)


def test_mlx_lm_folder_brings_its_valid_split(tmp_path, chars):
    folder = tmp_path / "set"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    write_parquet(folder / "valid.parquet", ROWS[:1])
    (folder / "test.jsonl").write_text(json.dumps(ROWS[0]) + "\n")
    train, valid = open_data(str(folder))
    assert check_dataset_file(train).records == 3 and check_dataset_file(valid).records == 1
    assert open_data(str(folder), with_validation=False)[1] is None
    train, _ = open_data(str(folder), split="test")
    assert check_dataset_file(train).records == 1
    (folder / "train.csv").write_text("prompt,completion\na,b\n")
    with pytest.raises(LorafitError, match=r"2 files named train\.\*"):
        open_data(str(folder))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LorafitError, match="folder without train.jsonl"):
        check_dataset_file(empty)


def test_saved_datasets_folder_and_dataset_index_problems(tmp_path, chars):
    import datasets

    bad = ROWS + [{"prompt": "y ->", "completion": "   "}]
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(bad),
                               "validation": datasets.Dataset.from_list(ROWS[:2])})
    dd.save_to_disk(str(tmp_path / "dd"))
    train, valid = open_data(str(tmp_path / "dd"))
    with pytest.raises(LorafitError, match=rf"^{tmp_path / 'dd'}\[train\]\[3\]: field "
                                           r'"completion" is empty'):
        load_dataset(train, chars, 64)
    examples, stats = load_dataset(train, chars, 64, on_bad_record="skip")
    assert [e.source for e in examples] == [f"{tmp_path / 'dd'}[train][{i}]" for i in range(3)]
    assert len(load_dataset(valid, chars, 64)[0]) == 2
    with pytest.raises(LorafitError, match=r"no split 'test' \(it has train, validation"):
        open_data(str(tmp_path / "dd"), split="test")
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "one"))
    assert check_dataset_file(str(tmp_path / "one")).records == 3


def test_hub_ids_go_through_datasets_with_split_config_and_revision(tmp_path, chars,
                                                                    monkeypatch):
    import datasets

    seen = {}

    def fake_load(path, **kw):  # what lorafit asks the library for; no network in tests
        seen.update(kw, path_=path)
        return datasets.Dataset.from_list(ROWS)
    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    train, valid = open_data("org/set", split="test", config="en", revision="v1")
    assert seen == {"path_": "org/set", "name": "en", "split": "test", "revision": "v1"}
    examples, _ = load_dataset(train, chars, 64)
    assert valid is None and examples.source(0) == "org/set[test][0]"
    assert content_hash("org/set") != content_hash("org/other")


def test_an_unknown_hub_id_offline_is_one_clear_line(tmp_path, monkeypatch):
    import datasets

    def offline(path, **kw):
        raise ConnectionError("Couldn't reach 'org/none' on the Hub (LocalEntryNotFoundError)\n"
                              "more lines")
    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LorafitError) as err:
        check_dataset_file("org/none")
    msg = str(err.value)
    assert msg.startswith("org/none: not a local file or folder") and "\n" not in msg
    assert "HF_HUB_OFFLINE" in msg


def test_folder_hash_changes_with_any_file(tmp_path):
    folder = tmp_path / "set"
    folder.mkdir()
    (folder / "train.jsonl").write_text('{"text": "a"}\n')
    first = content_hash(str(folder))
    (folder / "valid.jsonl").write_text('{"text": "b"}\n')
    assert content_hash(str(folder)) != first
    assert content_hash(str(folder / "train.jsonl")) != first


def test_large_sets_spill_to_a_memory_mapped_file(tmp_path, chars, monkeypatch):
    from lorafit.core import examples as store

    monkeypatch.setattr(store, "SPILL_TOKENS", 64)
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": f"record {i} " * 5}) + "\n" for i in range(40)))
    spilled, _ = load_dataset(path, chars, 64)
    monkeypatch.setattr(store, "SPILL_TOKENS", 1 << 30)
    in_memory, _ = load_dataset(path, chars, 64)
    assert isinstance(spilled.tokens, np.memmap) and not isinstance(in_memory.tokens, np.memmap)
    assert ids_and_masks(spilled) == ids_and_masks(in_memory)


TRAIN_AND_MEASURE = r"""
import json, sys, threading, time
from lorafit.core.config import TrainConfig
from lorafit.commands.train import build_trainer
from lorafit.core.events import Sink, StepReport

def rss_anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024

peak, done = [0], []
def sample():
    while not done:
        peak[0] = max(peak[0], rss_anon())
        time.sleep(0.005)
threading.Thread(target=sample, daemon=True).start()
model, data, out = sys.argv[1:4]
cfg = TrainConfig(model=model, data=data, output=out, backend="torch", rank=2,
                  batch_size=2, max_steps=3, seq_len=1024, log_every=1, lr=1e-3)


# The sampler stops at the first step's report: the data pipeline, the store and one batch
# are all in place by then, and the second step runs under PyTorch's memory profiler, whose
# own buffers vary from run to run by more than the bound the test asserts.
class FirstStep(Sink):
    def __call__(self, event):
        if isinstance(event, StepReport):
            done.append(1)


trainer = build_trainer(cfg, [FirstStep()], report=lambda t: None)
status = trainer.run()
done.append(1)
print(json.dumps({"status": status, "peak": peak[0], "tokens": trainer.train_examples.n_tokens(),
                  "spilled": type(trainer.train_examples.tokens).__name__}))
"""


def _write_word_parquet(path, n_tokens, tokenizer, seed=0):
    """Text records of ~900 tokens of the tokenizer's corpus words, until n_tokens; returns
    the text's size in bytes."""
    from conftest import CORPUS

    words = np.array(" ".join(CORPUS).split())
    per_word = len(tokenizer(" ".join(words.tolist()), add_special_tokens=False)["input_ids"]) \
        / len(words)
    rng = np.random.default_rng(seed)
    n_records = max(1, round(n_tokens / (900 * 1.0)))
    texts = [" ".join(rng.choice(words, int(900 / per_word))) for _ in range(n_records)]
    pq.write_table(pa.table({"text": texts}), path, row_group_size=256)
    return sum(len(t.encode()) for t in texts)


@pytest.mark.slow
@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"),
                    reason="reads /proc/self/status")
def test_a_5m_token_parquet_set_trains_in_memory_that_does_not_grow_with_it(tmp_path, tokenizer):
    import os
    import subprocess
    import sys

    from conftest import build_hf_model

    folder, _ = build_hf_model(tmp_path / "m", "llama", tokenizer, max_position_embeddings=1024)
    big_bytes = _write_word_parquet(tmp_path / "big.parquet", 5_000_000, tokenizer)
    small_bytes = _write_word_parquet(tmp_path / "small.parquet", 1_000_000, tokenizer)
    # torch as the CLI runs it (no preloaded OpenBLAS), one thread: fewer per-thread buffers
    env = {**{k: v for k, v in os.environ.items() if k != "LD_PRELOAD"},
           "LORAFIT_NO_REEXEC": "1", "OMP_NUM_THREADS": "1"}
    runs = {}
    for name in ("small", "big"):
        out = subprocess.run([sys.executable, "-c", TRAIN_AND_MEASURE, str(folder),
                              str(tmp_path / f"{name}.parquet"), str(tmp_path / f"run-{name}")],
                             capture_output=True, text=True, timeout=600,
                             env=env)
        assert out.returncode == 0, out.stderr[-2000:]
        runs[name] = json.loads(out.stdout.strip().splitlines()[-1])
    big, small = runs["big"], runs["small"]
    assert big["status"] == small["status"] == "completed"
    assert big["tokens"] > 4_500_000 and big["spilled"] == small["spilled"] == "memmap"
    # 4M more tokens (as padded epochs ~112 MB, as int32 ids 16 MB, as text ~8 MB) cost
    # next to nothing: the reader, tokenizer and store hold a bounded amount at a time
    extra = big["peak"] - small["peak"]
    print(f"text {small_bytes / 2**20:.1f} -> {big_bytes / 2**20:.1f} MiB, peak memory "
          f"{small['peak'] / 2**20:.1f} -> {big['peak'] / 2**20:.1f} MiB")
    # bound: half of what the 4M extra tokens would take as bare int32 ids in memory
    extra_tokens = big["tokens"] - small["tokens"]
    assert extra < extra_tokens * 4 / 2, (extra, extra_tokens, big_bytes, small_bytes)


def test_a_runs_validation_set_comes_from_val_data_else_the_folder(tmp_path):
    from lorafit.commands.train import open_training_data
    from lorafit.core.config import TrainConfig

    folder = tmp_path / "set"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (folder / "valid.jsonl").write_text(json.dumps(ROWS[0]) + "\n")
    other = write_parquet(tmp_path / "v.parquet", ROWS[:2])
    train, val = open_training_data(TrainConfig(data=str(folder)))
    assert str(val) == str(folder / "valid.jsonl") and check_dataset_file(val).records == 1
    train, val = open_training_data(TrainConfig(data=str(folder), val_data=str(other)))
    assert str(val) == str(other) and check_dataset_file(val).records == 2
    train, val = open_training_data(TrainConfig(data=str(folder / "train.jsonl")))
    assert val is None
    with pytest.raises(LorafitError, match="--columns"):
        TrainConfig(data=str(folder), columns="prompt")
