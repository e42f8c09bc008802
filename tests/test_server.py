"""The embedded server against the real, unmodified SDK ``aperturedb.Connector``:
wire protocol, TLS, sessions and the command interpreter."""

from __future__ import annotations

import os

os.environ["ADB_LOG_FILE"] = ""  # before any aperturedb import: no error.<time>.log files

import json
import socket
import ssl
import subprocess
import sys
import threading
import time

import pytest

from aperturedb_pool.testing import EmbeddedServer
from aperturedb_pool.testing._wire import HELLO, LENGTH, frame, query_message_class

FAST = {"retry_interval_seconds": 0.01}


def fast(server, **kw):
    return server.connector(**{**FAST, **kw})


@pytest.fixture
def server():
    with EmbeddedServer() as s:
        yield s
        # No test of this module shares a connector between threads.
        assert s.counters()["sharing_violations"] == 0


def status(resp):
    return resp[0][next(iter(resp[0]))]["status"]


# ------------------------------------------------------------------ basics


def test_import_is_light():
    code = ("import sys, aperturedb_pool.testing, aperturedb_pool.testing.pytest_plugin; "
            "from aperturedb_pool.testing import EmbeddedServer, ServerProcess, ServerControl; "
            "bad = [m for m in ('aperturedb', 'trustme') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_tcp_getstatus_and_counters(server):
    c = fast(server)
    r, blobs = c.query([{"GetStatus": {}}])
    assert r[0]["GetStatus"]["status"] == 0
    assert r[0]["GetStatus"]["system"] == "ApertureDB"
    assert blobs == []
    k = server.counters()
    assert k["accepted"] == 1 and k["open"] == 1
    assert k["authenticate"] == 1
    assert k["requests"] == 2
    assert k["requests_by_command"] == {"Authenticate": 1, "GetStatus": 1}
    c.close()


def test_address_and_stop_releases_everything():
    before = set(threading.enumerate())
    fds_before = len(os.listdir("/proc/self/fd"))
    s = EmbeddedServer().start()
    assert s.address == ("127.0.0.1", s.port) and s.port > 0
    c = fast(s)
    c.query([{"GetStatus": {}}])
    s.stop()
    s.stop()  # idempotent
    c.close()
    assert set(threading.enumerate()) <= before
    assert len(os.listdir("/proc/self/fd")) <= fds_before
    with pytest.raises(OSError):
        socket.create_connection(s.address, timeout=1).close()


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_tls_with_hostname_verification(host):
    with EmbeddedServer(tls=True) as s:
        assert s.ca_path and os.path.isfile(s.ca_path)
        c = fast(s, host=host)
        assert status(c.query([{"GetStatus": {}}])[0]) == 0
        assert isinstance(c.conn, ssl.SSLSocket)
        c.close()
        ca_path = s.ca_path
    assert not os.path.exists(ca_path)  # the generated CA is removed on stop


def test_tls_untrusted_certificate_is_refused():
    with EmbeddedServer(tls=True) as s:
        c = s.connector(ca_cert=None, retry_max_attempts=1)  # system CAs: ours is unknown
        with pytest.raises(AssertionError, match="Certificate verification failed"):
            c.query([{"GetStatus": {}}])


@pytest.mark.parametrize("server_tls", [True, False])
def test_protocol_mismatch_is_refused_by_the_client(server_tls):
    with EmbeddedServer(tls=server_tls) as s:
        c = s.connector(use_ssl=not server_tls, retry_max_attempts=1)
        with pytest.raises(Exception, match="did not accept protocol"):
            c.query([{"GetStatus": {}}])
        assert s.counters()["hello_rejected"] >= 1
        assert s.counters()["accepted"] == 0


def _recv_exact(sock, n):
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return buf
        buf += chunk
    return buf


def test_wrong_version_answered_zero_then_closed(server):
    with socket.create_connection(server.address, timeout=5) as sock:
        sock.sendall(frame(HELLO.pack(7, 1)))
        head = _recv_exact(sock, 4)
        assert LENGTH.unpack(head)[0] == 8
        assert HELLO.unpack(_recv_exact(sock, 8)) == (0, 0)
        assert sock.recv(1) == b""  # closed
    assert server.counters()["hello_rejected"] == 1


def test_hello_and_request_arriving_byte_by_byte(server):
    qm = query_message_class()
    with socket.create_connection(server.address, timeout=5) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for b in frame(HELLO.pack(1, 1)):
            sock.send(bytes([b]))
        assert HELLO.unpack(_recv_exact(sock, 12)[4:]) == (1, 1)
        req = qm(json=json.dumps([{"Authenticate": {"username": "admin", "password": "admin"}}]))
        data = frame(req.SerializeToString())
        sock.send(data[:2])
        sock.send(data[2:5])
        sock.send(data[5:])
        (n,) = LENGTH.unpack(_recv_exact(sock, 4))
        reply = qm()
        reply.ParseFromString(_recv_exact(sock, n))
        assert json.loads(reply.json)[0]["Authenticate"]["status"] == 0


def test_peak_open_counts_the_most_clients_at_once_and_restarts_at_reset(server):
    conns = [fast(server) for _ in range(3)]
    for c in conns:
        c.query([{"GetStatus": {}}])
    conns[0].close()
    conns[1].close()
    # Wait until the server saw both closes (the loop thread counts them).
    deadline = time.monotonic() + 10
    while server.counters()["open"] != 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert server.counters()["peak_open"] == 3
    server.reset_counters()
    assert server.counters()["peak_open"] == 1  # what is open now, not zero
    again = [fast(server) for _ in range(2)]
    for c in again:
        c.query([{"GetStatus": {}}])
    assert server.counters()["peak_open"] == 3
    for c in again + conns[2:]:
        c.close()


# ------------------------------------------------------------------ sessions


def test_eight_clones_authenticate_once(server):
    template = fast(server)
    clones = [template.clone() for _ in range(8)]
    errors = []

    def work(c):
        try:
            for _ in range(20):
                assert status(c.query([{"GetStatus": {}}])[0]) == 0
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(c,)) for c in clones]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    k = server.counters()
    assert k["authenticate"] == 1
    assert k["accepted"] == 8
    assert k["requests_by_command"]["GetStatus"] == 160
    for c in clones:
        c.close()


