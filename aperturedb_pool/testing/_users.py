"""Users, roles and personal tokens of the embedded server (loop thread only).

The configured user (``admin`` by default) may do everything and is not
stored here. Other users are created with ``CreateUser``; each has roles, and
a role grants object permissions ``read``, ``create``, ``update``, ``delete``
(``CreateRole``/``UpdateRole`` ``objects``; ``UpdateRole`` changes only the
keys it names). A user's queries are checked against the union of the
permissions of its roles when they run, so a role change applies at once.

Any change of a user (``UpdateUser``, ``RemoveUser``) ends that user's
sessions and refresh tokens: the next query is answered "Not Authenticated!",
the SDK's refresh fails, and it logs in again with its password or token (the
behaviour SDK 0.5.3's SessionSecurity tests expect of the real server).

Personal tokens: ``GenerateToken`` returns ``adbp_<8 hex>_<secret>``; a token
logs in only once ``UpdateUser add_tokens`` gave it to a user.
``remove_tokens`` takes the whole token or its first 13 characters (its id, as
the SDK's tests send it). Permission errors are failed transactions
``{"status": -1, "info": ...}`` (an assumption: the SDK only checks the status).
"""

from __future__ import annotations

import secrets
from typing import Any

# Commands of this module; a query holding one must hold only these.
USER_COMMANDS = frozenset(["CreateRole", "UpdateRole", "RemoveRole", "CreateUser",
                           "UpdateUser", "RemoveUser", "GenerateToken", "GetUsers",
                           "GetRoles"])
PERMISSIONS = ("read", "create", "update", "delete")
TOKEN_ID_LENGTH = 13  # "adbp_" + 8 hex digits

# The permission each verb of a data command needs.
_VERB_PERMISSION = (("Find", "read"), ("Get", "read"), ("Add", "create"),
                    ("Update", "update"), ("Delete", "delete"),
                    ("Create", "create"), ("Remove", "delete"))


class UserError(Exception):
    """A user-management command is invalid; the message names the cause."""


