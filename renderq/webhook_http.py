"""Reaching a user's webhook receiver: which addresses renderq may connect to, and one POST
bounded in time and in what it reads.

The receiver is chosen by a user, so it is treated as hostile:

- its name is resolved once, every address is checked, and the connection goes to a checked
  address (and the peer is checked again once connected), while the Host header, TLS SNI and
  the certificate check still use the name: a DNS answer that changes between the check and
  the connection (rebinding) cannot steer the POST elsewhere;
- private, loopback, link-local, multicast, unspecified, reserved and other non-public
  addresses are refused unless WEBHOOK_ALLOWED_NETWORKS names them; cloud metadata services
  are refused even then, since they hand out the machine's credentials;
- one deadline bounds the whole call (name lookup, connect, TLS, sending, the answer's status
  line and headers): every socket operation gets only the time left, so a receiver trickling
  a byte at a time cannot stretch it;
- redirects are never followed (http.client does not follow them, and no proxy from the
  environment is used), and at most MAX_RESPONSE_BYTES of the answer's body are read.
"""
from __future__ import annotations

import base64
import http.client
import ipaddress
import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, Union
from urllib.parse import unquote, urlsplit

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

# Never connected to, whatever WEBHOOK_ALLOWED_NETWORKS says.
METADATA_HOSTS = frozenset({"metadata.google.internal", "metadata.goog", "metadata", "instance-data",
                            "instance-data.ec2.internal", "metadata.azure.com"})
METADATA_ADDRESSES = frozenset(ipaddress.ip_address(address) for address in
                               ("169.254.169.254", "fd00:ec2::254", "100.100.100.200"))

DEADLINE_SECONDS = 10.0  # one delivery attempt, from name lookup to the answer's last header
SET_TIME_LOOKUP_SECONDS = 5.0  # resolving a webhook_url when a user sets it
MAX_RESPONSE_BYTES = 4096  # of the answer's body: read only so a small answer closes cleanly
BODY_GRACE_SECONDS = 1.0  # how long reading that little may take once the status is known
USER_AGENT = "renderq-webhooks/1"


class UnsafeUrl(ValueError):
    """The URL may not be delivered to as it stands: not http(s), a metadata host, or a name
    with no address renderq may connect to. The message is for the user."""


class DeliveryFailed(Exception):
    """This attempt got no answer: timeout, connection or TLS failure, not HTTP. Another
    attempt may do better. The message is for the user (it names no internals)."""


class DeadlineExceeded(TimeoutError):
    pass


