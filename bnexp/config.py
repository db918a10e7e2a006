"""Experiment configuration: a pydantic schema, YAML loading and `--set` overrides.

Every user mistake here becomes a `ConfigError` whose message is one line naming the dotted key, so the
CLI can print it and exit 2 before anything is written to disk.
"""

from __future__ import annotations

from bnexp.errors import UserError, excerpt

import copy
import difflib
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, get_args

import yaml
from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, Strict, ValidationError,
                      field_validator, model_validator)


class ConfigError(UserError):
    """A user error in a config file or override: reported as one line, exit status 2."""


def _not_a_bool(value: Any) -> Any:
    # YAML reads `true`/`yes`/`on` as booleans and pydantic would take them as 1: `seed: yes` is a mistake.
    if isinstance(value, bool):
        raise ValueError("expected a number, not a boolean")
    return value


# Counts and seeds take only integers (not 2.5, not true); rates take any finite number, and also a string
# such as "1e-5", which YAML 1.1 does not read as a float.
Int = Annotated[int, Strict()]
Float = Annotated[float, BeforeValidator(_not_a_bool)]


def _no_nul(value: str) -> str:
    # Every OS call refuses a path with a NUL byte in it, and Python raises ValueError rather than OSError.
    if "\0" in value:
        raise ValueError("a path cannot contain a NUL byte")
    return value


PathStr = Annotated[str, AfterValidator(_no_nul)]


class _Strict(BaseModel):
    # Unknown keys are errors: a typo such as `model.nrom` must not silently fall back to a default.
    # inf/nan are refused so that `optim.lr: .inf` fails here rather than as a diverged run; a name that
    # YAML reads as a number (`--set name=2024`) is still a name.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False,
                              coerce_numbers_to_str=True)


class SyntheticConfig(_Strict):
    num_samples: Int = Field(2000, ge=4, description="total points, split into train and test")
    num_features: Int = Field(32, ge=1)
    num_classes: Int = Field(4, ge=2)
    separation: Float = Field(2.0, gt=0, description="distance scale between class means")


class LinearRegressionConfig(_Strict):
    # Santurkar et al. 2018's deep-linear-network task: x ~ N(0, I), y = A x with A a Gaussian matrix.
    num_samples: Int = Field(1000, ge=2, description="training points")
    num_test: Int = Field(1000, ge=1, description="test points, drawn like the training ones")
    num_features: Int = Field(10, ge=1, description="dimension of x and of y = A x")


class DataConfig(_Strict):
    dataset: Literal["digits", "mnist1d", "synthetic", "linear_regression", "mnist", "fashion_mnist",
                     "cifar10"] = "digits"
    batch_size: Int = Field(60, ge=1)
    # scikit-learn (the split) and numpy take seeds below 2**32 only.
    seed: Int = Field(0, ge=0, lt=2**32,
                      description="fixes the split, subsets and synthetic data across run seeds")
    root: PathStr = "data"
    download: bool = False
    test_fraction: Float = Field(0.2, gt=0, lt=1)
    train_size: Optional[Int] = Field(None, ge=2)
    test_size: Optional[Int] = Field(None, ge=1)
    synthetic: SyntheticConfig = SyntheticConfig()
    linear_regression: LinearRegressionConfig = LinearRegressionConfig()
    # CIFAR-style augmentation of training batches (images only): 4-pixel zero-padded random crops and
    # horizontal flips, drawn on the device from a generator of their own (deterministic, resumable).
    augment: Literal["none", "crop_flip"] = "none"


class RenormConfig(_Strict):
    # Batch Renormalization's clipping schedule (Ioffe 2017, section 4) in steps: plain BN (r_max 1,
    # d_max 0) for warmup_steps, then relaxed linearly to r_max at r_max_steps and d_max at d_max_steps.
    # The defaults are the paper's schedule (5k, 40k, 25k steps) scaled by 1/40 to our 2000-step runs.
    r_max: Float = Field(3.0, ge=1)
    d_max: Float = Field(5.0, ge=0)
    warmup_steps: Int = Field(125, ge=0)
    r_max_steps: Int = Field(1000, ge=0)
    d_max_steps: Int = Field(625, ge=0)


class PreciseConfig(_Strict):
    # PreciseBN (Wu & Johnson 2021): running statistics recomputed from K training batches.
    when: Literal["never", "eval", "end"] = "never"
    batches: Int = Field(20, ge=1)


