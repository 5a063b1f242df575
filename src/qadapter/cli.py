"""The ``qadapter`` command line: a table of contents, one function per command.

torch and transformers are imported inside the commands so ``qadapter --help`` is instant.
Known errors print as one line; set QADAPTER_DEBUG=1 for the traceback.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import os
import sys
import typing
from collections.abc import Callable, Collection
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from . import __version__
from .config import ADAPTER_NAME, METHOD_FIELDS, SCALE, DecodeConfig, QAdapterConfig, ServeLimits
from .config_file import default_map, read_options
from .data import data_file, default_data_dir, first_prompts
from .errors import ConfigError, QAdapterError


def dashed(name: str) -> str:
    """An option name as declared: 'learning_rate' (TRL's spelling, from HfArgumentParser) → 'learning-rate'."""
    return name.replace("_", "-")


app = typer.Typer(
    name="qadapter",
    help="Customize a pre-trained LLM to new preferences without forgetting (Q-Adapter, arXiv 2407.03856).",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
    # click normalizes every option token (never a value) with this, so `--learning_rate` is `--learning-rate`
    # in every command while the help lists each option once.
    context_settings={"token_normalize_func": dashed},
)


def _show_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"qadapter {__version__}\n" + ", ".join(f"{name} {version(name)}" for name in ("torch", "transformers", "peft")))
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[bool, typer.Option("--version", callback=_show_version, is_eager=True, help="Show the versions of qadapter, torch, transformers and peft, and exit.")] = False,
) -> None:
    """Options of `qadapter` itself, before the command."""


# The main job when --data is omitted: DSP (Cheng et al., 2023), "academy" style preferred over the
# other four; 120 training queries (480 pairs, 120 steps) and 25 held-out queries (≈100 pairs),
# evaluated before and after training only (≈2 min each): about 20 minutes on two CPU cores.
DEFAULT_DATA = "dsp/domain_specific_preference.json"  # relative to the data folder (shipped with the package)
DEFAULT_PREFER = "academy"
DEFAULT_SLICE = {"max_train_pairs": 480, "max_eval_pairs": 100, "eval_every": 120}


def _option_type(hint: Any) -> Any:
    """The option type of a field's type: a union's first member (``list[str] | str`` → ``list[str]``),
    Optional where None is another."""
    if typing.get_origin(hint) is not typing.Union and type(hint).__name__ != "UnionType":
        return hint
    members = typing.get_args(hint)
    first = next(a for a in members if a is not type(None))
    return Optional[first] if type(None) in members else first


def config_options(config_cls: type, panel: str, skip: Collection[str] = ()) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Add one option per field of ``config_cls`` (but those in ``skip``, which the command does not use) to a
    command, with the field's type, default and help text, so the CLI never restates the config. The command
    receives them in ``**options``; :func:`pick` makes the config from them."""
    hints = typing.get_type_hints(config_cls)
    unknown = set(skip) - {f.name for f in dataclasses.fields(config_cls)}
    if unknown:
        raise ValueError(f"config_options: {config_cls.__name__} has no field(s) {', '.join(sorted(unknown))}")

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        signature, params = _declared(func)
        for f in dataclasses.fields(config_cls):
            if f.name in skip:
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            option = typer.Option(
                help=f.metadata.get("help", ""), rich_help_panel=panel, parser=f.metadata.get("parse"), metavar=f.metadata.get("metavar")
            )
            params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[_option_type(hints[f.name]), option]))
        func.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
        return func

    return decorate


def _declared(func: Callable[..., Any]) -> tuple[inspect.Signature, list[inspect.Parameter]]:
    """A command's signature and its parameters but ``**options``, annotations resolved (they are
    postponed strings here), for decorators that add options."""
    signature = inspect.signature(func)
    own = typing.get_type_hints(func, include_extras=True)
    params = [p.replace(annotation=own.get(p.name, p.annotation)) for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    return signature, params


def _read_config_file(ctx: typer.Context, path: Optional[Path]) -> None:
    """--config's callback: it runs first (eager), so the file's values become the other options' defaults."""
    if path is not None:
        ctx.default_map = {**(ctx.default_map or {}), **default_map(ctx, read_options(path), path)}


ConfigFileOption = Annotated[
    Optional[Path],
    typer.Option(
        "--config",
        metavar="FILE",
        is_eager=True,
        expose_value=False,
        callback=_read_config_file,
        help="YAML or JSON file of this command's options (keys: option names, e.g. max-steps: 100); options given here override it.",
    ),
]


