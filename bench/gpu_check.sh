#!/usr/bin/env bash
# The GPU check: install this project offline from a wheelhouse, run `pytest tests/gpu`, then
# print one JSON object (bench/gpu_check.py): joint vs SFT step time and MFU of a ~1.1B
# Qwen3-shaped pair on one GPU, and the mixed cross-entropy's peak memory.
#
#   bench/gpu_check.sh --build-wheelhouse [--python-version X.Y]...   needs the package registry
#   bench/gpu_check.sh [--json-out FILE]          on the GPU machine: CUDA torch, no registry
#   bench/gpu_check.sh --dry-run [--json-out FILE]  on CPU: the same install path, tiny shapes
#
# The wheelhouse (bench/wheelhouse, git-ignored) holds megatron-core and the packages the check
# imports beyond torch (numpy, psutil, pyyaml, pytest, ...; versions from setup.py), for each
# --python-version (default: this machine's python3; the GPU machine's must be among them).
# The project is installed with --no-deps: its data and interop dependencies (datasets,
# transformers, ...) are not needed by the check and would not fit in 64 MiB.
#
# Every install from the wheelhouse runs with pip's configuration and PIP_* variables
# cleared, `--no-index --find-links bench/wheelhouse`: nothing else is read. On the GPU
# machine the venv also sees the site-packages of $PYTHON (its CUDA torch). The dry run's venv
# sees nothing of the machine's: it gets $CPU_TORCH (pip's usual sources) as the stand-in for
# that torch, and everything else from the wheelhouse.
#
# Environment: PYTHON (python3), VENV (/tmp/wmss-gpu-check-venv, recreated each run),
# WHEELHOUSE (bench/wheelhouse), CPU_TORCH (torch==2.13.0).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
VENV=${VENV:-/tmp/wmss-gpu-check-venv}
WHEELHOUSE=${WHEELHOUSE:-bench/wheelhouse}
CPU_TORCH=${CPU_TORCH:-torch==2.13.0}
LIMIT_BYTES=$((64 * 1024 * 1024))  # what the GPU machine's copy of the tree may carry

mode=gpu
versions=()
check_args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --build-wheelhouse) mode=build ;;
        --dry-run) mode=dry ;;
        --python-version) versions+=("$2"); shift ;;
        --json-out) check_args+=(--json-out "$(realpath -m "$2")"); shift ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
                   exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
cd "$ROOT"

say() { echo "== gpu_check: $*" >&2; }
py_version() { "$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])'; }

# pip with no configuration but the command line's (no index, no global find-links).
clean_pip() {
    (
        for var in $(compgen -e); do
            case "$var" in PIP_*) unset "$var" ;; esac
        done
        export PIP_CONFIG_FILE=/dev/null
        "$PYTHON" -m pip --python "$VENV/bin/python" "$@"
    )
}

# stdout is the JSON's alone: pip's report goes to stderr.
offline_install() {
    clean_pip install --no-index --find-links "$WHEELHOUSE" --no-cache-dir \
        --disable-pip-version-check "$@" >&2
}

