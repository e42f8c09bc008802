"""The embedded server's in-memory store and its command interpreter.

A query (a JSON list of one-key command objects, plus the request's blobs) is
executed as one transaction: every change is written straight into the store
and recorded in an undo log; if any command fails, the log is replayed
backwards so nothing of the query remains, and the answer is the
failed-transaction object ``{"status": -1, "info": "..."}``.

What is stored: objects (entities of any class; blobs, images, videos, clips,
frames, bounding boxes, polygons, descriptor sets and descriptors under the
system classes ``_Blob``, ``_Image``...) and connections between them. An
object that belongs to another (a box to its image, a descriptor to its set)
is linked by a connection of a system class and deleted with its owner;
deleting any object deletes its connections. Equality tests in constraints and
``if_not_found`` read an index per (class, property) built on first use.

Assumptions where the real server's answer is unknown (the SDK's parsing code
is followed; see also the README's table): ``L2`` distances are squared, ``CS``
and ``IP`` are similarities (largest first); the owning links' classes are
``_ImageToBoundingBox``, ``_ImageToPolygon``, ``_VideoToClip``,
``_VideoToFrame`` and ``_DescriptorSetToDescriptor`` (the last as the SDK names
it); ``is_connected_to`` ``direction`` "out" selects connections' sources, "in"
their destinations; ``CreateIndex`` of an existing index answers status 2 and
``RemoveIndex`` of a missing one fails the transaction; an Add's ``connect``
without a class uses ``AT:connects``; system properties (``_name``,
``_label``, ``_coordinates``, ...) are listed by ``all_properties``.

Thread safety: a ``Store`` has no lock of its own. The server calls it from
its single event-loop thread only (other threads reach it through the loop's
call queue), so one query runs at a time and sees no concurrent writer.
"""

from __future__ import annotations

import json
from functools import partial
from typing import Any, Callable, Iterable

# Status codes of the ApertureDB protocol.
STATUS_OK = 0
STATUS_EXISTS = 2
STATUS_ERROR = -1

SERVER_VERSION = "0.18.0-embedded"

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


def _compile_group(spec: dict[str, Any], conj: str, where: str) -> Callable[[Entity], bool]:
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

        def term(e: Entity, key: str = key, pairs: list[Any] = pairs) -> bool:
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


def _compile_expr(expr: list[Any], where: str) -> Callable[[Entity], bool]:
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


def _as_list(x: Any, where: str) -> list[Any]:
    if not isinstance(x, list):
        raise CommandError(f"{where}: a constraint expression must be a list, got {x!r}")
    return x


# --- the equality index ------------------------------------------------------------

def _equality_terms(spec: Any) -> list[tuple[str, Any]]:
    """The ``property == value`` tests that every match of ``spec`` must pass.

    Only a term the whole constraint depends on qualifies (a top-level key of the
    property form, a top-level comparison or a member of a top-level ``"all"`` of
    the expression form): the candidates it selects are a superset of the answer,
    and the full predicate still runs on each of them.
    """
    terms: list[tuple[str, Any]] = []
    if isinstance(spec, dict):
        for key, ops in spec.items():
            if key in ("any", "all") or key == "_uniqueid" or not isinstance(ops, list):
                continue
            for i in range(0, len(ops) - 1, 2):
                if ops[i] == "==" and _hashable(_plain(ops[i + 1])):
                    terms.append((key, _plain(ops[i + 1])))
        return terms
    if isinstance(spec, list) and spec:
        exprs = spec[1:] if spec[0] == "all" else [spec]
        for t in exprs:
            if (isinstance(t, list) and len(t) == 3 and t[1] == "=="
                    and isinstance(t[0], str) and t[0].startswith("$")
                    and not t[0].startswith("$$") and t[0] != "$_uniqueid"):
                try:
                    value = _plain(_literal(t[2], ""))
                except CommandError:
                    continue
                if _hashable(value):
                    terms.append((t[0][1:], value))
    return terms


def _hashable(value: Any) -> bool:
    # Lists and JSON objects are not hashable; NaN equals nothing, not even itself,
    # so the scan never matches it and neither must a bucket look-up.
    if isinstance(value, float):
        return value == value
    return isinstance(value, (str, int)) or value is None


class _PropIndex:
    """Objects of one class by the value of one property (equality look-ups).

    ``buckets`` holds hashable values (as compared: dates by their string), ``odd``
    the objects whose value is a list, a JSON object or NaN: every look-up
    returns them too and the predicate decides.
    """

    __slots__ = ("prop", "buckets", "odd")

    def __init__(self, prop: str) -> None:
        self.prop = prop
        self.buckets: dict[Any, dict[int, Entity]] = {}
        self.odd: dict[int, Entity] = {}

    def add(self, e: Entity) -> None:
        value = e.props.get(self.prop, _MISSING)
        if value is _MISSING:
            return
        value = _plain(value)
        if _hashable(value):
            self.buckets.setdefault(value, {})[e.uid] = e
        else:
            self.odd[e.uid] = e

    def remove(self, e: Entity) -> None:
        value = e.props.get(self.prop, _MISSING)
        if value is _MISSING:
            return
        value = _plain(value)
        if _hashable(value):
            bucket = self.buckets.get(value)
            if bucket is not None:
                bucket.pop(e.uid, None)
                if not bucket:
                    del self.buckets[value]
        else:
            self.odd.pop(e.uid, None)

    def lookup(self, value: Any) -> list[Entity]:
        found = list(self.buckets.get(value, {}).values())
        if self.odd:
            found.extend(self.odd.values())
        if len(found) > 1:
            found.sort(key=lambda e: e.uid)
        return found