def config_file_option(func: Callable[..., Any]) -> Callable[..., Any]:
    """Add --config FILE to a command. Typer passes every option to the command, even one that exposes no
    value, so the command is wrapped to drop it."""
    signature, params = _declared(func)
    config = inspect.Parameter("config_file", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=ConfigFileOption)

    @functools.wraps(func)
    def command(*args: Any, config_file: None = None, **kwargs: Any) -> Any:
        return func(*args, **kwargs)

    command.__signature__ = signature.replace(parameters=[*params, config])  # type: ignore[attr-defined]
    return command


def pick(config_cls: type, options: dict[str, Any]) -> Any:
    """The config from a command's ``**options``; a field's ``collect`` turns its option's values into the field's value."""
    collect = {f.name: f.metadata.get("collect", lambda value: value) for f in dataclasses.fields(config_cls)}
    return config_cls(**{k: collect[k](v) for k, v in options.items() if k in collect})


def _console(stderr: bool = False):
    """Messages and progress go to stdout (so `qadapter train > log` keeps them), errors to stderr;
    a log file gets whole lines, not lines wrapped at 80 columns."""
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, soft_wrap=not stream.isatty())


# Options shared by several commands, declared once.
BaseModelOption = Annotated[str, typer.Option("--model", help="Base model: 'bundled' (SmolLM2-135M-Instruct), a hub id, a local folder, or a .gguf file.")]
DataOption = Annotated[Optional[str], typer.Option(help="Preference data: a .jsonl/.json(.gz) or .parquet file, a save_to_disk folder, a folder of data files, or a datasets name. Default: DSP, shipped with qadapter.")]
DataSplitOption = Annotated[Optional[str], typer.Option("--data-split", "--split", help="The split of --data to read, where it has several (a datasets name or folder). Default: train.")]
DataConfigOption = Annotated[Optional[str], typer.Option("--data-config", help="The datasets configuration (subset) of --data, for a datasets name or folder with several.")]
PreferOption = Annotated[Optional[str], typer.Option(help="For multi-response records ({query, responses: {style: text}}): the preferred style.")]
EvalFractionOption = Annotated[float, typer.Option(help="Fraction of prompts held out for evaluation (split by prompt, never by pair; same split in every command).")]
MaxTrainOption = Annotated[Optional[int], typer.Option(help="Use at most this many training pairs (whole prompts); default data: 480.")]
MaxEvalOption = Annotated[Optional[int], typer.Option(help="Evaluate on at most this many held-out pairs (whole prompts); default data: 100.")]
SkipInvalidOption = Annotated[bool, typer.Option(help="Skip malformed records (counted and reported) instead of stopping.")]
PrecisionOption = Annotated[str, typer.Option(help="Training precision: 'auto' (bf16 only where the hardware has it natively), 'no' (float32), 'bf16' or 'fp16'.")]
EvalPrecisionOption = Annotated[str, typer.Option(help="Precision of every score (accuracy, retention, KL, judge, answers): 'no' (float32, the default: results do not depend on the machine), 'bf16', 'fp16' or 'auto'.")]
ProgressOption = Annotated[bool, typer.Option(help="Show progress bars.")]
ReplayBaseOption = Annotated[str, typer.Option(help="replay: train with 'dpo' or 'sft' (base-model replay rows mixed into either).")]
ReportToOption = Annotated[
    str,
    typer.Option(
        metavar="TRACKER,...",
        help="Experiment trackers that receive the training logs: 'none', 'all', or accelerate's names (tensorboard, wandb, mlflow, …), "
        "comma-separated. Local files go to the run folder's logs/.",
    ),
]


@dataclass
class _Split:
    """The data as every command sees it: split by prompt with the config's seed, then sliced."""

    data: str
    prefer: str | None
    train: list
    held_out: list
    train_slice: list
    eval_slice: list


