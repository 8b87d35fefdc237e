#!/usr/bin/env bash
# The whole GPU campaign in one command: the test suite on CUDA, the loss benchmark at real
# shapes, the token kernels' bandwidth and launch-configuration sweep with a profile, and short
# training runs (the embedded default; a ~1B Llama at T=2048 with --loss linear and logits).
#
#   bash benchmarks/gpu_campaign.sh OUT_DIR                 # every phase, in order
#   bash benchmarks/gpu_campaign.sh OUT_DIR bench-1024 kernels   # some phases
#
# Phases: tests, bench-1024, bench-2048, kernels, kernels-ncu, train-small, train-1b (what each
# runs and writes: benchmarks/RESULTS.md, "GPU campaign"). Each is expected to take under ten
# minutes on an H100 (an estimate until a GPU has run it); every step is cut at STEP_TIMEOUT_S
# (default 540 s), so that a step that hangs still leaves its log. Packages a bare GPU image may
# lack (Liger-Kernel, TRL, datasets and two of its needs) are installed from wheels in .whl/ into
# /tmp/site when present. A phase that fails is reported and the next one still runs; the exit
# status is the number of failed phases.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT_DIR=${1:?usage: gpu_campaign.sh OUT_DIR [PHASE ...]}
shift
PHASES=("$@")
[ ${#PHASES[@]} -eq 0 ] && PHASES=(tests bench-1024 bench-2048 kernels kernels-ncu train-small train-1b)
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
PY=${PYTHON:-python3}
# Every step has a time limit: a hung step must not take the phases after it with it.
RUN="timeout ${STEP_TIMEOUT_S:-540}"

if compgen -G ".whl/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || echo "campaign: wheel install failed" >&2
    export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

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

phase_tests() {
    nvidia-smi > "$OUT_DIR/nvidia-smi.txt" 2>&1
    # The suite as CI runs it, but on CUDA tensors and compiled kernels (conftest switches).
    $RUN $PY -m pytest -q -p no:cacheprovider -n 8 --dist loadfile --durations=15 2>&1 \
        | tee "$OUT_DIR/pytest.log"
}

phase_bench() {
    # The issue's shapes: B=4, T=1024 or 2048, H=4096, V=128256, bf16, half prompt. One T per
    # phase, so that each stays under ten minutes (eager and compiled rows are slow to set up).
    local t=$1
    $RUN $PY benchmarks/bench_loss.py --device cuda --shape "4,$t,4096,128256" \
        --json "$OUT_DIR/bench_cuda_T$t.json" --plot "$OUT_DIR/bench_cuda_T$t.png" 2>&1 \
        | tee "$OUT_DIR/bench_T$t.log"
}

phase_kernels() {
    $RUN $PY benchmarks/bench_kernels.py --rows 16384 --vocab 32000 128256 256000 \
        --json "$OUT_DIR/kernels.json" --profile "$OUT_DIR/profile.txt" 2>&1 \
        | tee "$OUT_DIR/kernels.log"
}

phase_kernels_ncu() {
    $RUN $PY benchmarks/kernel_report.py > "$OUT_DIR/kernel_report.txt" 2>&1
    if command -v ncu >/dev/null; then
        # One launch of each token kernel at 16k rows × 128256, clocks as found.
        $RUN ncu --clock-control none --kernel-name regex:token_ --launch-count 3 \
            --section SpeedOfLight --section MemoryWorkloadAnalysis \
            $PY benchmarks/bench_kernels.py --rows 16384 --vocab 128256 --no-sweep \
            > "$OUT_DIR/ncu.txt" 2>&1 || echo "campaign: ncu failed (see ncu.txt)" >&2
    fi
}

phase_train_small() {
    $RUN $PY train/run.py --output-dir /tmp/campaign/default 2>&1 \
        | tee "$OUT_DIR/train_default.log"
    cp /tmp/campaign/default/metrics.jsonl "$OUT_DIR/train_default_metrics.jsonl"
    cp /tmp/campaign/default/metrics.png "$OUT_DIR/train_default_metrics.png"
    # Padded against packed batches (padding share and time per 100 pairs, one run).
    $RUN $PY benchmarks/bench_packing.py --json "$OUT_DIR/packing.json" \
        --plot "$OUT_DIR/packing.png" 2>&1 | tee "$OUT_DIR/packing.log"
    # EpsilonDPOTrainer on CUDA (bf16 autocast) against DPOTrainer's memory, printed.
    $RUN $PY -m pytest -q -s -p no:cacheprovider tests/test_trl.py -k cuda 2>&1 \
        | tee "$OUT_DIR/trl_cuda.log"
}

phase_train_1b() {
    mkdir -p /tmp/campaign
    long_dataset /tmp/campaign/long.jsonl
    local status=0
    # The linear loss padded and packed (tokens/s, peak memory), and the logits loss padded.
    for run in linear:no-padding-free linear:padding-free logits:no-padding-free; do
        local loss=${run%%:*} layout=${run##*:}
        timeout 280 $PY train/run.py --model train/configs/llama-1b.json \
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

failed=0
for phase in "${PHASES[@]}"; do
    echo "=== campaign phase: $phase ($(date -u +%H:%M:%S))"
    case "$phase" in
        tests) phase_tests ;;
        bench-1024) phase_bench 1024 ;;
        bench-2048) phase_bench 2048 ;;
        kernels) phase_kernels ;;
        kernels-ncu) phase_kernels_ncu ;;
        train-small) phase_train_small ;;
        train-1b) phase_train_1b ;;
        *) echo "campaign: unknown phase $phase" >&2; false ;;
    esac
    status=$?
    [ $status -ne 0 ] && failed=$((failed + 1)) && echo "=== phase $phase FAILED ($status)"
done
echo "=== campaign done: $failed failed phase(s); results in $OUT_DIR"
exit $failed
