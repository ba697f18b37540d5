"""A checkpoint is data: its stored config is checked against one typed schema, it never turns on remote code,
nothing it names deletes files, and its weights are checked against the model before they are copied."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flmm_lightning.assets.store import SPEC_FILE, ensure_built
from flmm_lightning.assets.synthetic_data import MARKER_NAME, MAX_IMAGES, write_synthetic_dataset
from flmm_lightning.config.composition import config_on_this_machine, default_paths
from flmm_lightning.config.stored import (
    ALLOWED_TARGETS,
    SETTINGS,
    UnsafeConfigError,
    parameters_of,
    parse_stored_config,
)
from flmm_lightning.core import CheckpointMismatchError
from flmm_lightning.inference.grounder import Grounder
from flmm_lightning.runs.build import run_config
from flmm_lightning.runs.checkpoints import load_checkpoint, module_from_checkpoint

pytestmark = pytest.mark.usefixtures("pinned_threads")


@pytest.fixture(scope="module")
def saved(tiny_checkpoint: Path) -> dict[str, Any]:
    """The tiny checkpoint's content, its tensors in memory (crafted checkpoints change one part of it)."""
    return torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)


def craft(saved: dict[str, Any], path: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    crafted = copy.deepcopy(saved)
    edit(crafted["flmm_config"])
    torch.save(crafted, path)
    return path


def files_under(folder: Path) -> dict[str, tuple[int, int]]:
    return {
        str(path.relative_to(folder)): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in folder.rglob("*")
        if path.is_file()
    }


@pytest.fixture
def user_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The folder a user runs ``predict`` in (``paths.root_dir``): their own images and annotations."""
    home = tmp_path / "home"
    for name in ("images/cat.jpg", "images/synthetic_000001.jpg", "annotations/mine.json", "notes.txt"):
        (home / name).parent.mkdir(parents=True, exist_ok=True)
        (home / name).write_text(f"the user's {name}")
    monkeypatch.chdir(home)
    yield home


# ---- 1. the schema -----------------------------------------------------------------------------------------
def test_every_parameter_of_the_project_targets_has_a_type_and_bounds() -> None:
    untyped = {
        target: [name for name in parameters_of(target) if name not in SETTINGS]
        for target in ALLOWED_TARGETS
        if target.startswith("flmm_lightning.")
    }
    assert {target: names for target, names in untyped.items() if names} == {}


def test_a_stored_config_holds_plain_values_and_paths_as_placeholders(tiny_config, saved) -> None:
    stored = saved["flmm_config"]
    assert parse_stored_config(stored, "tiny.ckpt") == stored
    texts = json.dumps(stored)
    assert texts.count("${") == texts.count("${paths.")  # no other interpolation, no resolver
    assert stored["model"]["lmm"]["pretrained"] == "${paths.cache_dir}/tiny_qwen2_5_vl"
    assert stored["data"]["synthetic"]["root"] == "${paths.data_dir}/synthetic"
    here = {"cache_dir": "/elsewhere/cache", "data_dir": "/elsewhere/data"}
    config = config_on_this_machine(stored, here)
    assert config.model.lmm.pretrained == "/elsewhere/cache/tiny_qwen2_5_vl"
    assert config.data.val_sets.synthetic_png_val.image_dir == "/elsewhere/data/synthetic/images"
    assert (
        config.model.lmm.text_proj_dim == tiny_config.sam.embed_dim
    )  # a key reference: resolved when stored


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        (lambda c: c["model"].update(local_copy="/x"), "model.local_copy: a key the schema lacks"),
        (
            lambda c: c["module"]["mask_head"].update(_args_=[3]),
            "module.mask_head._args_: a key the schema lacks",
        ),
        (lambda c: c["sam"].update(image_size=10**12), "sam.image_size: 1000000000000"),
        (lambda c: c["sam"].update(image_size="256"), "sam.image_size: '256' (must be an integer)"),
        (lambda c: c["module"].update(warmup_ratio=float("nan")), "module.warmup_ratio: nan"),
        (lambda c: c["model"]["lmm"].update(merge="median"), "model.lmm.merge: 'median' (must be one of"),
        (
            lambda c: c["model"].update(name="${oc.env:HOME}"),
            "model.name: '${oc.env:HOME}': an interpolation",
        ),
        (lambda c: c["model"].update(pretrained="${paths.cache_dir}/../x"), "model.pretrained: '${paths"),
        (
            lambda c: c["model"].update(pretrained="${paths.output_dir}/x"),
            "model.pretrained: '${paths.output",
        ),
        (lambda c: c["sam"]["refiner"].update(embedding_cache="/tmp/c"), "sam.refiner.embedding_cache"),
        (
            lambda c: c["module"]["optimizer"].update(_target_="torch.optim.lr_scheduler.LambdaLR"),
            "module.optimizer._target_: 'torch.optim.lr_scheduler.LambdaLR'",
        ),
    ],
)
def test_what_the_schema_lacks_is_refused_naming_the_file_and_the_key(
    saved: dict[str, Any], tmp_path: Path, edit: Callable[[dict[str, Any]], None], named: str
) -> None:
    checkpoint = craft(saved, tmp_path / "crafted.ckpt", edit)
    with pytest.raises(UnsafeConfigError) as error:
        module_from_checkpoint(checkpoint)
    assert str(checkpoint) in str(error.value) and f"flmm_config.{named}" in str(error.value)


# ---- 2. remote code only from the command line -------------------------------------------------------------
@pytest.fixture
def remote_code_folder(tmp_path: Path) -> tuple[Path, Path]:
    """A model folder whose ``config.json`` maps the Auto classes to its own module, which leaves a file
    behind when it is imported: (the folder, the file that proves the code ran)."""
    folder, ran = tmp_path / "remote_model", tmp_path / "remote_code_ran"
    folder.mkdir()
    auto_map = {"AutoConfig": "evil.EvilConfig", "AutoModelForImageTextToText": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl", "auto_map": auto_map}))
    (folder / "evil.py").write_text(
        textwrap.dedent(
            f"""
            from pathlib import Path
            from transformers import PretrainedConfig, PreTrainedModel
            Path({str(ran)!r}).write_text("ran")
            class EvilConfig(PretrainedConfig):
                model_type = "evil"
            class EvilModel(PreTrainedModel):
                config_class = EvilConfig
            """
        )
    )
    return folder, ran


def _point_at(folder: Path) -> Callable[[dict[str, Any]], None]:
    def edit(config: dict[str, Any]) -> None:
        for node in (config["model"], config["model"]["lmm"], config["model"]["prompt"]):
            node["pretrained"] = str(folder)

    return edit


REMOTE_CODE_ATTACKS = {
    "interpolated": (
        lambda c: (
            c["model"].update(allow=True, trust_remote_code="${model.allow}"),
            c["model"]["lmm"].update(trust_remote_code="${model.trust_remote_code}"),
        ),
        [
            "flmm_config.model.allow: a key the schema lacks",
            "flmm_config.model.trust_remote_code: '${model.allow}'",
        ],
    ),
    "positional": (
        lambda c: c["model"].update(
            lmm={
                "_target_": c["model"]["lmm"]["_target_"],
                "_args_": [c["model"]["pretrained"], 64, "fused", "mean", "auto", True],
            }
        ),
        ["flmm_config.model.lmm._args_: a key the schema lacks"],
    ),
}


@pytest.mark.parametrize("attack", sorted(REMOTE_CODE_ATTACKS))
def test_a_checkpoint_never_turns_on_remote_code(
    saved: dict[str, Any], remote_code_folder: tuple[Path, Path], tmp_path: Path, attack: str
) -> None:
    folder, ran = remote_code_folder
    edit, named = REMOTE_CODE_ATTACKS[attack]
    checkpoint = craft(saved, tmp_path / "crafted.ckpt", lambda c: (_point_at(folder)(c), edit(c)))
    with pytest.raises(UnsafeConfigError) as error:
        Grounder.from_checkpoint(checkpoint, device="cpu")
    assert str(checkpoint) in str(error.value) and all(text in str(error.value) for text in named)
    assert not ran.exists()


def test_a_stored_true_is_overruled_and_the_command_line_decides(saved: dict[str, Any]) -> None:
    stored = copy.deepcopy(saved["flmm_config"])
    stored["model"]["trust_remote_code"] = stored["model"]["lmm"]["trust_remote_code"] = True
    config = config_on_this_machine(stored, default_paths())
    assert config.model.trust_remote_code is False and config.model.lmm.trust_remote_code is False
    allowed = config_on_this_machine(stored, default_paths(), {"model": {"trust_remote_code": True}})
    assert allowed.model.lmm.trust_remote_code is True
    assert run_config(config)["model"]["lmm"]["trust_remote_code"] is False  # never stored as on


def test_args_cannot_choose_where_the_sam_cache_writes(saved: dict[str, Any], tmp_path: Path) -> None:
    cache = tmp_path / "sam_cache"

    def edit(config: dict[str, Any]) -> None:
        refiner = config["sam"]["refiner"]
        config["sam"]["refiner"] = {
            "_target_": refiner["_target_"],
            "_args_": [refiner["sam"], True, True, True, False, str(cache)],
        }

    checkpoint = craft(saved, tmp_path / "crafted.ckpt", edit)
    with pytest.raises(UnsafeConfigError, match=r"flmm_config\.sam\.refiner\._args_: a key the schema lacks"):
        module_from_checkpoint(checkpoint)
    assert not cache.exists()


# ---- 3. nothing a checkpoint names deletes files -----------------------------------------------------------
def test_a_synthetic_resolver_in_a_checkpoint_removes_nothing(
    saved: dict[str, Any], user_folder: Path, tmp_path: Path
) -> None:
    """The reproduction: two builds of the synthetic dataset in the user's working folder, the second one
    removing the first one's folders (and the user's files with them)."""
    before = files_under(user_folder)

    def edit(config: dict[str, Any]) -> None:
        config["model"]["name"] = "${flmm_synthetic:${paths.root_dir},1,1}"
        config["sam"]["name"] = "${flmm_synthetic:${paths.root_dir},2,1}"

    checkpoint = craft(saved, tmp_path / "crafted.ckpt", edit)
    with pytest.raises(UnsafeConfigError, match=r"flmm_config\.model\.name: .*flmm_synthetic"):
        Grounder.from_checkpoint(checkpoint, device="cpu")
    assert files_under(user_folder) == before


def test_the_generator_deletes_only_what_it_wrote(tmp_path: Path) -> None:
    root = tmp_path / "synthetic"
    write_synthetic_dataset(root, num_train=2, num_val=1)
    first = set(files_under(root))
    (root / "images" / "mine.jpg").write_text("the user's own")
    (root / "annotations" / "mine.json").write_text("{}")
    write_synthetic_dataset(root, num_train=1, num_val=1)  # another build: the first one's files go
    after = set(files_under(root))
    assert {"images/mine.jpg", "annotations/mine.json"} <= after
    assert "images/synthetic_000003.jpg" in first and "images/synthetic_000003.jpg" not in after
    assert (root / "images" / "mine.jpg").read_text() == "the user's own"


def test_the_generator_refuses_a_folder_it_did_not_build(user_folder: Path) -> None:
    before = files_under(user_folder)
    with pytest.raises(FileExistsError, match=rf"{user_folder} holds files .*no {MARKER_NAME}"):
        write_synthetic_dataset(user_folder, num_train=1, num_val=1)
    assert files_under(user_folder) == before and not (user_folder / ".lock").exists()


@pytest.mark.parametrize("counts", [(MAX_IMAGES, 1), (-1, 1), (True, 1), (1.5, 1)])
def test_the_generator_has_bounded_sizes(tmp_path: Path, counts: tuple[Any, Any]) -> None:
    with pytest.raises(ValueError, match=rf"at most {MAX_IMAGES} images"):
        write_synthetic_dataset(tmp_path / "synthetic", *counts)
    assert not (tmp_path / "synthetic").exists()


def test_an_asset_build_never_replaces_a_folder_it_did_not_build(tmp_path: Path) -> None:
    target = tmp_path / "tiny_qwen2_5_vl"
    target.mkdir()
    (target / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=rf"{target} exists and is not a tiny asset .*{SPEC_FILE}"):
        ensure_built(target, {"name": "x"}, lambda out: (out / "weights").write_text("built"))
    assert (target / "mine.txt").read_text() == "keep me"


# ---- 4. weights --------------------------------------------------------------------------------------------
_BOMB = """
import io, resource, struct, sys, zipfile
import torch
from flmm_lightning.heads.sam_refiner import read_sam_weights
from flmm_lightning.runs.checkpoints import load_checkpoint

