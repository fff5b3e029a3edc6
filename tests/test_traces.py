"""Trace loading: both Azure files, the arrival_s format, synthetic processes, bad files."""

from pathlib import Path

import numpy as np
import pytest

from rollout.errors import InputError
from rollout.scenario import SyntheticTrace, TraceSpec
from rollout.traces import load_trace, read_trace_csv, synthesize

DATA = Path(__file__).parent.parent / "data" / "traces"


@pytest.mark.parametrize(
    "name,rows,span_s,mean_in,mean_out",
    [
        # derived statistics of the bundled files (data/traces/README.md cites their source)
        ("azure_llm_2023_conv.csv", 19_366, 3_502, 1_155, 211),
        ("azure_llm_2023_code.csv", 8_819, 3_436, 2_048, 27.9),
    ],
)
def test_bundled_azure_traces(name, rows, span_s, mean_in, mean_out):
    trace = read_trace_csv(DATA / name)
    assert len(trace) == rows
    assert trace.arrival_s[0] == 0.0
    assert np.all(np.diff(trace.arrival_s) >= 0)
    assert trace.duration_s == pytest.approx(span_s, abs=1.0)
    assert trace.context_tokens.mean() == pytest.approx(mean_in, rel=0.01)
    assert trace.generated_tokens.mean() == pytest.approx(mean_out, rel=0.01)


def test_seven_fractional_digits_are_kept(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:17:03.9799600,10,1\n"
        "2023-11-16 18:17:04.0319651,20,2\n"
        "2023-11-16 18:17:05,30,3\n"
    )
    trace = read_trace_csv(path)
    assert trace.arrival_s.tolist() == pytest.approx([0.0, 0.0520051, 1.02004], abs=1e-9)
    assert trace.context_tokens.tolist() == [10, 20, 30]


def test_arrival_seconds_and_time_scale(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("arrival_s\n5\n7\n11\n")
    trace = load_trace(TraceSpec(path=path, time_scale=2.0, resample=False))
    assert trace.arrival_s.tolist() == [0.0, 1.0, 3.0]  # from the first request, twice as fast
    assert not trace.has_tokens


def _write(tmp_path, text):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "text,needle",
    [
        ("", "empty"),
        ("TIMESTAMP,ContextTokens\n", "no requests"),
        ("when,tokens\n1,2\n", "needs a TIMESTAMP or arrival_s column"),
        ("TIMESTAMP\n2023-11-16 18:17:03.97\nyesterday\n", "line 3: TIMESTAMP 'yesterday'"),
        ("arrival_s\n1\nsoon\n", "line 3: arrival_s 'soon'"),
        ("arrival_s\n1\n3\n2\n", "must be sorted, but line 4 goes back in time"),
        (
            "TIMESTAMP\n2023-11-16 18:17:05\n2023-11-16 18:17:03\n",
            "must be sorted, but line 3",
        ),
        ("arrival_s,ContextTokens\n1,12\n2,-3\n", "line 3: ContextTokens '-3'"),
        ("arrival_s,GeneratedTokens\n1,1.5\n", "line 2: GeneratedTokens '1.5'"),
        ('arrival_s\n"1\n', "not a readable CSV"),
    ],
)
def test_bad_trace_files_give_one_line(tmp_path, text, needle):
    with pytest.raises(InputError) as err:
        read_trace_csv(_write(tmp_path, text))
    message = str(err.value)
    assert needle in message
    assert "\n" not in message
    assert str(tmp_path) in message


def test_missing_trace_file(tmp_path):
    with pytest.raises(InputError, match="no such trace file"):
        read_trace_csv(tmp_path / "nope.csv")


def test_poisson_rate_and_gaps():
    trace = synthesize(SyntheticTrace(rate_per_s=8.0, duration_s=20_000), seed=3)
    gaps = np.diff(trace.arrival_s)
    assert len(trace) / 20_000 == pytest.approx(8.0, rel=0.01)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.02)  # exponential: CV 1
    assert trace.arrival_s.max() < 20_000


def test_synthetic_is_deterministic_per_seed():
    spec = SyntheticTrace(rate_per_s=2.0, duration_s=500)
    a, b, c = (synthesize(spec, seed=s).arrival_s for s in (1, 1, 2))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_diurnal_follows_the_sine():
    spec = SyntheticTrace(
        process="diurnal", rate_per_s=10.0, amplitude=0.5, period_s=1000, duration_s=100_000
    )
    t = synthesize(spec, seed=1).arrival_s
    phase = (t % 1000) / 1000
    peak = ((phase > 0.2) & (phase < 0.3)).sum()  # sin ≈ 1 around a quarter period
    trough = ((phase > 0.7) & (phase < 0.8)).sum()  # sin ≈ −1
    assert peak / trough == pytest.approx(1.49 / 0.51, rel=0.05)  # mean of 1±0.5·sin over ±18°


def test_step_multiplies_the_rate():
    spec = SyntheticTrace(
        process="step", rate_per_s=5.0, step_at_s=2_000, step_factor=3.0, duration_s=4_000
    )
    t = synthesize(spec, seed=1).arrival_s
    before, after = (t < 2_000).sum() / 2_000, (t >= 2_000).sum() / 2_000
    assert before == pytest.approx(5.0, rel=0.05)
    assert after == pytest.approx(15.0, rel=0.05)