# --- the store ---------------------------------------------------------------------

class Connection(Entity):
    """A stored connection: an object of its own class between ``src`` and ``dst``."""

    __slots__ = ("src", "dst")

    def __init__(self, uid: int, cls: str, props: dict[str, Any], src: int, dst: int) -> None:
        self.uid = uid
        self.cls = cls
        self.props = props
        self.data = None
        self.src = src
        self.dst = dst


# Indexes every real server has and refuses to remove (the SDK's Utils lists them).
BUILTIN_INDEXES = frozenset([("entity", "_DescriptorSet", "_name", "ordered"),
                             ("entity", "_Descriptor", "_set_name", "ordered"),
                             ("entity", "_Descriptor", "_create_txn", "ordered")])


class Store:
    """Objects and connections by id, and the interpreter of one query at a time."""

    def __init__(self) -> None:
        self.objects: dict[int, Entity] = {}
        # The same objects by class (an index, so that a Find with a class
        # costs the size of that class, not of the whole store).  Kept in step
        # with ``objects`` by every add, delete, undo and clear.
        self.by_class: dict[str, dict[int, Entity]] = {}
        self.connections: dict[int, Connection] = {}
        self.conn_by_class: dict[str, dict[int, Connection]] = {}
        # object id -> the connections that start or end at it
        self.edges: dict[int, list[Connection]] = {}  # lists: cheaper than dicts to make
        # class -> property -> equality index; built on the first equality look-up
        # of that (class, property) or by CreateIndex, then kept in step by
        # ``_link``/``_unlink``/``_set_props`` (the only writers of objects).
        self.eq_index: dict[str, dict[str, _PropIndex]] = {}
        # Declared indexes (CreateIndex): (target, class, property, kind) -> params.
        self.declared: dict[tuple[str, str, str, str], dict[str, Any]] = {
            k: {} for k in BUILTIN_INDEXES}
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
        self.connections.clear()
        self.conn_by_class.clear()
        self.edges.clear()
        self.eq_index.clear()

    # --- the only writers of stored objects (the indexes follow them) -------------
    def _link(self, e: Entity) -> None:
        if type(e) is Connection:
            self.connections[e.uid] = e
            self.conn_by_class.setdefault(e.cls, {})[e.uid] = e
            edges = self.edges
            if e.src in edges:
                edges[e.src].append(e)
            else:
                edges[e.src] = [e]
            if e.dst in edges:
                edges[e.dst].append(e)
            else:
                edges[e.dst] = [e]
            return
        self._link_object(e)

    def _link_object(self, e: Entity) -> None:
        self.objects[e.uid] = e
        self.by_class.setdefault(e.cls, {})[e.uid] = e
        indexes = self.eq_index.get(e.cls)
        if indexes:
            for ix in indexes.values():
                ix.add(e)

    def _unlink(self, e: Entity) -> None:
        if type(e) is Connection:
            self.connections.pop(e.uid, None)
            self.conn_by_class.get(e.cls, {}).pop(e.uid, None)
            for end in (e.src, e.dst):
                adj = self.edges.get(end)
                if adj is not None and e in adj:
                    adj.remove(e)
                    if not adj:
                        del self.edges[end]
            return
        self.objects.pop(e.uid, None)
        self.by_class.get(e.cls, {}).pop(e.uid, None)
        indexes = self.eq_index.get(e.cls)
        if indexes:
            for ix in indexes.values():
                ix.remove(e)

    def _set_props(self, e: Entity, props: dict[str, Any]) -> None:
        indexes = None if type(e) is Connection else self.eq_index.get(e.cls)
        if indexes and e.uid in self.objects:
            for ix in indexes.values():
                ix.remove(e)
            e.props = props
            for ix in indexes.values():
                ix.add(e)
        else:
            e.props = props

    def _prop_index(self, cls: str, prop: str) -> _PropIndex:
        by_prop = self.eq_index.setdefault(cls, {})
        ix = by_prop.get(prop)
        if ix is None:
            ix = by_prop[prop] = _PropIndex(prop)
            for e in self.by_class.get(cls, {}).values():
                ix.add(e)
        return ix

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


