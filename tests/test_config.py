"""RunConfig: every section, nested ones included, is checked when a config is built, and the
error names the full key path."""

import pytest
import torch
import yaml

from bdgf.config import ConfigError, RunConfig


def _error(overrides: dict) -> str:
    with pytest.raises(ConfigError) as info:
        RunConfig().with_overrides(overrides)
    return str(info.value)


def test_default_is_valid_and_round_trips(tmp_path):
    cfg = RunConfig()
    cfg.validate()
    assert RunConfig.from_dict(cfg.to_dict()) == cfg
    path = tmp_path / "config.yaml"
    cfg.save(path)
    assert RunConfig.load(path) == cfg


def test_yaml_round_trip_keeps_nested_sections(tmp_path):
    cfg = RunConfig().with_overrides({
        "pretrain.unet": {"base_channels": 8, "channel_mults": [1, 2], "feature_levels": [0, 1, 1]},
        "pretrain.tile_size": 16,
        "train.model.cnn.width": 16,  # a sub-section the defaults do not have
        "train.model.mamba.d_state": 4,
        "train.mutual.tau": 1.5,
        "train.branches": ["cnn", "mamba"],
    })
    assert cfg.train.model == {"mamba": {"d_model": 32, "d_state": 4, "n_layers": 1}, "cnn": {"width": 16}}
    path = tmp_path / "config.yaml"
    cfg.save(path)
    again = RunConfig.load(path)
    assert again == cfg
    assert again.to_dict() == yaml.safe_load(path.read_text())


def test_validation_leaves_the_global_rng_alone():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    RunConfig().with_overrides({"train.epochs": 2})
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("overrides, path_and_text", [
    # typos
    ({"pretrain.unet.base_channel": 16}, "pretrain.unet: unknown key(s) ['base_channel']"),
    ({"pretrain.schedule.num_timestep": 10}, "pretrain.schedule: unknown key(s) ['num_timestep']"),
    ({"pretrain.masking.warmup": 10}, "pretrain.masking: unknown key(s) ['warmup']"),
    ({"train.model.mamba.d_stat": 4}, "train.model.mamba: unknown key(s) ['d_stat']"),
    ({"train.model.cnn.widht": 4}, "train.model.cnn: unknown key(s) ['widht']"),
    ({"train.model.transformer.head": 2}, "train.model.transformer: unknown key(s) ['head']"),
    ({"train.model.transformr.dim": 16}, "train.model: unknown key(s) ['transformr']"),
    ({"train.mutual.lambda_k": 1.0}, "train.mutual: unknown key(s) ['lambda_k']"),
    ({"train.epoch": 3}, "train: unknown key(s) ['epoch']"),
])
def test_unknown_keys_name_their_path(overrides, path_and_text):
    message = _error(overrides)
    assert message.startswith(f"overrides: {path_and_text}; known: [")


