"""The package as a user installs it: a wheel built from the source tree, installed (not editable) into a
fresh venv, runs the entry points and the console scripts from any working directory, configs included."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from flmm_lightning.outputs.reporting import read_metrics_json

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "src" / "flmm_lightning"
# What a wheel is built from (a copy: building writes build/ and *.egg-info next to the sources).
SOURCES = ("pyproject.toml", "README.md", "src", "conf")
SMALL_RUN = (
    "data.synthetic.num_train=8",
    "data.synthetic.num_val=4",
    "data.num_workers=0",
    "logger=csv",
    "whole_image_baseline_split=null",
)


def test_pyproject_lists_every_package_and_ships_every_config() -> None:
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {
        ".".join(("flmm_lightning", *init.parent.relative_to(PACKAGE).parts))
        for init in PACKAGE.rglob("__init__.py")
    }
    assert set(setuptools["packages"]) == found | {"flmm_lightning.conf"}
    assert setuptools["package-dir"]["flmm_lightning.conf"] == "conf"
    depths = {len(path.relative_to(REPO / "conf").parts) for path in (REPO / "conf").rglob("*.yaml")}
    globs = set(
        tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"][
            "flmm_lightning.conf"
        ]
    )
    assert {"*/" * (depth - 1) + "*.yaml" for depth in depths} <= globs, (
        "a conf/ depth the wheel would not ship"
    )


@dataclass
class Installed:
    root: Path
    wheel: Path
    venv: Path
    site_packages: Path
    env: dict[str, str]

    def run(self, *command: str | Path, cwd: Path) -> str:
        result = subprocess.run(
            [str(part) for part in command],
            cwd=cwd,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, f"{command}:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
        return result.stdout

    def bin(self, name: str) -> Path:
        return self.venv / "bin" / name


def dependency_dirs() -> list[str]:
    """The running interpreter's site-packages folders: the new venv reads its dependencies from there (no
    5 GB torch install per test). Added through a .pth line, whose own .pth files Python does not process,
    so a development install of flmm_lightning in there stays invisible."""
    return [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages") and Path(p).is_dir()]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    root = tmp_path_factory.mktemp("package")
    source = root / "source"
    source.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(
                REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
            )
        else:
            shutil.copy2(REPO / name, source / name)
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME")}
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index"]
    subprocess.run([*build, "-q", "-w", root / "dist", source], check=True, env=env, timeout=300)
    (wheel,) = (root / "dist").glob("flmm_lightning-*.whl")

    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True, timeout=120)
    python = venv / "bin" / "python"
    # Installed into the bare venv first, so that pip sees no other flmm-lightning; then the dependencies.
    install = [sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q"]
    subprocess.run([*install, wheel], check=True, env=env, timeout=300)
    site_packages = Path(
        subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    (site_packages / "flmm_test_dependencies.pth").write_text("\n".join(dependency_dirs()) + "\n")
    return Installed(root, wheel, venv, site_packages, env)


@pytest.mark.slow
def test_wheel_ships_the_configs_and_the_console_scripts(installed: Installed) -> None:
    names = zipfile.ZipFile(installed.wheel).namelist()
    shipped = {name.removeprefix("flmm_lightning/conf/") for name in names if name.endswith(".yaml")}
    expected = {str(path.relative_to(REPO / "conf")) for path in (REPO / "conf").rglob("*.yaml")}
    assert shipped == expected
    for script in ("flmm-train", "flmm-eval", "flmm-predict", "flmm-chat", "flmm-app"):
        assert installed.bin(script).is_file(), script


@pytest.mark.slow
def test_installed_wheel_trains_evaluates_and_predicts_from_any_directory(
    installed: Installed, fixtures_dir: Path
) -> None:
    work = installed.root / "elsewhere"
    work.mkdir()
    python = installed.bin("python")
    where = installed.run(python, "-c", "import flmm_lightning; print(flmm_lightning.__file__)", cwd=work)
    assert Path(where.strip()).is_relative_to(installed.site_packages)

    # python -m, the packaged configs only
    train = ("+experiment=demo", "trainer.max_steps=3", "test_after_fit=false", *SMALL_RUN)
    installed.run(python, "-m", "flmm_lightning.train", *train, cwd=work)
    checkpoint = work / "outputs" / "demo" / "latest" / "checkpoints" / "last.ckpt"  # the newest run
    assert checkpoint.is_file()

    # the console script, with an experiment from the user's own config folder that extends a packaged one
    user_conf = installed.root / "my_conf"
    (user_conf / "experiment").mkdir(parents=True)
    (user_conf / "experiment" / "mine.yaml").write_text(
        "# @package _global_\ndefaults:\n  - demo\n\ntest_after_fit: false\n"
        "hydra:\n  run:\n    dir: ${paths.root_dir}/outputs/mine\n"
    )
    mine = ("--config-dir", user_conf, "+experiment=mine", "trainer.max_steps=3", *SMALL_RUN)
    installed.run(installed.bin("flmm-train"), *mine, cwd=work)
    assert (work / "outputs" / "mine" / "checkpoints" / "last.ckpt").is_file()

    installed.run(installed.bin("flmm-eval"), f"ckpt={checkpoint}", "hydra.run.dir=outputs/eval", cwd=work)
    assert set(read_metrics_json(work / "outputs" / "eval" / "metrics.json")) == {
        "synthetic_refcoco_val",
        "synthetic_png_val",
    }
    photo = fixtures_dir / "coco_sample" / "images" / "000000142238.jpg"
    predict = (
        f"ckpt={checkpoint}",
        f"image={photo}",
        "phrases=[a man]",
        "device=cpu",
        "hydra.run.dir=outputs/p",
    )
    installed.run(installed.bin("flmm-predict"), *predict, cwd=work)
    assert (work / "outputs" / "p" / f"{photo.stem}_overlay.png").is_file()


# ---- what a plain install (no extras) provides, and what [app] adds --------------------------------------
# The demo's, predict's and chat's own modules, and the tiny assets the demo runs on (built offline); the app
# is not importable.
PLAIN_INSTALL_CHECK = """
import importlib.util
import flmm_lightning.chat, flmm_lightning.eval, flmm_lightning.predict, flmm_lightning.train
from flmm_lightning.assets.text_tokenizers import build_qwen2_5_vl_tokenizer
from flmm_lightning.assets.sam import build_tiny_sam
tokenizer = build_qwen2_5_vl_tokenizer()
assert tokenizer.convert_tokens_to_ids("<|image_pad|>") == 151655
build_tiny_sam()
assert importlib.util.find_spec("gradio") is None
"""
APP_INSTALL_CHECK = """
import flmm_lightning.app.handlers, flmm_lightning.app.ui
"""


def runtime_distributions(requirements: list[str]) -> set[str]:
    """The installed distributions that ``requirements`` need, transitively (markers evaluated for this
    interpreter, no extras of the dependencies), by normalised name."""
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    found: set[str] = set()
    pending = [Requirement(line) for line in requirements]
    while pending:
        requirement = pending.pop()
        name = canonicalize_name(requirement.name)
        if name in found or (requirement.marker and not requirement.marker.evaluate({"extra": ""})):
            continue
        found.add(name)
        pending.extend(Requirement(line) for line in metadata.requires(name) or [])
    return found


def run_with_only(distributions: set[str], script: str, tmp_path: Path) -> None:
    """Runs ``script`` in an interpreter that sees the stdlib, this source tree and ``distributions`` only
    (linked into one folder; the interpreter's own site-packages left out)."""
    from importlib import metadata

    from packaging.utils import canonicalize_name

    site = tmp_path / "site"
    site.mkdir()
    for distribution in metadata.distributions():
        if canonicalize_name(distribution.metadata["Name"]) not in distributions:
            continue
        assert distribution.files, f"{distribution.metadata['Name']} lists no files"
        for top in {file.parts[0] for file in distribution.files if file.parts[0] != ".."}:
            source = Path(distribution.locate_file(top))
            if source.exists() and not (site / top).exists():
                (site / top).symlink_to(source)
    prelude = f"import site, sys; site.addsitedir({str(site)!r}); sys.path.insert(0, {str(REPO / 'src')!r})\n"
    env = {
        **{key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME")},
        "FLMM_CACHE_DIR": str(tmp_path / "assets"),
    }
    result = subprocess.run(
        [sys.executable, "-S", "-c", prelude + script], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-5000:]


@pytest.mark.parametrize(
    ("extras", "script"),
    [
        pytest.param((), PLAIN_INSTALL_CHECK, id="plain"),
        # importing gradio takes half a minute on a busy 2-core machine
        pytest.param(("app",), APP_INSTALL_CHECK, id="app", marks=pytest.mark.slow),
    ],
)
def test_declared_dependencies_run_the_demo_predict_chat_and_with_app_the_app(
    extras: tuple[str, ...], script: str, tmp_path: Path
) -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = [
        *project["dependencies"],
        *(line for extra in extras for line in project["optional-dependencies"][extra]),
    ]
    run_with_only(runtime_distributions(requirements), script, tmp_path)
