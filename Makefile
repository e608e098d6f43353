# The two commands of the README. Both install what they need first (scripts/setup.sh).
.PHONY: setup demo test bench manifests clean

setup: .venv/.installed

.venv/.installed: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh
	touch $@

demo: setup
	.venv/bin/dvgt demo --out runs/demo

test: setup
	.venv/bin/pytest -q

bench: setup
	.venv/bin/python benchmarks/run.py

# The chart's schema enums and the ready manifests k8s/<stage>.yaml, from charts/dvgt (tests check them).
manifests: setup
	.venv/bin/python -m dvgt.k8s.generate

clean:
	rm -rf runs .pytest_cache
