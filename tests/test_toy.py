"""The toy experiment of the paper (Fig. 3): the claim, the CLI and determinism."""

from __future__ import annotations

import json

import pytest

from mixq.cli import main
from mixq.experiments.toy import Curve, ToyResult, format_table, run_toy

#: "Without oscillation": the log-MSE curve climbs by less than this many decades in total.
NO_OSC = 1e-3


@pytest.fixture(scope="module")
def result() -> ToyResult:
    return run_toy()  # the defaults: 300 steps, lr 0.1, 10^4 samples, seed 0, 4-bit init


def test_same_starting_point_per_family(result: ToyResult) -> None:
    for kind in ("uniform", "pow2"):
        fam = result.family(kind)
        assert len(fam) == 3
        assert len({c.mse[0] for c in fam}) == 1, kind
        assert all(c.bitwidth[0] == 4 for c in fam)
        assert all(len(c.mse) == len(c.bitwidth) == result.steps + 1 for c in fam)


@pytest.mark.parametrize(("kind", "best"), [("uniform", "U3"), ("pow2", "P3")])
def test_proposed_parametrization_has_lowest_error(result: ToyResult, kind: str, best: str) -> None:
    fam = result.family(kind)
    winner = result.curve(best)
    others = [c for c in fam if c.label != best]
    assert all(winner.final_mse < c.final_mse for c in others), format_table(result)
    assert all(winner.tail_mse < c.tail_mse for c in others), format_table(result)
    assert winner.final_mse < winner.mse[0]  # it actually learned something


@pytest.mark.parametrize(("kind", "best"), [("uniform", "U3"), ("pow2", "P3")])
def test_proposed_parametrization_does_not_oscillate(
    result: ToyResult, kind: str, best: str
) -> None:
    winner = result.curve(best)
    assert winner.rise < NO_OSC and winner.ups == 0, format_table(result)
    assert winner.rise <= min(c.rise for c in result.family(kind))


def test_others_oscillate_or_end_worse(result: ToyResult) -> None:
    # [b, d] and [b, q_min] oscillate clearly; [b, q_max] is monotone but ends higher (above).
    assert result.curve("U1").rise > 1.0
    assert result.curve("P1").rise > 10 * NO_OSC
    assert result.curve("U3").final_mse < 0.1 * result.curve("U2").final_mse


def test_u3_bitwidth_grows_without_memory_penalty(result: ToyResult) -> None:
    assert result.curve("uniform/d_qmax").final_bitwidth > 4


def test_oscillation_measure() -> None:
    mono = Curve("X", "uniform", "d_qmax", [1.0, 0.5, 0.5, 0.1], [4] * 4)
    assert mono.rise == 0.0 and mono.ups == 0
    bump = Curve("X", "uniform", "d_qmax", [1.0, 0.1, 1.0, 0.01], [4] * 4)
    assert bump.rise == pytest.approx(1.0) and bump.ups == 1
    assert bump.tail_mse == pytest.approx((1.0 + 0.01) / 2)


def test_deterministic_for_fixed_seed() -> None:
    a = run_toy(steps=15, n=2000, seed=3)
    b = run_toy(steps=15, n=2000, seed=3)
    c = run_toy(steps=15, n=2000, seed=4)
    assert [x.mse for x in a.curves] == [x.mse for x in b.curves]
    assert [x.params for x in a.curves] == [x.params for x in b.curves]
    assert [x.mse for x in a.curves] != [x.mse for x in c.curves]


def test_cli_writes_table_plot_and_json(tmp_path, capsys) -> None:
    png, js = tmp_path / "f.png", tmp_path / "r.json"
    argv = ["toy", "--steps", "10", "--samples", "2000", "--plot", str(png), "--json", str(js)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    for label in ("U1 b_d", "U2 b_qmax", "U3 d_qmax", "P1 b_qmin", "P2 b_qmax", "P3 qmin_qmax"):
        assert label in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(js.read_text())
    assert data["steps"] == 10 and data["samples"] == 2000 and data["lr"] == 0.1
    assert [r["label"] for r in data["results"]] == ["U1", "U2", "U3", "P1", "P2", "P3"]
    assert all(len(c["mse"]) == 11 for c in data["curves"])


@pytest.mark.parametrize("bad", [["--steps", "0"], ["--lr", "-1"], ["--samples", "1"]])
def test_cli_rejects_bad_arguments(bad: list[str], capsys) -> None:
    assert main(["toy", *bad]) == 2
    assert "mixq toy: error" in capsys.readouterr().err
