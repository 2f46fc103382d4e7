"""The generic reader: canonical ids, ordering, filtering, item text, config validation, input errors."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prmkd_dist.data.prepare import resolve_reader_config
from prmkd_dist.data.readers import (
    InputDataError,
    ReaderConfigError,
    canonical_id_order,
    kcore_mask,
    load_reader_config,
    read_dataset,
    reader_config_from_dict,
)


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def config(path: Path, **inter) -> dict:
    base = {"path": str(path), "user": "u", "item": "i"}
    base.update(inter)
    return {"name": "t", "interactions": base}


def read(raw: dict):
    return read_dataset(reader_config_from_dict(raw))


def sequences(data) -> dict[str, list[str]]:
    """{raw user: [raw items in stored order]}: what the reader produced, in raw-id terms."""
    return {data.user_raw_ids[u]: [data.item_raw_ids[i] for i in data.sequence(u)] for u in range(data.num_users)}


# ---- canonical ids -------------------------------------------------------------------------------
def test_numeric_ids_sorted_numerically_and_round_trip(tmp_path):
    p = write(tmp_path, "r.csv", "u,i,t\n10,100,1\n9,9,2\n10,10,3\n100,9,4\n")
    data, _ = read(config(p, timestamp="t"))
    assert data.user_raw_ids.tolist() == ["9", "10", "100"]  # not string order 10,100,9
    assert data.item_raw_ids.tolist() == ["9", "10", "100"]
    assert sequences(data) == {"9": ["9"], "10": ["100", "10"], "100": ["9"]}
    # raw id -> id -> raw id
    to_id = {raw: k for k, raw in enumerate(data.item_raw_ids)}
    assert all(data.item_raw_ids[to_id[r]] == r for r in ["9", "10", "100"])


def test_string_ids_use_code_point_order_and_numeric_spelling_ties(tmp_path):
    assert [["10", "9", "B", "a"][k] for k in canonical_id_order(np.array(["10", "9", "B", "a"], dtype=object))] == \
        ["10", "9", "B", "a"]
    ids = np.array(["1", "01", "-3", "2"], dtype=object)
    assert ids[canonical_id_order(ids)].tolist() == ["-3", "01", "1", "2"]
    p = write(tmp_path, "r.csv", "u,i\nbob,x\nalice,y\nbob,10\n")
    data, _ = read(config(p))
    assert data.item_raw_ids.tolist() == ["10", "x", "y"]
    assert data.user_raw_ids.tolist() == ["alice", "bob"]


def test_fingerprint_stable_and_follows_the_mapping(tmp_path):
    p = write(tmp_path, "r.csv", "u,i\n1,5\n1,6\n2,7\n")
    a, _ = read(config(p))
    b, _ = read(config(p))
    assert a.fingerprint == b.fingerprint and len(a.fingerprint) == 16
    q = write(tmp_path, "s.csv", "u,i\n1,5\n1,8\n2,7\n")  # one item renamed: a different id space
    c, _ = read(config(q))
    assert c.num_items == a.num_items and c.fingerprint != a.fingerprint


# ---- chronology ------------------------------------------------------------------------------------
def test_ties_keep_file_order_deterministically(tmp_path):
    p = write(tmp_path, "r.csv", "u,i,t\n1,x,5\n1,y,3\n2,q,1\n1,z,5\n1,w,3\n")
    first, _ = read(config(p, timestamp="t"))
    again, _ = read(config(p, timestamp="t"))
    assert sequences(first)["1"] == ["y", "w", "x", "z"]
    assert first.timestamps[first.offsets[0]:first.offsets[1]].tolist() == [3, 3, 5, 5]
    assert np.array_equal(first.items, again.items)
    # swapping the two tied rows in the file swaps them in the sequence: the file row decides
    q = write(tmp_path, "s.csv", "u,i,t\n1,z,5\n1,y,3\n2,q,1\n1,x,5\n1,w,3\n")
    swapped, _ = read(config(q, timestamp="t"))
    assert sequences(swapped)["1"] == ["y", "w", "z", "x"]


def test_without_timestamp_file_order_is_chronology(tmp_path):
    p = write(tmp_path, "r.txt", "2  7\n1 5\n\t2 3 \n1 5\n")  # runs of spaces/tabs, a repeat (kept)
    data, _ = read({"name": "t", "interactions": {"path": str(p), "format": "whitespace", "header": False,
                                                     "user": 0, "item": 1}})
    assert sequences(data) == {"1": ["5", "5"], "2": ["7", "3"]}
    assert data.timestamps.tolist() == [1, 3, 0, 2]  # the 0-based data-row numbers


def test_tsv_and_parquet_give_the_same_dataset(tmp_path):
    rows = [("u1", 3, 20), ("u2", 1, 10), ("u1", 2, 10)]
    tsv = write(tmp_path, "r.tsv", "user\titem\tts\n" + "".join(f"{u}\t{i}\t{t}\n" for u, i, t in rows))
    par = tmp_path / "r.parquet"
    pq.write_table(pa.table({"user": [r[0] for r in rows], "item": pa.array([r[1] for r in rows], pa.int32()),
                             "ts": pa.array([r[2] for r in rows], pa.timestamp("s"))}), par)
    a, _ = read({"name": "t", "interactions": {"path": str(tsv), "user": "user", "item": "item", "timestamp": "ts"}})
    b, _ = read({"name": "t", "interactions": {"path": str(par), "user": "user", "item": 1, "timestamp": "ts"}})
    assert sequences(a) == sequences(b) == {"u1": ["2", "3"], "u2": ["1"]}
    assert np.array_equal(a.timestamps, b.timestamps) and a.fingerprint == b.fingerprint


# ---- filtering ----------------------------------------------------------------------------------
def test_kcore_iterates_until_stable(tmp_path):
    # u3's only c-row goes in pass 1; then u3 has one row left, so (u3, a) goes in pass 2.
    p = write(tmp_path, "r.csv", "u,i\nu1,a\nu1,b\nu2,a\nu2,b\nu3,c\nu3,a\n")
    data, report = read({**config(p), "kcore": 2})
    assert sequences(data) == {"u1": ["a", "b"], "u2": ["a", "b"]}
    assert data.item_raw_ids.tolist() == ["a", "b"] and data.kcore == 2
    assert report.rows_removed_by_kcore == 2 and report.kcore_passes == 3
    keep, _ = kcore_mask(np.array([0, 0, 1, 1, 2, 2]), np.array([0, 1, 0, 1, 2, 0]), 2)
    assert keep.tolist() == [True, True, True, True, False, False]
    lens = data.lengths()
    assert lens.min() >= 2 and data.item_popularity().min() >= 2


def test_min_rating_filter_and_empty_result(tmp_path):
    p = write(tmp_path, "r.csv", "u,i,r\n1,a,4.5\n1,b,2\n2,a,3.0\n")
    data, report = read(config(p, rating="r", min_rating=3))
    assert sequences(data) == {"1": ["a"], "2": ["a"]} and report.rows_below_min_rating == 1
    with pytest.raises(InputDataError, match=r"r\.csv: no interaction left after filtering \(3 rows read, 3 below min_rating"):
        read(config(p, rating="r", min_rating=5))


# ---- item text ----------------------------------------------------------------------------------
def test_item_text_joins_columns_and_aggregates_rows(tmp_path):
    p = write(tmp_path, "r.csv", "u,i\n1,10\n1,20\n2,30\n")
    movies = write(tmp_path, "m.csv", 'id,title,genres\n10,"A, the",X|Y\n20,B,\n99,Unrated,Z\n')
    tags = write(tmp_path, "t.csv", "id,tag\n10,fun\n20,  dark \n10,old\n10,fun\n")
    raw = config(p)
    raw["item_text"] = {"separator": ". ", "sources": [
        {"path": str(movies), "item": "id", "columns": ["title", "genres"], "join": ": ", "replace": {"genres": {"|": ", "}}},
        {"path": str(tags), "item": "id", "columns": ["tag"], "unique": True, "prefix": "Tags: "},
    ]}
    data, report = read(raw)
    assert data.item_text == ["A, the: X, Y. Tags: fun, old", "B. Tags: dark", None]
    assert report.text_rows_read == 7 and report.text_rows_outside_catalog == 1 and report.items_with_text == 2


# ---- the shared datasets --------------------------------------------------------------------------
def test_ml_latest_small_statistics_and_text(ml_small, ml_small_split):
    assert (ml_small.num_users, ml_small.num_items, ml_small.num_interactions) == (610, 9724, 100836)
    assert ml_small.item_raw_ids[0] == "1" and ml_small.user_raw_ids[-1] == "610"
    assert ml_small.item_text[0] == "Toy Story (1995). Adventure, Animation, Children, Comedy, Fantasy. Tags: pixar, fun"
    assert all(t for t in ml_small.item_text)  # every rated movie is in movies.csv
    # per-user chronology
    for u in range(0, ml_small.num_users, 50):
        ts = ml_small.timestamps[ml_small.offsets[u]:ml_small.offsets[u + 1]]
        assert np.all(np.diff(ts) >= 0)
    assert len(ml_small_split.eval_users("test")) == 610  # every ml user has >= 20 ratings


def test_amazon_games_statistics_and_speed(shared_data):
    start = time.perf_counter()
    data, report = read_dataset(resolve_reader_config("amazon-games"))
    elapsed = time.perf_counter() - start
    assert (data.num_users, data.num_items, data.num_interactions) == (31013, 23715, 287107)
    assert report.rows_read == 287107 and data.item_text is None
    # file order is the chronology: the first user's sequence is its lines in file order
    with open(shared_data / "amazon-games" / "interactions.txt") as f:
        first = [line.split() for _, line in zip(range(40), f)]
    user = first[0][0]
    expected = [i for u, i in first if u == user]
    uid = data.user_raw_ids.tolist().index(user)
    assert [data.item_raw_ids[i] for i in data.sequence(uid)][: len(expected)] == expected
    assert elapsed < 10, f"reading Games took {elapsed:.1f}s"


# ---- configuration errors -------------------------------------------------------------------------
def test_builtin_configs_load():
    for name in ("ml-latest-small", "amazon-games"):
        cfg = resolve_reader_config(name)
        assert cfg.name == name and Path(cfg.interactions.path).is_absolute()


@pytest.mark.parametrize(
    "yaml_text, message",
    [
        ("name: t\ninteractions: {path: r.csv, user: u, item: i, colour: red}\n", r"unknown key 'interactions\.colour'"),
        ("name: t\ninteractions: {path: r.csv, user: u}\n", r"missing required key 'interactions\.item'"),
        ("name: t\ninteractions: {path: r.csv, user: u, item: i}\nkcore: two\n", r"key 'kcore': expected an integer, got 'two'"),
        ("name: t\ninteractions: {path: r.csv, user: u, item: 1.5}\n", r"key 'interactions\.item': expected a string or an integer"),
        ("name: t\ninteractions: {path: r.csv, user: u, item: i, header: no}\n", r"key 'interactions\.user': header is false"),
        ("name: t\ninteractions: {path: r.dat, user: 0, item: 1}\n", r"key 'interactions\.format': 'auto' cannot tell"),
        ("name: t\ninteractions: {path: r.csv, user: u, item: i, min_rating: 3}\n", r"min_rating': needs interactions\.rating"),
        ("name: a/b\ninteractions: {path: r.csv, user: u, item: i}\n", r"key 'name'"),
        ("name: t\ninteractions: {path: r.csv, user: u, item: i}\nitem_text: {sources: [{path: m.csv, item: i, "
         "columns: [x], replace: {y: {a: b}}}]}\n", r"item_text\.sources\[0\]\.replace\.y': is not one of the text columns"),
        ("- just a list\n", r"expected a mapping"),
    ],
)
def test_config_errors_name_file_and_key(tmp_path, yaml_text, message):
    path = write(tmp_path, "cfg.yaml", yaml_text)
    with pytest.raises(ReaderConfigError, match=message) as err:
        load_reader_config(path)
    assert str(path) in str(err.value)


def test_docs_example_config_reads(tmp_path):
    """The 'your own CSV' example of docs/data.md stays a working config."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "data.md").read_text()
    example = next(b for b in doc.split("```yaml\n")[1:] if "name: shop" in b).split("```")[0]
    write(tmp_path, "events.csv", "customer,sku,event_time,stars\n" + "".join(
        f"c{c},S{s},{1000 * c + s},{1 + (c + s) % 5}\n" for c in range(12) for s in range(12)))
    write(tmp_path, "products.tsv", "sku\tname\tbrand\n" + "".join(f"S{s}\tshoe {s}\tAcme\n" for s in range(12)))
    data, report = read_dataset(load_reader_config(write(tmp_path, "shop.yaml", example)))
    below = sum((c + s) % 5 < 2 for c in range(12) for s in range(12))  # stars 1-2
    assert data.name == "shop" and data.kcore == 5 and report.rows_below_min_rating == below
    assert data.num_interactions == 144 - below and data.lengths().min() >= 5
    assert data.item_text[0] == "shoe 0 by Acme"


