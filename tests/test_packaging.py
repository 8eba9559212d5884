"""The package as a user installs it: presets found by name, every runtime import declared, and a
non-editable `pip install .` that works outside the checkout."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import sysconfig
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

from storygpt import presets
from storygpt.config import ConfigError, find_config, load_config

REPO = Path(__file__).resolve().parents[1]
OWN = ("storygpt", "preprocessing", "ray_jobs", "serving")


def _project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# ----------------------------------------------------------------------------- presets by name
def test_presets_are_found_by_name_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the checkout
    assert {"tiny", "world", "flintstones", "pororo", "cluster-flintstones"} <= set(presets.names())
    assert find_config("tiny") == presets.directory() / "tiny.yaml"
    assert find_config("configs/world.yaml") == presets.directory() / "world.yaml"  # the README's paths work too
    cfg = load_config("world")
    assert cfg.preset == "world" and Path(cfg.deepspeed_config_path()) == presets.directory() / "deepspeed" / "zero2.json"
    assert Path(cfg.resolved().train.deepspeed_config).is_file()
    assert load_config(None).preset == "tiny"  # the CLI's default
    with pytest.raises(ConfigError, match=r"--config: no preset file 'tiyn' .*tiny"):
        load_config("tiyn")
    mine = tmp_path / "configs" / "tiny.yaml"  # a file of the user's own wins over the bundled one
    mine.parent.mkdir()
    mine.write_text("extends: " + str(presets.directory() / "tiny.yaml") + "\npreset: mine\n")
    assert load_config("configs/tiny.yaml").preset == "mine"


# ----------------------------------------------------------------------------- pyproject
def test_the_package_list_is_every_source_package_plus_the_presets():
    from setuptools import find_packages

    listed = set(_project()["tool"]["setuptools"]["packages"])
    found = set(find_packages(str(REPO), include=[f"{p}*" for p in OWN]))
    assert listed == found | {"storygpt.configs"}, (listed ^ (found | {"storygpt.configs"}))
    data = _project()["tool"]["setuptools"]["package-data"]["storygpt.configs"]
    shipped = {p.relative_to(REPO / "configs").as_posix() for pattern in data for p in (REPO / "configs").glob(pattern)}
    assert shipped == {p.relative_to(REPO / "configs").as_posix() for p in (REPO / "configs").rglob("*") if p.is_file()}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_every_runtime_import_is_a_declared_dependency():
    declared = {_normal(re.split(r"[<>=!~;\[ ]", d, maxsplit=1)[0]) for d in _project()["project"]["dependencies"]}
    dists = packages_distributions()
    missing = {}
    for package in OWN:
        for path in (REPO / package).rglob("*.py"):
            for name in _imports(path) - set(sys.stdlib_module_names) - set(OWN) - {"__future__"}:
                owners = {_normal(d) for d in dists.get(name, [])}
                if not owners & declared:
                    missing.setdefault(name, set()).add(str(path.relative_to(REPO)))
    assert not missing, f"imported but not in [project].dependencies: {missing}"
    assert "pynvml" in dists and {"nvidia-ml-py"} & {_normal(d) for d in dists["pynvml"]}  # MLflow's GPU metrics


def test_license_file_and_spdx_expression():
    project = _project()["project"]
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    text = (REPO / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text


# ----------------------------------------------------------------------------- a real install
def checkout_copy(dest: Path) -> Path:
    """What a fresh clone holds: the tracked files and the untracked ones git does not ignore."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        source = REPO / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            (dest / name).write_bytes(source.read_bytes())
    return dest


@pytest.mark.slow
def test_a_non_editable_install_runs_outside_the_checkout(tmp_path):
    """`pip install .` (not -e) into a clean venv, then `storygpt world` + `storygpt data show
    --config tiny` from a directory that is not the checkout. The heavy stack (torch, ray, ...,
    pip and setuptools too) comes from this interpreter's site-packages through a .pth line, so pip
    installs only the project (--no-deps, --no-build-isolation: no download); a .pth *line* adds the path without
    running that site-packages' own .pth files, so the shared venv's editable install of this
    project stays out."""
    source = checkout_copy(tmp_path / "src")
    venv = tmp_path / "venv"
    # no pip/setuptools of its own: this stack's (setuptools >= 77 reads the SPDX licence) serve the build
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "_shared_stack.pth").write_text(sysconfig.get_path("purelib") + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    pip = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                          "--disable-pip-version-check", str(source)], capture_output=True, text=True, env=env)
    assert pip.returncode == 0, pip.stdout + pip.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run([str(python), "-c", "import storygpt; print(storygpt.__file__)"], cwd=elsewhere,
                           capture_output=True, text=True, env=env, check=True).stdout.strip()
    assert where.startswith(site), where  # the installed copy, not a checkout
    storygpt = str(venv / "bin" / "storygpt")
    work = ["--set", f"work_dir={elsewhere / 'work'}"]
    world = subprocess.run([storygpt, "world", "--config", "tiny", "--stories", "6", *work], cwd=elsewhere,
                           capture_output=True, text=True, env=env)
    assert world.returncode == 0, world.stderr[-3000:]
    shown = subprocess.run([storygpt, "data", "show", "--config", "tiny", "--json", "--limit", "2", *work],
                           cwd=elsewhere, capture_output=True, text=True, env=env)
    assert shown.returncode == 0, shown.stderr[-3000:]
    stories = [json.loads(line) for line in shown.stdout.splitlines()]
    assert len(stories) == 2 and all(f["characters"] for s in stories for f in s["frames"][:1])
    # the bundled DeepSpeed JSONs are found from there too (the training jobs read them)
    check = subprocess.run([str(python), "-c", "from storygpt.config import load_config; import pathlib; "
                            "print(pathlib.Path(load_config('flintstones').resolved().train.deepspeed_config).is_file())"],
                           cwd=elsewhere, capture_output=True, text=True, env=env)
    assert check.stdout.strip() == "True", check.stderr[-2000:]
