"""The embedded server's in-memory store and its command interpreter.

A query (a JSON list of one-key command objects, plus the request's blobs) is
executed as one transaction: every change is written straight into the store
and recorded in an undo log; if any command fails, the log is replayed
backwards so nothing of the query remains, and the answer is the
failed-transaction object ``{"status": -1, "info": "..."}``.

Thread safety: a ``Store`` has no lock of its own. The server calls it from
its single event-loop thread only (other threads reach it through the loop's
call queue), so one query runs at a time and sees no concurrent writer.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Iterable

# Status codes of the ApertureDB protocol.
STATUS_OK = 0
STATUS_EXISTS = 2
STATUS_ERROR = -1

SERVER_VERSION = "0.18.0-embedded"

# Blob-like object types: command suffix -> class name in the store.
_OBJECT_CLASSES = {"Entity": None, "Blob": "_Blob", "Image": "_Image"}

_COMPARATORS: dict[str, Callable[[Any, Any], bool]] = {
    "==": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
    "in": lambda a, b: a in b,
    "not in": lambda a, b: a not in b,
}


class CommandError(Exception):
    """A command of the query is invalid; the message says what was wrong."""


class Entity:
    """One stored object: an entity, or a blob/image with its bytes."""

    __slots__ = ("uid", "cls", "props", "data")

    def __init__(self, uid: int, cls: str, props: dict[str, Any], data: bytes | None) -> None:
        self.uid = uid
        self.cls = cls
        self.props = props
        self.data = data


def _plain(value: Any) -> Any:
    """A property value as compared: dates ``{"_date": s}`` compare as ``s``."""
    if isinstance(value, dict) and len(value) == 1:
        for key in ("_date", "to_date", "date"):
            if key in value:
                return value[key]
    return value


def _type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "Boolean"
    if isinstance(value, (int, float)):
        return "Number"
    if isinstance(value, str):
        return "String"
    if isinstance(value, dict) and "_date" in value:
        return "DateTime"
    return "JSON"


def _compare(op: str, left: Any, right: Any, where: str) -> bool:
    fn = _COMPARATORS.get(op)
    if fn is None:
        raise CommandError(f"{where}: unknown constraint operator {op!r}")
    if op in ("in", "not in") and not isinstance(right, (list, tuple)):
        raise CommandError(f"{where}: operator {op!r} needs a list of values")
    try:
        return bool(fn(_plain(left), right if op in ("in", "not in") else _plain(right)))
    except TypeError:
        return op == "!="  # values of different types are simply not equal


class _Missing:
    pass


_MISSING = _Missing()


def _prop(entity: Entity, name: str) -> Any:
    if name == "_uniqueid":
        return _uniqueid(entity)
    return entity.props.get(name, _MISSING)


def _uniqueid(entity: Entity) -> str:
    return f"{entity.uid}.0.0"


# --- constraints -------------------------------------------------------------------

def compile_constraints(spec: Any, where: str) -> Callable[[Entity], bool] | None:
    """Turn either constraint form into a predicate on an entity.

    Property form: ``{"age": [">=", 20, "<", 90], "any": {...}, "all": {...}}``
    (each property's comparisons all hold; keys of a group combine with the
    group's conjunction). Expression form: ``["all", ["$age", ">=", 20], ...]``
    with ``"any"``/``"all"``/``"not"`` and ``"$prop"`` references.
    """
    if spec is None:
        return None
    if isinstance(spec, dict):
        return _compile_group(spec, "all", where) if spec else None
    if isinstance(spec, list):
        return _compile_expr(spec, where)
    raise CommandError(f"{where}: constraints must be an object or an expression list")


def _compile_group(spec: dict, conj: str, where: str) -> Callable[[Entity], bool]:
    terms: list[Callable[[Entity], bool]] = []
    for key, ops in spec.items():
        if key in ("any", "all") and isinstance(ops, dict):
            terms.append(_compile_group(ops, key, where))
            continue
        if not isinstance(ops, list) or not ops or len(ops) % 2:
            raise CommandError(
                f"{where}: constraint on {key!r} must be a list [op, value, op, value, ...]")
        pairs = []
        for i in range(0, len(ops), 2):
            op, value = ops[i], ops[i + 1]
            if op not in _COMPARATORS:
                raise CommandError(f"{where}: unknown constraint operator {op!r} on {key!r}")
            if op in ("in", "not in") and not isinstance(value, list):
                raise CommandError(f"{where}: operator {op!r} on {key!r} needs a list")
            pairs.append((op, value))

        def term(e: Entity, key: str = key, pairs: list = pairs) -> bool:
            have = _prop(e, key)
            if have is _MISSING:
                return False
            return all(_compare(op, have, value, where) for op, value in pairs)

        terms.append(term)
    if conj == "any":
        return lambda e: any(t(e) for t in terms)
    return lambda e: all(t(e) for t in terms)


def _literal(value: Any, where: str) -> Any:
    if isinstance(value, str) and value.startswith("$$"):
        return value[1:]
    if isinstance(value, dict) and len(value) == 1:
        (key, inner), = value.items()
        if key == "array":
            if not isinstance(inner, list):
                raise CommandError(f"{where}: 'array' needs a list")
            return [_literal(v, where) for v in inner]
        if key in ("to_date", "_date"):
            return _plain(inner)
        if key == "json":
            return inner
    if isinstance(value, list):
        return [_literal(v, where) for v in value]
    return value


def _compile_expr(expr: list, where: str) -> Callable[[Entity], bool]:
    if not expr:
        raise CommandError(f"{where}: empty constraint expression")
    head = expr[0]
    if head in ("all", "any"):
        subs = [_compile_expr(_as_list(x, where), where) for x in expr[1:]]
        if head == "any":
            return lambda e: any(s(e) for s in subs)
        return lambda e: all(s(e) for s in subs)
    if head == "not":
        if len(expr) != 2:
            raise CommandError(f"{where}: 'not' takes one expression")
        sub = _compile_expr(_as_list(expr[1], where), where)
        return lambda e: not sub(e)
    if len(expr) != 3:
        raise CommandError(
            f"{where}: bad constraint expression {json.dumps(expr)[:80]}: "
            "expected [\"$property\", op, value] or [\"all\"|\"any\", ...]")
    left, op, right = expr
    if op not in _COMPARATORS:
        raise CommandError(f"{where}: unknown constraint operator {op!r}")
    if not (isinstance(left, str) and left.startswith("$") and not left.startswith("$$")):
        raise CommandError(f"{where}: the left side of a comparison must be a \"$property\"")
    name = left[1:]
    value = _literal(right, where)
    if op in ("in", "not in") and not isinstance(value, list):
        raise CommandError(f"{where}: operator {op!r} needs an array")

    def term(e: Entity) -> bool:
        have = _prop(e, name)
        if have is _MISSING:
            return False
        return _compare(op, have, value, where)

    return term


def _as_list(x: Any, where: str) -> list:
    if not isinstance(x, list):
        raise CommandError(f"{where}: a constraint expression must be a list, got {x!r}")
    return x


# --- the store ---------------------------------------------------------------------

class Store:
    """Objects by id, and the interpreter of one query at a time."""

    def __init__(self) -> None:
        self.objects: dict[int, Entity] = {}
        # The same objects by class (an index, so that a Find with a class
        # costs the size of that class, not of the whole store).  Kept in step
        # with ``objects`` by every add, delete, undo and clear.
        self.by_class: dict[str, dict[int, Entity]] = {}
        self._next_uid = 1

    # Read helpers (call from the loop thread, or when the server is stopped).
    def count(self, cls: str | None = None) -> int:
        if cls is None:
            return len(self.objects)
        return len(self.by_class.get(cls, ()))

    def dump(self) -> list[dict[str, Any]]:
        """Every object as a plain dict (class, properties, blob size)."""
        return [
            {"_uniqueid": _uniqueid(e), "class": e.cls, "properties": dict(e.props),
             "blob_size": None if e.data is None else len(e.data)}
            for e in self.objects.values()
        ]

    def clear(self) -> None:
        self.objects.clear()
        self.by_class.clear()

    # --- executing a query -------------------------------------------------------
    def execute(self, commands: Any, blobs: list[bytes]) -> tuple[Any, list[bytes]]:
        """Run ``commands`` as one transaction; return (response JSON value, blobs)."""
        if not isinstance(commands, list):
            return _failed("the query must be a JSON list of commands"), []
        tx = _Transaction(self, blobs)
        try:
            responses = [tx.run(i, cmd) for i, cmd in enumerate(commands)]
            if tx.blob_pos != len(blobs):
                raise CommandError(
                    f"wrong number of blobs: the query sent {len(blobs)} and its commands "
                    f"used {tx.blob_pos}")
        except CommandError as e:
            tx.rollback()
            return _failed(str(e)), []
        except Exception as e:  # a bug or an unexpected value: still answer
            tx.rollback()
            return _failed(f"internal error: {type(e).__name__}: {e}"), []
        return responses, tx.out_blobs


def _failed(info: str) -> dict[str, Any]:
    return {"status": STATUS_ERROR, "info": info}


def _restore_props(e: Entity, old: dict[str, Any]) -> Callable[[], None]:
    def undo() -> None:
        e.props = old
    return undo


def _reinsert(store: "Store", e: Entity) -> Callable[[], None]:
    def undo() -> None:
        store.objects[e.uid] = e
        store.by_class.setdefault(e.cls, {})[e.uid] = e
    return undo


def _forget(store: "Store", e: Entity) -> Callable[[], None]:
    def undo() -> None:
        store.objects.pop(e.uid, None)
        store.by_class.get(e.cls, {}).pop(e.uid, None)
    return undo


class _Transaction:
    """One query's execution state: references, blobs, and the undo log."""

    def __init__(self, store: Store, blobs: list[bytes]) -> None:
        self.store = store
        self.objects = store.objects
        self.by_class = store.by_class
        self.blobs = blobs
        self.blob_pos = 0
        self.out_blobs: list[bytes] = []
        self.refs: dict[int, list[Entity]] = {}
        self.undo: list[Callable[[], Any]] = []

    def rollback(self) -> None:
        for fn in reversed(self.undo):
            fn()
        self.undo.clear()

    def run(self, index: int, cmd: Any) -> dict[str, Any]:
        if not isinstance(cmd, dict) or len(cmd) != 1:
            raise CommandError(
                f"command {index}: each command must be an object with exactly one key, "
                f"got {json.dumps(cmd)[:80]}")
        (name, params), = cmd.items()
        where = f"{name} (command {index})"
        if params is None:
            params = {}
        if not isinstance(params, dict):
            raise CommandError(f"{where}: parameters must be an object")
        handler = _HANDLERS.get(name)
        if handler is None:
            for verb in ("Add", "Find", "Update", "Delete"):
                suffix = name[len(verb):]
                if name.startswith(verb) and suffix in _OBJECT_CLASSES:
                    result = getattr(self, "_" + verb.lower())(where, params, suffix)
                    return {name: result}
            raise CommandError(
                f"{where}: unknown command {name!r}; the embedded server supports "
                + ", ".join(sorted(SUPPORTED_COMMANDS)))
        return {name: handler(self, where, params)}

    # --- helpers ----------------------------------------------------------------
    def _class_of(self, where: str, params: dict, kind: str, key: str) -> str | None:
        fixed = _OBJECT_CLASSES[kind]
        if fixed is not None:
            return fixed
        cls = params.get(key)
        if cls is None:
            return None
        if not isinstance(cls, str) or not cls:
            raise CommandError(f"{where}: {key!r} must be a non-empty string")
        return cls

    def _bind(self, where: str, params: dict, found: list[Entity]) -> None:
        ref = params.get("_ref")
        if ref is None:
            return
        if not isinstance(ref, int) or isinstance(ref, bool) or ref < 1:
            raise CommandError(f"{where}: '_ref' must be a positive integer")
        if ref in self.refs:
            raise CommandError(f"{where}: '_ref' {ref} is already used in this query")
        self.refs[ref] = found

    def _select(self, where: str, params: dict, kind: str, class_key: str) -> list[Entity]:
        """Objects chosen by ``ref`` and/or class + constraints, in id order."""
        cls = self._class_of(where, params, kind, class_key)
        ref = params.get("ref")
        if ref is not None:
            if ref not in self.refs:
                raise CommandError(f"{where}: 'ref' {ref!r} does not name an earlier '_ref'")
            pool: Iterable[Entity] = self.refs[ref]
        elif cls is not None:
            pool = self.by_class.get(cls, {}).values()
        else:
            pool = self.objects.values()
        pred = compile_constraints(params.get("constraints"), where)
        if "is_connected_to" in params:
            raise CommandError(f"{where}: 'is_connected_to' is not supported by the embedded "
                               "server (it stores no connections)")
        out = []
        for e in pool:
            if e.uid not in self.objects:
                continue
            if cls is not None and e.cls != cls:
                continue
            if pred is not None and not pred(e):
                continue
            out.append(e)
        return out

    def _properties(self, where: str, params: dict, key: str = "properties") -> dict:
        props = params.get(key, {})
        if props is None:
            props = {}
        if not isinstance(props, dict):
            raise CommandError(f"{where}: {key!r} must be an object")
        for k in props:
            if k.startswith("_"):
                raise CommandError(f"{where}: property names starting with '_' are reserved ({k!r})")
        return props

    def _next_blob(self, where: str) -> bytes:
        if self.blob_pos >= len(self.blobs):
            raise CommandError(
                f"{where}: wrong number of blobs: this command needs blob #{self.blob_pos + 1} "
                f"but the query sent {len(self.blobs)}")
        data = self.blobs[self.blob_pos]
        self.blob_pos += 1
        return data

    # --- commands ---------------------------------------------------------------
    def _add(self, where: str, params: dict, kind: str) -> dict[str, Any]:
        cls = self._class_of(where, params, kind, "class")
        if cls is None:
            raise CommandError(f"{where}: 'class' is required")
        props = self._properties(where, params)
        data = self._next_blob(where) if _OBJECT_CLASSES[kind] is not None else None
        cond = params.get("if_not_found")
        if cond is not None:
            pred = compile_constraints(cond, where)
            found = [e for e in self.by_class.get(cls, {}).values()
                     if pred is None or pred(e)]
            if found:
                self._bind(where, params, found)
                return {"status": STATUS_EXISTS, "info": "Object Exists!"}
        store = self.store
        uid = store._next_uid
        store._next_uid += 1
        ent = Entity(uid, cls, dict(props), data)
        self.objects[uid] = ent
        self.by_class.setdefault(cls, {})[uid] = ent
        self.undo.append(_forget(store, ent))
        self._bind(where, params, [ent])
        return {"status": STATUS_OK}

    def _find(self, where: str, params: dict, kind: str) -> dict[str, Any]:
        found = self._select(where, params, kind, "with_class")
        results = params.get("results") or {}
        if not isinstance(results, dict):
            raise CommandError(f"{where}: 'results' must be an object")
        sort = results.get("sort", params.get("sort"))
        if sort is not None:
            found = self._sorted(where, found, sort)
        offset = params.get("offset", results.get("offset", 0)) or 0
        limit = params.get("limit", results.get("limit"))
        for label, v in (("offset", offset), ("limit", limit)):
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
                raise CommandError(f"{where}: {label!r} must be a non-negative integer")
        if offset:
            found = found[offset:]
        if limit is not None:
            found = found[:limit]
        if params.get("unique") and len(found) > 1:
            raise CommandError(f"{where}: 'unique' was requested but {len(found)} objects match")
        self._bind(where, params, found)
        out: dict[str, Any] = {"status": STATUS_OK}
        listed = results.get("list")
        all_props = bool(results.get("all_properties"))
        uniqueids = bool(params.get("uniqueids") or results.get("uniqueids"))
        want_blobs = bool(params.get("blobs")) and _OBJECT_CLASSES[kind] is not None
        if listed is not None and not (isinstance(listed, list)
                                       and all(isinstance(x, str) for x in listed)):
            raise CommandError(f"{where}: results 'list' must be a list of property names")
        if "count" in results and results["count"]:
            out["count"] = len(found)
        if listed or all_props or uniqueids or want_blobs:
            entities = []
            if want_blobs:
                out["blobs_start"] = len(self.out_blobs)
            for e in found:
                if all_props:
                    item = dict(e.props)
                elif listed:
                    item = {k: e.props[k] for k in listed if k in e.props}
                else:
                    item = {}
                if uniqueids or (listed and "_uniqueid" in listed):
                    item["_uniqueid"] = _uniqueid(e)
                if want_blobs:
                    item["_blob_index"] = len(self.out_blobs)
                    self.out_blobs.append(e.data or b"")
                entities.append(item)
            out["entities"] = entities
            out["returned"] = len(entities)
        else:
            out["returned"] = 0
        return out

    def _sorted(self, where: str, found: list[Entity], sort: Any) -> list[Entity]:
        if isinstance(sort, str):
            key, order = sort, "ascending"
        elif isinstance(sort, dict) and isinstance(sort.get("key"), str):
            key, order = sort["key"], sort.get("order", "ascending")
        else:
            raise CommandError(f"{where}: 'sort' must be a property name or {{key, order}}")
        if order not in ("ascending", "descending"):
            raise CommandError(f"{where}: sort order must be 'ascending' or 'descending'")
        have = [e for e in found if key in e.props]
        missing = [e for e in found if key not in e.props]
        try:
            have.sort(key=lambda e: _plain(e.props[key]), reverse=order == "descending")
        except TypeError:
            raise CommandError(
                f"{where}: property {key!r} has values that cannot be ordered") from None
        return have + missing

    def _update(self, where: str, params: dict, kind: str) -> dict[str, Any]:
        props = self._properties(where, params)
        remove = params.get("remove_props", [])
        if not isinstance(remove, list) or not all(isinstance(k, str) for k in remove):
            raise CommandError(f"{where}: 'remove_props' must be a list of property names")
        found = self._select(where, params, kind, "with_class")
        for e in found:
            self.undo.append(_restore_props(e, dict(e.props)))
            new = dict(e.props)
            for k in remove:
                new.pop(k, None)
            new.update(props)
            e.props = new
        return {"status": STATUS_OK, "count": len(found)}

    def _delete(self, where: str, params: dict, kind: str) -> dict[str, Any]:
        found = self._select(where, params, kind, "with_class")
        for e in found:
            del self.objects[e.uid]
            del self.by_class[e.cls][e.uid]
            self.undo.append(_reinsert(self.store, e))
        return {"status": STATUS_OK, "count": len(found)}

    def _get_status(self, where: str, params: dict) -> dict[str, Any]:
        return {"status": STATUS_OK, "info": "OK", "system": "ApertureDB",
                "version": SERVER_VERSION}

    def _get_schema(self, where: str, params: dict) -> dict[str, Any]:
        classes: dict[str, dict[str, Any]] = {}
        for e in self.objects.values():
            c = classes.get(e.cls)
            if c is None:
                c = classes[e.cls] = {"matched": 0, "properties": {}}
            c["matched"] += 1
            p = c["properties"]
            for k, v in e.props.items():
                if k in p:
                    p[k][0] += 1
                else:
                    p[k] = [1, False, _type_name(v)]
        for c in classes.values():
            if not c["properties"]:
                c["properties"] = None
        entities = {"returned": len(classes), "classes": classes} if classes else None
        return {"status": STATUS_OK, "entities": entities, "connections": None}


_HANDLERS: dict[str, Callable[[_Transaction, str, dict], dict[str, Any]]] = {
    "GetStatus": _Transaction._get_status,
    "GetSchema": _Transaction._get_schema,
}

SUPPORTED_COMMANDS = frozenset(
    ["Authenticate", "RefreshToken", *_HANDLERS]
    + [verb + kind for verb in ("Add", "Find", "Update", "Delete") for kind in _OBJECT_CLASSES]
)
