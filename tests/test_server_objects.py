"""The embedded server's object types beyond entities and blobs, indexes, and the
equality index, driven by the real SDK ``Connector`` and ``Utils`` (and, for the
index's invariants, the store directly)."""

from __future__ import annotations

import json
import os

os.environ["ADB_LOG_FILE"] = ""  # before any aperturedb import: no error.<time>.log files

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aperturedb_pool.testing import EmbeddedServer
from aperturedb_pool.testing._store import SUPPORTED_COMMANDS, Store, _Transaction

DELETES = ["DeleteImage", "DeleteVideo", "DeleteBlob", "DeleteClip", "DeleteDescriptorSet",
           "DeleteDescriptor", "DeleteBoundingBox", "DeletePolygon", "DeleteFrame",
           "DeleteEntity", "DeleteConnection"]


@pytest.fixture(scope="module")
def server():
    with EmbeddedServer(tls=True) as s:
        yield s


@pytest.fixture
def db(server):
    from aperturedb.Utils import Utils

    conn = server.connector(retry_interval_seconds=0.01)
    assert Utils(conn).remove_all_objects()
    yield conn
    conn.close()


def ok(db, query, blobs=()):
    resp, out = db.query(query, list(blobs))
    assert isinstance(resp, list), resp
    for r in resp:
        (name, body), = r.items()
        assert body["status"] in (0, 2), (name, body)
    return resp, out


def failed(db, query, blobs=()):
    resp, _ = db.query(query, list(blobs))
    assert isinstance(resp, dict) and resp["status"] == -1, resp
    return resp["info"]


def vec(*xs):
    return np.array(xs, dtype=np.float32).tobytes()


# ------------------------------------------------------------------ deletes


@pytest.mark.parametrize("command", DELETES)
def test_every_delete_answers_a_count_of_zero_on_an_empty_store(db, command):
    resp, _ = ok(db, [{command: {}}])
    assert resp == [{command: {"status": 0, "count": 0}}]
    assert command in SUPPORTED_COMMANDS


def test_remove_all_objects_empties_every_type_in_one_transaction(server, db):
    from aperturedb.Utils import Utils

    ok(db, [
        {"AddImage": {"_ref": 1, "properties": {"name": "i"}}},
        {"AddBoundingBox": {"image_ref": 1, "rectangle": {"x": 1, "y": 2, "width": 3,
                                                          "height": 4}, "label": "cat"}},
        {"AddPolygon": {"image_ref": 1, "polygons": [[[0, 0], [1, 0], [1, 1]]]}},
        {"AddVideo": {"_ref": 2}},
        {"AddClip": {"video_ref": 2, "properties": {"start": 0}}},
        {"AddFrame": {"video_ref": 2}},
        {"AddBlob": {}},
        {"AddDescriptorSet": {"name": "s", "dimensions": 2, "metric": "L2"}},
        {"AddDescriptor": {"set": "s", "label": "a"}},
        {"AddEntity": {"class": "Person", "_ref": 3}},
        {"AddEntity": {"class": "Person", "_ref": 4}},
        {"AddConnection": {"class": "knows", "src": 3, "dst": 4}},
    ], [b"img", b"video", b"blob", vec(1, 2)])
    assert server.dump() != []
    assert Utils(db).remove_all_objects()
    assert server.dump() == []
    schema, _ = ok(db, [{"GetSchema": {}}])
    assert schema[0]["GetSchema"]["entities"] is None
    assert schema[0]["GetSchema"]["connections"] is None


def test_deleting_an_object_deletes_its_connections_and_what_it_owns(db):
    ok(db, [
        {"AddImage": {"_ref": 1}},
        {"AddBoundingBox": {"image_ref": 1, "rectangle": {"x": 0, "y": 0, "width": 1,
                                                          "height": 1}}},
        {"AddEntity": {"class": "Person", "_ref": 2}},
        {"AddConnection": {"class": "in", "src": 2, "dst": 1}},
    ], [b"img"])
    resp, _ = ok(db, [{"DeleteImage": {}}])
    assert resp[0]["DeleteImage"]["count"] == 1
    resp, _ = ok(db, [{"FindBoundingBox": {"results": {"count": True}}},
                      {"FindConnection": {"results": {"count": True}}},
                      {"FindEntity": {"with_class": "Person", "results": {"count": True}}}])
    assert [r[next(iter(r))]["count"] for r in resp] == [0, 0, 1]


