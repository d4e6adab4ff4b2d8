"""serengeti models as ``transformers`` causal LMs: ``AutoModelForCausalLM``, ``generate()``, ``pipeline``.

``import serengeti`` registers :class:`SerengetiConfig` (``model_type`` ``"serengeti"``) and
:class:`SerengetiForCausalLM` with ``AutoConfig`` / ``AutoModelForCausalLM``, so an exported folder
(``evaluate.py task=export``, ``save_pretrained``) loads the ``transformers`` way::

    import serengeti
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained("exports/my_model")
    tok = AutoTokenizer.from_pretrained("exports/my_model")
    out = model.generate(**tok("The meaning of life is", return_tensors="pt"), max_new_tokens=32)

The model wraps the backbone (:class:`~serengeti.models.backbone.LMHeadModel`); no mixer is implemented
twice. Loading goes through :func:`serengeti.models.pretrained.load_model`: weights from safetensors (or a
weights-only ``.ckpt``), the stored config checked before anything is built, no code from the folder
(``trust_remote_code`` is never needed and is ignored; a config naming code, ``auto_map``, is refused).

``generate()`` runs on the recurrent state of docs/architecture.md ("The state / step contract"):
:class:`SerengetiCache` carries one :class:`~serengeti.models.backbone.GenerationState` (KV caches,
H3/S5/Hyena-S5 states, Hyena/long-conv histories); the prompt is one parallel prefill, every new
token one ``LMHeadModel.step``, exactly as :func:`serengeti.generate`.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast
from huggingface_hub.dataclasses import strict

# only light modules at import time: this module is imported when transformers is (serengeti/__init__.py),
# which may happen while a serengeti module is half-imported (e.g. Lightning imports transformers)
from serengeti.errors import CheckpointError
from serengeti.io.checkpoint import CONFIG_NAME, HF_ARCHITECTURE, HF_MODEL_TYPE

if TYPE_CHECKING:
    from serengeti.models.backbone import GenerationState, LMHeadModel

log = logging.getLogger(__name__)

#: positions a cache made by ``forward(use_cache=True)`` holds for a model that takes any length
DEFAULT_CACHE_LEN = 2048
#: config.json keys that would make ``transformers`` import code from the folder
_CODE_KEYS = ("auto_map", "custom_pipelines")


@strict
class SerengetiConfig(PreTrainedConfig):
    """The ``config.json`` of an export as a ``transformers`` config.

    Attributes:
        model: the resolved ``model`` config (mixer ``_target_`` and options; built by
            :func:`~serengeti.models.backbone.build_model`, which accepts only registered mixers).
        dataset, tokenizer: the export's ``dataset`` config and tokenizer record (may be None).
        vocab_size: the tokenizer's vocabulary (the logits have this many columns).
    """

    model_type = HF_MODEL_TYPE

    model: dict | None = None
    dataset: dict | None = None
    tokenizer: dict | None = None
    format: str = "serengeti"
    version: int = 1
    vocab_size: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    use_cache: bool = True

    def __post_init__(self, **kwargs: Any) -> None:
        code = [k for k in _CODE_KEYS if k in kwargs]
        if code:
            raise CheckpointError(f"{CONFIG_NAME}: {code[0]!r} names code to run from the folder; serengeti models "
                                  "never run code from a checkpoint (remove the key)")
        if self.model is not None and not isinstance(self.model, dict):
            raise CheckpointError(f"{CONFIG_NAME}: 'model' must be a mapping, got {type(self.model).__name__}")
        super().__post_init__(**kwargs)

    @property
    def serengeti_config(self) -> dict:
        """``{"model": ..., "dataset": ..., "tokenizer": ...}`` as :func:`serengeti.models.pretrained.load_model` returns it."""
        return {k: getattr(self, k) for k in ("model", "dataset", "tokenizer") if getattr(self, k) is not None}

    @classmethod
    def from_serengeti(cls, cfg: dict, vocab_size: int, **kwargs: Any) -> SerengetiConfig:
        """From a config of :func:`serengeti.io.checkpoint.read_checkpoint` (a ``.ckpt`` or an export, old or new)."""
        record = cfg.get("tokenizer") or {}
        eos = cfg.get("eos_token_id")
        if eos is None and record.get("kind") == "char" and record.get("eos"):
            eos = len(record["chars"])
        return cls(model=cfg["model"], dataset=cfg.get("dataset"), tokenizer=cfg.get("tokenizer"),
                   vocab_size=vocab_size, eos_token_id=eos, architectures=[HF_ARCHITECTURE], **kwargs)



class SerengetiCache(Cache):
    """The recurrent state of one generation as a ``transformers`` cache.

    Holds a :class:`~serengeti.models.backbone.GenerationState`, allocated by the model's first forward
    (its batch size) for ``max_len`` positions in total (prompt + new tokens - 1). Attention layers
    keep a KV cache, H3/S5/Hyena-S5 a constant-size state, Hyena/long-conv their input history.

    A recurrent state cannot be rolled back or reordered, so beam search, assisted decoding and
    ``crop`` are refused with one line.
    """

    def __init__(self, max_len: int | None = None) -> None:
        super().__init__(layers=[])
        self.max_len = max_len
        self.state: GenerationState | None = None

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Positions consumed so far."""
        return 0 if self.state is None else self.state.offset

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1 if self.max_len is None else self.max_len

    @property
    def is_croppable(self) -> bool:
        return False

    @property
    def is_initialized(self) -> bool:
        return self.state is not None

    def reset(self) -> None:
        self.state = None

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove != 0:
            self._refuse("crop")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._refuse("beam search (num_beams > 1)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._refuse("batch_repeat_interleave")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._refuse("batch_select_indices")

    @staticmethod
    def _refuse(what: str) -> None:
        raise ValueError(f"{what}: a serengeti generation state cannot be rolled back or reordered; "
                                  "generate with num_beams=1 (greedy or sampling)")


class SerengetiForCausalLM(PreTrainedModel, GenerationMixin):
    """A serengeti :class:`~serengeti.models.backbone.LMHeadModel` (``self.backbone``) behind the ``transformers`` API.

    ``forward(input_ids)``: logits (B, L, vocab_size) (the embedding's padding rows dropped) and, with
    ``labels``, the shifted next-token cross-entropy (``-100`` ignored). Inputs are token ids of
    sequences of one length: an ``attention_mask`` with zeros (padding) is refused, because padding
    would enter the recurrent and convolutional states.
    """

    config_class = SerengetiConfig
    base_model_prefix = "backbone"
    main_input_name = "input_ids"
    _no_split_modules = ["Block"]

    def __init__(self, config: SerengetiConfig, backbone: LMHeadModel | None = None) -> None:
        super().__init__(config)
        if backbone is None:
            if not config.model:
                raise CheckpointError("SerengetiConfig.model is empty: load a folder with "
                                      "AutoModelForCausalLM.from_pretrained(DIR) or pass model={...}")
            from serengeti.models.backbone import build_model

            backbone = build_model(dict(config.model))
        self.backbone = backbone
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        """Nothing: the backbone initialises itself (``model.init_scheme``, docs/architecture.md)."""

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.backbone.word_embeddings

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.backbone.lm_head

    # -- forward / generation ----------------------------------------------------------------------

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                cache: SerengetiCache | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, logits_to_keep: int = 0, return_dict: bool | None = None,
                inputs_embeds: torch.Tensor | None = None, **kwargs: Any) -> CausalLMOutputWithPast | tuple:
        """input_ids: (B, L) -> logits (B, L, vocab_size), or the last ``logits_to_keep`` positions.

        With ``cache`` (or ``use_cache=True``, which makes one; ``None`` makes none), the state is
        advanced: a fresh cache gets the parallel prefill, a started one one recurrent step per token.
        """
        if input_ids is None or inputs_embeds is not None:
            raise ValueError("SerengetiForCausalLM takes input_ids (token ids), not inputs_embeds")
        for flag in ("output_attentions", "output_hidden_states"):
            if kwargs.get(flag):
                raise ValueError(f"{flag}=True: serengeti models return logits (and the cache) only")
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("attention_mask has zeros (padding): serengeti models take unpadded sequences of one "
                             "length; generate or score the prompts one at a time (batch_size=1)")
        if not isinstance(logits_to_keep, int):
            raise ValueError("logits_to_keep must be an int (the number of last positions)")
        if cache is None and use_cache:  # None too: a plain forward (scoring) builds no state
            cache = SerengetiCache()
        if cache is not None and not isinstance(cache, SerengetiCache):
            raise ValueError(f"cache must be a SerengetiCache, got {type(cache).__name__}")
        # without gradients (generate(), scoring) in inference mode, as serengeti.generate: cheaper per step
        with torch.inference_mode(not torch.is_grad_enabled()):
            logits = self._logits(input_ids, cache, logits_to_keep)[..., : self.backbone.vocab_size]
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        out = CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        return out if return_dict else out.to_tuple()

    def _logits(self, input_ids: torch.Tensor, cache: SerengetiCache | None, logits_to_keep: int) -> torch.Tensor:
        backbone = self.backbone
        if cache is None:
            return backbone(input_ids, num_last_tokens=logits_to_keep)
        if cache.state is None:
            (batch, prompt_len), device = input_ids.shape, backbone.word_embeddings.weight.device
            max_len = cache.max_len or backbone.max_seq_len or prompt_len + DEFAULT_CACHE_LEN
            from serengeti.models.generation import check_memory

            check_memory(backbone, batch, prompt_len, max(max_len - prompt_len + 1, 1), device)
            cache.state = backbone.allocate_state(batch, max_len=max_len)
        if cache.state.offset == 0:
            return backbone(input_ids, state=cache.state, num_last_tokens=logits_to_keep)
        # a started state: one recurrent step per token (what serengeti.generate does after the prompt)
        steps = [backbone.step(input_ids[:, t], cache.state) for t in range(input_ids.shape[1])]
        logits = torch.stack(steps, dim=1)
        return logits[:, -logits_to_keep:] if logits_to_keep > 0 else logits

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, next_sequence_length: int | None = None,
                                      cache: SerengetiCache | None = None, **kwargs: Any) -> dict:
        """``generate()``'s inputs for one forward: the tokens the cache has not seen, the cache and the
        remaining options (``transformers``' generic version also builds position ids and 4-D masks,
        which these models do not take, and costs a noticeable share of a step)."""
        kwargs.pop("labels", None)
        if next_sequence_length is not None:
            input_ids = input_ids[:, -next_sequence_length:]
        return {**kwargs, "input_ids": input_ids.to(self.backbone.word_embeddings.weight.device), "cache": cache}

    def _prepare_cache_for_generation(self, generation_config: Any, model_kwargs: dict, generation_mode: Any,
                                      batch_size: int, max_cache_length: int) -> None:
        """``generate()``: a :class:`SerengetiCache` for ``max_cache_length`` positions (prompt + new - 1)."""
        if getattr(generation_config, "num_beams", 1) > 1:
            SerengetiCache._refuse("beam search (num_beams > 1)")
        if model_kwargs.get("cache") is not None or generation_config.use_cache is False:
            return
        bound = self.backbone.max_seq_len
        if bound is not None and max_cache_length > bound:
            raise ValueError(f"generate needs {max_cache_length} positions (prompt + max_new_tokens - 1), more than "
                             f"the model's maximum sequence length {bound} (model.l_max)")
        model_kwargs["cache"] = SerengetiCache(max_len=max_cache_length)

    # -- loading and saving --------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *model_args: Any,
                        config: SerengetiConfig | None = None, dtype: Any = None, torch_dtype: Any = None,
                        device_map: Any = None, subfolder: str = "", trust_remote_code: Any = None,
                        **kwargs: Any) -> SerengetiForCausalLM:
        """Load an export (new or older, without ``model_type``) or a ``.ckpt`` from ``train.py``.

        Reads through :func:`serengeti.models.pretrained.load_model` (safetensors / weights-only, the
        stored config checked before anything is built). ``dtype``/``torch_dtype``: ``None`` or
        ``"auto"`` keeps the stored float32, or a floating dtype (``torch.bfloat16``, ``"float16"``,
        ...); ``device_map``: ``None``, one device (``"cpu"``, ``"cuda:0"``, ``"auto"`` = the GPU when
        there is one) or ``{"": device}``; anything else is refused in one line, as are options that
        need other formats (``gguf_file``, ``quantization_config``) and non-local paths.
        ``trust_remote_code`` is ignored: nothing from the folder is ever run.
        """
        from serengeti.models.pretrained import load_model

        if model_args:
            raise ValueError("SerengetiForCausalLM.from_pretrained takes no positional model arguments")
        _check_load_options(kwargs)
        dtype = _resolve_dtype(dtype if dtype is not None else torch_dtype)
        device = _resolve_device(device_map)
        path = Path(pretrained_model_name_or_path).expanduser() / subfolder
        if not path.exists():
            raise CheckpointError(f"{path}: not a local folder or file; serengeti models load from disk "
                                  "(download a Hub repository first, e.g. `hf download REPO --local-dir DIR`)")
        backbone, cfg, _ = load_model(path, load_tokenizer=False)
        stored = SerengetiConfig.from_serengeti(cfg, backbone.vocab_size, name_or_path=str(pretrained_model_name_or_path))
        if config is not None and config.model not in (None, cfg["model"]):
            raise CheckpointError(f"{path}: config= has another 'model' section than the folder's {CONFIG_NAME}")
        model = cls(stored, backbone=backbone)
        model._source = path
        backbone.pretrained_config, backbone.pretrained_path = cfg, str(path)
        if dtype is not None:
            model.to(dtype)
        return model.to(device).eval()

    def save_pretrained(self, save_directory: str | os.PathLike, *, overwrite: bool = True, tokenizer: Any = None,
                        is_main_process: bool = True, safe_serialization: bool = True, push_to_hub: bool = False,
                        **kwargs: Any) -> None:
        """Write the export's files into ``save_directory`` (created if missing; other files left alone).

        A folder with an earlier export of ours is updated. ``overwrite=False`` refuses, naming them,
        to replace another model's files there (a foreign ``config.json``/``tokenizer.json``). The
        tokenizer files come from ``tokenizer`` (a serengeti tokenizer), else from the folder this
        model was loaded from or its character vocabulary (see :func:`serengeti.io.checkpoint.export_contents`).
        """
        from serengeti.data.tokenizers import recorded_tokenizer
        from serengeti.io.checkpoint import save_into

        if kwargs:
            raise ValueError(f"save_pretrained: option {next(iter(kwargs))!r} is not supported by serengeti models")
        if not safe_serialization:
            raise ValueError("save_pretrained: serengeti models are saved as safetensors only (safe_serialization=True)")
        if push_to_hub:
            raise ValueError("save_pretrained(push_to_hub=True) is not supported: save, then upload the folder "
                             "(e.g. `hf upload REPO DIR`)")
        if not is_main_process:
            return
        cfg = self.config.serengeti_config
        source = getattr(self, "_source", None)
        if tokenizer is None:
            tokenizer = recorded_tokenizer(cfg, source if source is not None and source.is_dir() else None)
        save_into(self.backbone, cfg, save_directory, tokenizer=tokenizer, replace_foreign=overwrite)


