#!/bin/sh
# Renders music16k: 16 pieces of the OpenMSX soundtrack (Debian's openttd-openmsx, GPL-2) played
# by FluidSynth with the FluidR3 General MIDI soundfont (fluid-soundfont-gm, MIT) at 16 kHz,
# mixed to mono 16-bit WAV. Usage: sh datasets/render-music16k.sh [OUT_DIR]  (default:
# ${WAVEGEN_DATA:-datasets}/music16k). About a minute. Other FluidSynth versions render slightly
# differently, so `wavegen data list` may say the files differ from the reference rendering;
# they are the same music.
set -eu
out="${1:-${WAVEGEN_DATA:-datasets}/music16k}"
songs="5432gone_redfarn boogi_marabi_redfarn chuggachugga city_blues_redfarn coconut_run2
flying_scotsman mighty_giant_run mosey_along_redfarn say_what_redfarn slow_neasy_redfarn
train_filled_with_cash ttsong_iii_imuh3 ttsong_iv_imuh3 tttheme2 ultimate_run wood_whistles"
midi=/usr/share/games/openttd/baseset/openmsx
font=/usr/share/sounds/sf2/FluidR3_GM.sf2

if ! command -v fluidsynth >/dev/null || ! command -v sox >/dev/null || [ ! -d "$midi" ] || [ ! -f "$font" ]; then
  echo "installing fluidsynth, fluid-soundfont-gm, openttd-openmsx and sox (apt-get)" >&2
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo=sudo
  $sudo apt-get install -y --no-install-recommends fluidsynth fluid-soundfont-gm openttd-openmsx sox
fi

mkdir -p "$out"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for song in $songs; do
  echo "rendering $song" >&2
  fluidsynth -ni -F "$tmp/$song.stereo.wav" -r 16000 "$font" "$midi/$song.mid" >/dev/null 2>&1
  sox "$tmp/$song.stereo.wav" -b 16 "$tmp/$song.wav" remix -
  mv "$tmp/$song.wav" "$out/$song.wav"   # whole files only under the final name
done
echo "wrote $(ls "$out"/*.wav | wc -l) files to $out" >&2
