"""The file layouts `produce` and `score` accept, and bad rows reported by line."""

from __future__ import annotations

from pathlib import Path

from detector.schema import RAW_COLUMNS, derive_event_id, to_scan
from producer.readers import BadRow, read_scans

ROW = {
    "scan_location": "Plant A",
    "location_id": "12",
    "hub_type": "Factory",
    "business_step": "Factory",
    "event_type": "Aggregation",
    "operator_id": "1",
    "device_id": "2",
    "epc_code": "001.8805843.3842332.100006.20250701.000008002",
    "epc_header": "001",
    "epc_company": "8805843",
    "epc_product": "3842332",
    "epc_lot": "100006",
    "epc_manufacture": "20250701",
    "epc_serial": "000008002",
    "product_name": "Product 1",
    "event_time": "2025-07-01 10:45:09",
    "manufacture_date": "2025-07-01 00:00:00",
    "expiry_date": "2027-07-01 00:00:00",
}


def test_raw_export_tsv_without_event_id(tmp_path: Path):
    path = tmp_path / "export.tsv"
    lines = ["\t".join(RAW_COLUMNS), "\t".join(ROW[c] for c in RAW_COLUMNS)]
    path.write_text("\n".join(lines) + "\n")
    [(line, record)] = list(read_scans(path))
    assert line == 2
    scan = to_scan(record)
    assert scan.event_id == derive_event_id(ROW["epc_code"], ROW["event_time"], "12", "Aggregation")
    assert scan.location == "12"


def test_headerless_raw_export(tmp_path: Path):
    path = tmp_path / "export.tsv"
    path.write_text("\t".join(ROW[c] for c in RAW_COLUMNS) + "\n")
    [(_, record)] = list(read_scans(path))
    assert record["epc_code"] == ROW["epc_code"]


def test_csv_with_event_id_and_a_subset_of_columns_plus_extras(tmp_path: Path):
    path = tmp_path / "scans.csv"
    path.write_text(
        "eventId,epc_code,location_id,scan_location,business_step,event_type,event_time,extra\n"
        f"77,{ROW['epc_code']},12,Plant A,Factory,Aggregation,2025-07-01 10:45:09,x\n"
    )
    [(_, record)] = list(read_scans(path))
    scan = to_scan(record)
    assert scan.event_id == "77" and record["extra"] == "x"


def test_bad_rows_are_reported_with_line_numbers(tmp_path: Path):
    path = tmp_path / "scans.csv"
    path.write_text(
        "epc_code,location_id,business_step,event_type,event_time\n"
        f"{ROW['epc_code']},12,Factory,Aggregation,2025-07-01 10:45:09\n"
        "only,three,fields\n"
    )
    rows = list(read_scans(path))
    assert rows[1] == (3, BadRow("expected 5 columns, found 3"))


def test_line_numbers_count_physical_lines_after_a_quoted_field_with_a_newline(tmp_path: Path):
    path = tmp_path / "scans.csv"
    good = f"{ROW['epc_code']},12,Factory,Aggregation,2025-07-01 10:45:09"
    path.write_text(
        "epc_code,location_id,business_step,event_type,event_time\n"  # line 1
        f'{ROW["epc_code"]},"12\nsecond line",Factory,Aggregation,2025-07-01 10:45:09\n'  # 2-3
        "\n"  # 4: blank
        f"{good}\n"  # 5
        "only,three,fields\n"  # 6
        f"{good}\n"  # 7
    )
    rows = list(read_scans(path))
    assert [number for number, _ in rows] == [2, 5, 6, 7]
    assert rows[0][1]["location_id"] == "12\nsecond line"
    assert rows[2] == (6, BadRow("expected 5 columns, found 3"))


def test_json_lines(tmp_path: Path):
    import orjson

    path = tmp_path / "scans.jsonl"
    path.write_bytes(orjson.dumps(ROW) + b"\nnot json\n")
    rows = list(read_scans(path))
    assert rows[0][1]["epc_code"] == ROW["epc_code"]
    assert isinstance(rows[1][1], BadRow) and rows[1][0] == 2


def test_values_that_only_look_valid_are_refused_with_the_field_named():
    import orjson
    import pytest

    from detector.schema import InvalidScan

    record = {k: ROW[k] for k in ("epc_code", "business_step", "event_type", "event_time")}
    # found by an adversarial trial: a 30-digit site id became a float, then another number
    for value in (orjson.loads(b"123456789012345678901234567890"), 12.5, float("nan")):
        with pytest.raises(InvalidScan, match="location_id must be a string"):
            to_scan({**record, "location_id": value})
    assert to_scan({**record, "location_id": 12}).location == "12"
    assert to_scan({**record, "location_id": 12.0}).location == "12"
    # `datetime.fromisoformat` takes any separator, a NUL too
    for text in ("2025-07-21\x0010:00:00", "2025-07-21X10:00:00", "2025-07-21 10:00:00\n1"):
        with pytest.raises(InvalidScan, match="event_time is not ISO 8601"):
            to_scan({**record, "location_id": "12", "event_time": text})
    for text in ("2025-07-21T10:00:00", "2025-07-21 10:00:00", "2025-07-21T10:00:00+09:00"):
        assert to_scan({**record, "location_id": "12", "event_time": text}).t > 0
