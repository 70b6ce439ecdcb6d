"""The learning-rate schedules: warmup then cosine, or warmup, a plateau and a linear cooldown (trapezoid); both
extend smoothly when a resumed run changes max_iters, and travel in checkpoints as plain values."""
import dataclasses
import math

import pytest

from llm.cli import parse
from llm.config import ConfigError
from llm.train.optim import Schedule


def schedule(*flags: str) -> Schedule:
    return Schedule.of(parse(["--learning_rate", "1.0", *flags])[1])


def test_cosine_warms_up_then_decays_to_min_lr():
    s = schedule("--max_iters", "100", "--warmup_steps", "10", "--min_lr", "0.1")
    assert s(0) == pytest.approx(0.1) and s(9) == pytest.approx(1.0)
    assert s(55) == pytest.approx(0.1 + 0.5 * (1 + math.cos(math.pi * 45 / 90)) * 0.9)
    assert s(100) == 0.1


def test_trapezoid_holds_the_peak_then_decays_linearly_to_a_tenth():
    s = schedule("--lr_schedule", "trapezoid", "--cooldown_frac", "0.4", "--max_iters", "100", "--warmup_steps", "10")
    assert s(4) == pytest.approx(0.5)
    assert [s(step) for step in (10, 35, 59)] == [1.0, 1.0, 1.0]  # the plateau ends where the last 40% begins
    assert s(60) == 1.0 and s(80) == pytest.approx(1.0 + 0.5 * (0.1 - 1.0)) and s(99) == pytest.approx(0.1 + 0.9 / 40)
    assert s(100) == pytest.approx(0.1)  # min_lr defaults to a tenth of the peak
    short = schedule("--lr_schedule", "trapezoid", "--cooldown_frac", "1.0", "--max_iters", "100",
                     "--warmup_steps", "10")
    assert short(10) == 1.0 and short(55) == pytest.approx(0.55)  # cooldown from the end of warmup


def test_extending_a_trapezoid_moves_its_cooldown_or_continues_it():
    s = schedule("--lr_schedule", "trapezoid", "--max_iters", "100", "--warmup_steps", "10")
    on_plateau = s.extended(30, 200)
    assert on_plateau(30) == s(30) == 1.0 and on_plateau(119) == 1.0 and on_plateau(120) == 1.0
    assert on_plateau(160) == pytest.approx(0.55) and on_plateau(200) == pytest.approx(0.1)
    in_cooldown = s.extended(80, 200)
    assert in_cooldown(80) == pytest.approx(s(80))  # no jump at the resumed step
    assert in_cooldown(140) == pytest.approx((s(80) + 0.1) / 2) and in_cooldown(200) == pytest.approx(0.1)


def test_a_schedule_is_plain_values_for_the_checkpoint():
    s = schedule("--lr_schedule", "trapezoid", "--max_iters", "50")
    restored = Schedule(**dataclasses.asdict(s))
    assert [restored(i) for i in range(60)] == [s(i) for i in range(60)]
    old = {k: v for k, v in dataclasses.asdict(schedule("--max_iters", "50")).items()
           if k not in ("shape", "cooldown_frac")}  # a checkpoint written before trapezoid schedules
    assert Schedule(**old)(30) == schedule("--max_iters", "50")(30)


@pytest.mark.parametrize("value", ["-0.1", "1.5"])
def test_cooldown_frac_outside_0_1_is_refused(value):
    with pytest.raises(ConfigError, match=f"cooldown_frac={float(value)} must be in"):
        parse(["--cooldown_frac", value])
