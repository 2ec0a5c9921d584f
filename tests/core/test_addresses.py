"""One spelling per address (lb.core.addresses): what the LB, the return path and the backends compare."""

from __future__ import annotations

import pytest

from lb.core.addresses import canonical_host, format_address, ip_version, normalize_address, packed_host


@pytest.mark.parametrize(
    ("written", "canonical"),
    [
        ("192.0.2.1", "192.0.2.1"),
        ("::ffff:192.0.2.1", "192.0.2.1"),  # a dual-stack socket's spelling of an IPv4 peer
        ("::FFFF:c000:0201", "192.0.2.1"),
        ("2001:DB8:0:0::1", "2001:db8::1"),  # compressed, lower case (RFC 5952)
        ("fe80::1%eth0", "fe80::1"),  # scope IDs are local to one host
        ("::1", "::1"),
    ],
)
def test_canonical_host_folds_every_spelling(written: str, canonical: str) -> None:
    assert canonical_host(written) == canonical


def test_normalize_address_takes_ipv6_socket_4_tuples() -> None:
    assert normalize_address(("::ffff:10.0.0.1", 4001, 0, 0)) == ("10.0.0.1", 4001)
    assert normalize_address(("2001:db8::0:1", 443)) == ("2001:db8::1", 443)


@pytest.mark.parametrize("text", ["localhost", "10.0.0.256", "", "[::1]"])
def test_non_ip_text_is_a_value_error(text: str) -> None:
    # The LB never does DNS: callers map this ValueError to their own reason.
    with pytest.raises(ValueError, match="does not appear to be an IPv4 or IPv6 address"):
        canonical_host(text)


def test_packed_host_is_the_canonical_ip() -> None:
    assert packed_host("::ffff:192.0.2.1") == packed_host("192.0.2.1") == bytes((192, 0, 2, 1))
    assert len(packed_host("2001:db8::1")) == 16


def test_ip_version_is_as_written_for_choosing_a_socket_family() -> None:
    assert ip_version("192.0.2.1") == 4
    assert ip_version("::ffff:192.0.2.1") == 6  # binding it needs an IPv6 socket
    assert ip_version("fe80::1%eth0") == 6


def test_format_address_brackets_ipv6_only() -> None:
    assert format_address(("127.0.0.1", 4433)) == "127.0.0.1:4433"
    assert format_address(("::1", 4433)) == "[::1]:4433"
