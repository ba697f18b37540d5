"""Running an entry point: building what a config names (``build``), reading and checking checkpoints
(``checkpoints``, ``pretrained``), the run folder (``folders``) and the wrapper every task runs in."""
