"""The ``qadapter`` command line: a table of contents, one function per command.

torch and transformers are imported inside the commands so ``qadapter --help`` is instant.
Known errors print as one line; set QADAPTER_DEBUG=1 for the traceback.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import sys
import typing
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

from .config import DecodeConfig, QAdapterConfig
from .errors import ConfigError, QAdapterError

app = typer.Typer(
    name="qadapter",
    help="Customize a pre-trained LLM to new preferences without forgetting (Q-Adapter, arXiv 2407.03856).",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)

DEFAULT_DATA = "dsp/domain_specific_preference.json"  # relative to the shared data folder
DEFAULT_PREFER = "academy"


def shared_data_dir() -> Path:
    """The folder of bundled public datasets: $QADAPTER_DATA_DIR, else ../shared/data from the
    current folder or from this checkout."""
    candidates = [os.environ.get("QADAPTER_DATA_DIR"), Path.cwd().parent / "shared" / "data", Path(__file__).resolve().parents[3] / "shared" / "data"]
    for candidate in candidates:
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    raise ConfigError("no default data folder found: pass --data FILE, or set QADAPTER_DATA_DIR to the shared data folder")


def config_options(config_cls: type, panel: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Add one option per field of ``config_cls`` to a command, with the field's type, default
    and help text, so the CLI never restates the config. The command receives them in ``**options``."""
    hints = typing.get_type_hints(config_cls)

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        signature = inspect.signature(func)
        own = typing.get_type_hints(func, include_extras=True)  # resolve postponed annotations
        params = [
            p.replace(annotation=own.get(p.name, p.annotation))
            for p in signature.parameters.values()
            if p.kind is not inspect.Parameter.VAR_KEYWORD
        ]
        for f in dataclasses.fields(config_cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            hint = hints[f.name]
            if typing.get_origin(hint) is typing.Union or type(hint).__name__ == "UnionType":  # X | None
                hint = Optional[next(a for a in typing.get_args(hint) if a is not type(None))]
            option = typer.Option(help=f.metadata.get("help", ""), rich_help_panel=panel)
            params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[hint, option]))
        func.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
        return func

    return decorate


def pick(config_cls: type, options: dict[str, Any]) -> Any:
    names = {f.name for f in dataclasses.fields(config_cls)}
    return config_cls(**{k: v for k, v in options.items() if k in names})


def _console():
    from rich.console import Console

    return Console(stderr=True)


@app.command(rich_help_panel="Train")
@config_options(QAdapterConfig, "Q-Adapter settings")
def train(
    model: Annotated[str, typer.Option(help="Base model: 'bundled' (SmolLM2-135M-Instruct), a hub id, a local folder, or a .gguf file.")] = "bundled",
    data: Annotated[Optional[str], typer.Option(help="Preference data: .jsonl/.json(.gz) file or a datasets name. Default: DSP from the shared data folder.")] = None,
    prefer: Annotated[Optional[str], typer.Option(help="For multi-response records ({query, responses: {style: text}}): the preferred style.")] = None,
    output: Annotated[Path, typer.Option(help="Run folder: adapter/, metrics.json, checkpoints/.")] = Path("runs/qadapter"),
    eval_fraction: Annotated[float, typer.Option(help="Fraction of prompts held out for evaluation (split by prompt, never by pair).")] = 0.2,
    max_train_pairs: Annotated[Optional[int], typer.Option(help="Use at most this many training pairs (whole prompts).")] = None,
    max_eval_pairs: Annotated[Optional[int], typer.Option(help="Evaluate on at most this many held-out pairs (whole prompts).")] = 120,
    eval_every: Annotated[Optional[int], typer.Option(help="Evaluate every N steps (default: 4 times per run).")] = None,
    save_every: Annotated[Optional[int], typer.Option(help="Checkpoint every N steps (default: with each evaluation).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --output from its latest checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing run in --output.")] = False,
    skip_invalid: Annotated[bool, typer.Option(help="Skip malformed records (counted and reported) instead of stopping.")] = False,
    on_nonfinite: Annotated[str, typer.Option(help="On a NaN/inf loss or gradient: 'skip' the update or 'stop' the run.")] = "skip",
    mixed_precision: Annotated[str, typer.Option(help="'auto' (bf16 only where the hardware has it), 'no', 'bf16' or 'fp16'.")] = "auto",
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
    num_processes: Annotated[int, typer.Option(help="Data-parallel processes on this machine (runs `accelerate launch` for you).")] = 1,
    **options: Any,
) -> None:
    """Train a Q-Adapter on preference pairs and report held-out preference accuracy before and after."""
    config = pick(QAdapterConfig, options)
    if num_processes > 1 and "WORLD_SIZE" not in os.environ:
        raise typer.Exit(_relaunch(num_processes))
    from .data import read_records, split_by_prompt
    from .train import TrainingInterrupted, train as run_training

    console = _console()
    if data is None:
        data, prefer = str(shared_data_dir() / DEFAULT_DATA), prefer or DEFAULT_PREFER
    report = read_records(data, prefer=prefer, skip_invalid=skip_invalid)
    if report.skipped:
        console.print(f"skipped {len(report.skipped)} record(s), e.g. {report.skipped[0]}")
    train_records, eval_records = split_by_prompt(report.records, eval_fraction, seed=config.seed)
    train_records, eval_records = _limit(train_records, max_train_pairs), _limit(eval_records, max_eval_pairs)
    console.print(f"data: {data} ({len(report.records)} pairs) → {len(train_records)} train / {len(eval_records)} held-out pairs")
    run_info = {"data": data, "prefer": prefer, "command": " ".join(["qadapter", *sys.argv[1:]])}
    try:
        result = run_training(
            config,
            train_records,
            eval_records,
            output,
            model=model,
            resume=resume,
            overwrite=overwrite,
            eval_every=eval_every,
            save_every=save_every,
            on_nonfinite=on_nonfinite,
            mixed_precision=mixed_precision,
            progress=progress,
            log=console.print,
            run_info=run_info,
        )
    except TrainingInterrupted as exc:
        console.print(f"{exc}\nresume with: qadapter {' '.join(a for a in sys.argv[1:] if a not in ('--overwrite', '--resume'))} --resume")
        raise typer.Exit(130) from None
    m = result.metrics
    console.print(
        f"held-out preference accuracy: {m['pref_accuracy_before']:.3f} → {m['pref_accuracy_after']:.3f} "
        f"on {m['n_eval_pairs']} pairs; training took {m['train_seconds'] / 60:.1f} min\n"
        f"adapter: {result.adapter_dir}   metrics: {output / 'metrics.json'}"
    )


