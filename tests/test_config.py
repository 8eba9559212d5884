import json

import pytest
import yaml

from storygpt.config import ConfigError, load_config


@pytest.fixture
def presets(repo):
    return repo / "configs"


def test_presets_load_and_carry_the_papers_values(presets):
    cfg = load_config(presets / "flintstones.yaml")
    ldm, al = cfg.char_ldm, cfg.aligner
    assert (ldm.learning_rate, ldm.batch_size, ldm.max_steps) == (1e-5, 32, 25000)
    assert (ldm.lreg_weight, ldm.p_unconditional, ldm.p_text_only) == (1e-3, 0.1, 0.1)
    assert ldm.lreg_blocks == ["down_blocks.1", "down_blocks.2", "mid_block", "up_blocks.1", "up_blocks.2"]
    assert (ldm.max_characters, ldm.trainable_vision_layers, ldm.mixed_precision) == (4, 2, "bf16")
    assert (al.visual_tokens, al.img_tokens, al.mapper_queries, al.max_length) == (4, 8, 77, 160)
    assert (al.mapper_dim, al.mapper_encoder_layers, al.mapper_decoder_layers, al.mapper_heads) == (512, 4, 4, 4)
    assert (al.learning_rate, al.warmup_steps, al.batch_size, al.max_steps) == (1e-3, 2000, 64, 20000)
    pororo = load_config(presets / "pororo.yaml")
    assert pororo.data.format == "pororo" and pororo.data.dataset == "pororo"
    assert pororo.char_ldm == cfg.char_ldm  # inherits the method values


def test_tiny_extends_flintstones_and_overrides_sizes(presets):
    tiny = load_config(presets / "tiny.yaml")
    assert tiny.preset == "tiny" and tiny.zoo is not None and tiny.data.world is not None
    assert tiny.char_ldm.resolution == 32 and tiny.char_ldm.lreg_weight == 0.01  # tiny models: see tiny.yaml
    assert tiny.train.use_gpu is False and tiny.data.dataset == "world"
    # every preset trains stage 2 at the paper's λ = 1 (storygpt/aligner/losses.py)
    assert tiny.aligner.gen_loss_weight == 1.0 and load_config(presets / "flintstones.yaml").aligner.gen_loss_weight == 1.0


def test_world_extends_tiny_at_32_px_with_latents_to_match(presets):
    """The UNet's sample size must be the resolution through the x2 VAE, or the zoo's UNet and
    the Char-LDM's latents disagree. The world preset is the quickstart trained longer."""
    world, tiny = load_config(presets / "world.yaml"), load_config(presets / "tiny.yaml")
    assert world.preset == "world" and world.char_ldm.resolution == tiny.char_ldm.resolution == 32
    for preset in (world, tiny):
        assert preset.zoo.unet_sample_size * 2 == preset.char_ldm.resolution
    assert world.char_ldm.max_steps > tiny.char_ldm.max_steps and world.aligner.max_steps > tiny.aligner.max_steps
    assert world.data.world.stories > tiny.data.world.stories  # stage 2 needs more stories than it can learn by heart
    assert world.evaluate.max_stories >= tiny.evaluate.max_stories
    assert world.models == tiny.models.model_copy() and world.evaluate.rows == tiny.evaluate.rows


def test_dotted_overrides_are_parsed_as_yaml(presets):
    cfg = load_config(presets / "tiny.yaml", ["char_ldm.learning_rate=2e-4", "train.zero_stage=3",
                                              "work_dir=/tmp/x", "data.box_source_size=[640, 480]"])
    assert cfg.char_ldm.learning_rate == 2e-4 and cfg.train.zero_stage == 3
    assert cfg.path(cfg.data.root).as_posix() == "/tmp/x/world"
    assert cfg.data.box_source_size == (640, 480)


