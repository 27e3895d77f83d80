#!/usr/bin/env bash
# The cuda backend's checks on a lent GPU machine (the `device` tool), in as few calls as possible.
# Each step is one `run` command from the repository root; $OUT is the folder that comes back.
#
#   first        part 0 + setup + tests + export + cuda_profile.py --graphs, in one call (~130 s warm)
#   ort-part N   carry .whl/ort-gpu/part.0N; appends it to /tmp/ort-gpu.whl (calls N=0..5 back to back:
#                the machine stays warm only ~30 s between calls; the onnxruntime-gpu wheel, 255 MB,
#                is over the 64 MiB a call carries)
#   setup        carry .whl; installs onnx-graphsurgeon (+ onnxruntime-gpu when assembled) and graphopt
#   tests        the GPU tests: kernels vs twins, ONNX node tests, fixtures, greedy tokens, CUDA graphs
#   export       exports the Qwen2-0.5B-shaped decoder with torch (in the image) and optimizes it for
#                cuda in fp32, int4 block 32 (both with fused attention, the default), and int4 with
#                attention split back (GRAPHOPT_CUDA_FUSED_ATTENTION=0) (/tmp/work, kept while warm)
#   smoke M      the cuda engine alone on one of them (no onnxruntime-gpu): decode, decode with CUDA graphs,
#                prefill
#   ort-int4     onnxruntime-gpu's own int4 (MatMulNBits, block 32) of the same model, decode and prefill
#   bench M      `graphopt bench --target cuda` (with and without --cuda-graphs) on one of them:
#                q05-cuda | q05-cuda-int4 | q05-cuda-split-int4
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
  first)
    # one call after a cold start (carry .whl/onnx_graphsurgeon-*.whl and .whl/ort-gpu/part.00): part 0,
    # setup, the export in the background while the GPU tests run, then where a decode step's time goes
    bash "$0" ort-part 0 >/dev/null
    bash "$0" setup 2>&1 | tail -1
    bash "$0" export > "$OUT/export.log" 2>&1 &
    ep=$!
    bash "$0" tests || echo "GPU tests failed: $OUT/tests.log"
    wait $ep || { tail -5 "$OUT/export.log"; exit 1; }
    for m in q05-cuda q05-cuda-int4; do
      PYTHONPATH=$SITE timeout 60 $PY benchmarks/cuda_profile.py /tmp/work/$m.onnx --graphs 2>&1 | tail -1
    done
    ;;
  ort-part)
    cat ".whl/ort-gpu/part.0$2" >> /tmp/ort-gpu.whl.part
    ls -la /tmp/ort-gpu.whl.part
    ;;
  setup)
    # onnxruntime-gpu only once all six parts have arrived (255 MB)
    mkdir -p "$SITE"
    $PY -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .whl/onnx_graphsurgeon-*.whl
    if [ "$(stat -c %s /tmp/ort-gpu.whl.part 2>/dev/null || echo 0)" -gt 250000000 ]; then
      cp /tmp/ort-gpu.whl.part /tmp/onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl
      $PY -m pip install -q --no-index --no-deps --no-compile --target "$SITE" \
        /tmp/onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl
    fi
    $PY -m pip install -q --no-index --no-deps --no-build-isolation -e . -e plugins/graphopt-cast-cleanup
    PYTHONPATH=$SITE $PY -c "import graphopt, cupy; print(graphopt.get_backend('cuda').available(), cupy.__version__)"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
    ;;
  tests)
    # all of them (no -x: one call should show every failure), 8 workers, a per-test time limit
    PYTHONPATH=$SITE timeout 360 $PY -m pytest -q -p no:cacheprovider -n 8 --timeout 240 --tb=short -rf \
      tests/backends/test_cuda_gpu.py tests/backends/test_cuda_backend.py 2>&1 | tee "$OUT/tests.log" | tail -40
    ;;
  smoke)
    # the cuda engine alone (no onnxruntime-gpu needed): decode with and without CUDA graphs, prefill
    W=/tmp/work
    m=${2:-q05-cuda-int4}
    export PYTHONPATH=$SITE
    export GRAPHOPT_CUDA_FUSED_ATTENTION=$([ "$m" = q05-cuda-split-int4 ] && echo 0 || echo 1)
    for spec in decode:false decode:true prefill:false; do
      payload="{\"model\": \"$W/$m.onnx\", \"engine\": \"cuda\", \"phase\": \"${spec%%:*}\", \"prefill\": 512,
        \"past\": 128, \"runs\": 20, \"warmup\": 3, \"batch\": 1, \"threads\": null,
        \"ort_accuracy_level\": null, \"graphs\": ${spec##*:}}"
      timeout 150 $PY -m graphopt._bench "$payload" 2>&1 | tail -3 | tee -a "$OUT/smoke-$m.txt" || true
    done
    ;;
  export)
    # the Qwen2-0.5B-shaped decoder (torch in the image), optimized for cuda: fp32, int4 b32 (fused
    # attention), int4 b32 with attention split back into primitives
    W=/tmp/work
    mkdir -p $W
    [ -f $W/qwen2-0.5b-decode.onnx ] || \
      $PY benchmarks/make_llama.py --preset qwen2-0.5b --out $W/qwen2-0.5b-decode.onnx 2>&1 | tail -2
    export PYTHONPATH=$SITE
    graphopt optimize $W/qwen2-0.5b-decode.onnx -o $W/q05-cuda.onnx --target cuda --report "$OUT/opt-fp32.json"
    graphopt optimize $W/qwen2-0.5b-decode.onnx -o $W/q05-cuda-int4.onnx --target cuda \
      --quant-bits 4 --quant-block 32 --report "$OUT/opt-int4.json"
    GRAPHOPT_CUDA_FUSED_ATTENTION=0 graphopt optimize $W/qwen2-0.5b-decode.onnx -o $W/q05-cuda-split-int4.onnx \
      --target cuda --quant-bits 4 --quant-block 32
    ls -la $W
    ;;
  bench)
    # one model per call (each bench is 4 processes): q05-cuda | q05-cuda-int4 | q05-cuda-split-int4
    W=/tmp/work
    m=${2:-q05-cuda-int4}
    export PYTHONPATH=$SITE
    export GRAPHOPT_CUDA_FUSED_ATTENTION=$([ "$m" = q05-cuda-split-int4 ] && echo 0 || echo 1)
    graphopt bench $W/$m.onnx --target cuda --prefill 512 --past 128 --runs 20 --warmup 3 \
      --json "$OUT/bench-$m.json" | tee "$OUT/bench-$m.txt"
    graphopt bench $W/$m.onnx --target cuda --cuda-graphs --prefill 512 --past 128 --runs 20 --warmup 3 \
      --json "$OUT/bench-$m-graphs.json" | tee "$OUT/bench-$m-graphs.txt"
    ;;
  ort-int4)
    # onnxruntime-gpu cannot run an int4 block-wise DequantizeLinear on its CUDA execution provider
    # ("Unsupported quantization type"), so its int4 peer is its own format: the same fp32 model through
    # onnxruntime's MatMulNBitsQuantizer (4 bits, block 32, symmetric), run by the bench worker
    W=/tmp/work
    export PYTHONPATH=$SITE
    [ -f $W/q05-ort-int4.onnx ] || $PY -c "
import onnx, sys
from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
q = MatMulNBitsQuantizer(onnx.load('$W/qwen2-0.5b-decode.onnx'), bits=4, block_size=32, is_symmetric=True,
                         accuracy_level=0)
q.process()
q.model.save_model_to_file('$W/q05-ort-int4.onnx', True)
print('MatMulNBits nodes:', sum(n.op_type == 'MatMulNBits' for n in q.model.model.graph.node))"
    for phase in decode prefill; do
      payload="{\"model\": \"$W/q05-ort-int4.onnx\", \"engine\": \"onnxruntime-cuda\", \"phase\": \"$phase\",
        \"prefill\": 512, \"past\": 128, \"runs\": 20, \"warmup\": 3, \"batch\": 1, \"threads\": null,
        \"ort_accuracy_level\": null, \"graphs\": false}"
      timeout 200 $PY -m graphopt._bench "$payload" 2>&1 | tail -2 | tee -a "$OUT/ort-int4.txt"
    done
    ;;
  *)
    sed -n '2,20p' "$0"
    exit 2
    ;;
esac
