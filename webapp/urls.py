"""Webhook URLs users may register: http(s) only, never link-local or cloud metadata addresses."""
from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

METADATA_HOSTS = {"metadata.google.internal", "metadata", "instance-data", "metadata.azure.com"}


class UnsafeUrl(ValueError):
    pass


def check_webhook_url(url: str) -> str:
    """The URL if renderq may POST to it; UnsafeUrl saying why not otherwise.

    Checked when it is set and again before each delivery (DNS may change in between)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UnsafeUrl("webhook_url must be an http:// or https:// URL with a host")
    host = parts.hostname.lower()
    if host in METADATA_HOSTS:
        raise UnsafeUrl("webhook_url may not point at a cloud metadata service")
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, parts.port or 443, proto=socket.IPPROTO_TCP)}
    except (socket.gaierror, UnicodeError):
        raise UnsafeUrl("webhook_url's host %s does not resolve" % host) from None
    for address in addresses:
        ip = ipaddress.ip_address(address.split("%")[0])
        if ip.is_link_local or ip.is_multicast or ip.is_unspecified or ip.is_reserved or \
                str(ip) in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200"):
            raise UnsafeUrl("webhook_url may not point at a link-local, metadata or reserved address (%s)" % ip)
    return url
