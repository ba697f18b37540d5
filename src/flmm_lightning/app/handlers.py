"""What each request of the web app does, over the public ``Grounder`` API: check the inputs against the
limits, call the grounder, and turn its answer into what the page shows and the downloads."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import gradio as gr
from PIL import Image, ImageDraw

from flmm_lightning.app.limits import AppInputError, Limits, checked_phrases, checked_question, read_photo
from flmm_lightning.app.sessions import SessionFolders, UploadError
from flmm_lightning.boundaries import ContextOverflowError
from flmm_lightning.data.images import UnreadableImageError
from flmm_lightning.inference.conversation import ChatInputError, GroundedAnswer
from flmm_lightning.inference.grounder import Grounder, PhraseError
from flmm_lightning.inference.inspection import AttentionView
from flmm_lightning.outputs.documents import empty_mask_notices, finite_values, json_document
from flmm_lightning.outputs.overlays import object_hex_color, overlay_heatmap, overlay_masks
from flmm_lightning.runs.chat_turns import write_turn

# Errors a user fixes by changing the request: shown as the request's error message, the app goes on.
USER_ERRORS = (
    AppInputError,
    UnreadableImageError,
    UploadError,
    ChatInputError,
    ContextOverflowError,
    PhraseError,
)


@contextlib.contextmanager
def shown_to_user() -> Iterator[None]:
    try:
        yield
    except USER_ERRORS as error:
        raise gr.Error(str(error), print_exception=False) from error


@dataclass
class LookSession:
    """The attention read last (question, answer and photo it was read for), reused for other words,
    layers, heads and boxes."""

    key: tuple[str, str, str, int]  # photo, question, answer ("": the LMM's), earlier turns in the prompt
    view: AttentionView
    notice: str

    def holds(self, key: tuple[str, str, str, int]) -> bool:
        """Whether this is the read ``key`` asks for (the answer the LMM gave counts as given)."""
        photo, question, _, turns = self.key
        return key in (self.key, (photo, question, self.view.answer.strip(), turns))


def parse_box(text: str | None) -> tuple[float, ...] | None:
    """``"x0, y0, x1, y1"`` (commas or spaces) -> four numbers; blank -> None."""
    if not (text or "").strip():
        return None
    try:
        box = tuple(float(value) for value in text.replace(",", " ").split())
    except ValueError:
        box = ()
    if len(box) != 4:
        raise AppInputError(f"a box is four numbers x0, y0, x1, y1 (pixels), got {text!r}")
    return box


def parse_index(text: str | int | None, name: str, count: int, mean: bool = True) -> int | None:
    """An index in ``[0, count)``; ``"mean"`` (where ``mean``) or blank -> None."""
    if text is None or str(text).strip() in ("", "mean" if mean else ""):
        return None
    try:
        index = int(str(text).strip())
    except ValueError:
        index = -1
    if not 0 <= index < count:
        allowed = f"'mean' or a number from 0 to {count - 1}" if mean else f"a number from 0 to {count - 1}"
        raise AppInputError(f"{name} must be {allowed}, got {text!r}")
    return index


def chat_history(chat: ChatSession | None, photo: str, question: str, answer: str) -> list[GroundedAnswer]:
    """The earlier chat turns when ``question`` and ``answer`` are the chat's last turn about ``photo``
    (so that the turn is read with the prompt it was answered with), else none."""
    if chat is None or not chat.turns or chat.photo != photo:
        return []
    last = chat.turns[-1]
    return chat.turns[:-1] if (last.question.strip(), last.answer.strip()) == (question, answer) else []


def word_choices(view: AttentionView) -> list[tuple[str, int]]:
    return [(f"{k}: {word.text} ({word.part})", k) for k, word in enumerate(view.words)]


@dataclass
class ChatSession:
    """A conversation about one uploaded photo (a new photo starts a new one)."""

    photo: str
    image: Image.Image
    notice: str
    turns: list[GroundedAnswer] = field(default_factory=list)


def highlighted(turn: GroundedAnswer, shown: Sequence[int]) -> gr.HighlightedText:
    """The answer with each shown phrase labelled by its number, in its mask's colour."""
    spans = sorted((turn.phrases[k].char_span, k) for k in shown)
    pieces: list[tuple[str, str | None]] = []
    end = 0
    for (first, last), k in spans:
        if first < end:  # overlapping spans: the earlier phrase keeps the shared text
            continue
        if first > end:
            pieces.append((turn.answer[end:first], None))
        pieces.append((turn.answer[first:last], str(k + 1)))
        end = last
    if end < len(turn.answer):
        pieces.append((turn.answer[end:], None))
    colors = {str(k + 1): object_hex_color(k) for k in range(len(turn.phrases))}
    return gr.HighlightedText(value=pieces, color_map=colors)


