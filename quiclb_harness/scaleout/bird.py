"""BIRD 2 configurations: the router's (ECMP over the LBs) and each LB's speaker.

The router accepts only the service prefixes from its LB neighbours, merges
equal BGP routes into one multipath kernel route (``merge paths``), and runs
BFD on every session. Each LB's BIRD holds the VIP and the inside address in
a ``static`` protocol that starts disabled; ``quiclb announce`` enables it
while the LB's ``/healthz`` answers ok. ``deploy/bgp/`` has the production
versions of both (top-of-rack routers, hold and BFD timers) and a test renders
these next to them.
"""

from __future__ import annotations

from dataclasses import dataclass

#: The static protocol ``quiclb announce`` enables and disables.
VIP_PROTOCOL = "quiclb_vip"
ROUTER_AS = 65000
LB_AS = 65100


@dataclass(frozen=True)
class Timers:
    """BGP and BFD timers. The lab's are short so a failure shows in a test's time."""

    hold: int = 3  # seconds; BIRD's minimum is 3
    keepalive: int = 1
    bfd_interval_ms: int = 100
    bfd_multiplier: int = 3
    bfd: bool = True

    @property
    def bfd_detect_ms(self) -> int:
        return self.bfd_interval_ms * self.bfd_multiplier


def _bfd_block(interface: str, timers: Timers) -> str:
    if not timers.bfd:
        return ""
    return f"""
protocol bfd {{
  interface "{interface}" {{
    min rx interval {timers.bfd_interval_ms} ms;
    min tx interval {timers.bfd_interval_ms} ms;
    idle tx interval 1000 ms;
    multiplier {timers.bfd_multiplier};
  }};
}}
"""


def _session_timers(timers: Timers) -> str:
    return (f"  hold time {timers.hold};\n  keepalive time {timers.keepalive};\n"
            "  connect delay time 1;\n  connect retry time 1;\n  error wait time 1, 5;\n"
            f"  bfd {'on' if timers.bfd else 'off'};\n")


def router_config(router_id: str, neighbours: list[tuple[str, str]], prefixes: list[str], timers: Timers) -> str:
    """``neighbours``: (local address, LB address) per LB slot; ``prefixes``: what LBs may announce (/32s)."""
    allowed = ", ".join(prefixes)
    sessions = "\n".join(
        f"protocol bgp lb{i + 1} from lbs {{\n  local {local} as {ROUTER_AS};\n  neighbor {peer} as {LB_AS};\n}}"
        for i, (local, peer) in enumerate(neighbours)
    )
    return f"""# The router: learns the service prefixes from every LB, installs one ECMP route each.
router id {router_id};
log stderr {{ info, remote, warning, error, auth, fatal, bug }};

protocol device {{ scan time 10; }}

protocol kernel {{
  ipv4 {{ import none; export all; }};
  merge paths yes limit 16;   # equal BGP routes from several LBs -> one multipath route
}}
{_bfd_block("lb*", timers)}
template bgp lbs {{
  passive on;                 # the LBs connect: a new LB needs no change here beyond its slot
{_session_timers(timers)}  ipv4 {{
    import filter {{ if net ~ [ {allowed} ] then accept; reject; }};
    export none;
  }};
}}

{sessions}
"""


def lb_config(router_id: str, local: str, router: str, prefixes: list[str], timers: Timers) -> str:
    """One LB's speaker: the service prefixes in a disabled static protocol, exported to the router."""
    routes = "\n".join(f"  route {p} blackhole;" for p in prefixes)
    return f"""# An LB's speaker: announces the VIP and inside address while `quiclb announce` enables {VIP_PROTOCOL}.
router id {router_id};
log stderr {{ info, remote, warning, error, auth, fatal, bug }};

protocol device {{ scan time 10; }}

protocol static {VIP_PROTOCOL} {{
  disabled yes;               # `quiclb announce` enables it while /healthz answers ok
  ipv4;
{routes}
}}
{_bfd_block("eth0", timers)}
protocol bgp tor {{
  local {local} as {LB_AS};
  neighbor {router} as {ROUTER_AS};
{_session_timers(timers)}  ipv4 {{
    import none;
    export where proto = "{VIP_PROTOCOL}";
    next hop self;
  }};
}}
"""
