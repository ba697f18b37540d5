"""The documentation as a reader gets it: the site builds with no warning (a broken link or an API reference
that does not resolve fails), the README's first screen shows the pictures and the set-up commands, every
picture is small, and every command the README and the pages show composes against the shipped configs."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
README = REPO / "README.md"
# What a reader sees before scrolling: a 1280x1600 window shows about this many lines of the rendered README.
FIRST_SCREEN_LINES = 40
MAX_PICTURE_BYTES = 1_000_000
ENTRY_POINTS = {"train", "eval", "predict", "chat", "app"}

pytest.importorskip("mkdocs", reason="mkdocs (dev extra) is not installed")


def mkdocs_build(config: Path, site: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "--config-file",
            str(config),
            "--site-dir",
            str(site),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )


def nav_pages() -> list[str]:
    import yaml

    def walk(node) -> list[str]:
        if isinstance(node, str):
            return [node]
        if isinstance(node, list):
            return [page for item in node for page in walk(item)]
        return [page for value in node.values() for page in walk(value)]

    return walk(yaml.safe_load((REPO / "mkdocs.yml").read_text())["nav"])


def test_the_site_builds_strictly_with_every_page_and_the_api_reference(tmp_path: Path) -> None:
    result = mkdocs_build(REPO / "mkdocs.yml", tmp_path / "site")
    assert result.returncode == 0, result.stderr
    pages = nav_pages()
    assert sorted(pages) == sorted(str(p.relative_to(DOCS)) for p in DOCS.glob("*.md")), (
        "a page outside the nav"
    )
    for page in pages:
        html = tmp_path / "site" / page.removesuffix(".md") / "index.html"
        if page == "index.md":
            html = tmp_path / "site" / "index.html"
        assert html.is_file(), page
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    # mkdocstrings renders each documented object under its dotted path, docstring included
    assert 'id="flmm_lightning.inference.grounder.Grounder"' in api
    assert "A trained F-LMM ready to ground phrases in images." in api


def test_a_broken_link_fails_the_build(tmp_path: Path) -> None:
    shutil.copytree(DOCS, tmp_path / "docs")
    shutil.copy(REPO / "mkdocs.yml", tmp_path / "mkdocs.yml")
    (tmp_path / "docs" / "training.md").write_text(
        (DOCS / "training.md").read_text() + "\nSee [the missing page](no-such-page.md).\n"
    )
    config = (REPO / "mkdocs.yml").read_text().replace("paths: [src]", f"paths: [{REPO / 'src'}]")
    (tmp_path / "mkdocs.yml").write_text(config)
    result = mkdocs_build(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert result.returncode != 0
    assert "no-such-page.md" in result.stdout + result.stderr


def test_the_readme_is_short_and_its_first_screen_shows_the_pictures_and_the_setup_commands() -> None:
    lines = README.read_text().splitlines()
    assert len(lines) <= 150
    first_screen = "\n".join(lines[:FIRST_SCREEN_LINES])
    for picture in ("docs/assets/pipeline.png", "docs/assets/examples.png"):
        assert f"]({picture})" in first_screen, picture
    assert "make setup" in first_screen and "make demo" in first_screen


def test_every_picture_exists_and_is_small() -> None:
    pages = [README, *DOCS.glob("*.md")]
    shown = {
        (page.parent / target).resolve()
        for page in pages
        for target in re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", page.read_text())
    }
    assert shown, "no picture in the documentation"
    for picture in shown:
        assert picture.is_file(), picture
        assert picture.stat().st_size < MAX_PICTURE_BYTES, picture
    assert {p.resolve() for p in (DOCS / "assets").glob("*.png")} <= shown, "a picture no page shows"


# ---- the commands the documentation shows -----------------------------------------------------------------
def shell_lines(markdown: str) -> list[str]:
    """The commands of the ```bash blocks: continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", markdown, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def documented_commands() -> list[tuple[str, str]]:
    return [
        (page.name, line)
        for page in [README, *sorted(DOCS.glob("*.md"))]
        for line in shell_lines(page.read_text())
    ]


def hydra_overrides(words: list[str], multirun: bool) -> list[str]:
    """The Hydra overrides among a command's words, a placeholder the reader fills in (``<run>``) as a
    name; a sweep (``-m``, ``a=1,2``) composes its first value."""
    overrides = [
        re.sub(r"<(\w+)>", r"\1", w)
        for w in words
        if not w.startswith("-") and ("=" in w or w.startswith("~"))
    ]
    if multirun:
        overrides = [re.sub(r"=([^,\[\]]+),.*$", r"=\1", w) for w in overrides]
    return overrides


def test_the_documentation_shows_the_main_commands() -> None:
    shown = " ".join(line for _, line in documented_commands())
    for command in ("make setup", "make demo", "make app", "make docs", "make figures"):
        assert command in shown, command
    for entry in ENTRY_POINTS | {"bench"}:
        assert f"-m flmm_lightning.{entry}" in shown, entry


@pytest.mark.parametrize("page, line", documented_commands())
def test_every_documented_command_names_what_exists_and_composes(
    page: str, line: str, compose_config
) -> None:
    words = shlex.split(line.split(" # ")[0], comments=True)
    if words[0] == "make":
        targets = re.findall(r"^([a-z][\w-]*):", (REPO / "Makefile").read_text(), flags=re.M)
        assert words[1] in targets, f"{page}: `{line}`: no make target {words[1]}"
        return
    if "-m" not in words or not words[words.index("-m") + 1].startswith("flmm_lightning."):
        assert words[0] in {"export", "pip", "git", "cd"}, f"{page}: `{line}`: not a command this test knows"
        return
    module = words[words.index("-m") + 1]
    assert importlib.util.find_spec(module) is not None, f"{page}: `{line}`: no module {module}"
    entry = module.removeprefix("flmm_lightning.")
    rest = words[words.index("-m") + 2 :]
    if entry == "convert":  # argparse (files, --model/--sam/--data), then the overrides of train's config
        from flmm_lightning.convert import compose_model_config, parse_args

        args = parse_args(rest)
        compose_model_config(args.model, args.sam, args.data, hydra_overrides(args.overrides, multirun=False))
        return
    if entry == "cache":  # argparse (size | fill), then the overrides of train's config
        from flmm_lightning.cache import parse_args as parse_cache_args

        rest = parse_cache_args(rest).overrides
        entry = "train"
    overrides = hydra_overrides(rest, multirun=rest[:1] == ["-m"])
    if entry == "bench":  # the bench composes train's config with its overrides
        entry = "train"
    assert entry in ENTRY_POINTS, f"{page}: `{line}`"
    compose_config(overrides, config_name=entry)


def test_a_misspelt_setting_in_a_documented_command_would_fail(compose_config) -> None:
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="batch_sise"):
        compose_config(["+experiment=refcoco", "data.batch_sise=2"], config_name="train")
