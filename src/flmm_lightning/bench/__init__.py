"""``python -m flmm_lightning.bench``: training-step throughput of a configured model, per sample under eager
attention against batched under the fused capture.

The model, SAM and inputs come from ``conf/train.yaml`` composed with the same groups and overrides as
``train`` (``model=``, ``sam=``, ``data=``, ``module.*``), built by the same builders; the inputs are the
first batches of the training loader of ``data``. Paths, on identical inputs:

- ``per_sample_eager``: eager attention with ``output_attentions=True`` (every layer's full ``S x S``
  probabilities), one sample per LMM forward and per SAM encoder call, segment-anything's own encoder
  attention, one backward per sample (each loss weighted by its share of the batch's objects, so that the
  gradient is the batched path's), then one optimizer step. The F-LMM reference's way of running the LMM,
  but not all of it: the reference decodes SAM one object at a time and back-propagates once per batch.
- ``fast``: one batched LMM forward with the ``fused`` capture (SDPA; only the phrase rows' probabilities
  recomputed; the vision tower's windows in one packed SDPA call per block), the SAM encoder batched with its
  attention fused (``SdpaRelPosAttention``), the same losses, one backward, the same optimizer step.
- ``fast_cached``: ``fast`` with a warm SAM embedding cache (``SamEmbeddingCache``).
- ``fast_featcache``: ``fast_cached`` with the frozen LMM's features served by a warm feature cache
  (``feature_store``, ``data.feature_cache``): no LMM forward and no capture. The cache read (key hashing and
  reading the entries, dataloader-worker work in training) is timed on its own ("feature_cache_read") and set
  against the ``fast`` path's LMM forward + capture in ``feature_cache``.

A step is forward, losses, backward, gradient clipping (``trainer.gradient_clip_val``) and the module's
optimizer, under bf16 autocast on a GPU (Lightning's ``bf16-mixed``) and in fp32 on the CPU. The processor
(tokenizer, image processor, SAM resize) runs in dataloader workers during training, so it is timed on its
own ("processor", per batch) and left out of the step time; batches reach the device through the module's own
``transfer_batch_to_device``.

Each path runs ``--warmup`` untimed steps and one step for its peak memory; then ``--steps`` timed rounds
(samples/s) and ``--steps`` rounds with the device synchronised at every stage boundary (``stages``, ms per
step; "other" is the rest of the step: Python glue, cropping, token bookkeeping). A round is one step of
each path in turn, so that a change in the machine's load affects all paths alike. LMM FLOPs are counted by
``torch.utils.flop_counter`` for any family.

``--size`` shortcuts: ``tiny`` (train.yaml's defaults: the offline tiny assets) and ``qwen2_5_vl_3b`` (the
real Qwen2.5-VL-3B and SAM ViT-L architectures of ``+experiment=refcoco``, random weights, bf16 LMM, built on
the GPU: same FLOPs and memory as the released models, nothing downloaded; only the tiny asset's tokenizer and
chat template are read).
"""

from flmm_lightning.bench.steps import PATHS, STAGES

__all__ = ["PATHS", "STAGES"]
