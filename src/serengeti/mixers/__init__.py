"""Sequence mixers. Configs point at these re-exports (``serengeti.mixers.<Name>``)."""
from serengeti.mixers.base import Mixer, StateError
from serengeti.mixers.attention import Attention
