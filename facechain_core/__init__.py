"""FaceChain core: the ML engine (face analysis, selfie checks, pipelines, models).

It imports nothing of the bot or the handlers.
"""
