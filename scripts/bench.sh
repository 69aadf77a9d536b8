#!/usr/bin/env bash
# The end-to-end benchmark on this machine: starts a Kafka-protocol broker (tansu, in memory) and a
# redis-server on free local ports, builds the release binary, runs `rescorer bench e2e` against
# them, and writes perf/e2e.json and perf/e2e.md. Arguments go to the benchmark, e.g.
#   scripts/bench.sh --backlog 50000 --seconds 10
# Set RESCORER_BENCH_SMOKE=1 for a tiny run that only proves the benchmark works end to end, and
# RESCORER_BENCH_OUT=path.json to write the report elsewhere than perf/e2e.json.
# RESCORER_BENCH_WORKER_LOG=<filter> sets the worker's RUST_LOG (its stderr joins the benchmark's).
# The broker runs its memory engine (faster; no consumer resumes mid-run, so its defect on resuming
# inside a record batch, see README.md "Tests", does not arise): say so with any figure.
# TANSU_BIN picks the broker binary (default: the test suite's, .tools/tansu/bin/tansu, else tansu
# on PATH): the test suite's tansu is a debug build, which limits the
# broker to about 1k events/s of produce while it is also serving fetches; a release build
# (cargo install tansu --version 0.6.0 --locked --features dynostore --root DIR) does not.
# With `--device cuda` it builds with `--features cuda` and installs the GPU wheel's libraries
# (CUDA 13 and cuDNN 9 must be on the library path).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
default_tansu=tansu
[ -x .tools/tansu/bin/tansu ] && default_tansu="$PWD/.tools/tansu/bin/tansu"
tansu="${TANSU_BIN:-$default_tansu}"
command -v "$tansu" >/dev/null || { echo "tansu missing: run scripts/test.sh once (it installs it)"; exit 1; }
command -v redis-server >/dev/null || { echo "redis-server missing: apt-get install redis-server"; exit 1; }
features=()
ort=()
if [[ " $* " == *" --device cuda "* || " $* " == *" --device=cuda "* ]]; then
  features=(--features cuda)
  ort=(--gpu)
fi
scripts/install-onnxruntime.sh "${ort[@]}" >/dev/null

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
work="$(mktemp -d)"
kport=$(free_port); rport=$(free_port)
"$tansu" broker --listener-url "tcp://127.0.0.1:$kport" --advertised-listener-url "tcp://127.0.0.1:$kport" \
  --storage-engine memory://tansu/ > "$work/tansu.log" 2>&1 &
kpid=$!
# RESCORER_BENCH_REDIS_ARGS adds redis-server options (e.g. the RUNBOOK's encoding thresholds:
# "--zset-max-listpack-entries 16 --hash-max-listpack-entries 64"); the report names the settings.
# shellcheck disable=SC2086
redis-server --port "$rport" --bind 127.0.0.1 --save "" --appendonly no --dir "$work" \
  ${RESCORER_BENCH_REDIS_ARGS:-} > "$work/redis.log" 2>&1 &
rpid=$!
trap 'kill $kpid $rpid 2>/dev/null; rm -rf "$work"' EXIT
cat > "$work/bench.toml" <<TOML
[kafka]
bootstrap_servers = "127.0.0.1:$kport"
[redis]
url = "redis://127.0.0.1:$rport"
TOML
sleep 1
cargo build --release --locked -q "${features[@]}"
out="${RESCORER_BENCH_OUT:-perf/e2e.json}"
extra=()
if [ -n "${RESCORER_BENCH_SMOKE:-}" ]; then
  out="$work/smoke.json"
  extra=(--backlog 2000 --seconds 2 --members 1000 --candidates 1000 --batch-sizes 16 --backlog-minutes 0.1 --phase-limit 60 --tick-members 20)
fi
target/release/rescorer bench e2e --config "$work/bench.toml" --out "$out" "${extra[@]}" "$@"