class NoiseConfig(_Strict):
    # Santurkar et al. 2018's noisy BN (Algorithm 1): after BN, per step and unit mu ~ U(-a, a) and
    # sigma ~ U(1, 1 + b); per example (and position) m ~ U(mu - c, mu + c) and s ~ N(sigma, d); y -> s y + m.
    a: Float = Field(0.5, ge=0)
    b: Float = Field(0.25, ge=0)
    c: Float = Field(0.1, ge=0)
    d: Float = Field(0.1, ge=0)


class BNConfig(_Strict):
    eps: Float = Field(1e-5, gt=0)
    momentum: Optional[Float] = Field(0.1, gt=0, le=1)
    affine: bool = True
    running_var_init: Float = Field(1.0, ge=0)
    unbiased_normalize: bool = False
    variant: Literal["bn", "renorm", "ghost", "noisy"] = "bn"
    renorm: RenormConfig = RenormConfig()
    ghost_batch_size: Optional[Int] = Field(None, ge=2)
    precise: PreciseConfig = PreciseConfig()
    noise: NoiseConfig = NoiseConfig()
    # Under data parallelism: normalize each process's shard by its own statistics (local, plain DDP) or
    # by the whole global batch's (global, synchronized BN; bnexp.nn.sync).
    stats: Literal["local", "global"] = "local"


BATCH_NORMS = ("bnexp", "torch")  # the normalizers with batch statistics (and model.bn options)
VGG_DEPTHS = (11, 13, 16, 19)
_DEFAULT_DEPTH = {"resnet": 20, "vgg": 11, "linear": 25}


class ModelConfig(_Strict):
    kind: Literal["mlp", "cnn", "resnet", "vgg", "linear"] = "mlp"
    hidden: list[Int] = Field(default_factory=lambda: [100, 100, 100], min_length=1)
    channels: list[Int] = Field(default_factory=lambda: [16, 32], min_length=1)
    # resnet: 6n+2 (20, 32, 56, ...); vgg: 11, 13, 16 or 19; linear: the number of linear layers.
    depth: Optional[Int] = Field(None, ge=1)
    shortcut: Literal["A", "B"] = "A"  # resnet: A zero-pads the identity, B projects with a 1x1 conv
    width_factor: Float = Field(1.0, gt=0)  # resnet and vgg: every width times this (at least 1)
    activation: Literal["sigmoid", "relu", "tanh", "gelu"] = "sigmoid"
    norm: Literal["none", "bnexp", "torch", "group", "layer", "instance"] = "bnexp"
    norm_groups: Int = Field(32, ge=1)  # group: the largest divisor of the width up to this many groups
    bn_position: Literal["before_activation", "after_activation"] = "before_activation"
    bn: BNConfig = BNConfig()

    @property
    def uses_bn(self) -> bool:
        return self.norm in BATCH_NORMS

    @property
    def resolved_depth(self) -> int | None:
        return self.depth if self.depth is not None else _DEFAULT_DEPTH.get(self.kind)

    @field_validator("hidden", "channels")
    @classmethod
    def _positive_widths(cls, widths: list[int]) -> list[int]:
        if any(w < 1 for w in widths):
            raise ValueError("every width must be >= 1")
        return widths


class OptimConfig(_Strict):
    name: Literal["sgd", "momentum", "adam"] = "sgd"
    lr: Float = Field(0.5, gt=0)
    momentum: Float = Field(0.9, ge=0, lt=1)
    weight_decay: Float = Field(0.0, ge=0)
    schedule: Literal["constant", "cosine", "step"] = "constant"
    warmup_steps: Int = Field(0, ge=0)
    step_every: Int = Field(1000, ge=1)
    step_gamma: Float = Field(0.1, gt=0, le=1)


class TrainConfig(_Strict):
    steps: Int = Field(2000, ge=1)
    # A budget in passes over the training set instead: when set, steps = epochs x (training examples //
    # data.batch_size), resolved once the data is loaded (config.yaml then holds both).
    epochs: Optional[Int] = Field(None, ge=1)
    eval_every: Int = Field(100, ge=1)
    log_every: Int = Field(10, ge=1)
    checkpoint_every: Int = Field(500, ge=1)
    # Beyond a non-finite loss or weight (always divergence): the mean training loss over the last
    # divergence_window steps above divergence_factor x ln(num_classes), the loss of a uniform guess.
    divergence_factor: Optional[Float] = Field(1.5, gt=1)
    divergence_window: Int = Field(200, ge=1)


