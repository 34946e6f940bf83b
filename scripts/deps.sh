#!/usr/bin/env bash
# Installs the Debian packages mxq's tests drive as real peers: Dovecot's
# LMTP server, swaks, Postfix (smtp-source and the benchmark's comparison),
# strace, tmux, FUSE. Skips what is already there. Needs root (or sudo).
set -euo pipefail

pkgs=()
want() { # want <command> <package>
	command -v "$1" >/dev/null 2>&1 || pkgs+=("$2")
}
want dovecot dovecot-core
[ -x /usr/lib/dovecot/lmtp ] || pkgs+=(dovecot-lmtpd)
want swaks swaks
want smtp-source postfix
want strace strace
want tmux tmux
want fusermount3 fuse3
want chromium chromium # the continuity web page, driven headless
want mbsync isync      # a real IMAP client syncing held mail
want python3 python3   # imaplib, another real IMAP client

if [ ${#pkgs[@]} -eq 0 ]; then
	exit 0
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
# Postfix asks how to configure itself; the tests configure their own.
echo "postfix postfix/main_mailer_type select No configuration" | $sudo debconf-set-selections
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