def _split_data(
    config: QAdapterConfig,
    data: str | None,
    prefer: str | None,
    eval_fraction: float,
    max_train_pairs: int | None,
    max_eval_pairs: int | None,
    skip_invalid: bool,
    console: Any,
    data_split: str | None = None,
    data_config: str | None = None,
) -> _Split:
    from .data import read_records, split_by_prompt

    source: str | Path | None = data
    if data is None:  # the main job: the default data and slice unless sizes are given; recorded by its portable name
        data, source, prefer = DEFAULT_DATA, data_file(default_data_dir(), DEFAULT_DATA), prefer or DEFAULT_PREFER
        max_train_pairs = max_train_pairs or DEFAULT_SLICE["max_train_pairs"]
        max_eval_pairs = max_eval_pairs or DEFAULT_SLICE["max_eval_pairs"]
    report = read_records(source, prefer=prefer, split=data_split, config=data_config, skip_invalid=skip_invalid)
    data += "".join(f" ({name}={value})" for name, value in (("split", data_split), ("config", data_config)) if value)  # as recorded
    if report.skipped:
        console.print(f"skipped {len(report.skipped)} record(s), e.g. {report.skipped[0]}")
    train_records, held_out = split_by_prompt(report.records, eval_fraction, seed=config.seed)
    split = _Split(data, prefer, train_records, held_out, first_prompts(train_records, max_train_pairs), first_prompts(held_out, max_eval_pairs))
    console.print(f"data: {data} ({len(report.records)} pairs) → {len(split.train_slice)} train / {len(split.eval_slice)} held-out pairs")
    return split


def _command_line() -> str:
    return " ".join(["qadapter", *sys.argv[1:]])


@app.command(rich_help_panel="Train")
@config_file_option
@config_options(QAdapterConfig, "Q-Adapter settings")
def train(
    model: BaseModelOption = "bundled",
    data: DataOption = None,
    prefer: PreferOption = None,
    data_split: DataSplitOption = None,
    data_config: DataConfigOption = None,
    output: Annotated[Path, typer.Option(help="Run folder: adapter/, metrics.json, checkpoints/.")] = Path("runs/qadapter"),
    eval_fraction: EvalFractionOption = 0.2,
    max_train_pairs: MaxTrainOption = None,
    max_eval_pairs: MaxEvalOption = None,
    eval_every: Annotated[Optional[int], typer.Option(help="Evaluate every N steps (default: 4 times per run; default data: at the end only).")] = None,
    save_every: Annotated[Optional[int], typer.Option(help="Checkpoint every N steps (default: 4 times per run).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --output from its latest checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing run in --output.")] = False,
    skip_invalid: SkipInvalidOption = False,
    on_nonfinite: Annotated[str, typer.Option(help="On a NaN/inf loss or gradient: 'skip' the update or 'stop' the run.")] = "skip",
    mixed_precision: PrecisionOption = "auto",
    eval_precision: EvalPrecisionOption = "no",
    progress: ProgressOption = True,
    num_processes: Annotated[int, typer.Option(help="Data-parallel processes on this machine (runs `accelerate launch` for you).")] = 1,
    report_to: ReportToOption = "none",
    **options: Any,
) -> None:
    """Train a Q-Adapter on preference pairs and report held-out preference accuracy before and after."""
    config = pick(QAdapterConfig, options)
    if num_processes > 1 and "WORLD_SIZE" not in os.environ:
        raise typer.Exit(_relaunch(num_processes))
    from .training import TrainingInterrupted, train as run_training

    console = _console()
    if data is None:  # the main job evaluates before and after only: each evaluation costs ≈2 min on two cores
        eval_every = eval_every or DEFAULT_SLICE["eval_every"]
    split = _split_data(config, data, prefer, eval_fraction, max_train_pairs, max_eval_pairs, skip_invalid, console, data_split, data_config)
    run_info = {"data": split.data, "prefer": split.prefer, "command": _command_line()}
    try:
        result = run_training(
            config,
            split.train_slice,
            split.eval_slice,
            output,
            model=model,
            resume=resume,
            overwrite=overwrite,
            eval_every=eval_every,
            save_every=save_every,
            on_nonfinite=on_nonfinite,
            mixed_precision=mixed_precision,
            eval_precision=eval_precision,
            progress=progress,
            log=console.print,
            run_info=run_info,
            report_to=report_to,
        )
    except TrainingInterrupted as exc:
        # Why the command stopped and how to continue: stderr, like an error, so a redirected log still shows it.
        _console(stderr=True).print(f"{exc}\nresume with: qadapter {' '.join(a for a in sys.argv[1:] if a not in ('--overwrite', '--resume'))} --resume")
        raise typer.Exit(130) from None
    m = result.metrics
    console.print(
        f"held-out preference accuracy: {m['pref_accuracy_before']:.3f} → {m['pref_accuracy_after']:.3f} "
        f"on {m['n_eval_pairs']} pairs; training took {m['train_seconds'] / 60:.1f} min\n"
        f"adapter: {result.adapter_dir}   metrics: {output / 'metrics.json'}"
    )


