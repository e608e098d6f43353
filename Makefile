# The two commands of the README. Both install what they need first (scripts/setup.sh).
.PHONY: setup demo test lint format bench manifests image clean

setup: .venv/.installed

.venv/.installed: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh
	touch $@

demo: setup
	.venv/bin/dvgt demo --out runs/demo

test: setup lint
	.venv/bin/pytest -q

# Style: ruff's lint rules and formatter (pyproject.toml [tool.ruff]); `make format` applies them.
# Types: mypy on dvgt/ (pyproject.toml [tool.mypy]: strict on dvgt.checkpoint, dvgt.k8s, dvgt.families).
lint: setup
	.venv/bin/ruff check dvgt tests benchmarks scripts
	.venv/bin/ruff format --check dvgt tests benchmarks scripts
	.venv/bin/mypy

format: setup
	.venv/bin/ruff check --fix dvgt tests benchmarks scripts
	.venv/bin/ruff format dvgt tests benchmarks scripts

bench: setup
	.venv/bin/python benchmarks/run.py

# Everything derived from the chart's catalog and the exit codes: schema enums, files/accumulation.yaml, k8s/ and the
# README / chart README / docs/kubernetes.md tables (dvgt/k8s/generate.py; tests check them).
manifests: setup
	.venv/bin/python -m dvgt.k8s.generate

# Both images, tagged with the chart's appVersion as the release workflow tags them (needs Docker):
#   make image [REGISTRY=ghcr.io/dvgt-project/dvgt]   -> $(REGISTRY)/trainer:<appVersion>, $(REGISTRY)/exporter:<appVersion>
REGISTRY ?= ghcr.io/dvgt-project/dvgt
APP_VERSION = $(shell sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$$/\1/p' charts/dvgt/Chart.yaml)
image:
	@command -v docker >/dev/null || { echo "make image: docker is not installed (the images are built by .github/workflows/release.yaml)"; exit 1; }
	docker build -t $(REGISTRY)/trainer:$(APP_VERSION) .
	docker build -f images/exporter/Dockerfile -t $(REGISTRY)/exporter:$(APP_VERSION) .

clean:
	rm -rf runs .pytest_cache .mypy_cache
