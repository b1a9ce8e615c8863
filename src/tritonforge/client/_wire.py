"""Triton's ``ModelStreamInfer`` over one plain HTTP/2 connection, written on asyncio's transports: the
fast path of the :class:`~tritonforge.client.AsyncClient`'s inference requests and of batch inference's lanes.

Why: a grpc.aio call costs ~50-200 µs of client CPU here however small the message (its C core hands each
completion from an event-engine thread to a poller thread to the event loop through a socket pair), about
as much as the model's own work on the server. Calls of one kind come again and again, so they go as
messages of long-lived gRPC streams, one request in flight per stream at a time (so the next message is
its answer), all of an endpoint's streams sharing one TCP connection; a request then costs two ``write``
calls and one parsed message. :class:`StreamPool` keeps an endpoint's idle streams for the client's calls;
:class:`Streams` gives each lane of a batch run a stream of its own, which it drives without the client's
per-call bookkeeping (~30-40 µs a request, ~15 % of batch-infer's CPU per row; the client still sends a
lane's first request of each input shape, and any request a stream can't answer).

Only what such a connection needs is spoken: the preface and SETTINGS, flow control both ways, PING
answers, HEADERS to open a stream (HPACK literals, never indexed, so no table state), DATA, and any
sign of the end (RST_STREAM, GOAWAY, trailers, the connection lost). Response headers are never decoded:
the answers are what matters, and whatever ends a stream early fails its request with
:class:`StreamBroken`, which the client then sends as a grpc.aio call (retries, the endpoint pool,
exact errors). No TLS: a client with ``tls`` sends grpc.aio calls.
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Sequence
from typing import Any

__all__ = ["AnswerLate", "Connection", "Lane", "StreamBroken", "StreamPool", "Streams", "open_connection"]

PATH = "/inference.GRPCInferenceService/ModelStreamInfer"
_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_DATA, _HEADERS, _RST_STREAM, _SETTINGS, _PING, _GOAWAY, _WINDOW_UPDATE = 0, 1, 3, 4, 6, 7, 8
_END_STREAM, _ACK, _END_HEADERS, _PADDED = 0x1, 0x1, 0x4, 0x8
_MAX_WINDOW = (1 << 31) - 1
_DEFAULT_WINDOW = 65_535
_REFILL_AT = 1 << 30  # received bytes (of our 2**31 - 1 windows) after which we hand them back
_FRAME = struct.Struct(">I")  # a frame header is a 24-bit length, type, flags, 31-bit stream id


class StreamBroken(Exception):
    """A stream (or its connection) ended before answering; the request has to go another way."""


class AnswerLate(Exception):
    """No answer within the call's deadline (the stream was reset: the server drops the request)."""


def _frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return _FRAME.pack(len(payload))[1:] + bytes((kind, flags)) + _FRAME.pack(stream) + payload


def _hpack_int(value: int, prefix_bits: int = 7) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((value,))
    out = bytearray((limit,))
    value -= limit
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _header_block(headers: Sequence[tuple[str, str]]) -> bytes:
    """HPACK "literal without indexing, new name" for every field: valid for any decoder, no state."""
    out = bytearray()
    for name, value in headers:
        n, v = name.encode(), value.encode()
        out += b"\x00" + _hpack_int(len(n)) + n + _hpack_int(len(v)) + v
    return bytes(out)


class _Stream:
    __slots__ = ("buffer", "id", "received", "send_window", "waiter")

    def __init__(self, stream_id: int, send_window: int) -> None:
        self.id = stream_id
        self.received = 0
        self.send_window = send_window
        self.buffer = bytearray()
        self.waiter: asyncio.Future[bytes] | None = None