class BaselineMethod(str, Enum):
    sft = "sft"
    dpo = "dpo"
    replay = "replay"


@app.command(rich_help_panel="Train")
@config_file_option
@config_options(QAdapterConfig, "Shared settings (LoRA, optimisation, sequences)", skip=METHOD_FIELDS)
def baseline(
    method: Annotated[BaselineMethod, typer.Argument(help="sft: SFT on chosen responses; dpo: TRL's DPOTrainer; replay: DPO or SFT with base-model replay data mixed in.")],
    model: BaseModelOption = "bundled",
    data: DataOption = None,
    prefer: PreferOption = None,
    data_split: DataSplitOption = None,
    data_config: DataConfigOption = None,
    output: Annotated[Optional[Path], typer.Option(help="Run folder: adapter/ (with baseline.json) and the replay cache. Default: runs/baseline-METHOD.")] = None,
    eval_fraction: EvalFractionOption = 0.2,
    max_train_pairs: MaxTrainOption = None,
    beta_dpo: Annotated[float, typer.Option(help="DPO's β (dpo, and replay with --replay-base dpo).")] = 0.1,
    replay_base: ReplayBaseOption = "dpo",
    replay_fraction: Annotated[float, typer.Option(help="replay: fraction of all training rows that are replay rows, in (0, 1).")] = 0.25,
    replay_prompts: Annotated[Optional[str], typer.Option(help="replay: preference data whose prompts the base answers (DPO pairs its answer with the rejected reply). Default: single-turn HH-RLHF helpful-base test prompts.")] = None,
    replay_max_new_tokens: Annotated[Optional[int], typer.Option(help="replay: longest base response (default: max_length − max_prompt_length).")] = None,
    replay_temperature: Annotated[float, typer.Option(help="replay: sampling temperature of the base responses (1: the base's own distribution; 0: greedy).")] = 1.0,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing adapter in --output (the replay cache is kept).")] = False,
    skip_invalid: SkipInvalidOption = False,
    mixed_precision: PrecisionOption = "auto",
    progress: ProgressOption = True,
    report_to: ReportToOption = "none",
    **options: Any,
) -> None:
    """Train a peer with TRL on the same data and LoRA settings as `qadapter train`, saved as an adapter folder."""
    config = pick(QAdapterConfig, options)
    from .data import read_records
    from .eval.baselines import train_baseline

    console = _console()
    output = output or Path(f"runs/baseline-{method.value}")
    if (output / "adapter").exists() and not overwrite:
        raise ConfigError(f"{output / 'adapter'} exists: pass --overwrite to replace it, or choose another --output")
    split = _split_data(config, data, prefer, eval_fraction, max_train_pairs, None, skip_invalid, console, data_split, data_config)
    replay = read_records(replay_prompts, skip_invalid=skip_invalid).records if method == BaselineMethod.replay and replay_prompts else None
    adapter_dir = train_baseline(
        method.value,
        split.train_slice,
        output,
        model=model,
        config=config,
        beta_dpo=beta_dpo,
        replay_fraction=replay_fraction,
        replay_prompts=replay,
        replay_base=replay_base,
        replay_max_new_tokens=replay_max_new_tokens,
        replay_temperature=replay_temperature,
        held_out_records=split.held_out,
        mixed_precision=mixed_precision,
        progress=progress,
        log=console.print,
        run_info={"data": split.data, "prefer": split.prefer, "replay_prompts": replay_prompts, "command": _command_line()},
        report_to=report_to,
    )
    console.print(f"adapter: {adapter_dir}")


NamedAdapters = Annotated[
    list[str],
    typer.Option("--adapter", metavar="NAME=DIR", help="A method to evaluate, as NAME=DIR (adapter or run folder); repeat. The first is the one swept and fixes the data split's seed."),
]
SizesOption = Annotated[str, typer.Option(help="Items per retention benchmark, NAME=N,… (benchmarks: arc_easy, piqa, hellaswag, boolq, mmlu, gsm8k).")]
SweepOption = Annotated[str, typer.Option(help="α₀ values of the forgetting dial, comma-separated; α̃ is tied to α₀ (π̃ ∝ π₁·exp(Q/α₀)). Empty: no sweep.")]
JudgeOption = Annotated[str, typer.Option(help="'builtin' (a bag-of-words judge trained on the training split) or a Hugging Face reward model.")]
WinPromptsOption = Annotated[int, typer.Option(help="Held-out prompts every policy answers for the judged win rate.")]


