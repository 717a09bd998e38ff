# Sourced by the benchmark scripts: `bench_venv PACKAGE...` installs the
# PyPI packages into a virtualenv under the target directory, once, and
# sets `venv` to it. PYTHON=path picks the Python that makes it.
bench_venv() {
    venv=$(realpath -m "${CARGO_TARGET_DIR:-target}/bench-venv")
    [ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$venv"
    local missing=()
    for package in "$@"; do
        "$venv/bin/pip" show -q "$package" >/dev/null 2>&1 || missing+=("$package")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "installing ${missing[*]} (pip, into $venv)" >&2
        "$venv/bin/pip" install -q "${missing[@]}"
    fi
}
