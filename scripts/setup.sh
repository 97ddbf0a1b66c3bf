#!/usr/bin/env bash
# setup.sh: installs the Debian packages vattn builds and tests with (skips those already there).
set -euo pipefail
pkgs=(cmake ninja-build g++ clang clang-format libclang-rt-14-dev libgtest-dev libgmock-dev
      libbenchmark-dev nlohmann-json3-dev libcli11-dev python3
      bible-kjv)  # bible-kjv: the public-domain haystack text of our long-context tasks
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "setup: all packages present"
  exit 0
fi
echo "setup: installing ${missing[*]}"
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
