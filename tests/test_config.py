import pytest

from soho_core.config import PRESETS, ConfigError, config_from_dict, load_config


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_validate_and_round_trip(name):
    cfg = load_config(name)
    assert cfg.preset == name
    assert config_from_dict(cfg.to_dict()) == cfg


def test_release_and_paper_presets_match_spec():
    r18, r101 = load_config("res18"), load_config("res101")
    assert (r18.model.backbone.depth, r18.model.dictionary.size, r18.model.fusion.num_layers) == (18, 2048, 3)
    assert (r18.model.fusion.hidden_size, r18.data.image_min, r18.data.image_max) == (768, 600, 1000)
    assert (r101.model.backbone.depth, r101.model.fusion.num_layers) == (101, 12)


def test_overrides_are_typed():
    cfg = load_config("tiny", ["optim.lr=3e-4", "train.max_steps=7", "model.dictionary.gate=false",
                               "optim.decay_steps=[10, 20]"])
    assert cfg.optim.lr == 3e-4 and cfg.train.max_steps == 7
    assert cfg.model.dictionary.gate is False and cfg.optim.decay_steps == [10, 20]


def test_unknown_key_names_field_and_lists_valid():
    with pytest.raises(ConfigError, match=r"model\.dictionary\.sizes.*valid: .*size"):
        load_config("tiny", ["model.dictionary.sizes=3"])


def test_bad_type_names_field():
    with pytest.raises(ConfigError, match=r"train\.max_steps.*int.*'many'"):
        load_config("tiny", ["train.max_steps=many"])


def test_bad_value_names_field():
    with pytest.raises(ConfigError, match=r"model\.fusion\.hidden_size"):
        load_config("tiny", ["model.fusion.hidden_size=65"])
    with pytest.raises(ConfigError, match=r"train\.precision"):
        load_config("tiny", ["train.precision=fp8"])


def test_yaml_file_with_preset_and_nested_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("preset: demo\noptim:\n  lr: 2.0e-4\ndata:\n  sentence_group: 2\n")
    cfg = load_config(str(path), ["train.seed=3"])
    assert cfg.preset == "demo" and cfg.optim.lr == 2e-4 and cfg.data.sentence_group == 2 and cfg.train.seed == 3
    path.write_text("preset: demo\noptim:\n  lrr: 1\n")
    with pytest.raises(ConfigError, match=r"optim\.lrr"):
        load_config(str(path))


def test_unknown_preset_lists_presets():
    with pytest.raises(ConfigError, match="tiny, demo, res18, res101"):
        load_config("huge")


def test_finetune_schedule_is_its_own_and_task_steps_override_max_steps():
    """Fine-tuning warms up over finetune.warmup_fraction of ITS run and decays linearly to zero,
    whatever pre-training's optim.warmup_steps; finetune.task_steps gives one task its own length."""
    from soho_core.tasks.catalog import get_task

    cfg = load_config("demo", ["optim.warmup_steps=500", "finetune.max_steps=100", "finetune.task_steps.retrieval=40"])
    vqa, retrieval = get_task("vqa"), get_task("retrieval")
    assert (vqa.max_steps(cfg), retrieval.max_steps(cfg), get_task("pretrain").max_steps(cfg)) == (100, 40, 600)
    f = vqa.lr_schedule(cfg)
    assert [f(s) for s in (0, 9, 10, 55, 99)] == pytest.approx([0.1, 1.0, 1.0, 0.5, 1 / 90])
    g = retrieval.lr_schedule(cfg)
    assert g(3) == pytest.approx(1.0) and g(39) == pytest.approx(1 / 36)
    assert get_task("pretrain").lr_schedule(cfg)(99) == pytest.approx(100 / 500)  # pre-training keeps its own
    with pytest.raises(ConfigError, match="finetune.task_steps.*vqq"):
        load_config("demo", ["finetune.task_steps.vqq=5"])
    with pytest.raises(ConfigError, match="finetune.task_steps.ve"):
        load_config("demo", ["finetune.task_steps.ve=0"])
