"""Side-by-side benchmark: qadapter against its peers, in one run, ending with a table of ratios.

    python benchmarks/bench.py --model tiny|bundled [--model-path DIR] [--repeats 5] [--pairs-batch 4] [--max-length 192]
                               [--new-tokens 64] [--adapt-layers K] [--threads N] [--workers a,b,...] [--tag T]
                               [--data PATH] [--out benchmarks/results]

Sections, each for LoRA on every layer ("all layers") and on the top K layers only ("top-K", ``--adapt-layers``,
default a quarter of the layers; every method gets the same LoRA placement in each)
  train   time per preference pair (median over ``--repeats`` timed steps, after one warm-up step)
          and peak memory of a step, for
            (a) qadapter: QAdapterModel.token_terms + objective.pair_objective + backward + AdamW (as training.py:
                each prompt once per micro-batch, and with top-K the layers below the adapted ones once for both passes);
            (b) TRL DPOTrainer with a PEFT LoRA (same micro-batches, timed by a TrainerCallback);
            (c) an "official-style" step written below, mirroring the public reference code's costs.
  decode  tokens/s of qadapter's customized policy (residual, α₀=0.5, α̃=1, non-zero LoRA, so both
          passes run) against the base model alone (HF ``generate`` with KV cache), batch 1 and 8,
          the same number of new tokens for both; and the base through qadapter's own decoder
          (``generate_ids(policy="base")``) against HF ``generate``, so per-token Python overhead shows.

Every method runs in its own subprocess (``--worker NAME``) so that its peak memory is its own.
Each worker rebuilds the same token-id plan (pairs, micro-batches, prompts) and reports its digest;
the parent refuses to compare runs whose plans differ. ``--model tiny`` uses the tiny random Llama
of tests/conftest.py and its synthetic pairs; ``--model bundled`` uses load_base("bundled") and the
DSP file (prefer="academy"); ``--model-path DIR`` a local model folder (e.g. a larger model with the
bundled model's tokenizer) on the DSP file. On CUDA every method computes in bf16 (qadapter's rule).

Results go to ``<out>/[<tag>-]<model>-<timestamp>.json`` and ``.md``; ``--model bundled`` without a tag
also writes ``<out>/latest.json``. The table of ratios is printed last (ratios are qadapter / peer; for
decode, customized tokens/s / base tokens/s).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DSP = REPO / "src" / "qadapter" / "bundled_data" / "dsp" / "domain_specific_preference.json.gz"  # shipped with qadapter
WORKERS = ("train-qadapter", "train-trl", "train-official", "decode",
           "train-qadapter-topk", "train-trl-topk", "train-official-topk", "decode-topk")
# Method settings shared by (a) and (c); LoRA settings shared by all three (QAdapterConfig's defaults).
ALPHA_0, ALPHA_TILDE, GAMMA, BETA = 1.0, 1.0, 1.0, 0.1
LORA = dict(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"])
DECODE_ALPHA_0, DECODE_ALPHA_TILDE = 0.5, 1.0  # residual form at α₀ ≠ 1: the customized policy needs both passes
DECODE_PROMPTS = 8


# ---------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("tiny", "bundled"), required=True)
    p.add_argument("--model-path", type=Path, help="a local model folder to run instead of the bundled model (same data: DSP); "
                   "results are named after the folder")
    p.add_argument("--adapt-layers", type=int, default=0, help="K of the top-K runs (0: a quarter of the model's layers, at least 1)")
    p.add_argument("--workers", default=",".join(WORKERS), help="comma-separated subset of the workers to run: " + ", ".join(WORKERS))
    p.add_argument("--tag", default="", help="prefix of the result files' names (e.g. gpu); a tagged run leaves latest.json alone")
    p.add_argument("--label", default="", help="the model's name in results (default: tiny, bundled, or the --model-path folder's name)")
    p.add_argument("--repeats", type=int, default=5, help="timed training steps / decode runs per method (after one warm-up)")
    p.add_argument("--pairs-batch", type=int, default=4, help="preference pairs per micro-batch (every method)")
    p.add_argument("--max-length", type=int, default=192, help="max tokens of prompt + response")
    p.add_argument("--new-tokens", type=int, default=64, help="new tokens per decode row")
    p.add_argument("--data", type=Path, default=DEFAULT_DSP, help="DSP file for --model bundled")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads per worker (torch.set_num_threads / OMP_NUM_THREADS); 0 keeps torch's default. "
                   "On a busy machine use fewer threads than free cores: spinning OpenMP threads that lose their core "
                   "make small ops orders of magnitude slower")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    # internal: one measurement in a fresh process
    p.add_argument("--worker", choices=WORKERS, help=argparse.SUPPRESS)
    p.add_argument("--source", help=argparse.SUPPRESS)  # what load_base loads: a folder or "bundled"
    p.add_argument("--result-file", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if min(args.repeats, args.pairs_batch, args.new_tokens) < 1 or args.max_length < 4 or args.threads < 0 or args.adapt_layers < 0:
        p.error("--repeats, --pairs-batch, --new-tokens must be >= 1, --max-length >= 4, --threads, --adapt-layers >= 0")
    unknown = set(args.workers.split(",")) - set(WORKERS)
    if unknown:
        p.error(f"--workers: unknown {', '.join(sorted(unknown))} (known: {', '.join(WORKERS)})")
    if args.model_path is not None and args.model != "bundled":
        p.error("--model-path runs the bundled model's data and settings on another model: use it with --model bundled")
    return args


def label(args: argparse.Namespace) -> str:
    """What the results are named after: tiny, bundled, or the --model-path folder's name."""
    name = args.label or (args.model_path.name if args.model_path is not None else args.model)
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name)  # a file name


