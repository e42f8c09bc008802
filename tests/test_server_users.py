"""Users, roles and personal tokens of the embedded server, with the real SDK Connector."""

from __future__ import annotations

import os

os.environ["ADB_LOG_FILE"] = ""  # before any aperturedb import: no error.<time>.log files

from dataclasses import replace

import pytest

from aperturedb_pool.testing import EmbeddedServer


@pytest.fixture
def server():
    with EmbeddedServer() as s:
        yield s


@pytest.fixture
def admin(server):
    c = server.connector(retry_interval_seconds=0.01)
    yield c
    c.close()


def run(client, command, **params):
    resp, _ = client.query([{command: params}])
    assert isinstance(resp, list), resp
    assert resp[0][command]["status"] == 0, resp
    return resp[0][command]


def as_user(admin, username, password="pw1", token=None):
    return type(admin)(config=replace(admin.config, username=username, password=password,
                                      token=token))


@pytest.fixture
def writer(admin):
    run(admin, "CreateRole", name="writer", objects={"read": True, "create": True})
    run(admin, "CreateUser", username="ann", password="pw1", roles=["writer"])
    c = as_user(admin, "ann")
    yield c
    c.close()


def test_a_role_grants_exactly_its_permissions_and_changes_apply_at_once(server, admin, writer):
    run(writer, "AddEntity", **{"class": "Note"})
    resp, _ = writer.query([{"DeleteEntity": {"with_class": "Note"}}])
    assert resp["status"] == -1 and "do not grant 'delete'" in resp["info"]
    resp, _ = writer.query([{"CreateUser": {"username": "x", "password": "y"}}])
    assert resp["status"] == -1 and "may not manage users" in resp["info"]
    run(admin, "UpdateRole", name="writer", objects={"create": False})
    resp, _ = writer.query([{"AddEntity": {"class": "Note"}}])
    assert resp["status"] == -1
    assert run(admin, "FindEntity", with_class="Note", results={"count": True})["count"] == 1
    assert server.counters()["failed_transactions"] == 3


def test_a_user_change_ends_its_sessions_and_the_sdk_logs_in_again(server, admin, writer):
    run(writer, "AddEntity", **{"class": "Note"})
    old = writer.shared_data.session
    before = server.counters()
    run(admin, "UpdateUser", username="ann", email="ann@example.test")
    run(writer, "AddEntity", **{"class": "Note"})
    after = server.counters()
    assert writer.shared_data.session is not old
    assert after["session_rejections"] - before["session_rejections"] == 1
    assert after["refresh_failed"] - before["refresh_failed"] == 1
    assert after["authenticate"] - before["authenticate"] == 1
    # The admin's own session was not touched.
    assert run(admin, "FindEntity", with_class="Note", results={"count": True})["count"] == 2


def test_a_changed_password_refuses_the_old_one(admin, writer):
    run(writer, "AddEntity", **{"class": "Note"})
    run(admin, "UpdateUser", username="ann", password="pw2")
    with pytest.raises(Exception, match="wrong username or password"):
        writer.query([{"AddEntity": {"class": "Note"}}])
    assert run(admin, "FindEntity", with_class="Note", results={"count": True})["count"] == 1


def test_personal_tokens_log_in_until_removed_by_their_id(admin, writer):
    token = run(admin, "GenerateToken")["token"]
    assert token.startswith("adbp_") and len(token) > 13
    c = as_user(admin, None, password="", token=token)
    with pytest.raises(Exception, match="unknown or revoked token"):  # not given to anyone
        c.query([{"FindEntity": {"with_class": "Note"}}])
    run(admin, "UpdateUser", username="ann", add_tokens=[token])
    c = as_user(admin, None, password="", token=token)
    run(c, "AddEntity", **{"class": "Note"})
    run(admin, "UpdateUser", username="ann", remove_tokens=[token[:13]])
    with pytest.raises(Exception, match="unknown or revoked token"):
        c.query([{"AddEntity": {"class": "Note"}}])
    c.close()


def test_a_failing_user_query_changes_nothing(admin):
    resp, _ = admin.query([{"CreateRole": {"name": "r"}},
                           {"CreateUser": {"username": "bob", "password": "p",
                                           "roles": ["nope"]}}])
    assert resp["status"] == -1 and "unknown roles ['nope']" in resp["info"]
    resp, _ = admin.query([{"CreateRole": {"name": "r"}}])
    assert resp[0]["CreateRole"]["status"] == 0  # "r" was not left behind


def test_user_commands_do_not_share_a_query_with_data_commands(admin):
    resp, _ = admin.query([{"CreateRole": {"name": "r"}}, {"FindEntity": {}}])
    assert resp["status"] == -1 and "must not share a query" in resp["info"]


def test_a_role_still_held_cannot_be_removed(admin, writer):
    resp, _ = admin.query([{"RemoveRole": {"name": "writer"}}])
    assert resp["status"] == -1 and "still held by ['ann']" in resp["info"]
    run(admin, "RemoveUser", username="ann")
    run(admin, "RemoveRole", name="writer")


def test_get_users_and_roles_list_them_without_secrets(admin, writer):
    token = run(admin, "GenerateToken")["token"]
    run(admin, "UpdateUser", username="ann", add_tokens=[token], email="a@example.test")
    users = run(admin, "GetUsers")["users"]
    assert users == [{"username": "ann", "roles": ["writer"], "email": "a@example.test",
                      "tokens": [token[:13]]}]
    roles = run(admin, "GetRoles")["roles"]
    assert roles == [{"name": "writer", "objects": {"read": True, "create": True,
                                                    "update": False, "delete": False}}]
