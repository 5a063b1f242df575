"""lm-evaluation-harness plugin: a Q-Adapter's customized policy as the lm-eval model ``qadapter``.

Importing this module registers :class:`QAdapterLM` with lm-eval's model registry (its own
extension point, ``register_model``); it is the only qadapter module that imports ``lm_eval``
(``pip install 'qadapter[lmeval]'``). The class is a small subclass of lm-eval's Hugging Face
model ``HFLM`` that overrides the two places where HFLM runs the model:

* ``_model_call`` returns the customized policy's logits (Q + α₀ log π₁)/α̃ over the vocabulary
  (arXiv 2407.03856, Eq. 7); HFLM takes ``log_softmax`` of them, i.e. log π̃, so ``loglikelihood``
  and ``loglikelihood_rolling`` (both go through ``_loglikelihood_tokens`` → ``_model_call``)
  score with π̃, never with the base or the adapted model alone.
* ``_model_generate`` decodes with qadapter's decoding engine (:class:`~qadapter.decode.DecodeBatch`
  driven by :func:`~qadapter.decode.decode_step`, as ``generate`` and the server), so
  ``generate_until`` samples π̃ too, stopping at lm-eval's stop strings and token budget.

lm-eval's CLI imports no plugins, so run it through this module, which registers the model and
then hands its arguments to lm-eval's own CLI unchanged::

    python -m qadapter.eval.lm_eval_plugin --model qadapter \\
        --model_args adapter=runs/my-adapter,alpha_0=2 \\
        --include_path examples/lm_eval --tasks arc_easy_local --device cpu

or from Python::

    import lm_eval
    import qadapter.eval.lm_eval_plugin  # noqa: F401  (registers "qadapter")
    lm_eval.simple_evaluate(model="qadapter", model_args="adapter=runs/my-adapter,alpha_0=2", tasks=["hellaswag"])

Model arguments: ``adapter`` (required, a folder written by ``qadapter train``/``save_pretrained``),
``alpha_0`` / ``alpha_tilde`` (override the adapter's dial), ``model`` (load a different copy of the
base than the one recorded in the adapter), ``allow_base_mismatch``, ``device``, ``dtype``
(``float32``, ``bfloat16``, ...; default as ``qadapter.load_base``), and the
usual HFLM arguments that apply to an already loaded model (``batch_size``, ``max_batch_size``,
``max_length``, ``truncation``, ``logits_cache``, ``add_bos_token``, ``prefix_token_id``,
``softmax_dtype``, ``mixed_precision_dtype``, ...). From Python, ``QAdapterLM(qmodel=...)`` wraps an
already loaded :class:`~qadapter.model.QAdapterModel` instead of loading ``adapter``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from .. import objective
from ..config import DecodeConfig, Dial
from ..decode import DecodeBatch, StopMatcher, Stream, decode_step, eos_ids, mixture
from ..hardware import EVAL_PRECISION, MixedPrecision, autocast
from ..sampling import Sampling

log = logging.getLogger(__name__)

# Generation keyword arguments lm-eval tasks may pass that the customized policy's sampler implements.
_SAMPLING_KWARGS = {"do_sample", "temperature", "top_p"}


def _number(value: Any) -> Any:
    """A model argument as a number where it reads as one; :class:`~qadapter.config.Dial` refuses the rest."""
    try:
        return float(value) if isinstance(value, str) else value
    except ValueError:
        return value


def _device(device: str | torch.device | None) -> torch.device:
    """lm-eval's CLI passes ``cuda:0`` by default; fall back like HFLM where CUDA is absent."""
    from ..hardware import default_device

    if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
        if device is not None:
            log.warning("qadapter: device %r requested but CUDA is not available; using %s", str(device), default_device())
        return default_device()
    return torch.device(device)


def _dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return None
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"qadapter: unknown dtype {dtype!r} (float32, bfloat16, float16 or auto)")
    return value


def load_qmodel(
    adapter: str | Path,
    *,
    model: str | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    allow_base_mismatch: bool = False,
) -> Any:
    """A :class:`~qadapter.model.QAdapterModel` for evaluation: the adapter on its recorded base
    (or on ``model``), on ``device``, in ``dtype``."""
    from ..model import QAdapterModel

    torch_device, torch_dtype = _device(device), _dtype(dtype)
    return QAdapterModel.from_pretrained(adapter, model=model, device=torch_device, dtype=torch_dtype, allow_base_mismatch=allow_base_mismatch)