def _number(where: str, params: dict[str, Any], key: str, *, integer: bool = False,
            required: bool = True, minimum: float | None = None) -> Any:
    value = params.get(key)
    if value is None and not required:
        return None
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if not ok or isinstance(value, bool) or (minimum is not None and value < minimum):  # type: ignore[operator]
        kind = "an integer" if integer else "a number"
        bound = "" if minimum is None else f" >= {minimum}"
        raise CommandError(f"{where}: {key!r} must be {kind}{bound}, got {value!r}")
    return value


# Link classes the server itself creates between an object and what it belongs to
# (the SDK names _DescriptorSetToDescriptor; the others follow the same pattern, an
# assumption).  Deleting the owner (src) deletes the owned object (dst).
_OWNING_LINKS = frozenset(["_DescriptorSetToDescriptor", "_ImageToBoundingBox",
                           "_ImageToPolygon", "_VideoToClip", "_VideoToFrame"])

_METRICS = ("L2", "CS", "IP")


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
        self.reinserted: set[str] | None = None  # classes of objects deleted by this query

    def rollback(self) -> None:
        for fn in reversed(self.undo):
            fn()
        self.undo.clear()
        if self.reinserted:
            # Re-inserted objects went to the end of the dicts; Finds answer in id
            # order, so put them back where they were (failed deletes only).
            store = self.store
            for d in [store.objects] + [store.by_class[c] for c in self.reinserted
                                        if c in store.by_class]:
                items = sorted(d.items())
                d.clear()
                d.update(items)

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
        entry = _DISPATCH.get(name)
        if entry is None:
            raise CommandError(
                f"{where}: unknown command {name!r}; the embedded server supports "
                + ", ".join(sorted(SUPPORTED_COMMANDS)))
        fn, kind = entry
        return {name: fn(self, where, params) if kind is None else fn(self, where, params, kind)}

    # --- helpers ----------------------------------------------------------------
    def _class_of(self, where: str, params: dict[str, Any], kind: str, key: str) -> str | None:
        fixed = _OBJECT_CLASSES[kind]
        if fixed is not None:
            return fixed
        cls = params.get(key)
        if cls is None:
            return None
        if not isinstance(cls, str) or not cls:
            raise CommandError(f"{where}: {key!r} must be a non-empty string")
        return cls

    def _bind(self, where: str, params: dict[str, Any], found: list[Entity]) -> None:
        ref = params.get("_ref")
        if ref is None:
            return
        if not isinstance(ref, int) or isinstance(ref, bool) or ref < 1:
            raise CommandError(f"{where}: '_ref' must be a positive integer")
        if ref in self.refs:
            raise CommandError(f"{where}: '_ref' {ref} is already used in this query")
        self.refs[ref] = found

    def _referenced(self, where: str, key: str, ref: Any) -> list[Entity]:
        if ref not in self.refs:
            raise CommandError(f"{where}: {key!r} {ref!r} does not name an earlier '_ref'")
        return self.refs[ref]

    def _candidates(self, cls: str, spec: Any) -> Iterable[Entity]:
        """The objects of ``cls`` that may match ``spec``: an equality index's bucket
        when the constraints hold an equality test, else the whole class."""
        terms = _equality_terms(spec) if spec else None
        if not terms:
            return self.by_class.get(cls, {}).values()
        # The smallest bucket of all the equality tests (each (class, property)
        # index is built once, on its first use).
        return min((self.store._prop_index(cls, p).lookup(v) for p, v in terms), key=len)

    def _select(self, where: str, params: dict[str, Any], kind: str, class_key: str) -> list[Entity]:
        """Objects chosen by ``ref`` and/or class + constraints, in id order."""
        if kind == "Connection":
            return self._select_connections(where, params)
        cls = self._class_of(where, params, kind, class_key)
        ref = params.get("ref")
        spec = params.get("constraints")
        pred = compile_constraints(spec, where)
        if kind == "DescriptorSet" and "with_name" in params:
            name = params["with_name"]
            if not isinstance(name, str):
                raise CommandError(f"{where}: 'with_name' must be a string")
            spec = ["all", ["$_name", "==", name]]
            by_name = compile_constraints(spec, where)
            assert by_name is not None
            pred = by_name if pred is None else (
                lambda e, a=pred, b=by_name: a(e) and b(e))  # type: ignore[misc]
        if kind == "Descriptor" and params.get("set") is not None:
            self._descriptor_set(where, params["set"])  # checks the set exists
            spec = ["all", ["$_set_name", "==", params["set"]]]
            in_set = compile_constraints(spec, where)
            assert in_set is not None
            pred = in_set if pred is None else (
                lambda e, a=pred, b=in_set: a(e) and b(e))  # type: ignore[misc]
        pool: Iterable[Entity]
        if ref is not None:
            pool = self._referenced(where, "ref", ref)
        elif cls is not None:
            pool = self._candidates(cls, spec)
        else:
            pool = self.objects.values()
        linked = self._connected_filter(where, params.get("is_connected_to"))
        out = []
        for e in pool:
            if e.uid not in self.objects:
                continue
            if cls is not None and e.cls != cls:
                continue
            if pred is not None and not pred(e):
                continue
            if linked is not None and e.uid not in linked:
                continue
            out.append(e)
        return out

    def _connected_filter(self, where: str, spec: Any) -> set[int] | None:
        """Ids of the objects connected to ``is_connected_to``'s reference.

        ``direction`` "out": the chosen object is the connection's source, "in": its
        destination, "any" (default): either (the docs' meaning, an assumption)."""
        if spec is None:
            return None
        if not isinstance(spec, dict) or "ref" not in spec:
            raise CommandError(f"{where}: 'is_connected_to' must be an object with a 'ref'")
        others = self._referenced(where, "is_connected_to.ref", spec["ref"])
        cclass = spec.get("connection_class")
        direction = spec.get("direction", "any")
        if direction not in ("in", "out", "any"):
            raise CommandError(f"{where}: 'direction' must be 'in', 'out' or 'any', "
                               f"got {direction!r}")
        linked: set[int] = set()
        for o in others:
            for c in self.store.edges.get(o.uid, ()):
                if cclass is not None and c.cls != cclass:
                    continue
                if c.dst == o.uid and direction in ("out", "any"):
                    linked.add(c.src)
                if c.src == o.uid and direction in ("in", "any"):
                    linked.add(c.dst)
        return linked

    def _select_connections(self, where: str, params: dict[str, Any]) -> list[Entity]:
        cls = params.get("with_class")
        if cls is not None and (not isinstance(cls, str) or not cls):
            raise CommandError(f"{where}: 'with_class' must be a non-empty string")
        pred = compile_constraints(params.get("constraints"), where)
        ends = {}
        for key in ("src", "dst"):
            if params.get(key) is not None:
                ends[key] = {e.uid for e in self._referenced(where, key, params[key])}
        pool: Iterable[Entity]
        if params.get("ref") is not None:
            pool = self._referenced(where, "ref", params["ref"])
        elif cls is not None:
            pool = self.store.conn_by_class.get(cls, {}).values()
        else:
            pool = self.store.connections.values()
        out: list[Entity] = []
        for c in pool:
            if type(c) is not Connection or c.uid not in self.store.connections:
                continue
            if cls is not None and c.cls != cls:
                continue
            if "src" in ends and c.src not in ends["src"]:
                continue
            if "dst" in ends and c.dst not in ends["dst"]:
                continue
            if pred is not None and not pred(c):
                continue
            out.append(c)
        return out

    def _properties(self, where: str, params: dict[str, Any], key: str = "properties") -> dict[str, Any]:
        props = params.get(key, {})
        if props is None:
            props = {}
        if not isinstance(props, dict):
            raise CommandError(f"{where}: {key!r} must be an object")
        for k, v in props.items():
            if k.startswith("_"):
                raise CommandError(f"{where}: property names starting with '_' are reserved ({k!r})")
            if type(v) is dict:
                _check_special_value(where, k, v)
        return props

    def _next_blob(self, where: str) -> bytes:
        if self.blob_pos >= len(self.blobs):
            raise CommandError(
                f"{where}: wrong number of blobs: this command needs blob #{self.blob_pos + 1} "
                f"but the query sent {len(self.blobs)}")
        data = self.blobs[self.blob_pos]
        self.blob_pos += 1
        return data

    def _insert(self, e: Entity) -> None:
        self.store._link(e)
        self.undo.append(partial(self.store._unlink, e))

    def _new_uid(self) -> int:
        store = self.store
        uid = store._next_uid
        store._next_uid += 1
        return uid

    def _remove(self, e: Entity) -> None:
        """Remove ``e``, its connections and the objects it owns (undo-logged)."""
        store = self.store
        if type(e) is Connection:
            if e.uid in store.connections:
                store._unlink(e)
                self.undo.append(lambda: store._link(e))
            return
        if e.uid not in self.objects:
            return
        for c in list(store.edges.get(e.uid, ())):
            if c.uid not in store.connections:
                continue
            owned = self.objects.get(c.dst) if (c.cls in _OWNING_LINKS
                                                and c.src == e.uid) else None
            self._remove(c)
            if owned is not None:
                self._remove(owned)
        store._unlink(e)
        if self.reinserted is None:
            self.reinserted = set()
        self.reinserted.add(e.cls)
        self.undo.append(lambda: store._link(e))

    def _connect(self, cls: str, src: Entity, dst: Entity, props: dict[str, Any]) -> Connection:
        store = self.store
        c = Connection(store._next_uid, cls, props, src.uid, dst.uid)
        store._next_uid += 1
        store._link(c)
        self.undo.append(partial(store._unlink, c))
        return c

    def _owner(self, where: str, params: dict[str, Any], key: str, cls: str) -> Entity | None:
        """The one object of ``cls`` that ``params[key]`` (a '_ref') names, if given."""
        ref = params.get(key)
        if ref is None:
            return None
        found = [e for e in self._referenced(where, key, ref) if e.uid in self.objects]
        if len(found) != 1 or found[0].cls != cls:
            raise CommandError(f"{where}: {key!r} must reference exactly one {cls[1:]} "
                               f"(it references {len(found)} objects)")
        return found[0]

    def _descriptor_set(self, where: str, name: Any) -> Entity:
        if not isinstance(name, str) or not name:
            raise CommandError(f"{where}: 'set' must be a descriptor set's name")
        found = self.store._prop_index("_DescriptorSet", "_name").lookup(name)
        found = [e for e in found if e.props.get("_name") == name]
        if not found:
            raise CommandError(f"{where}: descriptor set {name!r} does not exist")
        return found[0]

    def _vector(self, where: str, data: bytes, dims: int) -> Any:
        import numpy as np  # lazy: only descriptor commands need it

        if len(data) != 4 * dims:
            raise CommandError(
                f"{where}: the descriptor blob has {len(data)} bytes; the set's {dims} "
                f"dimensions need {4 * dims} (float32)")
        return np.frombuffer(data, dtype=np.float32)

    # --- commands ---------------------------------------------------------------
    def _add(self, where: str, params: dict[str, Any], kind: str) -> dict[str, Any]:
        if kind == "Connection":
            return self._add_connection(where, params)
        cls = self._class_of(where, params, kind, "class")
        if cls is None:
            raise CommandError(f"{where}: 'class' is required")
        props = dict(self._properties(where, params))
        owner: tuple[str, Entity] | None = None
        setup = _KIND_SETUP.get(kind)
        if setup is not None:
            owner = setup(self, where, params, props)
        data = self._next_blob(where) if kind in _BLOB_KINDS else None
        if data is not None and kind == "Descriptor" and owner is not None:
            self._vector(where, data, owner[1].props["_dimensions"])
        cond = params.get("if_not_found")
        if cond is not None:
            pred = compile_constraints(cond, where)
            found = [e for e in self._candidates(cls, cond) if pred is None or pred(e)]
            if found:
                self._bind(where, params, found)
                return {"status": STATUS_EXISTS, "info": "Object Exists!"}
        store = self.store
        ent = Entity(store._next_uid, cls, props, data)
        store._next_uid += 1
        store._link_object(ent)
        self.undo.append(partial(store._unlink, ent))
        if owner is not None:
            self._connect(owner[0], owner[1], ent, {})
        connect = params.get("connect")
        if connect is not None:
            self._connect_spec(where, connect, ent)
        self._bind(where, params, [ent])
        return {"status": STATUS_OK}

    def _connect_spec(self, where: str, spec: Any, ent: Entity) -> None:
        """``connect: {ref, class, direction, properties}`` of an Add command."""
        if not isinstance(spec, dict) or "ref" not in spec:
            raise CommandError(f"{where}: 'connect' must be an object with a 'ref'")
        cls = spec.get("class", "AT:connects")  # the default class name is an assumption
        props = self._properties(where, spec) if "properties" in spec else {}
        direction = spec.get("direction", "out")
        if direction not in ("in", "out"):
            raise CommandError(f"{where}: connect 'direction' must be 'in' or 'out'")
        for other in self._referenced(where, "connect.ref", spec["ref"]):
            src, dst = (ent, other) if direction == "out" else (other, ent)
            self._connect(cls, src, dst, dict(props))

    def _add_connection(self, where: str, params: dict[str, Any]) -> dict[str, Any]:
        cls = params.get("class")
        if not isinstance(cls, str) or not cls:
            raise CommandError(f"{where}: 'class' is required (a non-empty string)")
        props = self._properties(where, params)
        ends = []
        for key in ("src", "dst"):
            if params.get(key) is None:
                raise CommandError(f"{where}: {key!r} is required (a '_ref' of an earlier "
                                   "command)")
            ends.append([e for e in self._referenced(where, key, params[key])
                         if e.uid in self.objects])
        cond = params.get("if_not_found")
        if cond is not None:
            pred = compile_constraints(cond, where)
            srcs = {e.uid for e in ends[0]}
            dsts = {e.uid for e in ends[1]}
            found: list[Entity] = [
                c for c in self.store.conn_by_class.get(cls, {}).values()
                if c.src in srcs and c.dst in dsts and (pred is None or pred(c))]
            if found:
                self._bind(where, params, found)
                return {"status": STATUS_EXISTS, "info": "Object Exists!"}
        made: list[Entity] = [self._connect(cls, s, d, dict(props))
                              for s in ends[0] for d in ends[1]]
        self._bind(where, params, made)
        return {"status": STATUS_OK}

    def _find(self, where: str, params: dict[str, Any], kind: str) -> dict[str, Any]:
        found = self._select(where, params, kind, "with_class")
        results = params.get("results") or {}
        if not isinstance(results, dict):
            raise CommandError(f"{where}: 'results' must be an object")
        distances: dict[int, float] | None = None
        if kind == "Descriptor" and params.get("k_neighbors") is not None:
            found, distances = self._knn(where, params, found)
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
        want_blobs = bool(params.get("blobs")) and kind in _BLOB_KINDS
        extras = [(key, prop) for key, prop in _FIND_FLAGS.get(kind, ())
                  if params.get(key) or results.get(key)]
        if distances is not None and params.get("distances"):
            extras.append(("distances", "_distance"))
        if listed is not None and not (isinstance(listed, list)
                                       and all(isinstance(x, str) for x in listed)):
            raise CommandError(f"{where}: results 'list' must be a list of property names")
        if "count" in results and results["count"]:
            out["count"] = len(found)
        if listed or all_props or uniqueids or want_blobs or extras:
            entities = []
            if want_blobs:
                out["blobs_start"] = len(self.out_blobs)
            for e in found:
                if all_props:
                    item = dict(e.props)
                    item["_uniqueid"] = _uniqueid(e)
                elif listed:
                    item = {k: e.props[k] for k in listed if k in e.props}
                else:
                    item = {}
                if uniqueids or (listed and "_uniqueid" in listed):
                    item["_uniqueid"] = _uniqueid(e)
                for _, prop in extras:
                    if prop == "_distance":
                        assert distances is not None
                        item["_distance"] = distances[e.uid]
                    elif prop in e.props:
                        item[prop] = e.props[prop]
                if want_blobs:
                    item["_blob_index"] = len(self.out_blobs)
                    self.out_blobs.append(e.data or b"")
                entities.append(item)
            out["entities"] = entities
            out["returned"] = len(entities)
        else:
            out["returned"] = 0
        return out

    def _knn(self, where: str, params: dict[str, Any],
             found: list[Entity]) -> tuple[list[Entity], dict[int, float]]:
        """Exact k nearest neighbours of the query's next blob within ``found``."""
        import numpy as np

        k = _number(where, params, "k_neighbors", integer=True, minimum=1)
        dset = self._descriptor_set(where, params.get("set"))
        dims = dset.props["_dimensions"]
        query = self._vector(where, self._next_blob(where), dims)
        metric = params.get("metric", dset.props["_metrics"][0])
        if metric not in dset.props["_metrics"]:
            raise CommandError(f"{where}: metric {metric!r} is not one of the set's "
                               f"{dset.props['_metrics']}")
        if not found:
            return [], {}
        mat = np.stack([np.frombuffer(e.data or b"", dtype=np.float32) for e in found])
        if metric == "L2":
            # squared Euclidean distance, smallest first (as FAISS reports it: an assumption)
            diff = mat - query
            score = np.einsum("ij,ij->i", diff, diff)
            order = np.argsort(score, kind="stable")
        else:
            score = mat @ query
            if metric == "CS":
                norms = np.linalg.norm(mat, axis=1) * float(np.linalg.norm(query))
                score = np.divide(score, norms, out=np.zeros_like(score), where=norms > 0)
            order = np.argsort(-score, kind="stable")  # similarity: largest first
        chosen = [found[i] for i in order[:k]]
        return chosen, {found[i].uid: float(score[i]) for i in order[:k]}

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

    def _update(self, where: str, params: dict[str, Any], kind: str) -> dict[str, Any]:
        props = self._properties(where, params)
        remove = params.get("remove_props", [])
        if not isinstance(remove, list) or not all(isinstance(k, str) for k in remove):
            raise CommandError(f"{where}: 'remove_props' must be a list of property names")
        found = self._select(where, params, kind, "with_class")
        store = self.store
        for e in found:
            old = e.props
            new = dict(old)
            for k in remove:
                if not k.startswith("_"):  # system properties stay
                    new.pop(k, None)
            new.update(props)
            store._set_props(e, new)
            self.undo.append(lambda e=e, old=old: store._set_props(e, old))  # type: ignore[misc]
        return {"status": STATUS_OK, "count": len(found)}

    def _delete(self, where: str, params: dict[str, Any], kind: str) -> dict[str, Any]:
        found = self._select(where, params, kind, "with_class")
        for e in found:
            self._remove(e)
        return {"status": STATUS_OK, "count": len(found)}

    def _get_status(self, where: str, params: dict[str, Any]) -> dict[str, Any]:
        return {"status": STATUS_OK, "info": "OK", "system": "ApertureDB",
                "version": SERVER_VERSION}

    def _user_log_message(self, where: str, params: dict[str, Any]) -> dict[str, Any]:
        # Utils.user_log_message(): the real server writes the text to its log;
        # this one checks the shape and keeps nothing.
        text, level = params.get("text"), params.get("type", "INFO")
        if not isinstance(text, str):
            raise CommandError(f"{where}: 'text' must be a string")
        if level not in ("INFO", "WARNING", "ERROR"):
            raise CommandError(f"{where}: 'type' must be INFO, WARNING or ERROR, got {level!r}")
        return {"status": STATUS_OK}

    def _get_schema(self, where: str, params: dict[str, Any]) -> dict[str, Any]:
        classes = _summarise(self.objects.values())
        conns = _summarise(self.store.connections.values())
        for cls, summary in conns.items():
            c = next(iter(self.store.conn_by_class[cls].values()))
            summary["src"] = self.objects[c.src].cls if c.src in self.objects else None
            summary["dst"] = self.objects[c.dst].cls if c.dst in self.objects else None
        for target, summary in (("entity", classes), ("connection", conns)):
            for (t, cls, prop, _kind) in self.store.declared:
                props = summary.get(cls, {}).get("properties") if t == target else None
                if props and prop in props:
                    props[prop][1] = True  # [matched, indexed, type]
        entities = {"returned": len(classes), "classes": classes} if classes else None
        connections = {"returned": len(conns), "classes": conns} if conns else None
        return {"status": STATUS_OK, "entities": entities, "connections": connections}

    # --- indexes ----------------------------------------------------------------
    def _index_key(self, where: str, params: dict[str, Any],
                   optional: bool = False) -> tuple[Any, Any, Any, Any]:
        target = params.get("index_type", params.get("target"))
        cls = params.get("class")
        prop = params.get("property_key", params.get("property"))
        kind = params.get("kind", "ordered" if not optional else None)
        if target is not None and target not in ("entity", "connection"):
            raise CommandError(f"{where}: 'target' must be 'entity' or 'connection', "
                               f"got {target!r}")
        for label, v in (("class", cls), ("property", prop), ("kind", kind)):
            if v is None and optional:
                continue
            if not isinstance(v, str) or not v:
                raise CommandError(f"{where}: {label!r} must be a non-empty string")
        if target is None and not optional:
            raise CommandError(f"{where}: 'target' must be 'entity' or 'connection'")
        return target, cls, prop, kind

    def _create_index(self, where: str, params: dict[str, Any]) -> dict[str, Any]:
        key = self._index_key(where, params)
        declared = self.store.declared
        if key in declared:
            return {"status": STATUS_EXISTS, "info": "Index exists"}
        declared[key] = {}
        self.undo.append(lambda: declared.pop(key, None))
        if key[0] == "entity":
            self.store._prop_index(key[1], key[2])  # equality look-ups use it from now on
        return {"status": STATUS_OK}

    def _remove_index(self, where: str, params: dict[str, Any]) -> dict[str, Any]:
        key = self._index_key(where, params)
        if key in BUILTIN_INDEXES:
            raise CommandError(f"{where}: the built-in index {key[1]}.{key[2]} cannot be "
                               "removed")
        declared = self.store.declared
        if key not in declared:
            raise CommandError(f"{where}: there is no {key[3]} index on {key[0]} class "
                               f"{key[1]!r} property {key[2]!r}")
        params_ = declared.pop(key)
        self.undo.append(lambda: declared.__setitem__(key, params_))
        return {"status": STATUS_OK}

    def _get_indexes(self, where: str, params: dict[str, Any]) -> dict[str, Any]:
        want = self._index_key(where, params, optional=True)
        grouped: dict[str, dict[str, dict[str, list[Any]]]] = {}
        for key, extra in sorted(self.store.declared.items()):
            if any(w is not None and w != k for w, k in zip(want, key, strict=True)):
                continue
            target, cls, prop, kind = key
            grouped.setdefault(target, {}).setdefault(cls, {}).setdefault(prop, []).append(
                {"kind": kind, "params": dict(extra)})
        return {"status": STATUS_OK, "indexes": grouped}


