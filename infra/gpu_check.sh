#!/usr/bin/env bash
# The GPU checks in one script (a lent GPU machine's minutes are few): run from the repository root on a machine
# with a CUDA GPU and a python3 that has torch (and pytest). Writes logs under ${OUT:-gpu-check}/.
#
#   bash infra/gpu_check.sh            # attention tests on CUDA, TFLOP/s, reversible-vs-plain memory on the GPU
#
# 1. tests/shared/test_attention_cuda.py and tests/shared/test_attention.py: shared.attention on the GPU in fp16
#    and bf16 against the reference (empty inputs, no real key, head dims 193-256 with dropout, > 65,535
#    sequences, the double backward, deterministic gradients, grouped-query attention), then the CPU suite.
# 2. python -m pipelines.benchmarks.attention_gpu: TFLOP/s at B=8, H=16, L=4096, D=128, bf16, causal and not,
#    beside SDPA's flash kernel in the same run.
# 3. python -m pipelines.benchmarks.segmentation --device cuda: peak memory of the reversible vs the plain
#    network with torch.cuda.max_memory_allocated (needs monai; skipped when it does not import).
# Whether flash-attn was installed is printed first: without it, every check measures SDPA's CUDA kernels.
set -u -o pipefail
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$(pwd)
status=0
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
$PY - <<'EOF' | tee -a "$OUT/gpu.txt"
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(),
      "sm_%d%d" % torch.cuda.get_device_capability())
try:
    import flash_attn
    print("flash-attn", flash_attn.__version__)
except Exception as error:  # noqa: BLE001
    print("flash-attn not importable:", error)
EOF
timeout 240 $PY -m pytest -q -p no:cacheprovider tests/shared/test_attention_cuda.py tests/shared/test_attention.py \
    2>&1 | tee "$OUT/attention_tests.txt" || status=1
timeout 180 $PY -m pipelines.benchmarks.attention_gpu --json 2>&1 | tee "$OUT/attention_gpu.txt" || status=1
if $PY -c "import monai" 2>/dev/null; then
    timeout 180 $PY -m pipelines.benchmarks.segmentation --device cuda 2>&1 | tee "$OUT/segmentation_memory.txt" \
        || status=1
else
    echo "monai is not installed here: the segmentation memory check was skipped" | tee "$OUT/segmentation_memory.txt"
fi
exit $status
