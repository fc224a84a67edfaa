"""YAML recipes -> typed dataclasses.

A recipe is one YAML file whose sections mirror the dataclasses below. Loading checks every key and
every value's type; an unknown key or a wrong type is a `RecipeError` with one line naming the key and,
for unknown keys, the closest valid one. `--set a.b=c` overrides go through the same checks.

Recipes ship in `vigu_cli/recipes/` (also reachable as `recipes/` at the repository root) and are named
by file stem (`world-tiny`) or given as a path.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import yaml

from .errors import VigUError
from .synth.captioners import CaptionerConfig

RECIPES_DIR = Path(__file__).parent / "recipes"


class RecipeError(VigUError):
    """A recipe problem, phrased as one line for the user."""


# ----------------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------------


@dataclass
class TransformerArch:
    """`UniViGUTransformer` architecture, used when the model is built from scratch (the world) and for
    memory estimates. A pretrained folder's own config wins over these values."""

    patch_size: list[int] = field(default_factory=lambda: [1, 2, 2])
    num_attention_heads: int = 2
    attention_head_dim: int = 32
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 32
    freq_dim: int = 64
    ffn_dim: int = 256
    num_layers: int = 2
    cross_attn_norm: bool = True
    qk_norm: str = "rms_norm_across_heads"
    eps: float = 1e-6
    rope_max_seq_len: int = 1024


@dataclass
class TextEncoderArch:
    """A `UMT5EncoderModel` config, used only when the text encoder is built from scratch (the world)."""

    vocab_size: int = 256
    d_model: int = 32
    d_kv: int = 16
    d_ff: int = 64
    num_layers: int = 2
    num_heads: int = 2
    relative_attention_num_buckets: int = 8
    max_length: int = 512


@dataclass(frozen=True)
class Between:
    """A recipe number's range, checked when the recipe is read (`Annotated[float, Between(0, 1)]`); `open` excludes
    the ends (a shift is above 0; an Adam beta below 1)."""

    low: float = -math.inf
    high: float = math.inf
    open: bool = False

    def holds(self, value: float) -> bool:
        return self.low < value < self.high if self.open else self.low <= value <= self.high

    def describe(self) -> str:
        if math.isinf(self.high):
            return f"above {self.low:g}" if self.open else f"at least {self.low:g}"
        if math.isinf(self.low):
            return f"below {self.high:g}" if self.open else f"at most {self.high:g}"
        return f"between {self.low:g} and {self.high:g}" + (" (both excluded)" if self.open else "")


Probability = Annotated[float, Between(0.0, 1.0)]
Count = Annotated[int, Between(1)]  # steps per call, a batch, an interval: one or more
Amount = Annotated[int, Between(0)]  # a number of things that may be none
NonNegative = Annotated[float, Between(0.0)]
Positive = Annotated[float, Between(0.0, open=True)]
Beta = Annotated[float, Between(0.0, 1.0, open=True)]


@dataclass
class VaeArch:
    """The autoencoder: `world` (the exact patch autoencoder) or `wan` (`AutoencoderKLWan`)."""

    kind: Literal["world", "wan"] = "world"
    temporal_fold: int = 4
    spatial_fold: int = 4
    base_dim: int = 96
    z_dim: int = 16


@dataclass
class ModelSection:
    """Where the model comes from.

    `base: world` builds the world's components from the architectures below; `base: <path>` loads a
    local folder: a stock diffusers Wan2.1 folder (converted on the fly) or a vigu folder.
    """

    base: str = "world"
    height: Count = 64
    width: Count = 64
    num_frames: Count = 17
    fps: Count = 8
    prompt_max_length: Count = 512
    normalize_latents: bool = True
    transformer: TransformerArch = field(default_factory=TransformerArch)
    text_encoder: TextEncoderArch = field(default_factory=TextEncoderArch)
    vae: VaeArch = field(default_factory=VaeArch)