def _summarise(objs: Iterable[Entity]) -> dict[str, dict[str, Any]]:
    classes: dict[str, dict[str, Any]] = {}
    for e in objs:
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
    return classes


def _check_special_value(where: str, key: str, value: dict[str, Any]) -> None:
    """Property values that are objects must be a valid ``{"_date": ...}``."""
    if "_date" in value:
        d = value["_date"]
        if len(value) != 1 or not isinstance(d, str) or not _valid_date(d):
            raise CommandError(f"{where}: property {key!r}: invalid _date {d!r} "
                               "(expected an ISO 8601 date or date-time string)")


def _valid_date(text: str) -> bool:
    from datetime import datetime

    t = text.strip()
    if t.endswith("Z"):
        t = t[:-1] + "+00:00"
    try:
        datetime.fromisoformat(t)
    except ValueError:
        return False
    return True


def _setup_bounding_box(tx: _Transaction, where: str, params: dict[str, Any],
                        props: dict[str, Any]) -> tuple[str, Entity] | None:
    rect = params.get("rectangle")
    if not isinstance(rect, dict):
        raise CommandError(f"{where}: 'rectangle' {{x, y, width, height}} is required")
    coords = {k: _number(where, rect, k) for k in ("x", "y", "width", "height")}
    props["_coordinates"] = coords
    _copy_label(where, params, props)
    image = tx._owner(where, params, "image_ref", "_Image")
    return None if image is None else ("_ImageToBoundingBox", image)