@pytest.mark.parametrize("overrides, start", [
    # values the owners reject
    ({"pretrain.unet.base_channels": 15}, "overrides: pretrain.unet: base_channels must be even"),
    ({"pretrain.unet.feature_levels": [0, 1, 3]}, "overrides: pretrain.unet: feature level high=3 outside 0..2"),
    ({"pretrain.schedule.kind": "quadratic"}, "overrides: pretrain.schedule: schedule kind must be"),
    ({"pretrain.masking.p0": 2.0}, "overrides: pretrain.masking: need 0 <= p_min <= p0 <= p_max <= 1"),
    ({"train.model.mamba.d_model": 30}, "overrides: train.model.mamba: Mamba branch: d_model 30 is not divisible"),
    ({"train.model.transformer.dim": 30}, "overrides: train.model.transformer: attention: dim 30 is not divisible"),
    ({"train.model.cnn.num_blocks": 5}, "overrides: train.model.cnn: CNN branch: patch_size 11 is too small"),
    ({"train.mutual.tau": 0}, "overrides: train.mutual: tau must be > 0"),
    ({"train.mutual.kl_direction": "both"}, "overrides: train.mutual: kl_direction must be"),
    # sizes the owners do not check
    ({"pretrain.unet.base_channels": 0}, "overrides: pretrain.unet.base_channels must be an integer >= 1, got 0"),
    ({"pretrain.unet.channel_mults": [1, 0]}, "overrides: pretrain.unet.channel_mults must be integers >= 1"),
    ({"pretrain.unet.dropout": 1.0}, "overrides: pretrain.unet.dropout must be in [0, 1)"),
    ({"train.model.mamba.d_state": 0}, "overrides: train.model.mamba.d_state must be an integer >= 1, got 0"),
    ({"train.model.cnn.width": 0}, "overrides: train.model.cnn.width must be an integer >= 1, got 0"),
    ({"train.model.transformer.heads": 0}, "overrides: train.model.transformer.heads must be an integer >= 1"),
    ({"train.mutual.proj_dim": 0}, "overrides: train.mutual.proj_dim must be an integer >= 1, got 0"),
    ({"train.mutual.lambda_kl": -1.0}, "overrides: train.mutual.lambda_kl must be a number >= 0"),
    # types
    ({"train.model.mamba.d_state": "8"}, "overrides: train.model.mamba.d_state must be an integer, got '8'"),
    ({"train.model.mamba.dt_rank": "auto"}, "overrides: train.model.mamba.dt_rank must be an integer or null"),
    ({"pretrain.masking.mode": 3}, "overrides: pretrain.masking.mode must be a string, got 3"),
    ({"features.absent_variants": "no"}, "overrides: features.absent_variants must be true or false"),
    ({"train.mutual.tau": "1e-3"}, "overrides: train.mutual.tau must be a number, got '1e-3' (YAML reads"),
    ({"train.lr": "1e-3"}, "overrides: train.lr must be a number, got '1e-3'"),
    ({"features.timesteps": ["5"]}, "overrides: features.timesteps must be a list of integers"),
    ({"train.model.mamba": 3}, "overrides: train.model.mamba must be a mapping, got 3"),
    ({"train.mutual": [1]}, "overrides: train.mutual must be a mapping, got [1]"),
    # keys a run sets itself
    ({"pretrain.unet.in_channels": 3}, "overrides: pretrain.unet: ['in_channels'] cannot be set here"),
    ({"train.model.patch_size": 7}, "overrides: train.model: ['patch_size'] cannot be set here (patch_size is set by "
                                    "train.patch_size)"),
    # one section against another
    ({"pretrain.tile_size": 30}, "overrides: pretrain.tile_size 30 must be a multiple of 4"),
    ({"features.halo": 16}, "overrides: features.halo 16 must be a multiple of 4 and at least the denoiser's "
                            "receptive radius 28"),
    ({"features.halo": 30}, "overrides: features.halo 30 must be a multiple of 4"),
    ({"features.tile_size": 30}, "overrides: features.tile_size 30 must be a multiple of 4"),
    ({"pretrain.min_valid_fraction": 1.5}, "overrides: pretrain.min_valid_fraction must be in [0, 1]"),
    ({"train.modality_dropout": 1.0}, "overrides: train.modality_dropout must be in [0, 1)"),
])
def test_bad_values_name_their_path(overrides, start):
    assert _error(overrides).startswith(start)


def test_branch_checks_follow_the_configured_branches():
    # d_model 30 is only a problem when the mamba branch is built
    cfg = RunConfig().with_overrides({"train.model.mamba.d_model": 30, "train.branches": ["cnn", "transformer"]})
    assert cfg.train.model["mamba"]["d_model"] == 30
    # the CNN's block count is checked against this config's patch size
    RunConfig().with_overrides({"train.model.cnn.num_blocks": 5, "train.patch_size": 13})


def test_dotted_overrides_are_validated_and_applied():
    cfg = RunConfig().with_overrides({"train.model.mamba.d_state": 4, "pretrain.unet.base_channels": 16})
    assert cfg.train.model["mamba"] == {"d_model": 32, "d_state": 4, "n_layers": 1}
    assert cfg.pretrain.unet == {"base_channels": 16, "channel_mults": [1, 2, 2]}
    assert "train.model.mamba.d_state must be an integer >= 1" in _error({"train.model.mamba.d_state": 0})
    assert _error({"trian.epochs": 3}) == "override 'trian.epochs': no section 'trian'"
    assert _error({"train.epochs.x": 3}) == "override 'train.epochs.x': no section 'epochs'"
    assert _error({"train.foo.x": 3}) == "override 'train.foo.x': no section 'foo'"


def test_load_names_the_file_and_path(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"train": {"model": {"mamba": {"d_stat": 4}}}}))
    with pytest.raises(ConfigError, match=r"config\.yaml: train\.model\.mamba: unknown key\(s\) \['d_stat'\]"):
        RunConfig.load(path)
    path.write_text("pretrain:\n  unet:\n    base_channels: 15\n")
    with pytest.raises(ConfigError, match=r"config\.yaml: pretrain\.unet: base_channels must be even"):
        RunConfig.load(path)
    path.write_text("train:\n  mutual:\n    tau: -1.0\n")
    with pytest.raises(ConfigError, match=r"config\.yaml: train\.mutual: tau must be > 0"):
        RunConfig.load(path)


def test_from_dict_checks_nested_sections():
    with pytest.raises(ConfigError, match=r"^config: train\.model\.cnn\.low_width must be an integer >= 1"):
        RunConfig.from_dict({"train": {"model": {"cnn": {"low_width": -2}}}})
    with pytest.raises(ConfigError, match=r"^run: pretrain\.unet: unknown key\(s\) \['channels'\]"):
        RunConfig.from_dict({"pretrain": {"unet": {"channels": 8}}}, where="run")
