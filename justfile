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

# Benchmarks: release build, then the standard scenario set against a kmsgate it starts itself
# (table on stdout, report in target/bench/report.json; docs/benchmarks.md). Run it on an otherwise idle machine.
bench *ARGS:
    cargo build --release -p kmsgate -p kmsgate-bench
    cargo run --release -p kmsgate-bench -- run --scenarios standard {{ARGS}}

# What CI runs.
ci:
    bash .ci/run
