from __future__ import annotations

import os
from typing import Any, Iterator

from django.http import JsonResponse, StreamingHttpResponse

from aperturedb_pool.django import get_connector, get_pool, has_connector, release_connector


def whoami(request: Any) -> JsonResponse:
    conn = get_connector()
    assert get_connector() is conn  # one connector per request
    status, _ = conn.query([{"GetStatus": {}}])
    found, _ = conn.query([{"FindEntity": {"with_class": "Nothing", "results": {"count": True}}}])
    assert status[0]["GetStatus"]["status"] == 0
    assert found[0]["FindEntity"]["status"] == 0
    pool = get_pool()
    return JsonResponse({"pid": os.getpid(), "pool": pool.name, "pool_id": id(pool),
                         "leased": pool.stats().leased})


def twice(request: Any) -> JsonResponse:
    a = get_connector()
    b = get_connector()
    a.query([{"GetStatus": {}}])
    return JsonResponse({"same": a is b, "leased": get_pool().stats().leased,
                         "has": has_connector()})


def nodb(request: Any) -> JsonResponse:
    return JsonResponse({"has": has_connector()})


def boom(request: Any) -> JsonResponse:
    get_connector().query([{"GetStatus": {}}])
    raise ValueError("the view failed")


def connector_fails(request: Any) -> JsonResponse:
    get_connector().query([{"AddEntity": {"class": "X", "properties": {"k": 1}}}])
    return JsonResponse({"ok": True})


def stream(request: Any) -> StreamingHttpResponse:
    def chunks() -> Iterator[bytes]:
        # The connector stays leased while the response streams.
        for _ in range(3):
            response, _ = get_connector().query([{"GetStatus": {}}])
            yield f"{response[0]['GetStatus']['status']} {get_pool().stats().leased}\n".encode()
    return StreamingHttpResponse(chunks())


def release_early(request: Any) -> JsonResponse:
    get_connector().query([{"GetStatus": {}}])
    release_connector()
    return JsonResponse({"has": has_connector(), "leased": get_pool().stats().leased})
