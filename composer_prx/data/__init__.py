"""Data: aspect-ratio buckets, the MDS converter CLI, the streaming image–caption dataset, synthetic shapes.

Submodules are imported on use (``from composer_prx.data.dataset import build_dataloader``) so that
importing this package stays free of torch / streaming / PIL.
"""
