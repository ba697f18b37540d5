"""Inference around the model core (``core.FLMM``), with no file or command-line I/O: ``grounder.Grounder``
(the public API, loaded from a checkpoint), the one answer -> read -> select -> decode pipeline
(``pipeline``) and what runs on it: grounded conversation (``conversation``), reasoning segmentation
(``reasoning``), attention inspection (``inspection``) and ground-what-you-say scoring (``narration``).
The entry points (``predict``, ``chat``, ``app``, ``train``, ``batch_predict``) import this package; the
training module's ReasonSeg evaluation runs on ``pipeline.GroundingRunner``."""
