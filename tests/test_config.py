"""params.yaml validation: bad input gives one line naming the field and the fix."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError, load_params, parse_params

ROOT = Path(__file__).resolve().parents[1]


def default_raw() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_default_params_load():
    params = load_params(ROOT / "params.yaml")
    assert params.model.source == "smollm2-135m"
    kinds = {cfg.kind for cfg in params.stages.values()}
    assert kinds == {"prune", "quantize", "peft", "merge", "ptq"}


@pytest.mark.parametrize("edit, field", [
    (lambda r: r["stages"]["wanda50"].update(sparsity=1.5), "stages.wanda50.sparsity"),
    (lambda r: r["stages"]["wanda50"].update(pattern="4:2"), "stages.wanda50.pattern"),
    (lambda r: r["stages"]["hybrid"].update(methods=["lora", "dora"]), "stages.hybrid.methods"),
    (lambda r: r["stages"]["hybrid"].update(lora_rank=4), "stages.hybrid.lora_rank"),
    (lambda r: r["stages"]["nf4"].update(kind="quantise"), "stages.nf4"),
    (lambda r: r["orderings"]["qlora_gptq"].append("gptq8"), "orderings.qlora_gptq[4]"),
    (lambda r: r["orderings"].update({"bad-name": ["nf4"]}), "orderings.bad-name"),
    (lambda r: r["data"].pop("domain"), "data.domain"),
])
def test_bad_params_one_line_naming_field(edit, field):
    raw = copy.deepcopy(default_raw())
    edit(raw)
    with pytest.raises(ConfigError) as exc:
        parse_params(raw)
    msg = str(exc.value)
    assert "\n" not in msg
    assert field in msg, msg
    assert "params.yaml" in msg


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "params.yaml"
    bad.write_text("stages: [unclosed\n")
    with pytest.raises(ConfigError, match=r"params.yaml:2:1: .*fix the YAML"):
        load_params(bad)


def test_yaml_reads_as_dvc_does_yaml_1_2(tmp_path):
    """2:4 stays a string and on / off / yes / no are strings (YAML 1.2, as DVC reads params.yaml); true / false stay
    booleans."""
    from pipeline.config import read_yaml

    f = tmp_path / "p.yaml"
    f.write_text("a: 2:4\nb: off\nc: yes\nd: false\ne: True\nf: 12\n")
    assert read_yaml(f) == {"a": "2:4", "b": "off", "c": "yes", "d": False, "e": True, "f": 12}
