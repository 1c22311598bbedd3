import pytest
import yaml

from nla.core.config import ConfigError, NLAConfig, from_flat_dict, load_yaml, parse_config, valid_keys


def test_yaml_then_cli_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(f"ar_lr: 0.001\nlayer: 3\noutput_dir: {tmp_path}\n")
    cfg, _ = parse_config(["--config", str(path), "--layer", "5", "--report_to", "none"])
    assert cfg.ar.ar_lr == 0.001  # from YAML
    assert cfg.model.layer == 5  # CLI wins over YAML
    assert cfg.logging.report_to == "none"
    assert cfg.av.av_lr == NLAConfig().av.av_lr  # untouched default


def test_unknown_yaml_key_names_key_and_suggests(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("ar_lrr: 1\n")
    with pytest.raises(ConfigError) as err:
        load_yaml(path)
    assert "'ar_lrr'" in str(err.value) and "Did you mean 'ar_lr'" in str(err.value)
    assert "av_steps" in str(err.value)  # lists the valid keys


def test_unknown_cli_flag_rejected():
    with pytest.raises(ConfigError, match="'bogus'"):
        parse_config(["--bogus", "1"])


def test_no_prefix_turns_off_a_boolean_as_help_shows_it():
    """`--help` lists `--no_paraphrase_control` for a boolean that defaults to true; it must parse."""
    from nla.stages.evaluate import EvalArgs

    on = parse_config(["--config", "configs/smoke.yaml"], extra=[EvalArgs])[1][0]
    off = parse_config(["--config", "configs/smoke.yaml", "--no_paraphrase_control"], extra=[EvalArgs])[1][0]
    assert on.paraphrase_control is True and off.paraphrase_control is False
    with pytest.raises(ConfigError, match="'no_ar_steps'"):  # only booleans have a `no_` form
        parse_config(["--no_ar_steps"])


def test_validation_gives_fix():
    with pytest.raises(ConfigError, match="neg_mse"):
        parse_config(["--rl_reward", "mse"])
    with pytest.raises(ConfigError, match="group_size"):
        from_flat_dict({"rl_group_size": 1})
    with pytest.raises(ConfigError, match="split_fractions"):
        from_flat_dict({"split_fractions": "0.5,0.5"})


def test_saved_config_round_trips(tmp_path):
    cfg = from_flat_dict({"ar_lr": 3e-4, "layer": 7, "output_dir": str(tmp_path)})
    saved = cfg.save(tmp_path)
    assert set(yaml.safe_load(saved.read_text())) == set(valid_keys())
    again, _ = parse_config(["--config", str(saved)])
    assert again.to_dict() == cfg.to_dict()


@pytest.mark.parametrize("name", ["embedded.yaml", "embedded-long.yaml", "embedded-cross.yaml", "smoke.yaml"])
def test_shipped_configs_parse(name):
    cfg, _ = parse_config(["--config", f"configs/{name}"])
    assert cfg.model.model


def test_the_cross_config_is_the_demo_s_with_model_b_paired_in():
    demo, _ = parse_config(["--config", "configs/embedded.yaml"])
    cross, _ = parse_config(["--config", "configs/embedded-cross.yaml"])
    differ = {
        (section, key)
        for section, values in cross.to_dict().items()
        for key, value in (values.items() if isinstance(values, dict) else [])
        if demo.to_dict()[section][key] != value
    }
    assert {key for _, key in differ} == {"output_dir", "paired_model", "paired_layer"}


def test_keys_unique_across_sections():
    keys = valid_keys()
    assert len(keys) == len(set(keys))


@pytest.mark.parametrize(
    "flag",
    [
        "--ar_save_every",
        "--ar_eval_every",
        "--av_eval_every",
        "--av_save_every",
        "--rl_save_every",
        "--log_every",
        "--ar_grad_accum",
    ],
)
def test_zero_intervals_are_config_errors(flag):
    with pytest.raises(ConfigError, match=f"{flag[2:]}=0: must be >= 1"):
        parse_config(["--config", "configs/smoke.yaml", flag, "0"])


def test_api_key_pasted_as_variable_name_is_refused_without_echo(tmp_path, capsys):
    from nla.cli import main

    secret = "sk-proj-abc123DEF456"
    code = main(
        [
            "datagen",
            "--config",
            "configs/smoke.yaml",
            "--output_dir",
            str(tmp_path),
            "--teacher",
            "openai",
            "--teacher_api_key_env",
            secret,
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "NAME of an environment variable" in err and secret not in err
    assert not list(tmp_path.rglob("config.yaml"))  # nothing written that could hold it
    assert parse_config(["--config", "configs/smoke.yaml"])[0].teacher.teacher_api_key_env == ""  # no key unless named


def test_wandb_goes_online_only_when_asked(monkeypatch):
    from nla.core.tracking import resolve_wandb_mode

    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)  # stored credentials alone
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert resolve_wandb_mode(None) == "offline"
    monkeypatch.setenv("WANDB_MODE", "online")
    assert resolve_wandb_mode(None) == "online" and resolve_wandb_mode("disabled") == "disabled"


def test_plain_http_teacher_to_another_host_is_warned():
    from nla.data.teacher import OpenAITeacher

    with pytest.warns(UserWarning, match="plain http to another host"):
        OpenAITeacher("http://teacher.example.org/v1", "m", api_key="k")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        OpenAITeacher("http://localhost:8000/v1", "m", api_key="k")
        OpenAITeacher("https://teacher.example.org/v1", "m", api_key="k")


def test_old_option_names_still_work_and_warn_once(tmp_path, capsys):
    from nla.core import config

    config._warned.clear()
    path = tmp_path / "old.yaml"
    path.write_text("group_size: 6\nmax_response_tokens: 40\n")
    cfg, _ = parse_config(["--config", str(path), "--kl_coef", "0.2", "--temperature=0.5", "--av", "x/av"])
    assert (cfg.rl.rl_group_size, cfg.rl.rl_max_new_tokens, cfg.rl.rl_kl_coef) == (6, 40, 0.2)
    assert cfg.rl.rl_temperature == 0.5 and cfg.av.av_checkpoint == "x/av"
    parse_config(["--kl_coef", "0.3"])
    err = capsys.readouterr().err
    assert err.count("'kl_coef' is now 'rl_kl_coef'") == 1 and "'av' is now 'av_checkpoint'" in err
    assert from_flat_dict({"max_new_tokens": 12}).av.av_max_new_tokens == 12  # a run's old config.yaml
    with pytest.raises(ConfigError, match="sets both 'group_size' and its new name 'rl_group_size'"):
        from_flat_dict({"group_size": 4, "rl_group_size": 8})
    assert all(new in config.valid_keys() for new in config.ALIASES.values())
    assert not set(config.ALIASES) & set(config.valid_keys())  # an old name is never also a current one
