"""Container health probe: GET http://127.0.0.1:$GUARDSTREAM_WEB_PORT/healthz, exit 0 on HTTP 200.

Used by the images' HEALTHCHECK (curl is not installed). Standard library only.
Usage: python healthcheck.py [PATH]   (PATH defaults to /healthz; /readyz for readiness)
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def main(argv: list[str]) -> int:
    path = argv[1] if len(argv) > 1 else "/healthz"
    port = os.environ.get("GUARDSTREAM_WEB_PORT", "6066")
    url = f"http://127.0.0.1:{port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=4) as resp:
            return 0 if resp.status == 200 else 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"healthcheck {url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
