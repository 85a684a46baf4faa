#!/bin/bash
# Session 22: the blocks on narrower rows than a wide first layer (runs/wavegen-narrow) against HEAD before it (runs/wavegen-base).
exec /work/main/runs/ab.sh runs/ab3 "15 base narrow" "7 base narrow"
