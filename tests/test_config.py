import pytest

from kdlora.config import DEFAULT_LR, load_config
from kdlora.errors import KdloraError

BASE = {"model": {"name": "m"}, "train": {"method": "lora"}}


def test_precedence_defaults_yaml_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {name: m}\ntrain: {method: lora, epochs: 7, lr: 0.001}\nlora: {r: 4}\n")
    cfg = load_config(path, {"train": {"epochs": "2"}, "lora": {"target_modules": "query,key"}})
    assert cfg.train.epochs == 2 and cfg.train.lr == 0.001 and cfg.lora.r == 4
    assert cfg.lora.target_modules == ["query", "key"] and cfg.kd.alpha == 0.5 and cfg.kd.temperature == 2.0


def test_method_default_lr():
    assert load_config(None, BASE).train.lr == DEFAULT_LR["lora"]
    assert load_config(None, {"model": {"name": "m"}, "train": {"method": "fft"}}).train.lr == DEFAULT_LR["fft"]


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