def _named(values: list[str]) -> dict[str, Path]:
    named: dict[str, Path] = {}
    for value in values:
        name, sep, folder = value.partition("=")
        if not sep or not ADAPTER_NAME.fullmatch(name) or name in named or name == "base":
            raise ConfigError(f"--adapter {value}: give each method a distinct NAME=DIR (NAME: letters, digits, _ or -; not 'base')")
        named[name] = _adapter_path(Path(folder))
    return named


def _plan(sizes: str, max_new_tokens: int, precision: str) -> Any:
    from .eval.benchmarks import DEFAULT_SIZES, LOADERS
    from .eval.runner import EvalPlan
    from .hardware import choose_mixed_precision, default_device

    chosen = dict(DEFAULT_SIZES)
    for part in filter(None, (p.strip() for p in sizes.split(","))):
        name, sep, n = part.partition("=")
        if not sep or name not in LOADERS or not n.isdigit():
            raise ConfigError(f"--sizes: expected NAME=N with NAME in {', '.join(LOADERS)}, got {part!r}")
        chosen[name] = int(n)
    return EvalPlan(
        data_root=default_data_dir(),
        sizes={k: v for k, v in chosen.items() if v > 0},
        max_new_tokens=max_new_tokens,
        precision=choose_mixed_precision(default_device(), precision),
    )


def _alphas(sweep: str) -> list[float]:
    try:
        values = [float(a) for a in sweep.split(",") if a.strip()]
    except ValueError:
        raise ConfigError(f"--sweep: expected comma-separated numbers, got {sweep!r}") from None
    expected = next(filter(None, map(SCALE, values)), None)  # the α₀ check of every config
    if expected:
        raise ConfigError(f"--sweep: every α₀ must be {expected}, got {sweep!r}")
    return values


def _prompts(records: list, n: int) -> list:
    """The first ``n`` distinct held-out prompts."""
    return list({r.prompt_key: r.prompt for r in records}.values())[:n]


@app.command(name="eval", rich_help_panel="Evaluate")
@config_file_option
def evaluate_(
    adapter: NamedAdapters,
    output: Annotated[Path, typer.Option(help="Report folder: report.md, results.json, dial.png/csv, cache/ (resumable).")] = Path("reports/eval"),
    data: DataOption = None,
    prefer: PreferOption = None,
    eval_fraction: EvalFractionOption = 0.2,
    max_eval_pairs: MaxEvalOption = None,
    win_prompts: WinPromptsOption = 40,
    sizes: SizesOption = "",
    sweep: SweepOption = "",
    judge: JudgeOption = "builtin",
    max_new_tokens: Annotated[int, typer.Option(help="Longest answer generated for the win rate.")] = 128,
    eval_precision: EvalPrecisionOption = "no",
    progress: ProgressOption = True,
    data_split: DataSplitOption = None,  # last: `sweep` passes the others by position
    data_config: DataConfigOption = None,
) -> None:
    """Evaluate methods side by side: retention (paired vs the base), KL to base, held-out preference accuracy, judged win rate."""
    from .checkpoint import read_adapter_meta
    from .eval.experiment import evaluate_and_report, prepare_judge

    adapters = _named(adapter)
    config, base, _ = read_adapter_meta(next(iter(adapters.values())))
    console = _console()
    split = _split_data(config, data, prefer, eval_fraction, None, max_eval_pairs, False, console, data_split, data_config)
    plan = _plan(sizes, max_new_tokens, eval_precision)
    prepared = prepare_judge(judge, output / "judge", split.train, split.held_out, precision=plan.precision)
    console.print(f"judge: {prepared[1]['name']}, held-out pairwise accuracy {prepared[1]['accuracy']:.3f} on {prepared[1]['n']} pairs")
    info = {"model": base.get("name"), "data": f"{split.data} (prefer={split.prefer})", "command": _command_line()}
    evaluate_and_report(output, adapters, plan, split.eval_slice, _prompts(split.held_out, win_prompts), prepared, sweep=_alphas(sweep), info=info, progress=progress)
    console.print(f"report: {output / 'report.md'}")


