#!/usr/bin/env bash
# The trainer on a CUDA GPU, checked in one go (no test of the suite needs a GPU; this is the
# check for the machines that have one).
#
#   1. `wapo train` on a tiny random Llama (the tests' char-level one) on the tests' `test_digit`
#      task (mixed rewards from the first step, so every step trains), 4 steps with two updates
#      per batch (ratios and clipping matter), in float32 and under bf16 (training autocast and
#      the bf16 sampling copy); then resumed to step 6 and compared number by number with the
#      same 6 steps run without a stop.
#   2. The whole test suite with the GPU visible: the trainer's `--device auto` picks CUDA, so
#      every test that trains, samples, checkpoints or resumes runs there.
#   3. The tests that failed, again with the GPU hidden: a failure that is not CUDA's (another
#      torch or transformers release on that machine) is told apart from one that is.
#   4. Determinism: `wapo sft` of the tiny model on multi-hop demonstrations (longer sequences
#      than part 1's), twice uninterrupted and once stopped after step 1 and resumed, with
#      CUDA's default kernels and with `torch.use_deterministic_algorithms(True)`: the largest
#      weight difference between the two uninterrupted runs, and between one and the resumed.
#
# Usage, on a machine with a GPU and the project's dependencies importable (parts 2 and 3 also
# need pytest-xdist and pytest-timeout, which are not among them):
#   bash benchmarks/cuda_check.sh OUTDIR        (DEVICE=cpu: parts 1 and 4 on the CPU; PARTS=14
#                                                runs parts 1 and 4 only)
# Writes OUTDIR/summary.txt (what to read), train.log, gpu_suite.log, cpu_rerun.log, train_*.jsonl.
set -u
OUT_DIR=${1:?usage: cuda_check.sh OUTDIR}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 OMP_WAIT_POLICY=PASSIVE CUBLAS_WORKSPACE_CONFIG=:4096:8
PARTS=${PARTS:-1234}
summary="$OUT_DIR/summary.txt"
: > "$summary"

"$PY" - <<'EOF' >> "$summary"
import torch, transformers
print(f"torch {torch.__version__}, transformers {transformers.__version__}, cuda {torch.cuda.is_available()}",
      f"({torch.cuda.get_device_name(0)}, bf16 {torch.cuda.is_bf16_supported()})" if torch.cuda.is_available() else "")
EOF

# 1. `wapo train` on the device, stopped and resumed (in fresh folders: wapo never reuses a run's).
if [[ $PARTS == *1* ]]; then
rm -rf "$OUT_DIR"/.tiny "$OUT_DIR"/.run_*
timeout 180 "$PY" - "$OUT_DIR" "$summary" > "$OUT_DIR/train.log" 2>&1 <<'EOF'
import json, os, sys
from pathlib import Path
sys.path.insert(0, "tests")
import torch
from conftest import char_tokenizer  # also registers the test_digit environment
from transformers import AutoModelForCausalLM, LlamaConfig
from wapo.cli import main

out, summary = Path(sys.argv[1]), open(sys.argv[2], "a")
def say(*parts):
    print(*parts, file=summary, flush=True)

