"""The LB process over real loopback sockets, with plain UDP test backends (issue: stateless LB).

Each test starts real ``quiclb run`` processes, sends real datagrams to the
VIP and checks where they land, what address the backend saw, and where the
replies come from.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lb import CidConfig, encode_cid
from lb.control.config import load_config
from lb.control.table_builder import TableBuilder
from lb.core.encapsulation import encode_proxy_header
from lb.core.maglev import four_tuple_key
from quiclb_harness.admin_client import admin_json, admin_request, metric_sum, scrape
from quiclb_harness.datagrams import initial, short_header
from quiclb_harness.deployment import BackendSpec, CidConfigSpec, Deployment, ServiceSpec
from quiclb_harness.processes import start_lb as start_lb_process
from quiclb_harness.udp_backend import REPLY_PREFIX, UdpTestBackend
from quiclb_harness.waiting import wait_until

from .conftest import UdpCluster, make_udp_cluster

TIMEOUT = 5.0


def client_socket(host: str = "127.0.0.1") -> socket.socket:
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((host, 0))
    s.settimeout(TIMEOUT)
    return s


def cid_config(cluster: UdpCluster) -> CidConfig:
    return CidConfig(0, 2, 14, cluster.dep.key("echo", 0))


def new_cid(cluster: UdpCluster, sid: str) -> bytes:
    return encode_cid(cid_config(cluster), bytes.fromhex(sid), os.urandom(14))


def exchange(sock: socket.socket, datagram: bytes, vip: tuple[str, int]) -> tuple[bytes, tuple[str, int]]:
    sock.sendto(datagram, vip)
    data, src = sock.recvfrom(65535)
    return data, (src[0], src[1])


def owner_of_reply(reply: bytes) -> str:
    assert reply.startswith(REPLY_PREFIX), reply[:40]
    return reply[len(REPLY_PREFIX) : len(REPLY_PREFIX) + 4].decode()


@pytest.mark.parametrize("io", ["asyncio", "batched"])
@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_cid_routed_datagrams_reach_their_owner_and_replies_leave_from_the_vip(
    tmp_path: Path, host: str, io: str
) -> None:
    cluster = make_udp_cluster(tmp_path, host, io=io)
    try:
        cluster.start_lb()
        vip = cluster.dep.vip()
        sock = client_socket(host)
        me = sock.getsockname()[:2]
        for sid in cluster.backends:
            for _ in range(10):
                dgram = short_header(new_cid(cluster, sid), payload_len=40)
                reply, src = exchange(sock, dgram, vip)
                assert src[:2] == vip  # the reply comes from the VIP, not from the backend
                assert owner_of_reply(reply) == sid
                assert reply.endswith(dgram)  # payload untouched both ways
        for sid, backend in cluster.backends.items():
            got = backend.wait_for(10)
            assert len(got) == 10, sid
            # The backend saw the real client address and the VIP, from the LB's inside address.
            assert {(r.client[0], r.client[1]) for r in got} == {(socket.getaddrinfo(me[0], None)[0][4][0], me[1])}
            assert {r.vip for r in got} == {vip}
            assert {r.lb_source for r in got} == {cluster.dep.inside}
        sock.close()
    finally:
        cluster.close()


def predicted_fallback(cluster: UdpCluster, client: tuple[str, int]) -> str:
    """The backend the keyed Maglev fallback must pick, computed here from the config file alone."""
    cfg = load_config(cluster.dep.path)
    table = TableBuilder().build(cfg, lambda _s, _b: True)["echo"]
    sid = table.maglev.lookup(four_tuple_key(client, table.vip))
    assert sid is not None
    return sid.hex()


def test_kill_9_and_restart_loses_no_route(udp_cluster: UdpCluster) -> None:
    cluster = udp_cluster
    vip = cluster.dep.vip()
    socks = [client_socket() for _ in range(20)]
    cids = {sid: [new_cid(cluster, sid) for _ in range(5)] for sid in cluster.backends}

    def observe() -> tuple[dict[bytes, str], list[str]]:
        routes = {}
        for sid_cids in cids.values():
            for cid in sid_cids:
                reply, _ = exchange(socks[0], short_header(cid), vip)
                routes[cid] = owner_of_reply(reply)
        fallback = [owner_of_reply(exchange(s, initial(1, os.urandom(8), os.urandom(8)), vip)[0]) for s in socks]
        return routes, fallback

    lb = cluster.start_lb()
    before = observe()
    assert all(before[0][cid] == sid for sid, cs in cids.items() for cid in cs)
    assert before[1] == [predicted_fallback(cluster, s.getsockname()) for s in socks]
    for _ in range(3):
        lb.kill()  # kill -9: no chance to hand over any state (there is none)
        lb = cluster.start_lb()
        assert observe() == before  # same CID routes, same fallback choices for the same 4-tuples
    for s in socks:
        s.close()


def test_two_instances_in_one_reuseport_group_route_identically(udp_cluster: UdpCluster) -> None:
    cluster = udp_cluster
    lb_a = cluster.start_lb(env={"PYTHONHASHSEED": "1"})
    lb_b = cluster.start_lb("--reuse-port", env={"PYTHONHASHSEED": "2"})  # joins the group on purpose
    vip = cluster.dep.vip()
    socks = [client_socket() for _ in range(64)]  # many source ports: the kernel spreads them over both
    for s in socks:
        for sid in cluster.backends:
            reply, _ = exchange(s, short_header(new_cid(cluster, sid)), vip)
            assert owner_of_reply(reply) == sid
        reply, _ = exchange(s, initial(1, os.urandom(8), os.urandom(8)), vip)
        assert owner_of_reply(reply) == predicted_fallback(cluster, s.getsockname())
    token = cluster.dep.token
    per_instance = [metric_sum(scrape(cluster.admin(p), token), "quiclb_rx_client_datagrams_total")
                    for p in (lb_a, lb_b)]
    assert sum(per_instance) == len(socks) * 4
    assert all(n > 0 for n in per_instance), per_instance  # both instances really took traffic
    # One instance dies; the survivor takes over every flow, with the same answers.
    lb_a.kill()
    for s in socks[:16]:
        reply, _ = exchange(s, initial(1, os.urandom(8), os.urandom(8)), vip)
        assert owner_of_reply(reply) == predicted_fallback(cluster, s.getsockname())
    for s in socks:
        s.close()


def test_inside_port_drops_datagrams_from_non_backends(udp_cluster: UdpCluster) -> None:
    cluster = udp_cluster
    lb = cluster.start_lb()
    vip, token = cluster.dep.vip(), cluster.dep.token
    victim = client_socket()
    attacker = client_socket()
    forged = encode_proxy_header(victim.getsockname(), vip) + b"reflected!"
    for _ in range(20):
        attacker.sendto(forged, cluster.dep.inside)
    # Sentinel: a genuine reply to the victim, sent after the forgeries through a real backend.
    backend = next(iter(cluster.backends.values()))
    backend.sock.sendto(encode_proxy_header(victim.getsockname(), vip) + b"sentinel", cluster.dep.inside)
    data, src = victim.recvfrom(2048)
    assert data == b"sentinel" and src[:2] == vip  # nothing forged came first
    samples = scrape(cluster.admin(lb), token)
    assert metric_sum(samples, "quiclb_return_rejected_total", reason="source") == 20
    victim.close()
    attacker.close()


def test_reload_adds_and_drains_backends_without_moving_cid_routes(udp_cluster: UdpCluster) -> None:
    cluster = udp_cluster
    lb = cluster.start_lb()
    vip, token, admin = cluster.dep.vip(), cluster.dep.token, cluster.admin(lb)
    sock = client_socket()
    cids = {sid: [new_cid(cluster, sid) for _ in range(5)] for sid in cluster.backends}

    def cid_routes() -> dict[bytes, str]:
        return {cid: owner_of_reply(exchange(sock, short_header(cid), vip)[0]) for cs in cids.values() for cid in cs}

    before = cid_routes()
    # Add backend 0004 and drain 0002, then reload by signal.
    spec = cluster.dep.services[0]
    new = BackendSpec("0004")
    spec.backends.append(new)
    spec.backends[1].state = "draining"
    cluster.dep.version = 2
    cluster.dep.write()
    cluster.start_backend(new)
    lb.signal(signal.SIGHUP)
    lb.wait_for_line("reloaded: config version 2")
    assert cid_routes() == before  # no CID-routed datagram moved, the drained backend's included
    reply, _ = exchange(sock, short_header(new_cid(cluster, "0004")), vip)
    assert owner_of_reply(reply) == "0004"
    # New (fallback) flows: never the draining backend; the new one gets its share.
    socks = [client_socket() for _ in range(200)]
    chosen = [owner_of_reply(exchange(s, initial(1, os.urandom(8), os.urandom(8)), vip)[0]) for s in socks]
    assert "0002" not in chosen
    assert 0.2 < chosen.count("0004") / len(chosen) < 0.5  # 1/3 expected among three active
    status, backends = admin_json(admin, "/backends", token)
    assert status == 200
    assert {b["server_id"]: b["state"] for b in backends}["0002"] == "draining"
    for s in socks:
        s.close()
    sock.close()


def test_invalid_reload_changes_nothing(udp_cluster: UdpCluster) -> None:
    cluster = udp_cluster
    lb = cluster.start_lb()
    vip, token, admin = cluster.dep.vip(), cluster.dep.token, cluster.admin(lb)
    _, before = admin_json(admin, "/config", token)
    sock = client_socket()
    cid = new_cid(cluster, "0003")
    good = cluster.dep.path.read_text()
    cluster.dep.path.write_text(good.replace("nonce_len = 14", "nonce_len = 3", 1))
    status, body = admin_request(admin, "POST", "/reload", token)
    assert status >= 400
    assert b"nonce_len" in body  # the error names the bad key
    _, after = admin_json(admin, "/config", token)
    assert after["digest"] == before["digest"] and after["version"] == before["version"]
    assert owner_of_reply(exchange(sock, short_header(cid), vip)[0]) == "0003"
    samples = scrape(admin, token)
    assert metric_sum(samples, "quiclb_config_rejected_total") == 1
    cluster.dep.path.write_text(good)
    status, _ = admin_request(admin, "POST", "/reload", token)
    assert status == 200
    sock.close()


def test_two_processes_with_different_hash_seeds_decide_identically(udp_cluster: UdpCluster) -> None:
    """R-5: 10^5 mixed datagrams through a real Router in two processes, PYTHONHASHSEED 1 and 2."""
    digests = []
    for seed in ("1", "2"):
        out = subprocess.run(
            [sys.executable, "-m", "quiclb_harness.decisions", "-c", str(udp_cluster.dep.path), "--count", "100000"],
            capture_output=True, text=True, check=True, env={**os.environ, "PYTHONHASHSEED": seed}, timeout=300,
        )
        digests.append(json.loads(out.stdout))
    assert digests[0] == digests[1]
    outcomes = digests[0]["outcomes"]
    assert outcomes["CID_ROUTED"] > 10_000 and outcomes["FALLBACK_INITIAL"] > 10_000  # a real mix


def test_two_services_in_one_process_keep_their_own_configs_and_backends(tmp_path: Path) -> None:
    echo = ServiceSpec(name="echo", backends=[BackendSpec("0001"), BackendSpec("0002")])
    web = ServiceSpec(name="web", cid_configs=[CidConfigSpec(config_id=1, server_id_len=3, nonce_len=5)],
                      backends=[BackendSpec("000001"), BackendSpec("000002")])
    dep = Deployment(tmp_path, [echo, web])
    dep.write()
    backends = [UdpTestBackend((b.host, b.port), b.server_id, dep.inside) for s in (echo, web) for b in s.backends]
    lb = start_lb_process(dep.path)
    try:
        sock = client_socket()
        echo_cfg = CidConfig(0, 2, 14, dep.key("echo", 0))
        web_cfg = CidConfig(1, 3, 5, dep.key("web", 1))
        for sid in ("0001", "0002"):
            reply, src = exchange(sock, short_header(encode_cid(echo_cfg, bytes.fromhex(sid), os.urandom(14))),
                                  dep.vip("echo"))
            assert src == dep.vip("echo") and owner_of_reply(reply) == sid
        for sid in ("000001", "000002"):
            reply, src = exchange(sock, short_header(encode_cid(web_cfg, bytes.fromhex(sid), os.urandom(5))),
                                  dep.vip("web"))
            assert src == dep.vip("web")
            assert reply.startswith(REPLY_PREFIX + sid.encode())
        # A CID of one service sent to the other's VIP is not routable there (other config, other key).
        sock.sendto(short_header(encode_cid(web_cfg, b"\x00\x00\x01", os.urandom(5))), dep.vip("echo"))
        admin_host, admin_port = lb.wait_ready()["admin"].rsplit(":", 1)
        admin = (admin_host, int(admin_port))
        wait_until(
            lambda: metric_sum(scrape(admin, dep.token), "quiclb_unroutable_dropped_total", service="echo") == 1,
            5.0, "the cross-service datagram counted as unroutable",
        )
        sock.setblocking(False)
        with pytest.raises(BlockingIOError):  # and nothing came back for it
            sock.recvfrom(2048)
        sock.close()
    finally:
        lb.kill()
        for b in backends:
            b.close()


def test_sigterm_stops_cleanly(udp_cluster: UdpCluster) -> None:
    lb = udp_cluster.start_lb()
    assert lb.stop(timeout=10) == 0
    assert "stopped" in lb.output()


def test_workers_share_the_sockets_and_stop_together(udp_cluster: UdpCluster) -> None:
    cluster = udp_cluster
    lb = cluster.start_lb("--workers", "2")
    vip = cluster.dep.vip()
    socks = [client_socket() for _ in range(32)]
    for s in socks:
        for sid in cluster.backends:
            reply, _ = exchange(s, short_header(new_cid(cluster, sid)), vip)
            assert owner_of_reply(reply) == sid
    # A worker dies hard: the supervisor starts a new one (no state was lost with it).
    victim = int(lb.wait_ready()["workers"].split(",")[1])
    os.kill(victim, signal.SIGKILL)
    lb.wait_for_line(f"worker {victim} exited with -9; restarting it")
    # Two "serving" lines at start, a third from the new worker.
    wait_until(lambda: lb.output().count("serving 1 service(s)") >= 3, 10.0, "the new worker serving")
    for s in socks:
        reply, _ = exchange(s, short_header(new_cid(cluster, "0001")), vip)
        assert owner_of_reply(reply) == "0001"
    # The supervisor relays SIGTERM to its workers and exits once they have.
    assert lb.stop(timeout=15) == 0
    assert lb.output().count("quiclb INFO stopped") == 2  # both live workers shut down cleanly
    for s in socks:
        s.close()


def test_removed_backend_is_tombstoned_and_its_id_not_reassigned_early(udp_cluster: UdpCluster) -> None:
    cluster = udp_cluster
    lb = cluster.start_lb()
    vip, token, admin = cluster.dep.vip(), cluster.dep.token, cluster.admin(lb)
    sock = client_socket()
    old_cid = new_cid(cluster, "0003")
    assert owner_of_reply(exchange(sock, short_header(old_cid), vip)[0]) == "0003"
    spec = cluster.dep.services[0]
    removed = spec.backends.pop()
    cluster.dep.write()
    assert admin_request(admin, "POST", "/reload", token)[0] == 200
    sock.sendto(short_header(old_cid), vip)
    sentinel = short_header(new_cid(cluster, "0001"))
    assert owner_of_reply(exchange(sock, sentinel, vip)[0]) == "0001"  # and nothing for the removed one came first
    samples = scrape(admin, token)
    assert metric_sum(samples, "quiclb_removed_backend_dropped_total") == 1
    _, backends = admin_json(admin, "/backends", token)
    assert {b["server_id"]: b["state"] for b in backends}["0003"] == "removed"
    # Giving ID 0003 to another address before the tombstone expires is accepted (every LB
    # instance must take the same file, and a restarted one has no tombstones) but logged.
    spec.backends.append(BackendSpec("0003"))  # port 0: write() picks a fresh one
    cluster.dep.write()
    assert admin_request(admin, "POST", "/reload", token)[0] == 200
    lb.wait_for_line("server ID 0003 was removed from")
    # Re-adding it at its old address brings the old backend back.
    spec.backends[-1] = removed
    cluster.dep.write()
    assert admin_request(admin, "POST", "/reload", token)[0] == 200
    assert owner_of_reply(exchange(sock, short_header(old_cid), vip)[0]) == "0003"
    sock.close()


def test_r17_crashed_backend_leaves_the_fallback_within_probe_interval_times_threshold(
    udp_cluster: UdpCluster,
) -> None:
    """Health probes (0.5 s x 3) take a dead backend out of new-flow placement within 2.5 s; it comes back."""
    cluster = udp_cluster
    lb = cluster.start_lb()
    vip, token, admin = cluster.dep.vip(), cluster.dep.token, cluster.admin(lb)

    def healthy(sid: str) -> bool:
        _, views = admin_json(admin, "/backends", token)
        return bool({v["server_id"]: v["healthy"] for v in views}[sid])

    wait_until(lambda: all(healthy(s) for s in cluster.backends), 5.0, "all backends healthy")
    # Probe RTTs are measured, not quantized: uvloop's loop.time() ticks in whole milliseconds,
    # which once made every loopback RTT read 0 or 1.000 ms.
    _, views = admin_json(admin, "/backends", token)
    rtts = [v["last_probe_rtt"] for v in views]
    assert all(r is not None and r > 0 for r in rtts), rtts
    assert not all(round(r * 1000, 9).is_integer() for r in rtts), rtts
    victim = cluster.backends.pop("0002")
    victim_addr = victim.address
    victim.close()  # the backend process is gone: probes go unanswered
    took = wait_until(lambda: not healthy("0002"), 2.5, "0002 marked down")
    assert took <= 2.5
    socks = [client_socket() for _ in range(60)]
    chosen = [owner_of_reply(exchange(s, initial(1, os.urandom(8), os.urandom(8)), vip)[0]) for s in socks]
    assert "0002" not in chosen and set(chosen) == {"0001", "0003"}
    samples = scrape(admin, token)
    assert metric_sum(samples, "quiclb_backend_healthy", backend="0002") == 0
    # It restarts at the same address: one answered probe brings it back into rotation.
    cluster.backends["0002"] = UdpTestBackend(victim_addr, "0002", cluster.dep.inside)
    wait_until(lambda: healthy("0002"), 2.5, "0002 back up")
    chosen = [owner_of_reply(exchange(s, initial(1, os.urandom(8), os.urandom(8)), vip)[0]) for s in socks]
    assert "0002" in chosen
    for s in socks:
        s.close()


def test_reload_moves_a_vip_keeps_counters_and_rotates_the_admin_token(udp_cluster: UdpCluster) -> None:
    cluster = udp_cluster
    lb = cluster.start_lb()
    token, admin = cluster.dep.token, cluster.admin(lb)
    sock = client_socket()
    for sid in cluster.backends:
        assert owner_of_reply(exchange(sock, short_header(new_cid(cluster, sid)), cluster.dep.vip())[0]) == sid
    old_vip = cluster.dep.vip()
    cluster.dep.services[0].vip_port = 0  # write() picks a new port: the VIP moves
    (cluster.dep.directory / "admin.token").unlink()  # write() makes a new token
    cluster.dep.write()
    assert cluster.dep.vip() != old_vip
    assert admin_request(admin, "POST", "/reload", token)[0] == 200
    new_token = cluster.dep.token
    assert admin_request(admin, "GET", "/metrics", token)[0] == 401  # the old token stopped working
    for sid in cluster.backends:
        reply, src = exchange(sock, short_header(new_cid(cluster, sid)), cluster.dep.vip())
        assert owner_of_reply(reply) == sid and src == cluster.dep.vip()
    samples = scrape(admin, new_token)
    assert metric_sum(samples, "quiclb_rx_client_datagrams_total") == 6  # monotonic across the move
    sock.close()


def test_health_probes_work_when_the_vip_family_differs_from_inside(tmp_path: Path) -> None:
    """inside and backends on IPv4, the VIP on ::1: probes need a probe socket of the VIP's family."""
    spec = ServiceSpec(vip_host="::1", backends=[BackendSpec("0001"), BackendSpec("0002")])
    dep = Deployment(tmp_path, [spec], health_interval=0.2, health_timeout=0.2)
    dep.write()
    backends = [UdpTestBackend((b.host, b.port), b.server_id, dep.inside) for b in spec.backends]
    lb = start_lb_process(dep.path)
    try:
        admin_host, admin_port = lb.wait_ready()["admin"].rsplit(":", 1)
        admin = (admin_host, int(admin_port))
        wait_until(lambda: metric_sum(scrape(admin, dep.token), "quiclb_health_probe_replies_total") >= 4,
                   5.0, "probe replies")
        assert metric_sum(scrape(admin, dep.token), "quiclb_backend_healthy") == 2
        sock = client_socket("::1")
        reply, _ = exchange(sock, initial(1, os.urandom(8), os.urandom(8)), dep.vip())
        assert reply.startswith(REPLY_PREFIX)
        sock.close()
    finally:
        lb.kill()
        for b in backends:
            b.close()