path, small, big = sys.argv[1], 100_003, 2**29  # 2**29 float32 = 2 GiB
load = read_sam_weights if sys.argv[2] == "sam" else load_checkpoint
buffer = io.BytesIO()
torch.save({"state_dict": {"model.mask_head.weight": torch.zeros(small)}, "flmm_config": {}}, buffer)
source = zipfile.ZipFile(buffer)
with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as out:
    for info in source.infolist():
        data = source.read(info.filename)
        if info.filename.endswith("/data/0"):  # 2 GiB of zeros, deflated to a few MB
            with out.open(info.filename, "w", force_zip64=True) as record:
                for _ in range(big * 4 // (1 << 24)):
                    record.write(bytes(1 << 24))
        else:  # the pickle declares 2**29 elements where it said 100003
            data = data.replace(struct.pack("<i", small), struct.pack("<i", big))
            out.writestr(info.filename, data, zipfile.ZIP_STORED)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    load(path)
    outcome = "loaded"
except ValueError as error:
    outcome = str(error)
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before  # KiB
print(f"{grown // 1024}\\n{outcome}")
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("reader", "refusal"), [("checkpoint", "cannot load checkpoint"), ("sam", "cannot load SAM checkpoint")]
)
def test_a_checkpoint_declaring_a_huge_tensor_is_refused_without_allocating_it(
    tmp_path: Path, reader: str, refusal: str
) -> None:
    """A trained checkpoint and SAM's own ``.pth`` alike."""
    checkpoint = tmp_path / "bomb.ckpt"
    run = subprocess.run(
        [sys.executable, "-c", _BOMB, str(checkpoint), reader],
        capture_output=True,
        text=True,
        check=True,
        env=os.environ,
    )
    grown_mib, outcome = run.stdout.strip().split("\n", 1)
    assert checkpoint.stat().st_size < 30 * 2**20
    assert outcome.startswith(f"{refusal} {checkpoint} safely")
    assert int(grown_mib) < 512  # the declared tensor is 2048 MiB