build_wheelhouse() {
    [ ${#versions[@]} -gt 0 ] || versions=("$(py_version)")
    local platforms=(--platform manylinux2014_x86_64)
    for n in $(seq 17 28); do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
    mapfile -t specs < <("$PYTHON" bench/gpu_check.py --requirements)
    local core=${specs[0]} rest=("${specs[@]:1}")
    rm -rf "$WHEELHOUSE"
    mkdir -p "$WHEELHOUSE"
    for v in "${versions[@]}"; do
        local target=(--only-binary=:all: --implementation cp --python-version "$v"
                      "${platforms[@]}" -d "$WHEELHOUSE")
        say "wheels for Python $v"
        # megatron-core without its dependencies: the one heavy one, torch, is the GPU
        # machine's own; the others are read from its wheel and fetched with the rest.
        "$PYTHON" -m pip download -q --no-deps "${target[@]}" "$core"
        local wheel
        wheel=$(ls "$WHEELHOUSE"/megatron_core-*-cp"${v/./}"-*.whl)
        mapfile -t core_deps < <("$PYTHON" bench/gpu_check.py --wheel-deps "$wheel")
        "$PYTHON" -m pip download -q "${target[@]}" "${core_deps[@]}" "${rest[@]}"
    done
    ls -l "$WHEELHOUSE" >&2
    local bytes
    bytes=$(du -sb "$WHEELHOUSE" | cut -f1)
    say "wheelhouse: $(ls "$WHEELHOUSE" | wc -l) wheels, $bytes bytes" \
        "($((bytes / 1024 / 1024)) MiB) for Python ${versions[*]}"
    if [ "$bytes" -gt "$LIMIT_BYTES" ]; then
        say "the wheelhouse is over 64 MiB: it cannot travel with the tree"
        exit 1
    fi
}

make_venv() {
    local version
    version=$(py_version)
    if ! ls "$WHEELHOUSE"/megatron_core-*-cp"${version/./}"-*.whl >/dev/null 2>&1; then
        say "no megatron-core wheel for Python $version in $WHEELHOUSE; on a machine with the" \
            "registry run: bench/gpu_check.sh --build-wheelhouse --python-version $version"
        exit 1
    fi
    if ! "$PYTHON" -m pip --version >/dev/null 2>&1; then
        say "$PYTHON has no pip: it installs into the venv (pip --python, pip >= 22.3)"
        exit 1
    fi
    rm -rf "$VENV"
    "$PYTHON" -m venv --without-pip "$VENV"
}

# The venv sees $PYTHON's packages after its own (site.addsitedir: their .pth files too). A
# --system-site-packages venv would not when $PYTHON is itself a venv: it would see the base
# interpreter's packages, without torch.
see_base_packages() {
    local site
    site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    "$PYTHON" -c 'import sys
for p in sys.path:
    if p.endswith(("site-packages", "dist-packages")):
        print(f"import site; site.addsitedir({p!r})")' > "$site/_wmss_base_site.pth"
}

install_project() {
    mapfile -t specs < <("$PYTHON" bench/gpu_check.py --requirements)
    say "offline install from $WHEELHOUSE: ${specs[*]}"
    offline_install "${specs[@]}"
    say "offline install of this project (--no-deps)"
    offline_install --no-deps "$ROOT"
    # From outside the tree: the installed copy must import.
    (cd / && "$VENV/bin/python" -c 'import megatron.core, megatron_wmss.loss, megatron_wmss.training
print("gpu_check: imports", megatron_wmss.__file__)') >&2
    say "pip check (the data/interop dependencies are absent on purpose):"
    clean_pip check >&2 || true
}

run_check() {
    local rc=0
    say "pytest tests/gpu"
    "$VENV/bin/python" -m pytest tests/gpu -q -rs -p no:cacheprovider >&2 || rc=$?
    say "measurements (bench/gpu_check.py $*)"
    "$VENV/bin/python" bench/gpu_check.py "$@" "${check_args[@]}" || rc=$?
    return $rc
}

start=$(date +%s)
rc=0
case "$mode" in
    build)
        build_wheelhouse
        ;;
    gpu)
        if ! "$PYTHON" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())'; then
            say "$PYTHON has no CUDA torch here; use --dry-run on a machine without a GPU"
            exit 1
        fi
        make_venv
        see_base_packages
        install_project
        run_check || rc=$?
        ;;
    dry)
        make_venv
        say "stand-in for the GPU machine's torch: $CPU_TORCH (pip's usual sources)"
        "$PYTHON" -m pip --python "$VENV/bin/python" install -q "$CPU_TORCH" >&2
        install_project
        run_check --cpu || rc=$?
        ;;
esac
say "done in $(($(date +%s) - start)) s (exit $rc)"
exit $rc
