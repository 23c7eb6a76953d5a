"""The pipeline's steps (:mod:`soho_core.pipeline.steps`, what each KFP component calls) and
its compile / local run / submit (:mod:`soho_core.pipeline.runner`)."""
