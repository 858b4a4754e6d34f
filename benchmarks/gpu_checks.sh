#!/usr/bin/env bash
# The GPU checks issues 12 and 18 ask for, in one run on a lent GPU machine (its python3 holds a CUDA PyTorch and
# transformers; tetra runs from src/ without installing). Each step runs under its own time limit and writes its
# whole output to $OUT/<step>.txt (./gpu-results without $OUT); a failed or timed-out step does not stop the others.
#
#   bash benchmarks/gpu_checks.sh [seconds per step, default 100]
#
# Steps: the CUDA tests (bf16 parity and greedy decoding against transformers), bf16 training throughput and MFU of
# a ~0.9B Llama (16 layers, width 2048, vocabulary 32000, 2 x 2048 tokens per step) against transformers eager and
# compiled, generation throughput against transformers' generate at batch 1, 8 and 64, and the GEMM layout table
# at that model's shapes.
set -u
OUT=${OUT:-gpu-results}
LIMIT=${1:-100}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

step() {
    local name=$1
    shift
    echo "== $name: $*"
    timeout "$LIMIT" "$@" >"$OUT/$name.txt" 2>&1
    echo "exit status $? ($name)" | tee -a "$OUT/$name.txt"
    tail -n 20 "$OUT/$name.txt"
}

{
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv
    python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__,
torch.cuda.get_device_name())"
} >"$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

step test_cuda python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py
step train_1b python3 benchmarks/train_throughput.py --device cuda --layers 16 --width 2048 --heads 16 \
    --vocab 32000 --seq 2048 --batch 2 --steps 10 --no-fp32
step generate python3 benchmarks/generate_throughput.py --device cuda --dtype bfloat16 --layers 16 --width 2048 \
    --heads 16 --kv-heads 16 --batches 1 8 64 --repeats 2
step gemm_layouts python3 benchmarks/gemm_layouts.py --device cuda --dtype bfloat16 --layers 16 --width 2048 \
    --intermediate 5632 --heads 16 --kv-heads 4 --vocab 32000 --seq 2048 --batch 2 --steps 3
