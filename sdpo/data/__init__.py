"""The data layer: the synthetic world, Pick-a-Pic ingestion to WebDataset shards, and the training loaders.

- :mod:`sdpo.data.synthetic`: prompts, renderer and judge of the toy world; pairs in the Pick-a-Pic v2 schema.
- :mod:`sdpo.data.pickapic`: streaming parquet validation into shards (:func:`sdpo.data.pickapic.ingest`).
- :mod:`sdpo.data.sources`: input files, folders, globs and URIs; unreachable inputs are one-line errors.
- :mod:`sdpo.data.normalize`: honest image normalisation (EXIF, alpha, 16 bit) and the visible-caption check.
- :mod:`sdpo.data.shards`: deterministic tar writer, manifest, atomic publishing, ``dataset_digest``, shard index.
- :mod:`sdpo.data.integrity`: :func:`~sdpo.data.integrity.verify_dataset`, run by every consumer, with cached
  verdicts.
- :mod:`sdpo.data.loader`: :class:`~sdpo.data.loader.PairDataset`, :class:`~sdpo.data.loader.PairLoader` (resumable,
  DDP-safe), the streaming WebDataset pipeline and :func:`~sdpo.data.loader.load_pairs_arrays`.

Import the submodules directly; this package imports nothing heavy.
"""
