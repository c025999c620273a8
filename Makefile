PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: run test check soak lint format bench bench-peers clean binary browser faults

run: $(VENV)/.installed
	$(VENV)/bin/profile-app serve

test: $(VENV)/.dev-installed lint browser faults
	$(PY) -m pytest

# The fast tier for the edit-test loop (under a minute): lint plus the tests not marked slow.
check: $(VENV)/.dev-installed lint
	$(PY) -m pytest -q -m "not slow" -x

# The dashboard's browser test drives Debian's Chromium and chromedriver: install them once
# (as root directly, else with sudo).
browser:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
		sudo=""; [ "$$(id -u)" -eq 0 ] || sudo="sudo"; \
		$$sudo env DEBIAN_FRONTEND=noninteractive apt-get update -q && \
		$$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; \
	fi

# The storage fault tests inject fsync errors with Debian's strace (tests/db/test_disk_full.py).
faults:
	@if ! command -v strace >/dev/null; then \
		sudo=""; [ "$$(id -u)" -eq 0 ] || sudo="sudo"; \
		$$sudo env DEBIAN_FRONTEND=noninteractive apt-get update -q && \
		$$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q strace; \
	fi

# Minutes, not part of `make test`: the crash loop with 40 kills (about 4,100 tasks), the
# 512-connection overload burst for 3 minutes, a Dask scheduler killed 20 times under
# match tasks with one attempt allowed (none may fail), then the storage soak:
# PROFILE_APP_SOAK_TASKS (default 1,000,000: hours on a small machine) tasks through one
# database with retention at 3 s; plots file, WAL, RSS and claim rate to
# bench/results/soak_storage.png and fails if any of them drifts (bench/soak_storage.py);
# last, the reads and the writer's batches on a file that keeps 1,000,000 finished tasks
# (bench/retained.py, bench/results/retained.json).
soak: $(VENV)/.dev-installed $(VENV)/.bench-installed
	PROFILE_APP_TEST_KILLS=40 PROFILE_APP_TEST_BURST_S=180 $(PY) -m pytest -v tests/e2e/test_crash_loop.py \
		tests/web/test_overload.py::test_a_burst_of_512_connections_gets_only_the_contracts_answers
	PROFILE_APP_TEST_SCHEDULER_KILLS=20 $(PY) -m pytest -v tests/executors/test_dask_scheduler_loss.py
	$(PY) -m bench.soak_storage
	$(PY) -m bench.retained

lint: $(VENV)/.dev-installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

# `make bench` includes the peers part (bench/peers: arq, Celery, Dramatiq, procrastinate); it
# needs redis-server and postgresql from apt (`apt-get install -y redis-server postgresql`)
# and skips a peer whose server is missing. `make bench-peers` runs that part alone.
bench: $(VENV)/.peers-installed
	$(PY) -m bench.run

bench-peers: $(VENV)/.peers-installed
	$(PY) -m bench.peers.run

$(VENV)/.peers-installed: requirements-peers.txt $(VENV)/.bench-installed
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-peers.txt
	touch $@

format: $(VENV)/.dev-installed
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $@

$(VENV)/.dev-installed: requirements-dev.txt requirements-dask.txt $(VENV)/.installed
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

$(VENV)/.bench-installed: requirements-bench.txt requirements-dask.txt $(VENV)/.installed
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-bench.txt -r requirements-dask.txt
	touch $@

# dist/profile-app: one executable that serves, seeds and runs process tasks without the venv.
# It is built in a venv of its own, holding only requirements-build.txt, so it bundles the
# same packages on every machine whatever the dev venv holds. BINARY_DIR and BINARY_WORK
# let tests/e2e/test_binary.py build into a directory of its own.
BUILD_VENV := build/venv
BINARY_DIR ?= dist
BINARY_WORK ?= build/pyinstaller

binary: $(BUILD_VENV)/.installed
	$(BUILD_VENV)/bin/pyinstaller --noconfirm --log-level WARN --distpath $(BINARY_DIR) \
		--workpath $(BINARY_WORK) packaging/profile_app.spec

$(BUILD_VENV)/.installed: requirements-build.txt requirements.txt
	test -x $(BUILD_VENV)/bin/python || $(PYTHON) -m venv $(BUILD_VENV)
	$(BUILD_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-build.txt
	touch $@

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
