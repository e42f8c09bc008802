"""Wire-level constants and the ``queryMessage`` protobuf class.

The message class is built at run time from its definition (a
``FileDescriptorProto`` put together field by field) in a private descriptor
pool, so it never clashes with the SDK's generated class, which registers the
same full name in protobuf's default pool when both live in one process.
"""

from __future__ import annotations

import struct
from typing import Any

# One frame: a native-order unsigned 32-bit length, then that many bytes.
LENGTH = struct.Struct("@I")
# The hello, in both directions: (version, protocol), native order.
HELLO = struct.Struct("@II")

PROTOCOL_VERSION = 1
PROTOCOL_TCP = 1
PROTOCOL_TLS = 2

# A hello whose version is this number opens the control channel instead of
# a client session ("ADBC" read as a big-endian number). The server answers
# ``(CONTROL_VERSION, CONTROL_PROTOCOL)`` and then exchanges framed JSON.
CONTROL_VERSION = 0x41444243
CONTROL_PROTOCOL = 1

# The largest frame accepted; the real server's default is 2048 MB.
MAX_FRAME = 2048 * 2**20

_message_class: Any = None


def query_message_class() -> Any:
    """Return the ``VDMS.protobufs.queryMessage`` class (built once)."""
    global _message_class
    if _message_class is None:
        from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

        fdp = descriptor_pb2.FileDescriptorProto()
        fdp.name = "aperturedb_pool/testing/query_message.proto"
        fdp.package = "VDMS.protobufs"
        fdp.syntax = "proto3"
        msg = fdp.message_type.add()
        msg.name = "queryMessage"
        F = descriptor_pb2.FieldDescriptorProto
        for name, number, ftype, label in (
            ("json", 1, F.TYPE_STRING, F.LABEL_OPTIONAL),
            ("blobs", 2, F.TYPE_BYTES, F.LABEL_REPEATED),
            ("token", 3, F.TYPE_STRING, F.LABEL_OPTIONAL),
        ):
            field = msg.field.add()
            field.name = name
            field.number = number
            field.type = ftype
            field.label = label
        pool = descriptor_pool.DescriptorPool()
        pool.Add(fdp)
        descriptor = pool.FindMessageTypeByName("VDMS.protobufs.queryMessage")
        _message_class = message_factory.GetMessageClass(descriptor)
    return _message_class


def frame(body: bytes) -> bytes:
    """Prefix ``body`` with its length: one buffer, so it goes out in one send."""
    return LENGTH.pack(len(body)) + body


def recv_exact(sock: Any, n: int) -> bytes:
    """Read exactly ``n`` bytes from a blocking socket (a client of the server)."""
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("the server closed the connection")
        buf += chunk
    return bytes(buf)


def recv_frame(sock: Any) -> bytes:
    """Read one length-prefixed frame from a blocking socket."""
    (n,) = LENGTH.unpack(recv_exact(sock, LENGTH.size))
    return recv_exact(sock, n)
