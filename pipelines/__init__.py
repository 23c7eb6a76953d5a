"""The SOHO pipeline DAG (:mod:`pipelines.soho`). Compile, run locally and submit with
``soho pipeline compile|run|submit`` (:mod:`soho_core.pipeline.runner`)."""