def test_a_failed_transaction_restores_the_deleted_objects_and_connections(server, db):
    ok(db, [{"AddEntity": {"class": "A", "_ref": 1}}, {"AddEntity": {"class": "B", "_ref": 2}},
            {"AddConnection": {"class": "ab", "src": 1, "dst": 2}}])
    before = server.dump()
    info = failed(db, [{"DeleteEntity": {"with_class": "A"}}, {"NoSuchCommand": {}}])
    assert "unknown command 'NoSuchCommand'" in info
    assert server.dump() == before
    resp, _ = ok(db, [{"FindConnection": {"with_class": "ab", "results": {"count": True}}}])
    assert resp[0]["FindConnection"]["count"] == 1


# ------------------------------------------------------------------ connections


def test_connections_found_by_class_ends_and_constraints(db):
    from aperturedb.Utils import Utils

    ok(db, [
        {"AddEntity": {"class": "Person", "_ref": 1, "properties": {"name": "ann"}}},
        {"AddEntity": {"class": "Person", "_ref": 2, "properties": {"name": "bob"}}},
        {"AddEntity": {"class": "Person", "_ref": 3, "properties": {"name": "cy"}}},
        {"AddConnection": {"class": "knows", "src": 1, "dst": 2, "properties": {"since": 1}}},
        {"AddConnection": {"class": "knows", "src": 1, "dst": 3, "properties": {"since": 5}}},
        {"AddConnection": {"class": "likes", "src": 2, "dst": 3}},
    ])
    assert Utils(db).count_connections("knows") == 2
    resp, _ = ok(db, [
        {"FindEntity": {"with_class": "Person", "_ref": 1,
                        "constraints": {"name": ["==", "ann"]}}},
        {"FindConnection": {"src": 1, "with_class": "knows",
                            "constraints": {"since": [">", 2]},
                            "results": {"all_properties": True}}},
        {"FindEntity": {"with_class": "Person", "results": {"list": ["name"]},
                        "is_connected_to": {"ref": 1, "direction": "in"}}},
    ])
    assert [e["since"] for e in resp[1]["FindConnection"]["entities"]] == [5]
    assert sorted(e["name"] for e in resp[2]["FindEntity"]["entities"]) == ["bob", "cy"]
    schema, _ = ok(db, [{"GetSchema": {}}])
    conns = schema[0]["GetSchema"]["connections"]["classes"]
    assert conns["knows"]["matched"] == 2
    assert (conns["knows"]["src"], conns["knows"]["dst"]) == ("Person", "Person")


def test_connections_survive_a_rolled_back_delete_and_go_with_a_real_one(db):
    ok(db, [{"AddEntity": {"class": "P", "_ref": 1, "properties": {"name": "me"}}},
            {"AddEntity": {"class": "P", "_ref": 2, "properties": {"name": "you"}}},
            {"AddConnection": {"class": "self", "src": 1, "dst": 1}},
            {"AddConnection": {"class": "likes", "src": 1, "dst": 2}}])
    failed(db, [{"DeleteEntity": {"with_class": "P", "constraints": {"name": ["==", "me"]}}},
                {"NoSuchCommand": {}}])
    query = [{"FindEntity": {"with_class": "P", "_ref": 1,
                             "constraints": {"name": ["==", "you"]}}},
             {"FindEntity": {"with_class": "P", "results": {"list": ["name"]},
                             "is_connected_to": {"ref": 1, "direction": "out"}}},
             {"FindConnection": {"results": {"count": True}}}]
    resp, _ = ok(db, query)
    assert resp[1]["FindEntity"]["entities"] == [{"name": "me"}]
    assert resp[2]["FindConnection"]["count"] == 2
    ok(db, [{"DeleteEntity": {"with_class": "P", "constraints": {"name": ["==", "me"]}}}])
    resp, _ = ok(db, query)
    assert resp[1]["FindEntity"]["returned"] == 0
    assert resp[2]["FindConnection"]["count"] == 0


