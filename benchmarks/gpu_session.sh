#!/usr/bin/env bash
# The project's GPU checks, for a lent GPU machine (the `device` tool), in two calls of under ten
# minutes each, from the repository root:
#
#   bash benchmarks/gpu_session.sh tests   # CUDA tests: the torch engine's parity, the static
#                                          # cache and CUDA graphs, AOTI on CUDA (tiny models)
#   bash benchmarks/gpu_session.sh bench   # benchmarks/shortv_gpu.py with every row: small-llava,
#                                          # then llava-7b-shape (bf16, 626 tokens)
#   bash benchmarks/gpu_session.sh aoti    # the product path: `mllmc bench` of small-llava with
#                                          # and without ShortV, --target aoti --device cuda, bf16
#
# In that order of importance: one lease's 15 device minutes hold the first two comfortably.
#
# It uses the machine's own python3 and torch. mllmc is put on PYTHONPATH as it is laid out in
# the repository (no build step); Python wheels carried in .whl/ (for example the transformers
# this project pins, where the machine's differs) are installed first. Results and logs go to
# $OUT (the device tool's folder that comes back), or benchmarks/results/gpu.
set -uo pipefail

stage=${1:-}
out=${OUT:-benchmarks/results/gpu}
site=/tmp/mllmc-site
models=/tmp/mllmc-models
mkdir -p "$out" "$site/mllmc" "$models"
export PYTHONUNBUFFERED=1

if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl || exit 3
fi
for pkg in compiler passes runtime; do
    ln -sfn "$PWD/$pkg" "$site/mllmc/$pkg"
done
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"

python3 - <<'EOF' 2>&1 | tee "$out/env.txt"
import torch, transformers
import mllmc.compiler.core.capture  # noqa: F401  (the package imports from here)
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
print(f"{gpu}; torch {torch.__version__} (CUDA {torch.version.cuda}); transformers {transformers.__version__}")
EOF

case "$stage" in
tests)
    python3 -m pytest -q -rs -p no:cacheprovider -m gpu \
        tests/compiler/tools/test_torch_engine.py tests/compiler/backends/test_static_cache.py \
        tests/compiler/backends/test_aoti.py 2>&1 | tee "$out/gpu-tests.txt"
    ;;
bench)
    # small first: it is quick, and its numbers come back even if the 7B run is cut short
    python3 benchmarks/shortv_gpu.py --preset small-llava --model "$models/small-llava" \
        --cuda-graphs --decode --out "$out" --name shortv_gpu_small 2>&1 | tee "$out/bench-log.txt"
    timeout 420 python3 benchmarks/shortv_gpu.py --preset llava-7b-shape \
        --model "$models/llava-7b-shape" --cuda-graphs --decode --profile --sdpa-ab --out "$out" \
        --name shortv_gpu 2>&1 | tee -a "$out/bench-log.txt"
    ;;
aoti)
    [ -f "$models/small-llava/config.json" ] || python3 -c "from mllmc.compiler.data.presets \
import write_preset as w; w('small-llava', '$models/small-llava', device='cuda')"
    timeout 540 python3 -c "import sys; from mllmc.compiler.tools.cli import main; sys.exit(main())" \
        bench "$models/small-llava" --pass shortv --target aoti --device cuda --dtype bfloat16 \
        --repeats 10 -o "$out/bench_aoti_cuda.json" --force 2>&1 | tee "$out/aoti-log.txt"
    ;;
*)
    echo "usage: bash benchmarks/gpu_session.sh tests|bench|aoti" >&2
    exit 2
    ;;
esac