class ProbesConfig(_Strict):
    enabled: bool = True
    every: Int = Field(100, ge=1)
    # The population reference of the running-statistic probes: enough training examples in batches of the
    # training batch size m, K = ceil(population_examples / m) batches (its own noise then shrinks with the
    # examples, whatever m); population_batches, when set, fixes K instead.
    population_examples: Int = Field(600, ge=2)
    population_batches: Optional[Int] = Field(None, ge=1)
    running_stats: bool = True
    gap: bool = True
    activations: bool = True
    units_per_layer: Int = Field(3, ge=1)
    histogram_every: Int = Field(500, ge=1)
    grad_norms: bool = True
    # Why BN helps (bnexp.probes: signal, rank, ics, landscape, sharpness), on a fixed probe batch.
    signal: bool = True
    rank: bool = True
    ics: bool = False
    landscape: bool = False
    landscape_steps: list[Float] = Field(default_factory=lambda: [0.5, 1.0, 2.0, 4.0], min_length=1)
    sharpness: bool = False
    sharpness_iters: Int = Field(20, ge=1)

    @field_validator("landscape_steps")
    @classmethod
    def _positive_steps(cls, steps: list[float]) -> list[float]:
        if any(s <= 0 for s in steps):
            raise ValueError("every step multiplier must be > 0")
        return steps


class DistConfig(_Strict):
    # Data-parallel training on torch.distributed (bnexp.dist, bnexp.engine.parallel); nproc 1 is a plain run.
    nproc: Int = Field(1, ge=1)
    backend: Literal["auto", "gloo", "nccl"] = "auto"


# A name becomes a directory under out_dir: `.` and `..` (any name of dots only) would escape it. Written
# without a lookahead because pydantic matches patterns with Rust's regex engine.
NAME_PATTERN = r"^[A-Za-z0-9_.\-]*[A-Za-z0-9_\-][A-Za-z0-9_.\-]*$"