def test_update_connection_changes_only_the_chosen_ones(db):
    ok(db, [{"AddEntity": {"class": "P", "_ref": 1}}, {"AddEntity": {"class": "P", "_ref": 2}},
            {"AddConnection": {"class": "knows", "src": 1, "dst": 2, "properties": {"w": 1}}},
            {"AddConnection": {"class": "knows", "src": 2, "dst": 1, "properties": {"w": 2}}}])
    resp, _ = ok(db, [{"UpdateConnection": {"with_class": "knows", "properties": {"w": 9},
                                            "constraints": {"w": ["==", 2]}}}])
    assert resp[0]["UpdateConnection"]["count"] == 1
    resp, _ = ok(db, [{"FindConnection": {"with_class": "knows",
                                          "results": {"list": ["w"], "sort": "w"}}}])
    assert resp[0]["FindConnection"]["entities"] == [{"w": 1}, {"w": 9}]


def test_add_connection_needs_both_ends(db):
    ok(db, [{"AddEntity": {"class": "A"}}])
    info = failed(db, [{"FindEntity": {"with_class": "A", "_ref": 1}},
                       {"AddConnection": {"class": "c", "src": 1}}])
    assert "'dst' is required" in info


# ------------------------------------------------------------------ bounding boxes


def test_bounding_boxes_of_an_image_with_coordinates_and_labels(db):
    from aperturedb.Utils import Utils

    ok(db, [{"AddImage": {"_ref": 1}},
            {"AddBoundingBox": {"image_ref": 1, "label": "dog",
                                "rectangle": {"x": 10, "y": 20, "width": 30, "height": 40}}}],
       [b"img"])
    assert Utils(db).count_bboxes() == 1
    resp, _ = ok(db, [{"FindImage": {"_ref": 1}},
                      {"FindBoundingBox": {"is_connected_to": {"ref": 1}, "coordinates": True,
                                           "labels": True}}])
    (box,) = resp[1]["FindBoundingBox"]["entities"]
    assert box["_coordinates"] == {"x": 10, "y": 20, "width": 30, "height": 40}
    assert box["_label"] == "dog"
    info = failed(db, [{"AddBoundingBox": {"rectangle": {"x": 0, "y": 0, "width": "w",
                                                         "height": 1}}}])
    assert "'width' must be a number" in info


def test_polygons_clips_and_frames_follow_their_image_or_video(db):
    ok(db, [{"AddImage": {"_ref": 1}},
            {"AddPolygon": {"image_ref": 1, "label": "roof",
                            "polygons": [[[0, 0], [4, 0], [4, 3]]]}},
            {"AddVideo": {"_ref": 2, "properties": {"name": "v"}}},
            {"AddClip": {"video_ref": 2, "label": "intro", "properties": {"start": 0}}},
            {"AddFrame": {"video_ref": 2, "properties": {"number": 7}}}],
       [b"img", b"video"])
    resp, _ = ok(db, [{"FindPolygon": {"vertices": True, "labels": True}},
                      {"FindVideo": {"_ref": 1}},
                      {"FindClip": {"is_connected_to": {"ref": 1}, "labels": True}},
                      {"FindFrame": {"is_connected_to": {"ref": 1},
                                     "results": {"list": ["number"]}}}])
    (poly,) = resp[0]["FindPolygon"]["entities"]
    assert poly == {"_vertices": [[[0, 0], [4, 0], [4, 3]]], "_label": "roof"}
    assert resp[2]["FindClip"]["entities"] == [{"_label": "intro"}]
    assert resp[3]["FindFrame"]["entities"] == [{"number": 7}]
    info = failed(db, [{"FindImage": {"_ref": 1}}, {"AddClip": {"video_ref": 1}}])
    assert "'video_ref' must reference exactly one Video" in info
    resp, _ = ok(db, [{"DeleteVideo": {}}, {"FindClip": {"results": {"count": True}}},
                      {"FindFrame": {"results": {"count": True}}},
                      {"FindPolygon": {"results": {"count": True}}}])
    # The video's clip and frame went with it; the image's polygon stayed.
    assert [r[next(iter(r))]["count"] for r in resp] == [1, 0, 0, 1]


# ------------------------------------------------------------------ descriptors