def test_admin_route_answers_which_backend_owns_a_cid(udp_cluster: UdpCluster) -> None:
    cluster = udp_cluster
    lb = cluster.start_lb()
    admin, token = cluster.admin(lb), cluster.dep.token
    cid = new_cid(cluster, "0002")
    status, body = admin_json(admin, f"/route?dcid={cid.hex()}", token)
    assert status == 200
    assert body["echo"]["server_id"] == "0002" and body["echo"]["routable"] is True
    assert body["echo"]["backend"].endswith(f":{cluster.backends['0002'].address[1]}")
    status, body = admin_json(admin, "/route?dcid=e7" + "00" * 7, token)
    assert status == 200 and body["echo"]["routable"] is False
    assert admin_request(admin, "GET", f"/route?dcid={cid.hex()}&service=nope", token)[0] == 404


def test_f1_paced_random_datagrams_over_loopback_nothing_escapes_and_counters_add_up(
    udp_cluster: UdpCluster,
) -> None:
    """20 000 hostile datagrams at ~10k/s: the LB keeps serving, every datagram ends in one
    outcome counter, and its memory stays bounded."""
    cluster = udp_cluster
    lb = cluster.start_lb()
    admin, token, vip = cluster.admin(lb), cluster.dep.token, cluster.dep.vip()
    rss_before = metric_sum(scrape(admin, token), "quiclb_process_rss_bytes")
    rng = random.Random(20261126)
    sender = client_socket()
    sent, t0 = 0, time.monotonic()
    for i in range(20_000):
        size = rng.choice([0, 1, 2, 7, 21, 40, 200, 1199, 1200, 1400])
        data = bytearray(rng.randbytes(size))
        if data:
            data[0] = rng.choice([0x40 | rng.randrange(64), 0xC0 | rng.randrange(64), data[0]])
        if len(data) > 5 and data[0] & 0x80:
            data[5] = rng.randrange(256)  # DCID length 0..255
        sender.sendto(bytes(data), vip)
        sent += 1
        if i % 200 == 199:  # pace: ~10k datagrams/s, well under capacity, so none is lost
            ahead = sent / 10_000 - (time.monotonic() - t0)
            if ahead > 0:
                time.sleep(ahead)
    wait_until(lambda: metric_sum(scrape(admin, token), "quiclb_rx_client_datagrams_total") >= sent, 10.0,
               "the LB counted every datagram")
    samples = scrape(admin, token)
    rx = metric_sum(samples, "quiclb_rx_client_datagrams_total")
    outcomes = (
        metric_sum(samples, "quiclb_cid_routed_total")
        + metric_sum(samples, "quiclb_fallback_routed_total")
        + sum(v for (name, _), v in samples.items() if name.endswith("_dropped_total"))
    )
    assert rx == sent == outcomes
    assert metric_sum(samples, "quiclb_process_rss_bytes") - rss_before < 10 * 1024 * 1024
    sender.close()  # it may hold the backends' answers to the fallback-routed garbage
    checker = client_socket()
    try:  # still serving
        assert owner_of_reply(exchange(checker, short_header(new_cid(cluster, "0001")), vip)[0]) == "0001"
    finally:
        checker.close()
