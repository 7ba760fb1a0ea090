"""TLS for the connections to RabbitMQ (`amqp.ssl`): one client context per settings.

The context is built once, when the settings are first used: a CA file that does
not exist is a settings error at start-up, not a connection error retried for ever.
"""

import functools
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


def describe_failure(exc: ssl.SSLError) -> str:
    """What a failed handshake says to an operator (the certificate's problem, when it is one)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"its certificate does not verify: {exc.verify_message}"
    return f"the TLS handshake failed: {exc.reason or exc}"
