# Prometheus from Debian's package, so the stack builds where no registry image can be pulled (the upstream
# prom/prometheus image works the same way: same flags, config at /etc/prometheus/prometheus.yml).
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
# A fixed system uid, created before the package's postinst would pick one. moment-timezone (218 MB of
# time-zone data pulled in for the bundled web UI) is dropped: the HTTP API does not use it.
RUN useradd --system --uid 999 --user-group --home-dir /var/lib/prometheus --shell /usr/sbin/nologin prometheus \
 && apt-get update \
 && apt-get install -y --no-install-recommends prometheus=2.42.* \
 && rm -rf /var/lib/apt/lists/* /usr/share/javascript/moment-timezone \
 && chown prometheus:prometheus /var/lib/prometheus
USER 999:999
EXPOSE 9090
ENTRYPOINT ["/usr/bin/prometheus"]
# exemplar-storage: keeps the trace ids the API attaches to its latency buckets (it scrapes OpenMetrics then).
CMD ["--config.file=/etc/prometheus/prometheus.yml", \
     "--storage.tsdb.path=/var/lib/prometheus", \
     "--web.listen-address=:9090", \
     "--enable-feature=exemplar-storage"]