@pytest.fixture(scope="module")
def tiny_model(tiny_checkpoint: Path):
    return module_from_checkpoint(tiny_checkpoint).module


def _first_float_key(state_dict: dict[str, torch.Tensor]) -> str:
    return next(key for key, value in state_dict.items() if value.is_floating_point() and value.numel() > 1)


@pytest.mark.parametrize(
    "dtype", [torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.complex64]
)
def test_weights_of_another_dtype_are_refused_never_cast(
    tiny_model, saved: dict[str, Any], dtype: torch.dtype
) -> None:
    state = dict(saved["state_dict"])
    key = _first_float_key(state)
    state[key] = state[key].to(dtype)
    before = {name: value.clone() for name, value in tiny_model.state_dict().items()}
    with pytest.raises(
        CheckpointMismatchError,
        match=rf"{key.removeprefix('model.')}: dtype {dtype} in the checkpoint, torch.float32 in the model",
    ):
        tiny_model.load_checkpoint_weights(state)
    assert all(torch.equal(before[name], value) for name, value in tiny_model.state_dict().items())


def test_non_finite_weights_are_refused_naming_the_file_and_the_key(
    saved: dict[str, Any], tmp_path: Path
) -> None:
    crafted = copy.deepcopy(saved)
    key = _first_float_key(crafted["state_dict"])
    crafted["state_dict"][key][..., 0] = float("nan")
    torch.save(crafted, tmp_path / "nan.ckpt")
    with pytest.raises(CheckpointMismatchError) as error:
        module_from_checkpoint(tmp_path / "nan.ckpt")
    assert str(tmp_path / "nan.ckpt") in str(error.value)
    assert f"NaN or Inf weights in {key.removeprefix('model.')}" in str(error.value)


