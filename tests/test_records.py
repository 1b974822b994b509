"""tagscale.data.records and the encoded cache: every file kind reads the same records, text as written, lines right in
big files, and the Arrow-backed examples equal the in-memory encoding of the same records (another code path)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT
from tagscale.config import DataConfig, RunConfig, TaskConfig
from tagscale.data.encode import Encoder
from tagscale.data.encoded_cache import EncodedSet, encode_task
from tagscale.errors import UserError
from tagscale.runtime.inputs import check_records
from tagscale.data.records import RecordSet, read_records

ROWS = [{"seq": "MKT", "y": "1.5", "id": "007"}, {"seq": "MKVL", "y": "2", "id": "010"},
        {"seq": "MA", "y": "-3", "id": "011"}]


def fields(records) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("_")} for r in records]


def read(path, **kw) -> RecordSet:
    return read_records(DataConfig(path=str(path), **kw), "test", "train")


def test_every_file_kind_reads_the_same_records(tmp_path):
    import datasets

    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    # Excel's CSV: a UTF-8 byte-order mark and Windows line ends (the BOM used to hide the first column)
    (tmp_path / "a.csv").write_bytes(("\ufeffseq,y,id\r\n" + "".join(f"{r['seq']},{r['y']},{r['id']}\r\n"
                                                                     for r in ROWS)).encode())
    datasets.Dataset.from_list(ROWS).to_parquet(str(tmp_path / "a.parquet"))
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "shards").mkdir()
    for i, chunk in enumerate((ROWS[:2], ROWS[2:])):
        (tmp_path / "shards" / f"part-{i}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chunk))
    for name in ("a.jsonl", "a.csv", "a.parquet", "saved", "shards/part-*.jsonl"):
        records = read(tmp_path / name)
        assert fields(records) == ROWS, name  # the CSV's '007' stays text, as written
    shards = read(tmp_path / "shards/part-*.jsonl")
    assert [(r["_origin"].rsplit("/", 1)[-1], r["_line"]) for r in shards] == \
        [("part-0.jsonl", 1), ("part-0.jsonl", 2), ("part-1.jsonl", 1)]
    assert [r["_line"] for r in read(tmp_path / "a.csv")] == [2, 3, 4]  # line 1 is the header
    assert fields(read(tmp_path / "a.jsonl", limit=2)) == ROWS[:2]
    assert fields(read(tmp_path / "a.jsonl").select([2, 0])) == [ROWS[2], ROWS[0]]


def test_a_bad_row_in_a_large_file_is_reported_by_its_line(tmp_path):
    """200,000 rows with blank lines between some, one bad label near the end: found by its line in the file."""
    path = tmp_path / "big.jsonl"
    bad_line = None
    with path.open("w") as handle:
        line = 0
        for i in range(200_000):
            if i % 50_000 == 7:
                handle.write("\n")
                line += 1
            row = {"seq": "MKT", "y": "high" if i == 199_990 else i}
            handle.write(json.dumps(row) + "\n")
            line += 1
            if i == 199_990:
                bad_line = line
    records = read(path)
    assert len(records) == 200_000 and records[199_990]["_line"] == bad_line
    task = TaskConfig(name="t", template="{seq} <Y>", head="<Y>", label="y")
    cfg = RunConfig.__new__(RunConfig)
    cfg.tags = []
    with pytest.raises(UserError, match=rf"big.jsonl: line {bad_line}: field 'y'.*expected a number"):
        check_records(cfg, task, records)
    again = read(path)  # opened from the Arrow cache: the same table files
    assert again.table.cache_files and again.table.cache_files[0]["filename"] == records.table.cache_files[0]["filename"]


def test_a_prepared_file_opens_and_passes_its_checks_again_without_reading_a_row(tmp_path, monkeypatch):
    """The warm path: the second open of a prepared JSONL or CSV file takes its line index from the cache and the
    second check of the same rows under the same rules reads no record; a changed file is read and checked again."""
    from tagscale.runtime import inputs
    from tagscale.data import records as records_module
    from tagscale.data.records import RecordSet

    path = tmp_path / "rows.jsonl"
    path.write_text('{"seq": "MKT", "y": 1}\n\n{"seq": "MKV", "y": 2}\n')
    csv_path = tmp_path / "rows.csv"
    csv_path.write_text('seq,y\nMKT,1\n\nMKV,2\n')
    task = TaskConfig(name="t", template="{seq} <Y>", head="<Y>", label="y")
    cfg = RunConfig.__new__(RunConfig)
    cfg.tags = []
    first, first_csv = read(path), read(csv_path)
    check_records(cfg, task, first)
    check_records(cfg, task, first_csv)

    def no_row_read(*args, **kwargs):
        raise AssertionError("a prepared file was read row by row")

    with monkeypatch.context() as patch:
        for name in ("_jsonl_lines", "_csv_lines", "_has_lines"):
            patch.setattr(records_module, name, no_row_read)
        patch.setattr(RecordSet, "__iter__", no_row_read)
        again, again_csv = read(path), read(csv_path)
        assert [again[i]["_line"] for i in range(2)] == [1, 3] and [again_csv[i]["_line"] for i in range(2)] == [2, 4]
        check_records(cfg, task, again)
        check_records(cfg, task, again_csv)
        other = TaskConfig(name="t", template="{seq} <Y>", head="<Y>", label="seq")  # another rule: not passed yet
        with pytest.raises(AssertionError, match="row by row"):
            check_records(cfg, other, again)
    path.write_text('{"seq": "MKT", "y": 1}\n{"seq": "MKV", "y": "high"}\n')  # changed: read and checked afresh
    with pytest.raises(UserError, match=r"rows.jsonl: line 2: field 'y'.*expected a number"):
        check_records(cfg, task, read(path))
    assert inputs.RECORD_CHECKS_VERSION >= 1


def test_a_bad_csv_row_after_a_blank_line_and_a_multiline_field_is_reported_by_its_line(tmp_path):
    """Line numbers of CSV rows count the header, blank lines and quoted fields that span lines."""
    path = tmp_path / "rows.csv"
    path.write_text('seq,y\r\nMKT,1\r\n\r\n"MK\nT",2\r\nMKT,high\r\n', newline="")
    records = read(path)
    assert [r["seq"] for r in records] == ["MKT", "MK\nT", "MKT"]
    assert [r["_line"] for r in records] == [2, 4, 6]  # line 3 is blank; the quoted field spans lines 4-5
    task = TaskConfig(name="t", template="{seq} <Y>", head="<Y>", label="y")
    cfg = RunConfig.__new__(RunConfig)
    cfg.tags = []
    with pytest.raises(UserError, match=r"rows.csv: line 6: field 'y'.*expected a number"):
        check_records(cfg, task, records)
    plain = tmp_path / "plain.csv"
    plain.write_text("seq,y\nMKT,1\nMKT,2\n")
    assert [r["_line"] for r in read(plain)] == [2, 3]


def test_json_lines_that_arrow_refuses_but_python_reads(tmp_path):
    path = tmp_path / "nan.jsonl"
    path.write_text('{"seq": "MKT", "y": 1}\n{"seq": "MKV", "y": NaN}\n')
    assert [r["_line"] for r in read(path)] == [1, 2] and np.isnan(read(path)[1]["y"])


@pytest.fixture(scope="module")
def encoder(tiny_base):
    rows = tiny_base.identity["embedding_rows"]
    return Encoder(tiny_base.tokenizer, {"<Y>": [rows, rows + 1]}, {"<Y>"}, ["<Y>"], 24)


def test_encoded_cache_equals_the_in_memory_encoding(tmp_path, encoder):
    """The Arrow path (batched map into the cache, too-long rows skipped, memory-mapped) against encoding the same
    records one by one in memory; the second encode opens the cache."""
    rows = [{"seq": "M" * (i % 30 + 1), "y": float(i)} for i in range(300)]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = TaskConfig(name="t", template="Protein {seq} then <Y>", head="<Y>", label="y")
    encoded, skipped = encode_task(encoder, task, 0, read(path), "skip", "test")
    assert isinstance(encoded, EncodedSet)
    by_hand = [encoder.encode(task, 0, dict(r, _line=i + 1)) for i, r in enumerate(rows)]
    kept = [e for e in by_hand if len(e.ids) <= 24]
    assert skipped == len(by_hand) - len(kept) > 0 and len(encoded) == len(kept)
    for mine, ref in zip(encoded, kept):
        assert (mine.ids, mine.lm_targets, mine.head_pos, mine.head_target, mine.split) == \
            (ref.ids, ref.lm_targets, ref.head_pos, ref.head_target, ref.split)
        assert mine.record["_line"] == ref.record["_line"]
    assert encoded.lengths.tolist() == [len(e.ids) for e in kept]
    assert encoded.head_targets().tolist() == [e.head_target[0] for e in kept]
    files = {f["filename"] for f in encoded.table.cache_files}
    assert files and all("/encoded/" in f for f in files)  # memory-mapped from the cache, not held in memory
    again, _ = encode_task(encoder, task, 0, read(path), "skip", "test")
    assert {f["filename"] for f in again.table.cache_files} == files
    with pytest.raises(UserError, match=r"d.jsonl: line \d+: \d+ tokens, longer than train.max_length \(24\)"):
        encode_task(encoder, task, 0, read(path), "error", "test")


def test_data_benchmark_runs_and_the_cached_run_repeats_the_first(tmp_path):
    """tools/bench_data.py at a small size on 2 ranks: the second run (both caches warm) gives the first's losses."""
    proc = subprocess.run([sys.executable, "tools/bench_data.py", "--rows", "3000", "--ranks", "2",
                           "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "bench_data.json").read_text())
    # speed lives in the benchmark's printed ratios, not in a timed test: here, what the second run opened is right
    assert result["rows"] == 3000 and result["ranks"] == 2 and result["cache_bytes"] > 3000 * 300
    assert result["same_losses_from_cache"] and len(result["losses"]) == 2
