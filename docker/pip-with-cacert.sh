#!/bin/sh
# pip, trusting the CA bundle passed to the build as the `cacert` secret when there is one (hosts behind a
# TLS-intercepting proxy); without it, pip's own certificates. Usage inside the Dockerfile:
#   RUN --mount=type=secret,id=cacert pip-with-cacert install ...
set -eu
if [ -s /run/secrets/cacert ]; then
  export PIP_CERT=/run/secrets/cacert
fi
exec /opt/venv/bin/pip "$@"