# ---------------------------------------------------------------------------------------------
# Shared plan: the same pairs, micro-batches and prompts for every method


@dataclass
class Plan:
    records: list[Any]  # PreferenceRecord per pair, aligned with ``pairs``
    pairs: list[Any]  # TokenizedPair
    batches: list[list[int]]  # 1 warm-up + ``repeats`` micro-batches of pair indices
    prompts: list[list[dict[str, str]]]  # decode prompts (conversations)

    def digest(self) -> str:
        ids = [[(self.pairs[i].prompt, self.pairs[i].chosen, self.pairs[i].rejected) for i in b] for b in self.batches]
        return hashlib.sha256(json.dumps([ids, self.prompts]).encode()).hexdigest()[:16]


def load_records(args: argparse.Namespace, needed_pairs: int) -> list[Any]:
    from qadapter.data import read_records

    if args.model == "tiny":
        sys.path.insert(0, str(REPO / "tests"))
        from conftest import marker_records

        raw = marker_records(n_prompts=needed_pairs // 2 + DECODE_PROMPTS, pairs_per_prompt=4)
        return read_records(raw).records
    records = read_records(args.data, prefer="academy").records
    # File order, trimmed: tokenizing all 2000 DSP pairs in every worker would cost more than the benchmark.
    return records[: 4 * needed_pairs + 4 * DECODE_PROMPTS]


def make_plan(args: argparse.Namespace, tokenizer: Any, extra_eos: Any) -> Plan:
    from qadapter.collate import prompt_grouped_batches, tokenize_pair
    from qadapter.errors import DataError

    needed = (args.repeats + 1) * args.pairs_batch
    records, pairs = [], []
    for record in load_records(args, needed):
        try:  # the trainer's own tokenization and truncation (train.tokenize_records)
            pairs.append(tokenize_pair(record, tokenizer, args.max_length, min(128, args.max_length - 1), extra_eos))
            records.append(record)
        except DataError:
            continue
    # Prompt-grouped like training.py (pairs sharing a prompt are adjacent); only full micro-batches.
    batches = [b for b in prompt_grouped_batches(pairs, args.pairs_batch, seed=0) if len(b) == args.pairs_batch]
    if len(batches) < args.repeats + 1:
        raise SystemExit(f"only {len(batches)} full micro-batches of {args.pairs_batch} pairs; need {args.repeats + 1}")
    prompts: list[list[dict[str, str]]] = []
    for record in records:
        if record.prompt not in prompts:
            prompts.append(record.prompt)
    return Plan(records, pairs, batches[: args.repeats + 1], prompts[:DECODE_PROMPTS])


# ---------------------------------------------------------------------------------------------
# Measuring: wall time and peak memory of a window of steps


def device_and_precision() -> tuple[Any, str]:
    """cuda if available; bf16 where the device has it natively (qadapter's own rule), else float32."""
    from qadapter.hardware import choose_mixed_precision, default_device

    device = default_device()
    return device, choose_mixed_precision(device)


def _rss_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith(field + ":"))


