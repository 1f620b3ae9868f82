"""`flower predict --runner beam`: the same scoring as `flower predict`, spread over Apache Beam's workers.

The launcher lists the inputs (`inputs.py`: local paths as `flower predict` walks them, gs:// through Beam's file
systems) into a manifest, copies the model into a work folder (`model.py`), runs the pipeline (`run.py`: read,
RunInference with the project's own inference path, CSV shards and metrics) and merges the shards into one CSV in
input order (`shards.py`). This package is the only one that imports apache_beam (the `beam` extra).
"""
