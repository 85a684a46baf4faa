#!/bin/sh
# Issue 13, item 4: every `mnist` command works on the shipped models of the issue (sample,
# complete, score, compact, info of the compact copy and a sample from it), one thread each.
# Usage: runs/issue13-check.sh > runs/issue13-check.out 2>&1
set -e
w=${WAVEGEN:-target/release/wavegen}
t=$(mktemp -d)
export WAVEGEN_DATA=../shared/datasets
for m in lstm transformer pixelcnn gated-pixelcnn; do
  c=checkpoints/mnist-$m
  echo "== $m"
  $w --threads 1 mnist sample --checkpoint $c --n 4 --seed 1 --json --out $t/$m.png
  $w --threads 1 mnist complete --checkpoint $c --out $t/$m-complete.png
  $w --threads 1 mnist score --checkpoint $c --images tests/fixtures/mnist/t10k-images-idx3-ubyte.gz --out $t/$m.csv
  echo "score: $(($(wc -l < $t/$m.csv) - 1)) images, lowest likelihood first: $(sed -n 2p $t/$m.csv)"
  $w --threads 1 mnist compact --checkpoint $c --out $t/$m-compact
  $w info $t/$m-compact --json | python3 -c "import json,sys; d=json.load(sys.stdin); print('compact copy:', d['manifest']['model']['kind'], d['parameters'], 'parameters')"
  du -sh $c $t/$m-compact | tr '\n' ' '; echo
  $w --threads 1 mnist sample --checkpoint $t/$m-compact --n 4 --seed 1 --json --out $t/$m-compact.png
done
rm -rf "$t"
