"""The training and inference pipeline: data -> plan -> model -> fit -> `TicketModel` -> predictions.

Nothing here grades, packages or serves; that is `tickettune.tools`.
"""