def test_synthetic_tokens_are_constant():
    trace = synthesize(
        SyntheticTrace(rate_per_s=1.0, duration_s=100, context_tokens=500, generated_tokens=40),
        seed=0,
    )
    assert set(trace.context_tokens.tolist()) == {500}
    assert set(trace.generated_tokens.tolist()) == {40}


def test_parsed_traces_are_cached_until_the_file_changes(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("arrival_s\n0\n1\n2\n")
    first = read_trace_csv(path)
    assert read_trace_csv(path) is first  # parsed once
    assert not first.arrival_s.flags.writeable  # shared, so nobody may change it
    path.write_text("arrival_s\n0\n1\n2\n3\n")
    assert len(read_trace_csv(path)) == 4


# ---- resampling a file, rate_scale, token distributions ---------------------------------------

CONV = DATA / "azure_llm_2023_conv.csv"


def per_window(times: np.ndarray, width: float, span: float) -> np.ndarray:
    return np.histogram(times, bins=np.arange(0.0, span + width, width))[0]


@pytest.mark.parametrize("scale", [1.0, 2.5, 0.4])
def test_resampling_keeps_the_rate_over_time(scale):
    """Every 5-minute window holds rate_scale times the file's arrivals, up to Poisson noise;
    the token counts are the file's."""
    original = read_trace_csv(CONV)
    trace = load_trace(TraceSpec(path=CONV, rate_scale=scale), seed=3)
    span = original.duration_s
    want = scale * per_window(original.arrival_s, 300.0, span)
    got = per_window(trace.arrival_s, 300.0, span)
    z = (got - want) / np.sqrt(want)
    assert np.abs(z).max() < 4.5
    assert abs(z.sum() / np.sqrt(len(z))) < 4.5  # the total too
    assert np.all(np.diff(trace.arrival_s) >= 0)
    assert trace.arrival_s.min() >= 0 and trace.arrival_s.max() <= span
    pairs = set(zip(original.context_tokens, original.generated_tokens, strict=True))
    drawn = set(zip(trace.context_tokens, trace.generated_tokens, strict=True))
    assert drawn <= pairs  # each request is a copy of one in the file


def test_the_seed_varies_a_resampled_file_and_resample_false_replays_it():
    a = load_trace(TraceSpec(path=CONV), seed=1)
    b = load_trace(TraceSpec(path=CONV), seed=2)
    assert not np.array_equal(a.arrival_s, b.arrival_s)
    assert np.array_equal(a.arrival_s, load_trace(TraceSpec(path=CONV), seed=1).arrival_s)
    exact = load_trace(TraceSpec(path=CONV, resample=False), seed=1)
    assert np.array_equal(exact.arrival_s, read_trace_csv(CONV).arrival_s)


def test_bursts_survive_resampling():
    """The code trace's bursts (up to 67 requests in one second) stay bursts: a 1 s jitter moves
    a request by at most half a second."""
    code = read_trace_csv(DATA / "azure_llm_2023_code.csv")
    trace = load_trace(TraceSpec(path=DATA / "azure_llm_2023_code.csv"), seed=4)
    span = code.duration_s
    assert (
        per_window(trace.arrival_s, 10.0, span).max()
        > 0.6 * per_window(code.arrival_s, 10.0, span).max()
    )


def test_synthetic_rate_scale_multiplies_the_rate():
    spec = SyntheticTrace(rate_per_s=5.0, duration_s=2000)
    trace = load_trace(TraceSpec(synthetic=spec, rate_scale=3.0), seed=2)
    assert len(trace) == pytest.approx(30_000, rel=0.03)


def test_token_counts_from_a_lognormal():
    spec = SyntheticTrace(
        rate_per_s=50.0,
        duration_s=800,
        context_tokens={"kind": "lognormal", "p50": 1000, "p99": 4000},
        generated_tokens=7,
    )
    trace = synthesize(spec, seed=1)
    assert np.percentile(trace.context_tokens, 50) == pytest.approx(1000, rel=0.03)
    assert np.percentile(trace.context_tokens, 99) == pytest.approx(4000, rel=0.06)
    assert (trace.generated_tokens == 7).all()


def test_token_counts_from_a_file_keep_their_pairs():
    spec = SyntheticTrace(
        rate_per_s=20.0,
        duration_s=500,
        context_tokens={"kind": "empirical", "path": CONV},
        generated_tokens={"kind": "empirical", "path": CONV},
    )
    trace = synthesize(spec, seed=5)
    original = read_trace_csv(CONV)
    pairs = set(zip(original.context_tokens, original.generated_tokens, strict=True))
    assert set(zip(trace.context_tokens, trace.generated_tokens, strict=True)) <= pairs
    assert trace.generated_tokens.mean() == pytest.approx(211, rel=0.05)


@pytest.mark.parametrize(
    "fields,needle",
    [
        ({"rate_scale": 0}, "rate_scale"),
        ({"rate_scale": 2.0, "resample": False}, "needs trace.resample"),
    ],
)
def test_bad_rate_scale(fields, needle):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=needle):
        TraceSpec(path=CONV, **fields)


def test_missing_token_column(tmp_path):
    path = tmp_path / "tokens.csv"
    path.write_text("other\n1\n")
    spec = SyntheticTrace(
        rate_per_s=1.0, duration_s=10, context_tokens={"kind": "empirical", "path": path}
    )
    with pytest.raises(InputError, match="has no ContextTokens column"):
        synthesize(spec)
