#!/usr/bin/env bash
# The test command of the README: installs what the suite needs, then runs it.
#   bash tests/run.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."

# Exactly the locked set (serving + dev + train: the training tests run too).
python -m pip install --quiet --disable-pip-version-check -r requirements.lock -e .

# Debian packages used by the marked integration tests (Prometheus server, headless Chromium).
need=()
command -v prometheus >/dev/null || need+=(prometheus)
command -v redis-server >/dev/null || need+=(redis-server)
command -v chromium >/dev/null || need+=(chromium)
command -v chromedriver >/dev/null || need+=(chromium-driver)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  else
    echo "note: missing ${need[*]}; tests that need them will be skipped" >&2
  fi
fi

# A Redis on 127.0.0.1:6379 is used by the cache tests; start one if none answers.
if ! (exec 3<>/dev/tcp/127.0.0.1/6379) 2>/dev/null && command -v redis-server >/dev/null; then
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
fi

export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
exec python -m pytest "$@"
