#!/usr/bin/env bash
# One GPU session on a lent H200 box (no network; see docs/gpu.md), step by step:
#
#   bash scripts/gpu_session.sh piece PATH...  move carried pieces (scripts/gpu_pieces.sh) into /tmp/gpu-pieces
#   bash scripts/gpu_session.sh early-ckpt F... draw full checkpoints of families F in the background while
#                                              the pieces travel (box torch + diffusers from the first piece)
#   bash scripts/gpu_session.sh install        scripts/gpu_install.sh: the CUDA vLLM stack + this package (editable)
#   bash scripts/gpu_session.sh tests [ARGS]   the GPU test tier (pytest -m gpu tests/gpu ARGS; test paths in
#                                              ARGS replace tests/gpu)
#   bash scripts/gpu_session.sh bench-bagel    benchmarks/bench_bagel_gpu.py
#   bash scripts/gpu_session.sh bench-serving  benchmarks/bench_serving_overhead.py (Qwen-Image)
#   bash scripts/gpu_session.sh bench-glm      benchmarks/bench_glm_image.py (ours vs diffusers' GlmImagePipeline)
#   bash scripts/gpu_session.sh drop FAMILY    delete a cached full checkpoint (room for the next one)
#
# Full-size checkpoints are cached in $OMNI_GPU_CKPT_DIR: a tmpfs mounted at /mnt/omni-ckpt when
# possible (host memory: loading is not disk-bound, and files survive between calls while the
# machine stays warm), else /tmp. Logs and JSON reports go to $OUT when the device tool sets it.
set -uo pipefail
CALLER_DIR=$PWD  # `piece` paths are relative to where the device tool runs the call, not to this checkout
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/omni-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
# flashinfer is not in the carried set (docs/gpu.md): vLLM's GPU sampler must not import it.
export VLLM_USE_FLASHINFER_SAMPLER=0

ckpt_dir() {
  if ! mountpoint -q /mnt/omni-ckpt 2>/dev/null; then
    mkdir -p /mnt/omni-ckpt && mount -t tmpfs -o size=100g tmpfs /mnt/omni-ckpt 2>/dev/null || true
  fi
  if mountpoint -q /mnt/omni-ckpt 2>/dev/null; then echo /mnt/omni-ckpt; else mkdir -p /tmp/omni-ckpt; echo /tmp/omni-ckpt; fi
}

# A detached early-ckpt build must be finished before anything reads or rewrites its folders.
wait_early() {
  [ -f /tmp/early-ckpt.pid ] || return 0
  local n=0
  while kill -0 "$(cat /tmp/early-ckpt.pid)" 2>/dev/null && [ $n -lt 400 ]; do sleep 1; n=$((n + 1)); done
  echo "early-ckpt:"; cat /tmp/early-ckpt.log; rm -f /tmp/early-ckpt.pid
}

case "${1:-}" in
  piece)
    shift; mkdir -p /tmp/gpu-pieces && (cd "$CALLER_DIR" && mv "$@" /tmp/gpu-pieces/) && ls /tmp/gpu-pieces | wc -l ;;
  early-ckpt)
    # diffusers (pure python, in the first piece: the tar holds the smallest wheels first) beside the
    # box's own torch/transformers is all `vllm_omni_plugin.checkpoints` needs (it never imports vLLM).
    # Runs detached (setsid) so later calls find the files; they wait for it (wait_early) before use.
    shift
    d=$(ckpt_dir)
    mkdir -p /tmp/early-whl
    cat /tmp/gpu-pieces/part-00 | tar -x -C /tmp/early-whl --wildcards 'diffusers-*.whl' 2>/dev/null || true
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/early-site /tmp/early-whl/diffusers-*.whl || exit 1
    families="$*"
    setsid bash -c "cd $PWD && for f in $families; do PYTHONPATH=/tmp/early-site:$PWD python3 -c \"import sys, time; t=time.time(); from vllm_omni_plugin.checkpoints import cached_checkpoint as c; print(c(sys.argv[1], 'full', '$d', device='cuda'), round(time.time()-t, 1), 's', flush=True)\" \$f; done" \
      >/tmp/early-ckpt.log 2>&1 < /dev/null &
    echo $! >/tmp/early-ckpt.pid; echo "early-ckpt: pid $(cat /tmp/early-ckpt.pid) -> $d ($families)" ;;
  install)
    wait_early  # pip replaces the torch that the early build runs on
    bash scripts/gpu_install.sh /tmp/gpu-pieces 2>&1 | tee "$OUT/install.log" ;;
  tests)
    shift
    wait_early
    export OMNI_GPU_CKPT_DIR=$(ckpt_dir) OMNI_GPU_REPORT=$OUT/gpu_report.jsonl
    df -h / "$OMNI_GPU_CKPT_DIR" | tee "$OUT/disk.txt"
    # Paths given: only those (each family's checkpoints fill the tmpfs: run the tier per family);
    # none: the whole tier. (Options alone, e.g. -k, still mean the whole tier.)
    paths=(tests/gpu); for a in "$@"; do case "$a" in tests/*) paths=(); break ;; esac; done
    timeout 570 python3 -m pytest -m gpu "${paths[@]}" -v -rA -s -p no:cacheprovider "$@" 2>&1 | tee "$OUT/pytest_gpu.log" | grep -v "^\s*$" | tail -n 200 ;;
  bench-bagel)
    shift
    wait_early
    export OMNI_GPU_CKPT_DIR=$(ckpt_dir)
    timeout 570 python3 benchmarks/bench_bagel_gpu.py --log "$OUT/bagel_server.log" "$@" 2>&1 | tee "$OUT/bench_bagel.log" | tail -n 80 ;;
  bench-serving)
    shift
    wait_early
    export OMNI_GPU_CKPT_DIR=$(ckpt_dir)
    timeout 570 python3 benchmarks/bench_serving_overhead.py --log "$OUT/serving_server.log" "$@" 2>&1 | tee "$OUT/bench_serving.log" | tail -n 60 ;;
  bench-glm)
    shift
    wait_early
    d=$(ckpt_dir)
    timeout 570 python3 benchmarks/bench_glm_image.py --ckpt "$d/glm-image-full-0" --out "$OUT/bench_glm_image.json" "$@" 2>&1 | tee "$OUT/bench_glm.log" | tail -n 40 ;;
  drop)
    rm -rf "$(ckpt_dir)/$2-full-0" && df -h "$(ckpt_dir)" ;;
  *)
    sed -n 2,17p "$0"; exit 2 ;;
esac
