"""raydiff's Ray layer: every command that runs on a Ray cluster.

- ``runtime``: starting or joining Ray, whether the cluster can place a request (and waiting
  for an autoscaler), the ``TorchTrainer`` factory, reporting from workers, the run registry.
- ``train``: ``raydiff train``, DDP workers on Ray Train fed by Ray Data.
- ``tune``: ``raydiff tune``, Ray Tune searches over loss weights and ``t_align``.
- ``sample``: ``raydiff sample``, class-balanced sample folders from Ray Data actors.
- ``evaluate``: ``raydiff evaluate``, FID/KID/IS/PR with Ray Data feature actors.
- ``classify``: ``raydiff classify``, a downstream classifier on Ray Train.
- ``study``: ``raydiff study``, methods x seeds trained as a Tune grid, then sampled and
  evaluated.
- ``demo``: ``raydiff demo``, the whole pipeline on the built-in dataset.

Everything below this package (network, noise process, losses, samplers, engine, checkpoints,
metrics, feature extractors, data formats) runs without Ray.
"""
