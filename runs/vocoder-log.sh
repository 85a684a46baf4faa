#!/bin/sh
# checkpoints/fsdd-vocoder-large/train.log as it will read: the command, then the run's output
# without the progress lines.
echo "# session 23: wavegen --threads 1 train ../shared/datasets/fsdd/recordings --out checkpoints/fsdd-vocoder-large --sample-rate 8000 --preset default --condition mel --cond-channels 128 --subframes 8 --steps 40000 (AMD EPYC with AVX-512, no AMX: f32; one core, the PixelCNN-96 on the other)"
tr '\r' '\n' < runs/s23-vocoder.out | grep -av "^training loss" | grep -v "^$"
