"""A backend's counters (acceptance §4, last paragraph): plain ints, bumped on the data path.

``unknown_cid_packets`` (R-4, R-12): datagrams dropped because their DCID
belongs to no live connection (see :func:`backends.routable_cids.is_unknown_cid`).
``encap_rejected{reason}`` (S-8): datagrams not accepted on the encapsulation
socket: ``source`` (not an LB address) or the PROXY v2 decoder's reason.
``connections_open`` (R-16), ``issued_cids{config}`` (R-19; config ``7`` means
an unroutable CID after nonce exhaustion), ``datagrams_in``/``datagrams_out``.
Counters never reset, also not on reload.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class BackendStats:
    datagrams_in: int = 0
    datagrams_out: int = 0
    unknown_cid_packets: int = 0
    connections_open: int = 0
    connections_total: int = 0
    send_errors: int = 0
    reloads: int = 0
    reload_failures: int = 0
    encap_rejected: dict[str, int] = field(default_factory=dict)
    issued_cids: dict[str, int] = field(default_factory=dict)
    #: Stateless resets sent for CIDs of ours no connection holds; Retry tokens checked, by result.
    resets_sent: int = 0
    retry_tokens: dict[str, int] = field(default_factory=dict)

    def reject(self, reason: str) -> None:
        self.encap_rejected[reason] = self.encap_rejected.get(reason, 0) + 1

    @property
    def encap_rejected_total(self) -> int:
        return sum(self.encap_rejected.values())

    def snapshot(self) -> dict[str, Any]:
        """A deep copy as plain JSON-able values."""
        return asdict(self)
