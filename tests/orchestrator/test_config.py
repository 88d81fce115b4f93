"""RunConfig: every section's validation errors, overrides, YAML loading, and every file in configs/."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from orchestrator.config import RunConfig, apply_override, describe_errors

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def errors_of(data: dict) -> list[str]:
    with pytest.raises(ValidationError) as info:
        RunConfig.model_validate(data)
    return describe_errors(info.value)


def test_defaults_are_valid_and_the_window_follows_the_depth():
    config = RunConfig()
    assert config.model.source == "zoo:tiny_mlp" and config.input.kind == "synthetic"
    assert config.inflight_per_worker == config.pipeline.depth + 1
    assert RunConfig.model_validate({"dispatch": {"inflight_per_worker": 9}}).inflight_per_worker == 9


# (section data, the dotted path that must be named, a word of the reason)
BAD_FIELDS = [
    ({"model": {"source": "zoo:resnet51"}}, "model.source", "zoo:resnet50"),
    ({"model": {"source": "resnet50"}}, "model.source", "package.module:factory"),
    ({"model": {"dtype": "int8"}}, "model.dtype", "bfloat16"),
    ({"model": {"seed": "abc"}}, "model.seed", "integer"),
    ({"model": {"input_shape": "16"}}, "model.input_shape", "tuple"),
    ({"model": {"input_shape": [3, -1]}}, "model.input_shape.1", "greater than 0"),
    ({"model": {"input_dtype": "floaty"}}, "model.input_dtype", "not a numpy dtype"),
    ({"model": {"postprocess": "argmx"}}, "model.postprocess", "'topkK'"),
    ({"models": [{"name": "a", "postprocess": "topk0"}]}, "models.0.postprocess", "unknown postprocess 'topk0'"),
    ({"cluster": {"num_workers": 0}}, "cluster.num_workers", "greater than or equal to 1"),
    ({"cluster": {"gpus_per_worker": 1.5}}, "cluster.gpus_per_worker", "less than or equal to 1"),
    ({"cluster": {"worker_start_timeout_s": 0}}, "cluster.worker_start_timeout_s", "greater than 0"),
    ({"cluster": {"max_worker_restarts": -1}}, "cluster.max_worker_restarts", "greater than or equal to 0"),
    ({"pipeline": {"depth": 17}}, "pipeline.depth", "less than or equal to 16"),
    ({"pipeline": {"staging_threads": 0}}, "pipeline.staging_threads", "greater than or equal to 1"),
    ({"pipeline": {"timing_every": -1}}, "pipeline.timing_every", "greater than or equal to 0"),
    ({"pipeline": {"check_finite": "maybe"}}, "pipeline.check_finite", "boolean"),
    ({"pipeline": {"graphs": {"enabled": "yes please"}}}, "pipeline.graphs.enabled", "boolean"),
    ({"pipeline": {"graphs": {"buckets": [1, 0, 4]}}}, "pipeline.graphs.buckets.1", "greater than or equal to 1"),
    ({"pipeline": {"graphs": {"buckets": []}}}, "pipeline.graphs.buckets", "at least 1 item"),
    ({"pipeline": {"graphs": {"buckets": [8, 512]}}}, "pipeline.graphs.buckets", "pipeline.max_batch_rows=256"),
    ({"pipeline": {"graphs": {"capture": "lazily"}}}, "pipeline.graphs.capture", "'first_use'"),
    ({"pipeline": {"graphs": {"warmup_iters": 0}}}, "pipeline.graphs.warmup_iters", "greater than or equal to 1"),
    ({"dispatch": {"batch_rows": 0}}, "dispatch.batch_rows", "greater than or equal to 1"),
    ({"dispatch": {"batch_rows": 512}}, "dispatch.batch_rows", "pipeline.max_batch_rows=256"),
    ({"dispatch": {"reorder_window": 0}}, "dispatch.reorder_window", "greater than or equal to 1"),
    ({"dispatch": {"batch_timeout_s": 0}}, "dispatch.batch_timeout_s", "greater than 0"),
    ({"errors": {"on_error": "ignore"}}, "errors.on_error", "'retry'"),
    ({"errors": {"max_retries": -1}}, "errors.max_retries", "greater than or equal to 0"),
    ({"input": {"kind": "npy"}}, "input.path", "required"),
    ({"input": {"kind": "csv", "path": "x.csv"}}, "input.kind", "'parquet'"),
    ({"input": {"path": "x.csv"}}, "input.path", "set input.kind"),
    ({"input": {"kind": "synthetic", "path": "x.npy"}}, "input.path", "'synthetic'"),
    ({"input": {"path": "x.npy", "column": "a"}}, "input.column", "only read for parquet"),
    ({"input": {"rows": 0}}, "input.rows", "greater than or equal to 1"),
    ({"output": {"path": "out.csv"}}, "output.path", ".npy or .parquet"),
    ({"metrics": {"log_every_s": -1}}, "metrics.log_every_s", "greater than or equal to 0"),
    ({"decode": {}}, "decode.max_new_tokens", "required"),
    ({"decode": {"max_new_tokens": 0}}, "decode.max_new_tokens", "greater than or equal to 1"),
    ({"decode": {"max_new_tokens": 8, "eos_token_id": -1}}, "decode.eos_token_id", "greater than or equal to 0"),
    ({"decode": {"max_new_tokens": 8, "loop": "fast"}}, "decode.loop", "'interleaved'"),
    ({"decode": {"max_new_tokens": 8, "max_seq_len": 1}}, "decode.max_seq_len", "greater than or equal to 2"),
    ({"decode": {"max_new_tokens": 8, "temperature": -0.5}}, "decode.temperature", "greater than or equal to 0"),
    ({"faults": {"worker-0": {"delay_s": -1}}}, "faults.worker-0.delay_s", "greater than or equal to 0"),
    ({"faults": {"worker-0": {"raise_on_batches": "0"}}}, "faults.worker-0.raise_on_batches", "list"),
    ({"faults": {"worker-0": {"exit_after_batches": -1}}}, "faults.worker-0.exit_after_batches", "greater than"),
]


@pytest.mark.parametrize(("data", "path", "why"), BAD_FIELDS,
                         ids=[f"{path}-{i}" for i, (_, path, _) in enumerate(BAD_FIELDS)])
def test_each_bad_field_is_named_with_its_path_and_why(data, path, why):
    lines = errors_of(data)
    assert len(lines) == 1, lines
    assert path in lines[0] and why in lines[0], lines[0]


SECTIONS = ["model", "cluster", "pipeline", "pipeline.graphs", "dispatch", "errors", "input", "output", "metrics",
            "decode"]


@pytest.mark.parametrize("section", SECTIONS + ["faults.worker-0"])
def test_unknown_fields_are_errors_in_every_section(section):
    data: dict = {}
    node = data
    for part in section.split("."):
        node = node.setdefault(part, {})
    if section == "decode":
        node["max_new_tokens"] = 8
    node["no_such_field"] = 1
    (line,) = errors_of(data)
    assert line.startswith(f"{section}.no_such_field: unknown field; known: "), line


def test_an_unknown_section_is_an_error():
    (line,) = errors_of({"pipelines": {"depth": 4}})
    assert line.startswith("pipelines: unknown field (did you mean 'pipeline'?)"), line


def test_a_typo_names_the_field_it_was_meant_to_be():
    (line,) = errors_of({"pipeline": {"depht": 4}})
    assert "pipeline.depht: unknown field (did you mean 'depth'?)" in line


def test_every_bad_field_is_reported_at_once():
    lines = errors_of({"model": {"dtype": "int8"}, "pipeline": {"depth": 0, "colour": "red"},
                       "errors": {"on_error": "ignore"}, "faults": {"worker-1": {"delay_s": -2}}})
    named = " ".join(lines)
    for path in ("model.dtype", "pipeline.depth", "pipeline.colour", "errors.on_error", "faults.worker-1.delay_s"):
        assert path in named
    assert len(lines) == 5


def test_the_given_value_is_shown():
    (line,) = errors_of({"pipeline": {"depth": 99}})
    assert line == "pipeline.depth: Input should be less than or equal to 16 (got 99)"


def test_config_is_frozen():
    config = RunConfig()
    with pytest.raises(ValidationError):
        config.pipeline.depth = 5


def test_input_kind_follows_the_path_suffix():
    assert RunConfig.model_validate({"input": {"path": "x.npy"}}).input.kind == "npy"
    assert RunConfig.model_validate({"input": {"path": "x.parquet", "column": "f"}}).input.kind == "parquet"
    # rows and seed are synthetic settings: a file config may keep them, they are not read
    assert RunConfig.model_validate({"input": {"path": "x.npy", "rows": 10}}).input.kind == "npy"


def test_a_dumped_config_validates_again():
    # Orchestrator(config) re-validates config.model_dump(): every field set must survive that.
    config = RunConfig.model_validate({"input": {"path": "x.parquet", "column": "f"},
                                       "pipeline": {"graphs": {"enabled": True, "buckets": [1, 8]}},
                                       "decode": {"max_new_tokens": 4}, "faults": {"worker-0": {"delay_s": 1}}})
    assert RunConfig.model_validate(config.model_dump()) == config


def test_the_pipeline_section_builds_the_workers_pipeline_config():
    built = RunConfig.model_validate({"pipeline": {"depth": 5, "max_batch_rows": 64,
                                                   "graphs": {"enabled": True, "buckets": [8, 64]}}}).pipeline.build()
    assert (built.depth, built.max_batch_rows, built.graphs.enabled, built.graphs.buckets) == (5, 64, True, (8, 64))


# -- overrides ------------------------------------------------------------------------------------

def test_overrides_parse_values_as_yaml():
    data: dict = {"pipeline": {"depth": 3}}
    for item in ["pipeline.depth=4", "pipeline.check_finite=true", "faults.worker-0.raise_on_batches=[0, 2]",
                 "model.source=zoo:resnet18", "output.path=", "cluster.gpus_per_worker=0.5"]:
        apply_override(data, item)
    assert data == {"pipeline": {"depth": 4, "check_finite": True}, "model": {"source": "zoo:resnet18"},
                    "faults": {"worker-0": {"raise_on_batches": [0, 2]}}, "output": {"path": None},
                    "cluster": {"gpus_per_worker": 0.5}}


def test_overrides_copy_the_sections_they_change():
    pipeline = {"depth": 3}
    data = {"pipeline": pipeline}
    config = RunConfig.from_dict(data, ["pipeline.depth=5"])
    assert config.pipeline.depth == 5
    assert pipeline == {"depth": 3} and data == {"pipeline": {"depth": 3}}


def test_a_number_in_an_override_indexes_a_list_which_is_copied():
    models = [{"name": "a", "source": "zoo:tiny_mlp"}, {"name": "b", "source": "zoo:mlp", "replicas": 2}]
    data = {"models": models}
    config = RunConfig.from_dict(data, ["models.1.replicas=3", "models.0.priority=high"])
    assert [(m.name, m.replicas, m.priority) for m in config.models] == [("a", 1, "high"), ("b", 3, "normal")]
    assert data == {"models": models} and models[1] == {"name": "b", "source": "zoo:mlp", "replicas": 2}


@pytest.mark.parametrize(("item", "why"), [
    ("models.2.name=c", "models is a list of 2; '2' is not one of its indexes"),
    ("models.x.name=c", "'x' is not one of its indexes"),
    ("faults.0.delay_s=1", "faults is not set, so it has no item 0"),
])
def test_a_list_index_that_is_not_there_is_named(item, why):
    with pytest.raises(ValueError) as info:
        apply_override({"models": [{"name": "a"}, {"name": "b"}]}, item)
    assert why in str(info.value)


@pytest.mark.parametrize(("item", "why"), [
    ("pipeline.depth", "section.field=value"),
    ("=4", "section.field=value"),
    ("pipeline..depth=4", "section.field=value"),
    ("pipeline.depth=[1", "not valid YAML"),
    ("pipeline.depth.inner=1", "pipeline.depth is 3, not a section"),
])
def test_malformed_overrides_say_why(item, why):
    with pytest.raises(ValueError) as info:
        apply_override({"pipeline": {"depth": 3}}, item)
    assert why in str(info.value)


def test_a_bad_override_is_reported_with_its_path_like_any_field():
    with pytest.raises(ValidationError) as info:
        RunConfig.from_dict({}, ["pipeline.depth=0", "dispatch.ordrd=true"])
    lines = describe_errors(info.value)
    assert any(x.startswith("pipeline.depth:") for x in lines)
    assert any(x.startswith("dispatch.ordrd: unknown field (did you mean 'ordered'?)") for x in lines)


# -- YAML ---------------------------------------------------------------------------------------------

def test_from_yaml_applies_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("pipeline:\n  depth: 3\n  max_batch_rows: 512\ndispatch:\n  batch_rows: 512\n")
    config = RunConfig.from_yaml(path, ["pipeline.depth=6", "input.rows=10"])
    assert (config.pipeline.depth, config.pipeline.max_batch_rows, config.input.rows) == (6, 512, 10)


def test_an_empty_file_is_the_defaults(tmp_path):
    (tmp_path / "empty.yaml").write_text("# nothing\n")
    assert RunConfig.from_yaml(tmp_path / "empty.yaml") == RunConfig()


def test_the_top_level_must_be_a_mapping(tmp_path):
    (tmp_path / "list.yaml").write_text("- model\n- cluster\n")
    with pytest.raises(ValueError, match="top level must be a mapping"):
        RunConfig.from_yaml(tmp_path / "list.yaml")


def test_a_key_given_twice_is_an_error_naming_it_and_its_lines(tmp_path):
    # safe_load alone keeps the second pipeline section and drops depth: 6 without a word.
    (tmp_path / "twice.yaml").write_text("pipeline:\n  depth: 6\nmodel:\n  source: zoo:mlp\n  seed: 1\n"
                                         "pipeline:\n  max_batch_rows: 64\n  max_batch_rows: 32\n")
    with pytest.raises(ValueError, match=r"keys given twice \(only the last would count\): 'pipeline' "
                                         r"\(lines 1 and 6\), 'max_batch_rows' \(lines 7 and 8\)"):
        RunConfig.from_yaml(tmp_path / "twice.yaml")


def test_an_alias_pointing_back_up_the_tree_is_walked_once(tmp_path):
    # The check for keys given twice walks YAML's node graph: it must end on a recursive alias.
    (tmp_path / "loop.yaml").write_text("model: &m\n  kwargs:\n    again: *m\n")
    config = RunConfig.from_yaml(tmp_path / "loop.yaml")
    assert "kwargs" in config.model.kwargs["again"]


def test_yaml_is_loaded_safely(tmp_path):
    marker = tmp_path / "ran"
    (tmp_path / "evil.yaml").write_text(f"model: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(yaml.YAMLError):
        RunConfig.from_yaml(tmp_path / "evil.yaml")
    assert not marker.exists()


# -- configs/ -----------------------------------------------------------------------------------------

def test_every_documented_workload_has_a_config():
    names = {p.stem for p in CONFIGS}
    assert {"cpu_default", "resnet50", "resnet18", "mlp_transfer_bound", "small_batch_graphs",
            "several_models_one_gpu", "decode"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_each_config_validates(path):
    config = RunConfig.from_yaml(path)
    assert RunConfig.model_validate(config.model_dump()) == config


def test_the_cpu_default_runs_anywhere():
    config = RunConfig.from_yaml(REPO / "configs" / "cpu_default.yaml")
    assert config.model.source == "zoo:tiny_mlp" and config.cluster.address is None
    assert config.input.kind == "synthetic"


# -- several models (models:) -----------------------------------------------------------------------

TWO_MODELS = [{"name": "a", "source": "zoo:tiny_mlp"}, {"name": "b", "source": "zoo:mlp", "replicas": 3,
                                                        "priority": "high"}]


def test_models_become_engine_specs_with_windows_per_replica():
    config = RunConfig.model_validate({"models": TWO_MODELS, "pipeline": {"depth": 2}})
    assert config.model_names == ["a", "b"] and config.input_model == "a"
    specs = config.engine_specs()
    assert [(s["name"], s["replicas"], s["priority"]) for s in specs] == [("a", 1, "normal"), ("b", 3, "high")]
    assert specs[1]["model"]["source"] == "zoo:mlp" and "name" not in specs[1]["model"]
    assert (config.window("a"), config.window("b")) == (3, 9)
    # A dumped config validates again (its model section is the default one).
    assert RunConfig.model_validate(config.model_dump()) == config
    one = RunConfig()
    assert one.model_names == ["default"] and one.engine_specs()[0]["model"] == one.model.model_dump()


BAD_MODELS = [
    ({"model": {"source": "zoo:resnet18"}, "models": TWO_MODELS}, "models: set either model"),
    ({"models": [TWO_MODELS[0], TWO_MODELS[0]]}, "models: names must be unique; 'a'"),
    ({"models": [{**TWO_MODELS[1], "replicas": 9}]}, "models.0.replicas: Input should be less than or equal to 8"),
    ({"models": [{**TWO_MODELS[1], "replicas": 7}, TWO_MODELS[0]]}, "need 18 streams"),
    ({"models": [{**TWO_MODELS[0], "priority": "urgent"}]}, "models.0.priority"),
    ({"models": [{**TWO_MODELS[0], "name": "a b"}]}, "models.0.name: String should match pattern"),
    ({"models": [{"source": "zoo:tiny_mlp"}]}, "models.0.name: Field required"),
    ({"models": [{**TWO_MODELS[0], "replicsa": 2}]}, "models.0.replicsa: unknown field (did you mean 'replicas'?)"),
    ({"models": []}, "models: List should have at least 1 item"),
    ({"models": TWO_MODELS, "decode": {"max_new_tokens": 4}}, "decode: decode runs the one decoder"),
    ({"models": TWO_MODELS, "input": {"model": "c"}}, "input.model: 'c' is not a model of this config; known: 'a', 'b'"),
    ({"input": {"model": "a"}}, "input.model: 'a' is not a model of this config; known: 'default'"),
]


@pytest.mark.parametrize("data, message", BAD_MODELS)
def test_bad_models_sections_are_named(data, message):
    lines = errors_of(data)
    assert any(message in line for line in lines), lines
