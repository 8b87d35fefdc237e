#!/usr/bin/env bash
# The GPU campaign. With no phase names: one call of at most 520 s of steps, most valuable first,
# each step cut at its own time cap and its results written as it finishes (a killed step keeps
# what it measured), at most 8 files under OUT_DIR:
#
#   bash benchmarks/gpu_campaign.sh OUT_DIR             # the one call (GPU)
#   bash benchmarks/gpu_campaign.sh OUT_DIR --dry-run   # the same steps on the CPU: interpreter,
#                                                       # tiny shapes (tested in tests/scripts/test_bench.py)
#   bash benchmarks/gpu_campaign.sh OUT_DIR PHASE ...   # the longer phases, for a second call
#
# Steps (cap in seconds; file under OUT_DIR):
#   versions  15  versions.txt   Python packages, nvidia-smi, the carried wheels' install
#   check    120  check.jsonl    cuda_check.py: every kernel against float64 at users' shapes
#   kernels   45  kernels.json   the token kernels' bandwidth against a device copy, 3 V
#   tests    150  pytest.log     the suite on CUDA (no compile tests: CI runs them), xdist
#   linear    40  linear.json    linear_epsilon_dpo_loss against its GEMMs and the 4-GEMM floor
#   bench    100  bench.json     bench_loss.py at one shape: eager, ours, TRL's fused head, Liger
#   train     50  train.jsonl    20 steps of train/run.py (bf16 mixed precision on CUDA)
# and campaign.log, every step's output. Phases for a second call (by name, ≤ 540 s each): tests-all,
# bench-1024, bench-2048, kernels-sweep, kernels-ncu, train-small, train-1b (benchmarks/RESULTS.md).
#
# Packages a bare GPU image lacks (TRL, datasets and two of its needs, Liger-Kernel) are installed
# from wheels in .whl/ into /tmp/site when present. The exit status is the number of failed steps.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT_DIR=${1:?usage: gpu_campaign.sh OUT_DIR [--dry-run | PHASE ...]}
shift
DRY=0
if [ "${1:-}" = "--dry-run" ]; then
    DRY=1
    shift