@app.command(rich_help_panel="Evaluate")
@config_file_option
def sweep(
    adapter: Annotated[Path, typer.Option(help="The Q-Adapter to sweep (adapter or run folder).")],
    sweep: SweepOption = "0.25,0.5,1,2,4,8",
    peer: Annotated[Optional[list[str]], typer.Option("--peer", metavar="NAME=DIR", help="Other methods to show as points on the same plot; repeat.")] = None,
    output: Annotated[Path, typer.Option(help="Report folder.")] = Path("reports/sweep"),
    data: DataOption = None,
    prefer: PreferOption = None,
    data_split: DataSplitOption = None,
    data_config: DataConfigOption = None,
    eval_fraction: EvalFractionOption = 0.2,
    max_eval_pairs: MaxEvalOption = None,
    win_prompts: WinPromptsOption = 40,
    sizes: SizesOption = "",
    judge: JudgeOption = "builtin",
    eval_precision: EvalPrecisionOption = "no",
    progress: ProgressOption = True,
    alpha_0: Annotated[Optional[str], typer.Option("--alpha-0", hidden=True, help="The former name of --sweep.")] = None,
) -> None:
    """One adapter at several α₀ without retraining: retention vs alignment (plot, CSV, JSON)."""
    evaluate_(
        [f"qadapter={adapter}", *(peer or [])], output, data, prefer, eval_fraction, max_eval_pairs, win_prompts, sizes, sweep if alpha_0 is None else alpha_0, judge, 128, eval_precision, progress,
        data_split=data_split, data_config=data_config,
    )


@app.command(rich_help_panel="Evaluate")
@config_file_option
@config_options(QAdapterConfig, "Q-Adapter settings (the peers use the LoRA, optimisation and sequence ones)")
def experiment(
    output: Annotated[Path, typer.Option(help="Experiment folder: qadapter/, sft/, dpo/, replay/, judge/, cache/, report.md, results.json.")] = Path("experiments/dsp-academy"),
    model: BaseModelOption = "bundled",
    data: DataOption = None,
    prefer: PreferOption = None,
    data_split: DataSplitOption = None,
    data_config: DataConfigOption = None,
    eval_fraction: EvalFractionOption = 0.2,
    max_train_pairs: MaxTrainOption = None,
    max_eval_pairs: MaxEvalOption = None,
    win_prompts: WinPromptsOption = 40,
    sizes: SizesOption = "",
    sweep: SweepOption = "0.25,0.5,1,2,4,8",
    judge: JudgeOption = "builtin",
    peers: Annotated[str, typer.Option(help="Peers to train and compare, among sft, dpo, replay.")] = "sft,dpo,replay",
    replay_base: ReplayBaseOption = "dpo",
    eval_precision: EvalPrecisionOption = "no",
    progress: ProgressOption = True,
    report_to: ReportToOption = "none",
    **options: Any,
) -> None:
    """Train Q-Adapter and its peers on the same data, evaluate all side by side, sweep the dial, write the report. Resumable."""
    from .eval.experiment import run_experiment

    config = pick(QAdapterConfig, options)
    console = _console()
    split = _split_data(config, data, prefer, eval_fraction, max_train_pairs, max_eval_pairs, False, console, data_split, data_config)
    info = {"model": model, "data": f"{split.data} (prefer={split.prefer})", "command": _command_line()}
    run_experiment(
        output,
        split.train_slice,
        split.eval_slice,
        (split.train, split.held_out),
        _prompts(split.held_out, win_prompts),
        config=config,
        plan=_plan(sizes, 128, eval_precision),
        model=model,
        peers=[p for p in peers.split(",") if p],
        sweep=_alphas(sweep),
        judge=judge,
        replay_base=replay_base,
        info=info,
        progress=progress,
        log=console.print,
        report_to=report_to,
    )
    console.print(f"report: {output / 'report.md'}")


def _relaunch(num_processes: int) -> int:
    """Run this same command under `accelerate launch` with ``num_processes`` workers; return its exit code."""
    import subprocess

    args, rest = [], iter(sys.argv[1:])
    for arg in rest:  # the same command minus --num-processes N / --num-processes=N (or --num_processes)
        name, equals, _ = arg.partition("=")
        if dashed(name) != "--num-processes":
            args.append(arg)
        elif not equals:
            next(rest, None)
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes)]
    return subprocess.call([*launcher, "-m", "qadapter", *args])


