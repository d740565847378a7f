# resnet-serve images, one Dockerfile, BuildKit required (Docker >= 20.10). Targets:
#   builder  CPU torch + exporters; trains the built-in digits demo and exports /models/model.onnx at build time
#   model    the ONNX file alone (/models/model.onnx, nothing else); its command copies it to /target
#   cpu      API on ONNX Runtime (CPU)
#   gpu      API on ONNX Runtime (CUDA); CUDA and cuDNN come as pip wheels, the host needs only the NVIDIA driver
# Runtime images hold no model and no torch: they read RESNET_SERVE_MODEL_PATH (default /models/model.onnx),
# which docker-compose.yml (and deploy/k8s) fill from the model image. Python packages are installed from the
# hashed locks in requirements/. Build one target:
#   docker build --target cpu -t resnet-serve:cpu .
# Behind a TLS-intercepting proxy (only there), give pip the host's CA bundle:
#   --secret id=cacert,src=/etc/ssl/certs/ca-certificates.crt
# Local wheels (an offline CPU torch) for the builder:
#   docker buildx build --build-context wheels=/opt/wheels ...      (BuildKit >= 0.10: replaces the stage below)
#   --build-arg WHEELS_IMAGE=<image with the wheels at />            (any BuildKit; see docker/test.sh)
# Otherwise torch comes from TORCH_INDEX_URL (PyTorch's CPU-only index: PyPI's torch pulls gigabytes of CUDA).

ARG BASE_IMAGE=debian:bookworm-slim
ARG WHEELS_IMAGE=scratch

FROM ${WHEELS_IMAGE} AS wheels

# Python 3.11 from Debian, a non-root user, and the venv on PATH: what every stage shares.
FROM ${BASE_IMAGE} AS python
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3=3.11.* \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --user-group --create-home --home-dir /home/resnet --shell /usr/sbin/nologin resnet
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# A virtualenv with pip; only build stages start from here.
FROM python AS venv
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3-venv=3.11.* \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PIP_DEFAULT_TIMEOUT=120
COPY docker/pip-with-cacert.sh /usr/local/bin/pip-with-cacert

# The project as a wheel. Copying the source invalidates this stage only, never a dependency layer.
FROM venv AS dist
WORKDIR /src
COPY pyproject.toml README.md ./
COPY app/ app/
COPY core/ core/
COPY model/ model/
RUN --mount=type=secret,id=cacert --mount=type=cache,target=/root/.cache/pip,sharing=locked \
    pip-with-cacert wheel --no-deps --wheel-dir /dist .

# Dependencies per target from their lock alone (pinned, hash-checked), cached across source edits.
FROM venv AS deps-cpu
RUN --mount=type=bind,source=requirements/serve-cpu.txt,target=/tmp/requirements.txt \
    --mount=type=secret,id=cacert --mount=type=cache,target=/root/.cache/pip,sharing=locked \
    pip-with-cacert install --require-hashes --no-deps -r /tmp/requirements.txt \
 && pip uninstall -y setuptools

FROM venv AS deps-gpu
RUN --mount=type=bind,source=requirements/serve-gpu.txt,target=/tmp/requirements.txt \
    --mount=type=secret,id=cacert --mount=type=cache,target=/root/.cache/pip,sharing=locked \
    pip-with-cacert install --require-hashes --no-deps -r /tmp/requirements.txt \
 && pip uninstall -y setuptools

# Training and export: the `train` lock (torch's own dependencies included), then CPU torch itself, pinned.
FROM venv AS builder
ARG TORCH_VERSION=2.13.0+cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN --mount=type=bind,source=requirements/build.txt,target=/tmp/requirements.txt \
    --mount=type=secret,id=cacert --mount=type=cache,target=/root/.cache/pip,sharing=locked \
    pip-with-cacert install --require-hashes --no-deps -r /tmp/requirements.txt
RUN --mount=type=bind,from=wheels,target=/wheels \
    --mount=type=secret,id=cacert --mount=type=cache,target=/root/.cache/pip,sharing=locked \
    if [ -n "$(find /wheels -maxdepth 1 -name 'torch-*.whl')" ]; then \
      export PIP_FIND_LINKS=/wheels; \
    else \
      export PIP_INDEX_URL="$TORCH_INDEX_URL"; \
    fi \
 && pip-with-cacert install --no-deps "torch==${TORCH_VERSION}" \
 && pip check
