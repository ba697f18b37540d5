"""The JSON that predict and chat write is valid JSON (no NaN) and uniform: an empty mask's box is null,
with a notice, for phrases and for ``query=`` alike."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

from flmm_lightning.inference.grounder import Grounder
from flmm_lightning.outputs.documents import json_document
from flmm_lightning.predict import predict
from flmm_lightning.runs.chat_turns import write_turn

pytestmark = pytest.mark.usefixtures("pinned_threads")

PHOTO = "coco_sample/images/000000142238.jpg"
PHRASES = ["a man", "the ball"]
# The last layer of SAM's mask-token hypernetwork: each mask's logits are its output dotted with the
# upscaled image embedding, so zero weights give logits of exactly 0 (no pixel above 0.5) and NaN gives NaN.
HYPERNETWORK_OUTPUT = "model.sam.sam.mask_decoder.output_hypernetworks_mlps.0.layers.2"


def strict_json(text: str) -> dict:
    """Parses JSON as other languages' parsers do: a bare NaN or Infinity is an error."""

    def refuse(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def hypernetwork_output(grounder: Grounder) -> torch.nn.Linear:
    return grounder.model.sam.sam.mask_decoder.output_hypernetworks_mlps[0].layers[2]


@pytest.fixture(scope="module")
def blank_checkpoint(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint with the hypernetwork's output zeroed: every mask it decodes is empty."""
    stored = torch.load(tiny_checkpoint, map_location="cpu", weights_only=False)
    for suffix in ("weight", "bias"):
        stored["state_dict"][f"{HYPERNETWORK_OUTPUT}.{suffix}"].zero_()
    path = tmp_path_factory.mktemp("blank") / "blank.ckpt"
    torch.save(stored, path)
    return path


def predict_overrides(checkpoint: Path, image: Path, out: Path) -> list[str]:
    return [f"ckpt={checkpoint}", f"image={image}", "device=cpu", f"paths.output_dir={out}"]


def test_empty_masks_have_a_null_box_and_a_notice_in_predict(
    compose_config: Callable[..., DictConfig],
    blank_checkpoint: Path,
    fixtures_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    overrides = [
        *predict_overrides(blank_checkpoint, fixtures_dir / PHOTO, tmp_path / "p"),
        "phrases=[a man]",
    ]
    _, json_path = predict(compose_config(overrides, config_name="predict"))
    document = strict_json(json_path.read_text())
    (record,) = document["objects"]
    assert record["area"] == 0 and record["bbox_xyxy"] is None
    assert len(document["notices"]) == 1 and "'a man'" in document["notices"][0]
    assert f"notice: {document['notices'][0]}" in capsys.readouterr().out

    # query=: the same record, the same null box and notice
    overrides = [*predict_overrides(blank_checkpoint, fixtures_dir / PHOTO, tmp_path / "q")]
    overrides += ["query=who is playing", "generation.max_new_tokens=4"]
    _, json_path = predict(compose_config(overrides, config_name="predict"))
    document = strict_json(json_path.read_text())
    assert document["area"] == 0 and document["bbox_xyxy"] is None
    assert len(document["notices"]) == 1 and "'who is playing'" in document["notices"][0]


def test_masks_found_keep_their_boxes_and_no_notice(
    compose_config: Callable[..., DictConfig], tiny_checkpoint: Path, fixtures_dir: Path, tmp_path: Path
) -> None:
    grounder = Grounder.from_checkpoint(tiny_checkpoint, device="cpu")
    hypernetwork_output(grounder).bias.data.fill_(1e3)  # every logit large: each mask covers the photo
    grounding = grounder.ground(fixtures_dir / PHOTO, PHRASES)
    text, notices = json_document({"objects": grounding.to_json()})
    height, width = grounding.masks.shape[1:]
    assert notices == [] and strict_json(text)["notices"] == []
    for record in strict_json(text)["objects"]:
        assert record["bbox_xyxy"] == [0.0, 0.0, width - 1.0, height - 1.0]


def test_nan_scores_are_written_as_null_with_a_notice(
    tiny_checkpoint: Path, fixtures_dir: Path, tmp_path: Path
) -> None:
    grounder = Grounder.from_checkpoint(tiny_checkpoint, device="cpu")
    hypernetwork_output(grounder).bias.data.fill_(float("nan"))
    grounding = grounder.ground(fixtures_dir / PHOTO, PHRASES)
    assert grounding.scores.isnan().all()
    assert "NaN" in json.dumps({"objects": grounding.to_json()})  # what a plain dump would have written
    text, notices = json_document({"objects": grounding.to_json()})
    document = strict_json(text)
    assert [record["mask_score"] for record in document["objects"]] == [None, None]
    assert any("objects[1].mask_score" in notice and "NaN" in notice for notice in notices)

    turn = grounder.chat(fixtures_dir / PHOTO, "What is in the image?", selector="given", phrases=["a"])
    _, json_path = write_turn(turn, tmp_path, 1)
    record = strict_json(json_path.read_text())
    assert all(phrase["mask_score"] is None and phrase["bbox_xyxy"] is None for phrase in record["phrases"])
    assert record["notices"]
