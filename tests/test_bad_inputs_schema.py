"""Issue 14, section 2: one validated schema for every knob (diffctl/schema/).

The walk composes every command with every choice of every config group it uses (and every experiment
preset), then feeds each key of the schema a value of the wrong type and one out of its range or
choices: one line `error: <key> must be ..., got ...`, exit 1, no traceback. A key added to conf/ without
a schema entry fails test_every_composed_key_has_a_schema_entry. The walk runs in-process (a CLI process
per key would take ~3 s each); a handful of the issue's cases run the real CLI end to end."""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch
from helpers import run_cli, tiny_overrides
from omegaconf import OmegaConf

from diffctl.cli import SUBCOMMANDS, config_dir, config_groups
from diffctl.config import compose_config
from diffctl.errors import ConfigError
from diffctl.reporting import user_errors
from diffctl.schema import SCHEMAS, ByTarget, Passthrough, Rule, SamplerNode, validate
from diffctl.schema.keys import plain
from diffctl.samplers import SAMPLERS

COMMANDS = [config for _, config, _ in SUBCOMMANDS.values()]
EXTRA = {"data=imagefolder": ["data.root=/nonexistent/images"]}  # its root is required (???)


def _groups_of(command: str) -> list[str]:
    """The config groups a command's defaults list selects (group=choice works for those)."""
    defaults = OmegaConf.to_container(OmegaConf.load(config_dir() / f"{command}.yaml")).get("defaults", [])
    return [next(iter(d)) for d in defaults if isinstance(d, dict)]


def _variants() -> list[tuple[str, list[str]]]:
    out = []
    for command in COMMANDS:
        out.append((command, []))
        for entry in _groups_of(command):  # a group placed elsewhere (metrics@_global_) is chosen by its entry
            group = entry.split("@")[0]
            for choice in config_groups()[group]:
                override = f"{entry}={choice}"
                out.append((command, [override, *EXTRA.get(override, [])]))
                if group == "sde" and "model" in _groups_of(command) and command != "train":
                    out[-1][1].insert(0, "model=gmm")  # sde= goes with the analytic model outside train
    return out


VARIANTS = _variants()


