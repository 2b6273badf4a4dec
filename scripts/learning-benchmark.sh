#!/usr/bin/env bash
# The learning benchmark of the training work: a tiny DeRIS (configs/synth-tiny.json) trained from
# scratch on CPU on `deris synth` scenes for 30 minutes (configs/train-synth.json), then scored
# on the synthetic val split (gIoU, cIoU, N-acc, T-acc). Run from the repository root:
#
#   scripts/learning-benchmark.sh [OUT_DIR] [MINUTES] [extra `deris train` flags]
#
# It builds the release binary, writes the dataset (seed 0: 3000 train / 200 val images, 9000 /
# 600 sentences), trains, and prints the final validation. OUT_DIR/run has log.jsonl, curve.png,
# checkpoints/ and model/ (the files of the embedded default model). To measure NSC's effect,
# run it again with NSC off: a copy of the config with "nsc": {"enabled": false}.
set -euo pipefail
out="${1:-bench-out}"
minutes="${2:-30}"
shift $(( $# > 2 ? 2 : $# ))
cargo build --release -p deris-cli
bin=target/release/deris
[ -d "$out/synth" ] || "$bin" synth --out "$out/synth" --seed 0 --train 3000 --val 200 --size 128 > /dev/null
"$bin" train --config configs/train-synth.json --data "$out/synth" --out "$out/run" --max-minutes "$minutes" "$@"
# the whole val split with the final model
"$bin" eval --weights "$out/run/model/model.safetensors" --config "$out/run/model/config.json" \
    --tokenizer "$out/run/model/tokenizer.spm" --annotations "$out/synth/grefs/instances.json" \
    --data-root "$out/synth/images" --split val --objects "$out/synth/coco/instances.json"
