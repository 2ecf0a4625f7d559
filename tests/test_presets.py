"""The presets: one YAML file per paper table row, listed and shown by the CLI.

The resolved configs were checked equal, preset by preset, to the ones the earlier generated
code produced when the files were written (2026-12-02); these tests pin what each family must
be (budgets, bitwidths, the 15-epoch rule), so a hand edit that breaks a row fails here.
"""

from __future__ import annotations

from importlib import resources

import pytest
import yaml

from mixq.cli import main
from mixq.train.config import TrainConfig
from mixq.train.presets import DEFAULT_PRESET, PRESETS, get_preset

PAPER_T3 = ["fixed-u-w2", "fixed-u-w2a4", "tqt-u-w2", "tqt-u-w2a4", "u3-w70kb",
            "u3-w70kb-asum92kb", "u3-w70kb-amax8kb", "fixed-p-w2", "fixed-p-w2a4", "tqt-p-w2",
            "tqt-p-w2a4", "p3-w70kb", "p3-w70kb-asum92kb", "p3-w70kb-amax8kb"]  # fmt: skip
PAPER_T1 = [f"t1-{p}-{w}-float" for p in ("u1", "u2", "u3", "p1", "p2", "p3") for w in ("w", "wa")]


def test_names_are_the_files():
    root = resources.files("mixq.train.presets")
    files = set()
    for name in PRESETS:
        path = root.joinpath(*f"{name}.yaml".split("/"))
        assert path.is_file(), name
        assert yaml.safe_load(path.read_text()) == PRESETS[name]
        files.add(name)
    assert DEFAULT_PRESET in files and len(files) == 80


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_resolves_with_a_description(name):
    data = get_preset(name)
    assert data["description"].strip()
    if data.get("init") == "REQUIRED":
        data["init"] = "float.pt"
    TrainConfig.from_data(data)


def test_table3_rows():
    budgets = {"w70kb": {"weight": "70KB"},
               "w70kb-asum92kb": {"weight": "70KB", "activation_sum": "92KB"},
               "w70kb-amax8kb": {"weight": "70KB", "activation_max": "8KB"}}  # fmt: skip
    for row in PAPER_T3:
        cfg = get_preset(f"cifar10/resnet20/{row}")
        kind, tag = row.split("-", 1)
        if kind in ("u3", "p3"):
            assert cfg["budget"] == budgets[tag], row
            assert cfg["quant"]["weight"]["quantizer"] == ("uniform/d_qmax" if kind == "u3"
                                                           else "pow2/qmin_qmax")  # fmt: skip
        else:
            w = cfg["quant"]["weight"]
            assert w["bits"] == 2 and "budget" not in cfg, row
            assert (cfg["quant"]["activation"]["quantizer"] == "float") == (not tag.endswith("a4"))
        assert cfg.get("logit_scale", False) == ("p" in (kind[0], tag[0])), row


def test_short_schedule_is_the_paper_row_compressed():
    """``15ep/ROW`` == the paper preset ``ROW`` but for epochs, milestones and description."""
    for row in PAPER_T1 + PAPER_T3:
        paper = get_preset(f"cifar10/resnet20/{row}")
        short = get_preset(f"cifar10/resnet20/15ep/{row}")
        assert short["optim"].pop("epochs") == 15 and paper["optim"].pop("epochs") == 160
        assert short["optim"].pop("milestones") == [7.5, 11.25]
        assert paper["optim"].pop("milestones") == [80, 120]
        assert short.pop("description").startswith(paper.pop("description"))
        assert short == paper, row
    rows = [n.rsplit("/", 1)[1].removesuffix("-dual") for n in PRESETS
            if n.startswith("cifar10/resnet20/15ep/")]  # fmt: skip
    assert not [r for r in rows if r not in PAPER_T1 + PAPER_T3]


def test_dual_presets_are_their_rows_with_budget_control():
    """``15ep/ROW-dual`` == ``15ep/ROW`` with ``budget.mode: dual`` and ``freeze_at: 0.7``."""
    duals = [n for n in PRESETS if n.endswith("-dual")]
    assert sorted(duals) == ["cifar10/resnet20/15ep/p3-w70kb-dual",
                             "cifar10/resnet20/15ep/u3-w70kb-dual"]  # fmt: skip
    for name in duals:
        dual, row = get_preset(name), get_preset(name.removesuffix("-dual"))
        assert dual["budget"].pop("mode") == "dual"
        assert dual["budget"].pop("freeze_at") == 0.7
        assert dual.pop("description").startswith(row.pop("description"))
        assert dual == row, name


def test_paper_presets_keep_the_fixed_lambda():
    for name, data in PRESETS.items():
        if name.startswith(("cifar10/", "imagenet/")) and not name.endswith("-dual"):
            assert data.get("budget", {}).get("mode", "fixed") == "fixed", name
            assert "freeze_at" not in data.get("budget", {}), name


def test_default_and_mcu_presets_use_budget_control():
    default = TrainConfig.from_data(get_preset(DEFAULT_PRESET))
    assert default.budget.mode == "dual" and default.budget.freeze_epoch(30) == 21
    mcu = TrainConfig.from_data(get_preset("digits/smallcnn/mcu-int4int8-w8kb"))
    assert mcu.quant.weight.bit_set == (4, 8) and mcu.quant.activation.bit_set == (8,)
    assert mcu.budget.mode == "dual" and mcu.budget.weight == "8KB"


def test_cli_lists_and_shows_presets(capsys):
    assert main(["presets"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert listed == list(PRESETS)
    assert main(["presets", "--show", "cifar10/resnet20/u3-w70kb-amax8kb"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown == PRESETS["cifar10/resnet20/u3-w70kb-amax8kb"]
