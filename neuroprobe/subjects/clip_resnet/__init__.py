"""OpenAI CLIP's ResNet models (RN50, RN101, RN50x4) ported to plain torch.

``config`` (published shapes), ``model`` (the port), ``load`` (reading OpenAI's files
strictly), ``subject`` (sites, streams, the zero-shot readout).
"""