def test_a_checkpoint_is_memory_mapped(tiny_checkpoint: Path) -> None:
    """``mmap=True``: tensors are views of the file, read when used (after the checks), not copies."""
    state = load_checkpoint(tiny_checkpoint)["state_dict"]
    tensor = state[_first_float_key(state)]
    assert not tensor.untyped_storage().resizable()  # a file-backed storage; a loaded copy is resizable


# ---- 5. mutated stored configs -----------------------------------------------------------------------------
def _locations(node: Any, key: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every place of a stored config a mutation may replace (a value) or add to (a mapping's new key)."""
    if isinstance(node, dict):
        yield (*key, "_args_")
        yield (*key, "extra_key")
        for name, child in node.items():
            yield (*key, name)
            yield from _locations(child, (*key, name))
    elif isinstance(node, list):
        for index, child in enumerate(node):
            yield (*key, index)
            yield from _locations(child, (*key, index))


def _hostile_values(victim: Path) -> st.SearchStrategy[Any]:
    interpolations = st.sampled_from(
        [
            "${model.name}",
            "${oc.env:HOME}",
            "${paths.root_dir}",
            "${paths.root_dir}/../..",
            "x${paths.data_dir}",
            "\\${paths.data_dir}",
            "${flmm_synthetic:${paths.root_dir},1,1}",
            "${flmm_synthetic:${paths.root_dir},2,1}",
            "${flmm_synthetic:${paths.data_dir}/synthetic,100000000,1}",
            "${flmm_asset:tiny_sam,${paths.root_dir}}",
            "${oc.create:{_target_: shutil.rmtree, path: " + str(victim) + "}}",
            "${",
        ]
    )
    targets = st.sampled_from(
        ["shutil.rmtree", "os.remove", "builtins.open", "subprocess.run", *sorted(ALLOWED_TARGETS)]
    )
    nested = st.builds(
        lambda target, partial: {
            "_target_": target,
            "path": str(victim),
            "_partial_": partial,
            "_args_": [str(victim)],
        },
        targets,
        st.booleans(),
    )
    huge = st.sampled_from([10**12, 2**63, -(2**40), 1e300, float("inf"), float("-inf"), float("nan")])
    wrong_types = st.sampled_from([[1, 2, 3], {"a": 1}, "true", b"bytes", 0.5, (1,), {"_target_": None}])
    positional = st.lists(st.sampled_from([str(victim), True, 1, {"_target_": "os.remove"}]), max_size=6)
    return st.one_of(interpolations, nested, huge, wrong_types, positional)


def _mutated(stored: dict[str, Any], location: tuple[Any, ...], value: Any) -> dict[str, Any]:
    mutant = copy.deepcopy(stored)
    node: Any = mutant
    for part in location[:-1]:
        node = node[part]
    node[location[-1]] = value
    return mutant


@pytest.fixture(scope="module")
def machine(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A machine's folders with the user's files (root, data), its asset cache built once, the run folder."""
    root = tmp_path_factory.mktemp("machine")
    for name in ("images/cat.jpg", "annotations/mine.json", "data/coco/refs.p", "checkpoints/sam.pth"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(f"the user's {name}")
    paths = {
        "root_dir": str(root),
        "data_dir": str(root / "data"),
        "checkpoint_dir": str(root / "checkpoints"),
        "cache_dir": default_paths()["cache_dir"],
    }
    module = module_from_checkpoint(tiny_checkpoint, paths=paths).module  # the assets are there from now on
    return {
        "root": root,
        "paths": paths,
        "weights": module.state_dict(),
        "run": tmp_path_factory.mktemp("run"),
    }


@settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_a_mutated_stored_config_loads_as_the_same_model_or_is_refused(
    data: st.DataObject, saved: dict[str, Any], machine: dict[str, Any]
) -> None:
    stored = saved["flmm_config"]
    location = data.draw(st.sampled_from(sorted(_locations(stored), key=repr)), label="location")
    value = data.draw(_hostile_values(machine["root"] / "images"), label="value")
    checkpoint = machine["run"] / "mutant.ckpt"
    torch.save({**saved, "flmm_config": _mutated(stored, location, value)}, checkpoint)
    before = files_under(machine["root"]) | files_under(Path(machine["paths"]["cache_dir"]))
    try:
        module = module_from_checkpoint(checkpoint, paths=machine["paths"]).module
    except UnsafeConfigError as error:
        assert str(checkpoint) in str(error) and "flmm_config." in str(error)
    else:
        weights = module.state_dict()
        assert weights.keys() == machine["weights"].keys()
        assert all(torch.equal(weights[key], value) for key, value in machine["weights"].items())
    assert files_under(machine["root"]) | files_under(Path(machine["paths"]["cache_dir"])) == before