def test_short_session_ttl_refreshes_and_every_query_succeeds(monkeypatch):
    monkeypatch.setenv("SESSION_EXPIRY_OFFSET_SEC", "0")
    with EmbeddedServer(session_ttl=0.15, refresh_ttl=5) as s:
        c = fast(s)
        clone = c.clone()
        deadline = time.monotonic() + 10
        n = 0
        while s.counters()["refresh"] < 3:
            assert time.monotonic() < deadline, "no refreshes happened"
            for conn in (c, clone):
                r, _ = conn.query([{"GetStatus": {}}])
                assert status(r) == 0, r
                n += 1
        k = s.counters()
        assert k["authenticate"] == 1
        assert k["refresh_failed"] == 0
        # A query rejected at the edge of the TTL was re-sent once by the client.
        assert k["requests_by_command"]["GetStatus"] == n + k["session_rejections"]


def test_expired_session_rejected_and_not_executed():
    with EmbeddedServer(session_ttl=0.05, refresh_ttl=60) as s:
        c = fast(s)
        c.query([{"GetStatus": {}}])
        token = c.shared_data.session.session_token
        time.sleep(0.1)  # let the server-side session expire (time is the subject here)
        raw = s.connector(authenticate=False)
        raw.shared_data.session = c.shared_data.session  # send the expired token
        r, _ = raw.query([{"AddEntity": {"class": "X"}}])
        assert r == {"status": -1, "info": "Not Authenticated!", "code": "unauthenticated"}
        assert s.dump() == []
        assert s.counters()["session_rejections"] == 1
        assert token  # the token existed


