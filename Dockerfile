# CUDA image for the paper's pipeline (docs/usage.md, "Docker"). Build and run:
#   docker build -t dwf:0.1.0 .
#   docker run --gpus all --rm -v "$PWD":/workspace/dwf dwf:0.1.0          # dvc repro
# The repository is mounted at /workspace/dwf so DVC sees its git history, params and cache;
# the package is installed editable from that path, so the mounted source is what runs.
#
# One stack: a plain CPython base with no torch of its own; torch 2.14.1 and its CUDA 13.0
# libraries (the nvidia-* wheels) come from requirements.lock alone, the driver from the host.
# Base: python:3.11-slim-bookworm (Python 3.11.16, Debian 12, setuptools 79.0.1 and wheel 0.46.3),
# pinned by the digest of its linux/amd64 image (the lock is resolved for x86_64), built
# 2026-08-25. Digest source: docker-library/repo-info, repos/python/remote/3.11-slim-bookworm.md
# (the same amd64 digest at its commits 33a22f41 and bc9bbb47). Pinned 2026-12-06.
FROM python:3.11-slim-bookworm@sha256:2fc9207f64226cb05ac317cee0bab6fa55a9ea311ce5a086baddd4b4a83c2d3c

# determinism: cuBLAS needs its workspace fixed before the first call (dwf.runtime)
ENV CUBLAS_WORKSPACE_CONFIG=:4096:8 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# git: DVC reads the repository's history (metrics diff, experiments). The mounted checkout is
# trusted for every UID (system config), so `docker run --user "$(id -u):$(id -g)"` works too.
# DL3008 (apt versions unpinned): bookworm's security updates of git are welcome; the base's
# digest fixes the distribution, and git only reads the repository.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends git \
    && rm -rf /var/lib/apt/lists/* \
    && git config --system --add safe.directory /workspace/dwf

WORKDIR /workspace/dwf
COPY requirements.lock pyproject.toml README.md ./
COPY src ./src
# Every package from the lock, each file checked against its sha256 and nothing resolved beyond
# it. No build isolation, so pip fetches no unhashed build tools: the lock's two sdists
# (antlr4-python3-runtime, connection-pool) build with the base's setuptools, dwf with the lock's.
# pip check: the lock is the whole dependency closure.
RUN pip install --require-hashes --no-deps --no-build-isolation -r requirements.lock \
    && pip install --no-deps --no-build-isolation -e . \
    && pip check

RUN useradd --create-home --uid 1000 dwf \
    && chown -R dwf /workspace
USER 1000

CMD ["dvc", "repro"]