#: options of ``transformers``' ``from_pretrained`` that have nothing to do for a local folder
_IGNORED_LOAD_OPTIONS = {"revision": (None, "main"), "cache_dir": None, "local_files_only": None,
                         "force_download": (None, False), "token": None, "proxies": None, "_from_auto": None,
                         "adapter_kwargs": (None, {}), "low_cpu_mem_usage": None, "use_safetensors": (None, True),
                         "attn_implementation": (None, "eager", "sdpa"), "gguf_file": (None,),
                         "quantization_config": (None,), "code_revision": (None,), "_from_pipeline": None,
                         "max_memory": (None,), "offload_folder": None}


def _check_load_options(kwargs: dict) -> None:
    for key, value in kwargs.items():
        if key not in _IGNORED_LOAD_OPTIONS:
            raise ValueError(f"from_pretrained: option {key!r} is not supported by serengeti models")
        allowed = _IGNORED_LOAD_OPTIONS[key]
        if allowed is not None and not any(value is a or value == a for a in allowed):
            raise ValueError(f"from_pretrained: {key}={value!r} is not supported by serengeti models "
                             f"(accepted: {', '.join(map(repr, allowed))})")


def _resolve_dtype(dtype: Any) -> torch.dtype | None:
    if dtype is None or dtype == "auto":
        return None
    resolved = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"from_pretrained: dtype={dtype!r} is not a floating torch dtype (e.g. torch.bfloat16, 'float32')")
    return resolved


def _resolve_device(device_map: Any) -> torch.device:
    if isinstance(device_map, dict):
        if set(device_map) != {""}:
            raise ValueError("from_pretrained: device_map places the whole model on one device "
                             "(None, 'cpu', 'cuda:0', 'auto' or {'': device}), not per module")
        device_map = device_map[""]
    if device_map is None:
        return torch.device("cpu")
    if device_map == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device_map, int):
        return torch.device("cuda", device_map)
    try:
        return torch.device(device_map)
    except (RuntimeError, TypeError):
        raise ValueError(f"from_pretrained: device_map={device_map!r} is not a device "
                         "(None, 'cpu', 'cuda:0', 'auto' or {'': device})") from None


def register() -> None:
    """Make ``AutoConfig`` / ``AutoModelForCausalLM`` resolve ``model_type: serengeti`` (idempotent)."""
    AutoConfig.register(HF_MODEL_TYPE, SerengetiConfig, exist_ok=True)
    AutoModelForCausalLM.register(SerengetiConfig, SerengetiForCausalLM, exist_ok=True)


register()
