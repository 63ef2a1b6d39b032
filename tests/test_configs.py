"""Config loading, overrides and their one-line errors."""

import pytest

from lostlm.configs import Config, apply_overrides, config_from_dict, load_config
from lostlm.errors import LostLMError


def test_yaml_and_toml_recipes_and_overrides(tmp_path):
    (tmp_path / "r.yaml").write_text("model:\n  preset: 9m\ntrain:\n  steps: 7\n  lr: 1e-3\n")
    (tmp_path / "r.toml").write_text("[model]\npreset = '9m'\n[train]\nsteps = 7\nlr = 1e-3\n")
    a = load_config(tmp_path / "r.yaml", ["layer.rank=16", "layer.targets=q_proj,v_proj", "layer.svd_window=null"])
    b = load_config(tmp_path / "r.toml", ["layer.rank=16", "layer.targets=[q_proj, v_proj]"])
    assert a.to_dict() == b.to_dict()
    assert a.train.steps == 7 and a.train.lr == 1e-3 and a.layer.targets == ["q_proj", "v_proj"]
    assert a.train.out_dir == "runs/lost-9m"
    assert a.resolved_model().hidden_size == 128 and a.resolved_rank() == 16


@pytest.mark.parametrize("data,message", [
    ({"train": {"lrr": 1}}, "unknown config key train.lrr (did you mean train.lr?)"),
    ({"modle": {}}, "unknown config key modle (did you mean model?)"),
    ({"layer": {"method": "dense"}}, "config layer.method='dense' is not valid; use one of: full, lowrank"),
    ({"layer": {"density": 2}}, "config layer.density=2.0 must be in (0, 1]"),
    ({"train": {"steps": "many"}}, "config train.steps='many' is not a valid int"),
    ({"train": {"batch_size": 16, "micro_batch_size": 5}}, "must divide train.batch_size=16"),
    ({"model": {"preset": "tiny", "hidden_size": 250, "num_heads": 4}}, "hidden_size=250 is not divisible"),
    ({"data": {"source": "files"}}, "config data.source=files needs data.paths"),
    ({"train": {"compile": "maybe"}}, "config train.compile='maybe' is not a valid bool"),
])
def test_bad_values_give_one_line_errors(data, message):
    with pytest.raises(LostLMError) as info:
        config_from_dict(data)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_bad_files_and_overrides(tmp_path):
    with pytest.raises(LostLMError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("train: [unclosed\n")
    with pytest.raises(LostLMError, match="is not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    with pytest.raises(LostLMError, match="must look like section.key=value"):
        apply_overrides({}, ["lr"])
    with pytest.raises(LostLMError, match="must be section.key"):
        apply_overrides({}, ["lr=3"])


def test_defaults_are_valid():
    cfg = Config()
    assert cfg.layer.method == "lost" and cfg.model.preset == "tiny" and cfg.resolved_rank() == 64


def test_every_shipped_recipe_loads_and_tiny_is_the_default():
    from pathlib import Path

    recipes = sorted((Path(__file__).parent.parent / "configs").rglob("*.*ml"))
    assert len(recipes) >= 6
    for recipe in recipes:
        load_config(recipe)
    tiny = load_config(Path(__file__).parent.parent / "configs" / "tiny.yaml")
    assert tiny.to_dict() == Config().to_dict()


def test_cli_accepts_overrides_before_and_after_options():
    from lostlm.cli import _train_overrides, build_parser

    commands = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction").choices
    for argv in (["--method", "full", "train.lr=1e-3", "train.steps=5"], ["train.lr=1e-3", "--method", "full", "train.steps=5"]):
        config, overrides = _train_overrides(commands["train"].parse_intermixed_args(argv))
        assert config is None and load_config(config, overrides).layer.method == "full"
        assert load_config(config, overrides).train.steps == 5