def _relaunch(num_processes: int) -> int:
    """Run this same command under `accelerate launch` with ``num_processes`` workers; return its exit code."""
    import subprocess

    args, rest = [], iter(sys.argv[1:])
    for arg in rest:  # the same command minus --num-processes N / --num-processes=N
        if arg == "--num-processes":
            next(rest, None)
        elif not arg.startswith("--num-processes="):
            args.append(arg)
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes)]
    return subprocess.call([*launcher, "-m", "qadapter", *args])


def _limit(records: list, max_pairs: int | None) -> list:
    """The first whole prompts whose pairs fit in ``max_pairs`` (at least one prompt)."""
    if max_pairs is None or len(records) <= max_pairs:
        return records
    kept, seen = [], set()
    for record in records:
        if record.prompt_key not in seen and len(kept) >= max_pairs:
            break
        seen.add(record.prompt_key)
        kept.append(record)
    return kept


def _adapter_path(path: Path) -> Path:
    """Accept a run folder as well as its adapter/ folder."""
    return path / "adapter" if (path / "adapter" / "qadapter_config.json").is_file() else path


@app.command(rich_help_panel="Use")
@config_options(DecodeConfig, "Decoding")
def generate(
    prompt: Annotated[list[str], typer.Argument(help="One or more prompts (each becomes a user turn of the chat template).")],
    adapter: Annotated[Path, typer.Option(help="Adapter folder (or a run folder holding adapter/).")],
    compare: Annotated[bool, typer.Option(help="Also print the base model's answer, side by side.")] = False,
    chat: Annotated[bool, typer.Option(help="Wrap prompts in the chat template (when the tokenizer has one).")] = True,
    model: Annotated[Optional[str], typer.Option(help="Load this base instead of the one recorded in the adapter.")] = None,
    allow_base_mismatch: Annotated[bool, typer.Option(help="Use a base model that differs from the recorded one.")] = False,
    **options: Any,
) -> None:
    """Generate with the customized policy (Q + α₀ log π₁)/α̃; override α₀/α̃ without retraining."""
    from rich.console import Console
    from rich.table import Table

    from .decode import generate as run_generate
    from .model import QAdapterModel

    decode = pick(DecodeConfig, options)
    qmodel = QAdapterModel.from_pretrained(_adapter_path(adapter), model=model, allow_base_mismatch=allow_base_mismatch)
    answers = run_generate(qmodel, prompt, decode, chat=chat)
    console = Console()
    if not compare:
        for text in answers:
            console.print(text, markup=False, highlight=False)
        return
    base_answers = run_generate(qmodel, prompt, decode, policy="base", chat=chat)
    alpha_0 = decode.alpha_0 or qmodel.config.alpha_0
    alpha_tilde = decode.alpha_tilde or qmodel.config.alpha_tilde
    for question, base_text, text in zip(prompt, base_answers, answers):
        table = Table(title=question, show_lines=True, expand=True)
        table.add_column("base")
        table.add_column(f"customized (α₀={alpha_0:g}, α̃={alpha_tilde:g})")
        table.add_row(base_text, text)
        console.print(table)


@app.command(rich_help_panel="Use")
def info(adapter: Annotated[Path, typer.Argument(help="Adapter folder (or a run folder holding adapter/).")]) -> None:
    """Show an adapter's settings, base model and, for a run folder, its metrics."""
    from rich.console import Console
    from rich.table import Table

    from .checkpoint import read_adapter_meta

    folder = _adapter_path(adapter)
    config, base, version = read_adapter_meta(folder)
    table = Table(title=str(folder), show_header=False)
    table.add_row("qadapter version", version)
    table.add_row("base model", f"{base.get('name')} ({base.get('revision') or 'no revision'})")
    for key, value in config.to_dict().items():
        table.add_row(key, str(value))
    metrics_path = adapter / "metrics.json"
    if metrics_path.is_file():
        metrics = json.loads(metrics_path.read_text())
        for key in ("pref_accuracy_before", "pref_accuracy_after", "n_eval_pairs", "train_seconds"):
            table.add_row(key, str(metrics.get(key)))
    Console().print(table)


def main() -> None:
    try:
        app()
    except QAdapterError as exc:
        if os.environ.get("QADAPTER_DEBUG") == "1":
            raise
        _console().print(f"[red]error:[/red] {exc}", highlight=False)
        sys.exit(2)
