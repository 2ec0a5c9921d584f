"""quiclb: a stateless QUIC load balancer routing by QUIC-LB connection IDs (draft -21).

Public API (contract)::

    from lb import CidConfig, encode_cid, decode_server_id
"""

from lb.core.cid_config import CidConfig, CidMode
from lb.core.cid_decoder import CidDecoder, decode_cid, decode_server_id
from lb.core.cid_encoder import encode_cid, unroutable_cid
from lb.core.cid_issuer import CidIssuer
from lb.errors import ConfigError, LbError, MalformedDatagram, NonceExhausted

__version__ = "0.1.0"

__all__ = [
    "CidConfig",
    "CidDecoder",
    "CidIssuer",
    "CidMode",
    "ConfigError",
    "LbError",
    "MalformedDatagram",
    "NonceExhausted",
    "__version__",
    "decode_cid",
    "decode_server_id",
    "encode_cid",
    "unroutable_cid",
]
