"""Datamodules. Configs point at these re-exports (``serengeti.data.<Name>``)."""
from serengeti.data.synthetic_datamodule import SyntheticDataModule
from serengeti.data.lm import LMDataModule, OpenWebText, Pile, TextFiles, TinyShakespeare, WikiText
