#!/bin/bash
# `llamadesk bench --vs-llamacpp` on the 1.2B-shaped Q4_0 model and the default model, on the
# AVX-512 path and the AVX2 one (forced), 2 threads: the table of docs/BENCHMARKS.md's r16 section.
#   LLAMACPP=<llama-cpp-python build> HOME_1B=<home with llama-1b> GGUF_1B=<its GGUF> \
#   HOME_DEFAULT=<home with the default model> GGUF_DEFAULT=<its Q4_1 GGUF> tests/bench/llamacpp_pairs.sh
# (the 1.2B: tests/bench/make_1b_gguf.py, then `llamadesk import GGUF --name llama-1b`)
set -u
export PYTHONPATH=$LLAMACPP
for isa in avx512 avx2; do
  if [ $isa = avx2 ]; then export LLAMADESK_ISA=avx2 ATEN_CPU_CAPABILITY=avx2; else unset LLAMADESK_ISA ATEN_CPU_CAPABILITY; fi
  echo "== $isa 1.2B $(date -u +%H:%M) load $(cut -d' ' -f1 /proc/loadavg)"
  LLAMADESK_HOME=$HOME_1B python -m app.cli bench llama-1b:source --prompt-tokens 128 --gen-tokens 64 --runs 3 \
    --threads 2 --vs-llamacpp "$GGUF_1B"
  echo "== $isa default $(date -u +%H:%M) load $(cut -d' ' -f1 /proc/loadavg)"
  LLAMADESK_HOME=$HOME_DEFAULT python -m app.cli bench smollm2-135m-instruct:source --prompt-tokens 512 \
    --gen-tokens 128 --runs 3 --threads 2 --vs-llamacpp "$GGUF_DEFAULT"
done