def _registered(cls: type) -> type:
    """``@register_model("qadapter")``, except in the copy ``python -m`` runs as ``__main__``: that one
    imports this module properly (see the bottom), which registers the class once under its real name."""
    return cls if __name__ == "__main__" else register_model("qadapter")(cls)


@_registered
class QAdapterLM(HFLM):
    """lm-eval's HFLM scoring and generating with a Q-Adapter's customized policy π̃."""

    def __init__(
        self,
        adapter: str | None = None,
        alpha_0: float | None = None,
        alpha_tilde: float | None = None,
        model: str | None = None,
        device: str | None = None,
        dtype: str | None = None,
        allow_base_mismatch: bool = False,
        gen_chunk_tokens: int | None = None,
        qmodel: Any = None,
        **kwargs: Any,
    ) -> None:
        if kwargs.pop("backend", "causal") not in ("causal", "default"):
            raise ValueError("qadapter: only the causal backend is supported")
        for unsupported in ("pretrained", "peft", "delta", "parallelize", "tp_plan", "tokenizer", "gguf_file"):
            if kwargs.get(unsupported) not in (None, False):
                raise ValueError(
                    f"qadapter: '{unsupported}' is not supported; the base model and tokenizer come from the adapter "
                    "(use adapter=DIR, and model=... to load the base from elsewhere)"
                )
            kwargs.pop(unsupported, None)
        if qmodel is None:
            if adapter is None:
                raise ValueError("qadapter: model_args must name the adapter folder, e.g. adapter=runs/my-adapter")
            qmodel = load_qmodel(adapter, model=model, device=device, dtype=dtype, allow_base_mismatch=allow_base_mismatch)
        if len(getattr(qmodel, "adapters", None) or {None: None}) > 1:  # scoring below reads the active adapter's Q only
            raise ValueError("qadapter: the lm-eval model scores one adapter; load a single adapter, not a composition")
        self.qmodel = qmodel
        self.adapter = None if adapter is None else str(adapter)
        self.dial = Dial(_number(alpha_0), _number(alpha_tilde)).resolve(qmodel.adapters)
        if gen_chunk_tokens is not None:  # accepted so that older model_args still run
            log.warning("qadapter: gen_chunk_tokens is no longer used: generation reads the prompt once and decodes token by token")
        self._ignored_warned: set[str] = set()
        qmodel.peft_model.eval()
        # HFLM holds the transformers model (with the LoRA layers injected) and its tokenizer; every
        # forward it would run goes through the two overrides below instead.
        super().__init__(pretrained=qmodel.peft_model.get_base_model(), tokenizer=qmodel.tokenizer, backend="causal", **kwargs)

    @property
    def alpha_0(self) -> float:
        return self.dial.alpha_0  # type: ignore[return-value]

    @property
    def alpha_tilde(self) -> float:
        return self.dial.alpha_tilde  # type: ignore[return-value]

    # -- scoring ------------------------------------------------------------------------------

    def _model_call(self, inps: torch.Tensor, attn_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of π̃ at every position, (b, T) → (b, T, V) in float32.

        HFLM right-pads its causal batches (with token 0) and reads no position past a row's own
        length, so an all-ones mask gives every real position the logits it would have alone.
        """
        if attn_mask is not None or labels is not None:
            raise NotImplementedError("qadapter evaluates causal LMs only")
        with torch.no_grad(), autocast(self.device, self._precision()):
            q, base_logprobs = self.qmodel.q_and_base_logprobs(inps, torch.ones_like(inps))  # (b, T, V) each
            return objective.combined_logits(q, base_logprobs, self.alpha_0, self.alpha_tilde)  # (b, T, V)

    def _precision(self) -> MixedPrecision:
        """Scoring and generation both run in HFLM's ``mixed_precision_dtype`` where it has one, else
        in float32 (qadapter's evaluation precision)."""
        dtype = getattr(self, "mixed_precision_dtype", None)
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, EVAL_PRECISION)  # type: ignore[return-value]

    # -- generation -----------------------------------------------------------------------------

    def _decode_config(self, max_new_tokens: int, generation_kwargs: dict[str, Any]) -> DecodeConfig:
        ignored = sorted(set(generation_kwargs) - _SAMPLING_KWARGS - self._ignored_warned)
        if ignored:
            log.warning("qadapter: generation kwargs %s are not supported by the customized policy's sampler; ignored", ignored)
            self._ignored_warned.update(ignored)
        temperature = float(generation_kwargs.get("temperature") or 0.0)
        if not generation_kwargs.get("do_sample", temperature > 0):
            temperature = 0.0  # greedy, as HF generate with do_sample=False
        top_p = generation_kwargs.get("top_p")
        return DecodeConfig(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=1.0 if top_p is None else float(top_p),
            alpha_0=self.alpha_0,
            alpha_tilde=self.alpha_tilde,
            seed=None,  # draw from torch's global generator, which lm-eval seeds
        )

    def _model_generate(self, context: torch.Tensor, max_length: int, stop: list[str], **generation_kwargs: Any) -> torch.Tensor:
        """Context followed by the generated tokens, (b, T) → (b, T + n), right-padded after a row ends.

        This is HF ``generate``'s contract, which ``generate_until`` relies on: it drops the first
        T columns, decodes the rest and cuts the text at the first stop string. The context is read
        once; a row leaves the batch once it emitted EOS or its text contains a stop string, and
        everything ends at ``max_length`` tokens in all.
        """
        attention_mask = generation_kwargs.pop("attention_mask", None)
        if attention_mask is None:
            attention_mask = torch.ones_like(context)
        budget = int(max_length) - context.shape[1]
        if budget < 1:
            return context
        config = self._decode_config(budget, generation_kwargs)
        policy = mixture(self.qmodel, config.dial)
        streams = [Stream(policy, Sampling(config.temperature, config.top_p), budget, stop=StopMatcher(stop or [])) for _ in range(context.shape[0])]
        produced: list[list[int]] = [[] for _ in streams]  # every token a row emitted, its EOS included
        eos, pad = eos_ids(self.qmodel), self.tokenizer.pad_token_id
        batch = DecodeBatch(self.qmodel, self._precision())
        running = list(range(len(streams)))  # the stream of each batch row
        with torch.no_grad():
            logits = batch.add(context, attention_mask, [s.mixture for s in streams])  # (b, V)
            while True:
                tokens, _ = decode_step(logits, [streams[i] for i in running], eos, pad, self.tokenizer)  # (r,)
                for i, token in zip(running, tokens.tolist()):
                    produced[i].append(token)
                alive = [j for j, i in enumerate(running) if streams[i].finish is None]
                if not alive:
                    break
                batch.keep(alive)  # a row that ended leaves the batch
                running = [running[j] for j in alive]
                logits = batch.step(tokens[alive])
        width = max(len(p) for p in produced)
        out = torch.full((context.shape[0], width), pad, dtype=context.dtype, device=context.device)
        for row, tokens in enumerate(produced):
            out[row, : len(tokens)] = torch.tensor(tokens, dtype=context.dtype)
        return torch.cat([context, out], dim=1)

    # -- reporting ------------------------------------------------------------------------------

    def get_model_info(self) -> dict:
        """What lm-eval records in ``results["config"]``: the adapter, its base and the dial (no hub look-up)."""
        identity = self.qmodel.identity
        return {
            "model_num_parameters": sum(p.numel() for p in self.qmodel.peft_model.parameters()),
            "model_dtype": str(next(self.qmodel.peft_model.parameters()).dtype),
            "model_revision": identity.revision,
            "model_sha": "",
            "qadapter_adapter": self.adapter,
            "qadapter_base": identity.name,
            "qadapter_q_form": self.qmodel.config.q_form,
            "qadapter_alpha_0": self.alpha_0,
            "qadapter_alpha_tilde": self.alpha_tilde,
        }


def main() -> None:
    """``python -m qadapter.eval.lm_eval_plugin ARGS``: lm-eval's CLI with the ``qadapter`` model registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    from qadapter.eval import lm_eval_plugin  # the registering import

    lm_eval_plugin.main()