def chat_messages(session: ChatSession | None) -> list[dict[str, str]]:
    messages = []
    for turn in session.turns if session else []:
        messages += [
            {"role": "user", "content": turn.question},
            {"role": "assistant", "content": turn.answer},
        ]
    return messages


def last_turn_texts(session: ChatSession | None) -> tuple[str, str]:
    """The question and answer of the chat's last turn (to look inside it)."""
    if session is None or not session.turns:
        raise gr.Error("ask something in the Chat tab first", print_exception=False)
    return session.turns[-1].question, session.turns[-1].answer


def pick_corner(corner: list[float] | None, event: gr.SelectData) -> tuple[Any, Any]:
    """A click on the heat-map: the first marks a corner, the second the opposite one (the box)."""
    x, y = (float(value) for value in event.index)
    if corner is None:
        return [x, y], gr.skip()
    (x0, x1), (y0, y1) = sorted((corner[0], x)), sorted((corner[1], y))
    return None, f"{x0:g}, {y0:g}, {x1:g}, {y1:g}"


def notify(notice: str) -> None:
    if notice:
        gr.Warning(notice)


def chat_notices(turn: GroundedAnswer) -> list[str]:
    """What a person should know about a turn's result: nothing grounded, or phrases without a mask."""
    if not turn.phrases:
        return [f"No phrase of the answer was grounded (selector: {turn.selector})."]
    return [
        f"No mask for {phrase.text!r}: no pixel of the photo was assigned to it."
        for phrase in turn.phrases
        if not bool(phrase.mask.any())
    ]


def box_cells(box: list[float] | None) -> list[float | None]:
    return [None] * 4 if box is None else [round(v, 1) for v in box]