@dataclass
class TextSection:
    """The text stream (DESIGN.md section 4)."""

    formulation: Literal["embedding", "discrete"] = "embedding"
    tokenizer: str = "world"  # `world` (the world's word-level tokenizer), `umt5` (the Wan folder's), or a path
    max_length: Count = 48
    latent_dim: Count = 32  # d_t of the embedding formulation
    ffn_text_init: Literal["copy", "new"] = "copy"
    ffn_text_dim: Amount = 0  # 0: same width as the video FFN
    rounding_weight: float = 1.0  # Diffusion-LM rounding cross-entropy (embedding formulation)
    kappa_exponent: float = 1.0  # discrete formulation: kappa(tau) = tau ** n
    discrete_source: Literal["uniform", "mask"] = "uniform"
    attention: Literal["shared", "own"] = "shared"  # own: text tokens' own self-attention projections (README)
    video_attends_text: bool = True  # false: video tokens attend to video tokens only (README)
    video_keys: Literal["video", "text"] = "video"  # text: the text reads video tokens through its own attn1_text
                                                    # keys and values (needs attention: own, video_attends_text: false)
    cross_attention: Literal["shared", "own"] = "shared"  # own: the text reads the prompt through its own attn2_text


@dataclass
class FlowSection:
    """Training-time flow settings for both streams (paper section 3.1; DESIGN.md section 4)."""

    tau_sampling: Literal["uniform", "logit_normal", "shifted"] = "uniform"
    tau_shift: Positive = 1.0
    logit_mean: float = 0.0
    logit_std: Positive = 1.0
    corner_prob: Probability = 0.0  # probability of sampling a task corner (tau_v = 1 or tau_t = 1)
    understanding_share: Probability = 0.5  # of the corners: understanding (clean video); the rest generation (clean text)
    lambda_video: NonNegative = 1.0
    lambda_text: Literal["auto"] | float = "auto"  # "auto": |z_v| / |z_t| (paper)


@dataclass
class SamplingSection:
    """Defaults of the one solver used by every mode (DESIGN.md section 6)."""

    steps: Count = 25
    solver: Literal["euler", "heun"] = "euler"
    shift: Positive = 3.0
    guidance_video: float = 5.0
    guidance_text: float = 1.0
    text_shift: Optional[Positive] = None  # the text stream's time-grid shift (None: `shift`)
    text_temperature: NonNegative = 1.0  # discrete text flow's token draws (0: the most likely token); no effect on embedding
    text_order: Literal["random", "confidence"] = "random"  # discrete flow: which tokens jump (random: official)
    generate_text: Literal["prompt", "none"] = "prompt"  # text stream of `generate`: clean prompt tokens, or none
    video_eta: Probability = 0.0  # DDIM's eta for the video's Euler steps: 0 the deterministic flow, 1 the DDPM posterior's noise
    negative_prompt: str = ""  # the unconditional prompt of the video's guidance ("": the empty prompt, as the official code)
    caption_candidates: Count = 1  # captions drawn per clip by `caption`, the one agreeing most with the others kept (MBR)
    seed: int = 0