@pytest.mark.parametrize("metric", ["L2", "CS"])
def test_find_descriptor_is_the_exact_k_nearest_neighbours(db, metric):
    rng = np.random.default_rng(7)
    points = rng.normal(size=(60, 8)).astype(np.float32)
    query = rng.normal(size=8).astype(np.float32)
    ok(db, [{"AddDescriptorSet": {"name": "faces", "dimensions": 8, "metric": [metric]}}])
    ok(db, [{"AddDescriptor": {"set": "faces", "label": f"p{i}",
                               "properties": {"i": i}}} for i in range(60)],
       [p.tobytes() for p in points])
    resp, blobs = ok(db, [{"FindDescriptor": {"set": "faces", "k_neighbors": 5,
                                              "distances": True, "blobs": True,
                                              "results": {"all_properties": True}}}],
                     [query.tobytes()])
    found = resp[0]["FindDescriptor"]["entities"]
    if metric == "L2":
        score = ((points - query) ** 2).sum(axis=1)
        expect = np.argsort(score)[:5]
    else:
        score = points @ query / (np.linalg.norm(points, axis=1) * np.linalg.norm(query))
        expect = np.argsort(-score)[:5]
    assert [e["i"] for e in found] == [int(i) for i in expect]
    assert [e["_distance"] for e in found] == pytest.approx([float(score[i]) for i in expect],
                                                            rel=1e-5)
    assert np.frombuffer(blobs[0], dtype=np.float32).tolist() == points[expect[0]].tolist()


def test_descriptor_sets_counted_listed_and_checked(db):
    from aperturedb.Utils import Utils

    utils = Utils(db)
    assert utils.add_descriptorset("a", 3, metric=["L2"])
    assert utils.get_descriptorset_list() == ["a"]
    assert utils.count_descriptorsets() == 1
    ok(db, [{"AddDescriptor": {"set": "a"}}], [vec(1, 2, 3)])
    assert utils.count_descriptors_in_set("a") == 1
    assert "need 12 (float32)" in failed(db, [{"AddDescriptor": {"set": "a"}}], [vec(1, 2)])
    assert "'b' does not exist" in failed(db, [{"AddDescriptor": {"set": "b"}}], [vec(1)])
    assert "already exists" in failed(db, [{"AddDescriptorSet": {"name": "a",
                                                                 "dimensions": 3}}])
    assert utils.remove_descriptorset("a")
    assert utils.count_descriptorsets() == 0
    resp, _ = ok(db, [{"FindDescriptor": {"results": {"count": True}}}])
    assert resp[0]["FindDescriptor"]["count"] == 0


# ------------------------------------------------------------------ indexes


def test_create_get_remove_index_stay_consistent(db):
    from aperturedb.Utils import Utils

    utils = Utils(db)
    assert utils.create_entity_index("Person", "name")
    assert utils.create_entity_index("Person", "name")  # twice: status 2, accepted
    assert utils.create_connection_index("knows", "since")
    assert utils.get_indexed_props("Person") == ["name"]
    assert utils.get_indexed_props("knows", type="connections") == ["since"]
    ok(db, [{"AddEntity": {"class": "Person", "properties": {"name": "x", "age": 3}}}])
    schema, _ = ok(db, [{"GetSchema": {}}])
    props = schema[0]["GetSchema"]["entities"]["classes"]["Person"]["properties"]
    assert props["name"][1] is True and props["age"][1] is False
    assert {(i["target"], i["class"], i["property"]) for i in utils.get_indexes()} >= {
        ("entity", "Person", "name"), ("connection", "knows", "since"),
        ("entity", "_DescriptorSet", "_name")}
    info = failed(db, [{"RemoveIndex": {"target": "entity", "class": "_DescriptorSet",
                                        "property": "_name", "kind": "ordered"}}])
    assert "built-in" in info
    assert utils.remove_all_indexes()
    assert utils.get_indexed_props("Person") == []
    info = failed(db, [{"RemoveIndex": {"target": "entity", "class": "Person",
                                        "property": "name", "kind": "ordered"}}])
    assert "there is no ordered index" in info
    # A failed transaction leaves no index behind.
    failed(db, [{"CreateIndex": {"target": "entity", "class": "P", "property": "x"}},
                {"NoSuchCommand": {}}])
    assert utils.get_indexed_props("P") == []


