"""The target convention shared by every dataset and the loss.

``targets`` are int64 token ids aligned with ``inputs``; :data:`IGNORE_INDEX` marks a position that
is not scored (padding, the context of a synthetic query, the overlap of strided windows). It is
``torch.nn.functional.cross_entropy``'s default ``ignore_index``.
"""
IGNORE_INDEX = -100
