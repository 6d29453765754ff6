#!/usr/bin/env bash
# The project's one GPU check, for a lent GPU machine (no network; python3 there holds torch + CUDA).
#
# Run from the repository root (`make bench-gpu` in the project's venv; on a machine without network,
# with the wheels of .whl/ carried along and $OUT set):
#     bash bench/gpu_check.sh
# Steps, most valuable first, each under its own timeout and all inside GPU_CHECK_BUDGET seconds (420):
#   0. install the carried wheels into /tmp/site; versions, GPU; full-size models start building in the background
#   a. tests/test_gpu.py: the engine's CUDA paths in float16 on tiny models (pytest)
#   b. bench/bench_generate.py: portrait seconds per image, it/s, peak memory (full-size SD1.5, 512 px, 25 steps)
#   c. bench/bench_lora_switch.py: user LoRA switch vs full reload, with a 25-step 512 px check image
#   g. bench/bench_fast.py: a portrait at 25 steps vs fast mode (LCM, 6 steps), full-size SD1.5 at 512 px
#   d. bench/bench_train_step.py: one LoRA training step, float16 + autocast + gradient checkpointing
#   f. bench/bench_talk.py: a 10-second talking head, fast mode on the CPU and the animated mode
#      (full-size audio-to-pose network) on CUDA; target under 30 s
#   e. bench/bench_tryon.py: a try-on job (full-size SD1.5 inpainting + 2 ControlNets, 512 px, 30 steps);
#      its models build in the background from step b on
#   g. bench/bench_train_sdxl.py: an SDXL LoRA step against an SD1.5 step (tiny layouts, float16), as a ratio
#   h. bench/bench_enhance.py: Enhance x2 and x4 of a 1024 px portrait (tiny ONNX models; onnxruntime's CUDA
#      provider when the wheels carry it)
# Everything goes to $OUT/gpu_check.log (the model build's own output to $OUT/build.log).
# GPU_CHECK_DRY=1 rehearses the script here on the CPU: tiny models, no wheels, no nvidia-smi.
set -uo pipefail

OUT=${OUT:-/tmp/gpu_check_out}
MODELS=${GPU_CHECK_MODELS:-/tmp/models}
BUDGET=${GPU_CHECK_BUDGET:-450}
mkdir -p "$OUT" "$MODELS"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 \
    TOKENIZERS_PARALLELISM=false
DEADLINE=$((SECONDS + BUDGET))
DEVICE=cuda TINY=() GEN=(--steps 25 --size 512)
if [[ ${GPU_CHECK_DRY:-0} == 1 ]]; then
    DEVICE=cpu TINY=(--tiny) GEN=()
    export FACECHAIN_TEST_DEVICE=cpu
fi
SUMMARY=()

# run_step NAME CAP_SECONDS COMMAND...: run under min(CAP, time left), record its exit status and time.
run_step() {
    local name=$1 cap=$2 left started rc
    shift 2
    left=$((DEADLINE - SECONDS))
    if ((left < 20)); then
        echo "=== $name: SKIPPED, ${left}s of the budget left"
        SUMMARY+=("$name: skipped (budget)")
        return
    fi
    ((cap > left)) && cap=$left
    echo
    echo "=== $name (timeout ${cap}s): $*"
    started=$SECONDS
    timeout -k 10 "$cap" "$@"
    rc=$?
    ((rc == 124 || rc == 137)) && printf "\n=== %s: TIMED OUT after %ss\n" "$name" "$cap"
    SUMMARY+=("$name: rc=$rc in $((SECONDS - started))s")
}