class AppService:
    """The app's requests over one ``Grounder`` (one model per process)."""

    def __init__(
        self, grounder: Grounder, limits: Limits, folders: SessionFolders, generation: dict[str, Any]
    ):
        self.grounder = grounder
        self.limits = limits
        self.folders = folders
        self.generation = generation

    @property
    def has_keyword_selector(self) -> bool:
        return getattr(self.grounder.model.lmm, "keyword_selector", None) is not None

    def chat(
        self,
        photo: str | None,
        question: str,
        selector: str,
        threshold: float,
        phrases: str,
        session: ChatSession | None,
        request: gr.Request,
        progress: gr.Progress = gr.Progress(),  # noqa: B008 (Gradio's way of asking for a progress bar)
    ) -> tuple[Any, ...]:
        """One turn about ``photo``; the earlier turns about the same photo are its history."""
        with self.folders.in_use(request.session_hash), shown_to_user():
            source = self.folders.own_copy(request.session_hash, photo)
            question = checked_question(question, self.limits)
            given = checked_phrases(phrases, self.limits) if selector == "given" else None
            if session is None or session.photo != str(photo):
                session = ChatSession(str(photo), *read_photo(source, self.limits))
            notify(session.notice)
            progress(0.1, desc="The LMM is answering…")
            turn = self.grounder.chat(
                session.image,
                question,
                history=session.turns,
                selector=selector,
                threshold=threshold,
                phrases=given,
                **self.generation,
            )
        session.turns.append(turn)
        folder = self.folders.folder(request.session_hash)
        overlay_path, json_path = write_turn(turn, folder, len(session.turns))
        shown = list(range(len(turn.phrases)))
        choices = [(f"{k + 1} {phrase.text}", k) for k, phrase in enumerate(turn.phrases)]
        return (
            session,
            chat_messages(session),
            highlighted(turn, shown),
            str(overlay_path),
            gr.CheckboxGroup(choices=choices, value=shown),
            [str(overlay_path), str(json_path)],
            "\n\n".join(filter(None, [session.notice, *chat_notices(turn)])),
        )

    def show_phrases(
        self, shown: list[int] | None, session: ChatSession | None, request: gr.Request
    ) -> tuple[Any, ...]:
        """The last answer and its overlay with only the ``shown`` phrases (same colours and numbers)."""
        if session is None or not session.turns:
            return None, None
        turn = session.turns[-1]
        shown = sorted(k for k in shown or [] if 0 <= k < len(turn.phrases))
        masks = turn.masks[shown] if shown else turn.masks[:0]
        overlay = overlay_masks(turn.image, masks, [turn.phrases[k].text for k in shown], color_indices=shown)
        path = self.folders.folder(request.session_hash) / f"turn_{len(session.turns):02d}_shown.png"
        overlay.save(path)
        return highlighted(turn, shown), str(path)

    def ground(
        self,
        photo: str | None,
        phrases: str,
        request: gr.Request,
        progress: gr.Progress = gr.Progress(),  # noqa: B008
    ) -> tuple[Any, ...]:
        """Masks, scores, boxes and areas of the typed phrases (referring segmentation)."""
        with self.folders.in_use(request.session_hash), shown_to_user():
            source = self.folders.own_copy(request.session_hash, photo)
            phrases = checked_phrases(phrases, self.limits)
            image, notice = read_photo(source, self.limits)
            notify(notice)
            progress(0.1, desc="Grounding…")
            grounding = self.grounder.ground(image, phrases)
        folder = self.folders.folder(request.session_hash)
        number = len(list(folder.glob("ground_*.json"))) + 1
        overlay_path = folder / f"ground_{number:02d}_overlay.png"
        overlay_masks(grounding.image, grounding.masks, grounding.phrases).save(overlay_path)
        records, _ = finite_values(grounding.to_json())
        json_path = folder / f"ground_{number:02d}.json"
        text, notices = json_document({"objects": grounding.to_json()}, empty_mask_notices(records))
        json_path.write_text(text)
        rows = [
            [
                k + 1,
                record["phrase"],
                None if record["mask_score"] is None else round(record["mask_score"], 3),
                *box_cells(record["bbox_xyxy"]),
                record["area"],
            ]
            for k, record in enumerate(records)
        ]
        shown = "\n\n".join(filter(None, [notice, *notices]))
        return str(overlay_path), rows, [str(overlay_path), str(json_path)], shown

    def attention(
        self,
        photo: str | None,
        question: str,
        answer: str,
        word: int | str | None,
        layer: str,
        head: str,
        box: str,
        session: LookSession | None,
        chat: ChatSession | None,
        request: gr.Request,
        progress: gr.Progress = gr.Progress(),  # noqa: B008
    ) -> tuple[Any, ...]:
        """``word``'s attention heat-map over the photo (mean or one layer / head) and, given a box, the
        answer's words ranked by the share of their attention inside it. The attention is read once per
        photo, question and answer (an empty answer: the LMM answers first); the chat's last turn is read
        with the chat's earlier turns as history."""
        with self.folders.in_use(request.session_hash), shown_to_user():
            source = self.folders.own_copy(request.session_hash, photo)
            question = checked_question(question, self.limits)
            answer = (answer or "").strip()
            own_answer = chat is not None and any(turn.answer.strip() == answer for turn in chat.turns)
            if not own_answer and len(answer) > self.limits.max_answer_chars:
                raise AppInputError(
                    f"the answer has {len(answer)} characters; the limit for a typed answer is "
                    f"{self.limits.max_answer_chars}: shorten it"
                )
            history = chat_history(chat, str(photo), question, answer)
            key = (str(photo), question, answer, len(history))
            if session is None or not session.holds(key):
                image, notice = read_photo(source, self.limits)
                notify(notice)
                progress(0.1, desc="Reading the LMM's attention…")
                view = self.grounder.attention(image, question, answer or None, history, **self.generation)
                session = LookSession(key, view, notice)
            view = session.view
            word = parse_index(word, "word", len(view.words), mean=False) or 0
            layer_index = parse_index(layer, "layer", view.num_layers)
            head_index = parse_index(head, "head", view.num_heads)
            region = parse_box(box)
            try:
                ranked = view.rank_region(region) if region is not None else []
            except ValueError as error:
                raise AppInputError(str(error)) from error
        heat = overlay_heatmap(view.image, view.heatmap(word, layer_index, head_index))
        if region is not None:
            ImageDraw.Draw(heat).rectangle(region, outline=(255, 255, 255), width=3)
        folder = self.folders.folder(request.session_hash)
        path = folder / f"attention_{len(list(folder.glob('attention_*.png'))) + 1:03d}.png"
        heat.save(path)
        ranking = [[k, view.words[k].text, round(share, 4)] for k, share in ranked]
        layers = ["mean", *map(str, range(view.num_layers))]
        heads = ["mean", *map(str, range(view.num_heads))]
        return (
            session,
            str(path),
            gr.Dropdown(choices=word_choices(view), value=word),
            gr.Dropdown(choices=layers, value=layers[0 if layer_index is None else layer_index + 1]),
            gr.Dropdown(choices=heads, value=heads[0 if head_index is None else head_index + 1]),
            view.answer,
            ranking,
            session.notice,
        )

    def keep_upload(self, photo: str | None, request: gr.Request) -> None:
        """The session's own copy of a photo, made as soon as it is uploaded (another tab or the upload
        cache's time-to-live may remove the cached file before the first request)."""
        with shown_to_user():
            self.folders.own_copy(request.session_hash, photo)

    def close_session(self, request: gr.Request) -> None:
        """Removes what the session sent and what was written for it (its tab closed)."""
        self.folders.close(request.session_hash)
