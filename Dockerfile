# CUDA image for the paper's pipeline. Build and run (README):
#   docker build -t dwf:0.1.0 .
#   docker run --gpus all --rm -v "$PWD":/workspace/dwf dwf:0.1.0          # dvc repro
# The repository is mounted at /workspace/dwf so DVC sees its git history, params and cache;
# the package is installed editable from that path, so the mounted source is what runs.
FROM pytorch/pytorch:2.9.0-cuda13.0-cudnn9-runtime

# determinism: cuBLAS needs its workspace fixed before the first call (dwf.runtime)
ENV CUBLAS_WORKSPACE_CONFIG=:4096:8 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# git: DVC reads the repository's history (metrics diff, experiments)
RUN apt-get update \
    && apt-get install -y --no-install-recommends git \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /workspace/dwf
COPY requirements.lock pyproject.toml README.md ./
COPY src ./src
# exact versions from the lock file (torch 2.14.1 with its CUDA 13 wheels replaces the base's)
RUN pip install -c requirements.lock -e '.[pipeline]'

RUN useradd --create-home --uid 1000 dwf \
    && chown -R dwf /workspace
USER 1000
RUN git config --global --add safe.directory /workspace/dwf

CMD ["dvc", "repro"]