class Users:
    def __init__(self) -> None:
        self.users: dict[str, dict[str, Any]] = {}   # name -> password, roles, email, tokens
        self.roles: dict[str, dict[str, bool]] = {}  # name -> permission -> granted
        self.token_owner: dict[str, str] = {}        # assigned personal token -> user

    # --- checks used by the server --------------------------------------------------
    def password_ok(self, name: Any, password: Any) -> bool:
        user = self.users.get(name) if isinstance(name, str) else None
        return user is not None and user["password"] == password

    def owner_of(self, token: Any) -> str | None:
        return self.token_owner.get(token) if isinstance(token, str) else None

    def denied(self, name: str, commands: list[str]) -> str | None:
        """Why ``name`` may not run ``commands`` (None: it may)."""
        user = self.users.get(name)
        if user is None:
            return f"user {name!r} no longer exists"
        granted = {p for r in user["roles"] for p, ok in self.roles.get(r, {}).items() if ok}
        for cmd in commands:
            if cmd in USER_COMMANDS:
                return f"{cmd}: permission denied: user {name!r} may not manage users"
            for verb, perm in _VERB_PERMISSION:
                if cmd.startswith(verb):
                    if perm not in granted:
                        return (f"{cmd}: permission denied: the roles of user {name!r} do "
                                f"not grant {perm!r}")
                    break
        return None

    # --- commands -------------------------------------------------------------------
    def run(self, name: str, params: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
        """Run one command; returns (answer, user whose sessions must end or None)."""
        if not isinstance(params, dict):
            raise UserError(f"{name}: parameters must be an object")
        answer: tuple[dict[str, Any], str | None] = getattr(self, "_" + name)(params)
        return answer

    def _objects(self, params: dict[str, Any], where: str) -> dict[str, bool]:
        objects = params.get("objects", {})
        if not isinstance(objects, dict) or any(
                k not in PERMISSIONS or not isinstance(v, bool) for k, v in objects.items()):
            raise UserError(f"{where}: 'objects' must map {list(PERMISSIONS)} to true/false, "
                            f"got {objects!r}")
        return objects

    def _role_name(self, params: dict[str, Any], where: str, exists: bool) -> str:
        role = params.get("name")
        if not isinstance(role, str) or not role:
            raise UserError(f"{where}: 'name' must be a non-empty string")
        if exists and role not in self.roles:
            raise UserError(f"{where}: role {role!r} does not exist")
        if not exists and role in self.roles:
            raise UserError(f"{where}: role {role!r} already exists")
        return role

    def _user_name(self, params: dict[str, Any], where: str, exists: bool) -> str:
        name = params.get("username")
        if not isinstance(name, str) or not name:
            raise UserError(f"{where}: 'username' must be a non-empty string")
        if exists and name not in self.users:
            raise UserError(f"{where}: user {name!r} does not exist")
        if not exists and name in self.users:
            raise UserError(f"{where}: user {name!r} already exists")
        return name

    def _roles_of(self, params: dict[str, Any], key: str, where: str) -> list[str]:
        roles = params.get(key, [])
        if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
            raise UserError(f"{where}: {key!r} must be a list of role names")
        unknown = [r for r in roles if r not in self.roles]
        if unknown:
            raise UserError(f"{where}: unknown roles {unknown}")
        return roles

    def _CreateRole(self, params: dict[str, Any]) -> tuple[dict[str, Any], None]:
        role = self._role_name(params, "CreateRole", exists=False)
        objects = self._objects(params, "CreateRole")
        self.roles[role] = {p: bool(objects.get(p, False)) for p in PERMISSIONS}
        return {"status": 0}, None

    def _UpdateRole(self, params: dict[str, Any]) -> tuple[dict[str, Any], None]:
        role = self._role_name(params, "UpdateRole", exists=True)
        self.roles[role].update(self._objects(params, "UpdateRole"))
        return {"status": 0}, None

    def _RemoveRole(self, params: dict[str, Any]) -> tuple[dict[str, Any], None]:
        role = self._role_name(params, "RemoveRole", exists=True)
        holders = sorted(u for u, v in self.users.items() if role in v["roles"])
        if holders:
            raise UserError(f"RemoveRole: role {role!r} is still held by {holders}")
        del self.roles[role]
        return {"status": 0}, None

    def _CreateUser(self, params: dict[str, Any]) -> tuple[dict[str, Any], None]:
        name = self._user_name(params, "CreateUser", exists=False)
        password = params.get("password")
        if not isinstance(password, str) or not password:
            raise UserError("CreateUser: 'password' must be a non-empty string")
        roles = self._roles_of(params, "roles", "CreateUser")
        self.users[name] = {"password": password, "roles": list(roles),
                            "email": params.get("email"), "tokens": set()}
        return {"status": 0}, None

    def _UpdateUser(self, params: dict[str, Any]) -> tuple[dict[str, Any], str]:
        name = self._user_name(params, "UpdateUser", exists=True)
        user = self.users[name]
        add = params.get("add_tokens", [])
        remove = params.get("remove_tokens", [])
        for key, value in (("add_tokens", add), ("remove_tokens", remove)):
            if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
                raise UserError(f"UpdateUser: {key!r} must be a list of tokens")
        for t in add:
            if not t.startswith("adbp_") or len(t) <= TOKEN_ID_LENGTH:
                raise UserError("UpdateUser: add_tokens takes tokens from GenerateToken")
            other = self.token_owner.get(t)
            if other is not None and other != name:
                raise UserError(f"UpdateUser: the token belongs to user {other!r}")
        if "password" in params:
            if not isinstance(params["password"], str) or not params["password"]:
                raise UserError("UpdateUser: 'password' must be a non-empty string")
            user["password"] = params["password"]
        if "email" in params:
            user["email"] = params["email"]
        if "add_roles" in params or "remove_roles" in params:
            grant = self._roles_of(params, "add_roles", "UpdateUser")
            drop = set(self._roles_of(params, "remove_roles", "UpdateUser"))
            user["roles"] = [r for r in user["roles"] if r not in drop] + [
                r for r in grant if r not in user["roles"]]
        for t in add:
            user["tokens"].add(t)
            self.token_owner[t] = name
        for prefix in remove:
            for t in [t for t in user["tokens"] if t == prefix or t[:TOKEN_ID_LENGTH] == prefix]:
                user["tokens"].discard(t)
                self.token_owner.pop(t, None)
        return {"status": 0}, name

    def _RemoveUser(self, params: dict[str, Any]) -> tuple[dict[str, Any], str]:
        name = self._user_name(params, "RemoveUser", exists=True)
        for t in self.users.pop(name)["tokens"]:
            self.token_owner.pop(t, None)
        return {"status": 0}, name

    def _GenerateToken(self, params: dict[str, Any]) -> tuple[dict[str, Any], None]:
        return {"status": 0, "token": f"adbp_{secrets.token_hex(4)}_{secrets.token_hex(16)}"}, None

    def _GetUsers(self, params: dict[str, Any]) -> tuple[dict[str, Any], None]:
        users = [{"username": n, "roles": list(u["roles"]), "email": u["email"],
                  "tokens": sorted(t[:TOKEN_ID_LENGTH] for t in u["tokens"])}
                 for n, u in sorted(self.users.items())]
        return {"status": 0, "users": users}, None

    def _GetRoles(self, params: dict[str, Any]) -> tuple[dict[str, Any], None]:
        roles = [{"name": n, "objects": dict(r)} for n, r in sorted(self.roles.items())]
        return {"status": 0, "roles": roles}, None
