"""Tools around the pipeline: the `tickettune` command (predict, eval, repro, plan, package) and
what it runs. They use `tickettune.pipeline`; the pipeline never imports them.
"""
