"""The network a client address is counted under (IPv6 hosts own whole /64s)."""

from __future__ import annotations

import ipaddress


def client_net(ip, v4_prefix: int = 32, v6_prefix: int = 64) -> str:
    prefix = v4_prefix if ip.version == 4 else v6_prefix
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))
