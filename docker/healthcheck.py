"""Container health probe: exit 0 when the API answers 200 on PATH (default /healthz).

The images have no curl; this uses only the standard library. The port comes from
RESNET_SERVE_PORT, as for the server itself:

    python /usr/local/bin/healthcheck.py /readyz
"""

import os
import sys
import urllib.request

path = sys.argv[1] if len(sys.argv) > 1 else "/healthz"
url = f"http://127.0.0.1:{os.environ.get('RESNET_SERVE_PORT', '8000')}{path}"
try:
    with urllib.request.urlopen(url, timeout=3) as response:
        sys.exit(0 if response.status == 200 else 1)
except OSError as error:
    print(f"{url}: {error}", file=sys.stderr)
    sys.exit(1)
