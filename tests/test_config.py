"""The config schema, configs/default.yaml and --set overrides."""

from __future__ import annotations

import os
import re

import pytest
import yaml
from pydantic import BaseModel

from bnexp.config import Config, ConfigError, apply_overrides, load, parse_override, to_yaml, validate
from conftest import DEFAULT_CONFIG


def _leaf_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys += _leaf_keys(ann, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def _commented_keys(text: str) -> dict[str, bool]:
    """Dotted key of every `key:` line of a block-style YAML file -> whether the line has a comment."""
    found: dict[str, bool] = {}
    stack: list[tuple[int, str]] = []
    for line in text.splitlines():
        m = re.match(r"^( *)([A-Za-z_][A-Za-z0-9_]*):(.*)$", line)
        if not m:
            continue
        indent, key, rest = len(m.group(1)), m.group(2), m.group(3)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, key))
        found[".".join(k for _, k in stack)] = "#" in rest
    return found


def test_default_yaml_is_exactly_the_defaults():
    assert load(DEFAULT_CONFIG) == Config()
    assert yaml.safe_load(DEFAULT_CONFIG.read_text()) == Config().model_dump(mode="json")


def test_every_schema_key_is_documented_in_default_yaml():
    documented = _commented_keys(DEFAULT_CONFIG.read_text())
    leaves = _leaf_keys(Config)
    assert "model.bn.eps" in leaves and "data.synthetic.separation" in leaves  # the walk reaches nested keys
    missing = [k for k in leaves if k not in documented]
    uncommented = [k for k in leaves if k in documented and not documented[k]]
    assert not missing, f"keys missing from configs/default.yaml: {missing}"
    assert not uncommented, f"keys without a one-line comment in configs/default.yaml: {uncommented}"


@pytest.mark.parametrize("key, value, expected", [
    ("seed", "7", 7),
    ("data.dataset", "mnist1d", "mnist1d"),
    ("data.batch_size", "32", 32),
    ("model.kind", "cnn", "cnn"),
    ("model.norm", "none", "none"),
    ("model.activation", "relu", "relu"),
    ("optim.lr", "0.1", 0.1),
    ("train.steps", "10", 10),
    ("train.eval_every", "5", 5),
])
def test_relied_on_dotted_keys_are_overridable(key, value, expected):
    cfg = load(DEFAULT_CONFIG, [f"{key}={value}"])
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    assert node == expected and type(node) is type(expected)


def test_override_values_are_yaml_and_later_ones_win():
    cfg = load(None, ["model.hidden=[10, 20]", "optim.lr=1e-3", "model.bn.momentum=null",
                      "optim.lr=0.25", "name=2024"])
    assert cfg.model.hidden == [10, 20]
    assert cfg.optim.lr == 0.25
    assert cfg.model.bn.momentum is None
    assert cfg.name == "2024"  # YAML reads it as a number; it is still a name


def test_override_does_not_mutate_its_input():
    raw = {"model": {"norm": "torch"}}
    out = apply_overrides(raw, ["model.norm=none"])
    assert raw == {"model": {"norm": "torch"}} and out == {"model": {"norm": "none"}}


@pytest.mark.parametrize("override, key", [
    ("model.nrom=none", "model.nrom"),
    ("optim.lr=abc", "optim.lr"),
    ("optim.lr=0", "optim.lr"),
    ("optim.lr=-0.1", "optim.lr"),
    ("optim.lr=.inf", "optim.lr"),
    ("optim.lr=true", "optim.lr"),
    ("seed=yes", "seed"),
    ("seed=9223372036854775808", "seed"),
    ("data.seed=4294967296", "data.seed"),
    ("train.steps=2.5", "train.steps"),
    ("train.steps=0", "train.steps"),
    ("model.hidden=[10, 0]", "model.hidden"),
    ("data.batch_size=1", "data.batch_size"),
])
def test_overrides_are_validated_like_the_file(override, key):
    with pytest.raises(ConfigError) as exc:
        load(DEFAULT_CONFIG, [override])
    msg = str(exc.value)
    assert "\n" not in msg and f"{key}:" in msg


def test_batch_of_one_is_fine_without_bn():
    assert load(None, ["data.batch_size=1", "model.norm=none"]).data.batch_size == 1


def test_torch_norm_refuses_bnexp_only_options():
    with pytest.raises(ConfigError, match=r"model\.bn\.running_var_init"):
        load(None, ["model.norm=torch", "model.bn.running_var_init=0"])


@pytest.mark.parametrize("text", ["model.norm", "=none", "model..norm=none", ".x=1", "optim.lr=[1"])
def test_bad_set_syntax(text):
    with pytest.raises(ConfigError, match="bad --set"):
        parse_override(text)