# ------------------------------------------------------------------ values


def test_all_properties_include_the_uniqueid(db):
    ok(db, [{"AddEntity": {"class": "P", "properties": {"a": 1}}}])
    resp, _ = ok(db, [{"FindEntity": {"with_class": "P", "results": {"all_properties": True}}}])
    (e,) = resp[0]["FindEntity"]["entities"]
    assert e["a"] == 1 and isinstance(e["_uniqueid"], str)
    resp, _ = ok(db, [{"FindEntity": {"constraints": {"_uniqueid": ["==", e["_uniqueid"]]},
                                      "results": {"count": True}}}])
    assert resp[0]["FindEntity"]["count"] == 1


@pytest.mark.parametrize("bad", ["yesterday", "2024-13-01", 17])
def test_an_invalid_date_is_rejected_with_the_property_named(db, bad):
    info = failed(db, [{"AddEntity": {"class": "P", "properties": {"born": {"_date": bad}}}}])
    assert "'born'" in info and "invalid _date" in info


def test_a_valid_date_is_stored_and_compared(db):
    ok(db, [{"AddEntity": {"class": "P", "properties": {"born": {"_date": "2020-01-02T03:04:05Z"}}}}])
    resp, _ = ok(db, [{"FindEntity": {"with_class": "P", "results": {"count": True},
                                      "constraints": {"born": [">", {"_date": "2019-12-31"}]}}}])
    assert resp[0]["FindEntity"]["count"] == 1


# ------------------------------------------------------------------ the equality index


def test_an_equality_lookup_reads_one_bucket_not_the_class():
    store = Store()
    store.execute([{"AddEntity": {"class": "P", "properties": {"k": i}}}
                   for i in range(2000)], [])
    tx = _Transaction(store, [])
    assert len(list(tx._candidates("P", {"k": ["==", 1234]}))) == 1
    assert len(list(tx._candidates("P", ["all", ["$k", "==", 7], ["$k", "<", 9]]))) == 1
    # Without an equality test every object of the class is a candidate.
    assert len(list(tx._candidates("P", {"k": [">", 5]}))) == 2000
    resp, _ = store.execute([{"AddEntity": {"class": "P", "properties": {"k": 1234},
                                            "if_not_found": {"k": ["==", 1234]}}}], [])
    assert resp[0]["AddEntity"]["status"] == 2 and store.count("P") == 2000


VALUES = st.one_of(st.integers(-2, 2), st.sampled_from(["a", "b", 1.0, True, None]),
                   st.lists(st.integers(0, 1), max_size=2),
                   st.just({"_date": "2020-01-01"}), st.just(float("nan")))
PROPS = st.dictionaries(st.sampled_from(["k", "j"]), VALUES, max_size=2)
WHERE = st.tuples(st.sampled_from(["k", "j"]), VALUES.filter(lambda v: not isinstance(v, list)))
OPS = st.lists(st.one_of(
    st.tuples(st.just("add"), PROPS, st.booleans()),
    st.tuples(st.just("update"), WHERE, PROPS, st.booleans()),
    st.tuples(st.just("delete"), WHERE, st.booleans()),
    st.tuples(st.just("find"), WHERE),
), max_size=25)


def _scan(store, prop, value):
    """The answer without any index: compare every object of the class."""
    return sorted(e.uid for e in store.by_class.get("P", {}).values()
                  if prop in e.props and _eq(e.props[prop], value))


def _eq(a, b):
    from aperturedb_pool.testing._store import _compare

    return _compare("==", a, b, "scan")


