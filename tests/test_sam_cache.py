"""The on-disk SAM embedding cache: hits equal a recomputation, stale and corrupt entries are never used."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from flmm_lightning.assets.sam import build_tiny_sam
from flmm_lightning.config.composition import CONF_DIR
from flmm_lightning.heads.sam_cache import SamEmbeddingCache, image_key
from flmm_lightning.heads.sam_refiner import SamRefiner


def tiny_sam(seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_tiny_sam()


def images() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    # Resized SAM inputs (longer side 256), one landscape and one portrait.
    return [
        torch.randint(0, 256, (3, 192, 256), dtype=torch.uint8, generator=generator),
        torch.randint(0, 256, (3, 256, 170), dtype=torch.uint8, generator=generator),
    ]


@pytest.fixture(scope="module")
def sam():
    return tiny_sam(seed=0)


@pytest.fixture(scope="module")
def expected(sam) -> torch.Tensor:
    """What the cache must return: the encoder's output rounded to float16 (both images in one batch)."""
    return SamRefiner(sam).encode_images(images()).half().float()


@pytest.fixture(scope="module")
def expected_one_by_one(sam) -> torch.Tensor:
    """The same, each image encoded on its own: kernels may round differently at another batch size."""
    refiner = SamRefiner(sam)
    return torch.cat([refiner.encode_images([image]) for image in images()]).half().float()


def encoder_batch_sizes(refiner: SamRefiner) -> list[int]:
    """Records the batch size of every image-encoder call of ``refiner``."""
    sizes: list[int] = []
    refiner.sam.image_encoder.register_forward_hook(lambda _m, args, _o: sizes.append(args[0].shape[0]))
    return sizes


def test_cache_is_off_by_default(sam):
    assert SamRefiner(sam).embedding_cache is None
    assert OmegaConf.load(CONF_DIR / "sam" / "base" / "sam.yaml").refiner.embedding_cache is None
    for config in sorted((CONF_DIR / "sam").glob("*.yaml")):  # each composes the base
        assert OmegaConf.select(OmegaConf.load(config), "refiner.embedding_cache") is None, config.name


def test_a_hit_equals_recompute_and_round(sam, expected, tmp_path: Path):
    refiner = SamRefiner(sam, embedding_cache=tmp_path)
    first = refiner.encode_images(images())
    assert refiner.embedding_cache.stats.misses == 2 and refiner.embedding_cache.stats.writes == 2
    # A miss returns the rounded values too, so results do not depend on the cache's state.
    assert torch.equal(first, expected)

    again = SamRefiner(sam, embedding_cache=tmp_path)  # a new process would start like this
    second = again.encode_images(images())
    assert again.embedding_cache.stats.hits == 2
    assert torch.equal(second, expected)
    assert second.dtype == torch.float32 and second.shape == (2, *refiner.embedding_shape)


def test_only_misses_run_through_the_encoder_as_one_batch(sam, expected_one_by_one, tmp_path: Path):
    refiner = SamRefiner(sam, embedding_cache=tmp_path)
    sizes = encoder_batch_sizes(refiner)
    refiner.encode_images(images()[:1])
    output = refiner.encode_images(images())
    assert sizes == [1, 1]
    assert torch.equal(output, expected_one_by_one)
    output = refiner.encode_images(images())
    assert sizes == [1, 1]  # all hits: the encoder does not run
    assert torch.equal(output, expected_one_by_one)


@pytest.mark.parametrize("damage", ["truncate", "flip_payload_byte", "garbage"])
def test_a_corrupt_entry_is_recomputed_not_used(sam, expected_one_by_one, tmp_path: Path, damage: str):
    first = SamRefiner(sam, embedding_cache=tmp_path)
    for image in images():
        first.encode_images([image])
    cache = SamEmbeddingCache(tmp_path)
    entry = cache.path(image_key(images()[0]))
    data = bytearray(entry.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip_payload_byte":
        data[-10] ^= 0xFF
    else:
        data = bytearray(b"not an entry")
    entry.write_bytes(bytes(data))

    refiner = SamRefiner(sam, embedding_cache=tmp_path)
    sizes = encoder_batch_sizes(refiner)
    output = refiner.encode_images(images())
    stats = refiner.embedding_cache.stats
    assert (stats.corrupt, stats.hits, stats.writes) == (1, 1, 1)
    assert sizes == [1]
    assert torch.equal(output, expected_one_by_one)
    # The entry was rewritten whole: the next read is a hit.
    assert (
        refiner.embedding_cache.load(image_key(images()[0]), refiner.encoder_id, refiner.embedding_shape)
        is not None
    )


def test_a_wrong_shape_entry_is_recomputed_not_used(sam, expected_one_by_one, tmp_path: Path):
    refiner = SamRefiner(sam, embedding_cache=tmp_path)
    key = image_key(images()[0])
    # Right encoder and key, but a payload of another shape (e.g. written by a buggy or older writer).
    refiner.embedding_cache.store(key, refiner.encoder_id, torch.zeros(8, 4, 4))
    output = refiner.encode_images(images()[:1])
    assert refiner.embedding_cache.stats.corrupt == 1
    assert torch.equal(output, expected_one_by_one[:1])


def test_a_stale_entry_from_another_encoder_is_recomputed_not_used(sam, expected, tmp_path: Path):
    SamRefiner(sam, embedding_cache=tmp_path).encode_images(images())
    other_sam = tiny_sam(seed=1)
    other = SamRefiner(other_sam, embedding_cache=tmp_path)
    assert other.encoder_id != SamRefiner(sam).encoder_id
    output = other.encode_images(images())
    assert other.embedding_cache.stats.stale == 2 and other.embedding_cache.stats.hits == 0
    assert torch.equal(output, SamRefiner(other_sam).encode_images(images()).half().float())
    assert not torch.equal(output, expected)

    # The entries now belong to the other encoder; the first one sees them as stale in turn.
    first_again = SamRefiner(sam, embedding_cache=tmp_path)
    assert torch.equal(first_again.encode_images(images()), expected)
    assert first_again.embedding_cache.stats.stale == 2


def test_image_key_depends_on_content_and_size():
    image = images()[0]
    changed = image.clone()
    changed[0, 0, 0] ^= 1
    assert image_key(image) == image_key(image.clone())
    assert image_key(image) != image_key(changed)
    assert image_key(image) != image_key(image.reshape(3, 256, 192))