def test_missing_token_rejected_and_not_executed(server):
    raw = server.connector(authenticate=False)
    r, _ = raw.query([{"AddEntity": {"class": "X"}}])
    assert r == {"status": -1, "info": "Not Authenticated!", "code": "unauthenticated"}
    assert server.dump() == []
    assert server.counters()["session_rejections"] == 1


def test_wrong_password_gets_clear_error(server):
    c = fast(server, password="nope")
    with pytest.raises(Exception, match="wrong username or password"):
        c.query([{"GetStatus": {}}])
    assert server.counters()["authenticate_failed"] == 1


def test_token_authentication():
    with EmbeddedServer(tokens=["adbp_personal"]) as s:
        c = fast(s, password="", token="adbp_personal")
        assert status(c.query([{"GetStatus": {}}])[0]) == 0
        bad = fast(s, password="", token="other")
        with pytest.raises(Exception, match="unknown or revoked token"):
            bad.query([{"GetStatus": {}}])


def test_refresh_rotates_both_tokens(server):
    c = fast(server)
    c.query([{"GetStatus": {}}])
    old = c.shared_data.session
    r, _ = c.query([{"RefreshToken": {"refresh_token": old.refresh_token}}])
    new = r[0]["RefreshToken"]
    assert new["status"] == 0
    assert new["session_token"] != old.session_token
    assert new["refresh_token"] != old.refresh_token
    assert isinstance(new["session_token_expires_in"], (int, float))
    # The old refresh token is spent, the old session token rotated away.
    r, _ = c.query([{"RefreshToken": {"refresh_token": old.refresh_token}}])
    assert r[0]["RefreshToken"]["status"] != 0
    raw = server.connector(authenticate=False)
    raw.shared_data.session = old
    assert raw.query([{"GetStatus": {}}])[0]["code"] == "unauthenticated"


def test_restart_mid_sequence_recovered_by_client_reauthentication(server):
    c = fast(server)
    for i in range(20):
        if i == 10:
            server.restart()
        r, _ = c.query([{"AddEntity": {"class": "Seq", "properties": {"i": i}}}])
        assert status(r) == 0, r
    r, _ = c.query([{"FindEntity": {"with_class": "Seq", "results": {"count": True}}}])
    assert r[0]["FindEntity"]["count"] == 20  # the store survives a restart
    k = server.counters()
    assert k["authenticate"] == 2 and k["session_rejections"] == 1 and k["dropped"] == 1


def test_no_auth_mode():
    with EmbeddedServer(auth=False) as s:
        raw = s.connector(authenticate=False)
        assert status(raw.query([{"GetStatus": {}}])[0]) == 0
        c = fast(s, password="anything")
        assert status(c.query([{"GetStatus": {}}])[0]) == 0


# ------------------------------------------------------------------ commands


def _people(c):
    q = []
    for name, age, city in [("ann", 15, "oslo"), ("bob", 20, "rome"), ("cid", 35, "oslo"),
                            ("dan", 50, "lima"), ("eve", 90, "rome")]:
        q.append({"AddEntity": {"class": "Person",
                                "properties": {"name": name, "age": age, "city": city}}})
    q.append({"AddEntity": {"class": "Dog", "properties": {"name": "rex", "age": 3}}})
    r, _ = c.query(q)
    assert all(status([x]) == 0 for x in r)


def _names(c, constraints, cls="Person"):
    r, _ = c.query([{"FindEntity": {"with_class": cls, "constraints": constraints,
                                    "results": {"list": ["name"]}}}])
    assert status(r) == 0, r
    return sorted(e["name"] for e in r[0]["FindEntity"]["entities"])


