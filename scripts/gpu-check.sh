#!/usr/bin/env bash
# One prepared GPU session (docs/performance.md): environment, `dwf bench` at the paper's sizes
# in the variants that decide the GPU defaults, real training throughput, and the CUDA tests
# (determinism, batched experts, bf16, CUDA graphs). Needs torch, typer, tqdm, pyyaml, scipy,
# scikit-learn and pytest; results go to $OUT (default /tmp/dwf-gpu). About 4 minutes on an H200; ALL=1 adds
# the variants behind the defaults (about 3 more).
set -uo pipefail
export PYTHONPATH="$PWD/src" PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/dwf-gpu}
mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())"
} 2>&1 | tee "$OUT/env.txt"
bench() {  # bench NAME [dwf bench options...]
  local name=$1; shift
  timeout 150 python3 -m dwf bench --device cuda --repeats 3 --out "$OUT/bench-$name.json" "$@" 2>&1 \
    | grep -v Warning | tee "$OUT/bench-$name.txt"
}
timeout 150 python3 -m pytest tests/test_gpu.py -m gpu -q -p no:cacheprovider 2>&1 | tee "$OUT/gpu-tests.txt"
bench bf16 --precision bf16                    # training's bf16 defaults (NHWC, grouped), with the reference
timeout 120 python3 scripts/fit-throughput.py --precision bf16 --batches 80 --concurrent 4 2>&1 | tee "$OUT/fit.txt"
bench fp32 --no-reference                      # training's fp32 defaults (NCHW, expert loop)
if [ "${ALL:-0}" = 1 ]; then  # the variants that chose those defaults (docs/performance.md)
  bench bf16-loop --precision bf16 --loop --no-reference
  bench bf16-grouped-nchw --precision bf16 --batched --contiguous --no-reference
  bench fp32-grouped-nhwc --batched --channels-last --no-reference
  bench bf16-autotuned --precision bf16 --no-deterministic --no-reference
fi
