"""Folder -> labelled files -> pictures -> uint8 batches -> the model's input on the device.
May import the top-level helpers (errors, files, ui, config) only; never model/, outputs/, commands/."""
