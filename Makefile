# mqtt-site-exporter developer targets.
#   make test   - venv + Debian tools, then the pytest suite (what .ci/run does)
#   make demo   - local mosquitto + simulated sites + exporter on 127.0.0.1:8000
#   make lint   - ruff over the repository, mypy --strict over exporter/
#   make test-image - build the Dockerfile with podman and run it against a real broker
#                 (root: installs podman, runc, debootstrap; builds the stand-in base image)
#   make bench  - benchmarks (package bench/): report in .bench/results.md (untracked);
#                 exits non-zero when a benchmark fails or misses its target
#   make bench-update - the same, but rewrites the committed bench/results.md (on purpose)

PYTHON ?= python3
VENV := .venv
VENV_PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
SITES_FILE ?= examples/sites.yml
# amqtt (a broker that never kicks a duplicate client ID) in its own venv, for the tests.
AMQTT_VENV := .venv-amqtt
AMQTT_BIN := $(AMQTT_VENV)/bin/amqtt
AMQTT_VERSION := 0.12.1

.PHONY: venv deps test test-image lint demo bench bench-update check-config clean

venv: $(STAMP)

# Re-installs only when the packaging metadata changes.
$(STAMP): setup.cfg pyproject.toml
	test -x $(VENV_PY) || $(PYTHON) -m venv $(VENV)
	$(VENV_PY) -m pip install -q -e '.[test,lint]'
	touch $@

deps:
	PYTHON=$(PYTHON) bash scripts/ensure-deps.sh prometheus amtool docker-compose

# Its own venv: amqtt's dependencies must not touch the project venv.
$(AMQTT_BIN):
	test -x $(AMQTT_VENV)/bin/python || $(PYTHON) -m venv $(AMQTT_VENV)
	$(AMQTT_VENV)/bin/pip install -q amqtt==$(AMQTT_VERSION)

test: deps venv $(AMQTT_BIN)
	$(VENV_PY) -m pytest -q $(PYTEST_ARGS)

lint: venv
	$(VENV_PY) -m ruff check exporter tests bench scripts examples
	$(VENV_PY) -m mypy exporter

# The image test (tests/test_image_e2e.py) alone: podman build + run + restart + stop.
# The base image python:<tag> is built once from Debian packages (cached in podman's store).
test-image: venv
	PYTHON=$(PYTHON) bash scripts/ensure-deps.sh podman runc debootstrap
	bash scripts/build-base-image.sh
	MQTT_IMAGE_TEST=1 $(VENV_PY) -m pytest -q -rP -p no:cacheprovider tests/test_image_e2e.py $(PYTEST_ARGS)

demo: deps venv
	bash scripts/ensure-deps.sh mosquitto_sub
	$(VENV_PY) scripts/demo.py

# Results go to the untracked .bench/results.md; a missed target exits 1 (and fails make).
BENCH_ARGS ?=
bench: deps venv $(AMQTT_BIN)
	$(VENV_PY) -m bench --output .bench/results.md $(BENCH_ARGS)

# Updating the committed figures is a deliberate step: this rewrites bench/results.md.
bench-update: deps venv $(AMQTT_BIN)
	$(VENV_PY) -m bench --output bench/results.md $(BENCH_ARGS)

# Validate a sites file without connecting anywhere (default: the demo one).
check-config: venv
	MQTT_SITES_FILE=$(SITES_FILE) $(VENV_PY) -m exporter check-config

clean:
	rm -rf $(VENV) $(AMQTT_VENV) .demo build dist *.egg-info .pytest_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
