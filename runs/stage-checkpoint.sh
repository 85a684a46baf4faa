#!/bin/sh
# Stage a checkpoint directory that a trainer still owns, as its flattened form (the files
# of current/ and last/current/ at D/ and D/last/), without touching the working tree: the
# trainer keeps its symlinks, git gets the files. Usage: runs/stage-checkpoint.sh D
set -eu
d=${1%/}
stage() { # FILE PATH-IN-REPO
    sha=$(git hash-object -w "$1")
    git update-index --add --cacheinfo "100644,$sha,$2"
}
for f in "$d"/current/*; do stage "$f" "$d/$(basename "$f")"; done
if [ -d "$d/last/current" ]; then
    for f in "$d"/last/current/*; do stage "$f" "$d/last/$(basename "$f")"; done
fi
git diff --cached --stat
