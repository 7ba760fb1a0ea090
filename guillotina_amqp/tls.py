"""TLS for the connections to RabbitMQ (`amqp.ssl`): one client context per settings, and
why a TLS connection failed, in words naming the setting to fix.

The context is built once, when the settings are first used: a CA file that does
not exist is a settings error at start-up, not a connection error retried for ever.

A broker that refuses our client certificate (or wanted one: `fail_if_no_peer_cert`) does
so, with TLS 1.3, only after the handshake succeeded on our side: it sends an alert and
closes. aioamqp has written the AMQP header meanwhile, and a socket closed with unread
data is reset, so the alert is often lost: the attempt fails as a reset connection. Then
`failure_behind` asks once more with a connection that sends nothing after its handshake:
a broker that refused the certificate sends the alert again, one that accepted it waits
in silence for the AMQP header (then the reset was something else, retried as it was).
"""

import asyncio
import functools
import re
import ssl
from typing import Any

from guillotina_amqp.exceptions import InvalidSettings
from guillotina_amqp.settings import TLSSettings


class _NamedContext(ssl.SSLContext):
    """A client context that checks certificates against one fixed name, when it has one.

    aioamqp hands its `ssl` context to asyncio, which checks the certificate against the
    host connected to; `amqp.ssl.server_hostname` names another (the host is an IP address,
    or a load balancer's name), and no argument of aioamqp's reaches asyncio's.
    """

    expected_name: str | None = None

    def wrap_bio(self, *args: Any, **kwargs: Any) -> ssl.SSLObject:
        if self.expected_name is not None:
            kwargs["server_hostname"] = self.expected_name
        return super().wrap_bio(*args, **kwargs)


@functools.lru_cache(maxsize=8)
def client_context(settings: TLSSettings) -> ssl.SSLContext:
    """The TLS context of `amqp.ssl`; InvalidSettings naming the file that cannot be loaded."""
    context = _NamedContext(ssl.PROTOCOL_TLS_CLIENT)  # certificate and host name checked
    context.expected_name = settings.server_hostname
    if not settings.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if settings.cafile:
        _load(context.load_verify_locations, "amqp.ssl.cafile", settings.cafile)
    else:
        context.load_default_certs()
    if settings.certfile:
        _load(context.load_cert_chain, "amqp.ssl.certfile", settings.certfile, settings.keyfile)
    elif settings.keyfile:
        raise InvalidSettings("amqp.ssl.keyfile is set without amqp.ssl.certfile")
    return context


def _load(load: Any, setting: str, *args: Any, **kwargs: Any) -> None:
    try:
        load(*args, **kwargs)
    except (OSError, ssl.SSLError) as exc:
        raise InvalidSettings(f"{setting}: cannot load it: {exc.strerror or exc}") from None


#: seconds the second look waits for an alert: a broker that refused the certificate sends
#: it at once, one that accepted it sends nothing until it gets the AMQP header
PROBE_TIMEOUT = 3.0
#: alerts of a broker that refused the client certificate shown, or wanted one
_CERTIFICATE_REFUSED = frozenset(
    {
        "TLSV13_ALERT_CERTIFICATE_REQUIRED",
        "TLSV1_ALERT_UNKNOWN_CA",
        "TLSV1_ALERT_ACCESS_DENIED",
        "SSLV3_ALERT_BAD_CERTIFICATE",
        "SSLV3_ALERT_CERTIFICATE_EXPIRED",
        "SSLV3_ALERT_CERTIFICATE_REVOKED",
        "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
        "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE",
    }
)
#: what TLS 1.2 brokers answer to a missing client certificate, as to a cipher mismatch
_HANDSHAKE_FAILURE = "SSLV3_ALERT_HANDSHAKE_FAILURE"
#: OpenSSL's verify code for a certificate that does not name the host checked
_HOSTNAME_MISMATCH = 62
#: a reset connection: the broker closed it on us (during or just after the handshake)
_RESET = (ConnectionResetError, ConnectionAbortedError, BrokenPipeError)


async def failure_behind(
    exc: BaseException, host: str, port: int, context: ssl.SSLContext
) -> ssl.SSLError | None:
    """The TLS error that made a connection attempt to `host`:`port` fail with `exc`, or None
    when TLS is not why (see the module's docstring for a reset connection)."""
    found = _in_chain(exc, ssl.SSLError)
    if found is not None or _in_chain(exc, _RESET) is None:
        return found
    return await _refusal(host, port, context)


def _in_chain(exc: BaseException, kinds: Any) -> Any:
    """`exc` or the first of its causes that is one of `kinds` (aioamqp raises
    AmqpClosedConnection from the socket's error)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, kinds):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


async def _refusal(host: str, port: int, context: ssl.SSLContext) -> ssl.SSLError | None:
    """The alert of a broker that refuses our certificate, read by a connection that sends
    nothing; None when the broker stays silent (it accepted it) or cannot be reached."""
    try:
        async with asyncio.timeout(PROBE_TIMEOUT):
            reader, writer = await asyncio.open_connection(host, port, ssl=context)
            try:
                await reader.read(1)
            finally:
                writer.close()
    except ssl.SSLError as exc:
        return exc
    except (OSError, TimeoutError):
        pass
    return None


def describe_failure(exc: ssl.SSLError, settings: TLSSettings) -> str:
    """What a failed TLS connection says to an operator, naming the `amqp.ssl` setting to fix."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return _not_verified(exc, settings)
    text = _alert_text(exc)
    if exc.reason in _CERTIFICATE_REFUSED:
        if settings.certfile:
            return f"RabbitMQ refused the client certificate of amqp.ssl.certfile: {text}"
        return f"RabbitMQ requires a client certificate: set amqp.ssl.certfile and amqp.ssl.keyfile ({text})"
    if exc.reason == _HANDSHAKE_FAILURE and not settings.certfile:
        return (
            f"the TLS handshake failed ({text}): a broker that requires a client certificate "
            "says so (amqp.ssl.certfile, amqp.ssl.keyfile)"
        )
    return f"the TLS handshake failed ({text}): does amqp.port serve TLS?"


def _not_verified(exc: ssl.SSLCertVerificationError, settings: TLSSettings) -> str:
    if exc.verify_code == _HOSTNAME_MISMATCH:
        checked = "amqp.ssl.server_hostname" if settings.server_hostname else "the host: amqp.host/hosts"
        return f"its certificate does not verify for the name checked ({checked}): {exc.verify_message}"
    against = "amqp.ssl.cafile" if settings.cafile else "the system's CAs (amqp.ssl.cafile unset)"
    return f"its certificate does not verify against {against}: {exc.verify_message}"


def _alert_text(exc: ssl.SSLError) -> str:
    """OpenSSL's words for `exc` ("tlsv13 alert certificate required"), without its codes."""
    found = re.search(r"\] (.+?) \(_ssl", str(exc))
    return found.group(1) if found else str(exc.reason or exc)
