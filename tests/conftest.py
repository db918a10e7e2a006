"""Shared fixtures: run the CLI in-process inside tmp_path, and write small configs there.

- `cli(*args)` runs `bnexp.cli.main` with the working directory set to tmp_path and returns a `CliResult`
  (code, out, err, and `path`, the last line of stdout).
- `write_config(data, name="config.yaml")` writes a dict (or raw text) as YAML into tmp_path.
- `tiny_config` is the path of a quick digits run (40 steps, torch BN, probes off).
- `mnist1d_root` is a session-wide data root where mnist1d is generated once and cached.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "default.yaml"

TINY = {
    "name": "tiny",
    "device": "cpu",
    "model": {"norm": "torch", "hidden": [32, 32]},
    "train": {"steps": 40, "eval_every": 20, "log_every": 10, "checkpoint_every": 20},
    "probes": {"enabled": False},
}


@dataclass
class CliResult:
    code: int
    out: str
    err: str

    @property
    def path(self) -> Path:
        """The run or comparison directory: the last line of stdout."""
        return Path(self.out.strip().splitlines()[-1])


@pytest.fixture
def cli(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)

    def run(*args: str) -> CliResult:
        from bnexp.cli import main

        capsys.readouterr()
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


@pytest.fixture
def write_config(tmp_path):
    def write(data, name: str = "config.yaml") -> Path:
        path = tmp_path / name
        path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
        return path

    return write


@pytest.fixture
def tiny_config(write_config) -> Path:
    return write_config(TINY)


@pytest.fixture(scope="session")
def mnist1d_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mnist1d-data")


@pytest.fixture(params=["kernel", "tensor-ops"])
def layer_path(request):
    """Run a test once with the layer's compiled kernel and once with its tensor-op path (bnexp.nn.kernel)."""
    from bnexp.nn import kernel

    with kernel.enabled(request.param == "kernel") as built:
        if request.param == "kernel":
            assert built is not None, "the BN kernel did not build (is a C compiler installed?)"
        yield request.param
