# qwen-ft-images: `make images` builds and smoke-tests the matrix, `make test` checks everything.
#
#   make images SELECT="v100 cpu" BUILD_ARGS="--jobs 2 --base-map 'nvidia/cuda:*=mirror.local/nvidia/cuda:*'"
#   make test
PY         ?= python3
QWEN       ?= $(PY) -m builder
SELECT     ?=
BUILD_ARGS ?=
SMOKE_ARGS ?=
PYTEST_ARGS ?=

.PHONY: help deps deps-dev images render render-check build smoke lint typecheck test test-fast bench bench-cold e2e clean

help:
	@echo "make images   render, build and smoke-test the images (SELECT=, BUILD_ARGS=, SMOKE_ARGS=)"
	@echo "make test     lint, type-check, golden Dockerfiles, and every test tier"
	@echo "make bench    benchmarks (figures go into docs/benchmarks.md)"
	@echo "make e2e      build the real V100 image and audit its kernels"

# The builder itself needs no torch; the tests and the smoke runtime do.
build/.deps: pyproject.toml
	$(PY) -m pip install -q -e .
	@mkdir -p build && touch $@

build/.deps-dev: pyproject.toml
	$(PY) -m pip install -q -e '.[dev,smoke,plot]'
	@mkdir -p build && touch $@ build/.deps

deps: build/.deps
deps-dev: build/.deps-dev

images: deps render build smoke

render: deps
	$(QWEN) render

render-check: deps
	$(QWEN) render --check

build: deps
	$(QWEN) build $(SELECT) $(BUILD_ARGS)

smoke: deps
	$(QWEN) smoke $(SELECT) $(SMOKE_ARGS)

lint: deps-dev
	$(PY) -m ruff check builder runtime tests benchmarks
	$(PY) -m ruff format --check builder runtime tests benchmarks
	lint-imports --no-cache

typecheck: deps-dev
	$(PY) -m mypy

test: lint typecheck render-check
	$(PY) -m pytest --ignore=tests/e2e $(PYTEST_ARGS)

# The unit and runtime tiers only (no Docker), for a quick loop.
test-fast: deps-dev
	$(PY) -m pytest -m "not docker" --ignore=tests/e2e $(PYTEST_ARGS)

# Figures go into docs/benchmarks.md. Docker parts use $QWEN_FT_DOCKER (a client with BuildKit).
bench: deps-dev
	$(PY) benchmarks/cli_startup.py
	$(PY) benchmarks/render_scale.py
	QWEN_FT_DOCKER=$${QWEN_FT_DOCKER:-docker} $(PY) benchmarks/build_speed.py noop disk
	QWEN_FT_DOCKER=$${QWEN_FT_DOCKER:-docker} $(PY) benchmarks/smoke_container.py
	QWEN_FT_DOCKER=$${QWEN_FT_DOCKER:-docker} $(PY) benchmarks/up_to_date.py

# The cold builds: slow, and they need PyPI.
bench-cold: deps-dev
	QWEN_FT_DOCKER=$${QWEN_FT_DOCKER:-docker} $(PY) benchmarks/build_speed.py cold

# The real V100 image from plain PyPI (~4 GB of wheels): contract, CPU LoRA step, kernel audit,
# report. Figures in build/e2e/metrics.json; QWEN_FT_E2E_PRUNE=1 also prunes the build cache.
e2e: deps-dev
	QWEN_FT_E2E=1 $(PY) -m pytest tests/e2e -v $(PYTEST_ARGS); rc=$$?; \
	  cat build/e2e/metrics.json 2>/dev/null | head -c 4000; exit $$rc

clean:
	rm -rf build .pytest_cache .mypy_cache .ruff_cache