class Deadline:
    """A point in time (monotonic) that every step of one call must finish by."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.at = time.monotonic() + seconds

    def remaining(self) -> float:
        left = self.at - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded("the deadline has passed")
        return left

    def within(self, seconds: float) -> "Deadline":
        """A deadline `seconds` from now, or this one if it comes first."""
        sooner = Deadline(seconds)
        return sooner if sooner.at < self.at else self


@dataclass(frozen=True)
class Target:
    """A webhook URL taken apart: where to connect and what to ask for."""
    tls: bool
    host: str  # lower-case, IDNA-encoded; an IPv6 literal without brackets
    port: int
    request_path: str
    authorization: Optional[str]  # Basic credentials from the URL's user:password@, as requests sent them


@dataclass(frozen=True)
class Address:
    ip: IPAddress
    family: int
    sockaddr: tuple


def parse_url(url: str) -> Target:
    if any(character <= " " or character == "\x7f" for character in url):
        raise UnsafeUrl("webhook_url may not contain spaces or control characters (percent-encode them)")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise UnsafeUrl("webhook_url is not a valid URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UnsafeUrl("webhook_url must be an http:// or https:// URL with a host")
    try:
        host = parts.hostname.rstrip(".").encode("idna").decode("ascii").lower()
    except UnicodeError:
        raise UnsafeUrl("webhook_url's host is not a valid name") from None
    if not host:
        raise UnsafeUrl("webhook_url must be an http:// or https:// URL with a host")
    if host in METADATA_HOSTS:
        raise UnsafeUrl("webhook_url may not point at a cloud metadata service")
    authorization = None
    if parts.username is not None:
        credentials = "%s:%s" % (unquote(parts.username), unquote(parts.password or ""))
        authorization = "Basic " + base64.b64encode(credentials.encode()).decode()
    tls = parts.scheme == "https"
    return Target(tls=tls, host=host, port=port if port is not None else (443 if tls else 80),
                  request_path=(parts.path or "/") + ("?" + parts.query if parts.query else ""),
                  authorization=authorization)


def _special_use(ip: IPAddress) -> Optional[str]:
    if ip.is_unspecified:
        return "an unspecified address"
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_link_local:
        return "a link-local address"
    if ip.is_multicast:
        return "a multicast address"
    if ip.is_private or (ip.version == 6 and ip.is_site_local):
        return "a private address"
    if ip.is_reserved:
        return "a reserved address"
    if not ip.is_global:
        return "not a public address"
    return None


def refusal(ip: IPAddress, allowed_networks: Sequence[IPNetwork] = ()) -> Optional[str]:
    """Why renderq may not connect to `ip` ("a loopback address", ...), or None if it may."""
    if ip.version == 6 and ip.ipv4_mapped:
        ip = ip.ipv4_mapped  # ::ffff:a.b.c.d is a.b.c.d
    if ip.version == 6 and ip.scope_id:
        ip = ipaddress.IPv6Address(str(ip).split("%")[0])
    if ip in METADATA_ADDRESSES:
        return "a cloud metadata address"
    if any(ip.version == network.version and ip in network for network in allowed_networks):
        return None
    reason = _special_use(ip)
    if reason is None and ip.version == 6 and ip.sixtofour:  # 2002::/16 carries an IPv4 address
        inner = _special_use(ip.sixtofour) or ("a cloud metadata address" if ip.sixtofour in METADATA_ADDRESSES else None)
        reason = inner and "an IPv6 address embedding " + inner
    return reason


def resolve(host: str, port: int, deadline: Deadline) -> list[Address]:
    """Every address of `host`, looked up once, within the deadline. A lookup that outlives it
    is left to finish in its thread (getaddrinfo cannot be interrupted)."""
    outcome: dict = {}

    def look_up() -> None:
        try:
            outcome["infos"] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as error:
            outcome["error"] = error

    lookup = threading.Thread(target=look_up, name="webhook-dns", daemon=True)
    lookup.start()
    lookup.join(deadline.remaining())
    if lookup.is_alive():
        raise DeadlineExceeded("the name lookup did not finish in time")
    if "error" in outcome:
        raise DeliveryFailed("%s does not resolve" % host)
    addresses: dict[IPAddress, Address] = {}
    for family, _, _, _, sockaddr in outcome["infos"]:
        if family in (socket.AF_INET, socket.AF_INET6):
            ip = ipaddress.ip_address(sockaddr[0])
            addresses.setdefault(ip, Address(ip, family, sockaddr))
    if not addresses:
        raise DeliveryFailed("%s does not resolve" % host)
    return list(addresses.values())


def permitted(host: str, addresses: Iterable[Address], allowed_networks: Sequence[IPNetwork]) -> list[Address]:
    """The addresses renderq may connect to; UnsafeUrl naming the first refused one if none."""
    addresses = list(addresses)
    allowed = [address for address in addresses if refusal(address.ip, allowed_networks) is None]
    if not allowed:
        first = addresses[0].ip
        named = "address" if host == str(first) else "host %s resolves to" % host
        raise UnsafeUrl("webhook_url's %s %s, %s, which renderq does not deliver to"
                        % (named, first, refusal(first, allowed_networks)))
    return allowed


def check_url(url: str, allowed_networks: Sequence[IPNetwork] = ()) -> str:
    """The URL if renderq may POST to it now; UnsafeUrl saying why not otherwise. Deliveries
    check again, on the address they connect to."""
    target = parse_url(url)
    try:
        permitted(target.host, resolve(target.host, target.port, Deadline(SET_TIME_LOOKUP_SECONDS)), allowed_networks)
    except DeliveryFailed:
        raise UnsafeUrl("webhook_url's host %s does not resolve" % target.host) from None
    except DeadlineExceeded:
        raise UnsafeUrl("webhook_url's host %s could not be resolved in time" % target.host) from None
    return url


class _Bounded:
    """Gives every blocking operation of a socket only the time left before `deadline`."""
    deadline: Optional[Deadline] = None

    def _arm(self) -> None:
        if self.deadline is not None:
            self.settimeout(self.deadline.remaining())

    def connect(self, *args, **kwargs):
        self._arm()
        return super().connect(*args, **kwargs)

    def send(self, *args, **kwargs):
        self._arm()
        return super().send(*args, **kwargs)

    def sendall(self, *args, **kwargs):
        self._arm()  # CPython bounds a whole sendall by the timeout, not each chunk
        return super().sendall(*args, **kwargs)

    def recv(self, *args, **kwargs):
        self._arm()
        return super().recv(*args, **kwargs)

    def recv_into(self, *args, **kwargs):
        self._arm()  # http.client reads the answer through makefile(), which calls this
        return super().recv_into(*args, **kwargs)


class _BoundedSocket(_Bounded, socket.socket):
    pass


class _BoundedTLSSocket(_Bounded, ssl.SSLSocket):
    pass


def _tls_context() -> ssl.SSLContext:
    # The default context: certificate and host name checks on, the system's CAs (and
    # SSL_CERT_FILE if set). Made per connection so a renewed CA bundle is picked up.
    context = ssl.create_default_context()
    context.sslsocket_class = _BoundedTLSSocket
    return context


def _abort(sock: Optional[socket.socket]) -> None:
    """Close with a reset, dropping whatever is still queued to send, so that nothing of this
    attempt reaches the receiver after its deadline."""
    if sock is None:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # on, 0 s: reset
    except OSError:
        pass
    sock.close()


class _PinnedConnection(http.client.HTTPConnection):
    """HTTP(S) to one checked address, speaking to it as `target.host` (Host header, TLS SNI,
    certificate name), every step within `deadline`."""

    def __init__(self, target: Target, address: Address, allowed_networks: Sequence[IPNetwork], deadline: Deadline):
        super().__init__(target.host, target.port)
        self.default_port = 443 if target.tls else 80  # so Host carries the port only when it is not the default
        self.target = target
        self.address = address
        self.allowed_networks = allowed_networks
        self.deadline = deadline
        # http.client drops `self.sock` once an answer says it will close; this stays.
        self.bounded_sock: Optional[socket.socket] = None

    def connect(self) -> None:
        sock = _BoundedSocket(self.address.family, socket.SOCK_STREAM)
        sock.deadline = self.deadline
        try:
            sock.connect(self.address.sockaddr)
            self._check_peer(sock)
            if self.target.tls:
                sock.settimeout(self.deadline.remaining())  # the handshake as a whole gets the time left
                sock = _tls_context().wrap_socket(sock, server_hostname=self.target.host)
                sock.deadline = self.deadline
        except BaseException:
            _abort(sock)
            raise
        self.sock = self.bounded_sock = sock

    def _check_peer(self, sock: socket.socket) -> None:
        """The address actually connected to, checked before a byte is sent."""
        peer = ipaddress.ip_address(sock.getpeername()[0])
        reason = refusal(peer, self.allowed_networks)
        if peer != self.address.ip or reason:
            raise UnsafeUrl("webhook_url's host %s led to %s, %s, which renderq does not deliver to"
                            % (self.target.host, peer, reason or "not the address checked"))

    def abort(self) -> None:
        _abort(self.bounded_sock)
        self.close()


def describe(error: BaseException, deadline: Deadline) -> str:
    """What went wrong with an attempt, in words for the user (no exception names, no paths)."""
    if isinstance(error, TimeoutError):
        return "no complete answer within %g s" % deadline.seconds
    if isinstance(error, ssl.SSLCertVerificationError):
        return "TLS certificate not accepted: %s" % (error.verify_message or "verification failed")
    if isinstance(error, ssl.SSLError):
        return "TLS failed: %s" % (error.reason or "handshake error")
    if isinstance(error, http.client.RemoteDisconnected):
        return "the receiver closed the connection without answering"
    if isinstance(error, http.client.HTTPException):
        return "the receiver's answer is not valid HTTP"
    if isinstance(error, ConnectionRefusedError):
        return "connection refused"
    if isinstance(error, OSError):
        return "connection failed: %s" % (error.strerror or "network error")
    return "delivery failed"


def post(url: str, body: bytes, headers: dict, allowed_networks: Sequence[IPNetwork], deadline: Deadline) -> int:
    """POST `body` to `url` once and return the answer's status code (a redirect is a status
    like any other). UnsafeUrl if the URL may not be delivered to; DeliveryFailed if no answer
    came within the deadline or the connection failed."""
    target = parse_url(url)
    headers = {**headers, "user-agent": USER_AGENT, "connection": "close",
               **({"authorization": target.authorization} if target.authorization else {})}
    try:
        addresses = permitted(target.host, resolve(target.host, target.port, deadline), allowed_networks)
    except DeadlineExceeded as error:
        raise DeliveryFailed(describe(error, deadline)) from None
    failure: Optional[BaseException] = None
    for address in addresses:  # the next checked address if one refuses the connection
        connection = _PinnedConnection(target, address, allowed_networks, deadline)
        try:
            connection.connect()
        except (OSError, DeadlineExceeded) as error:
            failure = error
            if isinstance(error, TimeoutError):
                break
            continue
        return _exchange(connection, target, body, headers, deadline)
    raise DeliveryFailed(describe(failure, deadline)) from None


def _exchange(connection: _PinnedConnection, target: Target, body: bytes, headers: dict, deadline: Deadline) -> int:
    try:
        connection.request("POST", target.request_path, body=body, headers=headers)
        response = connection.getresponse()  # the status line and headers, within the deadline
    except (OSError, http.client.HTTPException, DeadlineExceeded) as error:
        connection.abort()
        raise DeliveryFailed(describe(error, deadline)) from None
    # The answer's body says nothing renderq uses, and is never shown to anyone (it could come
    # from any address the allow-list opens). Reading a little lets a small answer end with a
    # clean close; a large or slow one is cut off.
    connection.bounded_sock.deadline = deadline.within(BODY_GRACE_SECONDS)
    try:
        response.read(MAX_RESPONSE_BYTES)
    except (OSError, http.client.HTTPException, DeadlineExceeded):
        pass
    response.close()
    connection.close()
    return response.status
