"""The file layouts `produce` and `score` accept, and bad rows reported by line."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from detector.schema import RAW_COLUMNS, InvalidScan, derive_event_id, scan_columns, to_scan
from producer.readers import BadRow, read_frame, read_scans

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


GOOD = f"{ROW['epc_code']},12,Factory,Aggregation,2025-07-01 10:45:09"
HEADER = "epc_code,location_id,business_step,event_type,event_time"


@pytest.mark.parametrize(
    "text",
    [
        f"{HEADER}\n{GOOD}\n{GOOD}\n",  # regular: read by Arrow
        f"{HEADER}\r\n{GOOD}\r\n{GOOD}",  # CRLF, no newline at the end
        "\ufeff" + f"{HEADER}\n{GOOD}\n",  # a byte order mark
        "\t".join(ROW[c] for c in RAW_COLUMNS) + "\n",  # headerless raw export
        f'{HEADER}\n{GOOD}\n{ROW["epc_code"]},"12\nsecond",Factory,Aggregation,x\n{GOOD}\n',
        f"{HEADER}\n{GOOD}\n\n{GOOD}\n",  # a blank line
        f"{HEADER}\n{GOOD}\n   \n{GOOD}\n\n",  # a line of spaces, a blank line at the end
        f"{HEADER}\n{GOOD}\nonly,three,fields\n{GOOD}\n",  # a short row
        f"{HEADER}\n{GOOD}\r{GOOD}\n",  # a lone carriage return ends a line
        f"{HEADER}\n{GOOD}\n,,,,\n",  # a row of empty fields is a row
        f"{HEADER}\n{GOOD},extra\n",  # a long row
    ],
)
def test_reading_by_columns_gives_the_rows_and_line_numbers_of_the_row_reader(
    tmp_path: Path, text: str
):
    path = tmp_path / "scans.csv"
    path.write_bytes(text.encode())
    rows = list(read_scans(path))
    read = read_frame(path)
    good = [(n, r) for n, r in rows if not isinstance(r, BadRow)]
    assert read.lines.tolist() == [n for n, _ in good]
    assert read.frame.astype(object).to_dict("records") == [r for _, r in good]
    assert read.bad == [(n, r.reason) for n, r in rows if isinstance(r, BadRow)]


FIELD_VALUES = {
    "epc_code": [ROW["epc_code"], " " + ROW["epc_code"], "", "x", "\u3000y"],
    "location_id": ["12", " 12", "", "13", "\x1c14"],
    "scan_location": ["Plant A", "", "  "],
    "business_step": ["Factory", "WMS", " WMS", "Nowhere", ""],
    "event_type": ["Aggregation", "WMS_Inbound", "Aggregation ", "Lunch", ""],
    "event_time": [
        "2025-07-01 10:45:09",
        "2025-07-01T10:45:09+09:00",
        " 2025-07-01 10:45:09",
        "2025-07-01 10:45",
        "2025-02-30 10:00:00",
        "1970-01-01 00:00:00",
        "2025-07-01X10:45:09",
        "",
    ],
    "eventId": ["e1", " e2 ", "", "a-very-long-event-identifier-\u00e9"],
    "event_id": ["", "other"],
}


@pytest.mark.parametrize("arrow", [False, True])
@given(
    records=st.lists(
        st.fixed_dictionaries({k: st.sampled_from(v) for k, v in FIELD_VALUES.items()}),
        min_size=1,
        max_size=30,
    ),
    zone=st.sampled_from(["UTC", "Asia/Seoul"]),
)
@settings(max_examples=60, deadline=None)
def test_validating_by_columns_gives_what_to_scan_gives_row_by_row(arrow, records, zone):
    import pyarrow as pa

    frame = pd.DataFrame.from_records(records, columns=list(FIELD_VALUES))
    if arrow:  # as `read_frame` gives a regular file
        frame = frame.astype(pd.ArrowDtype(pa.string()))
    columns, refused = scan_columns(frame, zone)
    expected, reasons = [], {}
    for i, record in enumerate(records):
        try:
            expected.append((i, to_scan(record, zone)))
        except InvalidScan as exc:
            reasons[i] = str(exc)
    assert refused == reasons
    assert columns.row.tolist() == [i for i, _ in expected]
    got = [
        (columns.epcs[e], t, columns.sites[s], step, etype, event_id)
        for e, t, s, step, etype, event_id in zip(
            columns.epc,
            columns.t,
            columns.site,
            columns.step,
            columns.etype,
            columns.event_id,
            strict=True,
        )
    ]
    assert got == [(s.epc, s.t, s.location, s.step, s.etype, s.event_id) for _, s in expected]


def test_reading_a_regular_file_by_columns_again_and_again(tmp_path: Path):
    # found by a trial: Arrow's reader threads released a mapped file's buffer late (BufferError)
    path = tmp_path / "scans.csv"
    path.write_text(HEADER + "\n" + "\n".join([GOOD] * 5000) + "\n")
    for _ in range(40):
        assert len(read_frame(path).frame) == 5000


def test_a_header_alone_and_a_very_long_field_are_read(tmp_path: Path):
    path = tmp_path / "scans.tsv"
    path.write_text("\t".join(RAW_COLUMNS) + "\n")
    columns, refused = scan_columns(read_frame(path).frame)
    assert len(columns) == 0 and refused == {}
    path.write_text(
        f"{HEADER}\n" + GOOD.replace("12", "12" + "x" * 200_000, 1) + ',"quoted"\n'
    )  # quoted: the row reader, whose default field limit is 131,072 characters
    [(line, bad)] = list(read_scans(path))
    assert line == 2 and bad == BadRow("expected 5 columns, found 6")


def test_the_report_keeps_its_rows_whatever_the_values(tmp_path: Path):
    from detector.report import write_report

    frames = [
        pd.DataFrame({"a": ["x", "y,z"], "b": [0, 1]}),  # a value that needs quotes
        pd.DataFrame({"a": [{"k": 1}, {"k": 2}], "b": [0, 1]}),  # nested JSON values
        pd.DataFrame({"a": ["100", 100], "b": [0, 1]}),  # a number and a string
        pd.DataFrame([["x", 0, 1]], columns=["a", "b", "b"]),  # a repeated column name
    ]
    for frame in frames:
        path = tmp_path / "report.csv"
        write_report(frame, path)
        back = pd.read_csv(path, dtype=str)
        assert len(back) == len(frame) and back.shape[1] == frame.shape[1]