def _adapter_path(path: Path | str) -> Path:
    """Accept a run folder as well as its adapter/ folder, and a hub id (owner/name[@revision]) that is not a local path."""
    from .hub import adapter_folder

    path = adapter_folder(path)
    return path / "adapter" if (path / "adapter" / "qadapter_config.json").is_file() else path


AdapterOption = Annotated[
    list[str],
    typer.Option(
        "--adapter",
        metavar="[NAME=]DIR",
        help="Adapter folder (or a run folder holding adapter/). Repeat as NAME=DIR to load several on one base, "
        "composed as (Σ w_i·Q_i + α₀ log π₁)/α̃.",
    ),
]
ModelOption = Annotated[Optional[str], typer.Option(help="Load this base instead of the one recorded in the adapter(s).")]
MismatchOption = Annotated[bool, typer.Option(help="Use a base model that differs from the recorded one.")]


def _load_adapters(values: list[str], model: str | None, allow_base_mismatch: bool) -> Any:
    """One bare adapter folder, or NAME=DIR adapters composed on one base."""
    from .model import QAdapterModel

    named: dict[str, Path] = {}
    for value in values:
        name, sep, folder = value.partition("=")
        if not (sep and ADAPTER_NAME.fullmatch(name)):  # a bare folder (which may itself contain '=')
            if len(values) > 1:
                raise ConfigError(f"--adapter {value}: name each adapter of a composition, as NAME=DIR")
            return QAdapterModel.from_pretrained(_adapter_path(Path(value)), model=model, allow_base_mismatch=allow_base_mismatch)
        if name in named:
            raise ConfigError(f"--adapter: the name {name!r} is given twice")
        named[name] = _adapter_path(Path(folder))
    return QAdapterModel.from_pretrained(named, model=model, allow_base_mismatch=allow_base_mismatch)


@app.command(rich_help_panel="Use")
@config_file_option
@config_options(DecodeConfig, "Decoding")
def generate(
    prompt: Annotated[list[str], typer.Argument(help="One or more prompts (each becomes a user turn of the chat template).")],
    adapter: AdapterOption,
    compare: Annotated[bool, typer.Option(help="Also print the base model's answer, side by side.")] = False,
    chat: Annotated[bool, typer.Option(help="Wrap prompts in the chat template (when the tokenizer has one).")] = True,
    model: ModelOption = None,
    allow_base_mismatch: MismatchOption = False,
    **options: Any,
) -> None:
    """Generate with the customized policy (Q + α₀ log π₁)/α̃; override α₀/α̃ and adapter weights without retraining."""
    from rich.console import Console
    from rich.table import Table

    from .decode import generate as run_generate

    decode = pick(DecodeConfig, options)
    qmodel = _load_adapters(adapter, model, allow_base_mismatch)
    answers = run_generate(qmodel, prompt, decode, chat=chat)
    console = Console()
    if not compare:
        for text in answers:
            console.print(text, markup=False, highlight=False)
        return
    base_answers = run_generate(qmodel, prompt, decode, policy="base", chat=chat)
    dial = decode.dial.resolve(qmodel.adapters)
    for question, base_text, text in zip(prompt, base_answers, answers):
        table = Table(title=question, show_lines=True, expand=True)
        table.add_column("base")
        table.add_column(f"customized (α₀={dial.alpha_0:g}, α̃={dial.alpha_tilde:g})")
        table.add_row(base_text, text)
        console.print(table)