class PeakMemory:
    """Peak memory of a window relative to its start: VmHWM − VmRSS on CPU, allocator peak on CUDA."""

    def __init__(self, device: Any) -> None:
        self.cuda = device.type == "cuda"
        self.base = 0

    def start(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = _rss_kib("VmRSS") * 1024
            with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
                handle.write("5")  # the kernel resets the high-water mark VmHWM to the current RSS

    def peak_bytes(self) -> int:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        return _rss_kib("VmHWM") * 1024 - self.base


def sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def summary(values: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}


def train_result(step_seconds: list[float], peak: int, pairs_per_step: int, rows: list[int], tokens: list[int]) -> dict[str, Any]:
    return {
        "seconds_per_pair": summary([s / pairs_per_step for s in step_seconds]),
        "peak_memory_bytes": peak,
        "rows_per_step": rows,  # sequences actually run through the model per timed step
        "tokens_per_step": tokens,  # rows × padded width
    }


# ---------------------------------------------------------------------------------------------
# Workers


def load(args: argparse.Namespace) -> tuple[Any, Plan, Any, str]:
    from qadapter.model import load_base

    device, precision = device_and_precision()
    base = load_base(args.source, device=device)
    plan = make_plan(args, base.tokenizer, getattr(base.model.generation_config, "eos_token_id", None))
    return base, plan, device, precision


def top_k(args: argparse.Namespace, base: Any) -> int:
    """K of the top-K runs: --adapt-layers, else a quarter of the base's layers (at least 1)."""
    layers = base.model.config.get_text_config().num_hidden_layers
    return min(args.adapt_layers, layers) if args.adapt_layers else max(1, layers // 4)


def adapted_layers(args: argparse.Namespace, base: Any) -> list[int] | None:
    """The layer indices every method puts LoRA on in this worker: all (None), or the top K."""
    if not args.worker.endswith("-topk"):
        return None
    layers = base.model.config.get_text_config().num_hidden_layers
    return list(range(layers - top_k(args, base), layers))


def worker_train_qadapter(args: argparse.Namespace) -> dict[str, Any]:
    """(a) What src/qadapter/training.py does per micro-batch, without accelerate's bookkeeping."""
    import torch

    from qadapter import objective
    from qadapter.collate import collate_pairs
    from qadapter.config import QAdapterConfig
    from qadapter.hardware import autocast
    from qadapter.model import QAdapterModel

    base, plan, device, precision = load(args)
    layers = adapted_layers(args, base)
    config = QAdapterConfig(alpha_0=ALPHA_0, alpha_tilde=ALPHA_TILDE, gamma=GAMMA, beta=BETA, lora_r=LORA["r"],
                            lora_alpha=LORA["lora_alpha"], lora_dropout=LORA["lora_dropout"], target_modules=LORA["target_modules"],
                            adapt_layers=layers)
    qmodel = QAdapterModel.create(base, config)
    params = [p for p in qmodel.peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate)
    pad = qmodel.tokenizer.pad_token_id
    # Collated up front: TRL's callback window also starts after its batch is collated and moved.
    batches = [collate_pairs([plan.pairs[i] for i in b], pad).to(device) for b in plan.batches]
    qmodel.peft_model.train()
    memory, times = PeakMemory(device), []
    for k, batch in enumerate(batches):
        if k == 1:
            memory.start()  # after the warm-up step: optimizer state exists, steady state from here
        sync(device)
        started = time.perf_counter()
        with autocast(device, precision):
            terms = qmodel.token_terms(batch)
            out = objective.pair_objective(terms, batch.chosen_index, batch.rejected_index, gamma=config.gamma, beta=config.beta,
                                           value_state=config.value_state, length_normalize=config.length_normalize)
            loss = out.loss.mean()
            finite = bool(torch.isfinite(loss))  # training.py's per-micro-batch check (a device sync on CUDA)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        if finite and bool(torch.isfinite(grad_norm)):
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        if k >= 1:
            times.append(time.perf_counter() - started)
    rows = [b.input_ids.shape[0] for b in batches[1:]]
    # what the model ran: each distinct prompt once (contexts), then every response after it
    tokens = [b.shared.context_ids.numel() + b.shared.ids.numel() for b in batches[1:]]
    return {**train_result(times, memory.peak_bytes(), args.pairs_batch, rows, tokens), "hidden_path": qmodel.hidden_path,
            "adapted_layers": layers, "shared_trunk_layers": qmodel.trunk.split if qmodel.trunk is not None else 0,
            "plan_digest": plan.digest()}


@dataclass
class PairRows:
    """[chosen rows; rejected rows], right-padded, one row per pair side (no de-duplication)."""

    input_ids: Any
    attention_mask: Any
    completion_mask: Any


def pair_rows(pairs: list[Any], pad: int, device: Any) -> PairRows:
    import torch

    seqs = [(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs]
    width = max(len(a) + len(b) for a, b in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    attention = torch.zeros_like(ids)
    completion = torch.zeros_like(ids)
    for row, (prompt, response) in enumerate(seqs):
        n = len(prompt) + len(response)
        ids[row, :n] = torch.tensor(prompt + response)
        attention[row, :n] = 1
        completion[row, len(prompt) : n] = 1
    return PairRows(ids.to(device), attention.to(device), completion.to(device))


def official_style_loss(peft_model: Any, batch: PairRows) -> Any:
    """The reference implementation's costs, written plainly: two full forwards, full-vocabulary
    float32 logits, a full log-softmax and a materialised (rows, T, V) combined tensor."""
    import torch
    import torch.nn.functional as F

    ids, mask = batch.input_ids, batch.attention_mask
    q = peft_model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()  # (2B, T, V): raw Q
    with peft_model.disable_adapter():  # the base pass; deliberately not under torch.no_grad, as in the reference
        base_logits = peft_model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()  # (2B, T, V)
    base_logp = F.log_softmax(base_logits, dim=-1)  # (2B, T, V)
    combined = (q + ALPHA_0 * base_logp) / ALPHA_TILDE  # (2B, T, V), materialised
    values = ALPHA_TILDE * torch.logsumexp(combined, dim=-1)  # (2B, T): V(s_t)
    q_taken = q[:, :-1].gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)  # (2B, T-1)
    action_mask = batch.completion_mask[:, 1:].float()  # (2B, T-1)
    reward = (q_taken - GAMMA * values[:, :-1]) * action_mask  # r = Q(s_t, a_t) − γ V(s_t)
    seq = reward.sum(-1) / action_mask.shape[1]  # divided by the padded length
    chosen, rejected = seq.chunk(2)
    logits = torch.stack([chosen, rejected], dim=-1)  # (B, 2)
    bt = F.cross_entropy(logits, torch.zeros(chosen.shape[0], dtype=torch.long, device=ids.device))
    return bt + BETA * reward.square().sum() / action_mask.sum().clamp(min=1.0)


def worker_train_official(args: argparse.Namespace) -> dict[str, Any]:
    """(c) The official-style step with the same LoRA, optimizer and clipping as (a)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from qadapter.hardware import autocast

    base, plan, device, precision = load(args)
    torch.manual_seed(0)
    layers = adapted_layers(args, base)
    peft_model = get_peft_model(base.model, LoraConfig(task_type="CAUSAL_LM", layers_to_transform=layers, **LORA))
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=5e-4)
    pad = base.tokenizer.pad_token_id
    batches = [pair_rows([plan.pairs[i] for i in b], pad, device) for b in plan.batches]
    peft_model.train()
    memory, times = PeakMemory(device), []
    for k, batch in enumerate(batches):
        if k == 1:
            memory.start()
        sync(device)
        started = time.perf_counter()
        with autocast(device, precision):
            loss = official_style_loss(peft_model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        if k >= 1:
            times.append(time.perf_counter() - started)
    rows = [b.input_ids.shape[0] for b in batches[1:]]
    tokens = [b.input_ids.numel() for b in batches[1:]]
    return {**train_result(times, memory.peak_bytes(), args.pairs_batch, rows, tokens), "adapted_layers": layers,
            "plan_digest": plan.digest()}


def worker_train_trl(args: argparse.Namespace) -> dict[str, Any]:
    """(b) TRL's DPOTrainer + PEFT LoRA on the same micro-batches, timed by a callback."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    base, plan, device, precision = load(args)
    layers = adapted_layers(args, base)
    order = [i for b in plan.batches for i in b]
    memory = PeakMemory(device)

    class StepTimer(TrainerCallback):
        """Times whole optimizer steps (forward, backward, clip, AdamW, scheduler); skips step 1."""

        def __init__(self) -> None:
            self.times: list[float] = []
            self.started = 0.0
            self.peak = 0

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 1:
                memory.start()
            sync(device)
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            sync(device)
            if state.global_step >= 2:  # global_step is already incremented: 1 = the warm-up step
                self.times.append(time.perf_counter() - self.started)
                self.peak = memory.peak_bytes()

    with tempfile.TemporaryDirectory(prefix="bench-trl-") as out_dir:
        config = DPOConfig(
            output_dir=out_dir,
            per_device_train_batch_size=args.pairs_batch,
            gradient_accumulation_steps=1,
            max_steps=len(plan.batches),
            max_length=args.max_length,
            beta=BETA,
            learning_rate=5e-4,
            optim="adamw_torch",  # the same optimizer as (a) and (c)
            max_grad_norm=1.0,
            gradient_checkpointing=False,  # TRL's default is True; (a) and (c) do not recompute activations
            disable_dropout=False,  # keep LoRA dropout 0.05 active, as in (a) and (c)
            bf16=precision == "bf16",
            fp16=False,
            use_cpu=device.type == "cpu",
            train_sampling_strategy="sequential",  # the plan's micro-batches, in the plan's order
            eval_strategy="no",
            save_strategy="no",
            logging_strategy="no",
            report_to="none",
            disable_tqdm=True,
            dataloader_num_workers=0,
            seed=0,
        )
        # DPOTrainer's public input is text, which it tokenizes and truncates in its own way ("keep_start").
        text = Dataset.from_list([{"prompt": plan.records[i].prompt, "chosen": plan.records[i].chosen,
                                   "rejected": plan.records[i].rejected} for i in order])
        timer = StepTimer()
        trainer = DPOTrainer(
            model=base.model,
            args=config,
            train_dataset=text,
            processing_class=base.tokenizer,
            peft_config=LoraConfig(task_type="CAUSAL_LM", layers_to_transform=layers, **LORA),
            callbacks=[timer],
        )
        # To run exactly the token ids (a) and (c) run, swap in the plan's ids in TRL's tokenized layout.
        # Count first how many pairs TRL's own tokenization already gave identically (all, unless truncated).
        same = sum(
            (row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]) == tuple(map(list, (p.prompt, p.chosen, p.rejected)))
            for row, p in zip(trainer.train_dataset, (plan.pairs[i] for i in order))
        )
        trainer.train_dataset = Dataset.from_list(
            [{"prompt_ids": list(p.prompt), "chosen_ids": list(p.chosen), "rejected_ids": list(p.rejected)}
             for p in (plan.pairs[i] for i in order)]
        )
        trainer.train()
    if len(timer.times) != args.repeats:
        raise RuntimeError(f"TRL ran {len(timer.times) + 1} steps, expected {args.repeats + 1}")
    widths = [max(len(p.prompt) + max(len(p.chosen), len(p.rejected)) for p in (plan.pairs[i] for i in b)) for b in plan.batches[1:]]
    rows = [2 * args.pairs_batch] * args.repeats
    tokens = [r * w for r, w in zip(rows, widths)]
    return {**train_result(timer.times, timer.peak, args.pairs_batch, rows, tokens), "plan_digest": plan.digest(),
            "adapted_layers": layers, "trl_own_tokenization_identical_pairs": f"{same} of {len(order)}"}


def worker_decode(args: argparse.Namespace) -> dict[str, Any]:
    """Customized policy (both passes) vs the base alone (HF ``generate``), same prompts and number of new
    tokens, repeats interleaved so that load changes on the machine hit all alike; in the all-layers worker
    also the base through qadapter's own decoder, against the same HF ``generate``."""
    import torch

    from qadapter.config import DecodeConfig, QAdapterConfig
    from qadapter.decode import encode_prompts, generate_ids
    from qadapter.model import QAdapterModel

    base, plan, device, _ = load(args)
    layers = adapted_layers(args, base)
    qmodel = QAdapterModel.create(
        base, QAdapterConfig(q_form="residual", alpha_0=DECODE_ALPHA_0, alpha_tilde=DECODE_ALPHA_TILDE, adapt_layers=layers)
    )
    with torch.no_grad():  # a fresh LoRA has B = 0, i.e. Q ≡ 0; give it weights like a trained one
        generator = torch.Generator().manual_seed(0)
        for name, param in qmodel.peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    qmodel.peft_model.eval()
    decode_config = DecodeConfig(  # min = max: every method generates exactly --new-tokens per row
        max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, temperature=0.0, alpha_0=DECODE_ALPHA_0, alpha_tilde=DECODE_ALPHA_TILDE
    )
    pad = qmodel.tokenizer.pad_token_id
    result: dict[str, Any] = {"plan_digest": plan.digest(), "adapted_layers": layers,
                              "shared_trunk_layers": qmodel.trunk.split if qmodel.trunk is not None else 0}
    for rows in (1, 8):
        prompts = (plan.prompts * rows)[:rows]  # repeated if the plan has fewer distinct prompts
        ids, mask = encode_prompts(qmodel.tokenizer, prompts)
        ids, mask = ids.to(device), mask.to(device)

        def customized() -> int:
            return generate_ids(qmodel, ids, mask, decode_config).shape[1]

        def base_qadapter() -> int:
            return generate_ids(qmodel, ids, mask, decode_config, policy="base").shape[1]

        steps = customized()  # warm-up; greedy, so every repeat takes the same number of steps

        def base_only() -> int:
            with qmodel.peft_model.disable_adapter():
                out = qmodel.peft_model.generate(input_ids=ids, attention_mask=mask, do_sample=False, min_new_tokens=steps,
                                                 max_new_tokens=steps, pad_token_id=pad)
            return out.shape[1] - ids.shape[1]

        methods = {"customized": customized, "base": base_only}
        if layers is None:
            methods["base_qadapter"] = base_qadapter
        for run in list(methods.values())[1:]:
            run()  # warm-up
        timings: dict[str, list[float]] = {name: [] for name in methods}
        for _ in range(args.repeats):
            for name, run in methods.items():
                sync(device)
                started = time.perf_counter()
                n = run()
                sync(device)
                if n != steps:
                    raise RuntimeError(f"{name} generated {n} steps, expected {steps}")
                timings[name].append(rows * steps / (time.perf_counter() - started))
        result[f"batch{rows}"] = {
            "new_tokens_requested": args.new_tokens,
            "steps": steps,  # new tokens per row, every method
            "tokens_per_run": rows * steps,
            **{f"{name}_tokens_per_s": summary(values) for name, values in timings.items()},
        }
    return result


def run_worker(args: argparse.Namespace) -> None:
    import torch

    torch.manual_seed(0)
    fn = {"train-qadapter": worker_train_qadapter, "train-trl": worker_train_trl,
          "train-official": worker_train_official, "decode": worker_decode}[args.worker.removesuffix("-topk")]
    if args.threads:
        torch.set_num_threads(args.threads)
    result = fn(args)
    result["torch_threads"] = torch.get_num_threads()  # checked afterwards: a library could have changed it
    write_atomic(args.result_file, json.dumps(result))


# ---------------------------------------------------------------------------------------------
# Parent: build the model, run the workers, report


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def build_tiny(folder: Path) -> None:
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import build_model, build_tokenizer

    tokenizer = build_tokenizer()
    build_model(len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def machine() -> dict[str, Any]:
    import torch

    cpu = "unknown"
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), cpu)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load_average_at_start": os.getloadavg(),  # the benchmark shares the machine with whatever else runs
        "omp_env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS") if k in os.environ},
        "torch": torch.__version__,
        "gpu": gpu,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def warn_if_busy(args: argparse.Namespace, info: dict[str, Any]) -> None:
    """On a loaded CPU, OpenMP threads that spin-wait for a descheduled partner make small ops 10–100× slower,
    at random: a measurement of the machine's contention, not of the methods."""
    if info["gpu"] is None and not args.threads and "OMP_WAIT_POLICY" not in os.environ:
        load = info["load_average_at_start"][0]
        if load > 0.5:
            print(f"[bench] warning: load average {load:.1f} on {info['cores']} cores before starting; with every core "
                  "per worker, timings may measure OpenMP spin-waiting. Consider --threads 1 (or fewer than the idle "
                  "cores) or OMP_WAIT_POLICY=PASSIVE.", file=sys.stderr, flush=True)


