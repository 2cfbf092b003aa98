"""ovlib — the library behind ovbook (open-vocabulary dense perception with CLIP).

One module per concern: ``ovlib.data`` (micro world, COCO-format datasets, regions, synonyms),
``ovlib.models`` (CLIP/VFM loading, ViT adapter, dense feature modes, pooling), ``ovlib.methods``
(one file per method), ``ovlib.train``, ``ovlib.eval``, ``ovlib.viz`` and ``ovlib.book`` (the runner).
"""

__version__ = "0.1.0"
