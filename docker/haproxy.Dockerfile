# HAProxy from Debian's package, so the stack builds where no registry image can be pulled.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
# A fixed system uid, created before the package's postinst would pick one.
RUN useradd --system --uid 998 --user-group --home-dir /var/lib/haproxy --shell /usr/sbin/nologin haproxy \
 && apt-get update \
 && apt-get install -y --no-install-recommends haproxy=2.6.* \
 && rm -rf /var/lib/apt/lists/*
USER 998:998
EXPOSE 8000
# -W master-worker, -db: stay in the foreground; SIGUSR1 (docker stop) finishes open connections first.
STOPSIGNAL SIGUSR1
ENTRYPOINT ["/usr/sbin/haproxy", "-W", "-db", "-f", "/etc/haproxy/haproxy.cfg"]