@app.command(rich_help_panel="Use")
@config_file_option
@config_options(ServeLimits, "Limits")
def serve(
    adapter: AdapterOption,
    host: Annotated[str, typer.Option(help="Address to listen on; the default answers this machine only. Any other needs --api-key or --insecure.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    api_key: Annotated[
        Optional[str],
        typer.Option(envvar="QADAPTER_API_KEY", help="Require 'Authorization: Bearer KEY' on every request. Prefer the variable: a command line is visible to other local users."),
    ] = None,
    insecure: Annotated[bool, typer.Option(help="Serve a non-loopback --host without an API key.")] = False,
    model: ModelOption = None,
    allow_base_mismatch: MismatchOption = False,
    max_batch_size: Annotated[int, typer.Option(min=1, help="Requests decoded together at most; later ones wait in a first-come queue.")] = 32,
    max_queue: Annotated[int, typer.Option(min=1, help="Requests allowed to wait; more are answered 429.")] = 256,
    **options: Any,
) -> None:
    """Serve the customized policy over an OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/models; /health, /version, /metrics)."""
    try:
        from .serve import check_bind
        from .serve import serve as run_server
    except ImportError as exc:  # fastapi and uvicorn come with the `serve` extra
        raise QAdapterError(f"qadapter serve needs the serve extra: pip install 'qadapter[serve]' ({exc})") from None

    limits = pick(ServeLimits, options)
    check_bind(host, api_key, insecure)  # before the model loads
    qmodel = _load_adapters(adapter, model, allow_base_mismatch)
    run_server(qmodel, host=host, port=port, max_batch_size=max_batch_size, max_queue=max_queue, limits=limits, api_key=api_key, insecure=insecure)


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
    if base.get("sha256"):
        table.add_row("base sha256", f"{base.get('file') or 'weights'}: {base['sha256']}")
    for key, value in config.to_dict().items():
        table.add_row(key, str(value))
    metrics_path = adapter / "metrics.json"
    if metrics_path.is_file():
        metrics = json.loads(metrics_path.read_text())
        for key in ("pref_accuracy_before", "pref_accuracy_after", "n_eval_pairs", "train_seconds"):
            table.add_row(key, str(metrics.get(key)))
    Console().print(table)


class ExportFormat(str, Enum):
    merged = "merged"
    gguf = "gguf"


@app.command(name="export", rich_help_panel="Share")
def export_(
    adapter: Annotated[str, typer.Argument(help="Adapter folder, run folder, or hub id (owner/name).")],
    to: Annotated[ExportFormat, typer.Option("--to", help="merged: a plain transformers folder (vLLM, TGI, …); gguf: one GGUF file (llama.cpp, Ollama), for a base loaded from a GGUF.")],
    output: Annotated[Path, typer.Option(help="The folder (merged) or .gguf file (gguf) to write.")],
    alpha_0: Annotated[Optional[float], typer.Option("--alpha-0", help="α₀ of the exported policy (default: the adapter's).")] = None,
    alpha_tilde: Annotated[Optional[float], typer.Option("--alpha-tilde", help="α̃ of the exported policy (default: the adapter's).")] = None,
    approximate: Annotated[bool, typer.Option(help="Export where one model can only approximate the policy (anything but residual Q at α₀ = 1); the measured KL is recorded.")] = False,
    dtype: Annotated[str, typer.Option(help="merged: weights in float32, bfloat16 or float16.")] = "float32",
    gguf_type: Annotated[str, typer.Option(help="gguf: f16, f32 or q8_0 (1-D tensors stay f32); llama.cpp's llama-quantize makes smaller ones.")] = "f16",
    model: ModelOption = None,
    allow_base_mismatch: MismatchOption = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an export qadapter wrote at --output (never anything else).")] = False,
) -> None:
    """Export the customized policy as one plain model: exact for residual Q at α₀ = 1, else an approximation (--approximate) whose KL is measured."""
    from .export import export_gguf, export_merged

    folder = _adapter_path(adapter)
    common = {"alpha_0": alpha_0, "alpha_tilde": alpha_tilde, "approximate": approximate, "model": model, "allow_base_mismatch": allow_base_mismatch, "overwrite": overwrite}
    if to == ExportFormat.merged:
        result = export_merged(folder, output, dtype=dtype, **common)
    else:
        result = export_gguf(folder, output, gguf_type_name=gguf_type, **common)
    _console().print(result.summary(), markup=False, highlight=False)


@app.command(rich_help_panel="Share")
def push(
    adapter: Annotated[str, typer.Argument(help="Adapter folder (or a run folder holding adapter/).")],
    repo_id: Annotated[str, typer.Argument(help="Hub model repository, owner/name (created if need be).")],
    private: Annotated[bool, typer.Option(help="Create the repository private.")] = False,
) -> None:
    """Upload an adapter to the Hugging Face hub (token: `hf auth login` or HF_TOKEN); load it anywhere by its id."""
    from .hub import push_to_hub

    commit = push_to_hub(_adapter_path(adapter), repo_id, private=private)
    _console().print(f"pushed to {getattr(commit, 'commit_url', None) or repo_id}; load it with --adapter {repo_id}", markup=False, highlight=False)


def main() -> None:
    try:
        app()
    except QAdapterError as exc:
        if os.environ.get("QADAPTER_DEBUG") == "1":
            raise
        _console(stderr=True).print(f"[red]error:[/red] {exc}", highlight=False)
        sys.exit(2)
