#!/bin/sh
# checkpoints/fsdd-vocoder-large/train.log as it will read: the committed log, then this
# session's runs without the progress lines.
d=checkpoints/fsdd-vocoder-large
out() { tr '\r' '\n' < "$1" | grep -av "^training loss" | grep -v "^$"; }
cat "$d/train.log"
echo "# session 24: wavegen --threads 1 train --out $d --resume --steps 40000 (the same machine; PixelCNN sampling on the other core)"
out runs/s24-vocoder.out
echo "# stopped by SIGINT to go on with both cores; the first resume ran session 23's binary without --steps, so it took 2,000 as the end and stopped at once (the bug fixed in this session; the weights were untouched):"
out runs/s24-vocoder-b.out
echo "# then, with this session's binary: wavegen --threads 2 train --out $d --resume --steps 40000 (two threads: not bit-identical to a one-thread run from here on)"
out runs/s24-vocoder-c.out
