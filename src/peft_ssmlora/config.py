"""`SSMLoRAConfig`: the configuration of an SSMLoRA adapter, a `peft.PeftConfig` dataclass."""

from __future__ import annotations

import enum
import math
import warnings
from dataclasses import dataclass, field
from typing import Literal

from peft.config import PeftConfig


class SSMLoRAPeftType(str, enum.Enum):
    """The plugin's own PEFT type: peft's `PeftType` enum cannot be extended from outside peft.

    The value is what `adapter_config.json` stores as `peft_type`. peft looks it up in its type registry and, when
    this plugin was not imported, fails with a `KeyError` that shows only this value: so the value itself tells
    the user what to do.
    """

    SSMLORA = "SSMLORA (run `import peft_ssmlora` before loading this adapter)"


# The paper's sparse scheme: query and value alternate along depth (query in even, value in odd layers), each on its
# own chain; GPT-2's fused `c_attn` is adapted in every other layer. Both come out at half of peft LoRA's default.
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"],
    "gpt2": ["c_attn"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "phi3": ["qkv_proj"],
    # encoder-decoders: every attention's query and value (self- and cross-attention), as in peft's LoRA defaults
    "t5": ["q", "v"],
    "bart": ["q_proj", "v_proj"],
}


@dataclass
class SSMLoRAConfig(PeftConfig):
    """Configuration of an SSMLoRA adapter (Yu et al., NAACL 2025): LoRA modules of the same type linked across
    layers by a first-order state-space step on a per-token rank-`r` state.

    Args:
        r (`int`): rank of every module (≥ 1; below 2 the normalised state is identically 0, so C and D learn
            nothing and a warning is given).
        lora_alpha (`float`): scale numerator, as in LoRA.
        scale_by_rank (`bool`): `True` (default): scaling = `lora_alpha / r`, as in peft's LoRA, so that
            `LoraConfig(r=8, lora_alpha=16)` and `SSMLoRAConfig(r=8, lora_alpha=16)` mean the same scale.
            `False`: scaling = raw `lora_alpha`, as in the paper's reference code (needs a much smaller learning rate).
        target_modules (`list[str]` or `str`): every adapted module: a list of names (exact, or suffix after a dot), a
            regex matched against the full module name, or `"all-linear"`. `None`: the model family's default, the
            paper's query/value interval scheme.
        interval_modules (`list[str]`): subset of the targets adapted in staggered layers: with period
            `P = max(2, len(interval_modules))` the k-th listed module is adapted in the layers `i` with `i % P == k`.
            `["q_proj", "v_proj"]` gives query in even and value in odd layers; `["c_attn"]` every other layer.
            `None` (with `target_modules=None`): the default targets, staggered; otherwise every layer.
        exclude_modules (`list[str]` or `str`): modules never adapted (same matching rules as `target_modules`).
        layers_to_transform (`list[int]` or `int`): only adapt these layer indices.
        layers_pattern (`list[str]` or `str`): name of the `nn.ModuleList` holding the layers (e.g. `"layers"`,
            `"h"`); used to find layer indices for `layers_to_transform`, interval placement and chain order.
            `None`: the first numbered segment of a module's name is its layer index.
        modules_to_save (`list[str]`): extra modules trained and saved in full (e.g. a classifier head).
        bias (`str`): `"none"`, `"all"` or `"ssmlora_only"`: which biases are trained.
        state_dropout (`float`): dropout probability on the normalised state (not on the input `x`).
        leaky_slope (`float`): negative slope of the leaky ReLU on the dropped-out state (only its gradient matters).
        norm_eps (`float`): epsilon in the per-token min-max normalisation.
        norm_grad_floor (`float`): the normalisation's backward divides by `max(max - min + norm_eps,
            norm_grad_floor)`, so that a state flat across the rank axis (every chain at initialisation) does not get
            a gradient of size `1 / norm_eps`; the forward is unchanged. Default 1e-3 (in units of the normalised
            state, which spans [0, 1]); `0`: the paper's exact gradient.
        state_grad (`str`): `"detach"` (the paper): the state carries values along the chain but no gradient;
            `"full"`: backpropagate through the whole chain within one forward.
        init_weights (`bool` or `str`): `True` / `"kaiming"` (default): A as in peft's LoRA (kaiming-uniform),
            B = C = D = 0; `"gaussian"`: the paper's A ~ N(0, 1/r) (about 12x larger than kaiming's at d_in = 384,
            r = 8; it learned SST-2 on only 2 of 4 seeds where kaiming learned on 4 of 4), B = C = D = 0; `False`:
            every matrix random, so a fresh adapter is not a no-op (for tests only).
        trainable_token_indices (`list[int]` or `dict[str, list[int]]`): as in peft's `LoraConfig`: train only these
            rows of the input embedding (a list), or of the named embedding modules (a dict), e.g. the chat-template
            tokens TRL adds; peft's trainable-tokens machinery does the work and saves the rows with the adapter.
    """

    r: int = field(default=8, metadata={"help": "Rank of each SSMLoRA module (>= 1, >= 2 recommended)."})
    lora_alpha: float = field(default=16, metadata={"help": "Scale numerator, as in LoRA."})
    scale_by_rank: bool = field(
        default=True,
        metadata={"help": "True: scaling = lora_alpha / r (peft LoRA); False: raw lora_alpha (reference code)."},
    )
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Module names (exact or dot-suffix), a regex, or 'all-linear'. None: the model family's "
            "default, the paper's query/value interval scheme."
        },
    )
    interval_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Targets adapted in staggered layers: the k-th is adapted in layers i with i % max(2, len) == k."
        },
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Module names or a regex of modules never adapted."}
    )
    layers_to_transform: list[int] | int | None = field(
        default=None, metadata={"help": "Only adapt these layer indices."}
    )
    layers_pattern: list[str] | str | None = field(
        default=None, metadata={"help": "Name of the nn.ModuleList holding the layers, e.g. 'layers' or 'h'."}
    )
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Extra modules trained and saved in full, e.g. a classifier head."}
    )
    bias: Literal["none", "all", "ssmlora_only"] = field(
        default="none", metadata={"help": "Which biases are trained: 'none', 'all' or 'ssmlora_only'."}
    )
    state_dropout: float = field(default=0.1, metadata={"help": "Dropout probability on the normalised state."})
    leaky_slope: float = field(default=0.01, metadata={"help": "Negative slope of the leaky ReLU on the state."})
    norm_eps: float = field(default=1e-8, metadata={"help": "Epsilon of the per-token min-max normalisation."})
    norm_grad_floor: float = field(
        default=1e-3,
        metadata={"help": "The normalisation's backward divides by max(max - min + norm_eps, norm_grad_floor); "
                  "0: the paper's exact gradient. The forward does not depend on it."},
    )
    state_grad: Literal["detach", "full"] = field(
        default="detach",
        metadata={"help": "'detach' (paper): no gradient along the chain; 'full': backpropagate through it."},
    )
    init_weights: bool | Literal["gaussian", "kaiming"] = field(
        default=True,
        metadata={"help": "True/'kaiming': peft LoRA's A; 'gaussian': the paper's A ~ N(0, 1/r); B = C = D = 0. "
                  "False: random."},
    )
    trainable_token_indices: list[int] | dict[str, list[int]] | None = field(
        default=None,
        metadata={"help": "Token indices whose embedding rows are trained (a list: the input embedding), or a dict "
                  "{embedding module name: indices}; as in peft's LoraConfig."},
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = SSMLoRAPeftType.SSMLORA
        self._check_types()
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if isinstance(self.interval_modules, str):
            self.interval_modules = [self.interval_modules]

        if self.r < 1:
            raise ValueError(f"`r` must be an integer >= 1, got {self.r!r}. Use r >= 2 (e.g. r=8).")
        if self.r < 2:
            warnings.warn(
                "SSMLoRA with r=1: the min-max normalised state is identically 0, so the state matrices C and D "
                "learn nothing and SSMLoRA reduces to LoRA. Use r >= 2.",
                UserWarning,
                stacklevel=2,
            )
        for name in ("lora_alpha", "state_dropout", "leaky_slope", "norm_eps", "norm_grad_floor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"`{name}` must be a finite number, got {value!r}.")
        if self.lora_alpha == 0:
            raise ValueError(
                "`lora_alpha` is 0, so the scaling is 0 and every adapter gradient is exactly zero: nothing would "
                "train. Set `lora_alpha` (e.g. lora_alpha=16 with r=8)."
            )
        if not 0.0 <= self.state_dropout < 1.0:
            raise ValueError(f"`state_dropout` must be in [0, 1), got {self.state_dropout}.")
        if self.norm_eps <= 0:
            raise ValueError(f"`norm_eps` must be > 0 (it guards a division by max - min), got {self.norm_eps}.")
        if self.norm_grad_floor < 0:
            raise ValueError(
                f"`norm_grad_floor` must be >= 0 (0: the exact gradient of the normalisation), got "
                f"{self.norm_grad_floor}."
            )
        if self.state_grad not in ("detach", "full"):
            raise ValueError(f"`state_grad` must be 'detach' or 'full', got {self.state_grad!r}.")
        if self.bias not in ("none", "all", "ssmlora_only"):
            raise ValueError(f"`bias` must be 'none', 'all' or 'ssmlora_only', got {self.bias!r}.")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError(
                "`layers_to_transform` cannot be combined with a regex `target_modules`; pass a list of module "
                "names instead, or put the layer indices into the regex."
            )
        if self.interval_modules is not None and len(self.interval_modules) == 0:
            raise ValueError("`interval_modules` is empty; pass None to adapt every target in every layer.")

    def _check_types(self) -> None:
        """Type errors that name the field and the fix. A hand-edited `adapter_config.json` reaches this too (peft
        builds the config from its fields), where `"false"` (a string) would otherwise be truthy and `1` pass as
        `True`."""
        for name in ("scale_by_rank", "inference_mode"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise _field_type_error(name, value, "a bool", "Write true or false (in JSON: without quotes).")
        if not _is_int(self.r):
            raise _field_type_error("r", self.r, "an integer >= 1", "Use an integer rank, e.g. r=8.")
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, str) or _is_sequence_of(value, str)):
                raise _field_type_error(
                    name, value, "a list of module names, a regex string or None",
                    f'Write e.g. {name}=["q_proj", "v_proj"] (in JSON: a list of strings).')
        for name in ("interval_modules", "layers_pattern"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, str) or _is_sequence_of(value, str, ordered=True)):
                example = '["q_proj", "v_proj"]' if name == "interval_modules" else '"layers"'
                raise _field_type_error(name, value, "a list of module names, a string or None",
                                        f"Write e.g. {name}={example} (in JSON: strings in quotes).")
        if self.modules_to_save is not None and not _is_sequence_of(self.modules_to_save, str):
            raise _field_type_error("modules_to_save", self.modules_to_save, "a list of module names or None",
                                    'Write e.g. modules_to_save=["classifier"].')
        value = self.layers_to_transform
        if value is not None and not (_is_int(value) or _is_index_list(value)):
            raise _field_type_error("layers_to_transform", value, "a layer index, a list of layer indices or None",
                                    "Write e.g. layers_to_transform=[0, 1, 2] (in JSON: numbers without quotes).")
        value = self.init_weights
        if not isinstance(value, bool) and value not in ("gaussian", "kaiming"):
            raise _field_type_error("init_weights", value, "True, False, 'gaussian' or 'kaiming'",
                                    "Write true or false without quotes in JSON, or one of the two strings.")
        value = self.trainable_token_indices
        if value is not None and not _is_index_list(value) and not (
            isinstance(value, dict) and all(isinstance(k, str) and _is_index_list(v) for k, v in value.items())
        ):
            raise _field_type_error(
                "trainable_token_indices", value, "a list of token indices or a dict {embedding name: indices}",
                'Write e.g. trainable_token_indices=[0, 5] or {"embed_tokens": [0, 5]}.')

    @property
    def scaling(self) -> float:
        """The factor on the low-rank update: `lora_alpha / r` or raw `lora_alpha` (see `scale_by_rank`)."""
        return self.lora_alpha / self.r if self.scale_by_rank else float(self.lora_alpha)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_sequence_of(value: object, item_type: type, *, ordered: bool = False) -> bool:
    """A list or tuple (or, unless `ordered`, a set) whose items all are `item_type`."""
    containers = (list, tuple) if ordered else (list, tuple, set, frozenset)
    return isinstance(value, containers) and all(isinstance(item, item_type) for item in value)


def _is_index_list(value: object) -> bool:
    return isinstance(value, (list, tuple)) and all(_is_int(i) for i in value)


def _field_type_error(name: str, value: object, expected: str, fix: str) -> TypeError:
    got = f"the string {value!r}" if isinstance(value, str) else f"{value!r} (type {type(value).__name__})"
    return TypeError(f"SSMLoRAConfig field `{name}` must be {expected}, got {got}. {fix}")
