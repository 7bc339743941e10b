#!/usr/bin/env bash
# The efficiency study's corpus: the Linux kernel documentation from Debian's linux-doc-6.1 package
# (3,000-odd reStructuredText files, 21 MB of English once the translations are left out), indexed as
# data/linux_doc_{train,valid}.{bin,idx}. A bench set-up step: CI and the tests never run it.
set -euo pipefail
cd "$(dirname "$0")/.."
DOCS=/usr/share/doc/linux-doc-6.1/Documentation
if [ ! -d "$DOCS" ]; then
    SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo sudo)
    $SUDO apt-get update -q
    $SUDO apt-get install -y -q --no-install-recommends linux-doc-6.1
fi
.venv/bin/mgrow data --source "$DOCS" --pattern '*.rst.gz' --exclude translations --out data/linux_doc
