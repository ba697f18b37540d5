"""The page: a Chat tab and a Ground tab, each wired to one named API endpoint (``/chat``, ``/ground``)."""

from __future__ import annotations

import gradio as gr

from flmm_lightning.app.handlers import AppService
from flmm_lightning.conversation import SELECTORS
from flmm_lightning.selection import KEYWORD_THRESHOLD

INTRO = (
    "## flmm-lightning\nAsk about a photo: the frozen LMM answers, and the phrases of its answer that name "
    "things in the photo are segmented, each in its own colour."
)
PHOTO_TYPES = ["image"]
DOWNLOADS = "Downloads (overlay PNG, JSON)"


def chat_tab(service: AppService) -> None:
    session = gr.State(None)
    with gr.Row():
        with gr.Column():
            photo = gr.File(label="Photo", file_types=PHOTO_TYPES, elem_id="chat-photo")
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
            downloads = gr.File(
                label="Downloads (overlay PNG, JSON)", file_count="multiple", interactive=False
            )
    outputs = [session, history, answer, overlay, shown, downloads, notice]
    inputs = [photo, question, selector, threshold, phrases, session]
    ask.click(service.chat, inputs, outputs, api_name="chat")
    question.submit(service.chat, inputs, outputs, api_visibility="private")
    shown.input(service.show_phrases, [shown, session], [answer, overlay], api_visibility="private")
    photo.change(lambda: (None, [], None, None), None, [session, history, answer, overlay], queue=False)


def ground_tab(service: AppService) -> None:
    with gr.Row():
        with gr.Column():
            photo = gr.File(label="Photo", file_types=PHOTO_TYPES)
            phrases = gr.Textbox(label="Phrases (one per line)", lines=4, placeholder="a man\nthe ball")
            run = gr.Button("Ground", variant="primary")
        with gr.Column():
            overlay = gr.Image(label="Masks", type="filepath", interactive=False)
            table = gr.Dataframe(
                headers=["#", "phrase", "x0", "y0", "x1", "y1", "area (px)"], interactive=False, label="Boxes"
            )
            notice = gr.Markdown()
            downloads = gr.File(
                label="Downloads (overlay PNG, JSON)", file_count="multiple", interactive=False
            )
    run.click(service.ground, [photo, phrases], [overlay, table, downloads, notice], api_name="ground")


def build_app(service: AppService, upload_ttl_s: int = 900) -> gr.Blocks:
    """The app; uploads older than ``upload_ttl_s`` seconds are deleted from Gradio's cache."""
    cleaning = (max(1, upload_ttl_s // 2), upload_ttl_s)
    # Downloads are served from the session's folder, not copied into Gradio's cache: closing the session
    # removes every copy.
    gr.set_static_paths([str(service.folders.sessions)])
    with gr.Blocks(title="flmm-lightning", analytics_enabled=False, delete_cache=cleaning) as app:
        gr.Markdown(INTRO)
        with gr.Tab("Chat"):
            chat_tab(service)
        with gr.Tab("Ground"):
            ground_tab(service)
        app.unload(service.close_session)
    return app
