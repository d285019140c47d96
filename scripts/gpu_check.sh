#!/usr/bin/env bash
# The GPU acceptance in one call on a lent H100/H200 (the device tool, /work/.library/device/README.md),
# at most 8 minutes; everything goes to stdout as markdown ready for docs/benchmarks.md, and with
# $OUT set (the device tool sets it) each step's output is also saved there. Steps:
#   1. the config matrix for real: every configs/*.yaml x {CUDA, CPU} x {fp32, bf16} built as a run
#      builds it (TE spec where TE imports), fusions megatron accepts, the checkpoint-format
#      contract (with the real TE spec where TE imports)   tests/model/test_capabilities.py,
#                                                           tests/model/test_checkpoint_format.py
#   2. the memory-layer tests (CPU tensors, the image's torch), and the Triton kernels' tests
#      compiled for this GPU (kernel vs torch reference, the layer with kernel=triton)
#                                                                  tests/memory, tests/kernels
#   3. 20 bf16 steps of every family, with Transformer Engine when it imports and with megatron's
#      local layers; the UltraMem checkpoint exported to HF and loaded in transformers, logits
#      compared with megatron's                                   scripts/gpu_train_check.py
#   4. the kernels against their torch references at the 151M recipe's shapes: time, ratio,
#      achieved DRAM bandwidth (% of peak), max error             scripts/bench_kernels.py
#   5. the layer benchmark on cuda in bf16: UltraMem (Triton kernels, and torch ops side by side)
#      vs PKM vs MoE vs dense, forward (decode) and fwd+bwd       scripts/bench_layer.py
#
# Environment decision. The device machine reaches no package registry, so `pip install` from
# PyPI is impossible there. Its plain python3 is Python 3.12 with a CUDA torch, transformers,
# tokenizers and safetensors (seen: Python 3.12.3, torch 2.11.0+cu130, transformers 5.17), while
# our .venv is Python 3.11 with a CPU torch, so carrying .venv is useless. So: use the machine's
# python3 and torch, put the repo on PYTHONPATH (no `pip install -e .`), and carry the one
# dependency the image lacks, megatron-core, as a cp312 wheel of the production line (0.19.x).
# The wheel is fetched here, once per checkout:
#
#   scripts/gpu_check.sh --fetch-wheels      # on the CPU machine: .whl/ (ignored via info/exclude)
#
# then the device call is (timeout_s 540, carry [".whl"]):
#
#   set -o pipefail; bash scripts/gpu_check.sh 2>&1 | tee $OUT/gpu_check.log
#
# Steps run with their own timeouts (worst case under 8 minutes, typically 3 to 4) and the run goes
# on when one fails; a summary of exit codes comes last, and the exit status is 1 if any step
# failed. Nothing here changes the GPU's settings or resets it: nvidia-smi is only queried.
# PYTHON (default python3), TOKENS, STEPS, MCORE_VERSION and DEVICE_PYTHON_VERSION can be overridden.

set -u -o pipefail
cd "$(dirname "$0")/.."

MCORE_VERSION=${MCORE_VERSION:-0.19.2}   # the production line (make test-prod runs it on CPU)
DEVICE_PYTHON_VERSION=${DEVICE_PYTHON_VERSION:-3.12}
TOKENS=${TOKENS:-1,16,64,256,1024,4096}
STEPS=${STEPS:-20}
SITE=/tmp/site

if [ "${1:-}" = "--fetch-wheels" ]; then
    exclude=$(git rev-parse --git-path info/exclude)
    mkdir -p "$(dirname "$exclude")"
    grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"
    pip=python3; [ -x .venv/bin/python ] && pip=.venv/bin/python
    exec "$pip" -m pip download --no-deps --only-binary=:all: \
        --python-version "$DEVICE_PYTHON_VERSION" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
        -d .whl "megatron-core==$MCORE_VERSION"
fi

export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
PY=${PYTHON:-python3}   # the image's python3, the one with the CUDA torch
declare -a SUMMARY=()
status=0

# step NAME SECONDS FILE COMMAND...: run COMMAND with a timeout under a banner, copy its output
# to $OUT/FILE too when the device tool's $OUT is set (FILE "-": don't), record the exit code.
step() {
    local name=$1 limit=$2 file=$3 rc start=$SECONDS
    shift 3
    echo
    echo "===== $name (timeout ${limit}s) ====="
    if [ "$file" != - ] && [ -n "${OUT:-}" ]; then
        timeout -k 10 "$limit" "$@" 2>&1 | tee "$OUT/$file"
    else
        timeout -k 10 "$limit" "$@" 2>&1
    fi
    rc=${PIPESTATUS[0]}
    case $rc in 0) ;; 124|137) echo "!! $name: timed out after ${limit}s"; status=1 ;; *) status=1 ;; esac
    SUMMARY+=("$name: rc=$rc, $((SECONDS - start)) s")
}

echo "===== machine ====="
date -u '+date: %Y-%m-%d %H:%M:%S UTC'
echo "kernel: $(uname -r), $(nproc) CPUs"
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,utilization.gpu,clocks.sm,clocks.max.sm \
    --format=csv || nvidia-smi || echo "nvidia-smi failed"
echo "python: $(command -v "$PY"), $($PY --version 2>&1)"

echo
echo "===== environment ====="
if compgen -G ".whl/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" .whl/*.whl || { echo "!! wheel install failed"; exit 1; }
    echo "installed into $SITE: $(cd .whl && ls *.whl | tr '\n' ' ')"
else
    echo "no .whl/ carried: relying on the image's own megatron-core"
fi
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
$PY - <<'EOF' || { echo "!! environment check failed: see above"; exit 1; }
import warnings
warnings.filterwarnings("ignore")
import torch, megatron.core, ultramem_megatron
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuda available "
      f"{torch.cuda.is_available()}")
print(f"megatron-core {megatron.core.__version__} from {megatron.core.__file__}")
assert torch.cuda.is_available(), "torch sees no GPU"
print(f"GPU: {torch.cuda.get_device_name()}, "
      f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.1f} GiB, "
      f"capability {torch.cuda.get_device_capability()}")
EOF

step "config matrix and checkpoint format" 60 config_matrix.log \
    $PY -m pytest -q -p no:cacheprovider tests/model/test_capabilities.py \
    tests/model/test_checkpoint_format.py
step "pytest tests/memory (CPU tensors) and tests/kernels (compiled Triton)" 75 kernel_tests.log \
    $PY -m pytest -q -p no:cacheprovider -m "not slow" tests/memory tests/kernels
step "bf16 training, every family; HF export parity" 180 gpu_train.md \
    $PY scripts/gpu_train_check.py --out /tmp/gpu_train --steps "$STEPS"
step "bench_kernels cuda bf16 (151M shapes)" 60 bench_kernels.md \
    $PY scripts/bench_kernels.py --device cuda --dtype bf16 --repeats 10
step "bench_layer cuda bf16" 80 bench_cuda_bf16.md \
    $PY scripts/bench_layer.py --device cuda --dtype bf16 --tokens "$TOKENS" --repeats 10

echo
echo "===== after ====="
nvidia-smi --query-gpu=memory.used,utilization.gpu,clocks.sm,temperature.gpu --format=csv || true
echo
echo "===== summary ====="
printf '%s\n' "${SUMMARY[@]}"
exit "$status"
