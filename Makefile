# The two set-up commands of the README: `make demo` (the main job on the embedded world) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# A machine without CUDA gets the pinned CPU build of torch (a plain `torch` could pull a multi-GB CUDA build).
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "torch" || echo "torch==2.13.0")

.PHONY: venv test demo world-base clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest -q

# Resumable: a second `make demo` reuses every finished step (scripts/demo.sh says what it skips).
demo: venv
	VIGU="$(abspath $(VENV))/bin/vigu" PYTHON="$(abspath $(PY))" bash scripts/demo.sh

# Rebuild the shipped world "Wan2.1" (vigu_cli/assets/world-wan2.1) from scratch: hours on 2 CPU cores.
world-base: venv
	VIGU="$(abspath $(VENV))/bin/vigu" PYTHON="$(abspath $(PY))" bash scripts/world_base.sh

clean:
	rm -rf $(VENV) runs/demo
