# RETFound for MindSpore — two commands on a fresh machine (Python 3.11 + pip):
#   make demo   # venv, install, synthetic demo data, fine-tune a small ViT on CPU, evaluate
#   make test   # venv, install (with the PyTorch original's stack for parity tests), run the tests
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
DEMO_OUT ?= output_dir

.PHONY: demo test install install-test clean-demo

$(VENV)/.installed: requirements_mindspore.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements_mindspore.txt
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed requirements_test.txt
	$(PY) -m pip install -q -r requirements_test.txt
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: $(VENV)/.installed
	$(PY) tools/make_demo_data.py --out demo_data
	$(PY) main_finetune_mindspore.py --model vit_tiny_patch16 --input_size 64 --nb_classes 3 \
	    --data_path demo_data --task demo --output_dir $(DEMO_OUT) --log_dir output_logs \
	    --batch_size 8 --epochs 4 --warmup_epochs 1 --blr 5e-3 --drop_path 0.1 --num_workers 2 --device CPU
	$(PY) main_finetune_mindspore.py --model vit_tiny_patch16 --input_size 64 --nb_classes 3 \
	    --data_path demo_data --task demo_eval --output_dir $(DEMO_OUT) --batch_size 8 --num_workers 2 \
	    --device CPU --eval --resume $(DEMO_OUT)/demo/checkpoint-best.ckpt
	@echo "Demo results: $(DEMO_OUT)/demo/ (checkpoint-best.ckpt, log.txt, metrics_val.csv, metrics_test.csv,"
	@echo "  confusion_matrix_test.jpg, roc_curves_test.png, training_curves.png); TensorBoard: output_logs/demo;"
	@echo "  the --eval re-run of the best checkpoint: $(DEMO_OUT)/demo_eval/"

test: $(VENV)/.installed-test
	$(PY) -m pytest -q

clean-demo:
	rm -rf demo_data $(DEMO_OUT)/demo $(DEMO_OUT)/demo_eval output_logs/demo
