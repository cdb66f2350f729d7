VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install constraints lint format test bench gpu-wheels

## install: system tools, the virtualenv, the package with [data,dev] at the versions in
## constraints.txt, the Kafka jars
install:
	.ci/run --install-only

## constraints: re-resolve constraints.txt to the newest versions pyproject.toml allows
constraints:
	scripts/update-constraints.sh

## lint: ruff (lint + format check) and mypy, as CI would
lint:
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/mypy

## format: apply ruff's formatting and safe fixes
format:
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

## test: the whole suite, starting the real Kafka broker (same command as README.md)
test:
	$(BIN)/python -m pytest

## bench: the end-to-end benchmark
bench:
	$(BIN)/tickcast bench

## gpu-wheels: the wheels a GPU check needs on the device machine (scripts/gpu-check.sh)
gpu-wheels:
	scripts/gpu-wheels.sh
