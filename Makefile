# Every common task. `make run` shows the pipeline end to end; `make test` runs the whole suite.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: help venv kafka-up kafka-down topics run test test-fast lint bench clean

help:
	@echo "make run         train a model if needed, start Kafka + detector, replay a stream, show alerts"
	@echo "make test        install everything, start Kafka if needed, run the whole test suite"
	@echo "make kafka-up    start a local single-node Apache Kafka (KRaft) on 127.0.0.1:$${EPCWATCH_KAFKA_PORT:-9092}"
	@echo "make kafka-down  stop that broker"
	@echo "make lint        ruff"
	@echo "make bench       measure throughput, latency and memory (bench/results/)"

$(STAMP): requirements.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	@touch $(STAMP)

venv: $(STAMP)

kafka-up:
	@bash kafka/kafka-up.sh

kafka-down:
	@bash kafka/kafka-down.sh

topics: venv kafka-up
	$(VENV)/bin/epcwatch topics

run: venv kafka-up
	$(VENV)/bin/epcwatch demo

test: venv kafka-up
	$(PY) -m pytest tests config consumer detector drift producer epcwatch

test-fast: venv
	$(PY) -m pytest -m "not integration and not slow" tests config consumer detector drift producer epcwatch

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: venv kafka-up
	$(VENV)/bin/epcwatch bench

clean:
	rm -rf out .pytest_cache