@pytest.mark.parametrize(
    "override, key, expected",
    [
        ("char_ldm.learnig_rate=1", "char_ldm.learnig_rate", "unknown key"),
        ("bogus=1", "bogus", "unknown key"),
        ("char_ldm.batch_size=many", "char_ldm.batch_size", "valid integer"),
        ("train.zero_stage=1", "train.zero_stage", "2 or 3"),
        ("data.format=coco", "data.format", "'flintstones', 'storygptv' or 'pororo'"),
        ("char_ldm.p_unconditional=0.95", "char_ldm", "p_unconditional + p_text_only"),
        ("char_ldm.learning_rate=-1", "char_ldm.learning_rate", "greater than 0"),
        ("serve.llm.min_replicas=9", "serve.llm", "min_replicas (9) must be <= max_replicas"),
        ("precompute.pool.min_actors=99", "precompute.pool", "min_actors (99) must be <= max_actors"),
        ("char_ldm.snr_gamma=0", "char_ldm.snr_gamma", "greater than 0"),
    ],
)
def test_bad_values_name_the_key_and_what_was_expected(presets, override, key, expected):
    with pytest.raises(ConfigError) as err:
        load_config(presets / "tiny.yaml", [override])
    assert key in str(err.value) and expected in str(err.value)


def test_missing_required_key_is_named(tmp_path, presets):
    text = (presets / "flintstones.yaml").read_text().replace("  batch_size: 32\n", "", 1)
    (tmp_path / "p.yaml").write_text(text)
    with pytest.raises(ConfigError, match=r"char_ldm\.batch_size: required, missing"):
        load_config(tmp_path / "p.yaml")


def test_override_syntax_errors(presets):
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        load_config(presets / "tiny.yaml", ["char_ldm.learning_rate"])
    with pytest.raises(ConfigError, match="'preset' is a value, not a section"):
        load_config(presets / "tiny.yaml", ["preset.x=1"])


def test_missing_file_and_extends_cycle(tmp_path):
    with pytest.raises(ConfigError, match="--config: no preset file .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")


def test_missing_required_path_names_the_key(presets, tmp_path):
    cfg = load_config(presets / "flintstones.yaml", [f"work_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"models\.unet: expected an existing directory, got 'weights/"):
        cfg.require_dir("models.unet", "an SD-1.5 unet dir")
    (tmp_path / "zoo" / "unet").mkdir(parents=True)
    tiny = load_config(presets / "tiny.yaml", [f"work_dir={tmp_path}"])
    assert tiny.require_dir("models.unet") == tmp_path / "zoo" / "unet"


def test_flat_view_for_tracking(presets):
    flat = load_config(presets / "tiny.yaml").flat()
    assert flat["char_ldm.lreg_weight"] == 0.01 and flat["data.world.stories"] > 0


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_configs(presets, stage):
    ds = json.loads((presets / "deepspeed" / f"zero{stage}.json").read_text())
    assert ds["zero_optimization"]["stage"] == stage
    assert ds["train_micro_batch_size_per_gpu"] == "auto"  # filled from the preset by the job


def test_resolved_paths_are_absolute_and_pick_the_zero_stage(presets, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(presets / "tiny.yaml", ["work_dir=wd", "train.zero_stage=3"]).resolved()
    assert cfg.work_dir == str(tmp_path / "wd")
    assert cfg.models.unet == str(tmp_path / "wd" / "zoo" / "unet")
    # not in the cwd: the bundled JSON (before, a path under tmp_path that did not exist)
    assert cfg.train.deepspeed_config == str((presets / "deepspeed" / "zero3.json").resolve())
    assert cfg.preprocess.output == str(tmp_path / "wd" / "records")


def test_every_ablation_in_the_docs_is_a_valid_override_and_an_mlflow_param(repo, presets):
    """docs/configuration.md's table of the paper's ablations: each override loads on a preset,
    changes that preset's value, and is logged as the run's MLflow param under its own key."""
    import re

    from ray_jobs.tracking import run_params

    section = (repo / "docs" / "configuration.md").read_text().split("## The paper's ablations")[1].split("\n## ")[0]
    overrides = re.findall(r"`--set ([\w.]+)=([^`]+)`", section)
    keys = {key for key, _ in overrides}
    assert {"char_ldm.lreg_weight", "char_ldm.p_text_only", "char_ldm.trainable_vision_layers",
            "precompute.target", "aligner.interleave", "aligner.img_tokens", "evaluate.first_frame"} <= keys
    base = run_params(load_config(presets / "tiny.yaml"))
    for key, value in overrides:
        value = "4" if value == "R" else value  # Table 8's R: any count
        params = run_params(load_config(presets / "tiny.yaml", [f"{key}={value}"]))
        assert params[key] != base[key], key
        assert yaml.safe_load(params[key]) == yaml.safe_load(value), (key, params[key])