def test_constraints_property_form(server):
    c = fast(server)
    _people(c)
    assert _names(c, {"age": [">=", 20, "<", 90]}) == ["bob", "cid", "dan"]
    assert _names(c, {"age": [">=", 20], "city": ["==", "rome"]}) == ["bob", "eve"]
    assert _names(c, {"any": {"city": ["==", "lima"], "age": ["<", 18]}}) == ["ann", "dan"]
    assert _names(c, {"city": ["in", ["oslo", "lima"]]}) == ["ann", "cid", "dan"]
    assert _names(c, {"all": {"age": [">", 10], "any": {"name": ["==", "eve"],
                                                        "city": ["==", "lima"]}}}) == ["dan", "eve"]
    assert _names(c, {"missing": ["==", 1]}) == []


def test_constraints_expression_form(server):
    from aperturedb.Constraints import Constraints

    c = fast(server)
    _people(c)
    assert _names(c, ["all", ["$age", ">=", 20], ["$city", "==", "rome"]]) == ["bob", "eve"]
    assert _names(c, ["any", ["$age", "<", 18], ["all", ["$city", "==", "lima"],
                                                 ["$age", ">", 40]]]) == ["ann", "dan"]
    assert _names(c, ["$city", "in", {"array": ["oslo", "lima"]}]) == ["ann", "cid", "dan"]
    assert _names(c, ["not", ["$city", "==", "oslo"]]) == ["bob", "dan", "eve"]
    assert _names(c, Constraints().greaterequal("age", 35).less("age", 90).constraints) == [
        "cid", "dan"]


def test_find_results_limit_uniqueids_and_refs(server):
    c = fast(server)
    _people(c)
    r, _ = c.query([{"FindEntity": {"with_class": "Person", "results": {"all_properties": True,
                                                                        "count": True},
                                    "limit": 2, "uniqueids": True}}])
    f = r[0]["FindEntity"]
    assert f["returned"] == 2 and f["count"] == 2
    assert set(f["entities"][0]) == {"name", "age", "city", "_uniqueid"}
    uid = f["entities"][0]["_uniqueid"]
    r, _ = c.query([{"FindEntity": {"with_class": "Person",
                                    "constraints": {"_uniqueid": ["==", uid]},
                                    "results": {"list": ["name"]}}}])
    assert r[0]["FindEntity"]["entities"] == [{"name": f["entities"][0]["name"]}]
    # _ref binds a result set; UpdateEntity/DeleteEntity take it as "ref".
    r, _ = c.query([
        {"FindEntity": {"_ref": 1, "with_class": "Person", "constraints": {"city": ["==", "oslo"]}}},
        {"UpdateEntity": {"ref": 1, "properties": {"nordic": True}, "remove_props": ["city"]}},
    ])
    assert r[1]["UpdateEntity"] == {"status": 0, "count": 2}
    assert _names(c, {"nordic": ["==", True]}) == ["ann", "cid"]
    r, _ = c.query([{"DeleteEntity": {"with_class": "Person", "constraints": {"age": [">", 40]}}}])
    assert r[0]["DeleteEntity"] == {"status": 0, "count": 2}
    assert _names(c, None) == ["ann", "bob", "cid"]


def test_add_if_not_found(server):
    c = fast(server)
    q = [{"AddEntity": {"class": "U", "properties": {"k": 1},
                        "if_not_found": {"k": ["==", 1]}}}]
    assert c.query(q)[0][0]["AddEntity"]["status"] == 0
    assert c.query(q)[0][0]["AddEntity"]["status"] == 2  # exists
    assert len(server.dump()) == 1


def test_failing_transaction_leaves_store_unchanged(server):
    c = fast(server)
    _people(c)
    before = server.dump()
    r, _ = c.query([
        {"AddEntity": {"class": "Person", "properties": {"name": "zed"}}},
        {"UpdateEntity": {"with_class": "Person", "properties": {"age": 0}}},
        {"DeleteEntity": {"with_class": "Dog"}},
        {"FindEntity": {"with_class": "Person", "constraints": {"age": ["~~", 1]}}},
    ])
    assert r["status"] == -1 and "FindEntity" in r["info"] and "~~" in r["info"]
    assert server.dump() == before
    assert server.counters()["failed_transactions"] == 1


