"""The page: one photo for three tabs (Chat, Ground, Look inside), each wired to one named API endpoint
(``/chat``, ``/ground``, ``/attention``)."""

from __future__ import annotations

from typing import Any

import gradio as gr

from flmm_lightning.app.handlers import AppService, last_turn_texts, pick_corner
from flmm_lightning.inference.conversation import SELECTORS
from flmm_lightning.selection import KEYWORD_THRESHOLD

INTRO = (
    "## flmm-lightning\nAsk about a photo: the frozen LMM answers, and the phrases of its answer that name "
    "things in the photo are segmented, each in its own colour. *Look inside* shows where each word looks."
)
DOWNLOADS = "Downloads (overlay PNG, JSON)"
RANKING = "Answer words by their attention's share in the box"
# Every request that runs the model waits in one queue: one model per process, and Gradio's concurrency
# limit (queue.concurrency) counts per event unless events share an id.
MODEL = {"concurrency_id": "model"}


def uploaded_path(payload: Any) -> str | None:
    """The photo's value for the handlers: the uploaded file's path, not opened (they check first that it is
    this session's upload and that its header is within limits)."""
    return None if payload is None else payload.path


def photo_input() -> gr.Image:
    """The photo, shown as a picture. ``gr.Image`` would open the file before the handlers run (and fail with
    a raw error once the upload has expired); this one hands over its path. (Not a subclass: Gradio writes
    a ``.pyi`` stub beside the module of every component subclass.)"""
    photo = gr.Image(
        label="Photo", type="filepath", image_mode=None, sources=["upload", "clipboard"], elem_id="photo"
    )
    photo.preprocess = uploaded_path
    return photo


def chat_tab(service: AppService, photo: gr.Image, session: gr.State) -> None:
    with gr.Row():
        with gr.Column():
            question = gr.Textbox(label="Question", placeholder="What is in the photo?", elem_id="question")
            with gr.Accordion("Phrase selection", open=False):
                default = "keywords" if service.has_keyword_selector else "lmm"
                selector = gr.Radio(list(SELECTORS), value=default, label="Selector")
                threshold = gr.Slider(0.0, 1.0, value=KEYWORD_THRESHOLD, step=0.05, label="Keyword threshold")
                phrases = gr.Textbox(label="Phrases to ground (selector 'given'; one per line)", lines=3)
            ask = gr.Button("Ask", variant="primary", elem_id="ask")
            history = gr.Chatbot(label="Conversation", height=240)
        with gr.Column():
            answer = gr.HighlightedText(label="Answer", elem_id="answer", combine_adjacent=False)
            shown = gr.CheckboxGroup(label="Phrases shown", choices=[], elem_id="shown")
            overlay = gr.Image(label="Overlay", type="filepath", interactive=False, elem_id="overlay")
            notice = gr.Markdown(elem_id="notice")
            downloads = gr.File(label=DOWNLOADS, file_count="multiple", interactive=False)
    outputs = [session, history, answer, overlay, shown, downloads, notice]
    inputs = [photo, question, selector, threshold, phrases, session]
    ask.click(service.chat, inputs, outputs, api_name="chat", **MODEL)
    question.submit(service.chat, inputs, outputs, api_visibility="private", **MODEL)
    shown.input(service.show_phrases, [shown, session], [answer, overlay], api_visibility="private")
    photo.change(lambda: (None, [], None, None), None, [session, history, answer, overlay], queue=False)


def ground_tab(service: AppService, photo: gr.Image) -> None:
    with gr.Row():
        with gr.Column():
            phrases = gr.Textbox(label="Phrases (one per line)", lines=4, placeholder="a man\nthe ball")
            run = gr.Button("Ground", variant="primary")
        with gr.Column():
            overlay = gr.Image(label="Masks", type="filepath", interactive=False)
            table = gr.Dataframe(
                headers=["#", "phrase", "score", "x0", "y0", "x1", "y1", "area (px)"],
                interactive=False,
                label="Boxes",
            )
            notice = gr.Markdown()
            downloads = gr.File(label=DOWNLOADS, file_count="multiple", interactive=False)
    outputs = [overlay, table, downloads, notice]
    run.click(service.ground, [photo, phrases], outputs, api_name="ground", **MODEL)


def look_inside_tab(service: AppService, photo: gr.Image, chat_session: gr.State) -> None:
    session, corner = gr.State(None), gr.State(None)
    with gr.Row():
        with gr.Column():
            question = gr.Textbox(label="Question", elem_id="look-question")
            answer = gr.Textbox(label="Answer (empty: the LMM answers)", lines=2, elem_id="look-answer")
            with gr.Row():
                from_chat = gr.Button("Use the last chat turn")
                look = gr.Button("Look", variant="primary", elem_id="look")
            # the choices come with each read; the API may name any word, layer or head (checked there)
            word = gr.Dropdown(label="Word", choices=[], value=None, allow_custom_value=True, elem_id="word")
            with gr.Row():
                layer = gr.Dropdown(label="Layer", choices=["mean"], value="mean", allow_custom_value=True)
                head = gr.Dropdown(label="Head", choices=["mean"], value="mean", allow_custom_value=True)
            box = gr.Textbox(
                label="Box x0, y0, x1, y1 (pixels; or click two corners on the heat-map)", elem_id="box"
            )
            ranking = gr.Dataframe(
                headers=["word", "text", "share in box"], interactive=False, label=RANKING, elem_id="ranking"
            )
        with gr.Column():
            heatmap = gr.Image(label="Attention", type="filepath", interactive=False, elem_id="heatmap")
            notice = gr.Markdown()
    inputs = [photo, question, answer, word, layer, head, box, session, chat_session]
    outputs = [session, heatmap, word, layer, head, answer, ranking, notice]
    look.click(service.attention, inputs, outputs, api_name="attention", **MODEL)
    for control in (word, layer, head):
        control.input(service.attention, inputs, outputs, api_visibility="private", **MODEL)
    box.submit(service.attention, inputs, outputs, api_visibility="private", **MODEL)
    heatmap.select(pick_corner, corner, [corner, box], api_visibility="private").then(
        service.attention, inputs, outputs, api_visibility="private", **MODEL
    )
    from_chat.click(last_turn_texts, chat_session, [question, answer], api_visibility="private")
    for text in (question, answer):
        text.input(lambda: None, None, word, queue=False, api_visibility="private")


def build_app(service: AppService, upload_ttl_s: int = 900) -> gr.Blocks:
    """The app; uploads older than ``upload_ttl_s`` seconds are deleted from Gradio's cache."""
    cleaning = (max(1, upload_ttl_s // 2), upload_ttl_s)
    # Downloads are served from the session's folder, not copied into Gradio's cache: closing the session
    # removes every copy.
    gr.set_static_paths([str(service.folders.sessions)])
    with gr.Blocks(title="flmm-lightning", analytics_enabled=False, delete_cache=cleaning) as app:
        gr.Markdown(INTRO)
        photo = photo_input()
        photo.upload(service.keep_upload, photo, None, queue=False, api_visibility="private")
        chat_session = gr.State(None)
        with gr.Tab("Chat"):
            chat_tab(service, photo, chat_session)
        with gr.Tab("Ground"):
            ground_tab(service, photo)
        with gr.Tab("Look inside", elem_id="look-inside-tab"):
            look_inside_tab(service, photo, chat_session)
        app.unload(service.close_session)
    return app
