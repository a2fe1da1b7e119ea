#!/usr/bin/env bash
# Pack .gpu-wheels/ into pieces small enough to travel with one device call each
# (64 MiB per call, working tree included):
#
#   bash scripts/gpu_pieces.sh       # -> .gpu-pieces/part-00 .. part-NN  (62 MiB each)
#
# A plain, uncompressed tar of the wheels (wheels are zip files already; xz or
# zstd gain ~15-20% at ~1-8 MB/s on a 2-core machine: not worth it, docs/gpu.md),
# cut with `split -b 62m`. SHA256SUMS lists every piece and the whole tar, so
# scripts/gpu_install.sh can tell which pieces are missing or damaged.
# Idempotent: nothing is rewritten when the wheel set did not change.
set -euo pipefail
cd "$(dirname "$0")/.."

SRC=${GPU_WHEELS_DIR:-.gpu-wheels}
OUT=${GPU_PIECES_DIR:-.gpu-pieces}
SIZE=${PIECE_SIZE:-62m}  # + the ~1 MB working tree: under the 64 MiB a call carries
[ -d "$SRC" ] && ls "$SRC"/*.whl >/dev/null 2>&1 || { echo "no wheels in $SRC: run scripts/gpu_wheels.sh" >&2; exit 1; }

# Fingerprint of the set: names + sizes (+ the piece size).
fp=$( (cd "$SRC" && ls -l --time-style=+ *.whl | awk '{print $5, $NF}'; echo "$SIZE") | sha256sum | cut -c1-16)
if [ -f "$OUT/SHA256SUMS" ] && grep -q "^# set $fp\$" "$OUT/SHA256SUMS" \
   && (cd "$OUT" && sha256sum --quiet -c <(grep -v '^#' SHA256SUMS | grep ' part-') ); then
  echo "gpu_pieces: $OUT is up to date (set $fp)"
else
  rm -rf "$OUT"; mkdir -p "$OUT"
  # Biggest wheels last: a partial transfer still holds whole small wheels.
  (cd "$SRC" && ls -1Sr *.whl) >"$OUT/.list"
  tar -C "$SRC" -cf - -T "$OUT/.list" | tee >(sha256sum | cut -d' ' -f1 >"$OUT/.tarsum") \
    | split -b "$SIZE" -d -a 2 - "$OUT/part-"
  sleep 0.2  # let the tee'd sha256sum finish writing
  rm -f "$OUT/.list"
  {
    echo "# set $fp"
    echo "# tar $(cat "$OUT/.tarsum") $(cat "$OUT"/part-* | wc -c)"
    echo "# pieces $(ls "$OUT" | grep -c '^part-')"
    (cd "$OUT" && sha256sum part-*)
  } >"$OUT/SHA256SUMS"
  rm -f "$OUT/.tarsum"
fi
n=$(ls "$OUT" | grep -c '^part-')
tot=$(cat "$OUT"/part-* | wc -c)
echo "gpu_pieces: $n pieces in $OUT, $((tot / 1048576)) MiB in all (max $(ls -l "$OUT"/part-* | awk '{print $5}' | sort -n | tail -1 | awk '{printf "%.1f", $1/1048576}') MiB each)"
ls -l "$OUT" | awk 'NR>1 {printf "  %-12s %6.1f MiB\n", $NF, $5/1048576}'
