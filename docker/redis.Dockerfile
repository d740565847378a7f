# Redis from Debian's package, so the stack builds where no registry image can be pulled. Configured as a cache
# (docker/redis.conf: no persistence, least recently used keys dropped when full); whoever runs it adds
# `--maxmemory` for the memory they give it.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
# A fixed system uid, created before the package's postinst would pick one.
RUN useradd --system --uid 997 --user-group --home-dir /var/lib/redis --shell /usr/sbin/nologin redis \
 && apt-get update \
 && apt-get install -y --no-install-recommends redis-server=5:7.0.* \
 && rm -rf /var/lib/apt/lists/*
COPY redis.conf /usr/local/etc/redis/redis.conf
USER 997:997
EXPOSE 6379
ENTRYPOINT ["/usr/bin/redis-server", "/usr/local/etc/redis/redis.conf"]
CMD ["--maxmemory", "256mb"]
