"""The shared training machinery: row stream, schedule, optimizer step, checkpoint layout."""

import json
import math

import pytest
import torch

from nla.core.config import ConfigError
from nla.train.checkpoint import LAYOUT, STATE_FILE, save_checkpoint, start_from
from nla.train.loop import (
    MAX_CONSECUTIVE_SKIPS,
    DivergedError,
    OptimizerStep,
    lr_factor,
    restore_skips,
    row_stream,
    schedule,
    skip_counts,
    warmup_steps,
)


def test_row_stream_is_a_function_of_seed_and_position():
    whole = row_stream(10, 3, 0, 25)
    assert sorted(whole[:10]) == list(range(10)) and sorted(whole[10:20]) == list(range(10))  # epochs are permutations
    assert whole[:10] != whole[10:20]  # each epoch its own order
    assert row_stream(10, 3, 7, 11) == whole[7:18]  # what a resume at cursor 7 reads
    assert whole[:10] != row_stream(10, 4, 0, 10)
    with pytest.raises(ValueError):
        row_stream(0, 3, 0, 1)


def test_schedule_warms_up_then_decays():
    steps = 40
    assert warmup_steps(steps) == 2 and warmup_steps(10) == 1 and warmup_steps(0) == 1
    factors = [lr_factor(s, steps) for s in range(steps)]
    assert factors[:3] == [0.5, 1.0, 1.0]  # linear warm-up, then the cosine starts at 1
    assert all(a >= b for a, b in zip(factors[1:], factors[2:])) and 0 < factors[-1] < 0.01  # the last step still moves
    assert [lr_factor(s, steps, "constant") for s in (0, 1, 39)] == [0.5, 1.0, 1.0]
    with pytest.raises(ValueError, match="decay"):
        lr_factor(5, steps, "linear")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = schedule(opt, steps)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * factors[1])


def _stepper(grads):
    """A real linear layer whose next gradient is taken from `grads` (inf/NaN = a bf16 overflow)."""
    layer = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    sched = schedule(opt, 100)
    feed = iter(grads)

    def clip():
        g = next(feed)
        for p in layer.parameters():
            p.grad = torch.full_like(p, g)
        return torch.nn.utils.clip_grad_norm_(list(layer.parameters()), 1.0)

    return layer, OptimizerStep("ar", opt, sched, clip), sched


def test_optimizer_step_skips_non_finite_but_keeps_the_schedule():
    layer, step, sched = _stepper([float("nan"), 1.0])
    w0 = layer.weight.detach().clone()
    norm, skipped = step()
    assert skipped and math.isnan(norm) and torch.equal(layer.weight, w0) and step.skipped == 1
    assert sched.last_epoch == 1 and layer.weight.grad is None  # the schedule follows the step count; grads cleared
    norm, skipped = step()
    assert not skipped and norm == pytest.approx(math.sqrt(3)) and not torch.equal(layer.weight, w0)
    assert step.consecutive == 0 and step.skipped == 1
    assert set(step.saved()) == {"ar_optimizer", "ar_scheduler"}


def test_optimizer_step_stops_a_diverged_run():
    _, step, _ = _stepper([float("inf")] * MAX_CONSECUTIVE_SKIPS)
    for _ in range(MAX_CONSECUTIVE_SKIPS - 1):
        step()
    with pytest.raises(DivergedError, match=f"{MAX_CONSECUTIVE_SKIPS} AR steps in a row had non-finite gradients"):
        step()


def test_skip_counts_round_trip_by_name_and_read_the_old_bare_number():
    _, av, _ = _stepper([float("nan")])
    av.name = "av"
    _, ar, _ = _stepper([1.0])
    av()
    saved = skip_counts(av, ar)
    assert saved == {"av": 1, "ar": 0}
    av.skipped, ar.skipped = 5, 5
    restore_skips(saved, ar, av)  # by name, whatever the order
    assert (av.skipped, ar.skipped) == (1, 0)
    restore_skips(3, ar)  # a one-optimizer checkpoint from before the names
    assert ar.skipped == 3
    restore_skips(None, ar)
    assert ar.skipped == 0


def test_a_checkpoint_of_the_old_layout_is_refused_in_one_line(tmp_path):
    root = tmp_path / "ar"
    path = save_checkpoint(root, 4, lambda d: None, {"cursor": 4, "fingerprint": {"lr": 1}})
    state = json.loads((path / STATE_FILE).read_text())
    assert state["layout"] == LAYOUT and start_from("auto", root, {"lr": 1}) == path
    del state["layout"]  # what a checkpoint written before the shared toolkit holds
    (path / STATE_FILE).write_text(json.dumps(state))
    with pytest.raises(ConfigError, match="predates this version's checkpoint layout") as err:
        start_from("auto", root, {"lr": 1})
    assert "\n" not in str(err.value)


def test_a_checkpoint_older_than_a_key_resumes_only_with_the_value_it_used(tmp_path):
    root = tmp_path / "rl"
    path = save_checkpoint(root, 4, lambda d: None, {"cursor": 4, "fingerprint": {"lr": 1}})  # written before top_k
    assert start_from("auto", root, {"lr": 1, "rl_top_k": 50}) == path  # the value generate used unasked
    with pytest.raises(ConfigError, match=r"rl_top_k \(checkpoint 50, now 0\)"):
        start_from("auto", root, {"lr": 1, "rl_top_k": 0})


def test_a_checkpoint_written_under_old_option_names_resumes(tmp_path):
    """A fingerprint saved before the rl_ prefix compares under the new names: same values resume,
    a changed one is named by its new name."""
    root = tmp_path / "rl"
    old = {"group_size": 8, "kl_coef": 0.01, "rl_top_k": 50}
    path = save_checkpoint(root, 4, lambda d: None, {"cursor": 4, "fingerprint": old})
    assert start_from("auto", root, {"rl_group_size": 8, "rl_kl_coef": 0.01, "rl_top_k": 50}) == path
    with pytest.raises(ConfigError, match=r"rl_group_size \(checkpoint 8, now 4\)"):
        start_from("auto", root, {"rl_group_size": 4, "rl_kl_coef": 0.01, "rl_top_k": 50})
