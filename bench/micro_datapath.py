"""Micro-benchmark: where one batch of the batched forward path spends its time, by batch size.

One MmsgVipPort over loopback sockets, driven by hand (no event loop wakeups):
per batch size k, k cached 100 B short headers are queued on the VIP socket,
then one ``readable()`` call receives, routes and sends them. Three figures per
k, each the 10th percentile over --batches batches (the machine is shared; the
low percentile is the least disturbed), in µs per batch:

* ``recvmmsg``: the receive system call alone (kernel);
* ``python``: ``readable()`` with sendmmsg replaced by a no-op, minus ``recvmmsg``:
  everything Python does for the batch (fields, route_batch, the send array);
* ``total``: ``readable()`` as it runs, sendmmsg included (its kernel time is
  ``total - recvmmsg - python``).

    .venv/bin/python bench/micro_datapath.py [--batches 400] [--save]
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import time
from collections.abc import Callable
from typing import Any

from results_file import run_metadata, write_result

from lb import CidConfig, encode_cid
from lb.adapters import mmsg
from lb.adapters.mmsg_datapath import MmsgDatapath
from lb.adapters.mmsg_forward import MmsgVipPort
from lb.core.return_path import ReturnPath
from lb.core.router import Router
from lb.core.service_table import Backend, build_service_table
from quiclb_harness.datagrams import short_header

SIZES = (1, 4, 10, 16, 64)
KEY = bytes.fromhex("8f95f09245765f80256934e50c66207f")


def udp(port: int = 0) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 24)
    s.bind(("127.0.0.1", port))
    s.setblocking(False)
    return s


def drain(socks: list[socket.socket]) -> None:
    for s in socks:
        try:
            while True:
                s.recv(4096)
        except BlockingIOError:
            pass


def p10(samples: list[int]) -> float:
    samples.sort()
    return samples[len(samples) // 10] / 1000


async def measure(batches: int) -> dict[str, Any]:
    assert mmsg.LIBC is not None
    sinks = [udp() for _ in range(3)]
    cfg = CidConfig(config_id=0, server_id_len=2, nonce_len=14, key=KEY)
    with udp() as a, udp() as b:
        vip, inside = a.getsockname()[:2], b.getsockname()[:2]
    table = build_service_table(
        name="bench", vip=vip, cid_configs=[cfg], fallback_key=bytes(32), maglev_size=1009,
        backends=[Backend(bytes([0, k + 1]), s.getsockname()[:2]) for k, s in enumerate(sinks)],
    )
    datapath = MmsgDatapath()
    await datapath.open_inside(inside, ReturnPath([table]))
    port: MmsgVipPort = await datapath.open_vip("bench", vip, Router(table))
    asyncio.get_running_loop().remove_reader(port.fd)  # driven by hand below
    client = udp()
    datagrams = [short_header(encode_cid(cfg, server_id=bytes([0, 1 + i % 3]), nonce=i.to_bytes(14, "big")),
                              payload_len=80) for i in range(4096)]

    def batch_of(k: int, rep: int) -> None:
        for j in range(k):
            client.sendto(datagrams[(rep * k + j) % len(datagrams)], vip)

    def timed(k: int, call: Callable[[], object]) -> list[int]:
        samples = []
        for rep in range(batches):
            batch_of(k, rep)
            t0 = time.perf_counter_ns()
            call()
            samples.append(time.perf_counter_ns() - t0)
            drain(sinks)
        return samples

    ring = port.ring
    recv, null = mmsg.LIBC.recvmmsg, mmsg.LIBC.null

    def receive_only() -> None:
        recv(port.fd, ring.msgs_ptr, ring.batch, mmsg.MSG_DONTWAIT, null)
        ring.msg_bytes[:] = ring.pristine

    timed(64, port.readable)  # warm the decode cache with every DCID
    out: dict[str, Any] = {}
    real_send = mmsg.LIBC.sendmmsg
    for k in SIZES:
        total = p10(timed(k, port.readable))
        received = p10(timed(k, receive_only))
        mmsg.LIBC.sendmmsg = lambda fd, msgs, count, flags: count
        try:
            without_send = p10(timed(k, port.readable))
        finally:
            mmsg.LIBC.sendmmsg = real_send
        python = max(without_send - received, 0.0)
        out[str(k)] = {"total_us": round(total, 2), "recvmmsg_us": round(received, 2),
                       "python_us": round(python, 2), "sendmmsg_us": round(max(total - received - python, 0.0), 2)}
        print(f"k={k:3d}: total {total:7.2f} us/batch = recvmmsg {received:6.2f} + python {python:6.2f} "
              f"+ sendmmsg {max(total - received - python, 0.0):6.2f}   ({total / k:.2f} us/datagram, "
              f"python {python / k:.2f})")
    datapath.close()
    client.close()
    for s in sinks:
        s.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=400)
    ap.add_argument("--save", action="store_true")
    args = ap.parse_args()
    if not mmsg.mmsg_available():
        raise SystemExit("recvmmsg/sendmmsg (Linux) and cffi are needed")
    results = asyncio.run(measure(max(50, min(args.batches, 5000))))
    if args.save:
        write_result({**run_metadata("micro_datapath"), "unit": "us per batch, p10", "batch_sizes": results})


if __name__ == "__main__":
    main()