@settings(max_examples=150, deadline=None)
@given(OPS)
def test_indexed_answers_equal_scanning_answers(ops):
    store = Store()
    for op in ops:
        fail = [{"NoSuchCommand": {}}] if op[-1] is True and op[0] != "find" else []
        if op[0] == "add":
            _, props, _ = op
            store.execute([{"AddEntity": {"class": "P", "properties": props}}] + fail, [])
        elif op[0] == "update":
            _, (prop, value), props, _ = op
            store.execute([{"UpdateEntity": {"with_class": "P", "properties": props,
                                             "remove_props": ["j"],
                                             "constraints": {prop: ["==", value]}}}] + fail, [])
        elif op[0] == "delete":
            _, (prop, value), _ = op
            store.execute([{"DeleteEntity": {"with_class": "P",
                                             "constraints": [
                                                 "all", [f"${prop}", "==", value]]}}] + fail, [])
        # After every step the index (built on first use) agrees with a scan.
        for prop in ("k", "j"):
            for value in (0, 1, "a", None, True, "2020-01-01"):
                resp, _ = store.execute([{"FindEntity": {
                    "with_class": "P", "uniqueids": True,
                    "constraints": {prop: ["==", value]}}}], [])
                got = sorted(int(e["_uniqueid"].split(".")[0])
                             for e in resp[0]["FindEntity"].get("entities", []))
                assert got == _scan(store, prop, value), (prop, value)
        # Two equality tests: the smallest bucket is read, both still decide.
        for kv, jv in ((0, 1), (1, "a"), (None, True)):
            resp, _ = store.execute([{"FindEntity": {
                "with_class": "P", "uniqueids": True,
                "constraints": ["all", ["$k", "==", kv], ["$j", "==", jv]]}}], [])
            got = sorted(int(e["_uniqueid"].split(".")[0])
                         for e in resp[0]["FindEntity"].get("entities", []))
            assert got == sorted(set(_scan(store, "k", kv)) & set(_scan(store, "j", jv)))


def _state(store):
    """Everything a query can change, comparable by value."""
    conns = sorted((c.uid, c.cls, c.src, c.dst, repr(c.props))
                   for c in store.connections.values())
    edges = sorted((k, sorted(c.uid for c in v)) for k, v in store.edges.items())
    return store.dump(), conns, edges, sorted(store.declared)


COMMANDS = st.sampled_from([
    [{"AddEntity": {"class": "P", "_ref": 1, "properties": {"k": 1}}},
     {"AddBlob": {"connect": {"ref": 1, "class": "has"}}}],
    [{"AddImage": {"_ref": 1, "properties": {"k": 2}}},
     {"AddBoundingBox": {"image_ref": 1, "rectangle": {"x": 0, "y": 0, "width": 1,
                                                       "height": 1}}}],
    [{"FindEntity": {"with_class": "P", "_ref": 1}},
     {"FindImage": {"_ref": 2}},
     {"AddConnection": {"class": "sees", "src": 1, "dst": 2}}],
    [{"DeleteEntity": {"with_class": "P", "constraints": {"k": ["==", 1]}}}],
    [{"DeleteImage": {}}],
    [{"UpdateEntity": {"with_class": "P", "properties": {"k": 3}}}],
    [{"UpdateEntity": {"with_class": "P", "properties": {"k": 1}}}],
    [{"DeleteConnection": {"with_class": "sees"}}],
    [{"CreateIndex": {"target": "entity", "class": "P", "property": "j"}}],
])


@settings(max_examples=100, deadline=None)
@given(st.lists(COMMANDS, max_size=8), st.lists(COMMANDS, max_size=4), COMMANDS)
def test_a_failed_query_leaves_objects_connections_and_indexes_as_they_were(setup, plain, last):
    store = Store()
    for query in setup:
        store.execute(query, [b"x"] * sum(1 for c in query if "AddBlob" in c or "AddImage" in c))
    before = _state(store)
    # Commands of several groups without '_ref' (refs are unique per query), then one
    # whole group, then a command that fails.
    query = [cmd for q in plain for cmd in q if "ref" not in json.dumps(cmd)] + last
    resp, _ = store.execute(query + [{"NoSuchCommand": {}}],
                            [b"x"] * sum(1 for c in query if "AddBlob" in c or "AddImage" in c))
    assert isinstance(resp, dict) and resp["status"] == -1
    assert _state(store) == before
    # The equality index still answers as a scan does.
    for value in (1, 2, 3):
        found, _ = store.execute([{"FindEntity": {"with_class": "P", "uniqueids": True,
                                                  "constraints": {"k": ["==", value]}}}], [])
        got = sorted(int(e["_uniqueid"].split(".")[0])
                     for e in found[0]["FindEntity"].get("entities", []))
        assert got == _scan(store, "k", value)
