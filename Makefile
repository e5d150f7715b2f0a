# Two commands on a fresh machine: `make demo` and `make test` (both create .venv when needed).
VENV ?= .venv
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow venv clean bench
venv: $(STAMP)

$(STAMP): setup.py tools/constraints.txt tools/bootstrap.sh
	VENV=$(VENV) bash tools/bootstrap.sh

demo: $(STAMP)
	$(VENV)/bin/tanuki demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m "not slow" tests

test-slow: $(STAMP)  # longer runs (the full demo with its accuracy check)
	$(VENV)/bin/python -m pytest -q -m slow tests

bench: $(STAMP)
	$(VENV)/bin/python tools/bench_train_step.py

clean:
	rm -rf $(VENV) build *.egg-info