# Only the sources `model` imports, not the installed project: editing the server must not retrain the model.
WORKDIR /opt/resnet-serve
COPY core/ core/
COPY model/ model/
ENV PYTHONPATH=/opt/resnet-serve
RUN install -d -o 10001 -g 10001 /models
USER 10001:10001
# fp32 for CPUs; fp16 for the GPU (docker-compose.yml, deploy/k8s/overlays/gpu). Checkpoints stay in this stage.
ARG MODEL_PRECISION=fp32
RUN python -m model build --precision "$MODEL_PRECISION" --out /models/model.onnx
CMD ["python", "-m", "model", "build", "--out", "/models/model.onnx"]

# What serving needs of the builder, and nothing else: a copy of this image's /models is all a fresh volume
# (compose) or an init container (Kubernetes) gets. The command copies the file into a volume at /target,
# beside-then-rename, so a reader sees the old file or the new one, never half of one.
FROM ${BASE_IMAGE} AS model
COPY --from=builder --chown=10001:10001 /models/model.onnx /models/model.onnx
RUN install -d -o 10001 -g 10001 /target
USER 10001:10001
CMD ["sh", "-c", "cp /models/model.onnx /target/.model.onnx.tmp && mv -f /target/.model.onnx.tmp /target/model.onnx"]

FROM python AS cpu
COPY --from=deps-cpu /opt/venv /opt/venv
RUN --mount=type=bind,from=dist,source=/dist,target=/dist \
    pip install --no-cache-dir --no-deps --no-index /dist/*.whl
COPY docker/healthcheck.py /usr/local/bin/healthcheck.py
# auto's timings (docs/backends.md, the tuning cache), the server's own: a volume mounted here (compose's
# `tuning`) starts with this ownership and lets replicas share them.
RUN install -d -o 10001 -g 10001 /var/cache/resnet-serve
ENV RESNET_SERVE_HOST=0.0.0.0 \
    RESNET_SERVE_PORT=8000 \
    RESNET_SERVE_MODEL_PATH=/models/model.onnx \
    RESNET_SERVE_TUNING_CACHE_DIR=/var/cache/resnet-serve
USER 10001:10001
WORKDIR /home/resnet
EXPOSE 8000 8001
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "/usr/local/bin/healthcheck.py", "/healthz"]
CMD ["python", "-m", "app"]

FROM python AS gpu
COPY --from=deps-gpu /opt/venv /opt/venv
RUN --mount=type=bind,from=dist,source=/dist,target=/dist \
    pip install --no-cache-dir --no-deps --no-index /dist/*.whl
COPY docker/healthcheck.py /usr/local/bin/healthcheck.py
# The NVIDIA container runtime mounts the driver (libcuda.so.1); CUDA and cuDNN are the pip wheels under
# site-packages/nvidia, which the dynamic loader does not search by itself.
ENV LD_LIBRARY_PATH=/opt/venv/lib/python3.11/site-packages/nvidia/cu13/lib:/opt/venv/lib/python3.11/site-packages/nvidia/cudnn/lib
# Fail here rather than at the first start on a GPU host: every library of the CUDA provider except the
# driver's must resolve, and cuDNN (loaded on demand) must load.
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN ! ldd /opt/venv/lib/python3.11/site-packages/onnxruntime/capi/libonnxruntime_providers_cuda.so \
      | grep "not found" | grep -v "libcuda.so.1" \
 && python -c "import ctypes; ctypes.CDLL('libcudnn.so.9')"
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    RESNET_SERVE_HOST=0.0.0.0 \
    RESNET_SERVE_PORT=8000 \
    RESNET_SERVE_MODEL_PATH=/models/model.onnx
USER 10001:10001
WORKDIR /home/resnet
EXPOSE 8000 8001
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
  CMD ["python", "/usr/local/bin/healthcheck.py", "/healthz"]
CMD ["python", "-m", "app"]
