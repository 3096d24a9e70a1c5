"""Long-tailed dataset builders, Parquet storage and class resampling.

Modules, by job (none imports Ray; import them directly, this package loads nothing):

- ``longtail``: the exponential profile n_c = int(n_max * (1/IR)^(c/(C-1))) and the released
  code's selection rule, shared by every builder.
- ``cifar``, ``imagefiles``, ``shapes``: the sources (CIFAR pickles; ImageNet-LT / Places-LT
  split lists and class-per-folder trees; a built-in procedural dataset).
- ``images``: decode, center-crop and resize, PNG encode and decode.
- ``parquet``: the on-disk format and the reading helpers (``load_info``, ``split_paths``,
  ``read_split``, ``decode_batch``); ``dataset``: a split as a torch ``Dataset``.
- ``prepare``: the ``raydiff prepare`` command, writing both splits atomically.
- ``resample``: batch resampling (BRS) of the training split.
- ``feature_rows``: the reference-feature cache entry of ``raydiff evaluate``, written row by
  row and read in chunks.
"""
