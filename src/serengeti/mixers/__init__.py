"""Sequence mixers. Configs point at these re-exports (``serengeti.mixers.<Name>``)."""
from serengeti.mixers.base import Mixer, StateError
from serengeti.mixers.attention import Attention
from serengeti.mixers.h3 import H3, H3State
from serengeti.mixers.s5 import S5, S5State
from serengeti.mixers.hyena import Hyena, HyenaState
from serengeti.mixers.long_conv import LongConv, LongConvState
from serengeti.mixers.hyena_s5 import HyenaS5, HyenaS5State

from serengeti.registry import register_mixer

for _cls in (Attention, H3, S5, Hyena, LongConv, HyenaS5):
    register_mixer(_cls)