@pytest.mark.parametrize("query, blobs, needle", [
    ([{"Frobnicate": {}}], [], "Frobnicate"),
    ("[{\"GetStatus\": {}", [], "malformed JSON"),
    ([{"FindEntity": {"with_class": "P", "constraints": {"age": [">="]}}}], [], "FindEntity"),
    ([{"FindEntity": {"with_class": "P", "constraints": ["$age", "like", 3]}}], [], "like"),
    ([{"AddBlob": {}}], [], "AddBlob"),
    ([{"AddEntity": {"class": "P"}}], [b"extra"], "wrong number of blobs"),
    ([{"UpdateEntity": {"ref": 9}}], [], "UpdateEntity"),
    ({"GetStatus": {}}, [], "list"),
])
def test_errors_name_the_problem_and_keep_the_connection(server, query, blobs, needle):
    c = fast(server)
    r, _ = c.query(query, blobs)
    assert isinstance(r, dict) and r["status"] == -1 and needle in r["info"], r
    assert status(c.query([{"GetStatus": {}}])[0]) == 0
    assert server.counters()["accepted"] == 1


@pytest.mark.parametrize("tls", [False, True])
def test_blobs_round_trip_byte_for_byte(tls):
    big = os.urandom(10 * 2**20)
    payloads = [b"", b"\x00\x01binary\xff", big]
    with EmbeddedServer(tls=tls) as s:
        c = fast(s)
        r, _ = c.query([{"AddBlob": {"properties": {"n": i}}} for i in range(3)], payloads)
        assert [status([x]) for x in r] == [0, 0, 0]
        r, blobs = c.query([
            {"FindEntity": {"with_class": "Nothing", "results": {"count": True}}},
            {"FindBlob": {"blobs": True, "constraints": {"n": [">=", 0]},
                          "results": {"list": ["n"]}}},
        ])
        f = r[1]["FindBlob"]
        assert f["returned"] == 3 and f["blobs_start"] == 0
        by_n = {e["n"]: blobs[e["_blob_index"]] for e in f["entities"]}
        assert by_n[0] == b"" and by_n[1] == payloads[1] and by_n[2] == big
        r, _ = c.query([{"DeleteBlob": {"constraints": {"n": ["==", 2]}}}])
        assert r[0]["DeleteBlob"]["count"] == 1
        r, blobs = c.query([{"FindBlob": {"blobs": True}}])
        assert sorted(blobs) == sorted(payloads[:2])


def test_getschema_summary_and_count_entities(server, capsys):
    from aperturedb.Utils import Utils

    c = fast(server)
    _people(c)
    u = Utils(c)
    assert u.count_entities("Person") == 5
    assert u.count_entities("Person", {"age": [">=", 35]}) == 3
    u.summary()
    out = capsys.readouterr().out
    assert "Person" in out and "Total nodes: 6" in out
    schema = u.get_schema()
    assert schema["entities"]["classes"]["Person"]["matched"] == 5
    assert schema["entities"]["classes"]["Person"]["properties"]["age"][0] == 5


def test_pytest_plugin_fixtures(adb_server, adb_connector):
    r, _ = adb_connector.query([{"GetStatus": {}}])
    assert status(r) == 0
    assert adb_server.counters()["authenticate"] == 1


def test_pytest_plugin_tls_fixtures(adb_tls_server, adb_tls_connector):
    assert status(adb_tls_connector.query([{"GetStatus": {}}])[0]) == 0
    assert adb_tls_server.ca_path is not None


