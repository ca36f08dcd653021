#!/usr/bin/env bash
# Fetch onnxruntime's C/C++ headers from Debian's libonnxruntime-dev (trixie) into a build-local
# folder. Nothing is installed system-wide: apt runs with a private sources list and state dir and
# the .deb is only unpacked with dpkg -x. Usage: tools/fetch_ort_headers.sh [DEST]  (default
# build/ort-headers). Prints the include directory on success.
set -euo pipefail
dest=${1:-"$(cd "$(dirname "$0")/.." && pwd)/build/ort-headers"}
if [ -f "$dest/include/onnxruntime_c_api.h" ]; then echo "$dest/include"; exit 0; fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/state/lists/partial" "$work/cache/archives/partial" "$work/etc/preferences.d" "$work/etc/trusted.gpg.d"
cat > "$work/etc/sources.list" <<SRC
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main
SRC
touch "$work/status"
opts=(-o "Dir::Etc::SourceList=$work/etc/sources.list" -o "Dir::Etc::SourceParts=-"
      -o "Dir::Etc::Preferences=$work/etc/preferences" -o "Dir::Etc::PreferencesParts=$work/etc/preferences.d"
      -o "Dir::State=$work/state" -o "Dir::State::status=$work/status" -o "Dir::Cache=$work/cache"
      -o "APT::Architecture=$(dpkg --print-architecture)" -o "Debug::NoLocking=1" -o "APT::Sandbox::User=root" -q)
apt-get "${opts[@]}" update >/dev/null
(cd "$work" && apt-get "${opts[@]}" download libonnxruntime-dev >/dev/null)
deb=$(ls "$work"/libonnxruntime-dev_*.deb)
mkdir -p "$work/x" && dpkg -x "$deb" "$work/x"
hdr=$(dirname "$(find "$work/x" -name onnxruntime_c_api.h | head -n 1)")
mkdir -p "$dest/include"
cp -r "$hdr"/. "$dest/include/"
basename "$deb" > "$dest/SOURCE"
echo "$dest/include"