def test_relative_paths_resolve_against_the_config_file(tmp_path):
    write(tmp_path, "r.csv", "u,i\n1,2\n")
    cfg = load_reader_config(write(tmp_path, "cfg.yaml", "name: t\ninteractions: {path: r.csv, user: u, item: i}\n"))
    assert cfg.interactions.path == str(tmp_path / "r.csv")
    assert read_dataset(cfg)[0].num_interactions == 1


# ---- malformed input --------------------------------------------------------------------------------
def test_missing_file(tmp_path):
    with pytest.raises(InputDataError, match=r"nope\.csv: input file not found"):
        read(config(tmp_path / "nope.csv"))


def test_missing_column_lists_the_header(tmp_path):
    p = write(tmp_path, "r.csv", "user,i\n1,2\n")
    with pytest.raises(InputDataError, match=r"r\.csv: no column 'u' in the header \(columns: user, i\)"):
        read(config(p))
    q = write(tmp_path, "r.txt", "1 2\n")
    with pytest.raises(InputDataError, match=r"r\.txt: column position 2 requested but line 1 has 2 columns"):
        read({"name": "t", "interactions": {"path": str(q), "format": "whitespace", "header": False, "user": 0, "item": 2}})


def test_non_integer_timestamp_names_the_line(tmp_path):
    p = write(tmp_path, "r.csv", "u,i,t\n1,2,10\n\n1,3,11.5\n")  # the blank line still counts as a line
    with pytest.raises(InputDataError, match=r"r\.csv:4: column 't' \(timestamp\) is '11\.5', expected an integer") as err:
        read(config(p, timestamp="t"))
    assert str(p) in str(err.value)


