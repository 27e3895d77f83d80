#!/usr/bin/env bash
# The cuda backend's checks on a lent GPU machine (the `device` tool), in as few calls as possible.
# Each step is one `run` command from the repository root; $OUT is the folder that comes back.
#
#   ort-part N   carry .whl/ort-gpu/part.0N; appends it to /tmp/ort-gpu.whl (calls N=0..5 back to back:
#                the machine stays warm only ~30 s between calls; the onnxruntime-gpu wheel, 255 MB,
#                is over the 64 MiB a call carries)
#   setup        carry .whl; installs onnx-graphsurgeon (+ onnxruntime-gpu when assembled) and graphopt
#   tests        the GPU tests: kernels vs twins, ONNX node tests, fixtures, greedy tokens, CUDA graphs
#   export       exports the Qwen2-0.5B-shaped decoder with torch (in the image) and optimizes it for
#                cuda in fp32, int4 block 32, and int4 with fused attention (/tmp/work, kept while warm)
#   bench M      `graphopt bench --target cuda` (with and without --cuda-graphs) on one of them:
#                q05-cuda | q05-cuda-int4 | q05-cuda-fa-int4
#
# Preparing .whl here (once; git-ignored through .git/info/exclude):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 -d /tmp/whl onnx-graphsurgeon==0.6.1 onnxruntime-gpu==1.31.1
#   mkdir -p .whl/ort-gpu && cp /tmp/whl/onnx_graphsurgeon-*.whl .whl/ && \
#       (cd .whl/ort-gpu && split -b 45M -d /tmp/whl/onnxruntime_gpu-*.whl part.)
set -euo pipefail
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
SITE=/tmp/site
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"

case "${1:-}" in
  ort-part)
    cat ".whl/ort-gpu/part.0$2" >> /tmp/ort-gpu.whl.part
    ls -la /tmp/ort-gpu.whl.part
    ;;
  setup)
    mkdir -p "$SITE"
    $PY -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .whl/onnx_graphsurgeon-*.whl
    if [ -f /tmp/ort-gpu.whl.part ]; then
      cp /tmp/ort-gpu.whl.part /tmp/onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl
      $PY -m pip install -q --no-index --no-deps --no-compile --target "$SITE" \
        /tmp/onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl
    fi
    $PY -m pip install -q --no-index --no-deps --no-build-isolation -e . -e plugins/graphopt-cast-cleanup
    PYTHONPATH=$SITE $PY -c "import graphopt, cupy; print(graphopt.get_backend('cuda').available(), cupy.__version__)"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
    ;;
  tests)
    PYTHONPATH=$SITE $PY -m pytest -q -p no:cacheprovider tests/backends/test_cuda_gpu.py \
      tests/backends/test_cuda_backend.py -x 2>&1 | tee "$OUT/tests.log" | tail -30
    ;;
  export)
    # the Qwen2-0.5B-shaped decoder (torch in the image), optimized for cuda: fp32, int4 b32, int4 b32 with
    # the device Attention/RotaryEmbedding declared (GPU_UNVERIFIED in backends/cuda.py)
    W=/tmp/work
    mkdir -p $W
    [ -f $W/qwen2-0.5b-decode.onnx ] || \
      $PY benchmarks/make_llama.py --preset qwen2-0.5b --out $W/qwen2-0.5b-decode.onnx 2>&1 | tail -2
    export PYTHONPATH=$SITE
    graphopt optimize $W/qwen2-0.5b-decode.onnx -o $W/q05-cuda.onnx --target cuda --report "$OUT/opt-fp32.json"
    graphopt optimize $W/qwen2-0.5b-decode.onnx -o $W/q05-cuda-int4.onnx --target cuda \
      --quant-bits 4 --quant-block 32 --report "$OUT/opt-int4.json"
    GRAPHOPT_CUDA_FUSED_ATTENTION=1 graphopt optimize $W/qwen2-0.5b-decode.onnx -o $W/q05-cuda-fa-int4.onnx \
      --target cuda --quant-bits 4 --quant-block 32
    ls -la $W
    ;;
  bench)
    # one model per call (each bench is 4 processes): q05-cuda | q05-cuda-int4 | q05-cuda-fa-int4
    W=/tmp/work
    m=${2:-q05-cuda-int4}
    export PYTHONPATH=$SITE
    export GRAPHOPT_CUDA_FUSED_ATTENTION=$([ "$m" = q05-cuda-fa-int4 ] && echo 1 || echo 0)
    graphopt bench $W/$m.onnx --target cuda --prefill 512 --past 128 --runs 20 --warmup 3 \
      --json "$OUT/bench-$m.json" | tee "$OUT/bench-$m.txt"
    graphopt bench $W/$m.onnx --target cuda --cuda-graphs --prefill 512 --past 128 --runs 20 --warmup 3 \
      --json "$OUT/bench-$m-graphs.json" | tee "$OUT/bench-$m-graphs.txt"
    ;;
  *)
    sed -n '2,20p' "$0"
    exit 2
    ;;
esac