def _setup_polygon(tx: _Transaction, where: str, params: dict[str, Any],
                   props: dict[str, Any]) -> tuple[str, Entity] | None:
    polygons = params.get("polygons")
    if not isinstance(polygons, list) or not polygons:
        raise CommandError(f"{where}: 'polygons' (a list of lists of [x, y]) is required")
    props["_vertices"] = polygons
    _copy_label(where, params, props)
    image = tx._owner(where, params, "image_ref", "_Image")
    return None if image is None else ("_ImageToPolygon", image)


def _setup_video_part(link: str) -> Callable[..., tuple[str, Entity] | None]:
    def setup(tx: _Transaction, where: str, params: dict[str, Any],
              props: dict[str, Any]) -> tuple[str, Entity] | None:
        _copy_label(where, params, props)
        video = tx._owner(where, params, "video_ref", "_Video")
        return None if video is None else (link, video)
    return setup


def _setup_descriptor_set(tx: _Transaction, where: str, params: dict[str, Any],
                          props: dict[str, Any]) -> None:
    name = params.get("name")
    if not isinstance(name, str) or not name:
        raise CommandError(f"{where}: 'name' must be a non-empty string")
    if tx.store._prop_index("_DescriptorSet", "_name").lookup(name):
        raise CommandError(f"{where}: descriptor set {name!r} already exists")
    props["_name"] = name
    props["_dimensions"] = _number(where, params, "dimensions", integer=True, minimum=1)
    metrics = params.get("metric", "L2")
    metrics = [metrics] if isinstance(metrics, str) else metrics
    if not isinstance(metrics, list) or not metrics or any(m not in _METRICS for m in metrics):
        raise CommandError(f"{where}: 'metric' must be one or a list of {list(_METRICS)}, "
                           f"got {params.get('metric')!r}")
    engines = params.get("engine", "FaissFlat")
    props["_metrics"] = metrics
    props["_engines"] = [engines] if isinstance(engines, str) else engines
    return None


