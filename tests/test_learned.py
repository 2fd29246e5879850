"""LearnedOptimizer, its features, its checkpoints and its ES meta-training."""

import copy
import math
import pickle

import pytest
import torch

from rlopt.learned import LearnedOptimizer, LearnedRule, RuleSpec, load_rule
from rlopt.learned.es import ESConfig, ESTrainer, meta_objective, rollout
from rlopt.learned.features import coordinate_features, reference_step
from rlopt.learned.tasks import FAMILIES, TaskDistribution, sample_task


def _rule(seed=0, noise=0.5, lr=0.01, **spec):
    """An untrained rule with its weights jittered, so that every path of the MLP matters."""
    rule = LearnedRule.untrained(RuleSpec(**spec), seed=seed, lr=lr)
    g = torch.Generator().manual_seed(seed + 100)
    return LearnedRule(rule.spec, rule.theta + noise * torch.randn(rule.theta.shape, generator=g), lr=lr)


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))


def _train(opt, model, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def test_features_match_a_direct_computation():
    spec = RuleSpec()
    g = torch.Generator().manual_seed(0)
    p = torch.randn(4, 3, generator=g, dtype=torch.float64)
    grads = [torch.randn(4, 3, generator=g, dtype=torch.float64) for _ in range(4)]
    mom = torch.zeros(3, 4, 3, dtype=torch.float64)
    v = torch.zeros(4, 3, dtype=torch.float64)
    for gr in grads:  # the moments written out as exponential averages
        mom = torch.stack([b * mom[k] + (1 - b) * gr for k, b in enumerate(spec.betas)])
        v = spec.beta2 * v + (1 - spec.beta2) * gr * gr
    t = len(grads)
    feats = coordinate_features(p, grads[-1], mom, v, torch.tensor(float(t)), spec)
    for i in range(p.numel()):  # coordinate by coordinate, Adam's bias corrections by hand
        gi, pi = grads[-1].reshape(-1)[i].item(), p.reshape(-1)[i].item()
        r = 1 / math.sqrt((v.reshape(-1)[i].item() + spec.eps**2) / (1 - spec.beta2**t))
        expect = [gi * r] + [mom[k].reshape(-1)[i].item() / (1 - b**t) * r for k, b in enumerate(spec.betas)]
        expect.append(pi / math.sqrt((p**2).mean().item()))
        # float32 features against float64 arithmetic
        torch.testing.assert_close(feats[:, i], torch.tensor(expect, dtype=torch.float32), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk_size", [7, 1 << 15])
def test_optimizer_matches_the_reference_step(chunk_size):
    rule = _rule()
    base = torch.randn(6, 5)
    p = base.t().clone().requires_grad_()  # a non-contiguous parameter as well
    q = torch.randn(9, requires_grad=True)
    opt = LearnedOptimizer([p, q], policy=rule, lr=0.03, chunk_size=chunk_size)
    ref = {}
    for name, x in (("p", p), ("q", q)):
        ref[name] = [x.detach().clone(), torch.zeros(3, *x.shape), torch.zeros(x.shape), torch.zeros(())]
    g = torch.Generator().manual_seed(3)
    for _ in range(12):
        p.grad, q.grad = torch.randn(p.shape, generator=g), torch.randn(q.shape, generator=g)
        for name, x in (("p", p), ("q", q)):
            ref[name] = list(reference_step(rule.theta, rule.spec, *ref[name][:1], x.grad, *ref[name][1:], 0.03))
        opt.step()
    for name, x in (("p", p), ("q", q)):
        # same formulas, rearranged (weights folded, chunked): float rounding only
        torch.testing.assert_close(x.detach(), ref[name][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(opt.state[x]["v"], ref[name][2], rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(opt.state[x]["momenta"], ref[name][1], rtol=1e-5, atol=1e-7)
        assert opt.state[x]["step"].item() == 12


def test_update_is_bounded():
    rule = _rule(noise=20.0)  # wild weights: the output layer saturates
    p = torch.randn(1000, requires_grad=True)
    opt = LearnedOptimizer([p], policy=rule, lr=0.1)
    g = torch.Generator().manual_seed(0)
    bound = 0.1 * math.exp(rule.spec.kappa) * (1 + 1e-6)
    for scale in (1e-20, 1.0, 1e20):
        before = p.detach().clone()
        p.grad = torch.randn(1000, generator=g) * scale
        opt.step()
        assert (p.detach() - before).abs().max().item() <= bound


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_steps_are_skipped(bad):
    model, twin = _model(), _model()
    opt = LearnedOptimizer(model.parameters(), policy=_rule())
    ref = LearnedOptimizer(twin.parameters(), policy=_rule())
    # a bad first step: step counts stay 0 and nothing turns NaN
    for m in (model,):
        for p in m.parameters():
            p.grad = torch.ones_like(p)
        next(m.parameters()).grad[0, 0] = bad
    opt.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
        assert opt.state[p]["step"].item() == 0 and torch.count_nonzero(opt.state[p]["v"]) == 0
    _train(opt, model, 3)
    _train(ref, twin, 3)
    saved = copy.deepcopy(opt.state_dict())
    params = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():  # a bad step in the middle: parameters and state unchanged
        p.grad = torch.randn_like(p)
    list(model.parameters())[-1].grad[1] = bad
    opt.step()
    for p, before in zip(model.parameters(), params):
        assert torch.equal(p.detach(), before)
    for k, st in opt.state_dict()["state"].items():
        for name, value in st.items():
            assert torch.equal(value, saved["state"][k][name]), name
    _train(opt, model, 2, seed=5)  # and training goes on exactly as if it had never happened
    _train(ref, twin, 2, seed=5)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_state_dict_resume_is_bit_exact(tmp_path):
    rule = _rule()
    model_a = _model()
    opt_a = LearnedOptimizer(model_a.parameters(), policy=rule)
    _train(opt_a, model_a, 10)

    model_b = _model()
    opt_b = LearnedOptimizer(model_b.parameters(), policy=rule)
    g = torch.Generator().manual_seed(1)
    for i in range(10):
        x, y = torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)
        if i == 5:  # checkpoint to disk, rebuild everything, load with weights_only=True
            path = tmp_path / "ckpt.pt"
            torch.save({"model": model_b.state_dict(), "opt": opt_b.state_dict()}, path)
            ckpt = torch.load(path, weights_only=True)
            model_b = _model(seed=9)
            model_b.load_state_dict(ckpt["model"])
            opt_b = LearnedOptimizer(model_b.parameters(), policy=rule)
            opt_b.load_state_dict(ckpt["opt"])
        opt_b.zero_grad()
        torch.nn.functional.mse_loss(model_b(x), y).backward()
        opt_b.step()
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(p, q)


def test_param_groups_and_lr_scheduler():
    rule = _rule()
    a, b, c = (torch.randn(20, requires_grad=True) for _ in range(3))
    opt = LearnedOptimizer(
        [{"params": [a]}, {"params": [b], "lr": 0.0}, {"params": [c], "lr": 0.05}], policy=rule, lr=0.02
    )
    assert [gr["lr"] for gr in opt.param_groups] == [0.02, 0.0, 0.05]
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    g = torch.Generator().manual_seed(0)
    b0 = b.detach().clone()
    for i in range(3):
        a.grad, b.grad, c.grad = (torch.randn(20, generator=g) for _ in range(3))
        opt.step()
        sched.step()
        assert opt.param_groups[0]["lr"] == pytest.approx(0.02 * 0.5 ** (i + 1))
        assert opt.param_groups[2]["lr"] == pytest.approx(0.05 * 0.5 ** (i + 1))
    assert torch.equal(b.detach(), b0)
    assert opt.state[b]["step"].item() == 3  # a zero-lr group still tracks its moments
    assert not torch.equal(a.detach(), b0) and len(opt.state) == 3


def test_scheduler_scales_the_update():
    rule = _rule()
    x = torch.randn(30, requires_grad=True)
    y = x.detach().clone().requires_grad_()
    ox, oy = LearnedOptimizer([x], policy=rule, lr=0.04), LearnedOptimizer([y], policy=rule, lr=0.04)
    for gr in oy.param_groups:
        gr["lr"] = 0.01  # what a scheduler does
    grad = torch.randn(30)
    x.grad, y.grad = grad.clone(), grad.clone()
    x0 = x.detach().clone()
    ox.step()
    oy.step()
    # the direction does not depend on lr: a quarter of the lr is a quarter of the step; the steps
    # are read back as differences of O(1) float32 parameters, hence atol ~ their rounding
    torch.testing.assert_close(y.detach() - x0, (x.detach() - x0) / 4, rtol=1e-4, atol=5e-7)
    assert (x.detach() - x0).abs().max() > 1e-3


def test_pickle_and_deepcopy_keep_the_rule():
    rule = _rule()
    model = _model()
    opt = LearnedOptimizer(model.parameters(), policy=rule, chunk_size=4)
    _train(opt, model, 3)
    clone_model = copy.deepcopy(model)
    clone = copy.deepcopy({"m": model, "o": opt})
    pickled = pickle.loads(pickle.dumps({"m": model, "o": opt}))
    for other in (clone, pickled):
        assert torch.equal(other["o"].rule.theta, rule.theta) and other["o"].chunk_size == 4
        _train(other["o"], other["m"], 3, seed=7)
    _train(opt, model, 3, seed=7)
    for p, q, r in zip(model.parameters(), clone["m"].parameters(), pickled["m"].parameters()):
        assert torch.equal(p, q) and torch.equal(p, r)
    assert not torch.equal(next(model.parameters()), next(clone_model.parameters()))


def test_bad_arguments_give_clear_errors(tmp_path):
    p = [torch.randn(3, requires_grad=True)]
    rule = _rule()
    for lr in (-1.0, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="Invalid learning rate"):
            LearnedOptimizer(p, policy=rule, lr=lr)
    with pytest.raises(ValueError, match="Invalid learning rate"):
        LearnedOptimizer([{"params": p, "lr": -0.1}], policy=rule)
    with pytest.raises(ValueError, match="chunk_size"):
        LearnedOptimizer(p, policy=rule, chunk_size=0)
    with pytest.raises(ValueError, match="no shipped rule of that name"):
        LearnedOptimizer(p, policy="no-such-rule")
    with pytest.raises(ValueError, match="Invalid policy"):
        LearnedOptimizer(p, policy=3)
    not_a_rule = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, not_a_rule)
    with pytest.raises(ValueError, match="not a learned-rule checkpoint"):
        LearnedOptimizer(p, policy=str(not_a_rule))
    wrong = rule.checkpoint()
    wrong["theta"] = wrong["theta"][:-1]
    bad_path = tmp_path / "bad.pt"
    torch.save(wrong, bad_path)
    with pytest.raises(ValueError, match="the spec needs"):
        LearnedOptimizer(p, policy=str(bad_path))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="Cannot read"):
        LearnedOptimizer(p, policy=str(garbage))
    with pytest.raises(ValueError, match="Invalid hidden"):
        RuleSpec(hidden=0)
    # a state_dict from an optimizer with another rule is refused, and the state is left alone
    opt = LearnedOptimizer(p, policy=rule)
    p[0].grad = torch.ones(3)
    opt.step()
    other = LearnedOptimizer(p, policy=_rule(seed=1))
    with pytest.raises(ValueError, match="different rule"):
        other.load_state_dict(opt.state_dict())
    assert len(other.state) == 0
    sparse = torch.randn(4, 2, requires_grad=True)
    sparse.grad = torch.eye(4, 2).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        LearnedOptimizer([sparse], policy=rule).step()


def test_controller_policies_are_refused_as_rules():
    from rlopt.registry import _index, pretrained_path

    others = [n for n, e in _index().items() if e.get("optimizer") != "learned"]
    assert others, "the registry ships RL controller policies"
    with pytest.raises(ValueError, match="not a learned-rule checkpoint"):
        load_rule(others[0])
    with pytest.raises(ValueError, match="not a learned-rule checkpoint"):
        load_rule(pretrained_path(others[0]))


def test_shipped_rules_load_by_name():
    from rlopt.registry import _index, load_pretrained, pretrained_info

    names = [n for n, e in _index().items() if e.get("optimizer") == "learned"]
    assert names, "the registry ships a learned rule (learned-es)"
    for name in names:
        info = pretrained_info(name)
        assert info["command"].startswith("python -m rlopt.learned.train") and info["train_time_s"] > 0
        rule = load_pretrained(name)
        assert isinstance(rule, LearnedRule)
        x = torch.randn(10, requires_grad=True)
        opt = LearnedOptimizer([x], policy=name)
        assert opt.param_groups[0]["lr"] == rule.lr
        (x**2).sum().backward()
        before = (x.detach() ** 2).sum()
        for _ in range(20):
            opt.zero_grad()
            (x**2).sum().backward()
            opt.step()
        assert (x.detach() ** 2).sum() < before


def test_tasks_are_reproducible_and_vmappable():
    for family in FAMILIES:
        a, b = sample_task(family, 7), sample_task(family, 7)
        for x, y in zip(a.init(), b.init()):
            assert torch.equal(x, y)
        assert torch.isfinite(a.loss(a.init()))
    rescaled = sample_task("logistic", 7, rescale=10.0)
    plain = sample_task("logistic", 7)
    torch.testing.assert_close(rescaled.loss(rescaled.init()), plain.loss(plain.init()))  # same problem, other units
    spec = RuleSpec()
    losses = rollout(torch.stack([spec.init_theta()] * 3), spec, sample_task("mlp", 1), steps=3, lr=0.01)
    assert losses.shape == (3, 4) and torch.isfinite(losses).all()
    assert torch.allclose(losses[0], losses[2])  # same rule, same task: same trajectory


def test_meta_objective_scores_divergence_as_worst():
    losses = torch.tensor([[1.0, 0.5, 0.25], [1.0, float("nan"), float("nan")], [1.0, 1e9, 1e12]])
    f = meta_objective(losses)
    assert f[0] < 0 and f[1] == pytest.approx(math.log(10)) and f[2] == pytest.approx(math.log(10))


def test_es_improves_the_meta_objective_on_a_tiny_distribution():
    spec = RuleSpec(hidden=4)
    theta = spec.init_theta(torch.Generator().manual_seed(0))
    config = ESConfig(pairs=4, tasks_per_iter=2, steps=10, sigma=0.1, meta_lr=0.05, lr=0.003, hidden=4, seed=0)
    trainer = ESTrainer(config, TaskDistribution(("quadratic", "logistic"), p_rescale=0.0), spec, theta)
    val = [sample_task("quadratic", 1001), sample_task("logistic", 1003)]
    before = trainer.evaluate(val)
    for _ in range(25):
        trainer.step()
    after = trainer.evaluate(val)
    # the rule starts at a 3e-3 step: ES finds larger steps on these tasks
    assert after < before - 0.1, (before, after)


def test_train_cli_resumes_to_the_same_rule(tmp_path):
    from rlopt.learned.train import main

    common = [
        "--families",
        "quadratic",
        "--pairs",
        "2",
        "--tasks-per-iter",
        "1",
        "--steps",
        "4",
        "--hidden",
        "2",
        "--eval-every",
        "2",
        "--no-progress",
    ]
    straight = main(common + ["--iterations", "4", "--out", str(tmp_path / "a.pt")])
    main(common + ["--iterations", "2", "--out", str(tmp_path / "b.pt")])
    resumed = main(common + ["--iterations", "4", "--out", str(tmp_path / "b.pt"), "--resume"])
    assert torch.equal(straight.theta, resumed.theta)
    assert torch.equal(load_rule(str(tmp_path / "a.pt")).theta, straight.theta)