class Config(_Strict):
    name: str = Field("default", min_length=1, pattern=NAME_PATTERN)
    # torch.manual_seed takes up to 2**64 - 1; below 2**63 leaves room for the probes' and PreciseBN's
    # seed offsets.
    seed: Int = Field(0, ge=0, lt=2**63)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # These networks are too small to gain from intra-op threads: on 2 cores the default run measured
    # 5x slower with 2 threads than with 1, and far worse when the cores are shared.
    # torch takes a C int, and a pool of millions of threads is a mistake, not a request.
    threads: Optional[Int] = Field(1, ge=1, le=1024, description="torch CPU threads; null = torch's default")
    out_dir: PathStr = "runs"
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    probes: ProbesConfig = ProbesConfig()
    dist: DistConfig = DistConfig()

    @property
    def bn_batch_size(self) -> int:
        """The batch BN normalizes over in training: each process's shard with local statistics, else the
        global batch. Population estimates (probes, PreciseBN) use batches of this size, to estimate what
        training normalizes with."""
        m = self.data.batch_size
        return m // self.dist.nproc if self.model.bn.stats == "local" else m

    @model_validator(mode="after")
    def _bn_needs_two_values(self) -> "Config":
        # Training BN with one value per channel has zero variance: the paper's estimate is undefined.
        if self.model.uses_bn and self.data.batch_size < 2:
            raise ValueError("data.batch_size: must be >= 2 when model.norm uses batch normalization")
        if self.model.norm == "torch":
            bn = self.model.bn
            for key, default in (("running_var_init", 1.0), ("unbiased_normalize", False)):
                if getattr(bn, key) != default:
                    raise ValueError(f"model.bn.{key}: only available with model.norm: bnexp (torch's layer "
                                     f"has no such option)")
        return self

    @model_validator(mode="after")
    def _model_fits_data(self) -> "Config":
        model, data = self.model, self.data
        depth = model.resolved_depth
        if model.kind == "cnn" and model.depth is not None:
            raise ValueError("model.depth: not used by model.kind: cnn (its layers are model.channels)")
        if model.kind == "resnet" and (depth < 8 or depth % 6 != 2):
            raise ValueError(f"model.depth: a resnet has 6n+2 layers (20, 32, 56, ...), got {depth}")
        if model.kind == "vgg" and depth not in VGG_DEPTHS:
            raise ValueError(f"model.depth: vgg comes in depths {', '.join(map(str, VGG_DEPTHS))}, got {depth}")
        if model.norm == "instance" and model.kind in ("mlp", "linear"):
            # One value per channel and example: instance statistics of a vector are degenerate.
            raise ValueError(f"model.norm: instance needs a convolutional network (model.kind cnn, resnet or "
                             f"vgg), not {model.kind}")
        if data.augment != "none" and data.dataset in ("mnist1d", "synthetic", "linear_regression"):
            raise ValueError(f"data.augment: {data.augment} crops and flips images; {data.dataset} has none")
        return self

    @model_validator(mode="after")
    def _bn_variants(self) -> "Config":
        bn, norm, m = self.model.bn, self.model.norm, self.data.batch_size
        if bn.variant != "bn" and norm != "bnexp":
            raise ValueError(f"model.bn.variant: {bn.variant} needs model.norm: bnexp (got {norm})")
        if bn.variant == "ghost":
            k = bn.ghost_batch_size
            if k is None:
                raise ValueError("model.bn.ghost_batch_size: required with model.bn.variant: ghost "
                                 "(the virtual batch size)")
            if m % k:
                raise ValueError(f"data.batch_size: {m} is not a multiple of model.bn.ghost_batch_size ({k})")
        elif bn.ghost_batch_size is not None:
            raise ValueError(f"model.bn.ghost_batch_size: only used with model.bn.variant: ghost "
                             f"(got variant {bn.variant})")
        if bn.variant == "renorm":
            for key in ("r_max_steps", "d_max_steps"):
                if getattr(bn.renorm, key) < bn.renorm.warmup_steps:
                    raise ValueError(f"model.bn.renorm.{key}: must be >= model.bn.renorm.warmup_steps "
                                     f"({bn.renorm.warmup_steps})")
        if bn.precise.when != "never" and not self.model.uses_bn:
            raise ValueError(f"model.bn.precise.when: needs batch normalization (model.norm is {norm})")
        return self

    @model_validator(mode="after")
    def _dist(self) -> "Config":
        n, m, bn = self.dist.nproc, self.data.batch_size, self.model.bn
        if m % n:
            raise ValueError(f"data.batch_size: {m} does not split evenly over dist.nproc: {n} processes")
        if bn.stats == "global" and (self.model.norm != "bnexp" or bn.variant != "bn"):
            raise ValueError("model.bn.stats: global needs model.norm: bnexp with model.bn.variant: bn")
        if self.model.uses_bn and bn.stats == "local" and m // n < 2:
            raise ValueError(f"data.batch_size: {m} over {n} processes leaves {m // n} example per process, "
                             f"too few for model.bn.stats: local (use global or a larger batch)")
        if bn.variant == "ghost" and bn.stats == "local" and (m // n) % bn.ghost_batch_size:
            # Each process splits its own shard into ghost batches, so k must divide the shard, not only m.
            raise ValueError(f"model.bn.ghost_batch_size: {bn.ghost_batch_size} does not divide the per-process "
                             f"batch of {m // n} (data.batch_size: {m} over dist.nproc: {n} processes)")
        if self.dist.backend == "nccl" and self.device == "cpu":
            raise ValueError("dist.backend: nccl needs device: cuda (use gloo or auto on CPU)")
        return self


def _shown_key(key: Any) -> str:
    text = str(key)
    return text if len(text) <= 60 else excerpt(text)


def _section(annotation: Any) -> type[BaseModel] | None:
    """The model a field's annotation holds (SyntheticConfig for `synthetic: SyntheticConfig`), or None."""
    for t in (annotation, *get_args(annotation)):
        if isinstance(t, type) and issubclass(t, BaseModel):
            return t
    return None


def flatten(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested mapping as {dotted key: value} ({model: {norm: none}} as {model.norm: none}); an empty
    mapping stays a value."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def dotted_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every key of `model`, sections and their keys, dotted (model, model.norm, ..., model.bn.eps, ...)."""
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        if (sub := _section(field.annotation)) is not None:
            keys += dotted_keys(sub, f"{prefix}{name}.")
    return keys


def did_you_mean(model: type[BaseModel], loc: tuple, under: dict[str, type[BaseModel]] | None = None) -> str:
    """" (did you mean model.norm?)" for the unknown key at `loc` of `model`: a close spelling among the keys
    at its level, else the same key elsewhere (train.lr: optim.lr), or "". `under`: sections `model` holds
    as plain mappings, with the model of their keys (a comparison's base: a run config)."""
    node: type[BaseModel] | None = model
    for part in loc[:-1]:
        field = node.model_fields.get(str(part)) if node is not None else None
        node = _section(field.annotation) if field is not None else None
    key, prefix = str(loc[-1]), "".join(f"{part}." for part in loc[:-1])
    if node is not None and (close := difflib.get_close_matches(key, list(node.model_fields), n=3)):
        score = lambda other: difflib.SequenceMatcher(None, key, other).ratio()  # noqa: E731
        tied = sorted(k for k in close if score(k) == score(close[0]))  # _dmax: d_max or r_max
        return f" (did you mean {' or '.join(prefix + k for k in tied)}?)"
    everywhere = dotted_keys(model)
    for name, sub in (under or {}).items():
        everywhere += dotted_keys(sub, f"{name}.")
    same = [k for k in everywhere if k.rsplit(".", 1)[-1] == key and k != prefix + key]
    return f" (did you mean {' or '.join(same[:3])}?)" if same else ""


def format_validation_error(err: ValidationError, model: type[BaseModel] | None = None,
                            under: dict[str, type[BaseModel]] | None = None) -> str:
    """The first error as one line, "<dotted key>: <what>"; with the `model` validated (and `under`, see
    did_you_mean), an unknown key gets a "did you mean"."""
    first = err.errors()[0]
    # A key or value is quoted by an excerpt: a key of a million characters is still a one-line error.
    loc = ".".join(_shown_key(p) for p in first["loc"])
    msg = first["msg"]
    # Cross-field validators raise "Value error, <key>: ..." with the key already in the message.
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
        if not loc:
            return msg
        # A field validator may name its own key too ("seeds: each seed may appear once"): say it once.
        if msg.startswith(f"{loc}: "):
            msg = msg[len(loc) + 2:]
    if first["type"] == "extra_forbidden":
        return f"{loc}: unknown key" + (did_you_mean(model, first["loc"], under) if model is not None else "")
    if first["type"] == "string_pattern_mismatch" and first.get("ctx", {}).get("pattern") == NAME_PATTERN:
        return (f"{loc}: {excerpt(first['input'])} is not a usable directory name (letters, digits, '_', '.' "
                f"and '-', not only dots)")
    if "input" in first and first["type"] not in ("missing",) and not isinstance(first["input"], dict):
        return f"{loc}: {msg} (got {excerpt(first['input'])})"
    return f"{loc or '<top>'}: {msg}"


def validate(raw: dict[str, Any]) -> Config:
    """Validate a plain dict (already merged with overrides) into a Config."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config must be a mapping of keys to values, got {type(raw).__name__}")
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(f"invalid config: {format_validation_error(err, Config)}") from None


class _DuplicateKey(Exception):
    def __init__(self, key: Any, line: int):
        super().__init__(key, line)
        self.key, self.line = key, line


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys in a mapping: a second `optim:` section would silently
    replace the first. Refuse it instead. `<<` merge keys may still be overridden, as YAML intends."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    duplicate = key in seen
                except TypeError:  # an unhashable key: the base constructor reports it
                    continue
                if duplicate:
                    raise _DuplicateKey(key, key_node.start_mark.line + 1)
                seen.add(key)
        return super().construct_mapping(node, deep)


# Bounds on what a config may make the loader build. A config is a few hundred values at most; YAML's
# aliases let a few hundred bytes stand for billions of values (each alias is the anchored value again),
# which validation, error messages and copies then walk, and deep nesting exhausts Python's recursion.
MAX_YAML_BYTES = 1 << 20
MAX_YAML_DEPTH = 32
MAX_YAML_VALUES = 100_000
# Characters too: a long string anchored once and aliased a few hundred times (in a comparison grid, say) is
# few values but hundreds of megabytes once copied into configs, messages and files.
MAX_YAML_CHARS = 4 << 20


class _Hostile(Exception):
    """YAML beyond the bounds above: what is wrong, in a few words."""


def _check_bounds(text: str) -> None:
    """Measure the document from the parser's events (no recursion, nothing built): its size, its nesting
    depth, and the number of values and of scalar characters it expands to with every alias replaced by its
    anchored value."""
    if len(text) > MAX_YAML_BYTES:
        raise _Hostile(f"larger than {MAX_YAML_BYTES >> 20} MiB")
    total = chars = 0
    stack: list[list] = []  # per open collection: [anchor, values inside, depth below, characters inside]
    anchored: dict[str, tuple[int, int, int]] = {}  # anchor -> (values, depth, characters) of the anchored node
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.CollectionStartEvent):
            if len(stack) >= MAX_YAML_DEPTH:
                raise _Hostile(f"nested deeper than {MAX_YAML_DEPTH} levels")
            stack.append([event.anchor, 1, 0, 0])
            total += 1
        elif isinstance(event, yaml.CollectionEndEvent):
            anchor, values, depth, size = stack.pop()
            if anchor is not None:
                anchored[anchor] = (values, depth + 1, size)
            if stack:
                stack[-1][1] += values
                stack[-1][2] = max(stack[-1][2], depth + 1)
                stack[-1][3] += size
        elif isinstance(event, (yaml.ScalarEvent, yaml.AliasEvent)):
            if isinstance(event, yaml.AliasEvent):
                if any(entry[0] == event.anchor for entry in stack):
                    raise _Hostile(f"the alias *{event.anchor[:20]} refers to a value that contains it")
                values, depth, size = anchored.get(event.anchor, (1, 0, 0))
            else:
                values, depth, size = 1, 0, len(event.value)
                if event.anchor is not None:
                    anchored[event.anchor] = (1, 0, size)
            total += values
            chars += size
            if stack:
                stack[-1][1] += values
                stack[-1][2] = max(stack[-1][2], depth)
                stack[-1][3] += size
            if len(stack) + depth > MAX_YAML_DEPTH:
                raise _Hostile(f"nested deeper than {MAX_YAML_DEPTH} levels (through an alias)")
        if total > MAX_YAML_VALUES:
            raise _Hostile(f"expands to more than {MAX_YAML_VALUES:,} values (through aliases)")
        if chars > MAX_YAML_CHARS:
            raise _Hostile(f"expands to more than {MAX_YAML_CHARS >> 20} MiB of text (through aliases)")


def _load_yaml(text: str) -> Any:
    _check_bounds(text)
    return yaml.load(text, Loader=_UniqueKeyLoader)


def _read_text(path: Path) -> str:
    """The file's text, reading no more than MAX_YAML_BYTES + 1 bytes of it."""
    with open(path, "rb") as f:
        data = f.read(MAX_YAML_BYTES + 1)
    if len(data) > MAX_YAML_BYTES:
        raise _Hostile(f"larger than {MAX_YAML_BYTES >> 20} MiB")
    return data.decode("utf-8")


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a directory, not a YAML file")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = _load_yaml(_read_text(path))
    except _Hostile as err:
        raise ConfigError(f"refused YAML in {path}: {err}") from None
    except _DuplicateKey as dup:
        raise ConfigError(f"duplicate key {_shown_key(dup.key)} at line {dup.line} in {path}") from None
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        problem = getattr(err, "problem", None) or "malformed YAML"
        raise ConfigError(f"malformed YAML in {path}{at}: {problem}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read config file {path}: {err}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must contain a mapping, got {type(raw).__name__}")
    return raw


def parse_override(text: str) -> tuple[str, Any]:
    """Split `a.b=value`; the value is parsed as YAML so `--set optim.lr=0.1` gives a float."""
    key, sep, value = text.partition("=")
    key = key.strip()
    shown = excerpt(text)
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"bad --set {shown}: expected KEY=VALUE with a dotted key, e.g. model.norm=none")
    key_shown = _shown_key(key)
    try:
        parsed = _load_yaml(value) if value.strip() else None
    except _Hostile as err:
        raise ConfigError(f"bad --set {shown}: the value of {key_shown} is refused: {err}") from None
    except _DuplicateKey as dup:
        raise ConfigError(f"bad --set {shown}: duplicate key {_shown_key(dup.key)} in the value of "
                          f"{key_shown}") from None
    except yaml.YAMLError:
        raise ConfigError(f"bad --set {shown}: the value of {key_shown} is not valid YAML") from None
    return key, parsed


def apply_override(raw: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    """Return a copy of `raw` with the dotted `key` set to `value`."""
    out = copy.deepcopy(raw)
    node = out
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"bad --set {key}: {'.'.join(parts[: i + 1])} is not a section")
        node = child
    node[parts[-1]] = value
    return out


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any] | list[str]) -> dict[str, Any]:
    pairs = overrides.items() if isinstance(overrides, dict) else (parse_override(o) for o in overrides)
    for key, value in pairs:
        raw = apply_override(raw, key, value)
    return raw


# The keys that make a file a comparison config (bnexp.experiments.compare), none of which a run config has.
COMPARISON_KEYS = ("base", "arms", "grid")


def load(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    raw = read_yaml(path) if path is not None else {}
    if found := [key for key in COMPARISON_KEYS if key in raw]:
        raise ConfigError(f"{path} is a comparison config ({', '.join(found)}, ...): run it with bnexp compare "
                          f"-c {path}")
    return validate(apply_overrides(raw, overrides or []))


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
