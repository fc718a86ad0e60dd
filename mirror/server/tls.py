"""http.tls: the server's SSL context, as registry:2 builds it (client CAs make client
certificates required)."""

from __future__ import annotations

import ssl

from mirror.config import ConfigError, TLSConfig

VERSIONS = {"tls1.2": ssl.TLSVersion.TLSv1_2, "tls1.3": ssl.TLSVersion.TLSv1_3}


def server_context(tls: TLSConfig) -> ssl.SSLContext:
    """The context for the main listener; ConfigError naming the key if a file does not load."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = VERSIONS[tls.minimumtls]
    try:
        context.load_cert_chain(tls.certificate, tls.key)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"http.tls.certificate/key: cannot load {tls.certificate} and {tls.key}: {e}") from None
    if tls.clientcas:
        for ca in tls.clientcas:
            try:
                context.load_verify_locations(cafile=ca)
            except (OSError, ssl.SSLError) as e:
                raise ConfigError(f"http.tls.clientcas: cannot load {ca}: {e}") from None
        context.verify_mode = ssl.CERT_REQUIRED
    else:
        context.verify_mode = ssl.CERT_NONE
    return context

