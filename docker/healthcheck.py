"""The image's HEALTHCHECK: healthy when the registry answers GET /v2/ on the address and scheme
its config (/etc/mirror/config.yml and REGISTRY_* overrides, as `serve` reads them) gives.

Any HTTP answer counts, 401 included: with auth on, that is a live registry. Exit 0 healthy, 1 not.
"""

import os
import ssl
import sys
import urllib.error
import urllib.request

from mirror.config import ConfigError, load

CONFIG = "/etc/mirror/config.yml"


def main() -> int:
    try:
        http = load(CONFIG, os.environ).http
    except ConfigError as e:
        print(f"configuration error: {e}")
        return 1
    host = "127.0.0.1" if http.host in ("", "0.0.0.0", "::") else http.host
    url = f"{'https' if http.tls else 'http'}://{f'[{host}]' if ':' in host else host}:{http.port}/v2/"
    # Only whether it answers: no proxy, and the server's certificate may name another host.
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                         urllib.request.HTTPSHandler(context=context))
    try:
        with opener.open(url, timeout=4) as r:
            print(f"{url}: {r.status}")
    except urllib.error.HTTPError as e:
        print(f"{url}: {e.code}")
    except OSError as e:
        print(f"{url}: {e}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
