#!/usr/bin/env bash
# Best effort: a headless browser for tests/integration/webui/test_webui_browser.py (Debian's
# chromium and chromium-driver). Never fails the build: without apt-get, without root (and no
# password-less sudo), or with no package list reachable, it says so and the browser test skips.
#   SKIP_BROWSER_INSTALL=1   do nothing
set -u
have() { command -v "$1" >/dev/null 2>&1; }
if [ -n "${SKIP_BROWSER_INSTALL:-}" ]; then
  echo "install_browser: SKIP_BROWSER_INSTALL set; the browser test skips unless chromium is there"
  exit 0
fi
if { have chromium || have chromium-browser; } && have chromedriver; then
  echo "install_browser: chromium and chromedriver already installed"
  exit 0
fi
if ! have apt-get; then
  echo "install_browser: no apt-get here; install chromium + chromedriver yourself or the browser test skips"
  exit 0
fi
if [ "$(id -u)" -eq 0 ]; then
  SUDO=()
elif have sudo && sudo -n true 2>/dev/null; then
  SUDO=(sudo -n)
else
  echo "install_browser: not root and no password-less sudo; the browser test skips"
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
if "${SUDO[@]}" apt-get update -qq >/dev/null 2>&1 \
   && "${SUDO[@]}" apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1; then
  echo "install_browser: installed $(chromium --version 2>/dev/null || echo chromium) and chromedriver"
else
  echo "install_browser: apt-get could not install chromium chromium-driver; the browser test skips"
fi
exit 0
