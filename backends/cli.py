"""``quiclb-backend``: run one aioquic backend behind the load balancer (design §6).

    quiclb-backend -c lb.toml --server-id 0001 [--service echo] [--metrics 127.0.0.1:9101]
    AWS_LBC_QUIC_SERVER_ID=0x00000000000000ab quiclb-backend -c nlb-profile.toml

Without ``--server-id`` the server ID comes from ``AWS_LBC_QUIC_SERVER_ID``
(base64, or ``0x`` + hex), as the AWS Load Balancer Controller sets it for
backends behind an NLB QUIC listener (design §5, the NLB profile).

When it is serving it prints exactly one line on stdout, for tests and the demo
to wait on instead of sleeping::

    READY server_id=0001 service=echo address=127.0.0.1:5001 spki=<base64> pid=<pid> [metrics=127.0.0.1:9101]

``spki`` is the base64 SHA-256 of the certificate's SubjectPublicKeyInfo
(chromium's ``--ignore-certificate-errors-spki-list`` form). Everything else
goes to stderr through :mod:`logging`.

Signals: SIGHUP re-reads the configuration (a bad or incompatible file is
logged and the running configuration kept); SIGTERM and SIGINT close every
connection and exit 0. Exit status 2 means a usage or configuration error,
1 a runtime failure such as an address already in use.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys
from collections.abc import Coroutine, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from backends.metrics import MetricsServer
from backends.server import BackendServer
from backends.settings import (
    AWS_SERVER_ID_ENV,
    BackendSettings,
    parse_server_id_option,
    server_id_from_environment,
    settings_from_config,
)
from lb.control.config import load_config, parse_address
from lb.core.addresses import format_address
from lb.errors import ConfigError

uvloop: ModuleType | None
try:
    import uvloop
except ImportError:  # optional dependency (not on Windows)
    uvloop = None

log = logging.getLogger("quiclb.backend")

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_USAGE = 2
#: Event-loop turns granted on shutdown for CONNECTION_CLOSE datagrams to leave.
SHUTDOWN_TURNS = 10


def tune_gc() -> None:
    """Fewer, cheaper collections: under handshake churn aioquic backends otherwise spend
    55-135 ms in a gen-2 collection about once a second (aioquic on 2 cores, measured).
    Freezing the start-up heap keeps it out of every later collection."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50000, 50, 1000)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="quiclb-backend",
        description="Run one aioquic backend (echo ALPN 'quiclb-echo' and HTTP/3) that issues "
        "QUIC-LB routable connection IDs.",
    )
    parser.add_argument("-c", "--config", required=True, type=Path, help="the shared TOML file")
    parser.add_argument("--server-id",
                        help=f"this backend's server ID in hex, e.g. 0001 (default: ${AWS_SERVER_ID_ENV})")
    parser.add_argument("--service", help="service name (needed when the file has several)")
    parser.add_argument("--metrics", metavar="HOST:PORT", help="serve /metrics and /stats here (loopback)")
    parser.add_argument("--cert-out", type=Path, metavar="FILE",
                        help="write the (possibly self-signed) certificate in PEM, for clients' cafile")
    parser.add_argument("--idle-timeout", type=float, default=60.0, help="QUIC idle timeout in seconds")
    parser.add_argument("--loop", choices=("auto", "asyncio", "uvloop"), default="auto")
    parser.add_argument("--log-level", default="INFO",
                        choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"))
    return parser


def _fail(message: str) -> int:
    print(f"quiclb-backend: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        if args.server_id is not None:
            server_id = parse_server_id_option(args.server_id)
        else:
            from_env = server_id_from_environment(os.environ)
            if from_env is None:
                return _fail(f"--server-id is required (or set {AWS_SERVER_ID_ENV}, as the AWS controller does)")
            server_id = from_env
    except ConfigError as exc:
        return _fail(str(exc))
    config_path: Path = args.config

    def load() -> BackendSettings:
        return settings_from_config(load_config(config_path), server_id, args.service)

    try:
        settings = load()
        metrics_addr = None
        if args.metrics:
            metrics_addr = parse_address(args.metrics, "--metrics", allow_port_zero=True)
        backend = BackendServer(settings, reload_source=load, idle_timeout=args.idle_timeout)
    except ConfigError as exc:
        return _fail(str(exc))
    if args.cert_out is not None:
        try:
            args.cert_out.write_bytes(backend.identity.certificate_pem)
        except OSError as exc:
            return _fail(f"--cert-out: {exc}")
    return _run_loop(_serve(backend, metrics_addr), args.loop)


def _run_loop(coro: Coroutine[Any, Any, int], loop_name: str) -> int:
    if loop_name != "asyncio":
        if uvloop is not None:
            return int(uvloop.run(coro))
        if loop_name == "uvloop":
            coro.close()
            return _fail("--loop uvloop: uvloop is not installed")
    return asyncio.run(coro)


async def _serve(backend: BackendServer, metrics_addr: tuple[str, int] | None) -> int:
    loop = asyncio.get_running_loop()
    try:
        await backend.start()
    except OSError as exc:
        log.error("cannot bind %s: %s", format_address(backend.settings.address), exc)
        return EXIT_RUNTIME
    metrics: MetricsServer | None = None
    if metrics_addr is not None:
        metrics = MetricsServer(
            lambda: backend.stats, server_id=backend.settings.server_id.hex(), service=backend.settings.service
        )
        try:
            await metrics.start(*metrics_addr)
        except OSError as exc:
            log.error("cannot serve metrics on %s: %s", format_address(metrics_addr), exc)
            backend.close()
            return EXIT_RUNTIME
    identity = backend.identity
    log.info(
        "TLS certificate (%s) SPKI SHA-256: %s",
        "self-signed for localhost" if identity.self_signed else "configured",
        identity.spki_sha256,
    )
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, backend.reload)
    tune_gc()
    ready = (
        f"READY server_id={backend.settings.server_id.hex()} service={backend.settings.service} "
        f"address={format_address(backend.address)} spki={identity.spki_sha256} pid={os.getpid()}"
    )
    if metrics is not None and metrics.address is not None:
        ready += f" metrics={format_address(metrics.address)}"
    print(ready, flush=True)
    try:
        await stop.wait()
    finally:
        log.info("stopping: closing %d connection(s)", backend.stats.connections_open)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            with contextlib.suppress(ValueError, RuntimeError):
                loop.remove_signal_handler(sig)
        backend.close()
        if metrics is not None:
            await metrics.aclose()
        for _ in range(SHUTDOWN_TURNS):  # let queued CONNECTION_CLOSE datagrams leave
            await asyncio.sleep(0)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
