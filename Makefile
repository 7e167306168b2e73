# Two commands matter (see README): `make demo` and `make test`. Both install into .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
export RAY_AUTH_MODE ?= disabled
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo test clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[cpu,dev]"
	$(PIP) uninstall -y -q torchvision torchaudio torchcodec || true
	$(PY) -c "import transformers, vllm, deepspeed, ray; from transformers import LlamaForCausalLM; print('install ok: vllm', vllm.__version__, 'ray', ray.__version__, 'deepspeed', deepspeed.__version__)"
	touch $@

demo: install
	$(VENV)/bin/rlaif-ray train -c jobs/configs/toy_cpu.yaml

test: install
	$(VENV)/bin/pytest tests

clean:
	rm -rf $(VENV) runs
