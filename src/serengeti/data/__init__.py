"""Datamodules. Configs point at these re-exports (``serengeti.data.<Name>``)."""
from serengeti.data.synthetic_datamodule import SyntheticDataModule
from serengeti.data.text import LMDataModule, OpenWebText, Pile, TextFiles, TinyShakespeare, WikiText

from serengeti.registry import register_dataset

for _cls in (SyntheticDataModule, LMDataModule, OpenWebText, Pile, TextFiles, TinyShakespeare, WikiText):
    register_dataset(_cls)