def test_set_below_a_scalar_is_refused():
    with pytest.raises(ConfigError, match=r"model\.norm is not a section"):
        apply_overrides({}, ["model.norm=torch", "model.norm.x=1"])


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  norm: [torch\n")
    with pytest.raises(ConfigError, match=r"malformed YAML in .*bad\.yaml at line \d+"):
        load(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just a string\n")
    with pytest.raises(ConfigError, match="must contain a mapping"):
        load(scalar)
    with pytest.raises(ConfigError, match="mapping"):
        validate(["not", "a", "dict"])  # type: ignore[arg-type]


def test_empty_file_is_all_defaults(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing set\n")
    assert load(empty) == Config()


def test_to_yaml_round_trips(tmp_path):
    cfg = load(DEFAULT_CONFIG, ["model.norm=torch", "model.bn.momentum=null", "optim.lr=1e-3"])
    path = tmp_path / "resolved.yaml"
    path.write_text(to_yaml(cfg))
    assert load(path) == cfg


@pytest.mark.parametrize("name", ["..", ".", "...", "a/b", ""])
def test_name_cannot_escape_out_dir(name):
    with pytest.raises(ConfigError, match="name:"):
        validate({"name": name})


@pytest.mark.parametrize("name", ["a.b", ".hidden", "run..2", "2024", "x-y_z"])
def test_names_with_dots_among_other_characters(name):
    assert validate({"name": name}).name == name


def test_duplicate_keys_are_refused(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("optim: {lr: 0.1}\nseed: 1\noptim: {name: adam}\n")
    with pytest.raises(ConfigError, match=r"^duplicate key optim at line 3 in .*dup\.yaml$"):
        load(path)
    path.write_text("model:\n  norm: none\n  norm: torch\n")
    with pytest.raises(ConfigError, match="duplicate key norm at line 3"):
        load(path)
    with pytest.raises(ConfigError, match="bad --set.*duplicate key a"):
        parse_override("model.hidden={a: 1, a: 2}")


def test_yaml_merge_keys_may_still_be_overridden(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text("optim: &o {lr: 0.1, name: adam}\ntrain:\n  steps: 5\n  <<: {steps: 7, eval_every: 3}\n")
    cfg = load(path)
    assert (cfg.train.steps, cfg.train.eval_every, cfg.optim.lr) == (5, 3, 0.1)


def test_a_validator_that_names_its_key_is_not_repeated():
    from pydantic import ValidationError, field_validator

    from bnexp.config import format_validation_error

    class Arms(BaseModel):
        seeds: list[int]

        @field_validator("seeds")
        @classmethod
        def _distinct(cls, seeds):
            if len(set(seeds)) != len(seeds):
                raise ValueError("seeds: each seed may appear once")
            return seeds

    with pytest.raises(ValidationError) as exc:
        Arms(seeds=[1, 1])
    assert format_validation_error(exc.value) == "seeds: each seed may appear once (got [1, 1])"


# --- hostile YAML (issue 17): bounded size, alias expansion and depth; short quotes in errors ------------

def _alias_bomb(levels: int = 6, width: int = 9) -> str:
    """A flow list of anchored lists, each holding `width` aliases of the one before: a few hundred bytes
    that expand to about width ** levels values (531,441 at 9 ** 6)."""
    parts = [f"&a0 [{', '.join(['1'] * width)}]"]
    parts += [f"&a{i} [{', '.join([f'*a{i - 1}'] * width)}]" for i in range(1, levels)]
    return f"[{', '.join(parts)}]"


HOSTILE = {
    "alias bomb": (_alias_bomb(), "expands to more than 100,000 values (through aliases)"),
    "deep brackets": ("[" * 400 + "]" * 400, "nested deeper than 32 levels"),
    "self-reference": ("&r [1, *r]", "the alias *r refers to a value that contains it"),
}


def test_a_long_string_aliased_hundreds_of_times_is_refused(tmp_path):
    """Few values, but a 400 KB string anchored once and aliased 280 times (inside a list inside a mapping,
    so the count goes through collections and their anchors) is 112 MB of text once expanded."""
    path = tmp_path / "c.yaml"
    path.write_text(f"name: &s {'x' * 400_000}\nmodel: &m {{hidden: [{', '.join(['*s'] * 20)}]}}\n"
                    f"grid: [{', '.join(['*m'] * 14)}]\n")
    with pytest.raises(ConfigError, match=r"^refused YAML in .*c\.yaml: expands to more than 4 MiB of text "
                                          r"\(through aliases\)$"):
        load(path)
    path.write_text(f"name: &s {'x' * 400_000}\nseed: 1\ndata: {{root: *s}}\n")  # 800,000 characters: fine
    assert load(path).data.root == "x" * 400_000


@pytest.mark.parametrize("how", ["file", "--set"])
@pytest.mark.parametrize("key", ["model.hidden", "seed", "name"])
@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_yaml_is_one_short_line(cli, tmp_path, case, key, how):
    value, problem = HOSTILE[case]
    config = tmp_path / "c.yaml"
    if how == "file":
        section, _, leaf = key.rpartition(".")
        config.write_text(f"{section}:\n  {leaf}: {value}\n" if section else f"{leaf}: {value}\n")
        r = cli("train", "-c", config, "--out", "run")
    else:
        config.write_text("{}\n")
        r = cli("train", "-c", config, "--set", f"{key}={value}", "--out", "run")
    assert r.code == 2 and r.out == ""
    assert r.err.count("\n") == 1 and len(r.err) < 250 and problem in r.err, r.err[:500]
    assert os.listdir(tmp_path) == ["c.yaml"]


def test_brackets_a_thousand_deep_are_refused_before_they_reach_the_recursion_limit():
    with pytest.raises(ConfigError, match="nested deeper than 32 levels"):
        load(None, ["model.hidden=" + "[" * 1000 + "]" * 1000])


def test_a_config_file_over_a_mebibyte_is_refused_unread(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text("# padding\n" * 120_000 + "seed: 1\n")
    with pytest.raises(ConfigError, match=r"^refused YAML in .*big\.yaml: larger than 1 MiB$"):
        load(path)


def test_anchors_and_merge_keys_within_the_bounds_still_load(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text("model: {hidden: &w [64, 64], channels: *w}\noptim: &o {lr: 0.1}\n" + _alias_bomb(3, 9)
                    .join(["probes: {units_per_layer: 3}\n# ", "\n"]))
    cfg = load(path)
    assert (cfg.model.hidden, cfg.model.channels, cfg.optim.lr) == ([64, 64], [64, 64], 0.1)


@pytest.mark.parametrize("override, quoted", [
    ("model.norm=" + "x" * 5000, "model.norm: Input should be"),
    ("seed=" + "7" * 5000 + "x", "seed: Input should be a valid integer"),
    ("model.hidden=[[" + ", ".join(["1"] * 5000) + "]]", "model.hidden.0: Input should be a valid integer"),
    ("x" * 5000 + "=1", "unknown key"),
])
def test_errors_quote_a_short_excerpt_of_the_value(override, quoted):
    with pytest.raises(ConfigError) as exc:
        load(None, [override])
    message = str(exc.value)
    assert quoted in message and len(message) < 200 and "\n" not in message, message[:300]


def test_threads_and_paths_that_no_os_call_accepts_are_config_errors():
    with pytest.raises(ConfigError, match=r"^invalid config: threads: Input should be less than or equal to 1024"):
        validate({"threads": 1099511627776})
    for key in ("data.root", "out_dir"):
        with pytest.raises(ConfigError, match=f"^invalid config: {re.escape(key)}: a path cannot contain a NUL byte"):
            load(None, [f'{key}="runs\\0x"'])


# --- unknown keys: "did you mean" -----------------------------------------------------------------------------

@pytest.mark.parametrize("override, message", [
    ("model.nrom=none", "model.nrom: unknown key (did you mean model.norm?)"),
    ("optm.lr=0.1", "optm: unknown key (did you mean optim?)"),
    ("model.bn.renrom.r_max=2", "model.bn.renrom: unknown key (did you mean model.bn.renorm?)"),
    ("data.synthetic.num_sample=30", "data.synthetic.num_sample: unknown key (did you mean data.synthetic.num_samples?)"),
    # A key of another section: where it is.
    ("train.lr=0.1", "train.lr: unknown key (did you mean optim.lr?)"),
    ("model.momentum=0.1", "model.momentum: unknown key (did you mean model.bn.momentum or optim.momentum?)"),
    ("zzz=1", "zzz: unknown key"),  # nothing like it: no suggestion
])
def test_an_unknown_key_gets_a_did_you_mean_in_a_file_and_in_set(tmp_path, override, message):
    with pytest.raises(ConfigError) as exc:
        load(None, [override])
    assert str(exc.value) == f"invalid config: {message}"
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(apply_overrides({}, [override])))
    with pytest.raises(ConfigError) as exc:
        load(path)
    assert str(exc.value) == f"invalid config: {message}"


def test_every_key_misspelt_is_suggested_back():
    """Two neighbouring letters of every key of five letters or more swapped: the suggestion is that key (or
    names it among keys as close: _dmax is d_max or r_max)."""
    from bnexp.config import dotted_keys

    for key in dotted_keys(Config):
        *section, leaf = key.split(".")
        if len(leaf) < 5:
            continue
        i = next(i for i in range(len(leaf) - 1) if leaf[i] != leaf[i + 1])
        typo = ".".join([*section, leaf[:i] + leaf[i + 1] + leaf[i] + leaf[i + 2:]])
        with pytest.raises(ConfigError) as exc:
            load(None, [f"{typo}=1"])
        assert re.fullmatch(rf"invalid config: {re.escape(typo)}: unknown key \(did you mean ([a-z_.]+ or )*"
                            rf"{re.escape(key)}( or [a-z_.]+)*\?\)", str(exc.value)), str(exc.value)


def test_a_comparison_config_given_to_train_says_to_use_compare(cli, tmp_path):
    from conftest import REPO

    path = REPO / "configs" / "compare" / "default.yaml"
    for argv in (["train", "-c", path], ["train", "-c", path, "--set", "model.norm=none"], ["validate", "-c", path]):
        r = cli(*argv)
        assert (r.code, r.out) == (2, "")
        assert r.err == f"error: {path} is a comparison config (base, arms, ...): run it with bnexp compare -c {path}\n"
    assert os.listdir(tmp_path) == []
