"""Fuzzed argument values never crash a command: each run exits 0 or gives exactly one `pocketdit: error:`
line with exit 2. The model is left out (a missing path) or the run stops at --print-config, so every
example is parsing and validation only and the test takes seconds."""

from __future__ import annotations

import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pocketdit.cli import main

# values a user might type: numbers of every size and sign, special floats, words, empty strings
numbers = st.one_of(
    st.integers(-(10**25), 10**25).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(lambda x: repr(x) if not math.isnan(x) else "nan"),
    st.sampled_from(["0", "-0", "1e23", "1e-30", "0x10", "1_000", " 3", "2.5", "inf", "-inf", "NaN", "1e400"]),
)
values = st.one_of(numbers, st.text(min_size=0, max_size=12))

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


def _check(argv, capsys, ok_codes=(2,)):
    code = main(argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("pocketdit: error:")]
    assert "Traceback" not in err, err
    assert code in ok_codes, (argv, code, err)
    if code == 2:
        assert len(errors) == 1, (argv, err)


@SETTINGS
@given(option=st.sampled_from(["--steps", "--guidance", "--seed", "--shift", "--size", "--height", "--width",
                               "--num-images", "--upscale", "--threads"]), value=values)
def test_generate_values(option, value, capsys):
    _check(["generate", "a red circle", "-m", "/nonexistent/model", option, value], capsys)


@SETTINGS
@given(key=st.sampled_from(["train.steps", "optim.lr", "data.batch_size", "data.resolution", "schedule.shift",
                            "schedule.logit_std", "train.ema_decay", "optim.warmup_steps", "train.num_threads",
                            "optim.betas", "train.sample_every", "optim.decay_steps", "text.dropout"]),
       value=values)
def test_train_overrides(key, value, capsys):
    _check(["train", f"--{key}", value, "--print-config"], capsys, ok_codes=(0, 2))


@SETTINGS
@given(option=st.sampled_from(["--nbits", "--high-nbits", "--target-avg-bits", "--group-size", "--finetune-steps",
                               "--lr", "--calibration-prompts", "--sensitivity-batches", "--seed"]), value=values)
def test_quantize_values(option, value, capsys, tmp_path):
    _check(["quantize", "/nonexistent/model", "--scheme", "palettize4", "-o", str(tmp_path / "q"), option, value],
           capsys)
