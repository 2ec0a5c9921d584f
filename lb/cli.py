"""Command line: ``quiclb run | cid encode | cid decode | keygen | check-config | announce | demo``.

Exit codes: 0 success, 1 a runtime failure (for example a demo promise that
did not hold), 2 bad input (arguments, configuration, key files).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points
from pathlib import Path

from lb.control.config import LbConfig, load_config
from lb.control.keys import generate_key, read_key_file, write_key_file
from lb.core.addresses import format_address
from lb.core.cid_config import CidConfig
from lb.core.cid_decoder import decode_cid
from lb.core.cid_encoder import encode_cid
from lb.errors import ConfigError, LbError

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2
#: ``--workers`` bound: processes beyond a few per core only add contention.
MAX_WORKERS = 64
#: ``--ready-timeout`` default and bound, seconds: start builds every Maglev table before READY.
#: The batched datapath (lb.adapters.mmsg_datapath) where recvmmsg/sendmmsg exist.
DEFAULT_IO = "batched" if sys.platform.startswith("linux") else "asyncio"
DEFAULT_READY_TIMEOUT = 60.0
MAX_READY_TIMEOUT = 3600.0


class UsageError(LbError):
    """Bad command-line input; reported as ``quiclb: error: ...`` with exit code 2."""


def _hex(text: str, what: str) -> bytes:
    try:
        return bytes.fromhex(text.replace(":", ""))
    except ValueError:
        raise UsageError(f"{what}: not valid hex: {text!r}") from None


# -- cid encode / decode --------------------------------------------------------


def _add_codec_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("configuration (from a config file, or from flags)")
    g.add_argument("-c", "--config", type=Path, help="quiclb TOML file (uses the service's configurations)")
    g.add_argument("--service", help="service name when the file has several")
    g.add_argument("--config-id", type=int, help="config ID 0..6 (default with -c: the newest configuration)")
    g.add_argument("--server-id-len", type=int)
    g.add_argument("--nonce-len", type=int)
    g.add_argument("--key", help="16-byte AES key as hex (prefer --key-file: argv is visible to other users)")
    g.add_argument("--key-file", type=Path, help="key file as written by `quiclb keygen`")
    g.add_argument("--plaintext", action="store_true", help="no key: plaintext (linkable) CIDs")
    g.add_argument("--no-self-encode-length", action="store_true",
                   help="random low 5 bits in the first octet instead of the CID length")


def _configs_from_args(args: argparse.Namespace) -> tuple[list[CidConfig], LbConfig | None]:
    if args.config is not None:
        cfg = load_config(args.config)
        svc = cfg.service(args.service)
        configs = list(svc.cid_configs)
        if args.config_id is not None:
            configs = [c for c in configs if c.config_id == args.config_id]
            if not configs:
                ids = ", ".join(str(c.config_id) for c in svc.cid_configs)
                raise UsageError(f"--config-id: service {svc.name!r} has no config {args.config_id} (has {ids})")
        return configs, cfg
    missing = [f for f in ("config_id", "server_id_len", "nonce_len") if getattr(args, f) is None]
    if missing:
        raise UsageError("give -c FILE, or all of " + ", ".join("--" + m.replace("_", "-") for m in missing))
    keys_given = sum(x is not None for x in (args.key, args.key_file)) + int(args.plaintext)
    if keys_given != 1:
        raise UsageError("give exactly one of --key, --key-file, --plaintext")
    key = None
    if args.key is not None:
        key = _hex(args.key, "--key")
    elif args.key_file is not None:
        key = read_key_file(args.key_file)
    try:
        one = CidConfig(args.config_id, args.server_id_len, args.nonce_len, key,
                        self_encode_length=not args.no_self_encode_length)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return [one], None


def cmd_cid_encode(args: argparse.Namespace) -> int:
    configs, _ = _configs_from_args(args)
    cfg = configs[-1]  # backends mint with the newest (last) configuration
    sid = _hex(args.server_id, "--server-id")
    nonce = _hex(args.nonce, "--nonce") if args.nonce else os.urandom(cfg.nonce_len)
    try:
        print(encode_cid(cfg, sid, nonce).hex())
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return EXIT_OK


def cmd_cid_decode(args: argparse.Namespace) -> int:
    configs, lbcfg = _configs_from_args(args)
    cid = _hex(args.cid, "CID")
    if not cid:
        raise UsageError("CID: empty")
    config_id = cid[0] >> 5
    print(f"config_id   {config_id}" + ("  (0b111: unroutable by definition)" if config_id == 7 else ""))
    decoded = decode_cid(configs, cid)
    if decoded is None:
        known = ", ".join(str(c.config_id) for c in configs)
        print(f"unroutable  (config IDs known: {known}; or shorter than the configuration's length)")
        return EXIT_FAIL
    sid, nonce = decoded
    print(f"server_id   {sid.hex()}")
    print(f"nonce       {nonce.hex()}")
    if lbcfg is not None:
        svc = lbcfg.service(args.service)
        backend = svc.backend_by_server_id(sid)
        if backend is None:
            print(f"backend     none: server ID {sid.hex()} is not assigned in service {svc.name!r} (unroutable)")
            return EXIT_FAIL
        print(f"backend     {format_address(backend.address)} ({backend.state.value}) in service {svc.name!r}")
    return EXIT_OK


# -- keygen / check-config --------------------------------------------------------


def cmd_keygen(args: argparse.Namespace) -> int:
    if args.output is None:
        print(generate_key().hex())
        return EXIT_OK
    write_key_file(args.output, overwrite=args.force)
    print(f"wrote a new 16-byte key to {args.output} (mode 0600)", file=sys.stderr)
    return EXIT_OK


def cmd_check_config(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    print(f"{cfg.path}: OK  version {cfg.version}  digest {cfg.digest}")
    print(f"  inside {format_address(cfg.lb.inside)}  return_mode {cfg.lb.return_mode.value}"
          f"  admin {format_address(cfg.lb.admin) if cfg.lb.admin else 'off'}")
    if cfg.lb.fallback_key_file is None:  # see lb.control.config.derive_fallback_key for the trade-off
        print("  fallback key PUBLIC (derived from each service name; Initials can be aimed at a backend): "
              "set lb.fallback_key_file, made by `quiclb keygen -o fallback.key`")
    for svc in cfg.services:
        modes = ", ".join(f"{c.config_id}:{c.mode.value}" for c in svc.cid_configs)
        states = [b.state.value for b in svc.backends]
        print(f"  service {svc.name!r} vip {format_address(svc.vip)}  configs [{modes}]"
              f"  backends {states.count('active')} active, {states.count('draining')} draining"
              + f"  retry {svc.retry.value}"
              + (f" (above {svc.retry_flood_threshold}/s)" if svc.retry.value == "flood" else "")
              + f"  resets {'on' if svc.reset_key is not None else 'off'}"
              + ("  LINKABLE (plaintext CIDs)" if svc.linkable else ""))
    return EXIT_OK


# -- run --------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    # A SIGHUP before the event loop owns the signal (while the configuration loads) would kill
    # the process with the default action: note it, and apply it as a reload once started.
    early_sighups: list[int] = []
    signal.signal(signal.SIGHUP, lambda signum, _frame: early_sighups.append(signum))
    if not 1 <= args.workers <= MAX_WORKERS:
        raise UsageError(f"--workers: must be 1..{MAX_WORKERS}, got {args.workers}")
    if not 0 < args.ready_timeout <= MAX_READY_TIMEOUT:
        raise UsageError(f"--ready-timeout: must be 0..{MAX_READY_TIMEOUT:g} seconds (not 0), "
                         f"got {args.ready_timeout:g}")
    cfg = load_config(args.config)
    from lb.adapters.udp_socket import allow_joining_groups, ensure_unbound  # noqa: PLC0415 - keep `quiclb cid` light

    if args.workers > 1:
        if not args.reuse_port:  # the workers share the sockets; nobody else may already hold them
            for address in (cfg.lb.inside, *(svc.vip for svc in cfg.services)):
                ensure_unbound(address)
        from lb.supervisor import supervise  # noqa: PLC0415

        worker_argv = [sys.executable, "-m", "lb", "--log-level", args.log_level, "run", "-c", str(args.config),
                       "--loop", args.loop, "--io", args.io,
                       *(f"--probe-source={h}" for h in _probe_sources(args.probe_source))]
        return supervise(worker_argv, args.workers, args.ready_timeout)
    if args.reuse_port or args.worker:
        allow_joining_groups()
    from lb.adapters.event_loop import run  # noqa: PLC0415 - keep `quiclb cid` light
    from lb.app import LoadBalancer, serve  # noqa: PLC0415

    def ready(lb: LoadBalancer) -> None:
        vips = ",".join(format_address(rt.vip) for rt in lb.services.values())
        admin = format_address(lb.admin_address) if lb.admin_address else "off"
        tag = "WORKER-READY" if args.worker else "READY"
        print(f"{tag} pid={os.getpid()} inside={format_address(cfg.lb.inside)} vips={vips} admin={admin}",
              flush=True)

    probe_sources = tuple(_probe_sources(args.probe_source))
    if not 0 < args.drain_quiet <= args.drain_timeout <= MAX_READY_TIMEOUT:
        raise UsageError("--drain-quiet and --drain-timeout: need 0 < quiet <= timeout <= "
                         f"{MAX_READY_TIMEOUT:g} seconds")
    run(serve(cfg, ready, admin=not args.no_admin, io=args.io, reload_requested=lambda: bool(early_sighups),
              probe_sources=probe_sources, drain=(args.drain_quiet, args.drain_timeout)),
        loop=args.loop)
    return EXIT_OK


def _probe_sources(hosts: Sequence[str]) -> list[str]:
    """``--probe-source`` values: canonical IP literals, at most one per IP version."""
    import ipaddress  # noqa: PLC0415

    out: dict[int, str] = {}
    for host in hosts:
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            raise UsageError(f"--probe-source: not an IP address: {host!r}") from None
        if ip.is_unspecified or ip.is_multicast:
            raise UsageError(f"--probe-source: must be a unicast address of this host, got {host}")
        if ip.version in out:
            raise UsageError(f"--probe-source: one address per IP version, got {out[ip.version]} and {host}")
        out[ip.version] = str(ip)
    return list(out.values())


def cmd_announce(args: argparse.Namespace) -> int:
    from lb.announce import AnnounceSettings, run_announcer  # noqa: PLC0415

    if not (0 < args.interval <= 60 and 0 < args.timeout <= 60 and 1 <= args.rise <= 100 and 1 <= args.fall <= 100):
        raise UsageError("announce: need 0 < --interval, --timeout <= 60 and 1 <= --rise, --fall <= 100")
    birdc = ("birdc", "-s", str(args.birdc_socket)) if args.birdc_socket else ("birdc",)
    return run_announcer(AnnounceSettings(args.healthz, args.protocol, birdc, args.interval, args.timeout,
                                          args.rise, args.fall))


# -- subcommands of other installed packages ----------------------------------------

#: Entry-point group whose callables add subcommands (quiclb_harness adds ``demo``), so this
#: CLI runs the demo without importing test infrastructure.
COMMAND_ENTRY_POINT_GROUP = "quiclb.commands"


def add_entry_point_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    for entry in sorted(entry_points(group=COMMAND_ENTRY_POINT_GROUP), key=lambda e: e.name):
        try:
            entry.load()(sub)
        except Exception as exc:  # a broken optional command must never stop `quiclb run`
            print(f"quiclb: warning: command {entry.name!r} unavailable: {exc}", file=sys.stderr)


# -- parser -------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="quiclb", description="Stateless QUIC-LB load balancer (draft -21).")
    ap.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run the load balancer")
    p.add_argument("-c", "--config", type=Path, required=True)
    p.add_argument("--workers", type=int, default=1,
                   help=f"LB processes sharing the sockets (SO_REUSEPORT), 1..{MAX_WORKERS}")
    p.add_argument("--reuse-port", action="store_true",
                   help="join the SO_REUSEPORT group of LB instances already bound to the VIPs and inside "
                        "address (scale-out, rolling restarts); without it an address in use is refused")
    p.add_argument("--ready-timeout", type=float, default=DEFAULT_READY_TIMEOUT, metavar="SECONDS",
                   help="--workers: give up (exit 1) on a worker not ready within this time "
                        f"(default {DEFAULT_READY_TIMEOUT:g})")
    p.add_argument("--loop", default="uvloop", choices=["uvloop", "asyncio"])
    p.add_argument("--io", default=DEFAULT_IO, choices=["asyncio", "batched"],
                   help="datagram I/O: recvmmsg/sendmmsg batches (the default on Linux), or the event "
                        f"loop's endpoints, one datagram per callback (portable) (default {DEFAULT_IO})")
    p.add_argument("--probe-source", action="append", default=[], metavar="IP",
                   help="health probes name this address of this LB (one per IP version) as their client, "
                        "not the VIP: with several LB hosts behind ECMP each LB then hears its own probes' "
                        "answers, whichever LB returns them (see README, scale-out)")
    p.add_argument("--drain-quiet", type=float, default=2.0, metavar="SECONDS",
                   help="SIGUSR1 drains: /healthz answers 503 (the BGP speaker withdraws), then the LB stops "
                        "once no datagram reached it for this long (default 2)")
    p.add_argument("--drain-timeout", type=float, default=60.0, metavar="SECONDS",
                   help="stop a drain after this long even if datagrams still arrive (default 60)")
    p.add_argument("--no-admin", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--log-level", dest="run_log_level", default=None,
                   choices=["debug", "info", "warning", "error"], help="same as quiclb --log-level")
    p.set_defaults(func=cmd_run)

    cid = sub.add_parser("cid", help="the QUIC-LB codec: which backend owns this CID?")
    cid_sub = cid.add_subparsers(dest="cid_command", required=True)
    e = cid_sub.add_parser("encode", help="server ID (+ nonce) -> CID")
    _add_codec_flags(e)
    e.add_argument("--server-id", required=True, help="hex")
    e.add_argument("--nonce", help="hex (default: random)")
    e.set_defaults(func=cmd_cid_encode)
    d = cid_sub.add_parser("decode", help="CID -> config ID, server ID, nonce (and backend with -c)")
    _add_codec_flags(d)
    d.add_argument("cid", help="CID as hex, first octet included")
    d.set_defaults(func=cmd_cid_decode)

    k = sub.add_parser("keygen", help="a fresh 16-byte key (from `secrets`): a CID key or the fallback_key_file")
    k.add_argument("-o", "--output", type=Path, help="write it to this file with mode 0600 (default: print)")
    k.add_argument("--force", action="store_true", help="replace an existing file")
    k.set_defaults(func=cmd_keygen)

    c = sub.add_parser("check-config", help="validate a configuration file")
    c.add_argument("-c", "--config", type=Path, required=True)
    c.set_defaults(func=cmd_check_config)

    a = sub.add_parser("announce", help="BGP speaker control: announce the VIP (a BIRD static protocol) "
                                        "while the LB's /healthz answers ok, withdraw otherwise")
    a.add_argument("--healthz", required=True, help="the LB's health URL, http://ADMIN/healthz")
    a.add_argument("--protocol", default="quiclb_vip", help="BIRD static protocol to enable/disable")
    a.add_argument("--birdc-socket", type=Path, help="BIRD control socket (default: birdc's)")
    a.add_argument("--interval", type=float, default=0.2, help="seconds between polls (default 0.2)")
    a.add_argument("--timeout", type=float, default=0.5, help="seconds a poll may take (default 0.5)")
    a.add_argument("--rise", type=int, default=2, help="ok answers in a row before announcing (default 2)")
    a.add_argument("--fall", type=int, default=2, help="failures in a row before withdrawing (default 2; "
                                                        "503 draining withdraws at once)")
    a.set_defaults(func=cmd_announce)

    add_entry_point_commands(sub)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "run_log_level", None):
        args.log_level = args.run_log_level
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    try:
        return int(args.func(args))
    except (ConfigError, UsageError) as exc:
        _error(exc)
        return EXIT_USAGE
    except LbError as exc:  # a runtime failure we understood: a bind, a worker
        _error(exc)
        return EXIT_FAIL
    except OSError as exc:
        _error(exc)
        return EXIT_FAIL
    except KeyboardInterrupt:
        return EXIT_FAIL
    except Exception as exc:  # a bug: still one line for the operator; the traceback at debug level
        logging.getLogger("quiclb").debug("internal error", exc_info=True)
        _error(f"internal error: {type(exc).__name__}: {exc} (--log-level debug shows where)")
        return EXIT_FAIL


def _error(message: object) -> None:
    """``quiclb: error: ...`` on stderr, always on one line."""
    print("quiclb: error: " + " ".join(str(message).split()), file=sys.stderr, flush=True)

if __name__ == "__main__":
    sys.exit(main())