fi
PHASES=("$@")
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
PY=${PYTHON:-python3}
LOG="$OUT_DIR/campaign.log"
export PY OUT_DIR DRY LOG
# The one call's step caps, in seconds: their sum is the call's budget (a device command runs at
# most 600 s, and the machine's start and the transfers come on top).
declare -A CAP=([versions]=15 [check]=120 [kernels]=45 [tests]=150 [linear]=40 [bench]=100 [train]=50)
total_cap=0
for c in "${CAP[@]}"; do total_cap=$((total_cap + c)); done
if [ ${#PHASES[@]} -eq 0 ] && [ $total_cap -gt 520 ]; then
    echo "campaign: step caps add up to $total_cap s > 520" >&2
    exit 99
fi

# step NAME CAP COMMAND...: run COMMAND under its cap, its output to the log; a step that fails
# or runs out of time is reported and the next one still runs.
failed=0
step() {
    local name=$1 cap=$2
    shift 2
    echo "=== step $name (cap ${cap} s, $(date -u +%H:%M:%S))" | tee -a "$LOG"
    local start=$SECONDS
    # Functions run in a child bash (timeout runs programs); they and their variables are exported.
    timeout --kill-after=5 "$cap" bash -c '"$@"' step "$@" >>"$LOG" 2>&1
    local status=$?
    local took=$((SECONDS - start))
    if [ $status -eq 124 ] || [ $status -eq 137 ]; then
        echo "=== step $name CUT at its cap (${took} s)" | tee -a "$LOG"
        failed=$((failed + 1))
    elif [ $status -ne 0 ]; then
        echo "=== step $name FAILED ($status, ${took} s)" | tee -a "$LOG"
        failed=$((failed + 1))
    else
        echo "=== step $name ok (${took} s)" | tee -a "$LOG"
    fi
}

install_wheels() {
    if compgen -G ".whl/*.whl" >/dev/null; then
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl || echo "campaign: wheel install failed" >&2
        export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    else
        export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    fi
}

versions() {
    versions_report 2>&1 | tee "$OUT_DIR/versions.txt"
}

versions_report() {
    $PY - <<'EOF'
import importlib.metadata as md, platform, sys
print("python", sys.version.split()[0], platform.platform())
for name in ("torch", "triton", "transformers", "accelerate", "trl", "datasets", "liger-kernel",
             "pytest", "pytest-xdist", "pytest-timeout", "hypothesis", "numpy"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "not installed")
import torch
print("cuda", torch.version.cuda, "devices", torch.cuda.device_count(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")
EOF
    nvidia-smi || echo "no nvidia-smi"
}

# pytest with whichever of xdist / pytest-timeout is installed (the GPU image has both).
pytest_cmd() {
    local args=(-q -p no:cacheprovider --durations=10)
    $PY -c "import xdist" 2>/dev/null && args+=(-n "${CAMPAIGN_XDIST:-8}" --dist loadfile)
    $PY -c "import pytest_timeout" 2>/dev/null && args+=(--timeout 60)
    $PY -m pytest "${args[@]}" "$@"
}

# The suite's output in its own file, as it runs; its summary in the log.
run_tests() {
    pytest_cmd "$@" >"$OUT_DIR/pytest.log" 2>&1
    local status=$?
    tail -n 15 "$OUT_DIR/pytest.log"
    return $status
}

one_call() {
    install_wheels
    if [ $DRY -eq 1 ]; then
        export TRITON_INTERPRET=1 EPSDPO_TEST_DEVICE=cpu
        # Two test files on a CPU: in-process (eight xdist workers would each start torch).
        export CAMPAIGN_XDIST=${CAMPAIGN_XDIST:-0}
        local shapes_check=(--dry-run)
        local kernels=(--dry-run --rows 32 --vocab 300 1000 --no-sweep)
        local tests=(tests/test_layout.py tests/kernels/test_launch.py)
        local linear=(--dry-run --tokens 64 --hidden 32 --vocab 300)
        local bench=(--dry-run)
        local train=(--max-steps 2 --max-length 96 --micro-batch-size 2 --global-batch-size 4)
    else
        local shapes_check=()
        local kernels=(--rows 16384 --vocab 32000 128256 256000 --no-sweep)
        # The CUDA-relevant tier: what the compile tests check CI runs, and -m slow is the
        # second call's (tests-all).
        local tests=(-m "not slow" --ignore=tests/kernels/test_compile.py)
        local linear=(--tokens 8192 --hidden 4096 --vocab 128256)
        local bench=(--device cuda --preset llama3-8k --row-timeout 45)
        local train=(--max-steps 20)
    fi
    step versions "${CAP[versions]}" versions
    step check "${CAP[check]}" $PY benchmarks/cuda_check.py --jsonl "$OUT_DIR/check.jsonl" \
        "${shapes_check[@]}"
    step kernels "${CAP[kernels]}" $PY benchmarks/bench_kernels.py --json "$OUT_DIR/kernels.json" \
        "${kernels[@]}"
    step tests "${CAP[tests]}" run_tests "${tests[@]}"
    step linear "${CAP[linear]}" $PY benchmarks/bench_linear.py --json "$OUT_DIR/linear.json" \
        "${linear[@]}"
    step bench "${CAP[bench]}" $PY benchmarks/bench_loss.py --json "$OUT_DIR/bench.json" \
        --impl eager epsdpo-logits epsdpo-linear trl-dpo liger-dpo "${bench[@]}"
    rm -rf /tmp/campaign/train
    step train "${CAP[train]}" train_run /tmp/campaign/train "${train[@]}"
}

# train/run.py into DIR, its metrics copied next to the others even when the run was cut.
train_run() {
    local dir=$1
    shift
    $PY train/run.py --output-dir "$dir" --save-every 0 --eval-every 0 "$@"
    local status=$?
    cp "$dir/metrics.jsonl" "$OUT_DIR/train.jsonl" 2>/dev/null
    return $status
}

# ----------------------------------------------------------------------------- second call
# A long-sequence dataset for the T=2048 runs (the embedded one's pairs are ~130 tokens): byte
# tokenizer, so characters are tokens; half prompt, half response, as in the benchmark.
long_dataset() {
    $PY - "$1" <<'EOF'
import json, random, sys
random.seed(0)
rows = [json.loads(line) for line in open("train/pairs/default/train.jsonl")]
words = " ".join(r["prompt"] + r["chosen"] for r in rows).split()
def text(n):
    out = []
    while sum(len(w) + 1 for w in out) < n:
        out.append(random.choice(words))
    return " ".join(out)[:n]
with open(sys.argv[1], "w") as f:
    for i in range(512):
        f.write(json.dumps({"prompt": text(1000), "chosen": " " + text(1000),
                            "rejected": " " + text(1000)}) + "\n")
EOF
}

phase_tests_all() {
    pytest_cmd --ignore=tests/kernels/test_compile.py 2>&1 | tee "$OUT_DIR/pytest_all.log"
}

phase_bench() {
    local t=$1
    $PY benchmarks/bench_loss.py --device cuda --shape "4,$t,4096,128256" --row-timeout 120 \
        --json "$OUT_DIR/bench_cuda_T$t.json" --plot "$OUT_DIR/bench_cuda_T$t.png" 2>&1 \
        | tee "$OUT_DIR/bench_T$t.log"
}

phase_kernels_sweep() {
    $PY benchmarks/bench_kernels.py --rows 16384 --vocab 32000 128256 256000 \
        --json "$OUT_DIR/kernels_sweep.json" --profile "$OUT_DIR/profile.txt" 2>&1 \
        | tee "$OUT_DIR/kernels_sweep.log"
}

phase_kernels_ncu() {
    command -v ncu >/dev/null || { echo "campaign: no ncu" >&2; return 1; }
    # One launch of each token kernel at 16k rows × 128256, clocks as found.
    ncu --clock-control none --kernel-name regex:token_ --launch-count 3 \
        --section SpeedOfLight --section MemoryWorkloadAnalysis \
        $PY benchmarks/bench_kernels.py --rows 16384 --vocab 128256 --no-sweep \
        > "$OUT_DIR/ncu.txt" 2>&1
}

phase_train_small() {
    $PY train/run.py --output-dir /tmp/campaign/default 2>&1 | tee "$OUT_DIR/train_default.log"
    cp /tmp/campaign/default/metrics.jsonl "$OUT_DIR/train_default_metrics.jsonl"
    $PY benchmarks/bench_packing.py --json "$OUT_DIR/packing.json" 2>&1 \
        | tee "$OUT_DIR/packing.log"
    # EpsilonDPOTrainer on CUDA (bf16 autocast) against DPOTrainer's memory, printed; and
    # under FSDP2 through accelerate against a plain run.
    $PY -m pytest -q -s -p no:cacheprovider tests/integrations/test_trl.py -k "cuda or fsdp2_matches" 2>&1 \
        | tee "$OUT_DIR/trl_cuda.log"
}

phase_train_1b() {
    mkdir -p /tmp/campaign
    long_dataset /tmp/campaign/long.jsonl
    local status=0
    # The linear loss padded and packed (tokens/s, peak memory), and the logits loss padded.
    for run in linear:no-padding-free linear:padding-free logits:no-padding-free; do
        local loss=${run%%:*} layout=${run##*:}
        timeout 170 $PY train/run.py --model train/configs/llama-1b.json \
            --dataset /tmp/campaign/long.jsonl --"$layout" \
            --loss "$loss" --max-length 2048 --max-prompt-length 1024 --micro-batch-size 2 \
            --global-batch-size 8 --max-steps 12 --warmup-steps 2 --eval-every 0 \
            --save-every 0 --lr 1e-4 --output-dir "/tmp/campaign/1b-$loss-$layout" 2>&1 \
            | tee "$OUT_DIR/train_1b_${loss}_$layout.log" || status=1
        cp "/tmp/campaign/1b-$loss-$layout/metrics.jsonl" \
            "$OUT_DIR/train_1b_${loss}_${layout}_metrics.jsonl"
    done
    return $status
}

export -f versions versions_report pytest_cmd run_tests train_run long_dataset phase_tests_all phase_bench \
    phase_kernels_sweep phase_kernels_ncu phase_train_small phase_train_1b

if [ ${#PHASES[@]} -eq 0 ]; then
    one_call
    echo "=== campaign done: $failed failed step(s) of caps summing to $total_cap s; results in $OUT_DIR" \
        | tee -a "$LOG"
    exit $failed
fi

install_wheels
for phase in "${PHASES[@]}"; do
    echo "=== campaign phase: $phase ($(date -u +%H:%M:%S))"
    case "$phase" in
        tests-all) step tests-all 540 phase_tests_all ;;
        bench-1024) step bench-1024 540 phase_bench 1024 ;;
        bench-2048) step bench-2048 540 phase_bench 2048 ;;
        kernels-sweep) step kernels-sweep 540 phase_kernels_sweep ;;
        kernels-ncu) step kernels-ncu 540 phase_kernels_ncu ;;
        train-small) step train-small 540 phase_train_small ;;
        train-1b) step train-1b 540 phase_train_1b ;;
        *) echo "campaign: unknown phase $phase" >&2; failed=$((failed + 1)) ;;
    esac
done
echo "=== campaign done: $failed failed phase(s); results in $OUT_DIR"
exit $failed