def _setup_descriptor(tx: _Transaction, where: str, params: dict[str, Any],
                      props: dict[str, Any]) -> tuple[str, Entity]:
    dset = tx._descriptor_set(where, params.get("set"))
    props["_set_name"] = dset.props["_name"]
    _copy_label(where, params, props)
    return ("_DescriptorSetToDescriptor", dset)


def _copy_label(where: str, params: dict[str, Any], props: dict[str, Any]) -> None:
    label = params.get("label")
    if label is not None:
        if not isinstance(label, str):
            raise CommandError(f"{where}: 'label' must be a string")
        props["_label"] = label


# Object types: command suffix -> store class (None: the command's own "class").
_OBJECT_CLASSES = {
    "Entity": None, "Connection": None, "Blob": "_Blob", "Image": "_Image",
    "Video": "_Video", "Clip": "_Clip", "Frame": "_Frame",
    "BoundingBox": "_BoundingBox", "Polygon": "_Polygon",
    "DescriptorSet": "_DescriptorSet", "Descriptor": "_Descriptor",
}
# Add of these consumes one request blob; Find with "blobs": true returns them.
_BLOB_KINDS = frozenset(["Blob", "Image", "Video", "Descriptor"])
# Per-type parameters of Add (validate, fill system properties, name the owner).
_KIND_SETUP: dict[str, Callable[..., Any]] = {
    "BoundingBox": _setup_bounding_box,
    "Polygon": _setup_polygon,
    "Clip": _setup_video_part("_VideoToClip"),
    "Frame": _setup_video_part("_VideoToFrame"),
    "DescriptorSet": _setup_descriptor_set,
    "Descriptor": _setup_descriptor,
}
# Find flags that return a system property (flag, property).
_FIND_FLAGS: dict[str, tuple[tuple[str, str], ...]] = {
    "BoundingBox": (("coordinates", "_coordinates"), ("labels", "_label")),
    "Polygon": (("vertices", "_vertices"), ("labels", "_label")),
    "Descriptor": (("labels", "_label"),),
    "Clip": (("labels", "_label"),),
    "Frame": (("labels", "_label"),),
    "DescriptorSet": (("metrics", "_metrics"), ("dimensions", "_dimensions"),
                      ("engines", "_engines")),
}

_HANDLERS: dict[str, Callable[[_Transaction, str, dict[str, Any]], dict[str, Any]]] = {
    "GetStatus": _Transaction._get_status,
    "GetSchema": _Transaction._get_schema,
    "CreateIndex": _Transaction._create_index,
    "RemoveIndex": _Transaction._remove_index,
    "GetIndexes": _Transaction._get_indexes,
    "UserLogMessage": _Transaction._user_log_message,
}

# Command name -> (method, object kind or None for the handlers above).
_DISPATCH: dict[str, tuple[Callable[..., dict[str, Any]], str | None]] = {
    **{name: (fn, None) for name, fn in _HANDLERS.items()},
    **{verb + kind: (getattr(_Transaction, "_" + verb.lower()), kind)
       for verb in ("Add", "Find", "Update", "Delete") for kind in _OBJECT_CLASSES},
}

SUPPORTED_COMMANDS = frozenset(
    ["Authenticate", "RefreshToken", *_HANDLERS]
    + [verb + kind for verb in ("Add", "Find", "Update", "Delete") for kind in _OBJECT_CLASSES]
)
