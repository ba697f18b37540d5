"""Chat about a photo with a trained checkpoint: the frozen LMM answers, and what its answer names is
segmented.

CLI: ``python -m flmm_lightning.chat ckpt=<path> image=<file>`` reads one question per line from the
terminal (until end of input or ``exit``), with every earlier turn as history; ``question='...'`` asks one
question and exits. Each turn prints the answer with the grounded phrases in their masks' colours and
writes ``turn_<k>_overlay.png`` and ``turn_<k>.json`` (question, answer and per phrase its text, character
span, score, box and COCO RLE mask) into the run folder. In Python: ``Grounder.chat`` or
``conversation.Conversation``.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from omegaconf import DictConfig
from rich.console import Console
from rich.text import Text

from flmm_lightning.boundaries import ContextOverflowError
from flmm_lightning.config.composition import register_resolvers
from flmm_lightning.config.settings import (
    CHECKPOINT_GROUPS,
    chosen_checkpoint_groups,
    generation_settings,
    refuse_checkpoint_groups,
)
from flmm_lightning.data.images import ImageLimits, UnreadableImageError, load_photo
from flmm_lightning.inference.conversation import ChatInputError, Conversation, GroundedAnswer
from flmm_lightning.inference.grounder import Grounder, PhraseError, phrase_list
from flmm_lightning.outputs.overlays import object_color
from flmm_lightning.runs.build import output_dir_of
from flmm_lightning.runs.chat_turns import write_turn
from flmm_lightning.runs.folders import claim_run_dir, mark_latest
from flmm_lightning.runs.task import task_wrapper

register_resolvers()

# What ends an interactive session besides the end of input.
EXIT_WORDS = ("exit", "quit")
# Errors of one turn that the user fixes by asking again (interactive) or that end a one-shot run in one line.
TURN_ERRORS = (ChatInputError, ContextOverflowError, PhraseError)


def coloured_answer(turn: GroundedAnswer) -> Text:
    """The answer with each grounded phrase in its mask's colour (bold), as the overlay draws it."""
    text = Text(turn.answer)
    for index, phrase in enumerate(turn.phrases):
        red, green, blue = object_color(index)
        text.stylize(f"bold rgb({red},{green},{blue})", *phrase.char_span)
    return text


def print_turn(console: Console, turn: GroundedAnswer, overlay_path: Path, json_path: Path) -> None:
    console.print(Text("answer: ", style="bold") + coloured_answer(turn))
    if not turn.phrases:
        console.print(f"  (no phrase grounded; selector={turn.selector})")
    for index, phrase in enumerate(turn.phrases):
        red, green, blue = object_color(index)
        score = "" if phrase.score is None else f"  score {phrase.score:.2f}"
        line = Text(f"  {index + 1} ") + Text(phrase.text, style=f"bold rgb({red},{green},{blue})")
        console.print(line + Text(f"  box {phrase.box}{score}"))
    console.print(f"  overlay: {overlay_path}\n  json:    {json_path}")


def read_questions(stream: TextIO, console: Console) -> Iterator[str]:
    """Questions typed one per line, until the end of input, an exit word or Ctrl-C at the prompt; blank lines
    are skipped."""
    console.print(f"Ask about the image; {' or '.join(EXIT_WORDS)} (or end of input) ends the chat.")
    while True:
        console.print("[bold]you>[/bold] ", end="")
        try:
            line = stream.readline()
        except KeyboardInterrupt:  # Ctrl-C at the prompt ends the chat like an exit word
            console.print()
            return
        if not line or line.strip().lower() in EXIT_WORDS:
            return
        if line.strip():
            yield line.strip()


def chat(
    cfg: DictConfig, stream: TextIO | None = None, console: Console | None = None
) -> list[GroundedAnswer]:
    """Runs the conversation ``cfg`` describes (one turn with ``cfg.question``, else questions read from
    ``stream``, standard input by default); returns its turns."""
    refuse_checkpoint_groups(chosen_checkpoint_groups(cfg), "chat")
    console = console or Console()
    image_limits = ImageLimits.from_config(cfg.get("image_limits") or {})
    image = load_photo(Path(cfg.image), image_limits)  # before the model loads: a bad file fails in a second
    phrases = phrase_list(cfg.phrases) if cfg.get("phrases") is not None else None
    options = dict(selector=cfg.get("selector"), threshold=cfg.threshold, phrases=phrases)
    options.update(generation_settings(cfg))
    output_dir = output_dir_of(cfg)
    claim_run_dir(output_dir)
    patches = {key: cfg[key] for key in CHECKPOINT_GROUPS if cfg.get(key) is not None}
    grounder = Grounder.from_checkpoint(cfg.ckpt, device=cfg.device, paths=cfg.paths, overrides=patches)
    grounder.image_limits = image_limits
    output_dir.mkdir(parents=True, exist_ok=True)
    mark_latest(output_dir)
    conversation = Conversation(grounder, image)
    one_shot = cfg.get("question") is not None
    questions = [str(cfg.question)] if one_shot else read_questions(stream or sys.stdin, console)
    for question in questions:
        try:
            turn = conversation.ask(question, **options)
        except TURN_ERRORS as error:
            if one_shot:
                raise
            console.print(f"[red]{type(error).__name__}: {error}[/red]")
            continue
        except KeyboardInterrupt:
            # Ctrl-C while the LMM answers: the turn in flight is dropped, the earlier ones stay.
            if one_shot:
                raise
            console.print(
                f"[yellow]answer cancelled; the conversation keeps its {len(conversation.turns)} turns "
                "(Ctrl-C at the prompt or exit ends it)[/yellow]"
            )
            continue
        print_turn(console, turn, *write_turn(turn, output_dir, len(conversation.turns)))
    return conversation.turns


# A bad image, question or phrase list is the user's to fix: one line, no traceback.
@task_wrapper("chat", user_errors=(UnreadableImageError, *TURN_ERRORS), checkpoint_groups=True)
def chat_command(cfg: DictConfig) -> None:
    """The command line's work: the conversation; Ctrl-C (outside an interactive turn) ends it in a line."""
    try:
        chat(cfg)
    except KeyboardInterrupt:
        raise SystemExit("chat: cancelled") from None


main = chat_command.main

if __name__ == "__main__":
    main()
