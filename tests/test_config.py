import pytest

from kdlora.config import DEFAULT_EPOCHS, DEFAULT_LR, build_config, load_config
from kdlora.errors import KdloraError

BASE = {"model": {"name": "m"}, "train": {"method": "lora"}}


def test_precedence_defaults_yaml_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {name: m}\ntrain: {method: lora, epochs: 7, lr: 0.001}\nlora: {r: 4}\n")
    cfg = load_config(path, {"train": {"epochs": "2"}, "lora": {"target_modules": "query,key"}})
    assert cfg.train.epochs == 2 and cfg.train.lr == 0.001 and cfg.lora.r == 4
    assert cfg.lora.target_modules == ["query", "key"] and cfg.kd.alpha == 0.5 and cfg.kd.temperature == 1.0


def test_method_default_lr():
    assert load_config(None, BASE).train.lr == DEFAULT_LR["lora"]
    assert load_config(None, {"model": {"name": "m"}, "train": {"method": "fft"}}).train.lr == DEFAULT_LR["fft"]


KD = {"model": {"teacher": "t", "student_layers": [0, 2]}}


def test_default_config_is_the_tuned_one_and_paper_preset_keeps_the_papers():
    cfg = load_config(None, KD)  # kd-lora by default
    assert cfg.train.method == "kd-lora" and cfg.train.epochs == 5 and cfg.train.lr == "auto"
    assert cfg.lora.target_modules == ["all-linear"] and cfg.kd.temperature == 1.0 and cfg.kd.alpha == 0.5
    assert cfg.model.student_init == "teacher"
    fft = load_config(None, {"model": {"name": "m"}, "train": {"method": "fft"}})
    assert fft.train.epochs == DEFAULT_EPOCHS["fft"] == 3 and fft.train.lr == 5e-5
    lora = load_config(None, BASE)
    assert lora.train.epochs == 5 and lora.lora.target_modules == ["all-linear"] and lora.train.lr == "auto"

    paper = load_config(None, KD, preset="paper")
    assert paper.lora.target_modules is None and paper.kd.temperature == 2.0 and paper.train.epochs == 3
    assert paper.train.lr == 2e-3
    paper_lora = load_config(None, BASE, preset="paper")
    assert paper_lora.train.lr == 2e-3 and paper_lora.lora.target_modules is None
    paper_fft = load_config(None, {"model": {"name": "m"}, "train": {"method": "fft"}}, preset="paper")
    assert paper_fft.train.lr == 5e-5 and paper_fft.train.epochs == 3
    # the preset is the lowest layer: a file or a flag still wins over it
    assert load_config(None, {**KD, "kd": {"temperature": 4}}, preset="paper").kd.temperature == 4.0
    assert load_config(None, {**KD, "lora": {"target_modules": "none"}}).lora.target_modules is None
    assert build_config(KD, "default") == load_config(None, KD)


def test_unknown_preset_is_one_line():
    with pytest.raises(KdloraError, match="unknown preset 'papr'.*did you mean 'paper'"):
        load_config(None, KD, preset="papr")


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"train": {"epocs": 3}}, "unknown config key 'train.epocs' \\(did you mean 'epochs'"),
        ({"trian": {}}, "unknown config section"),
        ({"train": {"epochs": "three"}}, "train.epochs must be an integer"),
        ({"lora": {"r": 0}}, "rank"),
        ({"kd": {"alpha": 1.5}}, "alpha must be in"),
        ({"kd": {"temperature": 0}}, "temperature must be > 0"),
        ({"train": {"method": "kdlora"}}, "train.method must be one of"),
        ({"data": {"task": "colaa"}}, "unknown task 'colaa'"),
        ({"model": {"student_layers": "0,0"}}, "repeats"),
    ],
)
def test_bad_values_raise_one_line_errors(values, message):
    merged = {k: {**BASE.get(k, {}), **v} for k, v in {**BASE, **values}.items()}
    with pytest.raises(KdloraError, match=message):
        load_config(None, merged)


def test_kd_lora_needs_teacher_and_student():
    with pytest.raises(KdloraError, match="needs a teacher"):
        load_config(None, {"model": {"name": "m"}, "train": {"method": "kd-lora"}})
    with pytest.raises(KdloraError, match="needs a student"):
        load_config(None, {"model": {"teacher_model": "t"}, "train": {"method": "kd-lora"}})
    cfg = load_config(None, {"model": {"teacher_model": "t", "student_layers": "0,2"}, "train": {"method": "kd-lora"}})
    assert cfg.model.student_layers == [0, 2]


def test_bad_yaml_file(tmp_path):
    (tmp_path / "bad.yaml").write_text("train: [1, 2\n")
    with pytest.raises(KdloraError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    with pytest.raises(KdloraError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_every_field_has_help_and_one_flag_and_the_cli_has_them_all():
    import dataclasses

    from kdlora.cli import build_parser
    from kdlora.config import SECTIONS, flags

    table = flags()
    fields = [(s, f.name) for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]
    assert sorted((f.section, f.name) for f in table.values()) == sorted(fields)  # one flag per field
    assert all(f.help for f in table.values())
    assert table["--rank"].name == "r" and table["--model"].name == "name" and table["--quiet"].is_bool
    train_help = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    assert all(flag in train_help for flag in table)


def test_settings_that_leave_results_alone_are_not_compared(tmp_path):
    import yaml

    from kdlora.config import comparable
    from kdlora.rundir import same_config

    cfg = load_config(None, {"model": {"name": "m"}, "train": {"method": "lora", "output_dir": str(tmp_path)}})
    kept = comparable(cfg)
    assert "output_dir" not in kept["train"] and "save_steps" not in kept["train"] and "seed" in kept["train"]
    assert "kd" not in kept  # a lora run reads no KD setting
    stored = cfg.to_dict()
    stored["train"].update(output_dir="elsewhere", quiet=True, save_steps=7)
    del stored["lora"]["lora_dropout"]  # written by a version before the field: its default is no difference
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(stored))
    assert same_config(tmp_path, cfg)
    stored["train"]["lr"] = 1.0
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(stored))
    assert not same_config(tmp_path, cfg)


def test_sections_a_method_does_not_read_are_not_compared(tmp_path):
    """An fft teacher trained before the LoRA defaults changed is still the same teacher."""
    import yaml

    from kdlora.rundir import same_config

    cfg = load_config(None, {"model": {"name": "m"}, "train": {"method": "fft", "output_dir": str(tmp_path)}})
    stored = cfg.to_dict()
    stored["lora"]["target_modules"], stored["kd"]["temperature"] = None, 2.0
    stored["model"]["student_init"] = "pretrained"  # read only with --student-layers
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(stored))
    assert same_config(tmp_path, cfg)
    kd = load_config(None, {"model": {"teacher": "t", "student_layers": [0]}, "train": {"output_dir": str(tmp_path)}})
    stored = kd.to_dict()
    stored["lora"]["target_modules"] = None
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(stored))
    assert not same_config(tmp_path, kd)