@dataclass
class StageSection:
    """One training stage (DESIGN.md section 5): what is trained, on which target, with which optimiser."""

    init: str = "previous"  # "previous" (the stage before's model), "base" (model.base), "fresh" (world: untrained)
    trainable: Literal["full", "text", "lora"] = "full"  # text: only the new text parameters
    lora_rank: Count = 32
    lora_alpha: Positive = 32.0
    lora_targets: list[str] = field(default_factory=lambda: ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0"])
    text_target: Literal["none", "prompt", "caption"] = "caption"
    cond_dropout: Probability = 0.1  # probability of replacing the prompt condition by the empty prompt
    learning_rate: NonNegative = 1e-4
    text_learning_rate: Optional[NonNegative] = None  # the new text parameters' rate (None: learning_rate)
    betas: list[Beta] = field(default_factory=lambda: [0.9, 0.95])  # paper: Adam (0.9, 0.95)
    weight_decay: NonNegative = 0.0
    lr_scheduler: Literal["constant", "constant_with_warmup", "cosine", "linear"] = "constant_with_warmup"
    warmup_steps: Amount = 100
    max_steps: Amount = 1000
    batch_size: Count = 8  # per process
    grad_accum: Count = 1
    max_grad_norm: NonNegative = 1.0  # 0: no clipping
    ema_decay: Probability = 0.0  # > 0: keep an exponential moving average of the trained weights and save it (DDP/one process)
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"  # auto: bf16 where fast (CUDA, AMX CPUs), else fp32
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile the transformer's training forward (inductor); the first step compiles
    cache_video: bool = False  # trainable: text on a video that does not read the text: what the text reads of each
    # clean clip computed once, before the first step (video_cache.py; disk: items x 2 x blocks x tokens x dim)
    checkpoint_every: Count = 500
    keep_checkpoints: Count = 2
    log_every: Count = 10
    validate_every: Amount = 0  # 0: only at the end
    val_items: Amount = 32
    val_steps: Count = 20
    seed: int = 0


@dataclass
class TrainSection:
    output_dir: str = ""  # default: runs/<recipe name>; each stage writes <output_dir>/<stage>
    dataset: str | list[str] = ""  # a `vigu build-dataset` folder, or a list of them read as one; default: data.out
    report_to: str = "none"  # an accelerate tracker (tensorboard, wandb, ...) when installed, or "all"
    base: StageSection = field(default_factory=lambda: StageSection(init="fresh", text_target="none"))
    recall: StageSection = field(default_factory=lambda: StageSection(init="base", text_target="prompt", cond_dropout=0.5))
    refine: StageSection = field(default_factory=lambda: StageSection(init="previous", text_target="caption", cond_dropout=0.3))


STAGES = ("base", "recall", "refine")  # in training order: `init: previous` starts from the stage before


def stage_section(recipe: Recipe, name: str) -> StageSection:
    """`recipe.train.<name>`, for a name of STAGES."""
    if name not in STAGES:
        raise VigUError(f"unknown stage '{name}': use one of {', '.join(STAGES)}")
    return getattr(recipe.train, name)


@dataclass
class GeneratorSection:
    """`vigu build-dataset` step 2, the videos: `world` (the world's renderer), `wan` (a local diffusers
    WanPipeline folder), `vigu` (a vigu folder or a stock Wan folder, sampled by vigu's solver with the
    recipe's `sampling` section) or `files` (a folder of the user's own videos). Clips are made at the
    model's shape (`model.height/width/num_frames/fps`)."""

    backend: Literal["world", "wan", "vigu", "files"] = "world"
    path: str = ""  # wan, vigu: the model folder ("" = model.base); files: the folder of videos
    batch_size: Count = 1  # wan, vigu: prompts per call
    steps: Count = 50  # wan: denoising steps
    guidance: float = 5.0  # wan: classifier-free guidance scale
    shift: Positive = 3.0  # wan: the scheduler's flow shift (Wan2.1: 3.0 at 480p, 5.0 at 720p)
    negative_prompt: str = ""  # wan
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # wan, vigu: transformer and text encoder; auto: bf16 where fast


@dataclass
class DataSection:
    """`vigu build-dataset` (paper section 4.1): brief prompts -> videos -> detailed captions -> a cache of
    VAE latents, prompt embeddings and token ids that training reads."""

    out: str = ""  # the dataset folder; "" = runs/<recipe name>/data
    num_items: Amount = 64  # 0: every prompt of the prompts file / every video of the folder
    seed: int = 0  # item i is determined by (seed, i): its prompt, its video, its place
    shard_size: Count = 16  # items per shard: the unit of work per rank, of resume and of the cache files
    val_every: Amount = 16  # every k-th item (index % k == k - 1) is held out for validation; 0: none
    prompts: str = "world"  # world (the world sampler), sidecar (files: <video>.txt), or a .txt / .jsonl file
    min_prompt_tokens: Amount = 0  # the prompt rule, in tokens of the text-stream tokenizer (paper: 0-128)
    max_prompt_tokens: Amount = 128
    generator: GeneratorSection = field(default_factory=GeneratorSection)
    captioner: CaptionerConfig = field(default_factory=CaptionerConfig)
    latents_dtype: Literal["float32", "bfloat16"] = "float32"  # how cached latents are stored
    embeds_dtype: Literal["float32", "bfloat16"] = "float32"  # how cached prompt embeddings are stored
    text_encoder_dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 where fast (GPU, AMX CPUs), else fp32
    keep_videos: bool = True  # also write each clip as videos/<id>.mp4 (to inspect, or for `vigu caption`)


@dataclass
class Recipe:
    name: str = "unnamed"
    model: ModelSection = field(default_factory=ModelSection)
    text: TextSection = field(default_factory=TextSection)
    flow: FlowSection = field(default_factory=FlowSection)
    sampling: SamplingSection = field(default_factory=SamplingSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)


# ----------------------------------------------------------------------------------------------------
# Loading and overriding
# ----------------------------------------------------------------------------------------------------


def available_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def resolve_recipe_path(name_or_path: str | Path) -> Path:
    path = Path(name_or_path)
    if path.is_file():
        return path
    named = RECIPES_DIR / f"{name_or_path}.yaml"
    if named.is_file():
        return named
    hint = _closest(str(name_or_path), available_recipes())
    raise RecipeError(
        f"recipe '{name_or_path}' not found: give a YAML path or one of {', '.join(available_recipes())}"
        + (f" (did you mean '{hint}'?)" if hint else "")
    )


def load_recipe(name_or_path: str | Path = "world-tiny", overrides: list[str] | None = None) -> Recipe:
    """Load a recipe by name or path, then apply `a.b=c` overrides, all type-checked."""
    path = resolve_recipe_path(name_or_path)
    data = parse_yaml(path.read_text(), f"recipe {path}", "fix the file") or {}
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {path} must be a mapping of sections, got {type(data).__name__}")
    recipe = build(Recipe, data, "")
    for item in overrides or []:
        apply_override(recipe, item)
    text = recipe.text
    if text.video_keys == "text" and (text.attention != "own" or text.video_attends_text):
        raise RecipeError("text.video_keys: text needs text.attention: own and text.video_attends_text: false "
                          "(the video's queries keep the video's keys)")
    sampling = recipe.sampling
    if sampling.solver == "heun" and sampling.video_eta > 0:
        raise RecipeError("sampling.video_eta is for the euler solver: set sampling.video_eta=0 with sampling.solver=heun")
    return recipe


def parse_yaml(text: str, what: str, fix: str) -> Any:
    """YAML text -> data, or one line naming `what`, where in it, the problem and `fix` (YAML's own message spans
    several lines)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError(f"{what} is not valid YAML{where}: {problem}; {fix}") from None


def apply_override(recipe: Any, item: str) -> None:
    """Apply one `a.b.c=value` override in place; the value is parsed as YAML, then type-checked."""
    if "=" not in item:
        raise RecipeError(f"override '{item}' must look like section.key=value, e.g. sampling.steps=10")
    dotted, raw = item.split("=", 1)
    keys = dotted.strip().split(".")
    target = recipe
    for depth, key in enumerate(keys):
        names = [f.name for f in dataclasses.fields(target)]
        if key not in names:
            where = ".".join(keys[:depth]) or "the recipe"
            raise RecipeError(_unknown_key_message(".".join(keys[: depth + 1]), key, names, where))
        if depth == len(keys) - 1:
            hint = typing.get_type_hints(type(target), include_extras=True)[key]
            value = parse_yaml(raw, f"the value of override '{dotted}'", "quote it or fix it")
            setattr(target, key, convert(hint, value, dotted))
        else:
            target = getattr(target, key)
            if not dataclasses.is_dataclass(target):
                raise RecipeError(f"'{'.'.join(keys[: depth + 1])}' is a value, not a section")


def to_dict(recipe: Any) -> dict:
    return dataclasses.asdict(recipe)


def dump_recipe(recipe: Any) -> str:
    return yaml.safe_dump(to_dict(recipe), sort_keys=False)


def build(cls: type, data: Any, where: str) -> Any:
    """Build dataclass `cls` from a mapping, checking keys and types; `where` is the dotted path."""
    if not isinstance(data, dict):
        raise RecipeError(f"'{where or 'recipe'}' must be a mapping, got {type(data).__name__}: {data!r}")
    hints = typing.get_type_hints(cls, include_extras=True)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{where}.{key}" if where else str(key)
        if key not in names:
            raise RecipeError(_unknown_key_message(dotted, str(key), names, where or "the recipe"))
        kwargs[key] = convert(hints[key], value, dotted)
    return cls(**kwargs)


def convert(hint: Any, value: Any, where: str) -> Any:
    """Check `value` against type `hint` (dataclass, Literal, Union, list, dict, scalar); return it converted."""
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return build(hint, value, where)
    if origin is Annotated:
        base, *ranges = typing.get_args(hint)
        value = convert(base, value, where)
        for bounds in ranges:
            if not bounds.holds(value):
                raise RecipeError(f"'{where}' must be {bounds.describe()}, got {value!r}")
        return value
    if origin is Literal:
        choices = typing.get_args(hint)
        if isinstance(value, bool):  # YAML 1.1 reads no / off / yes / on as booleans: the choice so spelled
            spelled = [c for c in choices if c in (("yes", "on", "true") if value else ("no", "off", "false"))]
            value = spelled[0] if len(spelled) == 1 else value
        if value not in choices:
            hint_word = _closest(str(value), [str(c) for c in choices])
            raise RecipeError(
                f"'{where}' must be one of {', '.join(map(str, choices))}, got {value!r}"
                + (f" (did you mean '{hint_word}'?)" if hint_word else "")
            )
        return value
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            try:
                return convert(option, value, where)
            except RecipeError:
                pass
        raise RecipeError(f"'{where}' must be {' or '.join(_type_name(o) for o in typing.get_args(hint))}, got {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"'{where}' must be a list, got {value!r}")
        (item_hint,) = typing.get_args(hint) or (Any,)
        return [convert(item_hint, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"'{where}' must be a mapping, got {value!r}")
        key_hint, value_hint = typing.get_args(hint) or (Any, Any)
        return {convert(key_hint, k, where): convert(value_hint, v, f"{where}.{k}") for k, v in value.items()}
    if hint is Any:
        return value
    if hint is type(None):
        if value is not None:
            raise RecipeError(f"'{where}' must be null, got {value!r}")
        return None
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if hint in (int, float) and isinstance(value, bool):
        raise RecipeError(f"'{where}' must be {hint.__name__}, got {value!r}")
    if not isinstance(value, hint):
        raise RecipeError(f"'{where}' must be {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


def _type_name(hint: Any) -> str:
    if hint is type(None):
        return "null"
    if typing.get_origin(hint) is Literal:
        return " or ".join(repr(c) for c in typing.get_args(hint))
    if typing.get_origin(hint) is Annotated:
        base, *ranges = typing.get_args(hint)
        return " and ".join([f"a {_type_name(base)}", *(bounds.describe() for bounds in ranges)])
    return getattr(hint, "__name__", str(hint))


def _closest(word: str, options: list[str]) -> str | None:
    matches = difflib.get_close_matches(word, options, n=1, cutoff=0.5)
    return matches[0] if matches else None


def _unknown_key_message(dotted: str, key: str, names: list[str], where: str) -> str:
    hint = _closest(key, names)
    suggestion = f"did you mean '{hint}'?" if hint else f"valid keys: {', '.join(names)}"
    return f"unknown recipe key '{dotted}' in {where}: {suggestion}"
