# The two commands of the README: `make demo` and `make test`. Both call `make install`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: install demo test test-all bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# libfluidsynth3 lets pyfluidsynth render MIDI; without it studio falls back to plain synthesis.
install: $(BIN)/python
	@if ! ldconfig -p 2>/dev/null | grep -q libfluidsynth; then \
	  (command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	   (apt-get install -y -q libfluidsynth3 >/dev/null 2>&1 || \
	    (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q libfluidsynth3 >/dev/null 2>&1))) || \
	  echo "note: libfluidsynth3 not installed; MIDI rendering will use the plain synthesiser"; \
	fi
	@# bubblewrap (bwrap) is the sandbox generated code runs in; without it studio refuses to run it
	@if ! command -v bwrap >/dev/null; then \
	  (command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	   (apt-get install -y -q bubblewrap >/dev/null 2>&1 || \
	    (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q bubblewrap >/dev/null 2>&1))) || \
	  echo "note: bubblewrap not installed; studio code --tests and studio eval code will refuse to run generated code"; \
	fi
	@# chromium runs the gallery's browser tests (tests/test_serve_browser.py); without it they skip
	@if ! command -v chromium >/dev/null; then \
	  (command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	   (apt-get install -y -q chromium >/dev/null 2>&1 || \
	    (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1))) || \
	  echo "note: chromium not installed; the gallery's browser tests will skip"; \
	fi
	$(BIN)/pip install -q -e '.[dev]'

demo: install
	HF_HUB_OFFLINE=1 $(BIN)/python examples/demo.py

test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest

test-all: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -m ''

bench: install
	@for f in benchmarks/*.py; do \
	  case $$f in *gpu_check.py) continue;; esac; \
	  echo "== $$f"; HF_HUB_OFFLINE=1 $(BIN)/python $$f || exit 1; done

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
