#!/bin/bash
# The GPU checks of the open GPU issue (22; and the GPU halves of 15 and 16) as one prepared run, for a
# session lent a device (15 minutes of device time in all: run this once, with a timeout that leaves room
# for one rerun, then give the machine back). Results go under OUT_DIR, one file a check.
#
#   tools/gpu_check.sh OUT_DIR           on the GPU machine: device tool `run` with
#                                        command "tools/gpu_check.sh \$OUT", carry [".whl"], timeout_s 540
#   tools/gpu_check.sh OUT_DIR --cpu     the rehearsal here, on the CPU, at toy sizes (run it first)
#
# The device image has torch, triton, transformers, xxhash and the rest, but not gguf: carry its wheel
# (`echo /.whl/ >> .git/info/exclude; python3 -m pip download --no-deps --only-binary=:all: \
#  --python-version 3.12 --implementation cp -d .whl gguf==0.17.1`). Nothing is installed: the checkout
# runs from PYTHONPATH. Each check has its own time limit, so one that hangs costs only its share.
set -u
OUT=${1:?usage: tools/gpu_check.sh OUT_DIR [--cpu]}
MODE=${2:-gpu}
mkdir -p "$OUT"
PY=${PY:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if [ -d .whl ] && ls .whl/*.whl > /dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
T="$PY -c 'import sys; from tessera.cli import main; sys.exit(main())'"
step() { local name=$1 limit=$2; shift 2; local t0=$SECONDS
  timeout "$limit" bash -c "$*" > "$OUT/$name.log" 2>&1; local rc=$?
  echo "$name rc=$rc $((SECONDS - t0))s" | tee -a "$OUT/summary.txt"; }

{ date -u; nvidia-smi 2>&1 | head -15; $PY -c "import torch, triton, transformers; print('torch', torch.__version__, \
'cuda', torch.cuda.is_available() and torch.cuda.get_device_name(), 'triton', triton.__version__, \
'transformers', transformers.__version__)"; } > "$OUT/device.txt" 2>&1

if [ "$MODE" = "--cpu" ]; then
  # the rehearsal: everything imports and the commands parse and run, at toy sizes on the CPU
  step collect_gpu_tests 300 "$PY -m pytest -q --collect-only -m gpu tests | tail -3"
  step throughput 600 "$T bench throughput --random-model qwen3-0.6b --device cpu --num-seqs 4 --input-len 16 32 \
    --output-len 8 16 --compare hf --json-out $OUT/throughput.json"
  step throughput_eager 300 "$T bench throughput --random-model qwen3-0.6b --device cpu --num-seqs 4 --input-len 16 32 \
    --output-len 8 16 --enforce-eager --json-out $OUT/throughput_eager.json"
  step kernels_import 60 "$PY -c 'import tessera.bench.attention_kernels, tessera.bench.bits_gpu'"
  exit 0
fi
# 1. the gpu-marked tests: kernels at GPU sizes, GPU vs CPU greedy in fp32, bf16 logits error
#    (tests/engine/test_cuda_graphs.py captures real graphs there)
step test_gpu 150 "$PY -m pytest -q -m gpu -x tests"
# 2. issue 22's workload: nano-vllm's bench (256 sequences, U[100,1024] in and out, bf16), tessera (with
#    CUDA graphs, the default) and transformers' generate_batch in one run; then tessera without graphs
step throughput 200 "$T bench throughput --random-model qwen3-0.6b --device cuda --compare hf --json-out $OUT/throughput.json"
step throughput_eager 120 "$T bench throughput --random-model qwen3-0.6b --device cuda --enforce-eager \
  --json-out $OUT/throughput_eager.json"
# 3. the attention kernels against SDPA (TFLOP/s, GB/s)
step kernels 50 "$PY -m tessera.bench.attention_kernels > $OUT/kernels.json"