def test_pipelined_requests_count_as_sharing():
    """Two requests in one write, the second sent before the first was answered."""
    qm = query_message_class()
    with EmbeddedServer(auth=False) as s, socket.create_connection(s.address, timeout=5) as sock:
        sock.sendall(frame(HELLO.pack(1, 1)))
        _recv_exact(sock, 12)
        req = frame(qm(json=json.dumps([{"GetStatus": {}}])).SerializeToString())
        sock.sendall(req + req)
        for _ in range(2):  # both are still answered, in order
            (n,) = LENGTH.unpack(_recv_exact(sock, 4))
            reply = qm()
            reply.ParseFromString(_recv_exact(sock, n))
            assert json.loads(reply.json)[0]["GetStatus"]["status"] == 0
        assert s.counters()["sharing_violations"] == 1


def test_constraints_agree_with_the_sdk_reference():
    """FindEntity with the SDK's Constraints helper selects exactly what the SDK's
    own ``Constraints.check`` selects, on random data."""
    from aperturedb.Constraints import Conjunction, Constraints
    from hypothesis import given, settings
    from hypothesis import strategies as st

    keys = st.sampled_from(["a", "b", "c"])
    values = st.integers(min_value=0, max_value=5)
    entity = st.dictionaries(keys, values, max_size=3)
    op = st.sampled_from(["equal", "notequal", "greaterequal", "greater", "lessequal", "less",
                          "is_in"])
    pred = st.tuples(op, keys, values, st.lists(values, max_size=3))

    with EmbeddedServer() as s:
        c = fast(s)

        @settings(max_examples=60, deadline=None)
        @given(st.lists(entity, max_size=8), st.lists(pred, min_size=1, max_size=4),
               st.booleans())
        def check(entities, preds, use_any):
            cons = Constraints(Conjunction.OR if use_any else Conjunction.AND)
            for name, key, value, many in preds:
                getattr(cons, name)(key, many if name == "is_in" else value)
            q = [{"DeleteEntity": {"with_class": "H"}}]
            q += [{"AddEntity": {"class": "H", "properties": {**e, "i": i}}}
                  for i, e in enumerate(entities)]
            q.append({"FindEntity": {"with_class": "H", "constraints": cons.constraints,
                                     "results": {"list": ["i"]}}})
            r, _ = c.query(q)
            assert isinstance(r, list), r
            got = sorted(e["i"] for e in r[-1]["FindEntity"]["entities"])
            want = [i for i, e in enumerate(entities) if cons.check(e)]
            assert got == want

        check()


def test_latency_for_one_command_delays_only_its_requests(server):
    # set_latency(..., command=): the delayed query waits, a GetStatus on
    # another connection (a pool's ping of a new connector) does not.
    slow_conn, fast_conn = server.connector(), server.connector()
    find = [{"FindEntity": {"with_class": "Nobody", "results": {"count": True}}}]
    slow_conn.query(find)
    fast_conn.query([{"GetStatus": {}}])
    server.set_latency(0.6, command="FindEntity")
    done = threading.Event()
    t = threading.Thread(target=lambda: (slow_conn.query(find), done.set()), daemon=True)
    t.start()
    deadline = time.monotonic() + 10
    while server.counters()["pending"] != 1:
        assert time.monotonic() < deadline, "the FindEntity never reached the server"
        time.sleep(0.005)
    fast_conn.query([{"GetStatus": {}}])  # answered while the FindEntity waits
    assert not done.is_set()
    assert done.wait(10)
    t.join(10)
    # A refused argument changes nothing: the latency still applies to FindEntity only
    # (were the refused command kept, this GetStatus would wait 3 s).
    server.set_latency(3.0, command="FindEntity")
    with pytest.raises(ValueError, match="command"):
        server.set_latency(1.0, command="")
    with pytest.raises(ValueError, match="latency"):
        server.set_latency(-1, command="GetStatus")
    started = time.monotonic()
    fast_conn.query([{"GetStatus": {}}])
    assert time.monotonic() - started < 1.5
    server.set_latency(0)
