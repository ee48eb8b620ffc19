#!/usr/bin/env bash
# One prepared GPU session (docs/performance.md): environment, `dwf bench` at the paper's sizes,
# and the CUDA tests (determinism, batched experts). Needs torch, typer, tqdm, pyyaml, scipy,
# scikit-learn and pytest; results go to $OUT (default /tmp/dwf-gpu).
set -uo pipefail
export PYTHONPATH="$PWD/src" PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/dwf-gpu}
mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())"
} 2>&1 | tee "$OUT/env.txt"
timeout 330 python3 -m dwf bench --device cuda --out "$OUT/bench.json" 2>&1 | tee "$OUT/bench.txt"
timeout 150 python3 -m pytest tests/test_gpu.py -m gpu -q -p no:cacheprovider 2>&1 | tee "$OUT/gpu-tests.txt"
