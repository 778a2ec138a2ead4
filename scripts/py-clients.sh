#!/usr/bin/env bash
# Builds the Python venv with oVirt's real clients for the REST API compatibility tests:
# ovirt-engine-sdk-python (module ovirtsdk4; a C extension built here: needs gcc, python3-dev,
# libxml2-dev from scripts/deps.sh), ansible (bundles the ovirt.ovirt collection) and
# ovirt-imageio (the image transfer client ovirt_disk and the SDK's upload examples use; a C
# extension too).
# Idempotent: a venv whose stamp matches the pinned versions is reused. Prints the venv path.
#
#   scripts/py-clients.sh            -> target/py-clients (or $OXVIRT_PY_CLIENTS)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

SDK_VERSION=4.6.3
ANSIBLE_VERSION=12.3.0
IMAGEIO_VERSION=2.5.1
venv="${OXVIRT_PY_CLIENTS:-$PWD/target/py-clients}"
stamp="$venv/.oxvirt-stamp"
want="sdk=$SDK_VERSION ansible=$ANSIBLE_VERSION imageio=$IMAGEIO_VERSION"

if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" && -x "$venv/bin/python" ]] \
    && "$venv/bin/python" -c 'import ovirtsdk4, ovirt_imageio.client' 2>/dev/null; then
    echo "$venv"
    exit 0
fi
# Debian's python3 matches python3-dev's headers (a pyenv shim earlier in PATH may not).
py=/usr/bin/python3
[[ -x $py ]] || py="$(command -v python3)"
rm -rf "$venv"
mkdir -p "$(dirname "$venv")"
echo "py-clients: creating $venv ($want)" >&2
"$py" -m venv "$venv" >&2
"$venv/bin/pip" install -q --disable-pip-version-check --no-input \
    "ovirt-engine-sdk-python==$SDK_VERSION" "ansible==$ANSIBLE_VERSION" "ovirt-imageio==$IMAGEIO_VERSION" >&2
"$venv/bin/python" -c 'import ovirtsdk4, ovirt_imageio.client' >&2
# ansible_collections.* are namespace packages: no __file__, a __path__.
test -d "$("$venv/bin/python" -c 'import ansible_collections.ovirt.ovirt as m; print(list(m.__path__)[0])')/plugins/modules" >&2
echo "$want" >"$stamp"
echo "$venv"