@pytest.fixture(scope="module")
def composed(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    return [(command, overrides, plain(compose_config(command, overrides, run_dir))) for command, overrides in VARIANTS]


def _leaves(data, schema, prefix=""):
    """(key, rule, path) of every leaf of `data` the schema declares; AssertionError for one it does not.
    A Passthrough's declared keys only: a shipped key must have its own rule, not just be a Trainer argument."""
    if isinstance(schema, Rule):
        yield prefix, schema
        return
    if isinstance(schema, SamplerNode):
        yield prefix, schema
        if isinstance(data, dict):
            rules = SAMPLERS[data["name"]].rules
            for key in data:
                if key != "name":
                    assert key in rules, f"{prefix}.{key}: sampler option without a rule"
                    yield f"{prefix}.{key}", rules[key]
        return
    if isinstance(schema, ByTarget):
        if data is None or data == {}:
            assert schema.null, f"{prefix} is null or empty but not null-able"
            return
        assert data["_target_"] in schema.variants, f"{prefix}._target_={data['_target_']}: no schema for this class"
        schema = schema.variants[data["_target_"]]
    if isinstance(schema, Passthrough):
        schema = schema.keys
    assert isinstance(data, dict), prefix
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else key
        assert key in schema, f"{full}: no schema entry (diffctl/schema/keys.py)"
        yield from _leaves(value, schema[key], full)


def _set(data: dict, key: str, value) -> dict:
    data = copy.deepcopy(data)
    *parents, last = key.split(".")
    node = data
    for part in parents:
        if isinstance(node.get(part), str):  # sample_grid.sampler given as a name
            node[part] = {"name": node[part]}
        node = node[part]
    node[last] = value
    return data


def _examples(rule):
    if isinstance(rule, SamplerNode):
        return [5, "not-a-sampler"]
    return [*rule.wrong_types(), *rule.out_of_range()]


def test_every_composed_key_has_a_schema_entry(composed):
    for command, overrides, data in composed:
        keys = [key for key, _ in _leaves(data, SCHEMAS[command]())]
        assert len(keys) > 3, (command, overrides)
        validate(data, command)  # the shipped configs themselves are valid (their samplers too)
    # every option of every sampler has a rule: register_sampler refuses one without (tests/test_sampler_registry.py)


def test_every_key_refuses_a_wrong_type_and_an_out_of_range_value(composed, capsys):
    seen, checked = set(), 0
    for command, overrides, data in composed:
        for key, rule in _leaves(data, SCHEMAS[command]()):
            if (command, key, id(rule)) in seen:
                continue
            seen.add((command, key, id(rule)))
            for bad in _examples(rule):
                task = user_errors(lambda cfg, command=command: validate(cfg, command))
                with pytest.raises(SystemExit) as exit_info:
                    task(_set(data, key, bad))
                err = capsys.readouterr().err
                where = (command, overrides, key, bad, err)
                assert exit_info.value.code == 1, where
                assert "Traceback" not in err and len(err.strip().splitlines()) == 1, where
                assert re.match(rf"error: {re.escape(key)}(=\S+ has no option| must be .*, got )", err), where
                checked += 1
    assert len({k for _, k, _ in seen}) > 150 and checked > 300, (len(seen), checked)


def test_unknown_keys_are_refused_with_close_matches_and_trainer_arguments_pass_on(tmp_path):
    cfg = compose_config("train", ["+optim.betaz=[0.9,0.99]"], tmp_path)
    with pytest.raises(ConfigError, match=r"^optim.betaz: no such config key of diffctl train; close matches: optim.betas"):
        validate(cfg, "train")
    validate(compose_config("train", ["+trainer.profiler=simple"], tmp_path), "train")  # a Lightning Trainer argument
    with pytest.raises(ConfigError, match="trainer.profilr: no such config key.*close matches: trainer.profiler"):
        validate(compose_config("train", ["+trainer.profilr=simple"], tmp_path), "train")
    with pytest.raises(ConfigError, match="sampler=ddim has no option snr"):
        validate(compose_config("sample", ["sampler=ddim", "+sampler.snr=0.1"], tmp_path), "sample")


ISSUE_CASES = [  # the issue's list, in-process through each command's real entry function
    ("train", ["optim.lr=-1"], "optim.lr must be > 0, got -1"),
    ("train", ["optim.betas=[1.5,0.9]"], "optim.betas must be a list of two numbers in [0, 1), got [1.5, 0.9]"),
    ("train", ["optim.name=sgd"], "optim.name must be one of adam, adamw, got 'sgd'"),
    ("train", ["seed=abc"], "seed must be an integer in [0, 4294967295], got 'abc'"),
    ("train", ["trainer.accumulate_grad_batches=0"], "trainer.accumulate_grad_batches must be a positive integer, got 0"),
    ("train", ["ema.decay=1.5"], "ema.decay must be in [0, 1)"),
    ("train", ["label_dropout=2"], "label_dropout must be in [0, 1)"),
    ("train", ["trainer.max_steps=abc"], "trainer.max_steps must be a positive integer, got 'abc'"),
    ("train", ["sample_grid.sampler={name:ddim,eta:nan}"], "sample_grid.sampler.eta must be a finite number in [0, 1]"),
    ("sample", ["model=gmm", "guidance=abc"], "guidance must be a number >= 0 (1 = no guidance), got 'abc'"),
    ("sample", ["model=gmm", "guidance=inf"], "guidance must be a finite number >= 0 (1 = no guidance), got inf"),
    ("sample", ["model=gmm", "model.means=[[0,nan]]"], "model.means must be a K x D list (nested lists of finite numbers)"),
    ("likelihood", ["model=gmm", "rtol=-inf"], "rtol must be a finite number > 0"),
    ("fid_stats", ["metrics.batch_size=0"], "metrics.batch_size must be a positive integer, got 0"),
    ("export", ["use_ema=maybe"], "use_ema must be true or false, got 'maybe'"),
]


def _run_task(command, overrides, run_dir, capsys):
    task = SUBCOMMANDS[next(k for k, v in SUBCOMMANDS.items() if v[1] == command)][0]
    cfg = compose_config(command, overrides, run_dir)
    with pytest.raises(SystemExit) as exit_info:
        user_errors(task)(cfg)
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("command,overrides,message", ISSUE_CASES, ids=[" ".join(c[1]) for c in ISSUE_CASES])
def test_issue_cases_stop_each_command_before_any_work(command, overrides, message, tmp_path, capsys):
    code, err = _run_task(command, overrides, tmp_path / "run", capsys)
    assert code == 1 and err.startswith(f"error: {message}") and len(err.strip().splitlines()) == 1, err
    assert not [p for p in tmp_path.rglob("*") if p.suffix in (".ckpt", ".npz", ".json", ".png", ".safetensors")]


def test_lightning_refusing_a_trainer_argument_is_one_line_naming_the_key(tmp_path, capsys):
    code, err = _run_task("train", [*tiny_overrides(), "+trainer.profiler=bogus"], tmp_path / "run", capsys)
    assert code == 1 and err.startswith("error: trainer.profiler='bogus': refused by lightning.pytorch.Trainer: "), err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_resume_validates_the_model_keys_it_takes_from_the_checkpoint(trained, tmp_path, capsys):
    _, run = trained
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    ckpt["hyper_parameters"]["config"]["label_dropout"] = 2.0  # a hand-edited (or foreign) checkpoint
    torch.save(ckpt, tmp_path / "edited.ckpt")
    code, err = _run_task("train", [*tiny_overrides(), f"resume={tmp_path / 'edited.ckpt'}"], tmp_path / "run", capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: label_dropout must be in [0, 1) (1 would drop every label), got 2.0 (in the config of "), err


def test_non_finite_samples_stop_the_run_before_anything_is_written(tmp_path, capsys):
    # finite inputs whose guided update overflows: before the check this wrote samples.npz and exited 0
    overrides = ["model=gmm", "model.conditional=true", "guidance=1e300", "num_samples=4", "steps=2", "progress_bar=false"]
    code, err = _run_task("sample", overrides, tmp_path / "run", capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert "produced non-finite values (nan/inf) in 4 of 4 samples" in err
    assert not (tmp_path / "run" / "samples.npz").exists() and not (tmp_path / "run" / "metrics.json").exists()


def test_non_finite_mixture_file_and_reference_statistics_name_the_file_and_the_array(tmp_path):
    from diffctl.metrics import reference
    from diffctl.networks.gmm import GaussianMixture

    (tmp_path / "mix.yaml").write_text("means: [[0, 0], [1, 1]]\nweights: [1, .nan]\n")
    with pytest.raises(ConfigError, match=rf"^weights in model.file {re.escape(str(tmp_path))}/mix.yaml must be .*finite.*, got \[1, nan\]"):
        GaussianMixture.from_config({"file": str(tmp_path / "mix.yaml")})
    (tmp_path / "mix.json").write_text('{"means": [[0, 0]], "scales": Infinity}')
    with pytest.raises(ConfigError, match="scales in model.file .*mix.json must be .*got inf"):
        GaussianMixture.from_config({"file": str(tmp_path / "mix.json")})
    np.savez(tmp_path / "ref.npz", mu=np.array([0.0, np.inf]), sigma=np.eye(2))
    cfg = OmegaConf.load(config_dir() / "metrics" / "default.yaml")
    with pytest.raises(ConfigError, match=r"ref.npz: the array mu has 1 non-finite values \(nan/inf\)"):
        reference(cfg, tmp_path / "ref.npz", None, torch.device("cpu"))
    np.savez(tmp_path / "ref.npz", mu=np.zeros(2), sigma=np.full((2, 2), np.nan))
    with pytest.raises(ConfigError, match=r"ref.npz: the array sigma has 4 non-finite values"):
        reference(cfg, tmp_path / "ref.npz", None, torch.device("cpu"))


CLI_CASES = [  # end to end: the real console script, as a user types it (~8 s each: two; the rest in-process above)
    (["train", "optim.betas=[1.5,0.9]"], "error: optim.betas must be a list of two numbers in [0, 1), got [1.5, 0.9]"),
    (["sample", "model=gmm", "guidance=inf"], "error: guidance must be a finite number >= 0 (1 = no guidance), got inf"),
]


@pytest.mark.parametrize("args,line", CLI_CASES, ids=[c[0][-1] for c in CLI_CASES])
def test_cli_prints_the_schema_error_as_one_line(args, line, tmp_path):
    out = run_cli([*args, f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert out.returncode == 1 and out.stderr.strip() == line, (out.returncode, out.stderr[-2000:])
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "samples.npz").exists()