tok = char_tokenizer()
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  bos_token_id=None, eos_token_id=1, pad_token_id=0, tie_word_embeddings=True)
tiny = out / ".tiny"
AutoModelForCausalLM.from_config(cfg).save_pretrained(tiny)
tok.save_pretrained(tiny)
device = os.environ.get("DEVICE", "cuda")
keys = ["step", "reward_mean", "entropy", "mismatch_abs_logp", "mismatch_ratio_max", "grad_norm", "peak_memory_mb"]
for precision, on in (("fp32", "false"), ("bf16", "true")):
    run, straight_run = out / f".run_{precision}", out / f".run_{precision}_straight"
    common = ["--model", str(tiny), "--device", device, "--env", "test_digit", "--prompts-per-step", "8",
              "--samples-per-prompt", "8", "--max-new-tokens", "16", "--temperature", "1.5", "--eval-size", "3",
              "--updates-per-batch", "2", "--lr", "1e-3", "--seed", "0", "--bf16", on, "--bf16-sampling", on]
    try:
        first = main(["train", *common, "--output-dir", str(run), "--steps", "4"])
        second = main(["train", *common, "--steps", "6", "--resume", str(run)])
        straight = main(["train", *common, "--output-dir", str(straight_run), "--steps", "6"])
        rows, rows_straight = ([json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
                               for folder in (run, straight_run))
    except BaseException as e:  # report it and go on to the next precision
        say(f"wapo train on {device}, {precision}: raised {type(e).__name__}: {e}")
        continue
    (out / f"train_{precision}.jsonl").write_text((run / "metrics.jsonl").read_text())
    say(f"wapo train on {device}, {precision}: exit {first}, resumed to step 6: exit {second}, {len(rows)} metric rows;"
        f" the same 6 steps without a stop: exit {straight}")
    for r in rows:
        say("   ", "  ".join(f"{k}={r[k]:.5g}" if isinstance(r.get(k), float) else f"{k}={r.get(k)}" for k in keys))
    # Stopped at step 4 and resumed, against no stop: every logged metric but timings and memory, at
    # every step (a count or a null that differs counts as a difference of 1).
    if not rows or len(rows) != len(rows_straight):
        say(f"    resumed vs uninterrupted: {len(rows)} against {len(rows_straight)} metric rows, not compared")
        continue

    def gap(a, b):
        numbers = all(isinstance(x, (int, float)) for x in (a, b))
        return abs(a - b) if numbers else float(a != b)

    differ = {k: max(gap(a.get(k), b.get(k)) for a, b in zip(rows, rows_straight))
              for k in rows[0] if not k.startswith(("time", "s_", "peak_memory")) and "per_s" not in k}
    moved = sorted(((k, v) for k, v in differ.items() if v > 0), key=lambda kv: -kv[1])
    say(f"    resumed vs uninterrupted, {len(rows)} steps: {len(differ) - len(moved)} of {len(differ)} logged metrics"
        f" identical at every step; the largest differences: {moved[:6]}")
EOF
echo "(part 1 exit $?)" >> "$summary"
fi
[ "${DEVICE:-cuda}" = cuda ] || PARTS=${PARTS//[23]/}  # the suite on the CPU is `make test`

# 2. The suite with the GPU visible, split over the cores by xdist (each worker has its own
#    session fixtures and temporary folders).
workers=${WORKERS:-8}
if [[ $PARTS == *2* ]]; then
timeout 270 "$PY" -m pytest -q --maxfail=40 -n "$workers" -o cache_dir="$OUT_DIR/.cache" \
    --timeout 200 -rfE tests > "$OUT_DIR/gpu_suite.log" 2>&1
echo "suite with the GPU visible: exit $? -- $(tail -n 1 "$OUT_DIR/gpu_suite.log")" >> "$summary"
grep -E "^(FAILED|ERROR)" "$OUT_DIR/gpu_suite.log" | cut -c1-300 >> "$summary"
fi

# 3. What failed, again with the GPU hidden.
if [[ $PARTS == *3* ]] && grep -q -E "^(FAILED|ERROR)" "$OUT_DIR/gpu_suite.log" 2>/dev/null; then
    CUDA_VISIBLE_DEVICES="" timeout 120 "$PY" -m pytest -q --lf -n "$workers" -o cache_dir="$OUT_DIR/.cache" \
        --timeout 100 -rfE tests > "$OUT_DIR/cpu_rerun.log" 2>&1
    echo "the failures rerun with the GPU hidden: exit $? -- $(tail -n 1 "$OUT_DIR/cpu_rerun.log")" >> "$summary"
    grep -E "^(FAILED|ERROR)" "$OUT_DIR/cpu_rerun.log" | cut -c1-300 >> "$summary"
fi

# 4. Determinism of the kernels, and of the resume, on the device.
for mode in default deterministic; do
    [[ $PARTS == *4* ]] || break
    rm -rf "$OUT_DIR/.sft_$mode"
    timeout 120 "$PY" - "$OUT_DIR/.sft_$mode" "$mode" "$summary" > "$OUT_DIR/sft_$mode.log" 2>&1 <<'EOF'
import os, sys
from pathlib import Path
sys.path.insert(0, "tests")
import torch
from conftest import char_tokenizer
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig
from wapo.cli import main

out, mode, summary = Path(sys.argv[1]), sys.argv[2], open(sys.argv[3], "a")
torch.use_deterministic_algorithms(mode == "deterministic")
tok = char_tokenizer()
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, bos_token_id=None, eos_token_id=1, pad_token_id=0,
                  tie_word_embeddings=True)
tiny = out / "tiny"
AutoModelForCausalLM.from_config(cfg).save_pretrained(tiny)
tok.save_pretrained(tiny)
world = {"n_entities": 40, "n_train": 12, "n_eval": 6, "max_observation_words": 30}  # tests/test_sft.py's
device = os.environ.get("DEVICE", "cuda")  # a resume keeps the run's


def sft(run, *extra):
    return main(["sft", "--model", str(tiny), "--device", device, "--env", "multihop", "--env-options",
                 *[f"{k}={v}" for k, v in world.items()], "--max-length", "4000", "--batch-size", "3",
                 "--micro-batch-size", "2", "--lr", "1e-3", "--warmup-steps", "0", "--output-dir", str(run),
                 "--progress", "false", *extra])


a, b, resumed = out / "a", out / "b", out / "resumed"
codes = [sft(a, "--steps", "2"), sft(b, "--steps", "2"), sft(resumed, "--steps", "1"),
         main(["sft", "--resume", str(resumed), "--steps", "2"])]
weights = {run: load_file(str(run / "model" / "model.safetensors")) for run in (a, b, resumed)}
for x, y, what in ((a, b, "two uninterrupted runs"), (a, resumed, "uninterrupted vs resumed after step 1")):
    diff = {k: float((weights[x][k] - weights[y][k]).abs().max()) for k in weights[x]}
    print(f"sft on {device}, {mode} kernels, {what}:"
          f" {sum(v == 0 for v in diff.values())} of {len(diff)} weight tensors equal, largest difference"
          f" {max(diff.values()):.2g} (exits {codes})", file=summary, flush=True)
EOF
    code=$?
    [ $code = 0 ] || echo "(part 4, $mode kernels: exit $code, see sft_$mode.log)" >> "$summary"
done
