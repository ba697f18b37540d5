"""``python -m flmm_lightning.app ckpt=<path> [port=7860 host=127.0.0.1 device=auto ...]`` (conf/app.yaml)."""

from __future__ import annotations

import os
import signal

from omegaconf import DictConfig

from flmm_lightning.app.limits import Limits
from flmm_lightning.app.sessions import SessionFolders
from flmm_lightning.config.composition import register_resolvers
from flmm_lightning.config.settings import (
    CHECKPOINT_GROUPS,
    chosen_checkpoint_groups,
    generation_settings,
    refuse_checkpoint_groups,
)
from flmm_lightning.inference.grounder import Grounder
from flmm_lightning.runs.task import task_wrapper

register_resolvers()


def _stop(signum: int, frame: object) -> None:
    # A service manager's SIGTERM ends the app as Ctrl-C does: Gradio closes, the temporary folder goes.
    raise KeyboardInterrupt


@task_wrapper("app", checkpoint_groups=True)
def serve(cfg: DictConfig) -> None:
    """Loads the checkpoint and serves the app until interrupted; every file it wrote goes with it."""
    refuse_checkpoint_groups(chosen_checkpoint_groups(cfg), "app")
    limits = Limits.from_config(cfg.limits, cfg.get("image_limits"))
    folders = SessionFolders(cfg.get("temp_dir"), float(cfg.session_idle_s))
    signal.signal(signal.SIGTERM, _stop)
    # Gradio caches uploads in GRADIO_TEMP_DIR, read when the server starts: inside this process's folder.
    os.environ["GRADIO_TEMP_DIR"] = str(folders.uploads)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise SystemExit("the web app needs its extra: pip install 'flmm-lightning[app]'") from None
    from flmm_lightning.app.handlers import AppService
    from flmm_lightning.app.ui import build_app

    try:
        patches = {key: cfg[key] for key in CHECKPOINT_GROUPS if cfg.get(key) is not None}
        grounder = Grounder.from_checkpoint(cfg.ckpt, device=cfg.device, paths=cfg.paths, overrides=patches)
        service = AppService(grounder, limits, folders, generation_settings(cfg))
        app = build_app(service, int(cfg.upload_ttl_s))
        app.queue(default_concurrency_limit=int(cfg.queue.concurrency), max_size=int(cfg.queue.max_size))
        app.launch(
            server_name=str(cfg.host),
            server_port=int(cfg.port),
            max_file_size=limits.max_file_bytes,
            allowed_paths=[str(folders.sessions)],
            show_error=True,
        )
    finally:
        folders.remove()


main = serve.main

if __name__ == "__main__":
    main()
