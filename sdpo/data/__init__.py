"""The data layer: the synthetic world, Pick-a-Pic ingestion to WebDataset shards, and the training loaders.

- :mod:`sdpo.data.synthetic`: prompts, renderer and judge of the toy world; pairs in the Pick-a-Pic v2 schema.
- :mod:`sdpo.data.pickapic`: streaming parquet validation into shards (:func:`sdpo.data.pickapic.ingest`).
- :mod:`sdpo.data.shards`: deterministic tar writer, manifest, atomic publishing, ``dataset_digest``.
- :mod:`sdpo.data.loader`: :class:`~sdpo.data.loader.PairDataset`, :class:`~sdpo.data.loader.PairLoader` (resumable,
  DDP-safe), the streaming WebDataset pipeline and :func:`~sdpo.data.loader.load_pairs_arrays`.

Import the submodules directly; this package imports nothing heavy.
"""