main() {
    echo "=== gpu_check $(date -u +%FT%TZ) in $PWD, budget ${BUDGET}s"
    if [[ $DEVICE == cuda ]]; then
        nvidia-smi -L
        nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm --format=csv
        if compgen -G ".whl/*.whl" >/dev/null; then  # a machine without network: the carried wheels
            started=$SECONDS
            python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
                .whl/*.whl || { echo "=== wheel install FAILED"; return 1; }
            export PYTHONPATH=/tmp/site:$PWD
            echo "=== wheels installed in $((SECONDS - started))s: $(ls .whl | tr '\n' ' ')"
        else  # the project's own environment (make bench-gpu)
            export PYTHONPATH=$PWD
        fi
    else
        export PYTHONPATH=$PWD
    fi
    python3 - <<'EOF' || { echo "=== imports FAILED"; return 1; }
import sys
import diffusers, huggingface_hub, onnxruntime, peft, pydantic, torch, transformers
print("python", sys.version.split()[0], "| torch", torch.__version__, "cuda", torch.version.cuda,
      "| diffusers", diffusers.__version__, "| transformers", transformers.__version__,
      "| huggingface_hub", huggingface_hub.__version__, "| peft", peft.__version__, "| pydantic", pydantic.__version__)
print("diffusers from", diffusers.__file__)
print("onnxruntime", onnxruntime.__version__, onnxruntime.get_available_providers())
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "-"
print("cuda available:", torch.cuda.is_available(), "|", gpu, "| cpu threads", torch.get_num_threads())
import facechain_core.portrait, facechain_core.train_lora, facechain_core.tryon, facechain_core.styles  # noqa: E401
import facechain_core.enhance, facechain_core.train_lora_sdxl  # noqa: E401
EOF

    # The full-size models (CPU work) build while the tests use the GPU; step b waits for them.
    echo "=== building the benches' models into $MODELS (background, $OUT/build.log)"
    OMP_NUM_THREADS=12 timeout -k 10 300 python3 -c "
import sys, torch
from pathlib import Path
sys.path.insert(0, 'bench')
torch.set_num_threads(min(12, torch.get_num_threads()))
from bench_lora_switch import build_models
build_models(Path('$MODELS'), tiny=bool(${#TINY[@]}), lora_rank=4)
" >"$OUT/build.log" 2>&1 &
    build_pid=$!

    # Four CPU threads for the tests' tiny-model building, twelve for the background build.
    run_step "a tests/test_gpu.py" 150 env OMP_NUM_THREADS=4 python3 -m pytest -q -rs --noconftest \
        -o filterwarnings= -p no:cacheprovider --durations=8 tests/test_gpu.py

    started=$SECONDS
    wait "$build_pid"
    rc=$?
    echo "=== model build: rc=$rc, waited $((SECONDS - started))s more after the tests"
    tail -n 5 "$OUT/build.log"
    SUMMARY+=("model build: rc=$rc")
    # The try-on's full-size models build on 8 CPU threads while b-d time the GPU.
    OMP_NUM_THREADS=8 timeout -k 10 240 python3 -c "
import sys, torch
sys.path.insert(0, 'bench')
torch.set_num_threads(8)
from pathlib import Path
from bench_tryon import build_models
build_models(Path('$MODELS/tryon'), tiny=bool(${#TINY[@]}))
" >"$OUT/build_tryon.log" 2>&1 &
    tryon_pid=$!

    run_step "b bench_generate" 150 python3 bench/bench_generate.py --device "$DEVICE" --models "$MODELS" --runs 3 \
        "${TINY[@]}"
    run_step "c bench_lora_switch" 120 python3 bench/bench_lora_switch.py --device "$DEVICE" --models "$MODELS" \
        "${GEN[@]}" "${TINY[@]}"
    run_step "g bench_fast" 90 python3 bench/bench_fast.py --device "$DEVICE" --models "$MODELS" --runs 3 \
        "${TINY[@]}"
    run_step "d bench_train_step" 100 python3 bench/bench_train_step.py --device "$DEVICE" --dtype float16 \
        --model-dir "$MODELS/sd15" --steps 5 "${TINY[@]}"
    wait "$tryon_pid"
    echo "=== try-on model build: rc=$?"
    tail -n 3 "$OUT/build_tryon.log"
    run_step "e bench_tryon" 120 python3 bench/bench_tryon.py --device "$DEVICE" --models "$MODELS/tryon" \
        --runs 2 "${TINY[@]}"
    run_step "f bench_talk" 120 python3 bench/bench_talk.py
    run_step "g bench_train_sdxl" 60 python3 bench/bench_train_sdxl.py --device "$DEVICE" --dtype float16 \
        --resolution 64
    run_step "h bench_enhance" 60 python3 bench/bench_enhance.py --device "$DEVICE" --side 1024 --runs 2

    echo
    [[ $DEVICE == cuda ]] && nvidia-smi --query-gpu=memory.used,clocks.sm --format=csv
    echo "=== summary (${SECONDS}s in all)"
    printf '  %s\n' "${SUMMARY[@]}"
}

main 2>&1 | tee "$OUT/gpu_check.log"
