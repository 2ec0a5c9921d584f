"""What the test client records on the wire: sent DCIDs, server-issued CIDs, frames received.

Kept apart from :mod:`backends.client` (the connection and its moves): this is
the bookkeeping the routing assertions read, fed by the client's transport and
by a qlog trace that keeps only the frames we need.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any

from aioquic.quic.logger import QuicLogger, QuicLoggerTrace

from lb.core.addresses import Address


@dataclass
class WireRecord:
    """What one client connection saw on the wire (see the module docstring)."""

    #: Distinct DCIDs of short-header packets sent, in first-use order.
    sent_short_dcids: list[bytes] = field(default_factory=list)
    #: DCIDs of long-header packets sent (the client's random Initial DCID, then the server's SCID).
    sent_long_dcids: set[bytes] = field(default_factory=set)
    #: Server-issued CIDs by sequence number (0 = handshake SCID), from the peer-CID list.
    server_cids: dict[int, bytes] = field(default_factory=dict)
    #: CIDs of NEW_CONNECTION_ID frames received, by sequence number (from decoded frames).
    new_connection_id_frames: dict[int, bytes] = field(default_factory=dict)
    #: Frame types received, counted (e.g. ``path_challenge``).
    frames_received: collections.Counter[str] = field(default_factory=collections.Counter)
    #: Local addresses the client has sent from, in order.
    local_addresses: list[Address] = field(default_factory=list)
    datagrams_sent: int = 0
    datagrams_received: int = 0
    #: Stateless resets recognised (the connection ended on the first one).
    stateless_resets: int = 0

    @property
    def path_challenges_received(self) -> int:
        return self.frames_received["path_challenge"]


class FrameTrace(QuicLoggerTrace):
    """A qlog trace that keeps no events, only the received frames we care about.

    aioquic logs ``packet_received`` before it parses the frames and appends
    them to the logged list afterwards, so lists are collected here and read
    when the next packet or datagram arrives, or when the client asks.
    """

    def __init__(self, *, is_client: bool, odcid: bytes, record: WireRecord) -> None:
        super().__init__(is_client=is_client, odcid=odcid)
        self._record = record
        self._pending: list[list[dict[str, Any]]] = []

    def log_event(self, *, category: str, event: str, data: dict[str, Any]) -> None:
        # Other events (key updates, metrics) are logged while a packet's frames are
        # still being parsed; a new packet or datagram means the previous one is done.
        if event in ("packet_received", "datagrams_received"):
            self.flush()
        if event == "packet_received":
            frames = data.get("frames")
            if isinstance(frames, list):
                self._pending.append(frames)

    def flush(self) -> None:
        record = self._record
        for frames in self._pending:
            for frame in frames:
                frame_type = frame.get("frame_type", "")
                record.frames_received[frame_type] += 1
                if frame_type == "new_connection_id":
                    record.new_connection_id_frames[int(frame["sequence_number"])] = bytes.fromhex(
                        frame["connection_id"]
                    )
        self._pending.clear()


class FrameLogger(QuicLogger):
    def __init__(self, record: WireRecord) -> None:
        super().__init__()
        self._record = record
        self.trace: FrameTrace | None = None

    def start_trace(self, is_client: bool, odcid: bytes) -> QuicLoggerTrace:
        self.trace = FrameTrace(is_client=is_client, odcid=odcid, record=self._record)
        return self.trace

    def end_trace(self, trace: QuicLoggerTrace) -> None:
        if isinstance(trace, FrameTrace):
            trace.flush()
