#!/usr/bin/env bash
# Issue 19's GPU check, in one call on an NVIDIA machine, from the repository root:
#
#     OUT=/some/dir bash scripts/cuda_check.sh
#
# with wheels for what the machine lacks in .whl/ (transformers 5.23 for the reference side).
# Steps, each under its own time limit so that one hang cannot eat the rest (about 6 minutes
# in all on an H200): versions; a small-size bench (2 layers, loaded from a checkpoint written to
# disk) so a failure shows early; the tests marked `cuda`; the full-size bench (28 layers, 32 vision blocks, 58.8 GB of random bf16
# weights built on the GPU by each side in turn), which writes RESULTS-cuda.md and
# results-cuda.json into $OUT. Everything printed also goes to $OUT/log.
set -u -o pipefail
OUT=${OUT:-/tmp/ernie-cuda-check}
mkdir -p "$OUT/smoke"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

step() {  # step NAME SECONDS COMMAND...: run with a limit, report its status, never stop the script
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit} s) at $(date -u +%T)"
    timeout -k 10 "$limit" "$@"
    echo "=== $name: exit status $? at $(date -u +%T)"
}

{
    if compgen -G ".whl/*.whl" >/dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
    else
        export PYTHONPATH=$PWD
    fi
    nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,driver_version --format=csv
    python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'triton', triton.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name(0))"
    # small size first, from a checkpoint on disk: load time and peak host RSS of shards -> GPU
    step smoke-bench 120 python3 benchmarks/bench.py --device cuda --init disk --layers 2 --vision-blocks 2 \
        --rounds 1 --repeats 1 --new-tokens 16 --prefill-tokens 128 --output-dir "$OUT/smoke"
    step cuda-tests 120 python3 -m pytest -m cuda -q -p no:cacheprovider -o addopts="" -rfE \
        --junitxml="$OUT/pytest-cuda.xml"
    step full-bench 330 python3 benchmarks/bench.py --device cuda --layers 28 --vision-blocks 32 --rounds 1 \
        --repeats 3 --output-dir "$OUT"
} 2>&1 | tee "$OUT/log"
