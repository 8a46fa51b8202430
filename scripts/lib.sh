# Shared by scripts/tour and scripts/test: make sure the Debian packages a command needs are
# installed, installing the missing ones with apt-get (as root, or through sudo).
set -euo pipefail

ferry_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

ferry_missing_packages() {
  local pkg missing=()
  for pkg in "$@"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed"; then
      missing+=("$pkg")
    fi
  done
  echo "${missing[*]:-}"
}

ferry_ensure_packages() {
  local missing
  missing="$(ferry_missing_packages "$@")"
  [ -z "$missing" ] && return 0
  echo "ferry: installing missing Debian packages: $missing"
  local sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
      sudo="sudo"
    else
      echo "ferry: missing packages: $missing" >&2
      echo "ferry: install them as root with: apt-get install -y $missing" >&2
      exit 1
    fi
  fi
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -q || true
  # shellcheck disable=SC2086
  if ! $sudo apt-get install -y -q --no-install-recommends $missing; then
    echo "ferry: could not install: $missing — install them with: sudo apt-get install $missing" >&2
    exit 1
  fi
}

ferry_build_tools=(cmake ninja-build g++ make)
ferry_library_packages=(libasio-dev libconcurrentqueue-dev librange-v3-dev nlohmann-json3-dev)
ferry_test_packages=(libboost-test-dev)
ferry_fuzz_packages=(clang libclang-rt-14-dev)
ferry_bench_packages=(libbenchmark-dev libtbb-dev)
ferry_example_packages=(libssl-dev)
