"""fastddpm.pretrained.load_exported names the file that is actually missing."""

from __future__ import annotations

import pytest

from fastddpm import pretrained


def test_missing_weights_named_before_metadata(tmp_path):
    # Both the weights and the .json are missing: the weights path is the user's mistake, so it is named.
    w = tmp_path / "x.safetensors"
    with pytest.raises(FileNotFoundError) as ei:
        pretrained.load_exported(str(w))
    msg = str(ei.value)
    assert f"{w}: the weights file is missing" in msg and "metadata" not in msg


def test_weights_path_is_a_folder(tmp_path):
    w = tmp_path / "x.safetensors"
    w.mkdir()
    with pytest.raises(FileNotFoundError, match="the weights file is a folder, not a file"):
        pretrained.load_exported(str(w))


def test_missing_metadata_still_named(tmp_path):
    w = tmp_path / "x.safetensors"
    w.write_bytes(b"not read before the metadata check")
    with pytest.raises(FileNotFoundError, match=r"its metadata .*x\.json is missing"):
        pretrained.load_exported(str(w))


def test_load_names_the_model_flag(tmp_path):
    # load() is what `sample --model` / `eval --model` call: the message names the flag that gave the path
    w = tmp_path / "x.safetensors"
    w.write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match=r"^--model: .*x\.safetensors: its metadata .*x\.json is missing"):
        pretrained.load(model=str(w))


def test_weights_is_refused_where_there_is_one_set(tmp_path):
    """`sample --model digits --weights model` used to sample the one set of weights there is, the flag
    silently ignored; a diffusers folder has one set too. Only a training checkpoint holds ema and model."""
    with pytest.raises(ValueError, match=r"^--weights: picks the weights of a training checkpoint \(--ckpt\); "
                                         r"the model 'digits' has one set"):
        pretrained.load(model="digits", weights="model")
    (tmp_path / "config.json").write_text("{}")  # a UNet2DModel folder, refused before it is read
    with pytest.raises(ValueError, match=r"^--weights: .* is a diffusers folder, which has one set"):
        pretrained.load(ckpt=str(tmp_path), weights="ema")
    assert pretrained.load(model="digits").model is not None  # the default stays
