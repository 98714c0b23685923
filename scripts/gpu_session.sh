#!/usr/bin/env bash
# Every GPU check in one call, for a machine lent for a few minutes (see the README, "GPU checks").
#
#   bash scripts/gpu_session.sh [OUT]      # OUT: where logs and JSON go (default $OUT, else ./gpu-out)
#
# Where the machine has no package index, put wheels of what its python3 lacks in .whl/ first
# (diffusers, optuna, pymoo, sqlalchemy, alembic and their pure-Python needs); they are installed to
# /tmp/site. Each part has its own time limit, so one slow part cannot eat the others' figures:
#   1. the CUDA-marked tests (study on CUDA, float16, the fast path bit for bit on CUDA, int8 kernels);
#   2. difftune bench runtime --device cuda: hooks' overhead, masks' realized ÷ FLOP-ideal, compile;
#   3. scripts/gpu_check.py: calibrate → export (held-out) → apply on the embedded model and a tiny SD;
#   4. scripts/profile_mask.py: where a 75 % mask's time goes on the compute-bound DiT (host syncs, launches).
# PARTS="tests check" runs only those parts.
set -u -o pipefail
out="${1:-${OUT:-gpu-out}}"
mkdir -p "$out"
export COLUMNS=220 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 DIFFTUNE_CACHE="${DIFFTUNE_CACHE:-/tmp/difftune-cache}"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
# editable, as in development: difftune.search etc. map onto the top-level folders (a plain copy on
# PYTHONPATH would be shadowed by ./difftune, which lacks them)
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, diffusers, optuna; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'diffusers', diffusers.__version__, 'optuna', optuna.__version__)" | tee -a "$out/gpu.txt"

status=0
parts=" ${PARTS:-tests bench check profile} "
if [[ $parts == *" tests "* ]]; then
  timeout "${TESTS_S:-150}" python3 -m pytest -q -p no:cacheprovider -m cuda tests/search/test_cuda.py \
    tests/search/test_settings.py tests/accel/test_quant.py tests/accel/test_cache_fast_path.py \
    tests/accel/test_step_tracker.py 2>&1 \
    | tee "$out/tests.log" || status=1
fi
if [[ $parts == *" bench "* ]]; then
  timeout "${BENCH_S:-240}" python3 -m difftune.cli bench runtime --device cuda --repeats "${REPEATS:-5}" 2>&1 \
    | tee "$out/bench.log" || status=1
fi
if [[ $parts == *" check "* ]]; then
  timeout "${CHECK_S:-180}" python3 scripts/gpu_check.py --json "$out/gpu_check.json" 2>&1 \
    | tee "$out/gpu_check.log" || status=1
fi
if [[ $parts == *" profile "* ]]; then
  timeout "${PROFILE_S:-90}" python3 scripts/profile_mask.py --device cuda 2>&1 | tee "$out/profile.log" || status=1
fi
exit $status
