"""PreciseBN (bnexp.engine.precise): the probes' population statistics, installed as running statistics."""

from __future__ import annotations

import json

import pytest
import torch

from bnexp.engine import checkpoint
from bnexp.config import validate
from bnexp.data import load_dataset
from bnexp.models import bn_layers, build_model
from bnexp.engine.precise import PreciseStats, recompute
from bnexp.probes import Probes

RUN = {"device": "cpu", "data": {"batch_size": 16}, "model": {"hidden": [16, 12]},
       "train": {"steps": 12, "eval_every": 6, "log_every": 6, "checkpoint_every": 12},
       "probes": {"every": 6, "population_batches": 4, "activations": False, "grad_norms": False}}


def _setup(norm: str = "bnexp", kind: str = "mlp", **bn):
    cfg = validate({**RUN, "model": {**RUN["model"], "kind": kind, "norm": norm, "channels": [4, 6],
                                     "bn": bn}})
    data = load_dataset(cfg.data)
    torch.manual_seed(0)
    model = build_model(cfg.model, data.input_shape, data.num_classes)
    # A network that has moved off its initialisation, so γ, β matter and deeper inputs are not trivial.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return cfg, data, model


@pytest.mark.parametrize("norm, kind", [("bnexp", "mlp"), ("torch", "mlp"), ("bnexp", "cnn")])
def test_precise_statistics_are_the_probes_population_statistics(norm, kind):
    cfg, data, model = _setup(norm, kind)
    probes = Probes(cfg, model, data)
    expected = probes.population_statistics(model)
    model.eval()
    params = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k}
    rng = torch.get_rng_state()
    recompute(model, data.x_train, probes.population_idx)
    assert not model.training  # mode restored
    assert torch.equal(torch.get_rng_state(), rng)
    for name, bn in bn_layers(model).items():
        assert torch.equal(bn.running_mean, expected[name]["mean"].to(bn.running_mean.dtype))
        assert torch.equal(bn.running_var, expected[name]["var"].to(bn.running_var.dtype))
    after = {k: v for k, v in model.state_dict().items() if "running" not in k}
    assert all(torch.equal(params[k], after[k]) for k in params)  # weights and num_batches_tracked untouched


def test_precise_statistics_of_the_first_layer_from_scratch():
    # Independent of the probes' code: the first BN layer's input is h1's Linear of the flattened batch.
    cfg, data, model = _setup()
    precise = PreciseStats(cfg, data)
    batches = precise.batches(5)
    recompute(model, data.x_train, batches)
    m = cfg.data.batch_size
    with torch.no_grad():
        z = torch.stack([model.h1.layer(data.x_train[idx].flatten(1)) for idx in batches]).double()
    mean = z.mean(1).mean(0)
    var = z.var(1, correction=0).mean(0) * m / (m - 1)
    bn = model.h1.norm
    torch.testing.assert_close(bn.running_mean.double(), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var.double(), var, rtol=1e-5, atol=1e-6)


def test_precise_batches_are_training_batches_of_their_own():
    cfg, data, _ = _setup(precise={"when": "eval", "batches": 7})
    precise = PreciseStats(cfg, data)
    a, b = precise.batches(10), precise.batches(10)
    assert a.shape == (7, cfg.data.batch_size) and torch.equal(a, b)  # a function of (seed, step)
    assert not torch.equal(a, precise.batches(11))
    assert int(a.min()) >= 0 and int(a.max()) < len(data.y_train)
    assert all(len(set(row.tolist())) == len(row) for row in a)
    other_seed = PreciseStats(validate({**cfg.model_dump(), "seed": 1}), data)
    assert not torch.equal(a, other_seed.batches(10))
    assert precise.due(3) and not PreciseStats(validate({**cfg.model_dump(), "model": {
        **cfg.model.model_dump(), "bn": {"precise": {"when": "end"}}}}), data).due(3)


def _train(tmp_path, name: str, **bn):
    from bnexp.engine.session import train

    cfg = validate({**RUN, "model": {**RUN["model"], "bn": bn}})
    run_dir = tmp_path / name
    run_dir.mkdir()
    summary = train(cfg, run_dir, data=load_dataset(cfg.data))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    state = checkpoint.load(checkpoint.list_checkpoints(run_dir)[-1])
    return cfg, summary, rows, state


@pytest.mark.slow
def test_precise_bn_leaves_training_alone_and_replaces_the_moving_average(tmp_path):
    _, ema_summary, ema_rows, ema_state = _train(tmp_path, "ema")
    cfg, end_summary, end_rows, end_state = _train(tmp_path, "end", precise={"when": "end", "batches": 5})
    _, eval_summary, eval_rows, eval_state = _train(tmp_path, "eval", precise={"when": "eval", "batches": 5})
    assert ema_summary["status"] == end_summary["status"] == eval_summary["status"] == "completed"
    # Same data order, RNG and weights: the training losses and every parameter are identical.
    losses = [[r.get("train/loss") for r in rows] for rows in (ema_rows, end_rows, eval_rows)]
    assert losses[0] == losses[1] == losses[2]
    weights = {k: v for k, v in ema_state["model"].items() if "running" not in k}
    for state in (end_state, eval_state):
        assert all(torch.equal(v, state["model"][k]) for k, v in weights.items())
    # when: end -- the final running statistics are the population estimate of the final network on the
    # K batches of the last step, and the intermediate probes saw the moving average.
    data = load_dataset(cfg.data)
    model = build_model(cfg.model, data.input_shape, data.num_classes)
    model.load_state_dict(end_state["model"])
    pop = PreciseStats(cfg, data).apply(model, cfg.train.steps)
    for name in bn_layers(model):
        assert torch.equal(end_state["model"][f"{name}.norm.running_mean"], pop[name]["mean"].float())
        assert torch.equal(end_state["model"][f"{name}.norm.running_var"], pop[name]["var"].float())
    assert not torch.equal(end_state["model"]["h1.norm.running_var"], ema_state["model"]["h1.norm.running_var"])
    mid = lambda rows: next(r for r in rows if r["step"] == 6)  # noqa: E731
    assert mid(end_rows)["running_stats/h1/var_err"] == mid(ema_rows)["running_stats/h1/var_err"]
    # when: eval -- every probe sees the precise estimate, far closer to the population than the lagging
    # moving average (which starts at 0 / 1 and has 0.9^6 of that left at step 6).
    for step_rows in (lambda rows: rows[0], mid):
        for key in ("mean_err", "var_err"):
            assert step_rows(eval_rows)[f"running_stats/h1/{key}"] < step_rows(ema_rows)[f"running_stats/h1/{key}"]
    assert eval_summary["running_var_err"] < ema_summary["running_var_err"]