def worker_command(args: argparse.Namespace, name: str, source: str, result_file: Path) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--source", source, "--result-file", str(result_file),
            "--model", args.model, "--repeats", str(args.repeats), "--pairs-batch", str(args.pairs_batch),
            "--max-length", str(args.max_length), "--new-tokens", str(args.new_tokens), "--data", str(args.data),
            "--threads", str(args.threads), "--adapt-layers", str(args.adapt_layers)]


def run_worker_process(args: argparse.Namespace, name: str, source: str, env: dict[str, str], tmp: Path) -> dict[str, Any]:
    result_file = tmp / f"{name}.json"
    result_file.unlink(missing_ok=True)
    started = time.perf_counter()
    proc = subprocess.run(worker_command(args, name, source, result_file), env=env, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0 or not result_file.is_file():
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"worker {name} failed (exit {proc.returncode})")
    print(f"[bench] {name}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    return json.loads(result_file.read_text())


def run_workers(args: argparse.Namespace, source: str, cuda: bool) -> dict[str, dict[str, Any]]:
    """Every selected worker once for timing; on CPU each training worker once more for memory (see below)."""
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    if args.threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
    # glibc raises its mmap threshold (up to 32 MiB) after each freed large block, then keeps freed heap resident:
    # after the warm-up step, a step's activations reuse that memory and never show in peak RSS. A fixed threshold
    # returns large freed tensors to the kernel at once, so RSS follows live memory; it also adds page faults, so
    # times come from a run with the default allocator. (CUDA's allocator statistics need none of this.)
    memory_env = dict(env, MALLOC_MMAP_THRESHOLD_="65536")
    selected = [name for name in WORKERS if name in args.workers.split(",")]
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-results-") as tmp:
        for name in selected:
            results[name] = run_worker_process(args, name, source, env, Path(tmp))
            if name.startswith("train-") and not cuda:
                memory_run = run_worker_process(args, name, source, memory_env, Path(tmp))
                results[name]["peak_memory_bytes_default_malloc"] = results[name]["peak_memory_bytes"]
                results[name]["peak_memory_bytes"] = memory_run["peak_memory_bytes"]
                results[name]["memory_run_digest"] = memory_run["plan_digest"]
    digests = {name: r["plan_digest"] for name, r in results.items()} | {
        f"{name} (memory run)": r["memory_run_digest"] for name, r in results.items() if "memory_run_digest" in r
    }
    if len(set(digests.values())) != 1:
        raise SystemExit(f"workers ran different plans: {digests}")
    return results


def ratios(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """The ratios the selected workers allow: qadapter / peer with the same LoRA placement (``…_topk``: every
    method on the top K layers), decode customized / base, and the base through qadapter / through HF generate."""
    out: dict[str, float] = {}

    def t(r: dict[str, Any]) -> float:
        return r["seconds_per_pair"]["median"]

    def m(r: dict[str, Any]) -> float:
        return max(r["peak_memory_bytes"], 1)

    for suffix in ("", "-topk"):
        key = suffix.replace("-", "_")
        a = results.get(f"train-qadapter{suffix}")
        for peer, name in (("trl", "trl_dpo"), ("official", "official")):
            b = results.get(f"train-{peer}{suffix}")
            if a is not None and b is not None:
                out[f"train_time_ratio_vs_{name}{key}"] = t(a) / t(b)
                out[f"peak_memory_ratio_vs_{name}{key}"] = m(a) / m(b)
        d = results.get(f"decode{suffix}")
        for rows in (1, 8) if d is not None else ():
            tok = d[f"batch{rows}"]
            out[f"decode_ratio_vs_base_batch{rows}{key}"] = tok["customized_tokens_per_s"]["median"] / tok["base_tokens_per_s"]["median"]
            if "base_qadapter_tokens_per_s" in tok:
                out[f"decode_base_qadapter_vs_transformers_batch{rows}"] = (
                    tok["base_qadapter_tokens_per_s"]["median"] / tok["base_tokens_per_s"]["median"]
                )
    if "train-qadapter-topk" in results and "train-official" in results:  # the lever against the reference as published
        out["train_time_ratio_topk_vs_official_all_layers"] = t(results["train-qadapter-topk"]) / t(results["train-official"])
    return out


TARGETS = {  # the targets: (key, at most / at least, bound)
    "train_time_ratio_vs_official": ("≤", 0.5), "train_time_ratio_vs_trl_dpo": ("≤", 0.8),
    "peak_memory_ratio_vs_official": ("≤", 0.5), "decode_ratio_vs_base_batch1": ("≥", 0.85),
}


def markdown(report: dict[str, Any]) -> tuple[str, str]:
    """(details, ratio table); the ratio table is what gets printed last."""
    res, r = report["results"], report["ratios"]
    names = {"train-qadapter": "(a) qadapter", "train-trl": "(b) TRL DPOTrainer + LoRA", "train-official": "(c) official-style"}
    k = report.get("top_k")
    lines = [f"### Training step, {report['model']} model, {report['pairs_batch']} pairs per micro-batch, max length "
             f"{report['max_length']}, {report['repeats']} timed steps after 1 warm-up",
             "", "| method | LoRA on | ms per pair, median [min–max] | peak memory of a step, MiB | rows per step | tokens per step (padded, as run) |",
             "|---|---|---|---|---|---|"]
    for suffix, placement in (("", "all layers"), ("-topk", f"top {k} layers")):
        for key, method in names.items():
            if key + suffix not in res:
                continue
            w = res[key + suffix]
            s = w["seconds_per_pair"]
            lines.append(f"| {method} | {placement} | {s['median'] * 1e3:.2f} [{s['min'] * 1e3:.2f}–{s['max'] * 1e3:.2f}] | "
                         f"{w['peak_memory_bytes'] / 2**20:.1f} | {statistics.median(w['rows_per_step']):g} | "
                         f"{statistics.median(w['tokens_per_step']):g} |")
    lines += ["", f"### Decoding, greedy, new tokens per row as shown, median of {report['repeats']} runs",
              "", "| LoRA on | batch | new tokens per row | customized tok/s | base tok/s (HF generate) | base tok/s (qadapter's decoder) |",
              "|---|---|---|---|---|---|"]

    def tok(d: dict[str, Any], name: str) -> str:
        v = d.get(f"{name}_tokens_per_s")
        return f"{v['median']:.1f} [{v['min']:.1f}–{v['max']:.1f}]" if v else "—"

    for suffix, placement in (("", "all layers"), ("-topk", f"top {k} layers")):
        for rows in (1, 8):
            if "decode" + suffix not in res:
                continue
            d = res["decode" + suffix][f"batch{rows}"]
            lines.append(f"| {placement} | {rows} | {d['steps']} of {d['new_tokens_requested']} | {tok(d, 'customized')} | "
                         f"{tok(d, 'base')} | {tok(d, 'base_qadapter')} |")
    m = report["machine"]
    threads = ", ".join(map(str, m["torch_threads"]))
    lines += ["", f"Machine: {m['cpu']}, {m['cores']} cores (torch threads per worker: {threads}), GPU {m['gpu'] or 'none'}, "
              f"torch {m['torch']}, precision {report['precision']}, load average at start "
              f"{', '.join(f'{x:.2f}' for x in m['load_average_at_start'])}."]
    table = ["| ratio (qadapter / peer; decode: customized / base) | value | target |", "|---|---|---|"]
    for key, value in r.items():
        base_key = key.removesuffix("_topk")
        target = TARGETS.get(base_key)
        mark = ""
        if target is not None:
            sign, bound = target
            met = value <= bound if sign == "≤" else value >= bound
            mark = f"{sign} {bound} {'met' if met else 'not met'}"
        table.append(f"| `{key}` | {value:.3f} | {mark} |")
    return "\n".join(lines), "\n".join(table)


def main(args: argparse.Namespace) -> None:
    from qadapter.hardware import precision_name

    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = label(args)
    with tempfile.TemporaryDirectory(prefix="bench-tiny-llama-") as tiny_dir:
        if args.model == "tiny":
            build_tiny(Path(tiny_dir))
            source = tiny_dir
        else:
            source = str(args.model_path) if args.model_path is not None else "bundled"
        info = machine()
        warn_if_busy(args, info)
        results = run_workers(args, source, cuda=info["gpu"] is not None)
    info["torch_threads"] = sorted({r["torch_threads"] for r in results.values()})  # as the workers ran
    top = next((r["adapted_layers"] for n, r in results.items() if n.endswith("-topk") and r.get("adapted_layers")), None)
    _, precision = device_and_precision()
    report = {"model": name, "timestamp": stamp, "repeats": args.repeats, "pairs_batch": args.pairs_batch,
              "max_length": args.max_length, "new_tokens": args.new_tokens, "top_k": len(top) if top else None,
              "top_k_layers": top, "precision": precision_name(precision), "machine": info, "results": results,
              "ratios": ratios(results), "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])}
    details, table = markdown(report)
    prefix = f"{args.tag}-" if args.tag else ""
    write_atomic(args.out / f"{prefix}{name}-{stamp}.json", json.dumps(report, indent=2) + "\n")
    md = f"# qadapter benchmark\n\n`python {report['command']}`\n\n{details}\n\n{table}\n"
    write_atomic(args.out / f"{prefix}{name}-{stamp}.md", md)
    if args.model == "bundled" and args.model_path is None and not args.tag:
        latest = {"machine": info, "model": name, "repeats": args.repeats, "timestamp": stamp, "top_k": report["top_k"],
                  "precision": report["precision"], **report["ratios"]}
        write_atomic(args.out / "latest.json", json.dumps(latest, indent=2) + "\n")
    print(details + "\n")
    print(table)


if __name__ == "__main__":
    parsed = parse_args()
    if parsed.worker:
        run_worker(parsed)
    else:
        main(parsed)
