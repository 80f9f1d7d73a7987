# Two commands on a fresh machine: `make demo` and `make test`. Each creates or reuses .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-oldest docs bench sweep clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# The CPU wheel of torch lies on this machine's disk; a bare `torch` would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

test: $(STAMP)
	$(VENV)/bin/ruff check safe_peft tests benchmarks examples
	$(VENV)/bin/mypy
	$(PY) -m pytest -q -p no:cacheprovider
	$(MAKE) docs

# Without -q: mkdocs' --strict counts the warnings it prints (a broken link, a stale reference).
docs: $(STAMP)
	$(VENV)/bin/mkdocs build --strict -d build/site

# The oldest supported pair, in its own environment (CI runs both). Old peft warns about its own saves in the
# test set-up, so third-party warnings are not errors here.
OLD := .venv-oldest
OLD_STAMP := $(OLD)/.installed
OLDEST := "peft==0.17.1" "transformers==4.56.2"

$(OLD_STAMP): pyproject.toml
	test -x $(OLD)/bin/python || $(PYTHON) -m venv $(OLD)
	$(OLD)/bin/python -m pip install -q torch==2.13.0
	$(OLD)/bin/python -m pip install -q $(OLDEST) -e ".[test]"
	touch $(OLD_STAMP)

test-oldest: $(OLD_STAMP)
	$(OLD)/bin/python -m pytest -q -p no:cacheprovider -W ignore::UserWarning -W ignore::FutureWarning \
		-W ignore::DeprecationWarning

bench: $(STAMP)
	$(PY) benchmarks/run.py

clean:
	rm -rf $(VENV) $(OLD)

# The breadth sweep (issue 10): every architecture that builds tiny x {default targets, all-linear}, and every
# PeftType on a few architectures; writes docs/sweep.md. A fixed sample runs in `make test` (tests/test_sweep.py).
sweep: $(STAMP)
	$(PY) tests/run_sweep.py --methods
