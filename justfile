# Developer recipes. The README's commands work without `just`.

# Run kmsgate on its embedded default (./kmsgate-data, http://127.0.0.1:8080).
run *ARGS:
    cargo run -p kmsgate -- serve {{ARGS}}

# The whole test suite (installs what the tests need).
test *ARGS:
    ./scripts/test {{ARGS}}

# Formatting and lints exactly as CI checks them.
lint:
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets -- -D warnings

fmt:
    cargo fmt --all

# What CI runs.
ci:
    bash .ci/run