class Connection(asyncio.Protocol):
    """One HTTP/2 connection to a Triton gRPC endpoint carrying ``ModelStreamInfer`` streams.

    :meth:`stream` opens a stream; :meth:`request` sends one serialized ``ModelInferRequest`` on it and
    returns a future of the next serialized ``ModelStreamInferResponse``. Any failure fails the futures
    waiting with :class:`StreamBroken` (the connection then takes no more requests).
    """

    def __init__(self, authority: str, metadata: Sequence[tuple[str, str]] = ()) -> None:
        self.authority = authority
        self.metadata = [(k.lower(), v) for k, v in metadata]
        self.transport: asyncio.Transport | None = None
        self.broken: BaseException | None = None
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._streams: dict[int, _Stream] = {}
        self._next_id = 1
        self._inbuf = bytearray()
        self._send_window = _DEFAULT_WINDOW  # the connection's, from the server's WINDOW_UPDATEs
        self._initial_window = _DEFAULT_WINDOW  # a new stream's, from the server's SETTINGS
        self._max_frame = 16_384
        self._blocked: list[tuple[_Stream, memoryview]] = []  # DATA waiting for window
        self._received = 0  # bytes since our last WINDOW_UPDATE

    # -- asyncio.Protocol --------------------------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        settings = struct.pack(">HI", 0x2, 0) + struct.pack(">HI", 0x4, _MAX_WINDOW)  # no push; big windows
        transport.write(
            _PREFACE
            + _frame(_SETTINGS, 0, 0, settings)
            + _frame(_WINDOW_UPDATE, 0, 0, _FRAME.pack(_MAX_WINDOW - _DEFAULT_WINDOW))
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(StreamBroken(f"connection to {self.authority} lost: {exc or 'closed by the server'}"))

    def data_received(self, data: bytes) -> None:
        buf = self._inbuf
        buf += data
        pos, end = 0, len(buf)
        try:
            while end - pos >= 9:
                length = int.from_bytes(buf[pos : pos + 3], "big")
                if end - pos < 9 + length:
                    break
                kind, flags = buf[pos + 3], buf[pos + 4]
                stream_id = int.from_bytes(buf[pos + 5 : pos + 9], "big") & 0x7FFFFFFF
                payload = buf[pos + 9 : pos + 9 + length]
                pos += 9 + length
                if kind == _DATA:
                    self._on_data(stream_id, flags, payload, length)
                elif kind == _WINDOW_UPDATE:
                    self._on_window_update(stream_id, int.from_bytes(payload[:4], "big") & 0x7FFFFFFF)
                elif kind == _PING:
                    if not flags & _ACK:
                        self._write(_frame(_PING, _ACK, 0, bytes(payload)))
                elif kind == _SETTINGS:
                    if not flags & _ACK:
                        self._on_settings(payload)
                elif kind == _HEADERS:
                    if flags & _END_STREAM:  # trailers (or a trailers-only answer): the stream is over
                        self._end_stream(stream_id, "the server ended the stream")
                elif kind == _RST_STREAM:
                    self._end_stream(stream_id, f"the server reset the stream (code {bytes(payload).hex()})")
                elif kind == _GOAWAY:
                    self._fail(StreamBroken(f"{self.authority} is going away"))
                # PRIORITY, CONTINUATION (of headers we don't read), unknown types: nothing to do
        finally:
            del buf[:pos]

    # -- frames in ---------------------------------------------------------------------------------------

    def _on_data(self, stream_id: int, flags: int, payload: bytearray, length: int) -> None:
        self._received += length
        if self._received >= _REFILL_AT:  # give the window back long before it runs out
            self._write(_frame(_WINDOW_UPDATE, 0, 0, _FRAME.pack(self._received)))
            self._received = 0
        stream = self._streams.get(stream_id)
        if stream is None:
            return
        stream.received += length
        if stream.received >= _REFILL_AT:
            self._write(_frame(_WINDOW_UPDATE, 0, stream_id, _FRAME.pack(stream.received)))
            stream.received = 0
        if flags & _PADDED:
            payload = payload[1 : len(payload) - payload[0]]
        sbuf = stream.buffer
        sbuf += payload
        while len(sbuf) >= 5:
            size = int.from_bytes(sbuf[1:5], "big")
            if len(sbuf) < 5 + size:
                break
            if sbuf[0]:  # compressed: we never ask for it, so this isn't a server we understand
                self._end_stream(stream_id, "a compressed message")
                return
            message = bytes(sbuf[5 : 5 + size])
            del sbuf[: 5 + size]
            waiter = stream.waiter
            if waiter is not None and not waiter.done():
                stream.waiter = None
                waiter.set_result(message)
        if flags & _END_STREAM:
            self._end_stream(stream_id, "the server ended the stream")

    def _on_settings(self, payload: bytearray) -> None:
        for i in range(0, len(payload) - 5, 6):
            key, value = struct.unpack_from(">HI", payload, i)
            if key == 0x4:  # INITIAL_WINDOW_SIZE: applies to the open streams as a delta
                delta = value - self._initial_window
                self._initial_window = value
                for stream in self._streams.values():
                    stream.send_window += delta
            elif key == 0x5:
                self._max_frame = value
        self._write(_frame(_SETTINGS, _ACK, 0))
        self._flush_blocked()
        if not self.ready.done():
            self.ready.set_result(None)

    def _on_window_update(self, stream_id: int, increment: int) -> None:
        if stream_id == 0:
            self._send_window += increment
        else:
            stream = self._streams.get(stream_id)
            if stream is None:
                return
            stream.send_window += increment
        self._flush_blocked()

    def _end_stream(self, stream_id: int, why: str) -> None:
        stream = self._streams.pop(stream_id, None)
        if stream is not None and stream.waiter is not None and not stream.waiter.done():
            stream.waiter.set_exception(StreamBroken(why))

    def _fail(self, exc: StreamBroken) -> None:
        if self.broken is None:
            self.broken = exc
        if not self.ready.done():
            self.ready.set_exception(exc)
            self.ready.exception()  # retrieved: nobody need wait for it
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            if stream.waiter is not None and not stream.waiter.done():
                stream.waiter.set_exception(exc)
        self._blocked.clear()
        if self.transport is not None:
            self.transport.close()

    # -- frames out --------------------------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def stream(self, scheme: str = "http") -> int:
        """Open a ``ModelStreamInfer`` stream; its id.

        Raises:
            StreamBroken: the connection is no longer usable.
        """
        if self.broken is not None:
            raise self.broken
        stream_id = self._next_id
        self._next_id += 2
        self._streams[stream_id] = _Stream(stream_id, self._initial_window)
        block = _header_block(
            [
                (":method", "POST"),
                (":scheme", scheme),
                (":path", PATH),
                (":authority", self.authority),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
                *self.metadata,
            ]
        )
        self._write(_frame(_HEADERS, _END_HEADERS, stream_id, block))
        return stream_id

    def request(self, stream_id: int, message: bytes) -> asyncio.Future[bytes]:
        """Send ``message`` on the stream; a future of the next message that comes back on it.

        Raises:
            StreamBroken: the stream or the connection is gone.
        """
        stream = self._streams.get(stream_id)
        if stream is None:
            raise self.broken or StreamBroken(f"stream {stream_id} is closed")
        waiter = asyncio.get_running_loop().create_future()
        stream.waiter = waiter
        body = memoryview(b"\x00" + len(message).to_bytes(4, "big") + message)
        if self._blocked:
            self._blocked.append((stream, body))
        else:
            self._send(stream, body)
        return waiter

    def discard(self, stream_id: int) -> None:
        """Give up on the stream (an answer late past its deadline): the server is told to cancel it."""
        stream = self._streams.pop(stream_id, None)
        if stream is not None:
            self._write(_frame(_RST_STREAM, 0, stream_id, _FRAME.pack(0x8)))  # CANCEL

    def finish(self, stream_id: int) -> None:
        """End our side of the stream (the server then ends its own)."""
        stream = self._streams.pop(stream_id, None)
        if stream is not None:
            self._write(_frame(_DATA, _END_STREAM, stream_id))

    def _send(self, stream: _Stream, body: memoryview) -> None:
        """Send as much of ``body`` as the windows allow; queue the rest."""
        max_frame = self._max_frame
        frames: list[bytes | memoryview] = []
        while body:
            room = min(len(body), max_frame, self._send_window, stream.send_window)
            if room <= 0:
                self._blocked.append((stream, body))
                break
            frames.append(_FRAME.pack(room)[1:] + b"\x00\x00" + _FRAME.pack(stream.id))  # DATA, no flags
            frames.append(body[:room])
            body = body[room:]
            self._send_window -= room
            stream.send_window -= room
        if frames and self.transport is not None and not self.transport.is_closing():
            self.transport.writelines(frames)

    def _flush_blocked(self) -> None:
        blocked, self._blocked = self._blocked, []
        for i, (stream, body) in enumerate(blocked):
            if stream.id not in self._streams:
                continue
            self._send(stream, body)
            if self._blocked:  # out of window again: keep the order
                self._blocked.extend(blocked[i + 1 :])
                return

    def close(self) -> None:
        """End every stream and close the connection."""
        for stream_id in list(self._streams):
            self.finish(stream_id)
        if self.transport is not None:
            self.transport.close()


async def open_connection(
    url: str, metadata: Sequence[tuple[str, str]] = (), timeout_s: float = 5.0
) -> Connection:
    """A :class:`Connection` to ``host:port``, its SETTINGS exchanged.

    Raises:
        StreamBroken: the endpoint can't be reached or doesn't speak HTTP/2 in time.
    """
    host, _, port = url.rpartition(":")
    host = host.strip("[]")
    loop = asyncio.get_running_loop()
    try:
        _, conn = await asyncio.wait_for(
            loop.create_connection(lambda: Connection(url, metadata), host, int(port)), timeout_s
        )
        await asyncio.wait_for(asyncio.shield(conn.ready), timeout_s)
    except (OSError, ValueError, asyncio.TimeoutError) as exc:
        raise StreamBroken(f"{url}: {exc or type(exc).__name__}") from exc
    return conn


def _ended(task: asyncio.Task[Connection] | None) -> bool:
    """Whether ``task`` opened a connection that has since ended."""
    if task is None or not task.done() or task.cancelled() or task.exception() is not None:
        return False
    return task.result().broken is not None


class StreamPool:
    """One endpoint's connection and its idle streams, for calls that each take a stream while they wait.

    :meth:`send` sends on an idle stream (a new one when none is idle) and gives the stream back once
    answered; a stream whose call failed, was cancelled or ran late is reset, never reused. The
    connection opens on first use and again after it ended; after ``MAX_BREAKS`` broken connections or
    streams in a row the pool reports itself ``dead`` (the caller then stays with its other transport).
    """

    MAX_BREAKS = 3

    def __init__(self, url: str, metadata: Sequence[tuple[str, str]]) -> None:
        self.url = url
        self.metadata = list(metadata)
        self.breaks = 0
        self._task: asyncio.Task[Connection] | None = None
        self._conn: Connection | None = None
        self._idle: list[int] = []

    @property
    def dead(self) -> bool:
        return self.breaks >= self.MAX_BREAKS

    async def _connection(self) -> Connection:
        conn = self._conn
        if conn is not None and conn.broken is None:
            return conn
        if self._task is None or _ended(self._task) or (self._task.done() and self._task.exception()):
            self._idle = []
            self._task = asyncio.get_running_loop().create_task(open_connection(self.url, self.metadata))
        conn = self._conn = await asyncio.shield(self._task)
        if conn.broken is not None:
            raise conn.broken
        return conn

    async def send(self, body: bytes, timeout_s: float | None) -> bytes:
        """The answer (a serialized ``ModelStreamInferResponse``) to ``body`` (a ``ModelInferRequest``).

        Raises:
            StreamBroken: the request did not get through this way (send it another way).
            AnswerLate: no answer within ``timeout_s``.
        """
        try:
            conn = await self._connection()
            stream_id = self._idle.pop() if self._idle else conn.stream()
            waiter = conn.request(stream_id, body)
        except StreamBroken:
            self.breaks += 1
            raise
        late = None
        if timeout_s is not None:
            late = asyncio.get_running_loop().call_later(max(0.0, timeout_s), _expire, waiter, timeout_s)
        try:
            answer = await waiter
        except StreamBroken:
            conn.discard(stream_id)
            self.breaks += 1
            raise
        except BaseException:  # late, or the caller cancelled: the server is told to drop it
            conn.discard(stream_id)
            raise
        finally:
            if late is not None:
                late.cancel()
        self.breaks = 0
        if conn is self._conn and conn.broken is None:
            self._idle.append(stream_id)
        return answer

    def forget(self) -> None:
        """Close the connection (an answer that was not ours: start afresh on the next call)."""
        if self._conn is not None:
            self._conn.close()
            self._conn.broken = self._conn.broken or StreamBroken("closed by the client")
        self.breaks += 1

    def close(self) -> None:
        """End every stream and close the connection (or stop it opening)."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
        elif self._task is not None and not self._task.cancelled() and self._task.exception() is None:
            self._task.result().close()
        self._idle = []


def _expire(waiter: asyncio.Future[bytes], timeout_s: float) -> None:
    if not waiter.done():
        waiter.set_exception(AnswerLate(f"no answer within {timeout_s:g} s"))


class Lane:
    """A batch lane's stream: one request in flight on it at a time, so the next message is its answer."""

    __slots__ = ("breaks", "conn", "dead", "sent_at", "stream_id", "url", "waiter")

    def __init__(self, url: str) -> None:
        self.url = url
        self.conn: Connection | None = None
        self.stream_id: int | None = None
        self.waiter: asyncio.Future[bytes] | None = None
        self.sent_at = 0.0
        self.breaks = 0
        self.dead = False  # the lane sends through the full client from now on


class Streams:
    """The lanes' streams: a connection per endpoint (opened when a lane first needs it, again after it
    ended), lane ``i`` on endpoint ``i % len(urls)``, and a watchdog that gives up on answers later than
    ``timeout_s``.

    :meth:`send` returns the answer's bytes, or None when the request has to go through the full client
    instead: the endpoint unreachable this way, the stream ended, no answer in time. A lane whose stream
    broke opens another on the next request; after ``MAX_BREAKS`` it stays with the full client.
    """

    MAX_BREAKS = 3

    def __init__(
        self, urls: Sequence[str], metadata: Sequence[tuple[str, str]], timeout_s: float | None
    ) -> None:
        self.urls = list(urls)
        self.metadata = list(metadata)
        self.timeout_s = timeout_s
        self._conns: dict[str, asyncio.Task[Connection]] = {}
        self._lanes: list[Lane] = []
        self._watchdog: asyncio.Task[None] | None = None

    def lane(self, index: int) -> Lane:
        lane = Lane(self.urls[index % len(self.urls)])
        self._lanes.append(lane)
        if self._watchdog is None and self.timeout_s is not None:
            self._watchdog = asyncio.get_running_loop().create_task(self._watch(self.timeout_s))
        return lane

    async def _connection(self, url: str) -> Connection | None:
        task = self._conns.get(url)
        if _ended(task):  # a connection that ended (GOAWAY, lost): open another
            task = None
        if task is None:
            task = self._conns[url] = asyncio.get_running_loop().create_task(
                open_connection(url, self.metadata)
            )
        try:
            conn = await asyncio.shield(task)
        except StreamBroken:
            return None
        return None if conn.broken is not None else conn

    async def send(self, lane: Lane, body: bytes) -> bytes | None:
        """The answer to ``body`` sent on the lane's stream, or None: send it through the client."""
        if lane.dead:
            return None
        try:
            if lane.stream_id is None:
                conn = lane.conn = await self._connection(lane.url)
                if conn is None:
                    lane.dead = True
                    return None
                lane.stream_id = conn.stream()
            assert lane.conn is not None
            waiter = lane.waiter = lane.conn.request(lane.stream_id, body)
            lane.sent_at = time.monotonic()
            return await waiter
        except StreamBroken:
            if lane.conn is not None and lane.stream_id is not None:
                lane.conn.discard(lane.stream_id)
            lane.stream_id = None
            lane.breaks += 1
            lane.dead = lane.breaks >= self.MAX_BREAKS
            return None
        finally:
            lane.waiter = None

    async def _watch(self, timeout_s: float) -> None:
        every = min(1.0, max(0.05, timeout_s / 4))
        while True:
            await asyncio.sleep(every)
            now = time.monotonic()
            for lane in self._lanes:
                waiter = lane.waiter
                if waiter is not None and not waiter.done() and now - lane.sent_at > timeout_s:
                    waiter.set_exception(StreamBroken(f"no answer within {timeout_s:g} s"))

    async def aclose(self) -> None:
        """Stop the watchdog and close every connection."""
        if self._watchdog is not None:
            self._watchdog.cancel()
        for task in self._conns.values():
            if not task.done():
                task.cancel()
                continue
            if not task.cancelled() and task.exception() is None:
                task.result().close()
