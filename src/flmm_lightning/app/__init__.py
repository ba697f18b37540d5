"""The web app (``pip install flmm-lightning[app]``): chat with a photo and ground phrases in it, in a
browser or through Gradio's API (``/chat``, ``/ground``). ``python -m flmm_lightning.app ckpt=<path>``
serves one model; the app holds no model logic, it calls ``flmm_lightning.inference.grounder.Grounder``."""
