# Entry points for people and CI. `make demo` runs the main job end to end; `make test` runs the
# tests; each does all the set-up it needs (system packages, guest kernel, initramfs).
CARGO ?= cargo
AGENT_TARGET := x86_64-unknown-linux-gnu
AGENT_BIN := target/$(AGENT_TARGET)/release/guest-agent

.PHONY: all setup build agent guest fullguest test lint demo bench clean-guest fuzz crashtest garage demo-fleet demo-tier

all: build

setup:
	bash scripts/setup.sh

build:
	$(CARGO) build --workspace --bins

# The agent is linked statically (the guest has no shared libraries to offer). An explicit
# --target keeps its RUSTFLAGS from invalidating the host build.
agent:
	CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS="-C target-feature=+crt-static" \
		$(CARGO) build --release -p guest-agent --target $(AGENT_TARGET)

guest: setup agent
	bash scripts/fetch-kernel.sh >/dev/null
	bash scripts/build-guest.sh $(AGENT_BIN)

# A full Debian guest (debootstrap + systemd, the agent as a service) for the e2e fullguest test:
# target/guest/fullguest.img. The debootstrap tree is cached in /var/cache/imagefs (root).
fullguest: guest
	bash scripts/build-fullguest.sh $(AGENT_BIN)

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# Every retry a test harness made (tests/nested.rs: an outer VM that never reached its /init) is
# written to target/test-retries.log, printed at the end whether the run passed or failed.
RETRIES := target/test-retries.log
SHOW_RETRIES := if [ -s $(RETRIES) ]; then echo "=== retries in this run ($(RETRIES)) ==="; \
	cat $(RETRIES); else echo "=== no retries in this run ==="; fi
test: guest fullguest build garage
	@rm -f $(RETRIES)
	@echo "$(CARGO) test --workspace -- --test-threads=2"
	@$(CARGO) test --workspace -- --test-threads=2 || { $(SHOW_RETRIES); exit 1; }
	@$(SHOW_RETRIES)

# Garage 2.5.0, the S3 engine the remote tests run against (issue 12): installed into
# /usr/local/bin once per machine (cargo install, about 11 minutes on 2 cores; says so while it
# builds); a no-op when it is there. `make demo` does not need it.
garage:
	bash scripts/garage.sh

# The whole story on this machine (root): build an image, patch one file, boot three VMs, roll
# the patch out live, show each guest reading the new bytes without a reboot, roll back.
demo: guest build
	bash scripts/demo.sh

# A fleet rollout on this machine (root): three hosts as network namespaces, each with its own
# store, daemon (--listen, mutual TLS) and live VM; one patch rolled across them; one host cut
# off mid-rollout and brought back; the rollout resumed to completion.
demo-fleet: guest build garage
	bash scripts/demo-fleet.sh

# The block tier alone: two stores push and pull through a loopback Garage, then remote gc.
demo-tier: build garage
	bash scripts/demo-tier.sh

clean-guest:
	rm -rf target/guest

# Benchmarks, side by side in one run (root: FUSE mounts, drop_caches): one BENCH line per metric
# (medians, ours/peer ratio), raw samples in target/bench/results.json. BENCH_ARGS passes options
# (e.g. BENCH_ARGS="--runs 3 --only import,mount"). scripts/bench-mount.sh stays as a quick check.
BENCH_ARGS ?=
# The VM group runs the e2e suite's ignored benchmark tests (release) in the nested VM.
bench: guest fullguest garage
	bash scripts/setup.sh --bench
	CARGO_TARGET_DIR=$(CURDIR)/target $(CARGO) build --release -p imagefs -p vmm -p imagefs-bench
	CARGO_TARGET_DIR=$(CURDIR)/target target/release/imagefs-bench --imagefs target/release/imagefs \
		--out target/bench --cargo-target target $(BENCH_ARGS)

# Coverage-guided fuzzing of every parser of untrusted bytes (nightly + cargo-fuzz, installed if
# missing), FUZZ_SECONDS per target (default 300); prints FUZZ target execs=N crashes=M.
# `make test` replays the checked-in corpora on stable Rust.
fuzz:
	bash scripts/fuzz.sh

# Kill campaigns (not part of `make test`, which runs 20 kills per scenario): CRASH_KILLS
# (default 1000) kills of each of import, apply, gc, the daemon mid write and mid substitution,
# and the rollout driver mid-wave, one at a time, then the power-cut test (CRASH_CUTS, default
# 50; it boots the guest kernel, hence `guest`). CRASH_SEED replays a run. Prints
# `CRASH <scenario> kills=N inside=M damage=D seed=S` and `POWERCUT cuts=N ... damage=D`.
crashtest: guest build
	bash scripts/crashtest.sh