def test_wrong_field_count_names_the_line(tmp_path):
    p = write(tmp_path, "r.txt", "1 2\n1 3\n\n2 4 9\n")
    with pytest.raises(InputDataError, match=r"r\.txt:4: expected 2 fields, got 3: '2 4 9'"):
        read({"name": "t", "interactions": {"path": str(p), "format": "whitespace", "header": False, "user": 0, "item": 1}})


def test_empty_tables(tmp_path):
    with pytest.raises(InputDataError, match=r"e\.csv: file is empty"):
        read(config(write(tmp_path, "e.csv", "")))
    with pytest.raises(InputDataError, match=r"h\.csv: no data rows"):
        read(config(write(tmp_path, "h.csv", "u,i\n")))
    par = tmp_path / "e.parquet"
    pq.write_table(pa.table({"u": pa.array([], pa.string()), "i": pa.array([], pa.string())}), par)
    with pytest.raises(InputDataError, match=r"e\.parquet: no rows"):
        read(config(par))


def test_empty_ids_and_bad_values(tmp_path):
    p = write(tmp_path, "r.csv", "u,i\n1,2\n,3\n")
    with pytest.raises(InputDataError, match=r"r\.csv:3: column 'u' \(user id\) is empty"):
        read(config(p))
    q = write(tmp_path, "s.csv", "u,i,r\n1,2,4\n1,3,good\n")
    with pytest.raises(InputDataError, match=r"s\.csv:3: column 'r' \(rating\) is 'good', expected a number"):
        read(config(q, rating="r"))
    par = tmp_path / "r.parquet"
    pq.write_table(pa.table({"u": [1, 2], "i": [1.0, 2.0]}), par)
    with pytest.raises(InputDataError, match=r"r\.parquet: column 'i' \(item id\) has type double"):
        read(config(par))
    par2 = tmp_path / "s.parquet"
    pq.write_table(pa.table({"u": [1, 2], "i": [1, None]}), par2)
    with pytest.raises(InputDataError, match=r"s\.parquet: row 1: column 'i' \(item id\) is empty"):
        read(config(par2))
